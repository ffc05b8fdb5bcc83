"""Export a Hugging Face directory at the end of training (for `talr average`, `talr evaluate`, the hub)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L

log = logging.getLogger(__name__)


class ExportHF(L.Callback):
    """After `fit`, write `save_pretrained` output (safetensors + tokenizer) to `dirpath`
    (default `<log_dir>/hf`). LoRA writes the merged model there and the adapter in `adapter/`.
    Under FSDP2 (`ModelParallelStrategy`) the full weights are gathered into rank 0's CPU memory, not onto
    a GPU; FSDP1 (`FSDPStrategy`) is refused at setup."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from talr.distributed import refuse_fsdp1

        refuse_fsdp1(trainer, "ExportHF")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir
        self.path = Path(self.dirpath or Path(root) / "hf")
        pl_module.export_hf(self.path)  # every rank: under FSDP2 the weights are gathered (to rank 0's CPU) first
        if trainer.is_global_zero:
            log.info("exported the fine-tuned model to %s", self.path)
        trainer.strategy.barrier()
