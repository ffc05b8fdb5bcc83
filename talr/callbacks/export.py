"""Export a Hugging Face directory at the end of training (for `talr average`, `talr evaluate`, the hub)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportHF(L.Callback):
    """After `fit`, write `save_pretrained` output (safetensors + tokenizer) to `dirpath`
    (default `<log_dir>/hf`). LoRA writes the merged model there and the adapter in `adapter/`.
    Under FSDP2 (`ModelParallelStrategy`) the full weights are gathered into rank 0's CPU memory, not onto
    a GPU; FSDP1 (`FSDPStrategy`) is refused at setup.

    Args:
        dirpath: output directory (default `<log_dir>/hf`).
        dtype: weights dtype on disk. `auto` (default): the dtype the pretrained checkpoint is published in
            (its config's `dtype`/`torch_dtype`: bfloat16 for Qwen2.5, Qwen3, Gemma-3 and SmolLM2), else the
            training dtype. bfloat16 halves the size of fp32 but keeps 8 mantissa bits: a weight's change
            smaller than half a bf16 step (~0.2% of the weight) rounds back to the starting value, which small
            learning rates (1e-6) produce often; export `float32` to average or evaluate such runs exactly.
    """

    def __init__(self, dirpath: str | None = None, dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        self.dirpath = dirpath
        self.dtype = dtype
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from talr.distributed import refuse_fsdp1

        refuse_fsdp1(trainer, "ExportHF")

    def export_dtype(self, pl_module: L.LightningModule) -> torch.dtype | None:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        hparams = getattr(pl_module, "hparams", {})
        name = checkpoint_dtype(hparams["pretrained"], hparams.get("trust_remote_code", False)) \
            if "pretrained" in hparams else None
        return DTYPES.get(name) if name else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir  # a broadcast: this hook runs on every rank
        self.path = Path(self.dirpath or Path(root) / "hf")
        dtype = self.export_dtype(pl_module)
        pl_module.export_hf(self.path, dtype=dtype)  # every rank: under FSDP2 the weights are gathered first
        if trainer.is_global_zero:
            size = sum(f.stat().st_size for f in self.path.glob("*.safetensors"))
            log.info("exported the fine-tuned model (%s, %.0f MB of weights) to %s",
                     str(dtype or "training dtype").removeprefix("torch."), size / 1e6, self.path)
        trainer.strategy.barrier()


def checkpoint_dtype(pretrained: str, trust_remote_code: bool = False) -> str | None:
    """The dtype a pretrained checkpoint is published in, from its config (`dtype`, or `torch_dtype` in older
    configs); None when it does not say. The built-in model is de-quantised from a Q4_1 GGUF into fp32: its
    published dtype (SmolLM2-135M-Instruct's) is bfloat16."""
    from transformers import AutoConfig

    from talr.modeling import BUILTIN, resolve

    if pretrained == BUILTIN:
        return "bfloat16"
    path, extra = resolve(pretrained)
    if "gguf_file" in extra:
        return None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else None


def cast_copy(model: torch.nn.Module, dtype: torch.dtype | None, in_place: bool = False) -> torch.nn.Module:
    """`model` with floating-point weights in `dtype`: cast in place when `in_place` (a copy made for export),
    else a copy built on the CPU (never a second copy on the model's device); tied weights stay tied.
    `dtype` None or the model's own dtype: `model` itself."""
    if dtype is None or all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    if in_place:
        return model.to(dtype)
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            cast = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
            memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(
                tensor, torch.nn.Parameter) else cast
    return copy.deepcopy(model, memo)
