"""The loss normalisation is exact: one optimiser step's gradient is the same for 1 process × batch B,
2 accumulation steps × B/2, and 2 DDP ranks (gloo) × B/2, on examples of unequal lengths."""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch

from talr.data.datamodule import DomainDataModule
from talr.methods import FLOW, SFT, TALR, L2Init
from talr.tasks.medcalc import MedCalc


class ProbeMixin:
    """Saves the gradients the optimiser would see (after normalisation and regularisers) on step 1."""

    def after_gradient_normalized(self):
        super().after_gradient_normalized()
        if self.trainer.is_global_zero and self.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
            torch.save(grads, os.environ["TALR_PROBE"])


class ProbeSFT(ProbeMixin, SFT): ...
class ProbeFLOW(ProbeMixin, FLOW): ...
class ProbeL2(ProbeMixin, L2Init): ...
class ProbeTALR(ProbeMixin, TALR): ...


def one_step_grads(tmp_path, model_dir, cls, *, devices=1, accum=1, batch_size=4, **method_args):
    probe = tmp_path / f"grads-{cls.__name__}-{devices}-{accum}.pt"
    os.environ["TALR_PROBE"] = str(probe)
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=str(model_dir), max_length=1024, batch_size=batch_size)
    model = cls(pretrained=str(model_dir), lr=1e-3, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False,
                **method_args)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=1,
        accumulate_grad_batches=accum, logger=False, enable_checkpointing=False, limit_val_batches=0,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, dm)
    return torch.load(probe, weights_only=True)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_examples_have_unequal_supervised_lengths(tiny_model_dir):
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 4})
    dm = DomainDataModule(task=task, tokenizer=str(tiny_model_dir), max_length=1024)
    dm.setup("fit")
    counts = [sum(l != -100 for l in e["labels"]) for e in dm.examples["train"]]
    assert len(set(counts)) == 4, counts  # otherwise per-micro-batch means would also pass


@pytest.mark.parametrize("cls,args", [(ProbeSFT, {}), (ProbeFLOW, {"flow_cache": None}), (ProbeL2, {"l2_lambda": 10.0})])
def test_accumulation_and_ddp_match_one_batch(tmp_path, tiny_model_dir, cls, args):
    full = one_step_grads(tmp_path, tiny_model_dir, cls, **args)
    accum = one_step_grads(tmp_path, tiny_model_dir, cls, accum=2, batch_size=2, **args)
    assert_same(full, accum)
    ddp = one_step_grads(tmp_path, tiny_model_dir, cls, devices=2, batch_size=2, **args)
    assert_same(full, ddp)


def test_talr_two_ranks_match_one_batch(tmp_path, tiny_model_dir):
    full = one_step_grads(tmp_path, tiny_model_dir, ProbeTALR)
    ddp = one_step_grads(tmp_path, tiny_model_dir, ProbeTALR, devices=2, batch_size=2)
    assert_same(full, ddp)
    # and TALR really reweights: its gradient differs from SFT's on the same batch
    sft = one_step_grads(tmp_path, tiny_model_dir, ProbeSFT)
    assert any(not torch.allclose(full[k], sft[k], rtol=1e-3) for k in full)
