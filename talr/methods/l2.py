"""L2-to-init: loss + λ·Σ(θ−θ0)²/P over the trainable parameters (P their count)."""

from __future__ import annotations

import torch

from talr.losses import add_l2_to_init_grad_, l2_to_init_value
from talr.methods.sft import SFT
from talr.modeling import load_model


class L2Init(SFT):
    """Regularise towards the starting weights θ0.

    The regulariser's gradient 2λ(θ−θ0)/P is added once per optimiser step, after the data gradient is
    normalised, so accumulation and data parallelism never rescale it. θ0 is a copy of each trainable
    parameter with the same device, dtype and sharding (a DTensor shard under FSDP2): no second
    unsharded model. On resume θ0 is rebuilt from `pretrained`, so checkpoints do not carry it.

    Args:
        l2_lambda: λ (1e-3, FLOW's choice).
    """

    def __init__(self, *args, l2_lambda: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2_lambda = l2_lambda
        self.theta0: list[torch.Tensor] = []
        self.numel_total = 0

    def on_fit_start(self) -> None:
        params = self.trainable_parameters()
        self.numel_total = sum(p.numel() for p in params)  # DTensor.numel() is the global size
        if self.trainer.ckpt_path:  # resuming: the current weights are not θ0
            initial = dict(load_model(self.hparams.pretrained, self.hparams.dtype).named_parameters())
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.theta0 = [_shard_like(initial[n].detach(), p) for n, p in named]
        else:
            self.theta0 = [p.detach().clone() for p in params]

    def after_gradient_normalized(self) -> None:
        params = self.trainable_parameters()
        add_l2_to_init_grad_(params, self.theta0, self.l2_lambda, self.numel_total)
        sq = l2_to_init_value(params, self.theta0, self.numel_total) * self.numel_total
        if self.trainer.world_size > 1 and _is_sharded(params):
            sq = self.trainer.strategy.reduce(sq.to(self.device), reduce_op="sum")
        self.log("train/l2_distance", sq.sqrt())
        self.log("train/l2_penalty", self.l2_lambda * sq / self.numel_total)


def _is_sharded(params) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=p.device, dtype=p.dtype)
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements)
    return full
