"""A 2-process run ends: every callback that writes files on rank 0 (RunSummary, HardTokenShare, ExportHF,
ModelCheckpoint) keeps the ranks in step, under FSDP2 (`ModelParallelStrategy`) and DDP, gloo on CPU.

`trainer.log_dir` is a broadcast: a callback that reads it on rank 0 only leaves rank 0 one collective
behind the others, and the run hangs at its end (the process-group timeout here turns that into a failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"), pytest.mark.slow]


def fit_with_file_callbacks(model_dir: str, root: str, strategy_name: str, method: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from talr.callbacks import ExportHF, HardTokenShare, RunSummary
    from talr.data.datamodule import DomainDataModule
    from talr.general import CodeLengthDriftCallback
    from talr.methods import SFT, LoRA
    from talr.tasks.medcalc import MedCalc

    # 7 training rows: 4 on rank 0, 3 on rank 1 (Lightning's sampler pads); 3 validation rows
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 7, "validation": 3, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=256, batch_size=2, eval_batch_size=2)
    cls, extra = (LoRA, {"r": 4, "lora_alpha": 8}) if method == "lora" else (SFT, {})
    model = cls(pretrained=model_dir, lr=1e-3, warmup_ratio=0.0, max_new_tokens=4, **extra)
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=PG_TIMEOUT)
    else:
        strategy = DDPStrategy(process_group_backend="gloo", timeout=PG_TIMEOUT)
    callbacks = [ModelCheckpoint(dirpath=f"{root}/ckpt", save_last=True), RunSummary(), HardTokenShare(), ExportHF(),
                 # generates before any forward of the model's root (LoRA under FSDP2 crashed there)
                 CodeLengthDriftCallback(every_n_steps=1, num_prompts=2, max_new_tokens=4)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, num_sanity_val_steps=0,
                        logger=CSVLogger(root, name="csv"), enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(model, dm)


# (LoRA under FSDP2, whose first generation crashed, is tests/test_lora_fsdp2_generation.py)
@pytest.mark.parametrize("strategy,method", [("fsdp2", "sft"), ("ddp", "sft")])
def test_two_process_fit_finishes_and_writes_its_files(tmp_path, tiny_model_dir, strategy, method):
    spawn(fit_with_file_callbacks, str(tiny_model_dir), str(tmp_path), strategy, method, timeout=900)
    run = tmp_path / "csv" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2  # ceil(7 / 2 ranks / 2 per batch)
    assert "val/nll" in summary["final"] and "val/nll" in summary["baseline"]
    share = json.loads((run / "token_share.json").read_text())
    assert [h["epoch"] for h in share["history"]] == [0]
    assert (run / "hf" / "config.json").exists() and list((run / "hf").glob("*.safetensors"))
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert not list(Path(tmp_path / "csv").glob("version_1"))  # both ranks wrote into the same run
