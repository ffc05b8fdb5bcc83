"""TALR — token-adaptive loss reweighting (the paper's method), DFT (its τ=1 special case), and TruncatedSFT
(the "extreme experiment": hard tokens get no gradient at all). Definitions: docs/METHODS.md."""

from __future__ import annotations

from typing import Literal

import torch

from talr.losses import (
    dft_weights, dynamic_tau, talr_stats, talr_weights, truncation_weights, weighted_token_loss_sum,
)
from talr.methods.sft import SFT


class TALR(SFT):
    """Weights w_i ∝ exp(−ℓ_i/τ) = p_i^{1/τ} from the same forward pass, under stop-gradient.

    Args:
        tau: fixed temperature, or null for the dynamic rule: the median over sequences of each sequence's
            mean token loss in the current micro-batch (gathered across ranks), clamped ≥ 1e-6, every step.
            The paper's ablation uses tau=1.
        w_min: floor on the weights, so hard tokens stay learnable (0.01, the one public choice; 0 disables).
        normalize: `simplex` (default, the paper's formulation: w = N·softmax(−ℓ/τ) over the micro-batch's
            supervised tokens gathered across ranks, mean weight 1) or `mean` (unnormalised p^{1/τ}, as one
            public re-implementation does). Either way the loss is Σ w_i ℓ_i / N.

    With gradient accumulation, τ and the simplex normaliser are per micro-batch (over all ranks), not
    over the whole accumulation window: use a larger micro-batch rather than accumulation to change them.
    """

    def __init__(self, *args, tau: float | None = None, w_min: float = 0.01,
                 normalize: Literal["simplex", "mean"] = "simplex", **kwargs):
        super().__init__(*args, **kwargs)
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be > 0 or null (dynamic), got {tau}")
        self.tau, self.w_min, self.normalize = tau, w_min, normalize

    def weighted_loss_sum(self, token_losses, mask, batch):
        sync = self.trainer.world_size > 1
        detached = token_losses.detach()
        tau = torch.as_tensor(self.tau) if self.tau is not None else dynamic_tau(detached, mask, sync=sync)
        weights = talr_weights(detached, mask, tau=tau, w_min=self.w_min, normalize=self.normalize, sync=sync)
        stats = {"tau": tau.float(), **talr_stats(weights, mask, self.w_min, token_losses=detached)}
        return weighted_token_loss_sum(token_losses, mask, weights), stats


class DFT(SFT):
    """Dynamic fine-tuning (Wu et al. 2025): w_i = p_i detached — TALR with τ=1, `mean`, no floor."""

    def weighted_loss_sum(self, token_losses, mask, batch):
        weights = dft_weights(token_losses.detach(), mask)
        return weighted_token_loss_sum(token_losses, mask, weights), talr_stats(weights, mask, 0.0, token_losses=token_losses)


class TruncatedSFT(SFT):
    """SFT on the tokens the model already predicts with p ≥ `p_min`; the others get zero gradient.

    The paper's "extreme experiment" (truncation, not down-weighting): w_i = 1[p_i ≥ p_min] from the same
    forward pass, under stop-gradient. The loss is Σ w_i ℓ_i / N with N every supervised token, so a kept
    token's gradient is exactly SFT's. Logged: `train/kept_share` (share of supervised tokens trained on).

    Args:
        p_min: probability threshold (0.2, the paper's hard-token threshold); 0 = plain SFT.
    """

    def __init__(self, *args, p_min: float = 0.2, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= p_min < 1.0:
            raise ValueError(f"p_min must be in [0, 1), got {p_min}")
        self.p_min = p_min

    def weighted_loss_sum(self, token_losses, mask, batch):
        weights = truncation_weights(token_losses.detach(), mask, self.p_min)
        kept = weights.sum() / mask.sum().clamp_min(1)
        return weighted_token_loss_sum(token_losses, mask, weights), {"kept_share": kept}
