"""Miniature reproduction of the paper on a CPU, in one resumable command (about an hour on 2 cores).

    python scripts/reproduce_miniature.py                       # everything; rerun to resume
    python scripts/reproduce_miniature.py --only base,sft_lr2e-4,wiseft_lr2e-4   # a subset
    python scripts/reproduce_miniature.py --config configs/miniature/base.yaml \
        --config configs/miniature/cot.yaml --methods talr --runs runs/miniature-cot \
        --results results/miniature-cot                              # the CoT arm

Steps, each a `python -m talr ...` command run in a subprocess (its log in `<runs>/<name>/log.txt`):
  base          `talr validate` (domain scores of the untouched model), `talr evaluate` (its IFEval subset),
                `talr analyze` (token-probability profile of the training rows)
  sft_lr<lr>    `talr fit` with SFT at each LR of --lrs
  <m>_lr<max>   `talr fit` with TALR, FLOW, L2-to-init and LoRA at the largest LR (configs/methods/<m>.yaml)
  wiseft_lr<max>  `talr average` of the base and SFT at the largest LR (α = 0.5), then validate/evaluate,
                and its code-length drift computed here (the same measure the fit runs log)
A step that finished has a `.done` marker and is skipped on the next call; an interrupted step is
wiped and run again. Finally the summaries, metrics and analysis are copied to `--results` together
with `talr report`'s tables and this script's own table and figures (no weights, no data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from talr.averaging import alpha_dirname
from talr.report import fmt_lr

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("talr", "flow", "l2", "lora")
WISEFT_ALPHA = 0.5  # the mid-point of base and fine-tuned weights
COPIED = ("summary.json", "general.json", "metrics.csv", "analysis.json", "drift.json", "config.yaml")


def merge(base: dict, over: dict) -> dict:
    """Nested dicts merged key by key; any other value (lists included) replaced, as jsonargparse does."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def callback_args(config: dict, name: str) -> dict:
    for cb in config.get("trainer", {}).get("callbacks", []) or []:
        if isinstance(cb, dict) and cb.get("class_path", "").rsplit(".", 1)[-1] == name:
            return dict(cb.get("init_args") or {})
    raise KeyError(f"the miniature config has no {name} callback")


def copy_results(src: Path, dest: Path, names) -> None:
    """Copy a finished step's result files that exist, less the fields that quote the data set (never committed):
    `analysis.json`'s hardest tokens and the text of `hard_token_probs.json`'s tracked tokens (their ids,
    positions and probabilities stay)."""
    dest.mkdir(parents=True, exist_ok=True)
    for fname in names:
        if (src / fname).exists():
            shutil.copy2(src / fname, dest / fname)
    strip_data_quotes(dest)


def strip_data_quotes(folder: Path) -> None:
    """Remove, in place, the fields of a step's result files that quote training or held-out rows."""
    if (folder / "analysis.json").exists():
        analysis = json.loads((folder / "analysis.json").read_text())
        analysis.pop("hardest_tokens", None)
        (folder / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
    if (folder / "hard_token_probs.json").exists():
        probs = json.loads((folder / "hard_token_probs.json").read_text())
        for pair in probs.get("pairs", []):
            pair.pop("token", None)
        (folder / "hard_token_probs.json").write_text(json.dumps(probs, indent=1) + "\n")


class Miniature:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config_paths = [Path(c) for c in args.config or [ROOT / "configs" / "miniature" / "base.yaml"]]
        self.config: dict = {}
        for path in self.config_paths:  # later files override earlier ones, like LightningCLI's --config
            self.config = merge(self.config, yaml.safe_load(path.read_text()) or {})
        self.runs = Path(args.runs)
        self.model = args.model or self.config["model"]["init_args"]["pretrained"]
        self.general = callback_args(self.config, "GeneralEvalCallback")
        self.drift = callback_args(self.config, "CodeLengthDriftCallback")
        self.lrs = sorted(args.lrs)
        self.top = fmt_lr(self.lrs[-1])

    # -- plan ------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, callable]]:
        steps = [("base", self.base)]
        steps += [(f"sft_lr{fmt_lr(lr)}", self.fit_step("sft", lr)) for lr in self.lrs]
        steps += [(f"{m}_lr{self.top}", self.fit_step(m, self.lrs[-1])) for m in self.args.methods if m in METHODS]
        if "wiseft" in self.args.methods:
            steps.append((f"wiseft_lr{self.top}", self.wiseft))
        return steps

    def run(self) -> None:
        only = set(self.args.only.split(",")) if self.args.only else None
        t0 = time.time()
        for name, step in self.plan():
            if only is not None and name not in only:
                continue
            out = self.runs / name
            if (out / ".done").exists():
                print(f"[miniature] {name}: done earlier, skipped", flush=True)
                continue
            if out.exists():
                shutil.rmtree(out)  # an interrupted step starts again from scratch
            out.mkdir(parents=True)
            t = time.time()
            print(f"[miniature] {name}: running (log: {out / 'log.txt'})", flush=True)
            step(name, out)
            (out / ".done").write_text(f"{time.time() - t:.1f}\n")
            print(f"[miniature] {name}: finished in {time.time() - t:.0f} s", flush=True)
        print(f"[miniature] all steps in {time.time() - t0:.0f} s; collecting results", flush=True)
        self.collect()

    # -- commands --------------------------------------------------------------------------------
    def talr(self, out: Path, *argv: str) -> None:
        cmd = [sys.executable, "-m", "talr", *argv]
        with open(out / "log.txt", "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc != 0:
            tail = (out / "log.txt").read_text()[-3000:]
            raise SystemExit(f"[miniature] failed (exit {rc}): {' '.join(cmd)}\n...{tail}")

    def lightning(self, subcommand: str, name: str, *extra: str) -> list[str]:
        configs = [arg for path in self.config_paths for arg in ("--config", str(path))]
        return [subcommand, *configs, *extra,
                "--trainer.default_root_dir", str(self.runs),
                "--trainer.logger.init_args.save_dir", str(self.runs),
                "--trainer.logger.init_args.name", name, *self.args.set]

    def evaluate(self, out: Path, model: str) -> None:
        argv = ["evaluate", "--model", model, "--tasks", ",".join(self.general.get("tasks", ["ifeval"])),
                "--batch-size", str(self.general.get("batch_size", 8)), "--output", str(out / "general.json")]
        for key, flag in (("limit", "--limit"), ("max_gen_toks", "--max-gen-toks"), ("data_dir", "--data-dir")):
            if self.general.get(key) is not None:
                argv += [flag, str(self.general[key])]
        self.talr(out, *argv)

    def base(self, name: str, out: Path) -> None:
        self.talr(out, *self.lightning("validate", name, "--model.init_args.pretrained", self.model))
        self.evaluate(out, self.model)
        task = self.config["data"]["task"]["init_args"]
        self.talr(out, "analyze", "--model", self.model, "--source", str(task["source"]), "--format", task["format"],
                  "--split", "train", "--limit", str(task["max_examples"]["train"]),
                  "--max-length", str(self.config["data"]["max_length"]), "--output", str(out / "analysis.json"),
                  "--no-progress")

    def fit_step(self, method: str, lr: float):
        def step(name: str, out: Path) -> None:
            extra = [] if method == "sft" else ["--config", str(ROOT / "configs" / "methods" / f"{method}.yaml")]
            extra += ["--model.init_args.pretrained", self.model, "--model.init_args.lr", str(lr)]
            if method == "sft" and lr == self.lrs[-1]:  # WiSE-FT averages this run with the base model
                # fp32 export: a bf16 copy would round away small updates before averaging
                extra += ['--trainer.callbacks+={"class_path": "talr.callbacks.ExportHF", "init_args": {"dtype": "float32"}}']
            self.talr(out, *self.lightning("fit", name, *extra))
        return step

    def wiseft(self, name: str, out: Path) -> None:
        finetuned = self.runs / f"sft_lr{self.top}" / "hf"
        if not (finetuned / "config.json").exists():
            raise SystemExit(f"[miniature] {name} needs {finetuned} (run step sft_lr{self.top} first)")
        self.talr(out, "average", "--init", self.model, "--finetuned", str(finetuned), "--alphas", str(WISEFT_ALPHA),
                  "--output-dir", str(out / "weights"))
        averaged = str(out / "weights" / alpha_dirname(WISEFT_ALPHA))
        self.talr(out, *self.lightning("validate", name, "--model.init_args.pretrained", averaged))
        self.evaluate(out, averaged)
        (out / "drift.json").write_text(json.dumps(self.drift_of(averaged), indent=2) + "\n")

    def drift_of(self, model_path: str) -> dict[str, float]:
        """The fit runs' drift measure (CodeLengthDriftCallback) for a model made without training."""
        from talr.general.drift import CodeLengthDriftCallback
        from talr.modeling import load_model, load_tokenizer

        attn = self.config["model"]["init_args"].get("attn_implementation")
        tokenizer = load_tokenizer(self.model)
        callback = CodeLengthDriftCallback(**{**self.drift, "every_n_steps": 1})
        callback.setup_reference(load_model(self.model, "float32", False, attn).eval(), tokenizer)
        return callback.measure(load_model(model_path, "float32", False, attn).eval())

    # -- results ---------------------------------------------------------------------------------
    def result_dir(self, name: str) -> str:
        """Where a step's files go under --results: the paper layout `talr report` reads method/LR/α from."""
        if name == "base":
            return "base"
        task = self.config["data"]["task"]
        domain = task["class_path"].rsplit(".", 1)[-1].lower()
        model = self.model.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
        alpha = f"/{alpha_dirname(WISEFT_ALPHA)}" if name.startswith("wiseft") else ""
        return f"{domain}/{task['init_args']['format']}/{model}/{name}{alpha}"

    def collect(self) -> None:
        from miniature_results import write_results  # scripts/miniature_results.py

        results = Path(self.args.results)
        results.mkdir(parents=True, exist_ok=True)
        index = []
        for name, _ in self.plan():
            if not (self.runs / name / ".done").exists():
                continue
            dest = results / self.result_dir(name)
            copy_results(self.runs / name, dest, COPIED)
            wall = float((self.runs / name / ".done").read_text())
            index.append({"step": name, "dir": self.result_dir(name), "wall_time_s": wall})
        (results / "steps.json").write_text(json.dumps(index, indent=2) + "\n")
        from talr.report import report

        fits = [str(results / step["dir"]) for step in index if step["step"] != "base"]
        if fits:
            report(fits, results / "report", plot=True)
        write_results(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="fit config(s), later ones overriding earlier ones "
                   "(default: configs/miniature/base.yaml)")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   default=[*METHODS, "wiseft"], help="methods run at the largest LR besides SFT")
    p.add_argument("--model", default=None, help="default: the config's model.init_args.pretrained")
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-5, 5e-5, 2e-4],
                   help="SFT learning rates; the methods run at the largest")
    p.add_argument("--runs", default=str(ROOT / "runs" / "miniature"), help="working directory (weights, logs)")
    p.add_argument("--results", default=str(ROOT / "results" / "miniature"), help="what is committed")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--set", nargs="*", default=[], help="extra arguments for every fit/validate, e.g. "
                   "--set=--data.batch_size=2")
    p.add_argument("--collect-only", action="store_true", help="only rebuild the results from finished steps")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if unknown := set(args.methods) - {*METHODS, "wiseft"}:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {[*METHODS, 'wiseft']}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mini = Miniature(args)
    mini.collect() if args.collect_only else mini.run()


if __name__ == "__main__":
    main()
