"""Closed-form tests of talr.losses (TALR, DFT, FLOW, L2-to-init); numbers written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from talr.losses import (
    add_l2_to_init_grad_,
    dft_weights,
    dynamic_tau,
    flow_sample_weights,
    l2_penalty_scale,
    l2_to_init_value,
    pull_toward_init_,
    sequence_mean_losses,
    talr_stats,
    talr_weights,
    truncation_weights,
    weighted_token_loss_sum,
)

T = torch.tensor
L3 = [0.1, 1.0, 3.0]  # the hand example


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


def one_row(values):
    losses = T([values], dtype=torch.float32)
    return losses, torch.ones_like(losses, dtype=torch.bool)


# --- uniform losses, τ → ∞ ----------------------------------------------------------------------

def test_uniform_losses_give_uniform_weights():
    losses = torch.full((3, 5), 0.7)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    w = talr_weights(losses, mask, tau=0.5, w_min=0.0, normalize="simplex")
    close(w, mask.float())  # all 1 on supervised tokens, 0 elsewhere
    w = talr_weights(losses, mask, tau=0.5, w_min=0.0, normalize="mean")
    close(w, mask.float() * math.exp(-0.7 / 0.5))
    w = talr_weights(losses, mask)  # dynamic τ = 0.7, simplex, floor 0.01
    close(w, mask.float())


def test_huge_tau_is_plain_sft():
    losses = T([[0.01, 2.0, 9.0, 0.5], [4.0, 0.2, 1.0, 7.0]])
    mask = T([[True, True, True, False], [True, True, True, True]])
    w = talr_weights(losses, mask, tau=1e9, normalize="simplex")
    close(w, mask.float())
    close(weighted_token_loss_sum(losses, mask, w), weighted_token_loss_sum(losses, mask))


# --- the 3-token hand example, τ = 1 -------------------------------------------------------------

def test_hand_example_mean_normalisation():
    losses, mask = one_row(L3)
    expected = [math.exp(-0.1), math.exp(-1.0), math.exp(-3.0)]  # 0.9048, 0.3679, 0.0498
    close(talr_weights(losses, mask, tau=1.0, w_min=0.0, normalize="mean")[0], expected)
    close(talr_weights(losses, mask, tau=1.0, w_min=None, normalize="mean")[0], expected)
    # floor 0.1 lifts only the last token (0.0498 < 0.1)
    close(talr_weights(losses, mask, tau=1.0, w_min=0.1, normalize="mean")[0], expected[:2] + [0.1])
    # τ = 2: p^{1/2}
    close(talr_weights(losses, mask, tau=2.0, w_min=0.0, normalize="mean")[0], [math.exp(-x / 2) for x in L3])


def test_hand_example_simplex_normalisation():
    losses, mask = one_row(L3)
    z = math.exp(-0.1) + math.exp(-1.0) + math.exp(-3.0)
    expected = [3 * math.exp(-x) / z for x in L3]  # 2.0750, 0.8437, 0.1142; sums to 3
    w = talr_weights(losses, mask, tau=1.0, w_min=0.0, normalize="simplex")[0]
    close(w, expected)
    close(w.sum(), 3.0)
    # a floor of 0.5 lifts the last token only; no renormalisation afterwards
    close(talr_weights(losses, mask, tau=1.0, w_min=0.5, normalize="simplex")[0], expected[:2] + [0.5])
    # the default floor 0.01 is below every weight here: unchanged
    close(talr_weights(losses, mask, tau=1.0, normalize="simplex")[0], expected)


def test_simplex_is_over_the_whole_batch_and_invariant_to_shift():
    losses = T([[0.1, 1.0, 9.9], [3.0, 9.9, 9.9]])
    mask = T([[True, True, False], [True, False, False]])
    w = talr_weights(losses, mask, tau=1.0, w_min=0.0)
    z = sum(math.exp(-x) for x in L3)
    close(w, [[3 * math.exp(-0.1) / z, 3 * math.exp(-1.0) / z, 0.0], [3 * math.exp(-3.0) / z, 0.0, 0.0]])
    # huge losses do not underflow the softmax (max-subtraction): weights depend only on differences
    shifted = talr_weights(losses.double() + 1000.0, mask, tau=1.0, w_min=0.0)  # float64 keeps the inputs exact
    assert shifted.dtype == torch.float64
    close(shifted, w)


# --- dynamic τ -----------------------------------------------------------------------------------

def test_dynamic_tau_even_and_odd_counts():
    # 2 sequences: means 1.0 and 3.0 -> median 2.0 (average of the two middle values)
    losses = T([[0.5, 1.5, 7.0], [3.0, 9.0, 9.0]])
    mask = T([[True, True, False], [True, False, False]])
    close(sequence_mean_losses(losses, mask), [1.0, 3.0])
    close(dynamic_tau(losses, mask), 2.0)
    # 3 sequences (+ one all-masked, excluded): means 2.0, 0.5, 4.0 -> median 2.0
    losses = T([[1.0, 3.0], [0.5, 99.0], [4.0, 4.0], [5.0, 5.0]])
    mask = T([[True, True], [True, False], [True, True], [False, False]])
    seq = sequence_mean_losses(losses, mask)
    close(seq[:3], [2.0, 0.5, 4.0])
    assert torch.isnan(seq[3])
    close(dynamic_tau(losses, mask), 2.0)
    # 4 sequences (one all-masked): means 2.0, 0.5, 4.0, 1.0 -> median (1.0 + 2.0) / 2
    losses = torch.cat([losses, T([[1.0, 1.0]])])
    mask = torch.cat([mask, T([[True, True]])])
    close(dynamic_tau(losses, mask), 1.5)


def test_dynamic_tau_is_clamped_and_used_by_default():
    losses, mask = one_row([0.0, 0.0])
    close(dynamic_tau(losses, mask), 1e-6)
    losses = T([[0.5, 1.5], [3.0, 1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)  # means 1.0, 2.0 -> τ = 1.5
    close(talr_weights(losses, mask, w_min=0.0), talr_weights(losses, mask, tau=1.5, w_min=0.0))
    with pytest.raises(AssertionError):  # and τ = 1 differs
        close(talr_weights(losses, mask, w_min=0.0), talr_weights(losses, mask, tau=1.0, w_min=0.0))


def test_nothing_supervised():
    losses = torch.full((2, 3), math.nan)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    close(dynamic_tau(losses, mask), 1.0)
    for normalize in ("simplex", "mean"):
        w = talr_weights(losses, mask, normalize=normalize)
        assert torch.equal(w, torch.zeros(2, 3))
    assert weighted_token_loss_sum(losses, mask).item() == 0.0


# --- DFT -----------------------------------------------------------------------------------------

def test_dft_is_talr_tau1_mean_no_floor_and_equals_p():
    losses = T([[0.1, 1.0, 3.0, 8.0], [0.0, 0.5, 2.0, 6.0]])
    mask = T([[True, True, True, True], [True, True, True, False]])
    w = dft_weights(losses, mask)
    assert torch.equal(w, talr_weights(losses, mask, tau=1.0, w_min=0.0, normalize="mean"))
    close(w, torch.where(mask, torch.exp(-losses), 0.0))
    assert w[0, 3].item() < 0.01  # no floor: exp(-8) = 0.000335


# --- stop-gradient, masking ----------------------------------------------------------------------

def test_weights_are_detached_and_gradient_equals_weights():
    losses = T([[0.1, 1.0, 3.0], [2.0, 0.3, 0.0]], requires_grad=True)
    mask = T([[True, True, True], [True, True, False]])
    for w in (talr_weights(losses, mask), talr_weights(losses, mask, normalize="mean"), dft_weights(losses, mask)):
        assert not w.requires_grad and w.grad_fn is None
        (grad,) = torch.autograd.grad(weighted_token_loss_sum(losses, mask, w), losses)
        close(grad, w)
    (grad,) = torch.autograd.grad(weighted_token_loss_sum(losses, mask), losses)
    close(grad, mask.float())
    # weights given with a graph are still treated as constants (stop-gradient)
    live = torch.exp(-losses)
    (grad,) = torch.autograd.grad(weighted_token_loss_sum(losses, mask, live), losses)
    close(grad, torch.where(mask, live.detach(), 0.0))
    # per-sample weights broadcast over tokens
    (grad,) = torch.autograd.grad(weighted_token_loss_sum(losses, mask, T([2.0, 0.5])), losses)
    close(grad, [[2.0, 2.0, 2.0], [0.5, 0.5, 0.0]])


def test_masked_inf_and_nan_do_not_leak():
    clean = T([[0.1, 1.0, 0.0], [3.0, 0.0, 0.0]])
    mask = T([[True, True, False], [True, False, False]])
    dirty = clean.clone()
    dirty[0, 2], dirty[1, 1], dirty[1, 2] = math.inf, math.nan, -math.inf
    dirty.requires_grad_(True)
    for kwargs in ({}, {"normalize": "mean"}, {"tau": 1.0}, {"w_min": 0.0}):
        w = talr_weights(dirty, mask, **kwargs)
        assert torch.isfinite(w).all()
        assert torch.equal(w, talr_weights(clean, mask, **kwargs))
        assert (w[~mask] == 0).all()
    close(dynamic_tau(dirty, mask), dynamic_tau(clean, mask))
    assert torch.isfinite(sequence_mean_losses(dirty, mask)).all()
    w = talr_weights(dirty, mask)
    total = weighted_token_loss_sum(dirty, mask, w)
    close(total, weighted_token_loss_sum(clean, mask, w))
    (grad,) = torch.autograd.grad(total, dirty)
    assert torch.isfinite(grad).all()
    close(grad, w)


def test_argument_validation():
    losses, mask = one_row(L3)
    with pytest.raises(ValueError, match="normalize"):
        talr_weights(losses, mask, normalize="softmax")
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="tau"):
            talr_weights(losses, mask, tau=bad)
    with pytest.raises(ValueError, match="w_min"):
        talr_weights(losses, mask, w_min=-0.1)
    with pytest.raises(ValueError, match="shape"):
        talr_weights(losses, mask[:, :2])


# --- stats ---------------------------------------------------------------------------------------

def test_talr_stats():
    mask = T([[True, True, True, False], [True, True, False, False]])
    s = talr_stats(mask.float() * 1.0, mask, 0.01)
    close(s["mean_weight"], 1.0)
    close(s["effective_tokens"], 5.0)  # N for uniform weights
    close(s["floor_share"], 0.0)
    one_hot = T([[0.0, 3.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    s = talr_stats(one_hot, mask, 0.0)
    close(s["effective_tokens"], 1.0)
    close(s["mean_weight"], 3.0 / 5)
    close(s["floor_share"], 0.0)  # w_min = 0 disables the floor share
    # hand example, simplex τ = 1 with floor 0.5: one of three tokens at the floor
    losses, m = one_row(L3)
    w = talr_weights(losses, m, tau=1.0, w_min=0.5)
    s = talr_stats(w, m, 0.5)
    close(s["floor_share"], 1 / 3)
    ws = [3 * math.exp(-0.1) / sum(math.exp(-x) for x in L3), 3 * math.exp(-1.0) / sum(math.exp(-x) for x in L3), 0.5]
    close(s["mean_weight"], sum(ws) / 3)
    close(s["effective_tokens"], sum(ws) ** 2 / sum(x * x for x in ws))


# --- FLOW ----------------------------------------------------------------------------------------

def test_flow_sample_weights_hand_example():
    w, tau = flow_sample_weights(T([0.5, 1.0, 2.0, 4.0]))  # median (1 + 2) / 2 = 1.5
    close(tau, 1.5)
    close(w, [math.exp(-0.5 / 1.5), math.exp(-1.0 / 1.5), math.exp(-2.0 / 1.5), math.exp(-4.0 / 1.5)])
    w, tau = flow_sample_weights(T([3.0, 0.6, 1.2, math.nan]))  # odd count after dropping nan: 1.2
    close(tau, 1.2)
    close(w, [math.exp(-3.0 / 1.2), math.exp(-0.5), math.exp(-1.0), 0.0])
    w, tau = flow_sample_weights(T([0.0, 0.0, 5.0]))  # clamped τ
    close(tau, 1e-6)
    with pytest.raises(ValueError):
        flow_sample_weights(T([[1.0]]))
    with pytest.raises(ValueError):
        flow_sample_weights(T([math.nan]))


# --- L2-to-init ----------------------------------------------------------------------------------

def test_l2_to_init_value_and_grad_match_autograd():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    params = [torch.nn.Parameter(p + 0.1 * torch.randn(p.shape, generator=g)) for p in init]
    lam, numel = 1e-3, 3 * 4 + 5
    value = l2_to_init_value(params, init, numel)
    expected = sum(((p.detach() - p0) ** 2).sum().item() for p, p0 in zip(params, init)) / numel
    close(value, expected)
    auto = torch.autograd.grad(lam * value, params)
    for a, p, p0 in zip(auto, params, init):
        close(a, lam * 2 * (p.detach() - p0) / numel)
    # the in-place version: creates grads where None, adds to existing grads
    params[1].grad = torch.ones(5)
    add_l2_to_init_grad_(params, init, lam, numel)
    close(params[0].grad, auto[0])
    close(params[1].grad, auto[1] + 1.0)
    # at θ = θ0 value and gradient vanish
    fresh = [torch.nn.Parameter(p.clone()) for p in init]
    assert l2_to_init_value(fresh, init, numel).item() == 0.0
    add_l2_to_init_grad_(fresh, init, lam, numel)
    assert all(torch.count_nonzero(p.grad) == 0 for p in fresh)
    with pytest.raises(ValueError):
        l2_to_init_value(params[:1], init, numel)  # length mismatch (zip strict)


def test_l2_penalty_scale_per_form():
    assert l2_penalty_scale("mean", 17) == pytest.approx(1 / 17)
    assert l2_penalty_scale("sum", 17) == 1.0
    with pytest.raises(ValueError, match="no loss term"):
        l2_penalty_scale("decoupled", 17)


def test_l2_sum_form_gradient_is_2_lambda_delta():
    init = [T([1.0, -2.0]), T([[0.5]])]
    params = [torch.nn.Parameter(T([1.5, -2.0])), torch.nn.Parameter(T([[0.25]]))]
    add_l2_to_init_grad_(params, init, 0.1, 1)  # numel_total 1 = the sum form λ·Σ(θ−θ0)²
    close(params[0].grad, [2 * 0.1 * 0.5, 0.0])
    close(params[1].grad, [[2 * 0.1 * -0.25]])
    close(l2_to_init_value(params, init, 1), 0.25 + 0.0625)


def test_decoupled_pull_moves_a_share_of_the_deviation_back():
    """θ ← θ − w·(θ − θ0), by hand: θ0 = 1, θ = 3, w = 0.25 → 2.5; θ = θ0 stays put; w = 1 lands on θ0."""
    init = [T([1.0, -1.0]), T([0.0])]
    params = [torch.nn.Parameter(T([3.0, -1.0])), torch.nn.Parameter(T([-4.0]))]
    pull_toward_init_(params, init, 0.25)
    close(params[0].detach(), [2.5, -1.0])
    close(params[1].detach(), [-3.0])
    assert params[0].grad is None  # no gradient is involved
    pull_toward_init_(params, init, 1.0)
    close(params[0].detach(), [1.0, -1.0])
    close(params[1].detach(), [0.0])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lr·λ"):
            pull_toward_init_(params, init, bad)


# --- truncation (the "extreme experiment") -------------------------------------------------------

def test_truncation_weights_drop_tokens_below_p_min():
    # p = exp(−ℓ): 0.905, 0.368, 0.0498, and p_min 0.2 keeps the first two; off-mask positions are 0 whatever they hold
    losses = T([[0.1, 1.0, 3.0, math.inf]])
    mask = T([[True, True, True, False]])
    close(truncation_weights(losses, mask, 0.2), [[1.0, 1.0, 0.0, 0.0]])
    close(truncation_weights(losses, mask, 0.0), [[1.0, 1.0, 1.0, 0.0]])  # p_min 0: plain SFT
    # exactly at the threshold: kept (p ≥ p_min)
    close(truncation_weights(T([[-math.log(0.5)]]), T([[True]]), 0.5), [[1.0]])
    # the loss Σ w ℓ: gradient 1 for kept tokens, exactly 0 for dropped ones
    leaf = losses[:, :3].clone().requires_grad_(True)
    weighted_token_loss_sum(leaf, mask[:, :3], truncation_weights(leaf, mask[:, :3], 0.2)).backward()
    close(leaf.grad, [[1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="p_min"):
        truncation_weights(losses, mask, 1.0)


def test_hard_weight_share_is_the_weight_on_tokens_below_p():
    losses, mask = one_row(L3)  # p = 0.905, 0.368, 0.0498: one hard token at 0.2
    w = T([[1.0, 2.0, 5.0]])
    close(talr_stats(w, mask, None, token_losses=losses)["hard_weight_share"], 5.0 / 8.0)
    close(talr_stats(w, mask, None, token_losses=losses, hard_p=0.5)["hard_weight_share"], 7.0 / 8.0)
    assert "hard_weight_share" not in talr_stats(w, mask, None)
