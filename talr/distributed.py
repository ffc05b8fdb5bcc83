"""FSDP2 sharding of a Hugging Face causal LM for Lightning's `ModelParallelStrategy`, and the one module that
knows what is sharded and how to gather it: `is_sharded`, `is_dtensor`/`local_tensor`, `base_model` (under peft),
`is_distributed`, `full_state_dict`, `unsharded_copy` (rank 0, CPU: export), `replicated_copy` (every rank, its
own device: data-parallel generation) and the evaluation shards (`eval_shards`, `owned_rows`).

`shard_model(model, device_mesh)` applies `torch.distributed.fsdp.fully_shard` to every decoder layer
(found by class name; default: the model's `_no_split_modules`) and then to the root, on the
data-parallel sub-mesh. Parameters become DTensors sharded on dim 0; the root group holds the
embeddings, the final norm and the output layer (tied or not), and keeps them unsharded from its
forward until its backward, so the chunked loss can read `get_output_embeddings().weight` after
`model(...)` (see `talr.ops.causal_lm_token_losses`).

Gradients are reduce-scattered as averages over the data-parallel group (like DDP), which is what
`SFT`'s `accumulate · world_size / N` gradient rescaling expects when the mesh is
pure data parallel (`tensor_parallel_size=1`; tensor parallelism is not supported here).

Usage in a LightningModule (the `ModelParallelStrategy` sets `self.device_mesh` before `configure_model`):

    def configure_model(self):
        ...build self.model...
        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh, mixed_precision="bf16")
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

__all__ = ["shard_model", "data_parallel_mesh", "decoder_layers", "base_model", "is_distributed", "is_sharded",
           "is_dtensor", "local_tensor", "full_state_dict", "unsharded_copy", "replicated_copy", "refuse_fsdp1",
           "eval_shards", "owned_rows"]


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (`PeftModel.get_base_model()`), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_distributed(group=None) -> bool:
    """True when a torch.distributed process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (under FSDP2: a parameter, or its gradient, sharded across ranks)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor); any other tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel sub-mesh: `mesh["data_parallel"]` when named so, else the mesh itself."""
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if "data_parallel" in names:
        if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
            raise NotImplementedError("shard_model supports data parallelism only (tensor_parallel_size=1)")
        return device_mesh["data_parallel"]
    if device_mesh.ndim != 1:
        raise ValueError(f"expected a 1-D mesh or one with a 'data_parallel' dimension, got {names or device_mesh.ndim}")
    return device_mesh


def decoder_layers(model: nn.Module, layer_class_names: Iterable[str] | None = None) -> list[nn.Module]:
    """Modules whose class name is in `layer_class_names` (default: the model's `_no_split_modules`),
    outermost first; a matching module inside a matching module is not listed twice."""
    names = set(layer_class_names or getattr(base_model(model), "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(base_model(model)).__name__} has no _no_split_modules; pass layer_class_names")
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    if not found:
        raise ValueError(f"no module of class {sorted(names)} in {type(model).__name__}")
    return found


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (`fully_shard`); its parameters are DTensors (`is_dtensor`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _enable_activation_checkpointing(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """Transformers' own per-layer checkpointing (non-reentrant; parameter names unchanged) when the model
    has it, else `checkpoint_wrapper` around each layer (names gain `_checkpoint_wrapped_module.`)."""
    base = base_model(model)
    if getattr(base, "supports_gradient_checkpointing", False):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(base, "config", None) is not None:
            base.config.use_cache = False
        return layers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    targets = {id(m) for m in layers}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in targets)
    return [m for m in model.modules() if isinstance(m, CheckpointWrapper) and id(m._checkpoint_wrapped_module) in targets]


def shard_model(
    model: nn.Module,
    device_mesh,
    layer_class_names: list[str] | None = None,
    activation_checkpointing: bool = False,
    mixed_precision: str | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` in place with FSDP2 (`fully_shard`) on the data-parallel sub-mesh; returns it.

    Args:
        model: a transformers causal LM or a peft wrapper of one, on its target device (or meta).
        device_mesh: Lightning's `self.device_mesh` (dims `data_parallel`, `tensor_parallel`) or a 1-D mesh.
        layer_class_names: classes sharded as their own unit (default: `model._no_split_modules`,
            e.g. `LlamaDecoderLayer`).
        activation_checkpointing: recompute each layer's activations in backward.
        mixed_precision: `bf16`/`fp16`: all-gather and compute in that dtype, reduce gradients in fp32,
            keep fp32 sharded parameters and optimizer states. None: compute in the parameters' dtype.
            (Use it with Trainer precision `32-true`; `bf16-mixed` autocasts instead.)
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3; False
            keeps them until backward, ZeRO-2-like: less communication, more memory). The root group
            always stays gathered between its forward and backward.
    Idempotent: an already sharded model is returned unchanged.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return model
    if mixed_precision is None:
        mp = MixedPrecisionPolicy()
    elif mixed_precision in MIXED_PRECISION:
        mp = MixedPrecisionPolicy(param_dtype=MIXED_PRECISION[mixed_precision], reduce_dtype=torch.float32)
    else:
        raise ValueError(f"mixed_precision must be None or one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}")
    mesh = data_parallel_mesh(device_mesh)
    layers = decoder_layers(model, layer_class_names)
    if activation_checkpointing:
        layers = _enable_activation_checkpointing(model, layers)  # the wrappers, when wrapped
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # The root (embeddings, final norm, output layer) stays gathered from its forward to its backward, FSDP2's
    # default for roots: the loss reads the output weight right after `model(...)`, and backward needs it next.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    if model is not base_model(model):
        # peft's `generate` calls the base model directly, never the wrapper's forward, so the root's hooks
        # would not gather the embeddings (`aten.embedding got mixed torch.Tensor and DTensor`); make
        # `generate` a forward method of the root, with FSDP's pre-/post-forward hooks around it.
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    log.info("FSDP2: %d %s units + root on a %d-way data-parallel mesh", len(layers),
             "/".join(sorted({type(m).__name__ for m in layers})), mesh.size())
    return model


def full_state_dict(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict: on CPU on rank 0 only (other ranks get {}), or with `every_rank` on every rank
    on the parameters' device. A collective: call it on every rank (then e.g. `model.save_pretrained(path,
    state_dict=sd)` on rank 0). A plain model returns its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) copy of an FSDP2-sharded model, on CPU, on rank 0; None on the other ranks.

    A collective when the model is sharded (every rank must call it); an unsharded model is returned as
    is on every rank. The full weights are gathered layer by layer into rank 0's CPU memory
    (`cpu_offload`), never onto one GPU, then loaded into a fresh model of the same class and config;
    peft adapters are re-attached with the same LoRA config. Cost on rank 0: about twice the model's
    size in CPU memory while the copy is built."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    return _plain_copy(model, state)


def replicated_copy(model: nn.Module) -> nn.Module:
    """The full model on every rank, on that rank's device, in eval mode: a plain copy of an FSDP2-sharded model
    (a collective: every rank must call it), or `model` itself when it is not sharded (DDP and single-process
    models are whole on every rank already). peft adapters are re-attached with the same LoRA config.

    For data-parallel generation (`talr.general.sharded`): generating in lockstep with the sharded model would
    all-gather every layer's weights for every generated token (a 3B model in bf16: 6 GB per token step).
    Memory per GPU: one model in the training parameters' dtype (fp32 for the paper configs: 12 GB for a 3B
    model) next to the shard, and up to two while the copy is built."""
    if not is_sharded(model):
        return model
    return _plain_copy(model, full_state_dict(model, every_rank=True)).eval()


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of `model`'s class (not FSDP's subclass) and config holding the full `state`, built on the
    state's device (no CPU copy per rank when it is a GPU); peft adapters re-attached with the same config."""
    base = base_model(model)
    cls = next(c for c in type(base).__mro__ if not c.__name__.startswith("FSDP"))  # fully_shard subclasses it
    device = next(iter(state.values())).device
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        prefix = "base_model.model."
        lora = {k: v for k, v in state.items() if "lora_" in k}
        state = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    with torch.device(device):
        copy = cls.from_pretrained(None, config=base.config, state_dict=state, dtype=base.dtype).to(device)
    if peft_config is None:
        return copy
    from peft import get_peft_model

    copy = get_peft_model(copy, next(iter(peft_config.values())))
    result = copy.load_state_dict(lora, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights not found in the copy: {result.unexpected_keys[:3]}")
    return copy


def refuse_fsdp1(trainer, what: str) -> None:
    """FSDP1 (`FSDPStrategy`) keeps the root's parameters in a flat buffer of the LightningModule wrapper,
    so `pl_module.model` cannot be gathered or run on its own: say so before training, not after."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{what} does not support FSDPStrategy (FSDP1). Use FSDP2: trainer.strategy "
            "lightning.pytorch.strategies.ModelParallelStrategy (data_parallel_size: <GPUs>, tensor_parallel_size: 1) "
            "with model.init_args.decoder_layer_classes, as configs/paper/base_*.yaml do."
        )


# -- sharded evaluation --------------------------------------------------------------------------------------
# Validation and test shards come from a non-shuffling `DistributedSampler` (Lightning's in its loops, the same in
# `eval_shards` for the module's own passes): rank r gets indices r, r+W, r+2W, … and the shorter ranks are
# padded with repeats of the first indices, so that every rank runs the same number of batches (under FSDP2
# every forward and generation step is a collective). `owned_rows` marks the rows a rank scores (index ≡ r mod
# W): each row counts exactly once, the padding repeats are computed and dropped.

def _sampler_kwargs(trainer) -> dict | None:
    return trainer.strategy.distributed_sampler_kwargs if trainer.world_size > 1 else None


def eval_shards(loader, trainer):
    """`loader` (a non-shuffling evaluation DataLoader) re-built on this rank's shard, as Lightning's loops do."""
    kwargs = _sampler_kwargs(trainer)
    if not kwargs:
        return loader
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(loader.dataset, shuffle=False, drop_last=False, **kwargs)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, sampler=sampler)


def owned_rows(index: torch.Tensor, trainer) -> torch.Tensor:
    """(B,) bool: which rows of an evaluation batch (their dataset `index`) this rank scores."""
    kwargs = _sampler_kwargs(trainer)
    if not kwargs:
        return torch.ones_like(index, dtype=torch.bool)
    return index % kwargs["num_replicas"] == kwargs["rank"]
