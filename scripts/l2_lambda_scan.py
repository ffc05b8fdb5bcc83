#!/usr/bin/env python
"""How large must L2-to-init's λ be to change the update? A scan per form on SmolLM2-135M (a few steps).

    python scripts/l2_lambda_scan.py          # writes results/miniature_v2/l2_lambda_scan.json; rerun to resume

Each run trains SmolLM2-135M-Instruct with `talr.methods.L2Init` (or SFT) for `--steps` AdamW steps on the
miniature v2's training rows (scripts/miniature_v2_data.py; CoT targets, batch `--batch-size`, 10% warmup then
cosine, LR `--lr`), all runs from the same weights, data order and seed, each in its own process (so memory is
returned between runs). The measure is

    r = ‖θ_L2 − θ_SFT‖ / ‖θ_SFT − θ0‖        (over all trainable parameters, after the last step)

the change L2 makes to SFT's update, relative to that update. A second SFT run gives the noise floor (CPU runs
are deterministic: 0). The smallest λ per form with r ≥ `--threshold` is reported. For the decoupled form the pull
alone shrinks a deviation by Π(1 − lr_t·λ) ≈ exp(−λ·Σlr_t), so the script also reports λ·Σlr_t, the
dimensionless strength that carries over to other models, LRs and run lengths. Finished runs are kept in the
output file, SFT's weights in `--work`, so an interrupted scan resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

GRID = {  # the sum form's λ·P is the mean form's λ exactly (same gradient), so `mean` adds only FLOW's point
    "mean": [1e-3],
    "sum": [1e-7, 1e-6, 1e-5, 1e-4],
    "decoupled": [1.0, 10.0, 100.0, 1000.0],
}


def train(args, form: str, lam: float | None):
    """Weights after `args.steps` steps of SFT (form "sft") or L2Init, and the learning rate of each step."""
    import lightning.pytorch as L

    from talr.data.datamodule import DomainDataModule
    from talr.methods import SFT, L2Init
    from talr.tasks.medcalc import MedCalc

    class Recorder(L.Callback):
        lrs: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    L.seed_everything(0, verbose=False)
    dm = DomainDataModule(task=MedCalc(source=str(args.work / "data"), format="cot"), tokenizer=args.model,
                          max_length=1024, overlong="error", batch_size=args.batch_size)
    common = dict(pretrained=args.model, lr=args.lr, warmup_ratio=0.1, baseline_eval=False, generate_in_eval=False,
                  attn_implementation="eager", loss_chunk_size=256)  # chunked loss: same numbers, less memory
    module = SFT(**common) if form == "sft" else L2Init(**common, l2_form=form, l2_lambda=lam)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=str(args.work))
    trainer.fit(module, dm)
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}, list(recorder.lrs)


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def one(args, spec: str) -> dict:
    """Child process: train one configuration and measure it against the stored SFT weights."""
    import time

    import torch

    from talr.modeling import load_model

    form, _, lam = spec.partition(":")
    t = time.time()
    weights, lrs = train(args, form, float(lam) if lam else None)
    wall = round(time.time() - t, 1)
    theta0 = {n: p.detach() for n, p in load_model(args.model, "float32").named_parameters()}
    sft_path = args.work / "sft_weights.pt"
    if form == "sft" and not sft_path.exists():
        torch.save(weights, sft_path)
        return {"form": "sft", "lambda": None, "r": 0.0, "wall_s": wall, "sum_lr": sum(lrs), "steps": len(lrs),
                "sft_update_norm": distance(weights, theta0), "trainable_parameters": sum(t.numel() for t in theta0.values())}
    sft = torch.load(sft_path, weights_only=True)
    run = {"form": "sft (again)" if form == "sft" else form, "lambda": float(lam) if lam else None,
           "r": distance(weights, sft) / distance(sft, theta0), "wall_s": wall}
    if form == "decoupled":
        run["lambda_sum_lr"] = float(lam) * sum(lrs)
    return run


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:SmolLM2-135M-Instruct")
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "medcalc_bench" / "test_data.csv"))
    p.add_argument("--lr", type=float, default=5e-5, help="the miniature v2's middle LR")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.01, help="r that counts as a measurable change")
    p.add_argument("--forms", default="mean,sum,decoupled")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "l2_lambda_scan")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "miniature_v2" / "l2_lambda_scan.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: FORM[:LAMBDA]
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args, args.one)), flush=True)
        return None

    if not (args.work / "data" / "train.csv").exists():
        from miniature_v2_data import select, write_splits

        from talr.data.sources import read_file
        from talr.modeling import load_tokenizer

        write_splits(select(read_file(args.source), load_tokenizer(args.model)), args.work / "data")
    settings = {"model": args.model, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size}
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = done.get("runs", []) if all(done.get(k) == v for k, v in settings.items()) else []
    if not runs:
        (args.work / "sft_weights.pt").unlink(missing_ok=True)
    plan = [("sft", None), ("sft", None)] + [(f, lam) for f in args.forms.split(",") for lam in GRID[f]]
    result = {**settings, "threshold": args.threshold, "runs": runs, "complete": len(runs) == len(plan)}
    for i, (form, lam) in enumerate(plan):
        if i < len(runs):
            continue
        spec = form if lam is None else f"{form}:{lam}"
        child = [sys.executable, __file__, "--one", spec, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"{spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        runs.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(runs[-1]), flush=True)
        result = {**settings, "threshold": args.threshold, "runs": runs, "complete": len(runs) == len(plan)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sft = runs[0]
    smallest = {f: min([r["lambda"] for r in runs if r["form"] == f and r["r"] >= args.threshold], default=None)
                for f in args.forms.split(",")}
    result.update(sum_lr=sft["sum_lr"], trainable_parameters=sft["trainable_parameters"],
                  sft_update_norm=sft["sft_update_norm"], smallest_lambda=smallest,
                  smallest_lambda_mean_form_from_sum=smallest.get("sum") and smallest["sum"] * sft["trainable_parameters"])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"smallest_lambda": smallest}, indent=1))
    return result


if __name__ == "__main__":
    main()
