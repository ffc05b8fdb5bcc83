"""Random-number state in checkpoints, per rank, so a resumed run with dropout repeats the same masks."""

from __future__ import annotations

import logging
import random

import lightning.pytorch as L
import numpy as np
import torch
import torch.distributed as dist

from talr.distributed import is_distributed

log = logging.getLogger(__name__)


def collect_rng_state() -> dict:
    """This process's torch CPU, current CUDA device, numpy and Python RNG states, as plain types and tensors
    (so a checkpoint stays loadable with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # only the device this rank uses
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState(L.Callback):
    """Keeps training randomness (dropout, LoRA dropout) a function of the training batches alone, and
    puts it in checkpoints so a resumed run draws the same random numbers as an uninterrupted one.

    The state is captured after every training batch and put back before the next one. So whatever runs in
    between (validation, generation, lm-eval, which re-seeds the global RNGs, a new epoch's DataLoader
    iterator, which draws its worker seed) does not shift the training stream, and a checkpoint written
    anywhere between two batches holds exactly the state the next batch starts from. Each rank keeps its
    own state: `state_dict` gathers every rank's (a collective; Lightning calls it on every rank) because
    only rank 0's checkpoint dict is written — by the DDP strategies and by `ModelParallelStrategy`, whose
    distributed checkpoints keep non-tensor state in rank 0's `meta.pt` — and rank r restores entry r. A
    resume with another number of ranks cannot repeat the same draws; it warns and keeps its own state.

    `DomainDataModule` adds one to the trainer if the config has none.
    """

    def __init__(self):
        self._state: dict | None = None  # the state the next training batch starts from
        self._captured_at: int | None = None  # training batches processed when it was captured
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _batches_processed(self) -> int:
        return self._trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _capture(self) -> None:
        self._state, self._captured_at = collect_rng_state(), self._batches_processed()

    def on_train_start(self, trainer, pl_module) -> None:
        if self._captured_at is None:  # after a restore, the loaded state belongs to the restored position
            self._captured_at = self._batches_processed()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            set_rng_state(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._capture()

    def state_dict(self) -> dict:
        if self._trainer is not None and self._captured_at is not None and self._batches_processed() != self._captured_at:
            self._capture()  # a checkpoint callback ran before this one's on_train_batch_end
        states = [self._state]
        if is_distributed():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, self._state)
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("per_rank") or []
        rank, world = (self._trainer.global_rank, self._trainer.world_size) if self._trainer else (0, 1)
        if len(states) != world:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d: dropout draws will differ "
                        "from the interrupted run", len(states), world)
            return
        self._state = states[rank]
