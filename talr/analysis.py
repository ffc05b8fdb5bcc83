"""`python -m talr analyze`: how hard a training set is for a model, token by token (the paper's Figure 3).

    python -m talr analyze --model builtin:SmolLM2-135M-Instruct --task medcalc --source synthetic \\
        --format cot --limit 64 --output paper_figures/analysis/smollm2_medcalc_cot.json

For every supervised (response) token of the first `--limit` rows of a split, p_i = p_θ(token_i | prefix)
under the model (batched forward passes, no gradient). Writes JSON: a 20-bin histogram of p, the shares of
tokens with p < 0.05 / 0.1 / 0.2 / 0.5, median p, mean NLL, the 20 hardest tokens with ±8 tokens of decoded
context, and advice derived from the paper's guidelines (docs/PAPER.md) with these numbers in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (0.05, 0.1, 0.2, 0.5)
BINS = 20
HARD = 0.2  # "hard" token: p below this
# Share of supervised tokens with p < 0.2 above which a set counts as having many hard tokens. The paper's
# 3-7B models put the median token near p = 1; SmolLM2-135M leaves 30% (CoT) to 65% (label) below 0.2.
MANY_HARD, FEW_HARD = 0.25, 0.10
log = logging.getLogger(__name__)


def build_task(task: str, source: str, fmt: str, split: str, limit: int | None):
    caps = {split: limit} if limit else None
    if task == "medcalc":
        from talr.tasks.medcalc import MedCalc

        return MedCalc(source=source, format=fmt, max_examples=caps)
    if task == "esci":
        from talr.tasks.esci import ESCI

        return ESCI(source=source, format=fmt, max_examples=caps)
    raise ValueError(f"unknown task {task!r}; choose medcalc or esci")


@torch.no_grad()
def token_nll(model, examples: list[dict], pad_id: int, batch_size: int, device, progress: bool = True):
    """Per-example arrays of the supervised tokens' NLL (fp32), and their positions in input_ids."""
    from tqdm.auto import tqdm

    from talr.data.encoding import Collator

    collate = Collator(pad_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    nll: list = [None] * len(examples)
    positions: list = [None] * len(examples)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="token probabilities", disable=not progress):
        idx = order[start: start + batch_size]
        batch = collate([{**examples[i], "index": i} for i in idx])
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        labels = batch["labels"][:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0),
                                                   reduction="none")
        for row, i in enumerate(idx):
            mask = labels[row] != -100
            nll[i] = losses[row][mask].double().cpu().numpy()
            positions[i] = (torch.nonzero(mask).squeeze(1) + 1).cpu().numpy()  # index of the predicted token
    return nll, positions


def summarize(nll: np.ndarray) -> dict:
    """Histogram, shares below thresholds, median p and mean NLL of a flat array of token NLLs."""
    p = np.exp(-nll)
    counts, edges = np.histogram(p, bins=BINS, range=(0.0, 1.0))
    n = max(len(p), 1)
    return {
        "n_tokens": int(len(p)),
        "histogram": {"bin_edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(),
                      "shares": (counts / n).tolist()},
        "share_below": {str(t): float((p < t).sum() / n) for t in THRESHOLDS},
        "median_p": float(np.median(p)) if len(p) else float("nan"),
        "mean_p": float(p.mean()) if len(p) else float("nan"),
        "mean_nll": float(nll.mean()) if len(p) else float("nan"),
    }


def hardest_tokens(nll, positions, examples, tokenizer, k: int = 20, context: int = 8) -> list[dict]:
    flat = [(float(v), i, int(at)) for i, (vals, where) in enumerate(zip(nll, positions)) for v, at in zip(vals, where)]
    out = []
    for value, i, pos in sorted(flat, key=lambda t: -t[0])[:k]:
        ids = examples[i]["input_ids"]
        start = max(pos - context, 0)
        out.append({
            "token": tokenizer.decode([ids[pos]]), "token_id": int(ids[pos]), "p": math.exp(-value), "nll": value,
            "example": i, "position": pos, "context_before": tokenizer.decode(ids[start:pos]),
            "context_after": tokenizer.decode(ids[pos + 1: pos + 1 + context]),
            "row_id": str(examples[i]["row"].get("Row Number", examples[i]["row"].get("example_id", i))),
        })
    return out


def advice(stats: dict, fmt: str) -> list[str]:
    """The paper's guidelines (docs/PAPER.md), applied to this data set's numbers."""
    from talr.paper_numbers import lookup, MEAN

    sft1, sft5 = lookup("medcalc", MEAN, "sft", 1e-6), lookup("medcalc", MEAN, "sft", 5e-6)
    talr5 = lookup("medcalc", MEAN, "talr", 5e-6)
    hard, median = stats["share_below"][str(HARD)], stats["median_p"]
    lines = [
        f"Start at LR 1e-6: in the paper it keeps most general skill at comparable domain score (MedCalc, mean over "
        f"models: SFT {sft1[0]:.3f} domain / {sft1[1]:.3f} general at 1e-6 against {sft5[0]:.3f} / {sft5[1]:.3f} "
        f"at 5e-6)."
    ]
    level = "many" if hard >= MANY_HARD else "some" if hard >= FEW_HARD else "few"
    text = (f"{hard:.1%} of the {stats['n_tokens']} supervised tokens have p < {HARD} under this model (median p "
            f"{median:.3f}, mean NLL {stats['mean_nll']:.3f}): {level} hard tokens. ")
    if level == "few":
        text += ("The model already assigns high probability to most targets, so fine-tuning moves it little; "
                 "small LRs should keep general skill.")
    else:
        text += (f"Low-probability tokens drive most of the general-skill loss (the paper's bound grows with the "
                 f"tilt they require times the step size), so at a given LR expect more loss than on a set with few "
                 f"hard tokens: prefer LR 1e-6, and TALR, which down-weights them (paper at 5e-6: TALR "
                 f"{talr5[0]:.3f} / {talr5[1]:.3f} against SFT {sft5[0]:.3f} / {sft5[1]:.3f}).")
    lines.append(text)
    if fmt == "label":
        lines.append("Label-only targets tolerate larger LRs than CoT targets in the paper; 5e-6 may be acceptable "
                     "here if the general score is watched" + (", though the hard-token share argues for caution."
                                                              if level == "many" else "."))
    else:
        lines.append("CoT targets lose more general skill at larger LRs than label-only targets in the paper: keep "
                     "1e-6, and use TALR if a larger LR is needed for domain score.")
    return lines


def analyze(model, tokenizer, task, split: str = "train", max_length: int = 2048, batch_size: int = 4,
            device: str | torch.device = "cpu", progress: bool = True, hardest: int = 20, context: int = 8) -> dict:
    from talr.data.encoding import encode_rows

    rows = task.load_splits()[split]
    log.info("analyze: %d rows of %s (source %s), up to %d tokens each; tokenising", len(rows), split,
             task.source, max_length)
    examples, counts = encode_rows(task, rows, tokenizer, max_length, "truncate", split=split, progress=progress)
    if not examples:
        raise ValueError(f"no examples in split {split!r} after encoding")
    tokens = sum(len(e["input_ids"]) for e in examples)
    log.info("analyze: %d examples, %d tokens: %d forward passes of batch %d on %s", len(examples), tokens,
             -(-len(examples) // batch_size), batch_size, device)
    nll, positions = token_nll(model, examples, tokenizer.pad_token_id, batch_size, device, progress)
    stats = summarize(np.concatenate(nll))
    stats["n_examples"] = len(examples)
    stats["encoding"] = dict(counts)
    stats["per_example_mean_nll"] = [float(v.mean()) if len(v) else float("nan") for v in nll]
    stats["hardest_tokens"] = hardest_tokens(nll, positions, examples, tokenizer, hardest, context)
    stats["advice"] = advice(stats, task.format)
    stats["advice_text"] = " ".join(stats["advice"])
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talr analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="hub id, local directory, .gguf file or builtin:SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--task", choices=["medcalc", "esci"], default="medcalc")
    p.add_argument("--source", default="synthetic", help="the task's data source (hub id, path, or synthetic)")
    p.add_argument("--format", choices=["cot", "label"], default="cot")
    p.add_argument("--split", choices=["train", "validation", "test"], default="train")
    p.add_argument("--limit", type=int, default=256, help="first N rows of the split (0 = all)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--hardest", type=int, default=20, help="how many hardest tokens to list")
    p.add_argument("--context", type=int, default=8, help="tokens of context each side of a hard token")
    p.add_argument("--output", default=None, help="JSON file to write (default: paper_figures/analysis/"
                   "<model>_<task>_<format>_<split>.json, where notebooks/figure3_tokens.ipynb reads)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    log.info("analyze: %s on %s/%s (%s split, %s), batch %d", args.model, args.task, args.format, args.split,
             f"a seeded subset of {args.limit} rows" if args.limit else "all rows", args.batch_size)
    from talr.modeling import load_model, load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, args.dtype, args.trust_remote_code).to(device)
    task = build_task(args.task, args.source, args.format, args.split, args.limit or None)
    result = analyze(model, tokenizer, task, args.split, args.max_length, args.batch_size, device,
                     progress=not args.no_progress, hardest=args.hardest, context=args.context)
    result = {"model": args.model, "task": args.task, "source": args.source, "format": args.format,
              "split": args.split, "limit": args.limit, "max_length": args.max_length, **result}
    model_name = Path(args.model.split(":")[-1]).name or "model"  # builtin:X, hub org/X, /path/X -> X
    out = Path(args.output or f"paper_figures/analysis/{model_name}_{args.task}_{args.format}_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['n_examples']} examples, {result['n_tokens']} supervised tokens; "
          f"median p {result['median_p']:.3f}; "
          + ", ".join(f"p<{t}: {s:.1%}" for t, s in result["share_below"].items()))
    print("\n".join(f"- {line}" for line in result["advice"]))
    print(f"wrote {out}")
    return result
