"""Exact resume on 2 ranks under FSDP2 (`ModelParallelStrategy`, distributed checkpoints): a run resumed in
fresh processes from a checkpoint taken mid-epoch in epoch 2, with an uneven split (9 rows, batch 2 per rank)
and attention dropout (each rank its own RNG stream), ends with the same weights and the same per-rank
losses, bit for bit, as the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

from talr.data.datamodule import DomainDataModule
from talr.methods import SFT
from talr.tasks.medcalc import MedCalc

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")]
STEPS, SAVE_AT = 9, 7  # per rank 5 rows (one duplicated) = 3 batches per epoch: epoch 2 is steps 6-8


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


class Probe(L.Callback):
    """Each rank's loss per step (the unnormalised sum its training step returned) and the final full weights."""

    def __init__(self, out: str):
        self.out, self.losses = out, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module):
        weights = {n: _full(p) for n, p in pl_module.model.named_parameters()}  # a collective
        torch.save({"losses": self.losses, "weights": weights if trainer.is_global_zero else None},
                   f"{self.out}.{trainer.global_rank}")


def fit(model_dir: str, root: str, out: str, ckpt_path: str | None) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    L.seed_everything(0)
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 9, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=512, batch_size=2)
    model = SFT(pretrained=model_dir, lr=1e-3, warmup_ratio=0.2, baseline_eval=False, generate_in_eval=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=STEPS, logger=False, limit_val_batches=0, num_sanity_val_steps=0,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=PG_TIMEOUT),
        callbacks=[ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=SAVE_AT, save_top_k=-1), Probe(out)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)


def test_two_ranks_resume_mid_epoch_bit_exact(tmp_path, tokenizer):
    from conftest import make_tiny_model

    model_dir = tmp_path / "model"
    make_tiny_model(tokenizer, attention_dropout=0.1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    timeout = PG_TIMEOUT.total_seconds() + 300
    spawn(fit, str(model_dir), str(tmp_path / "reference"), str(tmp_path / "reference"), None, timeout=timeout)
    (ckpt,) = Path(tmp_path / "reference" / "ckpt").glob(f"epoch=2-step={SAVE_AT}*")
    spawn(fit, str(model_dir), str(tmp_path / "resumed"), str(tmp_path / "resumed"), str(ckpt), timeout=timeout)
    ref = [torch.load(f"{tmp_path}/reference.{r}", weights_only=True) for r in range(2)]
    got = [torch.load(f"{tmp_path}/resumed.{r}", weights_only=True) for r in range(2)]
    for rank in range(2):
        assert set(got[rank]["losses"]) == set(range(SAVE_AT + 1, STEPS + 1))
        assert {s: ref[rank]["losses"][s] for s in got[rank]["losses"]} == got[rank]["losses"], rank
    assert ref[0]["losses"] != ref[1]["losses"]  # the ranks did see different rows
    assert ref[0]["weights"].keys() == got[0]["weights"].keys()
    for name, value in ref[0]["weights"].items():
        assert torch.equal(got[0]["weights"][name], value), name
