"""ExportHF writes the dtype the user asks for; by default the one the pretrained checkpoint is published in (a
bf16 checkpoint trained in fp32 exports bf16, half the bytes), without ever casting the training model."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from conftest import make_tiny_model

from talr.callbacks import ExportHF
from talr.callbacks.export import checkpoint_dtype
from talr.data.datamodule import DomainDataModule
from talr.methods import SFT, LoRA
from talr.modeling import BUILTIN
from talr.tasks.medcalc import MedCalc


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bf16")
    make_tiny_model(tokenizer).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Snapshot(L.Callback):
    """The trained weights before ExportHF runs (callbacks run in order) and the model's dtype after fit."""

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_fit_end(self, trainer, pl_module):
        self.dtypes_after = {p.dtype for p in pl_module.model.parameters()}


def export(tmp_path, model_dir, cls=SFT, **export_args):
    from transformers import AutoModelForCausalLM

    task = MedCalc(source="synthetic", format="label", max_examples={"train": 2, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=str(model_dir), max_length=256, batch_size=2)
    extra = {"r": 4, "lora_alpha": 8} if cls is LoRA else {}
    model = cls(pretrained=str(model_dir), dtype="float32", lr=1e-2, warmup_ratio=0.0, baseline_eval=False,
                generate_in_eval=False, **extra)
    snapshot = Snapshot()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[snapshot, ExportHF(dirpath=str(tmp_path / "hf"), **export_args)])
    trainer.fit(model, dm)
    assert snapshot.dtypes_after == {torch.float32}  # the training model was never cast
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    size = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    return exported, snapshot.weights, size


def test_default_is_the_checkpoint_dtype(tmp_path, bf16_model_dir):
    exported, trained, size = export(tmp_path / "auto", bf16_model_dir)
    assert exported.dtype == torch.bfloat16 and exported.config.dtype == torch.bfloat16
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name].to(torch.bfloat16), rtol=0, atol=0)
    _, _, fp32_size = export(tmp_path / "fp32", bf16_model_dir, dtype="float32")
    assert size < 0.55 * fp32_size  # bf16: half the bytes (plus the same small header)


def test_explicit_dtype_wins(tmp_path, bf16_model_dir):
    exported, trained, _ = export(tmp_path, bf16_model_dir, dtype="float32")
    assert exported.dtype == torch.float32
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


def test_lora_merges_then_casts(tmp_path, bf16_model_dir):
    exported, _, _ = export(tmp_path, bf16_model_dir, cls=LoRA)
    assert exported.dtype == torch.bfloat16 and not any("lora" in k for k in exported.state_dict())
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").exists()


def test_checkpoint_dtype(tiny_model_dir, bf16_model_dir):
    assert checkpoint_dtype(BUILTIN) == "bfloat16"  # SmolLM2's published dtype, not the fp32 de-quantised copy
    assert checkpoint_dtype(str(bf16_model_dir)) == "bfloat16"
    assert checkpoint_dtype(str(tiny_model_dir)) == "float32"
    with pytest.raises(ValueError, match="dtype must be"):
        ExportHF(dtype="int8")
