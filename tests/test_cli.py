"""The command line a user meets first: help, one-message errors with the key named and the closest valid
key, no empty run directory after an early failure, progress lines without a terminal, OMP defaults."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import fit_config

from talr.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
COMMANDS = ("fit", "validate", "test", "predict", "average", "evaluate", "report", "analyze")


def run_talr(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talr", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# -- help -------------------------------------------------------------------------------------------------
def test_top_level_help_lists_all_eight_commands_under_the_name_talr():
    done = run_talr("--help", timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: talr <command>") and "__main__" not in done.stdout
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


def test_subcommand_help_is_talr_not_main(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: talr ") and "__main__" not in out


def test_average_init_help_names_the_builtin_model(capsys):
    with pytest.raises(SystemExit):
        main(["average", "--help"])
    assert "builtin:SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_unknown_command_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evalute"])
    assert info.value.code == 2 and "did you mean 'evaluate'?" in capsys.readouterr().err


# -- configuration errors: one message, the key, the closest valid key --------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--trainer.max_step", "3"], "unknown option --trainer.max_step; did you mean --trainer.max_steps?"),
    (["--model.init_args.lrr", "1"], "unknown key model.init_args.lrr (given on the command line); did you mean model.init_args.lr?"),
    (["--data.task.init_args.sourc", "x"],
     "unknown key data.task.init_args.sourc (given on the command line); "
     "did you mean data.task.init_args.source?"),
    (["--model", "talr.methods.TALRR"], "model: there is no class talr.methods.TALRR; did you mean talr.methods.TALR?"),
    (["--model.init_args.lr", "fast"], "model.init_args.lr: expected float, got 'fast' (given on the command line)"),
    (["--data.task.init_args.format", "essay"], "data.task.init_args.format: expected one of 'cot', 'label', got 'essay'"),
])
def test_config_error_is_one_message_naming_the_key(args, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, *args])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"talr fit: error: {expected}" in err
    assert "usage:" not in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"task": {"init_args": {"max_example": {"train": 3}}}}}))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, "--config", str(overlay)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert (f"unknown key data.task.init_args.max_example (set in {overlay}); "
            "did you mean data.task.init_args.max_examples?") in err


@pytest.mark.parametrize("where", ["file", "flag"])
def test_renamed_key_names_the_new_one(where, tmp_path, capsys):
    """`fsdp_layer_classes` became `decoder_layer_classes` (it also chooses what `compile` compiles)."""
    overlay = tmp_path / "old.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"fsdp_layer_classes": ["LlamaDecoderLayer"]}}}))
    args = ["--config", str(overlay)] if where == "file" else ["--model.init_args.fsdp_layer_classes", "[A]"]
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, *args])
    err = capsys.readouterr().err
    source = f"set in {overlay}" if where == "file" else "given on the command line"
    assert info.value.code == 2
    assert (f"unknown key model.init_args.fsdp_layer_classes ({source}); "
            "it was renamed to model.init_args.decoder_layer_classes") in err


# -- data errors: one message, no traceback, no empty run directory ----------------------------------
@pytest.fixture
def bad_csv(tmp_path) -> Path:
    from talr.tasks.medcalc import COLUMNS
    from talr.tasks.medcalc_synthetic import generate_rows

    rows = generate_rows(30, seed=1)
    rows[7]["Patient Note"] = ""
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_data_error_is_one_message_and_leaves_no_empty_version_dir(tmp_path, tiny_model_dir, bad_csv, capsys):
    cfg = fit_config(tmp_path, tiny_model_dir, str(bad_csv))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(cfg)], friendly_errors=True)
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "talr fit: error: bad data: source" in err and "bad.csv" in err
    assert "row 8" in err and "column 'Patient Note'" in err and "Fix:" in err
    assert "Traceback" not in err and "--debug" in err
    leftovers = [p for p in (tmp_path / "run").rglob("*")] if (tmp_path / "run").exists() else []
    assert leftovers == [], leftovers  # the CSV logger's version_0 (config only) is gone


def test_debug_shows_the_exception(tmp_path, tiny_model_dir, bad_csv):
    from talr.tasks.base import DataError

    cfg = fit_config(tmp_path, tiny_model_dir, str(bad_csv))
    with pytest.raises(DataError):
        main(["fit", "--config", str(cfg), "--debug"], friendly_errors=True)


def test_cleanup_keeps_a_directory_with_anything_else(tmp_path):
    from types import SimpleNamespace

    from talr.trainer_cli import remove_empty_log_dirs

    empty, used = tmp_path / "csv" / "version_0", tmp_path / "csv" / "version_1"
    for d in (empty, used):
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("x: 1\n")
        (d / "metrics.csv").write_text("epoch,step\n")
    (used / "summary.json").write_text("{}")
    loggers = [SimpleNamespace(log_dir=str(d), save_dir=str(tmp_path)) for d in (empty, used)]
    removed = remove_empty_log_dirs(SimpleNamespace(is_global_zero=True, loggers=loggers), since=0.0)
    assert removed == [empty] and not empty.exists() and (used / "config.yaml").exists()
    rank1 = SimpleNamespace(is_global_zero=False, loggers=loggers[1:])
    assert remove_empty_log_dirs(rank1, since=0.0) == []


# -- progress without a terminal ----------------------------------------------------------------------
def test_progress_is_logged_every_n_steps_without_a_terminal(tmp_path, tiny_model_dir, caplog):
    # pytest captures stdout, so it is not a terminal: the CLI puts LogProgress in place of the TQDM bar
    cfg = fit_config(tmp_path, tiny_model_dir, "synthetic", trainer={"enable_progress_bar": True, "max_steps": 4},
                     method_args={"baseline_eval": False})
    with caplog.at_level(logging.INFO, logger="talr.progress"):
        main(["fit", "--config", str(cfg)])
    lines = [r.getMessage() for r in caplog.records if r.name == "talr.progress"]
    assert any(line.startswith("data ready: 8 train, 4 validation, 4 test examples") for line in lines), lines
    assert any(line.startswith("ready to train: 4 optimizer steps") for line in lines), lines
    steps = [line for line in lines if line.startswith("train step")]
    assert [s.split(":")[1].split()[0] for s in steps] == ["1/4", "2/4", "3/4", "4/4"]  # 4 steps: every step
    assert "ETA" in steps[0] and "train/loss" in steps[0]
    assert not any("sanity" in line for line in lines)  # no sanity-check pass before the baseline


# -- environment --------------------------------------------------------------------------------------
def test_omp_wait_policy_is_passive_unless_set():
    code = "import talr.cli, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE"
