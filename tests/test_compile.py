"""`model.init_args.compile: true` compiles each decoder layer in place: same losses as eager, same
parameter names (so checkpoints and HF export are unchanged)."""

from __future__ import annotations

import shutil

import lightning.pytorch as L
import pytest
import torch

from talr.data.datamodule import DomainDataModule
from talr.methods import SFT
from talr.tasks.medcalc import MedCalc

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile (inductor) needs a C compiler on CPU")


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit(model_dir, compile: bool):
    torch.manual_seed(0)
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 8, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=str(model_dir), max_length=256, batch_size=4)
    module = SFT(pretrained=str(model_dir), lr=1e-2, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False,
                 compile=compile)
    record = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, dm)
    return module, record.losses


def test_compiled_layers_train_like_eager(tiny_model_dir):
    eager, eager_losses = _fit(tiny_model_dir, compile=False)
    compiled, compiled_losses = _fit(tiny_model_dir, compile=True)
    layers = compiled.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in eager.model.model.layers)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4) and len(eager_losses) == 2
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no `_orig_mod.` prefixes
    for (name, a), b in zip(compiled.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
