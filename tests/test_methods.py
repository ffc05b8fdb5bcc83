"""Every method trains from YAML on a tiny random model; its loss and statistics behave as specified."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import fit_config, read_metrics, series

from talr.cli import main
from talr.methods import LoRA

FAST = {"max_steps": 3, "limit_val_batches": 0}
NO_EVAL = {"baseline_eval": False, "lr": 1e-3, "warmup_ratio": 0.0}


def run(tmp_path, model_dir, method, **args):
    cfg = fit_config(tmp_path, model_dir, "synthetic", method=f"talr.methods.{method}", trainer=FAST,
                     method_args={**NO_EVAL, **args}, data={"max_length": 1024}, task={"format": "label"})
    main(["fit", "--config", str(cfg)])
    return read_metrics(tmp_path)


def finite(values):
    return values and all(math.isfinite(v) for v in values)


def test_talr_logs_tau_weights_and_effective_tokens(tmp_path, tiny_model_dir):
    rows = run(tmp_path, tiny_model_dir, "TALR")
    tau, mean_w = series(rows, "train/tau"), series(rows, "train/mean_weight")
    eff, floor = series(rows, "train/effective_tokens"), series(rows, "train/floor_share")
    assert len(tau) == 3 and finite(tau) and all(t > 0 for t in tau)
    assert all(abs(w - 1.0) < 0.05 for w in mean_w)  # simplex: mean weight 1 (up to the floor's lift)
    assert all(0 <= f <= 1 for f in floor)
    # a random model's losses are ≈ log V everywhere, so weights are near uniform: Σw²≈N
    assert finite(eff) and all(e > 1 for e in eff)
    assert finite(series(rows, "train/loss")) and finite(series(rows, "train/ce"))


def test_talr_fixed_tau_and_mean_normalisation(tmp_path, tiny_model_dir):
    rows = run(tmp_path, tiny_model_dir, "TALR", tau=1.0, normalize="mean", w_min=0.0)
    assert series(rows, "train/tau") == [1.0, 1.0, 1.0]
    # unnormalised p^(1/τ) with p ≈ 1/49152 for a random model: weights are tiny, so loss << ce
    loss, ce = series(rows, "train/loss"), series(rows, "train/ce")
    assert all(l < 0.01 * c for l, c in zip(loss, ce))


def test_dft_weights_are_probabilities(tmp_path, tiny_model_dir):
    rows = run(tmp_path, tiny_model_dir, "DFT")
    mean_w, ce = series(rows, "train/mean_weight"), series(rows, "train/ce")
    # mean of p_i ≥ exp(−mean ℓ) (Jensen) and ≤ 1
    assert all(math.exp(-c) * 0.999 <= w <= 1 for w, c in zip(mean_w, ce))


def test_flow_logs_tau_and_weights_once(tmp_path, tiny_model_dir):
    rows = run(tmp_path, tiny_model_dir, "FLOW", flow_cache=str(tmp_path / "flow-cache"))
    assert len(series(rows, "flow/tau")) == 1
    w_min, w_max = series(rows, "flow/weight_min")[0], series(rows, "flow/weight_max")[0]
    assert 0 < w_min <= math.exp(-1) * 1.5 and w_max <= 1  # exp(−L/τ) around exp(−1) at the median
    assert list((tmp_path / "flow-cache").glob("*.pt")), "weights were not cached"


def test_l2_distance_grows_from_zero(tmp_path, tiny_model_dir):
    rows = run(tmp_path, tiny_model_dir, "L2Init", l2_lambda=1.0)
    dist = series(rows, "train/l2_distance")
    # logged before each step's update: 0 at the first step, then growing
    assert dist[0] == 0.0 and dist[1] > 0 and dist[2] > dist[1]


def test_truncated_sft_trains_only_tokens_above_p_min(tmp_path, tiny_model_dir):
    # a random model gives every token p ≈ 1/49152: p_min 1e-4 drops them all (zero loss), 1e-9 keeps them all
    (tmp_path / "all").mkdir()
    (tmp_path / "none").mkdir()
    rows = run(tmp_path / "all", tiny_model_dir, "TruncatedSFT", p_min=1e-9)
    assert series(rows, "train/kept_share") == [1.0, 1.0, 1.0]
    assert series(rows, "train/loss") == pytest.approx(series(rows, "train/ce"))
    rows = run(tmp_path / "none", tiny_model_dir, "TruncatedSFT", p_min=1e-4)
    assert series(rows, "train/kept_share") == [0.0, 0.0, 0.0] and series(rows, "train/loss") == [0.0, 0.0, 0.0]


def test_lora_trains_only_adapters_and_exports_merged(tmp_path, tiny_model_dir, tokenizer):
    module = LoRA(pretrained=str(tiny_model_dir), r=4, lora_alpha=8)
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert module.hparams.r == 4 and module.lora_args["target_modules"][0] == "q_proj"
    rows = run(tmp_path, tiny_model_dir, "LoRA", r=4, lora_alpha=8)
    assert finite(series(rows, "train/loss"))
    # export: merged weights equal base + scale·B·A
    for p in module.model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    module.export_hf(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8 / 4)
    expected = base.model.layers[0].self_attn.q_proj.weight + delta
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("bad", [{"tau": -1.0}])
def test_bad_method_arguments_fail_clearly(tiny_model_dir, bad):
    from talr.methods import TALR

    with pytest.raises(ValueError, match="tau"):
        TALR(pretrained=str(tiny_model_dir), **bad)
