"""The one place where callbacks and the module publish metrics outside Lightning's `self.log`.

Lightning's `LightningModule.log` cannot be called from `on_train_start`/`on_train_end` and logs at the
loop's step, while the baseline (before step 0), the final evaluation (after the last step) and per-epoch
callback results must be logged at a chosen optimizer step. `publish_metrics` writes them to every logger
(rank 0) at that step and puts them in `trainer.callback_metrics`, Lightning's public dict of the latest
values, so `ModelCheckpoint(monitor=...)`, `RunSummary` and the CLI summary see them like logged values.
Every rank must call it with the same numbers (they are computed collectively before).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer


def publish_metrics(trainer: Trainer, metrics: dict[str, float], step: int, expose: bool = True) -> None:
    """Write `metrics` to every logger at `step` (global rank 0 only) and, unless `expose` is False (a baseline
    must not pose as the latest value of `val/*`), into `trainer.callback_metrics`."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    if expose:
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})


def model_and_tokenizer(pl_module: LightningModule):
    """The module's public `model` (a transformers causal LM) and `tokenizer`; a clear error when missing."""
    model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
    if model is None or tokenizer is None:
        raise AttributeError(
            f"{type(pl_module).__name__} must have `model` (a transformers causal LM) and `tokenizer` "
            "attributes set before training starts"
        )
    return model, tokenizer
