"""The miniature reproduction driver (scripts/reproduce_miniature.py) on a tiny random model and real rows:
its steps run the real `python -m talr` commands, results are collected, and a second call resumes."""

from __future__ import annotations

import csv
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


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, medcalc_csv) -> Path:
    """configs/miniature/base.yaml shrunk to seconds: 8 train rows, 4 held-out, 2 IFEval prompts."""
    cfg = yaml.safe_load((ROOT / "configs" / "miniature" / "base.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("GeneralEvalCallback"):
            cb["init_args"].update(limit=2, max_gen_toks=8, data_dir=str(ROOT.parent / "shared" / "data"))
        if cb["class_path"].endswith("CodeLengthDriftCallback"):
            cb["init_args"].update(every_n_steps=1, num_prompts=2, max_new_tokens=4)
    cfg["model"]["init_args"].update(max_new_tokens=4)
    cfg["data"]["task"]["init_args"].update(source=str(medcalc_csv), max_examples={"train": 8, "validation": 4, "test": 0})
    path = tmp_path_factory.mktemp("miniature") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_covers_the_issue():
    driver = _load("reproduce_miniature")
    args = driver.build_parser().parse_args([])
    names = [name for name, _ in driver.Miniature(args).plan()]
    assert names == ["base", "sft_lr1e-5", "sft_lr5e-5", "sft_lr2e-4", "talr_lr2e-4", "flow_lr2e-4",
                     "l2_lr2e-4", "lora_lr2e-4", "wiseft_lr2e-4"]


def test_miniature_runs_collects_and_resumes(tmp_path, tiny_config, tiny_model_dir, capsys):
    driver = _load("reproduce_miniature")
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--config", str(tiny_config), "--model", str(tiny_model_dir), "--lrs", "1e-3,5e-2",
            "--runs", str(runs), "--results", str(results), "--only", "base,sft_lr5e-2,wiseft_lr5e-2"]
    driver.main(argv)

    steps = json.loads((results / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["base", "sft_lr5e-2", "wiseft_lr5e-2"]
    assert steps[2]["dir"].endswith("medcalc/label/" + tiny_model_dir.name + "/wiseft_lr5e-2/alpha_0.50")
    base = json.loads((results / "base" / "summary.json").read_text())
    assert base["final"]["val/n"] == 4 and base["final"]["val/nll"] > 0
    assert json.loads((results / "base" / "general.json").read_text())["settings"]["limit"] == 2
    analysis = json.loads((results / "base" / "analysis.json").read_text())
    assert analysis["n_examples"] == 8 and "hardest_tokens" not in analysis  # no quotes of the data committed
    assert "hardest_tokens" in json.loads((runs / "base" / "analysis.json").read_text())
    # SFT at a large LR moved the model: its held-out NLL and drift differ from the base; WiSE-FT's drift
    # (computed by the driver) is measured against the same base answers
    with open(results / "results.csv", newline="") as f:
        rows = {r["step"]: r for r in csv.DictReader(f)}
    assert float(rows["base"]["drift/nll_delta"]) == 0.0
    assert float(rows["sft_lr5e-2"]["val/nll"]) != float(rows["base"]["val/nll"])
    assert float(rows["sft_lr5e-2"]["drift/nll_delta"]) != 0.0
    assert float(rows["wiseft_lr5e-2"]["drift/nll_delta"]) != 0.0
    assert int(rows["sft_lr5e-2"]["optimizer_steps"]) == 2 and int(rows["sft_lr5e-2"]["tokens_seen"]) > 0
    assert rows["wiseft_lr5e-2"]["tokens_seen"] == ""
    table = [line for line in (results / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| base", "| sft_lr5e-2", "| wiseft_lr5e-2"]
    assert (results / "miniature.png").stat().st_size > 0 and (results / "report" / "tables.md").exists()
    report_rows = list(csv.DictReader(open(results / "report" / "runs.csv", newline="")))
    assert {(r["method"], r["alpha"]) for r in report_rows} == {("sft", ""), ("wiseft", "0.5")}
    assert not list(results.rglob("*.safetensors"))  # weights stay in the working directory

    # second call: everything is done -> skipped; an unfinished step is wiped and run again
    capsys.readouterr()
    marker = runs / "sft_lr5e-2" / ".done"
    before = marker.stat().st_mtime
    (runs / "wiseft_lr5e-2" / ".done").unlink()
    (runs / "wiseft_lr5e-2" / "stale.txt").write_text("left by an interrupted run")
    driver.main(argv)
    out = capsys.readouterr().out
    assert "base: done earlier, skipped" in out and "sft_lr5e-2: done earlier, skipped" in out
    assert "wiseft_lr5e-2: running" in out
    assert marker.stat().st_mtime == before
    assert not (runs / "wiseft_lr5e-2" / "stale.txt").exists() and (runs / "wiseft_lr5e-2" / ".done").exists()


def test_failed_step_names_the_command(tmp_path, tiny_config):
    driver = _load("reproduce_miniature")
    argv = ["--config", str(tiny_config), "--model", str(tmp_path / "no-such-model"), "--runs", str(tmp_path / "r"),
            "--results", str(tmp_path / "res"), "--only", "wiseft_lr2e-4"]
    with pytest.raises(SystemExit, match="needs .*sft_lr2e-4/hf"):
        driver.main(argv)
    assert not (tmp_path / "r" / "wiseft_lr2e-4" / ".done").exists()


def test_cot_overlay_and_method_choice():
    driver = _load("reproduce_miniature")
    configs = ["--config", str(ROOT / "configs/miniature/base.yaml"), "--config", str(ROOT / "configs/miniature/cot.yaml")]
    mini = driver.Miniature(driver.build_parser().parse_args([*configs, "--methods", "talr"]))
    assert [name for name, _ in mini.plan()] == ["base", "sft_lr1e-5", "sft_lr5e-5", "sft_lr2e-4", "talr_lr2e-4"]
    task = mini.config["data"]["task"]["init_args"]
    assert task["format"] == "cot" and task["source"].endswith("test_data.csv")  # overlay merged into the base
    assert mini.config["data"]["max_length"] == 640 and mini.config["data"]["batch_size"] == 4
    assert mini.result_dir("talr_lr2e-4") == "medcalc/cot/SmolLM2-135M-Instruct/talr_lr2e-4"
    assert mini.lightning("fit", "x")[:5] == ["fit", *configs]
    with pytest.raises(SystemExit):
        driver.main([*configs, "--methods", "talr,bogus", "--only", "none"])
