"""Miniature v2 (issue 14) on a CPU, one resumable command: can SmolLM2-scale runs confirm or refute F1 and TALR's
advantage? Design and pre-registered criteria: results/miniature_v2/DESIGN.md.

    OMP_WAIT_POLICY=PASSIVE python scripts/reproduce_miniature_v2.py                 # core runs; rerun to resume
    OMP_WAIT_POLICY=PASSIVE python scripts/reproduce_miniature_v2.py --extra flow,l2 # plus FLOW and L2 at 5e-5
    python scripts/reproduce_miniature_v2.py --collect-only                           # rebuild tables and verdict

Steps (each a `python -m talr ...` subprocess, log in `<runs>/<step>/log.txt`; a finished step leaves `.done`
and is skipped next time, an interrupted one is wiped and rerun — the machinery of scripts/reproduce_miniature.py):
  data                  the split files (scripts/miniature_v2_data.py) in `<runs>/data` (git-ignored)
  base                  `talr validate` (held-out NLLs of the untouched model), `talr analyze` (token profile)
  sft_lr<lr>            SFT at each of --lrs (seed 0)
  talr_lr<lr>           TALR at the two lower LRs (seed 0)
  sft|talr_lr<mid>_seed<s>   the middle LR again with each further seed of --seeds
  flow|l2_lr<mid>       with --extra (configs/methods/flow.yaml; configs/miniature_v2/l2.yaml)
Then `<results>` gets the copied run files (no weights, no data rows) and scripts/miniature_v2_results.py writes
the tables, the verdict against the pre-registered criteria and the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from reproduce_miniature import Miniature, copy_results, merge  # noqa: E402  (the v1 driver's resumable step machinery)

from talr.report import fmt_lr  # noqa: E402

CONFIGS = ROOT / "configs" / "miniature_v2"
METHOD_CONFIGS = {"talr": ROOT / "configs" / "methods" / "talr.yaml", "flow": ROOT / "configs" / "methods" / "flow.yaml",
                  "l2": CONFIGS / "l2.yaml"}
EXTRA = ("flow", "l2")
COPIED = ("summary.json", "metrics.csv", "config.yaml", "token_share.json", "hard_token_probs.json", "analysis.json")


class MiniatureV2(Miniature):
    def __init__(self, args: argparse.Namespace):  # the v1 constructor needs an IFEval callback this design drops
        self.args = args
        self.config_paths = [Path(c) for c in args.config or [CONFIGS / "base.yaml"]]
        self.config: dict = {}
        for path in self.config_paths:
            self.config = merge(self.config, yaml.safe_load(path.read_text()) or {})
        self.runs = Path(args.runs)
        self.model = args.model or self.config["model"]["init_args"]["pretrained"]
        self.lrs = sorted(args.lrs)
        if len(self.lrs) != 3:
            raise SystemExit("--lrs takes three learning rates (the paper's 1 : 5 : 20)")
        self.mid = self.lrs[1]

    def plan(self) -> list[tuple[str, callable]]:
        steps = [("data", self.data), ("base", self.base)]
        steps += [(f"sft_lr{fmt_lr(lr)}", self.fit_step("sft", lr, self.args.seeds[0])) for lr in self.lrs]
        steps += [(f"talr_lr{fmt_lr(lr)}", self.fit_step("talr", lr, self.args.seeds[0])) for lr in self.lrs[:2]]
        for seed in self.args.seeds[1:]:
            steps += [(f"{m}_lr{fmt_lr(self.mid)}_seed{seed}", self.fit_step(m, self.mid, seed)) for m in ("sft", "talr")]
        steps += [(f"{m}_lr{fmt_lr(self.mid)}", self.fit_step(m, self.mid, self.args.seeds[0])) for m in self.args.extra]
        return steps

    # -- steps -----------------------------------------------------------------------------------
    def data_dir(self) -> Path:
        return self.runs / "data"

    def data(self, name: str, out: Path) -> None:
        from miniature_v2_data import describe, select, write_splits

        from talr.data.sources import read_file
        from talr.modeling import load_tokenizer

        splits = select(read_file(self.args.source), load_tokenizer(self.model))
        write_splits(splits, self.data_dir())
        (out / "selection.json").write_text(json.dumps(describe(splits), indent=1) + "\n")

    def lightning(self, subcommand: str, name: str, *extra: str) -> list[str]:
        return super().lightning(subcommand, name, "--data.task.init_args.source", str(self.data_dir()), *extra)

    def base(self, name: str, out: Path) -> None:
        self.talr(out, *self.lightning("validate", name, "--model.init_args.pretrained", self.model))
        self.talr(out, "analyze", "--model", self.model, "--source", str(self.data_dir()), "--format", "cot",
                  "--split", "train", "--limit", "0", "--max-length", str(self.config["data"]["max_length"]),
                  "--output", str(out / "analysis.json"), "--no-progress")

    def fit_step(self, method: str, lr: float, seed: int):
        def step(name: str, out: Path) -> None:
            extra = [] if method == "sft" else ["--config", str(METHOD_CONFIGS[method])]
            extra += ["--model.init_args.pretrained", self.model, "--model.init_args.lr", str(lr),
                      "--seed_everything", str(seed), "--data.seed", str(seed)]
            self.talr(out, *self.lightning("fit", name, *extra))
        return step

    # -- results ---------------------------------------------------------------------------------
    def collect(self) -> None:
        from miniature_v2_results import write_results  # scripts/miniature_v2_results.py

        results = Path(self.args.results)
        results.mkdir(parents=True, exist_ok=True)
        index = []
        for name, _ in self.plan():
            done = self.runs / name / ".done"
            if not done.exists():
                continue
            if name != "data":
                copy_results(self.runs / name, results / name, COPIED)
            else:
                shutil.copy2(self.runs / name / "selection.json", results / "selection.json")
            index.append({"step": name, "dir": name, "wall_time_s": float(done.read_text())})
        (results / "steps.json").write_text(json.dumps(index, indent=2) + "\n")
        write_results(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="fit config(s) (default: configs/miniature_v2/base.yaml)")
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "medcalc_bench" / "test_data.csv"),
                   help="the MedCalc-Bench file the rows are selected from")
    p.add_argument("--model", default=None, help="default: the config's model.init_args.pretrained")
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-5, 5e-5, 2e-4],
                   help="three SFT learning rates; TALR runs at the lower two, the seeds at the middle one")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--extra", type=lambda s: [m for m in s.split(",") if m], default=[],
                   help=f"further methods at the middle LR, from {list(EXTRA)}")
    p.add_argument("--runs", default=str(ROOT / "runs" / "miniature_v2"), help="working directory (logs, data copy)")
    p.add_argument("--results", default=str(ROOT / "results" / "miniature_v2"), help="what is committed")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--set", nargs="*", default=[], help="extra arguments for every fit/validate")
    p.add_argument("--collect-only", action="store_true", help="only rebuild the results from finished steps")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if unknown := set(args.extra) - set(EXTRA):
        parser.error(f"unknown --extra {sorted(unknown)}; choose from {list(EXTRA)}")
    mini = MiniatureV2(args)
    mini.collect() if args.collect_only else mini.run()


if __name__ == "__main__":
    main()
