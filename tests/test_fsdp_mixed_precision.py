"""`model.init_args.fsdp_mixed_precision` reaches FSDP2: under `ModelParallelStrategy` (1 gloo process, CPU) with
`bf16` the decoder layers compute with bf16 weights while the sharded parameters (what AdamW updates) stay fp32;
without it they compute in fp32."""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"), pytest.mark.slow]


class RecordComputeDtype(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.seen = set()
        layer = pl_module.model.model.layers[0].self_attn.q_proj
        layer.register_forward_pre_hook(lambda module, args: self.seen.add(str(module.weight.dtype)))

    def on_train_end(self, trainer, pl_module):
        torch.save({"compute": sorted(self.seen), "sharded": any(hasattr(p, "full_tensor") for p in pl_module.model.parameters()),
                    "params": sorted({str(p.dtype) for p in pl_module.model.parameters()}),
                    "loss": float(trainer.callback_metrics["train/loss"])}, os.environ["TALR_PROBE"])


def fit_one_step(model_dir: str, probe: str, mixed_precision: str | None) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from talr.data.datamodule import DomainDataModule
    from talr.methods import SFT
    from talr.tasks.medcalc import MedCalc

    os.environ["TALR_PROBE"] = probe
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 2, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=256, batch_size=2)
    model = SFT(pretrained=model_dir, baseline_eval=False, generate_in_eval=False, fsdp_mixed_precision=mixed_precision)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="32-true", logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, timeout=PG_TIMEOUT),
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordComputeDtype()])
    trainer.fit(model, dm)


@pytest.mark.parametrize("mixed_precision,compute", [("bf16", ["torch.bfloat16"]), (None, ["torch.float32"])])
def test_fsdp_mixed_precision_is_passed_to_fully_shard(tmp_path, tiny_model_dir, mixed_precision, compute):
    spawn(fit_one_step, str(tiny_model_dir), str(tmp_path / "probe.pt"), mixed_precision, nprocs=1, timeout=600)
    probe = torch.load(tmp_path / "probe.pt")
    assert probe["sharded"] and probe["params"] == ["torch.float32"]  # fp32 master weights either way
    assert probe["compute"] == compute
    assert probe["loss"] == probe["loss"]  # finite enough to log (not NaN)
