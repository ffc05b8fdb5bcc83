"""LoRA under FSDP2 (`ModelParallelStrategy`, gloo on CPU) generates, on 1 and on 2 processes, exactly what the
unsharded LoRA model generates: before any forward of the peft wrapper (the drift callback's first act) and
after a training step (the root resharded by backward).

peft's `generate` calls the base model directly, never the wrapper's forward, so without
`register_fsdp_forward_method(model, "generate")` (talr.distributed.shard_model) the embedding weight is still a
sharded DTensor: `aten.embedding.default got mixed torch.Tensor and DTensor`.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
PROMPTS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 8], [2, 7, 300, 11, 19, 23, 5, 6]])


class GenerateAtStartAndEnd(L.Callback):
    def _generate(self, pl_module):
        ids = PROMPTS.to(pl_module.device)
        out = pl_module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       min_new_tokens=6, do_sample=False, pad_token_id=0,
                                       return_dict_in_generate=True, output_logits=True)
        return {"tokens": out.sequences[:, ids.shape[1]:].cpu(), "logits": torch.stack(out.logits, 1).cpu()}

    def on_train_start(self, trainer, pl_module):
        self.start = self._generate(pl_module)

    def on_train_end(self, trainer, pl_module):
        end = self._generate(pl_module)
        if trainer.is_global_zero:
            torch.save({"start": self.start, "end": end, "sharded": any(hasattr(p, "full_tensor") for p in
                                                                        pl_module.model.parameters())},
                       os.environ["TALR_PROBE"])


def fit_lora(model_dir: str, probe: str, devices: int, sharded: bool) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from talr.data.datamodule import DomainDataModule
    from talr.methods import LoRA
    from talr.tasks.medcalc import MedCalc

    os.environ["TALR_PROBE"] = probe

    class SGDLoRA(LoRA):
        def configure_optimizers(self):  # AdamW's first step is lr·sign(g): rounding noise would flip updates
            return torch.optim.SGD(self.trainable_parameters(), lr=0.5)

    task = MedCalc(source="synthetic", format="label", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=256, batch_size=4 // devices)
    model = SGDLoRA(pretrained=model_dir, r=4, lora_alpha=8, baseline_eval=False, generate_in_eval=False)
    strategy = (ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, timeout=PG_TIMEOUT)
                if sharded else "auto")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[GenerateAtStartAndEnd()])
    trainer.fit(model, dm)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("plain-lora") / "plain.pt"
    spawn(fit_lora, str(tiny_model_dir), str(path), 1, False, nprocs=1, timeout=600)
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_lora_generates_under_fsdp2_like_unsharded(tmp_path, tiny_model_dir, plain, devices):
    spawn(fit_lora, str(tiny_model_dir), str(tmp_path / "fsdp.pt"), devices, True, nprocs=devices, timeout=600)
    fsdp = torch.load(tmp_path / "fsdp.pt")
    assert fsdp["sharded"] and not plain["sharded"]
    for when in ("start", "end"):
        assert torch.equal(fsdp[when]["tokens"], plain[when]["tokens"]), when
        torch.testing.assert_close(fsdp[when]["logits"], plain[when]["logits"], rtol=1e-4, atol=1e-5)
    assert (plain["start"]["logits"] - plain["end"]["logits"]).abs().max() > 1e-3  # the step changed the model
