"""Token-level loss weighting: TALR, DFT, FLOW, and the L2-to-init regulariser, as pure functions.

Conventions (docs/METHODS.md):

* ``token_losses``: float tensor ``(B, T)`` of per-token ``ℓ_i = −log p_θ(token_i)``. Positions where
  ``mask`` is False are ignored whatever they hold (inf / nan included): they are selected away with
  ``torch.where``, never multiplied by zero.
* ``mask``: bool tensor ``(B, T)`` of supervised (response) tokens.
* Every function returning weights returns them detached (stop-gradient) and zero where ``mask`` is
  False.

The loss of a step is ``weighted_token_loss_sum(...) / N`` with ``N`` the *global* supervised-token
count (over gradient-accumulation micro-batches and ranks), which the trainer supplies.

TALR: ``w_i ∝ exp(−ℓ_i/τ) = p_i^{1/τ}`` from ``min_{w∈simplex} Σ w_i ℓ_i + τ Σ w_i log w_i``. The
default normalisation is ``"simplex"`` (the paper's): ``w = N·softmax(−ℓ/τ)`` over the batch's
supervised tokens, so the mean weight is 1 and ``τ → ∞`` recovers plain SFT. ``"mean"`` keeps the
unnormalised ``p^{1/τ}``. Both are followed by the floor ``w ← max(w, w_min)``.

Truncation (the paper's "extreme experiment"): ``w_i = 1[p_i ≥ p_min]``: tokens the model finds hard get no
gradient at all, instead of a small one.

L2-to-init comes in three forms (``L2Form``): ``"mean"`` adds ``λ·Σ(θ−θ0)²/P`` to the loss (FLOW's code),
``"sum"`` adds ``λ·Σ(θ−θ0)²``, and ``"decoupled"`` adds nothing to the loss but moves the weights after each
optimizer step: ``θ ← θ − lr_t·λ·(θ−θ0)`` (:func:`pull_toward_init_`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist

from talr.distributed import is_distributed, is_dtensor, local_tensor

TAU_MIN = 1e-6
Normalize = Literal["simplex", "mean"]
NORMALIZATIONS = ("simplex", "mean")
L2Form = Literal["mean", "sum", "decoupled"]
L2_FORMS = ("mean", "sum", "decoupled")

__all__ = [
    "sequence_mean_losses", "dynamic_tau", "talr_weights", "talr_stats", "dft_weights", "truncation_weights",
    "flow_sample_weights", "weighted_token_loss_sum", "l2_to_init_value", "add_l2_to_init_grad_",
    "l2_penalty_scale", "pull_toward_init_", "L2_FORMS",
]


def _check(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if token_losses.shape != mask.shape:
        raise ValueError(f"token_losses {tuple(token_losses.shape)} and mask {tuple(mask.shape)} differ in shape")
    return mask.bool()


def _float(t: torch.Tensor) -> torch.Tensor:
    """Detached copy in at least float32 (bf16/fp16 losses are upcast before exponentiating)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _synced(sync: bool) -> bool:
    return bool(sync) and is_distributed()


def _numpy_median(values: torch.Tensor) -> torch.Tensor:
    """Median of a 1-D tensor as numpy defines it (mean of the two middle values for even counts)."""
    s, n = torch.sort(values).values, values.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _gather_varlen(values: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from all ranks (in rank order)."""
    world = dist.get_world_size()
    n = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = torch.full((max(counts),), math.nan, device=values.device, dtype=values.dtype)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def sequence_mean_losses(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean supervised-token loss of each sequence, shape (B,); nan where a sequence has no supervised token."""
    mask = _check(token_losses, mask)
    losses = torch.where(mask, token_losses, torch.zeros((), dtype=token_losses.dtype, device=token_losses.device))
    total = losses.to(torch.promote_types(losses.dtype, torch.float32)).sum(-1)
    return total / mask.sum(-1)  # 0/0 -> nan for empty sequences


def dynamic_tau(token_losses: torch.Tensor, mask: torch.Tensor, sync: bool = False) -> torch.Tensor:
    """TALR's dynamic temperature: median over sequences of their mean token loss, clamped ≥ 1e-6.

    Sequences without a supervised token are excluded. With ``sync=True`` and torch.distributed
    initialised, the median is over the sequences of all ranks. Returns a detached 0-dim tensor; 1.0
    when no sequence has a supervised token (the weights are then all zero anyway).
    """
    mask = _check(token_losses, mask)
    with torch.no_grad():
        seq = sequence_mean_losses(_float(token_losses), mask)[mask.any(-1)]
        if _synced(sync):
            seq = _gather_varlen(seq)
        if seq.numel() == 0:
            return torch.ones((), dtype=seq.dtype, device=seq.device)
        return _numpy_median(seq).clamp_min(TAU_MIN)


def talr_weights(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    tau: float | torch.Tensor | None = None,
    w_min: float | None = 0.01,
    normalize: Normalize = "simplex",
    sync: bool = False,
) -> torch.Tensor:
    """TALR token weights ``w_i ∝ exp(−ℓ_i/τ)``, floored at ``w_min``; detached, (B, T), 0 off-mask.

    tau: fixed temperature (> 0), or None for :func:`dynamic_tau`.
    normalize: ``"simplex"``: ``w = N·softmax(−ℓ/τ)`` over all supervised tokens of the batch (mean
        weight 1); ``"mean"``: ``w = exp(−ℓ/τ) = p^{1/τ}`` unnormalised.
    w_min: floor ``w ← max(w, w_min)`` applied after normalisation; 0 or None disables it.
    sync: with torch.distributed initialised, τ, the softmax normaliser and N are computed over the
        micro-batch of all ranks (so the concatenated weights equal those of the whole batch).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if tau is not None and not float(tau) > 0:
        raise ValueError(f"tau must be > 0 (or None for the dynamic median), got {float(tau)}")
    if w_min is not None and not float(w_min) >= 0:
        raise ValueError(f"w_min must be >= 0 (or None), got {w_min}")
    mask = _check(token_losses, mask)
    synced = _synced(sync)
    with torch.no_grad():
        losses = _float(token_losses)
        if tau is None:
            t = dynamic_tau(losses, mask, sync=sync)
        else:
            t = torch.as_tensor(tau, dtype=losses.dtype, device=losses.device)
        z = torch.where(mask, -losses / t, torch.full((), -math.inf, dtype=losses.dtype, device=losses.device))
        if normalize == "mean":
            w = torch.exp(z)
        else:
            m = z.max() if z.numel() else torch.full((), -math.inf, dtype=z.dtype, device=z.device)
            if synced:
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
            e = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
            sums = torch.stack([e.sum().double(), mask.sum().double()])
            if synced:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            s, n = sums[0], sums[1]
            scale = torch.where(s > 0, n / s, torch.zeros_like(s)).to(e.dtype)
            w = e * scale
        if w_min:
            w = w.clamp_min(float(w_min))
        return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def talr_stats(weights: torch.Tensor, mask: torch.Tensor, w_min: float | None,
               token_losses: torch.Tensor | None = None, hard_p: float = 0.2) -> dict[str, torch.Tensor]:
    """Diagnostics of a weight tensor over the supervised tokens (detached 0-dim float tensors).

    mean_weight: Σw / N. floor_share: share of tokens with ``w <= w_min·(1+1e-6)`` (0 when w_min is
    0/None). effective_tokens: (Σw)² / Σw² (N for uniform weights, 1 for a one-hot weight).
    With ``token_losses``: hard_weight_share: the share of the total weight on hard tokens, Σ_{p<hard_p} w / Σw
    (p = exp(−ℓ); under SFT it is simply the share of hard tokens).
    """
    mask = _check(weights, mask)
    with torch.no_grad():
        w = torch.where(mask, _float(weights), torch.zeros((), device=weights.device))
        n = mask.sum().to(w.dtype)
        total, sq = w.sum(), (w * w).sum()
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        mean = torch.where(n > 0, total / n.clamp_min(1), zero)
        if w_min:
            floor = (mask & (w <= float(w_min) * (1 + 1e-6))).sum().to(w.dtype) / n.clamp_min(1)
        else:
            floor = zero
        eff = torch.where(sq > 0, total * total / torch.where(sq > 0, sq, torch.ones_like(sq)), zero)
        out = {"mean_weight": mean, "floor_share": floor, "effective_tokens": eff}
        if token_losses is not None:
            hard = mask & (_float(token_losses) > -math.log(hard_p))
            hard_w = torch.where(hard, w, zero).sum()
            out["hard_weight_share"] = torch.where(total > 0, hard_w / torch.where(total > 0, total, torch.ones_like(total)), zero)
        return out


def dft_weights(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DFT (Wu et al. 2025): ``w_i = p_i = exp(−ℓ_i)`` detached = TALR(τ=1, "mean", no floor)."""
    return talr_weights(token_losses, mask, tau=1.0, w_min=0.0, normalize="mean")


def truncation_weights(token_losses: torch.Tensor, mask: torch.Tensor, p_min: float) -> torch.Tensor:
    """The "extreme experiment": ``w_i = 1`` if ``p_i ≥ p_min`` else 0 (detached, (B, T), 0 off-mask).

    Tokens the model finds hard (p below ``p_min``) get no gradient at all, not a small one. With the
    trainer's loss Σ w_i ℓ_i / N, N still counts every supervised token (dropped ones included), so the
    kept tokens' gradient is exactly SFT's for those tokens.
    """
    if not 0.0 <= float(p_min) < 1.0:
        raise ValueError(f"p_min must be in [0, 1), got {p_min}")
    mask = _check(token_losses, mask)
    with torch.no_grad():
        losses = _float(token_losses)
        keep = mask & (losses <= -math.log(p_min)) if p_min > 0 else mask
        return keep.to(losses.dtype)


def flow_sample_weights(sample_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLOW (Sanyal et al. 2025) per-sample weights ``w_s = exp(−L_s/τ)``, τ = median of L_s.

    ``sample_losses``: 1-D mean token loss of each training sample under the *initial* model. The
    median is numpy's over the non-nan entries, clamped ≥ 1e-6; weights are not renormalised.
    Samples with a nan loss (no supervised token) get weight 0. Returns ``(weights, tau)``, detached.
    """
    if sample_losses.dim() != 1:
        raise ValueError(f"sample_losses must be 1-D, got shape {tuple(sample_losses.shape)}")
    with torch.no_grad():
        losses = _float(sample_losses)
        valid = ~torch.isnan(losses)
        if not bool(valid.any()):
            raise ValueError("flow_sample_weights needs at least one sample with a finite loss")
        tau = _numpy_median(losses[valid]).clamp_min(TAU_MIN)
        w = torch.where(valid, torch.exp(-losses / tau), torch.zeros((), dtype=losses.dtype, device=losses.device))
        return w, tau


def weighted_token_loss_sum(
    token_losses: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_i w_i ℓ_i over supervised tokens (plain Σ ℓ_i when ``weights`` is None); differentiable in ℓ.

    ``weights`` is (B, T) per token or (B,) per sample, and is treated as a constant (detached).
    This is the numerator of the loss; the trainer divides by the global token count N.
    """
    mask = _check(token_losses, mask)
    zero = torch.zeros((), dtype=token_losses.dtype, device=token_losses.device)
    losses = torch.where(mask, token_losses, zero)
    if weights is None:
        return losses.sum()
    w = weights.detach()
    if w.dim() == 1 and token_losses.dim() == 2:
        w = w[:, None]
    w = torch.where(mask, w.to(token_losses.dtype), zero)
    return (w * losses).sum()


# --- L2-to-init -------------------------------------------------------------------------------

def _like(p: torch.Tensor, p0: torch.Tensor) -> torch.Tensor:
    """θ0 in θ's form: a plain local shard is wrapped as a DTensor with θ's mesh and placements."""
    if is_dtensor(p) and not is_dtensor(p0):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(p0, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return p0


def l2_to_init_value(
    params: Iterable[torch.Tensor], init_params: Iterable[torch.Tensor], numel_total: int
) -> torch.Tensor:
    """Σ (θ − θ0)² / P over the given parameters, differentiable in θ (accumulated in float32).

    ``numel_total`` is P, the global number of trainable parameters. For DTensors (FSDP2 shards) the
    sum is over this rank's local shard only; the caller all-reduces (SUM) it across the shard group.
    """
    if numel_total <= 0:
        raise ValueError(f"numel_total must be positive, got {numel_total}")
    total = None
    for p, p0 in zip(params, init_params, strict=True):
        a, b = local_tensor(p), local_tensor(p0)
        sq = (a.float() - b.to(a.device).float()).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return total / numel_total


def l2_penalty_scale(form: str, numel_total: int) -> float:
    """c in the coupled penalty λ·c·Σ(θ−θ0)²: 1/P for ``"mean"`` (FLOW's code), 1 for ``"sum"``."""
    if form == "mean":
        if numel_total <= 0:
            raise ValueError(f"numel_total must be positive, got {numel_total}")
        return 1.0 / numel_total
    if form == "sum":
        return 1.0
    raise ValueError(f"form {form!r} has no loss term (the coupled forms are 'mean' and 'sum')")


def add_l2_to_init_grad_(
    params: Iterable[torch.Tensor], init_params: Iterable[torch.Tensor], lam: float, numel_total: int
) -> None:
    """In place: ``θ.grad += λ · 2(θ − θ0) / P`` (the gradient of λ·Σ(θ−θ0)²/P); creates missing grads.

    ``numel_total = 1`` gives the sum form's gradient 2λ(θ − θ0).
    Works for plain tensors and for DTensors with θ0 sharded like θ (elementwise, no communication).
    """
    if numel_total <= 0:
        raise ValueError(f"numel_total must be positive, got {numel_total}")
    scale = 2.0 * float(lam) / numel_total
    with torch.no_grad():
        for p, p0 in zip(params, init_params, strict=True):
            diff = p.detach() - _like(p, p0).to(dtype=p.dtype)
            if p.grad is None:
                p.grad = diff.mul_(scale)
            else:
                p.grad.add_(diff.to(p.grad.dtype), alpha=scale)


def pull_toward_init_(params: Iterable[torch.Tensor], init_params: Iterable[torch.Tensor], weight: float) -> None:
    """In place: ``θ ← θ − weight·(θ − θ0)``, i.e. ``θ ← θ0 + (1 − weight)(θ − θ0)`` (decoupled L2-to-init).

    The trainer calls it after each optimizer step with ``weight = lr_t·λ`` (lr_t: the learning rate that
    step used), as AdamW applies weight decay but toward θ0 instead of 0. Elementwise on the local tensors, so
    FSDP2 shards need no communication as long as θ0 is sharded like θ. ``weight`` must be in [0, 1].
    """
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the pull weight lr·λ must be in [0, 1], got {weight}")
    if weight == 0.0:
        return
    with torch.no_grad():
        pairs = [(local_tensor(p), local_tensor(p0)) for p, p0 in zip(params, init_params, strict=True)]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [b.to(device=a.device, dtype=a.dtype) for a, b in pairs], weight)
