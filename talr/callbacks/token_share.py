"""Share of supervised training tokens the model already predicts well, per epoch (the paper's Figure 3c).

The share is computed from the training step's own per-token losses, so it costs nothing extra: the module's
public `last_train_tokens` (`talr.token_stats.TokenLosses`: per-token NLL and the supervised mask, set by
`SFT.training_step` for every micro-batch) is read after every micro-batch; p_i > t  <=>  ℓ_i < −log t. A pair
of scalars `(n_tokens_with_p_above_threshold, n_tokens)` is accepted too; it must then have been counted at this
callback's threshold. Each micro-batch's object is counted once. Counts stay on the device and are all-reduced
once per epoch (every micro-batch, every rank). A module without the attribute makes the callback warn once and
log nothing.

Logged per epoch (`talr.callbacks.metrics.publish_metrics`: every logger at the current global step, and
`trainer.callback_metrics`):
`train/token_share_p_gt_<threshold>`; the history is also written to `<log_dir>/token_share.json`,
which `notebooks/figure3_tokens.ipynb` reads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback

from talr.callbacks.metrics import publish_metrics

log = logging.getLogger(__name__)


class HardTokenShare(Callback):
    """Per-epoch share of supervised training tokens with p > `threshold` under the model being trained.

    Args:
        threshold: probability threshold (the paper's hard tokens are those below 0.2).
        filename: JSON history written to the run's log dir on rank 0 (None: do not write).
    """

    def __init__(self, threshold: float = 0.2, filename: str | None = "token_share.json"):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.filename = filename
        self.metric = f"train/token_share_p_gt_{threshold:g}"
        self.history: list[dict] = []
        self._above: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self._warned = False
        self._counted = None  # the last `last_train_tokens` object counted
        self.log_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # `trainer.log_dir` is a broadcast (a collective): resolve it on every rank, not in rank 0's `_write`
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def _counts(self, stats) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = stats
        first, second = torch.as_tensor(first), torch.as_tensor(second)
        if first.dim() == 0:  # already counted by the module
            return first.double(), second.double()
        mask = second.bool()
        above = (first < -math.log(self.threshold)) & mask
        return above.sum().double(), mask.sum().double()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._above = self._total = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "last_train_tokens", None)
        if stats is None or stats is self._counted:
            if stats is None and not self._warned:
                log.warning("HardTokenShare: %s sets no `last_train_tokens`; nothing is logged (see the "
                            "talr.callbacks.token_share docstring)", type(pl_module).__name__)
                self._warned = True
            return
        self._counted = stats
        above, total = self._counts(stats)
        if self._above is None:
            self._above, self._total = above.clone(), total.clone()
        else:
            self._above += above.to(self._above.device)
            self._total += total.to(self._total.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._above is None:
            return
        counts = torch.stack([self._above, self._total]).to(pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        above, total = float(counts[0]), float(counts[1])
        share = above / total if total else float("nan")
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, "share": share, "n_tokens": int(total)}
        self.history.append(entry)
        publish_metrics(trainer, {self.metric: share}, trainer.global_step)
        if trainer.is_global_zero:
            self._write(trainer)
        log.info("epoch %d: %.1f%% of %d supervised tokens have p > %g", entry["epoch"], 100 * share,
                 entry["n_tokens"], self.threshold)

    def _write(self, trainer) -> None:
        if not self.filename:
            return
        path = self.log_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"threshold": self.threshold, "metric": self.metric, "history": self.history},
                                   indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
