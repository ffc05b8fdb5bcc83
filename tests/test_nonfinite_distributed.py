"""`nonfinite: skip|stop` with several processes: a NaN loss on ONE rank is judged once per optimizer step from
an all-reduced verdict, so every rank skips (or stops) together — under DDP and FSDP2, 2 gloo processes.

Before: `training_step` returned None on a non-finite loss (Lightning refuses that with world_size > 1), and the
decision was per rank anyway (the other rank would have stepped).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

from talr.methods import SFT

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
NAN_STEP = 1


class NaNOnOneRank(SFT):
    """Plain SGD (its update is proportional to the gradient); the first micro-batch of optimizer step
    `NAN_STEP` on rank `nan_rank` has a NaN loss."""

    def __init__(self, *args, nan_rank: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_rank = nan_rank
        self.nan_done = False

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=0.5)

    def token_losses(self, batch):
        losses, mask = super().token_losses(batch)
        if self.global_step == NAN_STEP and self.global_rank == self.nan_rank and not self.nan_done:
            self.nan_done = True
            losses = losses * float("nan")
        return losses, mask


class SaveWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                   for n, p in pl_module.model.named_parameters()}  # full_tensor: a collective under FSDP2
        torch.save({"weights": weights, "skipped": pl_module.skipped_steps,
                    "logged": float(trainer.callback_metrics.get("train/skipped_steps", torch.tensor(-1.0)))},
                   f"{os.environ['TALR_PROBE']}.rank{trainer.global_rank}")


def fit_nan(model_dir: str, probe: str, strategy_name: str, policy: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from talr.data.datamodule import DomainDataModule
    from talr.methods.sft import NonFiniteError
    from talr.tasks.medcalc import MedCalc

    os.environ["TALR_PROBE"] = probe
    devices = 1 if strategy_name == "single" else 2
    # every optimizer step sees all 4 rows: 2 ranks x 2 micro-batches of 1, or 1 process x 4 micro-batches
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=256, batch_size=1)
    model = NaNOnOneRank(pretrained=model_dir, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False,
                         nonfinite=policy, nan_rank=1 if devices == 2 else 0)
    strategy = {"fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=PG_TIMEOUT),
                "ddp": lambda: DDPStrategy(process_group_backend="gloo", timeout=PG_TIMEOUT),
                "single": lambda: "auto"}[strategy_name]()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=3,
                        accumulate_grad_batches=4 // devices, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveWeights()])
    try:
        trainer.fit(model, dm)
    except NonFiniteError as err:
        Path(f"{probe}.raised{trainer.global_rank}").write_text(str(err))


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    """One process, the same 4 rows per step, NaN at step 1: the run that skipped that step."""
    probe = tmp_path_factory.mktemp("nan-single") / "single"
    spawn(fit_nan, str(tiny_model_dir), str(probe), "single", "skip", nprocs=1, timeout=600)
    return torch.load(f"{probe}.rank0")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, tiny_model_dir, single, strategy):
    from transformers import AutoModelForCausalLM

    spawn(fit_nan, str(tiny_model_dir), str(tmp_path / "dist"), strategy, "skip", timeout=600)
    ranks = [torch.load(f"{tmp_path / 'dist'}.rank{r}") for r in (0, 1)]
    for result in (*ranks, single):
        assert result["skipped"] == 1 and result["logged"] == 1.0
    for name, value in ranks[0]["weights"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(ranks[1]["weights"][name], value, rtol=0, atol=0)  # identical on every rank
        # = one process on the same 4 rows per step that skipped step 1 (steps 0 and 2 applied)
        torch.testing.assert_close(value, single["weights"][name], rtol=2e-4, atol=1e-6)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.allclose(v, initial[k]) for k, v in single["weights"].items())


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank(tmp_path, tiny_model_dir):
    spawn(fit_nan, str(tiny_model_dir), str(tmp_path / "dist"), "fsdp2", "stop", timeout=600)
    for rank in (0, 1):
        message = Path(f"{tmp_path / 'dist'}.raised{rank}").read_text()
        assert f"optimizer step {NAN_STEP}" in message and "loss is non-finite in 1 micro-batch" in message
