"""A callback's `on_before_optimizer_step` sees the true gradient d(Σℓ/N)/dθ of the whole optimizer step (N the
step's supervised tokens), not the unnormalised micro-batch sums: the rescale happens in the step's last
`on_after_backward`, before Lightning calls any callback's `on_before_optimizer_step`."""

from __future__ import annotations

import lightning.pytorch as L
import torch

from talr.data.datamodule import DomainDataModule
from talr.data.encoding import Collator
from talr.methods import SFT
from talr.tasks.medcalc import MedCalc


class GradNormAtFirstStep(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                          if p.grad is not None}
            self.norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in self.grads.values()])))


def test_callbacks_see_the_normalised_gradient(tmp_path, tiny_model_dir):
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=str(tiny_model_dir), max_length=512, batch_size=2)
    model = SFT(pretrained=str(tiny_model_dir), lr=1e-3, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False)
    probe = GradNormAtFirstStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                        default_root_dir=str(tmp_path))
    trainer.fit(model, dm)

    # reference: the 4 rows of the step in one batch, gradient of (Σ ℓ) / N with the initial weights
    reference = SFT(pretrained=str(tiny_model_dir))
    reference.configure_model()
    batch = Collator(dm.tokenizer.pad_token_id)(dm.examples["train"])
    losses, mask = reference.token_losses(batch)
    (losses.where(mask, 0.0).sum() / mask.sum()).backward()
    expected = {n: p.grad for n, p in reference.model.named_parameters() if p.grad is not None}
    assert probe.grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(probe.grads[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert 0 < probe.norm < 100
