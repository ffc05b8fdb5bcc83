"""Miniature v2: the driver's plan, the pre-registered rules on hand-made numbers, and a short real run of the
driver on a tiny model (its steps run the real `python -m talr` commands; a second call resumes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_is_the_pre_registered_design():
    driver = _load("reproduce_miniature_v2")
    names = [n for n, _ in driver.MiniatureV2(driver.build_parser().parse_args([])).plan()]
    assert names == ["data", "base", "sft_lr1e-5", "sft_lr5e-5", "sft_lr2e-4", "talr_lr1e-5", "talr_lr5e-5",
                     "sft_lr5e-5_seed1", "talr_lr5e-5_seed1"]
    args = driver.build_parser().parse_args(["--extra", "flow,l2"])
    assert [n for n, _ in driver.MiniatureV2(args).plan()][-2:] == ["flow_lr5e-5", "l2_lr5e-5"]


def test_frontier_interpolates_non_dominated_points_from_the_origin():
    res = _load("miniature_v2_results")
    f = res.frontier([(0.4, 0.1), (0.6, 0.5), (0.5, 0.9)])  # (0.5, 0.9) is dominated by (0.6, 0.5)
    assert f.points == [(0.0, 0.0), (0.4, 0.1), (0.6, 0.5)]
    assert f(0.2) == pytest.approx(0.05) and f(0.5) == pytest.approx(0.3)
    assert f(0.7) == pytest.approx(0.7)  # the last segment continued
    assert res.frontier([(0.3, -0.01)]).points == [(0.3, -0.01)]  # a point better than the base replaces it


def _sft(lo, mid, hi, g=(0.3, 0.5, 0.55)):
    m1, m2 = "drift/nll_delta", "drift/gsm8k_nll_delta"
    return {1e-5: {"gain": g[0], m1: lo, m2: lo}, 5e-5: {"gain": g[1], m1: mid, m2: mid},
            2e-4: {"gain": g[2], m1: hi, m2: hi}}


def test_f1_rules():
    res = _load("miniature_v2_results")
    v = res.f1_verdict(_sft(0.001, 0.02, 0.5), "drift/nll_delta")
    assert v["holds"] and v["superlinear_drift"] and v["lower_lrs_keep_gain"]
    assert not res.f1_verdict(_sft(0.01, 0.02, 0.5), "drift/nll_delta")["superlinear_drift"]  # ×2 for ×5 LR
    assert not res.f1_verdict(_sft(0.001, 0.02, 0.05), "drift/nll_delta")["superlinear_drift"]  # ×2.5 for ×4 LR
    assert not res.f1_verdict(_sft(0.001, 0.02, 0.5, g=(0.1, 0.5, 0.55)), "drift/nll_delta")["lower_lrs_keep_gain"]


def _point(gain, drift):
    return {"gain": gain, "drift/nll_delta": drift, "drift/gsm8k_nll_delta": drift}


def test_talr_verdict_holds_refuted_inconclusive():
    res = _load("miniature_v2_results")
    sft0 = _sft(0.0, 0.2, 1.0, g=(0.2, 0.5, 0.6))  # frontier at gain 0.5: drift 0.2
    sft_mid = {0: _point(0.5, 0.2), 1: _point(0.5, 0.21)}
    holds = res.talr_verdict(sft0, sft_mid, {0: _point(0.48, 0.05), 1: _point(0.47, 0.06)})
    assert holds["verdict"] == "holds"  # margins ≈ 0.14, spread 0.01
    refuted = res.talr_verdict(sft0, sft_mid, {0: _point(0.3, 0.2), 1: _point(0.3, 0.25)})
    assert refuted["verdict"] == "refuted"  # learns less and drifts as much as SFT at that gain
    within = res.talr_verdict(sft0, sft_mid, {0: _point(0.5, 0.15), 1: _point(0.5, 0.05)})
    assert within["verdict"] == "inconclusive" and within["measures"]["drift/nll_delta"]["spread"] == pytest.approx(0.1)
    less = res.talr_verdict(sft0, sft_mid, {0: _point(0.3, 0.0), 1: _point(0.3, 0.0)})
    assert less["verdict"] == "inconclusive" and "domain gain" in less["why"][0]


@pytest.mark.slow
def test_driver_runs_collects_and_resumes(tmp_path, tiny_model_dir, medcalc_csv):
    driver = _load("reproduce_miniature_v2")
    cfg = yaml.safe_load((ROOT / "configs" / "miniature_v2" / "base.yaml").read_text())
    cfg["trainer"]["max_epochs"] = 1
    cfg["trainer"]["check_val_every_n_epoch"] = 1
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.get("init_args")
        if cb["class_path"].endswith("CodeLengthDriftCallback"):
            args.update(num_prompts=2, max_new_tokens=4)
        if cb["class_path"].endswith("ReferenceTextNLL"):
            args.update(num_examples=2, data_file=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--config", str(config), "--model", str(tiny_model_dir), "--source", str(medcalc_csv),
            "--runs", str(runs), "--results", str(results), "--only", "data,base,sft_lr5e-5,talr_lr5e-5"]
    driver.main(argv)
    steps = json.loads((results / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["data", "base", "sft_lr5e-5", "talr_lr5e-5"]
    assert json.loads((results / "selection.json").read_text())["rows/train"] == 20
    base = json.loads((results / "base" / "summary.json").read_text())["final"]
    assert base["val/nll"] > 0 and base["val/answer_nll"] > 0
    talr = json.loads((results / "talr_lr5e-5" / "summary.json").read_text())
    assert talr["method"] == "TALR" and talr["optimizer_steps"] == 5
    assert {"drift/nll_delta", "drift/gsm8k_nll_delta", "val/answer_nll"} <= set(talr["final"])
    assert json.loads((results / "talr_lr5e-5" / "hard_token_probs.json").read_text())["history"]
    assert (results / "talr_lr5e-5" / "token_share.json").exists() and (results / "results.md").exists()
    assert (results / "tradeoff.png").read_bytes()[:4] == b"\x89PNG" and (results / "curves.png").exists()
    assert not list(results.rglob("*.csv")) or all("Patient Note" not in p.read_text() for p in results.rglob("*.csv"))
    mtime = (runs / "sft_lr5e-5" / ".done").stat().st_mtime
    driver.main(argv)  # resumes: nothing is rerun
    assert (runs / "sft_lr5e-5" / ".done").stat().st_mtime == mtime


def test_copied_results_do_not_quote_the_data(tmp_path):
    """The committed copies keep ids, positions and probabilities of the tracked hard tokens, not their text
    (a quote of the training rows), and drop analysis.json's hardest tokens."""
    driver = _load("reproduce_miniature")
    src, dest = tmp_path / "run", tmp_path / "results"
    src.mkdir()
    pairs = [{"example": 0, "position": 5, "token_id": 17, "token": " concentration", "train_index": 0}]
    (src / "hard_token_probs.json").write_text(json.dumps({"num_examples": 1, "pairs": pairs, "history": []}))
    (src / "analysis.json").write_text(json.dumps({"n_examples": 1, "hardest_tokens": [{"token": " Q"}]}))
    driver.copy_results(src, dest, ["hard_token_probs.json", "analysis.json"])
    copied = json.loads((dest / "hard_token_probs.json").read_text())
    assert copied["pairs"] == [{"example": 0, "position": 5, "token_id": 17, "train_index": 0}]
    assert json.loads((dest / "analysis.json").read_text()) == {"n_examples": 1}
    assert "token" in json.loads((src / "hard_token_probs.json").read_text())["pairs"][0]  # the run keeps it
