"""L2-to-init: keep the weights near θ0, coupled (a loss term) or decoupled (a pull after each step)."""

from __future__ import annotations

from typing import Literal

import torch

from talr.distributed import is_dtensor
from talr.losses import L2_FORMS, add_l2_to_init_grad_, l2_penalty_scale, l2_to_init_value, pull_toward_init_
from talr.methods.sft import SFT
from talr.modeling import load_model


class L2Init(SFT):
    """Regularise towards the starting weights θ0 (docs/METHODS.md, "L2-to-init").

    Forms (`l2_form`):
      * `mean` (default): loss + λ·Σ(θ−θ0)²/P, P the number of trainable parameters (FLOW's code). At FLOW's
        λ = 1e-3 it is a no-op in practice: trained weights equal SFT's to every printed digit.
      * `sum`: loss + λ·Σ(θ−θ0)². Under Adam a coupled penalty competes with the data gradient element by
        element and is then normalised away with it, so its effect depends on the gradient scale.
      * `decoupled`: no loss term; after every optimizer step θ ← θ − lr_t·λ·(θ−θ0), lr_t the
        learning rate that step used (warmup and cosine included), as AdamW applies weight decay but toward
        θ0. The deviation from θ0 shrinks by the factor (1 − lr_t·λ) per step, whatever the optimizer or the
        gradient scale, so λ has one meaning on every model: after steps with learning rates lr_1..lr_T the
        pull alone would leave exp(−λ·Σ lr_t) of a deviation.

    The coupled gradient 2λc(θ−θ0) (c = 1/P or 1) is added once per optimiser step, after the data gradient is
    normalised, so accumulation and data parallelism never rescale it. θ0 is a copy of each trainable parameter
    with the same device, dtype and sharding (a DTensor shard under FSDP2): no second unsharded model; the
    decoupled pull is elementwise on the local shards. On resume θ0 is rebuilt from `pretrained`, so
    checkpoints do not carry it. A skipped (non-finite) step skips the pull too.

    The defaults (`mean`, λ = 1e-3) are FLOW's published baseline, kept so that existing configs and the
    hyperparameters stored in checkpoints keep their meaning; the paper reproduction uses the decoupled form
    (configs/methods/l2_decoupled.yaml, with the measurement that sets its λ).

    Args:
        l2_lambda: λ (1e-3, FLOW's choice for the `mean` form).
        l2_form: `mean` (default), `sum`, or `decoupled`.
    """

    def __init__(self, *args, l2_lambda: float = 1e-3,
                 l2_form: Literal["mean", "sum", "decoupled"] = "mean", **kwargs):
        super().__init__(*args, **kwargs)
        if l2_form not in L2_FORMS:
            raise ValueError(f"l2_form must be one of {L2_FORMS}, got {l2_form!r}")
        if not l2_lambda >= 0:
            raise ValueError(f"l2_lambda must be >= 0, got {l2_lambda}")
        if l2_form == "decoupled" and self.hparams.lr * l2_lambda > 1:
            raise ValueError(f"decoupled L2: lr·λ = {self.hparams.lr * l2_lambda:g} > 1 would overshoot θ0 "
                             "(the pull is θ ← θ − lr·λ·(θ−θ0)); lower l2_lambda")
        self.l2_lambda, self.l2_form = l2_lambda, l2_form
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
        if self.l2_form != "decoupled":
            divisor = self.numel_total if self.l2_form == "mean" else 1  # λ·Σ(θ−θ0)²/divisor
            add_l2_to_init_grad_(params, self.theta0, self.l2_lambda, divisor)
        sq = self._squared_distance(params)
        self.log("train/l2_distance", sq.sqrt())
        if self.l2_form != "decoupled":
            self.log("train/l2_penalty", self.l2_lambda * l2_penalty_scale(self.l2_form, self.numel_total) * sq)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        skipped = self.skipped_steps
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.l2_form != "decoupled" or self.skipped_steps != skipped:
            return
        theta0 = {id(p): p0 for p, p0 in zip(self.trainable_parameters(), self.theta0, strict=True)}
        for group in optimizer.param_groups:  # the lr this step used: schedulers step after the optimizer
            params = [p for p in group["params"] if id(p) in theta0]
            pull_toward_init_(params, [theta0[id(p)] for p in params], group["lr"] * self.l2_lambda)
        self.log("train/l2_pull", optimizer.param_groups[0]["lr"] * self.l2_lambda)

    def _squared_distance(self, params) -> torch.Tensor:
        """Σ(θ−θ0)² over all trainable parameters, reduced across ranks when they are sharded."""
        sq = l2_to_init_value(params, self.theta0, 1)
        if self.trainer.world_size > 1 and any(map(is_dtensor, params)):  # FSDP2 shards: a partial sum
            sq = self.trainer.strategy.reduce(sq.to(self.device), reduce_op="sum")
        return sq


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=p.device, dtype=p.dtype)
    if is_dtensor(p):
        return distribute_tensor(full, p.device_mesh, p.placements)
    return full
