"""Checkpoint on SIGTERM (preemption, `scancel`, Ctrl-C of a launcher) so a resume loses nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L

log = logging.getLogger(__name__)


class CheckpointOnSigterm(L.Callback):
    """When SIGTERM arrives, Lightning finishes the running batch and stops; this callback writes
    `last.ckpt` (in the ModelCheckpoint's folder, or `dirpath`) after that batch, so
    `--ckpt_path last` resumes exactly there: weights, optimizer, scheduler, data position, method state.

    With gradient accumulation, a SIGTERM inside an accumulation window cannot be saved exactly (the
    partial gradients are not in the checkpoint); then nothing is written, the last periodic checkpoint
    stays the newest, and a warning says so.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath = dirpath
        self.filename = filename
        self.log_dir: str | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank, here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        received = trainer.received_sigterm
        if trainer.world_size > 1:  # the signal reaches ranks at different moments; saving is a collective
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        window_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.fit_loop.epoch_loop.done
        if not window_done:
            log.warning("SIGTERM inside an accumulation window at batch %d: not checkpointing; resume from the "
                        "last periodic checkpoint", batch_idx)
            return
        folder = self.dirpath or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None)
        folder = folder or str(Path(self.log_dir or trainer.default_root_dir) / "checkpoints")
        path = Path(folder) / self.filename
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at optimizer step %d; resume with --ckpt_path %s", path, trainer.global_step, path)
