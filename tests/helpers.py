"""Helpers for end-to-end tests: write a small fit config and run the CLI in-process."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml


def fit_config(tmp_path: Path, model_dir: Path, source: str, *, method: str = "talr.methods.SFT",
               method_args: dict | None = None, trainer: dict | None = None, data: dict | None = None,
               task: dict | None = None) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4, "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path / "run"), "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "run"), "name": "csv"}},
            **(trainer or {}),
        },
        "model": {"class_path": method, "init_args": {"pretrained": str(model_dir), "lr": 1e-3, "max_new_tokens": 8, **(method_args or {})}},
        "data": {
            "task": {"class_path": "talr.tasks.MedCalc", "init_args": {"source": source, "format": "label",
                     "max_examples": {"train": 8, "validation": 4, "test": 4}, **(task or {})}},
            "max_length": 256, "batch_size": 4, "eval_batch_size": 4, **(data or {}),
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(tmp_path: Path) -> list[dict]:
    files = sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    assert files, "no CSV metrics were written"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


import os as _os
import signal as _signal

import lightning.pytorch as _L


class SigtermAt(_L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            _os.kill(_os.getpid(), _signal.SIGTERM)  # arrives mid-step, like a real preemption


class HardKillAt(_L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            _os._exit(137)  # no cleanup, no checkpoint: like SIGKILL / OOM killer


from talr.methods import SFT as _SFT  # noqa: E402


class NaNAtStep(_SFT):
    """SFT whose loss is NaN at one optimizer step (to test the non-finite policy)."""

    def __init__(self, *args, nan_step: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def token_losses(self, batch):
        losses, mask = super().token_losses(batch)
        if self.global_step == self.nan_step:
            losses = losses * float("nan")
        return losses, mask
