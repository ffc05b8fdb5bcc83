"""One summary file per run: config, domain and general metrics before/after, drift, tokens, time, versions."""

from __future__ import annotations

import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)
PACKAGES = ("talr", "torch", "lightning", "transformers", "peft", "lm_eval")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def before_after_lines(summary: dict) -> list[str]:
    """`metric  before -> after` for each metric measured before training and now (domain, general), and the
    code-length drift (0 before training by definition). Counts (`val/n`) and timings are not metrics."""
    before = {**summary.get("baseline", {}), **summary.get("general_baseline", {}), "drift/nll_delta": 0.0}
    after = summary.get("final", {})
    keys = [k for k in sorted(after) if k in before and not k.endswith("/n") and "seconds" not in k]
    return [f"{k:<32} {before[k]:>10.4f} -> {after[k]:.4f}" for k in keys]


class RunSummary(L.Callback):
    """Writes `<log_dir>/summary.json` after fit (and updates it after test or validate) and prints before → after.

    Keys: method, hparams, data (row and over-long counts), baseline (`val/*` before training), final
    (last `val/*`, `test/*`, `general/*`, `drift/*` values), tokens_seen, optimizer steps, wall time, versions.
    `talr report` collates these files into the paper's tables.
    """

    def __init__(self, filename: str = "summary.json"):
        self.filename = filename
        self.t0 = time.time()
        self.summary: dict = {}
        self.log_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # `trainer.log_dir` is a broadcast (a collective): resolve it here, on every rank, never on rank 0 alone
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def on_test_start(self, trainer, pl_module) -> None:
        self._resume(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # `talr validate` (not the validation loop inside fit)
            self._resume(trainer)

    def _resume(self, trainer) -> None:
        self.t0 = time.time()
        path = self.log_dir / self.filename
        if not self.summary and path.exists():  # `talr test|validate` after `talr fit`: extend the fit's summary
            self.summary = json.loads(path.read_text())

    def _write(self, trainer, pl_module, stage: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        final = {k: v for k, v in metrics.items() if k.split("/")[0] in ("val", "test", "general", "drift")}
        task = getattr(trainer.datamodule, "task", None)
        self.summary.update({
            "method": type(pl_module).__name__,
            "task": {"domain": getattr(task, "name", None), "format": getattr(task, "format", None),
                     "source": getattr(task, "source", None)},
            "hparams": {k: v for k, v in dict(pl_module.hparams).items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))},
            "data": dict(getattr(trainer.datamodule, "stats", {})),
            "baseline": dict(getattr(pl_module, "baseline", {})),
            "general_baseline": dict(getattr(pl_module, "general_baseline", {})),
            "final": {**self.summary.get("final", {}), **final},
            "tokens_seen": getattr(pl_module, "tokens_seen", 0),
            "optimizer_steps": trainer.global_step,
            "skipped_steps": getattr(pl_module, "skipped_steps", 0),
            f"wall_time_s/{stage}": round(time.time() - self.t0, 1),
            "versions": package_versions(),
        })
        if not trainer.is_global_zero:
            return
        path = self.log_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, sort_keys=True))
        tmp.replace(path)
        print(f"\n== talr {stage} summary ({path}) ==\n" + "\n".join(before_after_lines(self.summary))
              + f"\nwall time {self.summary[f'wall_time_s/{stage}']:.0f} s, {self.summary['tokens_seen']} tokens, "
              f"{trainer.global_step} optimizer steps")

    def on_fit_end(self, trainer, pl_module) -> None:
        # on_fit_end runs after every callback's on_train_end (the final general eval among them)
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer, pl_module, "validate")
