"""Failure behaviour: non-finite training, bad data, bad configs, interrupted checkpoint writes, fuzzing."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from helpers import fit_config, read_metrics, series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talr.cli import main
from talr.data.sources import read_source
from talr.methods.sft import NonFiniteError
from talr.tasks.base import DataError
from talr.tasks.medcalc import COLUMNS, MedCalc
from talr.tasks.medcalc_scoring import extract_answer, is_correct
from talr.tasks.medcalc_synthetic import generate_rows

ROOT = Path(__file__).resolve().parents[1]


# -- non-finite training -----------------------------------------------------------------------
def nan_config(tmp_path, model_dir, policy):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_last": True}}]
    return fit_config(tmp_path, model_dir, "synthetic", method="helpers.NaNAtStep",
                      trainer={"max_steps": 4, "limit_val_batches": 0, "enable_checkpointing": True, "callbacks": callbacks},
                      method_args={"nan_step": 2, "nonfinite": policy, "baseline_eval": False},
                      data={"batch_size": 2, "max_length": 512})


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(NonFiniteError, match="optimizer step 2"):
        main(["fit", "--config", str(nan_config(tmp_path, tiny_model_dir, "stop"))])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_policy_counts_and_keeps_weights_finite(tmp_path, tiny_model_dir):
    main(["fit", "--config", str(nan_config(tmp_path, tiny_model_dir, "skip"))])
    assert max(series(read_metrics(tmp_path), "train/skipped_steps")) == 1.0
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["talr"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# -- bad data ----------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def rows():
    return generate_rows(30, seed=1)


def test_missing_column_names_file_and_column(tmp_path, rows):
    path = write_csv(tmp_path / "d.csv", rows, [c for c in COLUMNS if c != "Upper Limit"])
    with pytest.raises(DataError, match=r"d\.csv.*Upper Limit"):
        MedCalc(source=str(path)).load_splits()


@pytest.mark.parametrize("column,value,message", [
    ("Patient Note", "", "empty value"),
    ("Calculator ID", "six", "not an integer"),
    ("Lower Limit", "n/a", "not a number"),
    ("Ground Truth Answer", "999999", "does not score correct"),
])
def test_bad_field_names_file_row_and_column(tmp_path, rows, column, value, message):
    rows[7][column] = value
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as info:
        MedCalc(source=str(path)).load_splits()
    text = str(info.value)
    assert "bad.csv" in text and f"row {rows[7]['Row Number']}" in text and column in text and message in text


def test_unknown_calculator_without_output_type_is_a_clear_error(tmp_path, rows):
    rows[3]["Calculator ID"], rows[3]["Output Type"] = "999", "fraction"
    with pytest.raises(DataError, match="999"):
        MedCalc(source=str(write_csv(tmp_path / "d.csv", rows))).load_splits()


def test_empty_split_and_wrong_file_type(tmp_path, rows):
    with pytest.raises(DataError, match="empty"):
        MedCalc(source=str(write_csv(tmp_path / "empty.csv", []))).load_splits()
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="unsupported file type"):
        MedCalc(source=str(tmp_path / "data.xlsx")).load_splits()
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl.*row 2"):
        read_source(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        MedCalc(source="./no/such/file.csv").load_splits()


def test_data_counts_reach_the_run_summary(tmp_path, tiny_model_dir):
    import json

    cfg = fit_config(tmp_path, tiny_model_dir, "synthetic",
                     trainer={"max_steps": 1, "limit_val_batches": 0,
                              "callbacks": [{"class_path": "talr.callbacks.RunSummary"}]},
                     method_args={"baseline_eval": False}, data={"max_length": 250})
    main(["fit", "--config", str(cfg)])
    summary = json.loads(next((tmp_path / "run" / "csv").glob("version_*/summary.json")).read_text())
    data = summary["data"]
    assert data["rows/train"] == 8 and data["train/kept"] + data.get("train/skipped_overlong", 0) == 8
    assert data.get("train/truncated", 0) + data.get("train/skipped_overlong", 0) > 0  # 250 tokens is tight


# -- bad configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,named", [
    ("--model.init_args.lr", "fast", "lr"),
    ("--data.task.init_args.format", "essay", "format"),
    ("--trainer.max_step", "3", "max_step"),
])
def test_bad_config_values_fail_before_loading_with_the_key_named(flag, value, named, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), flag, value])
    assert info.value.code != 0 and named in capsys.readouterr().err


def test_strategy_that_cannot_run_here_fails_before_model_loading(tmp_path, monkeypatch):
    import talr.methods.sft as sft

    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("model loaded before the config was checked"))
    with pytest.raises(Exception, match="(?i)cuda|gpu"):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.accelerator", "gpu",
              f"--trainer.default_root_dir={tmp_path}"])


# -- checkpoints -------------------------------------------------------------------------------
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    io = TorchCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    import fsspec.implementations.local as local

    def broken_write(self, data):  # the disk fills up halfway through the new checkpoint
        raise OSError("No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", broken_write)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))


# -- fuzzing -----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(generation=st.text(max_size=300), answer=st.text(max_size=40))
def test_scorer_never_crashes_on_model_output(generation, answer):
    example = generate_rows(1, seed=3)[0]
    assert isinstance(extract_answer(generation), str)
    assert is_correct(answer, example) in (True, False)


def test_loader_on_randomly_corrupted_rows_only_raises_data_errors(tmp_path):
    rng = random.Random(0)
    junk = ["", " ", "nan", "-1", "1e309", "12/31/1999", "('3 weeks', '2 days')", "ä☃", "0x10", "None", "[]"]
    for trial in range(40):
        rows = generate_rows(12, seed=trial)
        for _ in range(rng.randint(1, 4)):
            row = rng.choice(rows)
            row[rng.choice(COLUMNS)] = rng.choice(junk)
        path = write_csv(tmp_path / f"fuzz{trial}.csv", rows)
        try:
            splits = MedCalc(source=str(path), format=rng.choice(["cot", "label"])).load_splits()
        except DataError as e:
            assert "fuzz" in str(e)  # every error names the file
            continue
        for split_rows in splits.values():
            for row in split_rows:
                assert is_correct(str(row["Ground Truth Answer"]), row)
