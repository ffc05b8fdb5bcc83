"""`python -m talr evaluate`: general-capability scores (IFEval, GSM8K, HumanEval) of a saved model.

    python -m talr evaluate --model builtin:SmolLM2-135M-Instruct --tasks ifeval,gsm8k \\
        --limit 10 --data-dir ../shared/data --output results.json
    python -m talr evaluate --model runs/.../hf --chat-template-kwargs '{"enable_thinking": false}'  # Qwen3 runs
    torchrun --nproc_per_node 8 -m talr evaluate --model runs/.../hf   # every GPU its share of the documents

The JSON output holds lm-eval's results, the settings, and the seconds: "wall_time_s" ({"load_model", "evaluate",
"total"}) and "task_wall_time_s" ({lm-eval task: seconds spent on it}, talr.general.evaluate.timed_tasks).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

from talr.general.lm_tasks import CODE_TASKS, PAPER_TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="talr evaluate",
        description="Score a model on the paper's general benchmarks with lm-eval's own task definitions.",
    )
    p.add_argument("--model", required=True,
                   help="HF model directory, hub id, .gguf file, or 'builtin:SmolLM2-135M-Instruct'")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use (default: the model's)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help=f"comma-separated lm-eval task names (default: {','.join(PAPER_TASKS)})")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (first N; a value < 1 is a fraction); default: all")
    p.add_argument("--data-dir", default=None,
                   help="local data: <dir>/ifeval/input_data.jsonl, <dir>/gsm8k/{train,test}.jsonl, "
                        "optional <dir>/humaneval/HumanEval.jsonl[.gz]; default: the Hugging Face hub")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="required for humaneval: runs model-written code locally (subprocess + timeout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap generated tokens for every task (changes results; quick checks only)")
    p.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                   help="chat template variables, as the run's data.chat_template_kwargs, e.g. "
                        "'{\"enable_thinking\": false}' for Qwen3 (default: none: Qwen3 would think)")
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: lm-eval's defaults)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0, mps, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default=None,
                   help="JSON file for the full results (default: <run>/general.json when --model is a run's hf/ "
                        "directory, where `talr report` finds it; else runs/evaluate/<model>/general.json)")
    return p


def default_output(model: str) -> Path:
    """Beside the run when `model` is a run's exported `hf/` (or a `talr average` output), else under runs/."""
    path = Path(model).expanduser()
    if path.name == "hf" and any((path.parent / f).exists() for f in ("summary.json", "config.yaml")):
        return path.parent / "general.json"
    if (path / "averaging.json").exists():
        return path / "general.json"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in model.rstrip("/").rsplit("/", 1)[-1])
    return Path("runs") / "evaluate" / name / "general.json"


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def format_table(result: dict) -> str:
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in result["results"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr")
            rows.append((task, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}"))
    if result.get("general/score") is not None:
        rows.append(("general", "score", f"{result['general/score']:.4f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if set(CODE_TASKS) & set(tasks) and not args.allow_code_execution:  # parser.error exits with status 2
        parser.error("humaneval executes model-written code; pass --allow-code-execution to run it, "
                     "or leave it out of --tasks")
    if args.model.endswith(".ckpt"):
        parser.error("Lightning .ckpt files are not supported yet; export the model to a HF directory")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    from talr.progress import general_eval_plan

    logging.getLogger("talr.evaluate").info("evaluate %s: %s", args.model, general_eval_plan(
        tasks, limit, args.data_dir, args.max_gen_toks, args.batch_size))

    from talr.chat import ChatFormat
    from talr.general.evaluate import evaluate_general
    from talr.modeling import load_model, load_tokenizer

    from talr.general.sharded import join_launcher_group

    device, data_parallel = join_launcher_group(resolve_device(args.device))  # torchrun: every rank its share
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code).to(device)
    load_s = time.perf_counter() - start
    chat_format = ChatFormat.from_tokenizer(tokenizer, args.chat_template_kwargs, model.generation_config)
    result = evaluate_general(
        model, tokenizer, tasks=tasks, limit=limit, apply_chat_template=not args.no_chat_template,
        batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, data_dir=args.data_dir,
        allow_code_execution=args.allow_code_execution, seed=args.seed, chat_format=chat_format,
        data_parallel=data_parallel,
    )
    if data_parallel and torch_rank() != 0:
        return 0  # rank 0 prints and writes the combined results
    result["settings"] = {
        "model": args.model, "tokenizer": args.tokenizer or args.model, "device": device, "dtype": args.dtype,
        "python": platform.python_version(), "platform": platform.platform(), **result["config"],
    }
    result["wall_time_s"] = {"load_model": load_s, "evaluate": result["wall_time_s"],
                             "total": time.perf_counter() - start}
    print(format_table(result))
    per_task = ", ".join(f"{task} {s:.1f} s" for task, s in result.get("task_wall_time_s", {}).items())
    print(f"lm-eval {result['versions']['lm_eval']}, task versions {result['versions']['tasks']}, "
          f"{result['wall_time_s']['evaluate']:.1f} s ({per_task})")
    out = Path(args.output).expanduser() if args.output else default_output(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
