#!/usr/bin/env python
"""Write (or check) every config of the paper reproduction from one base per domain.

    python scripts/make_paper_configs.py           # (re)write configs/paper/<domain>/<format>/<model>/*.yaml
    python scripts/make_paper_configs.py --check   # exit 1 if a committed file differs, is missing or is stale

Grid: domain (medcalc, esci) x format (cot, label) x model (4) x method (sft, l2, lora, wiseft, flow, talr)
x LR (1e-6, 5e-6, 2e-5) = 288 files. Each starts from `configs/paper/base_<domain>.yaml`, takes the method's
class and arguments from `configs/methods/<method>.yaml`, and fills in the model (hub id, FSDP2 decoder-layer classes),
the LR, the format (generation budget; ESCI CoT rationales) and per-run directories and names. Output is a
pure function of those files: sorted iteration, fixed YAML style, no timestamps.
"""

from __future__ import annotations

import argparse
import json
import sys
from copy import deepcopy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
METHOD_CONFIGS = ROOT / "configs" / "methods"
RUNS = "runs/paper"

DOMAINS = ("medcalc", "esci")
FORMATS = ("cot", "label")
QWEN2 = "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer"
# model folder name -> (hub id, decoder-layer classes FSDP wraps one unit each)
MODELS = {
    "Qwen2.5-3B-Instruct": ("Qwen/Qwen2.5-3B-Instruct", [QWEN2]),
    "Qwen2.5-7B-Instruct": ("Qwen/Qwen2.5-7B-Instruct", [QWEN2]),
    "Qwen3-4B": ("Qwen/Qwen3-4B", ["transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer"]),
    # AutoModelForCausalLM gives Gemma3ForConditionalGeneration: text layers plus the SigLIP vision tower
    "gemma-3-4b-it": ("google/gemma-3-4b-it", ["transformers.models.gemma3.modeling_gemma3.Gemma3DecoderLayer",
                                               "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer"]),
}
# method -> (file in configs/methods giving class and arguments, name in the paper's table)
METHODS = {
    "sft": ("sft.yaml", "SFT"),
    "l2": ("l2_decoupled.yaml", "L2"),  # not FLOW's l2.yaml, a no-op: see that file's header
    "lora": ("lora.yaml", "LoRA"),
    "wiseft": ("sft.yaml", "WiSE-FT"),  # not a training method: the SFT run, averaged afterwards
    "flow": ("flow.yaml", "FLOW"),
    "talr": ("talr.yaml", "TALR"),
}
LRS = {"1e-6": 1e-6, "5e-6": 5e-6, "2e-5": 2e-5}
MAX_NEW_TOKENS = {("medcalc", "cot"): 1024, ("medcalc", "label"): 64, ("esci", "cot"): 512, ("esci", "label"): 16}
ESCI_RATIONALES = "/path/to/esci_rationales.jsonl"  # placeholder: ESCI ships no rationales
WISEFT_ALPHA = 0.5
# data.chat_template_kwargs per model: the run's one chat setting (talr.chat), used by training, generation, drift
# and the general eval. Qwen3 in non-thinking mode: thinking would spend the generation budget before the answer.
CHAT_TEMPLATE_KWARGS = {"Qwen3-4B": {"enable_thinking": False}}
TABLE_LRS = ("1e-6", "5e-6")  # the LRs of Figure 2 / the methods table (docs/PAPER.md)
PAPER_REPORTS = {"lora": ("1e-6",), "wiseft": ("1e-6",)}  # "–" at 5e-6 in the paper's table


EXPLAINED = ("l2",)  # methods whose generated configs repeat their method file's header comment


def method_comment(path: Path) -> list[str]:
    """The leading comment block of a method config, without the '# ' prefixes."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def run_dir(domain: str, fmt: str, model: str, method: str, lr: str) -> str:
    tag = "sft" if method == "wiseft" else method  # WiSE-FT averages the SFT run at the same LR
    return f"{RUNS}/{domain}/{fmt}/{model}/{tag}_lr{lr}"


def config_path(domain: str, fmt: str, model: str, method: str, lr: str) -> Path:
    return PAPER / domain / fmt / model / f"{method}_lr{lr}.yaml"


def feeds(domain: str, method: str, lr: str) -> list[str]:
    """Which paper table/figure the run feeds (comment lines)."""
    name = METHODS[method][1]
    out = []
    if method == "sft":
        out.append("Figure 1 (LR sweep of SFT per model and format).")
    if lr in TABLE_LRS and lr in PAPER_REPORTS.get(method, TABLE_LRS):
        out.append(f"Figure 2 / the methods table (docs/PAPER.md): column {name}, row LR {lr}.")
    elif method != "sft":
        why = ("the paper reports it at 1e-6 only" if method in PAPER_REPORTS and lr in TABLE_LRS
               else "the paper's 2e-5 results were not published in what we could read")
        out.append(f"No paper figure ({why}); in the grid for completeness.")
    if domain == "esci":
        out.append("ESCI numbers were not published in what we could read: ours only, no paper values beside.")
    return out


def evaluate_chat_args(model: str) -> str:
    """`talr evaluate` flags that give a saved model the chat setting its run trained with."""
    kwargs = CHAT_TEMPLATE_KWARGS.get(model)
    return f" --chat-template-kwargs '{json.dumps(kwargs)}'" if kwargs else ""


def header(domain: str, fmt: str, model: str, method: str, lr: str) -> str:
    hub = MODELS[model][0]
    path = config_path(domain, fmt, model, method, lr).relative_to(ROOT).as_posix()
    run = run_dir(domain, fmt, model, method, lr)
    lines = [
        f"Paper reproduction (arXiv 2509.20758): {domain}, {fmt} targets, {hub}, {METHODS[method][1]}, LR {lr}.",
        *("Feeds: " + f if i == 0 else "       " + f for i, f in enumerate(feeds(domain, method, lr))),
        f"Generated by scripts/make_paper_configs.py from configs/paper/base_{domain}.yaml: do not edit by hand.",
    ]
    if method in EXPLAINED:  # why this arm is set up the way it is, from its method file's header
        lines += [f"{METHODS[method][1]} arm, from configs/methods/{METHODS[method][0]}:",
                  *("  " + line for line in method_comment(METHOD_CONFIGS / METHODS[method][0]))]
    if domain == "esci":
        lines.append("ESCI must be downloaded by you: set data.task.init_args.source to the release folder.")
        if fmt == "cot":
            lines.append("CoT needs rationales (ESCI ships none): set data.task.init_args.rationale_file.")
    if method == "wiseft":
        sft = f"{RUNS}/{domain}/{fmt}/{model}/sft_lr{lr}"
        wise = f"{RUNS}/{domain}/{fmt}/{model}/wiseft_lr{lr}"
        avg = f"{wise}/alpha_{WISEFT_ALPHA:.2f}"
        lines += [
            "WiSE-FT is not a training method: theta = (1 - alpha) theta0 + alpha theta_sft, alpha = 0.5, after SFT.",
            f"Step 1 trains SFT (model and data identical to sft_lr{lr}.yaml, same run directory: skip it",
            "if that run exists); steps 2-4 average, then score the averaged model on the domain and general skill.",
            f"  1. python -m talr fit --config {path}",
            f"  2. python -m talr average --init {hub} --finetuned {sft}/hf --alphas {WISEFT_ALPHA}"
            f" --output-dir {wise}",
            f"  3. python -m talr test --config {path} --model.init_args.pretrained {avg}"
            f" --trainer.logger.init_args.save_dir {avg}",
            f"  4. python -m talr evaluate --model {avg} --tasks ifeval,gsm8k,humaneval_instruct --allow-code-execution"
            f"{evaluate_chat_args(model)} --output {avg}/general.json",
        ]
    else:
        lines += [
            "Run (one node, 8 GPUs), then score the last checkpoint on the official test split:",
            f"  python -m talr fit --config {path}",
            f"  python -m talr test --config {path} --ckpt_path {run}/checkpoints/last.ckpt"
            f" --trainer.logger.init_args.save_dir {run}/test",
        ]
    lines.append(f"Tables and plots: python -m talr report {RUNS} --out paper_figures/report")
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def build(base: dict, method_cfg: dict, domain: str, fmt: str, model: str, method: str, lr: str) -> dict:
    cfg = deepcopy(base)
    hub, layers = MODELS[model]
    run = run_dir(domain, fmt, model, method, lr)
    name = "-".join([domain, fmt, model, "sft" if method == "wiseft" else method, f"lr{lr}"])
    trainer = cfg["trainer"]
    cfg["model"]["init_args"]["decoder_layer_classes"] = [layer.rsplit(".", 1)[-1] for layer in layers]
    trainer["default_root_dir"] = run
    logger = trainer["logger"]["init_args"]
    logger.update(name=name, group=f"{domain}-{fmt}", save_dir=run,
                  tags=[domain, fmt, model, "sft" if method == "wiseft" else method, f"lr{lr}"])
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = f"{run}/checkpoints"
    model_cfg = cfg["model"]
    model_cfg["class_path"] = method_cfg["model"]["class_path"]
    init = model_cfg.setdefault("init_args", {})
    init.update(pretrained=hub, lr=LRS[lr], max_new_tokens=MAX_NEW_TOKENS[domain, fmt])
    init.update(deepcopy(method_cfg["model"].get("init_args") or {}))
    task = cfg["data"]["task"]["init_args"]
    task["format"] = fmt
    if domain == "esci" and fmt == "cot":
        task["rationale_file"] = ESCI_RATIONALES
    if model in CHAT_TEMPLATE_KWARGS:
        cfg["data"]["chat_template_kwargs"] = dict(CHAT_TEMPLATE_KWARGS[model])
    return cfg


def render(cfg: dict, head: str) -> str:
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
    return head + body


def expected() -> dict[Path, str]:
    """Every generated file and its exact text."""
    methods = {m: load_yaml(METHOD_CONFIGS / f) for m, (f, _) in METHODS.items()}
    out = {}
    for domain in DOMAINS:
        base = load_yaml(PAPER / f"base_{domain}.yaml")
        for fmt in FORMATS:
            for model in MODELS:
                for method in METHODS:
                    for lr in LRS:
                        cfg = build(base, methods[method], domain, fmt, model, method, lr)
                        text = render(cfg, header(domain, fmt, model, method, lr))
                        out[config_path(domain, fmt, model, method, lr)] = text
    return out


def generated_files_on_disk() -> set[Path]:
    return {p for d in DOMAINS for p in (PAPER / d).rglob("*.yaml")}


def check(files: dict[Path, str]) -> list[str]:
    problems = []
    for path, text in sorted(files.items()):
        rel = path.relative_to(ROOT).as_posix()
        if not path.exists():
            problems.append(f"missing: {rel}")
        elif path.read_text() != text:
            problems.append(f"differs: {rel}")
    for path in sorted(generated_files_on_disk() - set(files)):
        problems.append(f"stale (not generated): {path.relative_to(ROOT).as_posix()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files instead of writing them")
    args = parser.parse_args(argv)
    files = expected()
    if args.check:
        problems = check(files)
        if problems:
            print("\n".join(problems[:50]), file=sys.stderr)
            print(f"{len(problems)} problem(s); run: python scripts/make_paper_configs.py", file=sys.stderr)
            return 1
        print(f"ok: {len(files)} configs up to date")
        return 0
    for path in sorted(generated_files_on_disk() - set(files)):
        path.unlink()
    written = 0
    for path, text in sorted(files.items()):
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written += 1
    print(f"{len(files)} configs, {written} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
