"""Sharded domain evaluation is exact: 2 FSDP2 processes (gloo, CPU) on an odd number of validation rows report
the same val/nll, val/acc and val/n as 1 process — for the baseline (before the first step) and for Lightning's
validation loop — and `tokens_seen` counts every rank's tokens.

Lightning's DistributedSampler pads the shorter rank with a repeat of row 0 (5 rows on 2 ranks: 3 + 2 + row 0
again), so that every rank runs the same number of forward/generate passes (FSDP2 needs that); the module scores
only the rows it owns. The baseline used to run the whole validation set on every rank.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

from talr.methods import SFT

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
CORRECT = {0, 3}  # validation rows answered correctly; row 0 is the one the sampler repeats


class ScriptedAnswers(SFT):
    """Generates for real (every rank runs the same passes) but scores scripted text: the reference answer for the
    validation rows in CORRECT, no answer for the others, so val/acc is known exactly (2 of 5 = 0.4)."""

    def generate(self, input_ids, attention_mask):
        super().generate(input_ids, attention_mask)
        dm = self.trainer.datamodule
        by_prompt = {tuple(e["prompt_ids"]): e for e in dm.examples["validation"]}
        out = []
        for ids, keep in zip(input_ids.tolist(), attention_mask.tolist()):
            example = by_prompt[tuple(i for i, k in zip(ids, keep) if k)]
            out.append(dm.task.target(example["row"]) if example["index"] in CORRECT else "no idea")
        return out


class Record(L.Callback):
    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            expected_tokens = sum(len(e["input_ids"]) for e in trainer.datamodule.examples["train"])
            torch.save({"baseline": pl_module.baseline, "final": final, "tokens_seen": pl_module.tokens_seen,
                        "expected_tokens": expected_tokens}, os.environ["TALR_PROBE"])


def fit_and_validate(model_dir: str, probe: str, devices: int) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from talr.data.datamodule import DomainDataModule
    from talr.tasks.medcalc import MedCalc

    os.environ["TALR_PROBE"] = probe
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 4, "validation": 5, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=256, batch_size=4 // devices, eval_batch_size=2)
    model = ScriptedAnswers(pretrained=model_dir, lr=0.0, warmup_ratio=0.0, max_new_tokens=2)  # weights stay put
    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=PG_TIMEOUT)
                if devices == 2 else "auto")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()])
    trainer.fit(model, dm)


@pytest.mark.slow
def test_two_ranks_score_an_odd_validation_set_like_one(tmp_path, tiny_model_dir):
    spawn(fit_and_validate, str(tiny_model_dir), str(tmp_path / "two.pt"), 2, timeout=900)
    spawn(fit_and_validate, str(tiny_model_dir), str(tmp_path / "one.pt"), 1, nprocs=1, timeout=600)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert one["baseline"]["val/n"] == 5 and one["baseline"]["val/acc"] == pytest.approx(0.4)
    for result in (one, two):
        for values in (result["baseline"], result["final"]):  # lr 0: the epoch-end validation = the baseline
            assert values["val/n"] == 5
            assert values["val/acc"] == pytest.approx(0.4)
            assert values["val/nll"] == pytest.approx(one["baseline"]["val/nll"], rel=1e-5)
        assert result["tokens_seen"] == result["expected_tokens"]  # 4 rows, one epoch, both ranks counted
