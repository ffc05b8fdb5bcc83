"""What a run leaves at its end (issue 16 items 2 and 8): the final model is always evaluated — also when
`--trainer.max_steps` stops mid-epoch, where Lightning does not validate — and exactly once; a CSV logger left
without a name writes under the method's name (a method overlay's run is not filed under `sft/`); the end-of-fit
summary print shows before → after metrics and drift, not row counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import fit_config

from talr.cli import main

ROOT = Path(__file__).resolve().parents[1]


def unnamed_config(tmp_path, model_dir, **trainer) -> Path:
    path = fit_config(tmp_path, model_dir, "synthetic", trainer={"max_steps": -1, "max_epochs": 1, **trainer},
                      data={"batch_size": 2}, task={"max_examples": {"train": 8, "validation": 4, "test": 1}})
    cfg = yaml.safe_load(path.read_text())
    del cfg["trainer"]["logger"]["init_args"]["name"]
    cfg["trainer"]["callbacks"] = [{"class_path": "talr.callbacks.RunSummary"},
                                   {"class_path": "talr.general.CodeLengthDriftCallback",
                                    "init_args": {"every_n_steps": 5, "num_prompts": 2, "max_new_tokens": 4}}]
    path.write_text(yaml.safe_dump(cfg))
    return path


def val_rows(run: Path) -> list[dict]:
    import csv

    with (run / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("val/nll") not in (None, "")]


@pytest.mark.slow
def test_max_steps_mid_epoch_still_evaluates_the_final_model_once_under_the_method_name(tmp_path, tiny_model_dir, capsys):
    config = unnamed_config(tmp_path, tiny_model_dir)
    main(["fit", "--config", str(config), "--config", str(ROOT / "configs" / "methods" / "talr.yaml"),
          "--trainer.max_steps", "2"])  # 4 batches per epoch: stops mid-epoch
    run = tmp_path / "run" / "talr" / "version_0"  # named after the method, not "lightning_logs" or "sft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "TALR" and summary["optimizer_steps"] == 2
    for key in ("val/nll", "val/acc"):
        assert key in summary["baseline"] and key in summary["final"]
    assert summary["final"]["val/nll"] != summary["baseline"]["val/nll"]  # the trained model, not the baseline
    assert [int(r["step"]) for r in val_rows(run)] == [0, 2]  # baseline, then the final model once
    printed = capsys.readouterr().out.split("== talr fit summary")[-1]
    assert "val/nll" in printed and "drift/nll_delta" in printed
    assert summary["final"]["drift/nll_delta"] != 0  # measured on the final model (every_n_steps would not)
    assert "val/n " not in printed  # a row count is not a before/after metric


@pytest.mark.slow
def test_full_epoch_is_not_evaluated_twice(tmp_path, tiny_model_dir):
    main(["fit", "--config", str(unnamed_config(tmp_path, tiny_model_dir))])
    run = tmp_path / "run" / "sft" / "version_0"
    # baseline, then the epoch end (Lightning logs it at step 3, after 4 optimizer steps); no extra final pass
    assert [int(r["step"]) for r in val_rows(run)] == [0, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert "val/nll" in summary["final"]


def test_a_named_run_keeps_its_name(tmp_path):
    from jsonargparse import Namespace

    from talr.trainer_cli import name_run_after_method

    def config(name):
        return Namespace(trainer=Namespace(logger=Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                                            init_args=Namespace(save_dir="runs", name=name))),
                         model=Namespace(class_path="talr.methods.L2Init"))

    named, default = config("mine"), config("lightning_logs")
    name_run_after_method(named)
    name_run_after_method(default)
    assert named.trainer.logger.init_args.name == "mine"
    assert default.trainer.logger.init_args.name == "l2init"
