"""Interrupted runs resume to the same weights and logged losses as an uninterrupted run (CPU, fixed
seed): SIGTERM mid-epoch (checkpoint written on the signal) and a hard kill between checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fit_config
from safetensors.torch import load_file

from talr.cli import main

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, model_dir: Path, method: str = "talr.methods.SFT", extra_callbacks=(), *, rows: int = 8,
           max_steps: int = 6, every: int = 2, accumulate: int = 1, workers: int = 0) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": every, "save_last": True, "save_top_k": -1}},
        {"class_path": "talr.callbacks.CheckpointOnSigterm"},
        {"class_path": "talr.callbacks.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf")}},
        *extra_callbacks,
    ]
    # by default 8 examples, batch 2: 4 batches per epoch, so 6 steps cross an epoch boundary
    path = fit_config(tmp_path, model_dir, "synthetic", method=method,
                      trainer={"max_steps": max_steps, "enable_checkpointing": True, "limit_val_batches": 0,
                               "accumulate_grad_batches": accumulate, "callbacks": callbacks},
                      method_args={"baseline_eval": False, "lr": 1e-3, "warmup_ratio": 0.2},
                      data={"batch_size": 2, "max_length": 512, "num_workers": workers},
                      task={"max_examples": {"train": rows, "validation": 4, "test": 4}})
    return path


def losses_by_step(tmp_path: Path) -> dict[int, float]:
    out = {}
    for f in sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv")):
        import csv

        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", str(config(tmp, tiny_model_dir))])
    return weights(tmp), losses_by_step(tmp)


def assert_same_run(tmp_path, reference, steps: int = 6):
    ref_weights, ref_losses = reference
    got = weights(tmp_path)
    assert got.keys() == ref_weights.keys()
    for k in got:
        assert torch.equal(got[k], ref_weights[k]), f"{k} differs after resume"
    losses = losses_by_step(tmp_path)
    assert set(losses) == set(ref_losses) == set(range(steps))
    for step, value in ref_losses.items():
        assert losses[step] == value, step


def test_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path, tiny_model_dir, reference):
    cfg = yaml.safe_load(config(tmp_path, tiny_model_dir).read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "helpers.SigtermAt", "init_args": {"step": 2}})
    interrupted = tmp_path / "interrupted.yaml"
    interrupted.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(interrupted)])
    assert not (tmp_path / "hf").exists()
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # written on the signal, not by the every-2-steps schedule
    main(["fit", "--config", str(config(tmp_path, tiny_model_dir)), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    assert_same_run(tmp_path, reference)


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "talr", "fit", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_hard_kill_between_checkpoints_then_resume(tmp_path, tiny_model_dir):
    """All three runs are separate processes (as in real life); every run is compared bit for bit."""
    ref = tmp_path / "reference"
    ref.mkdir()
    assert run_cli("--config", config(ref, tiny_model_dir)).returncode == 0
    cfg = yaml.safe_load(config(tmp_path, tiny_model_dir).read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "helpers.HardKillAt", "init_args": {"step": 5}})
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(cfg))
    proc = run_cli("--config", killed)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run_cli("--config", config(tmp_path, tiny_model_dir), "--ckpt_path", tmp_path / "ckpt" / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path, (weights(ref), losses_by_step(ref)))


def test_flow_weights_are_restored_not_recomputed(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, method="talr.methods.FLOW")
    main(["fit", "--config", str(cfg), "--model.init_args.flow_cache", ""])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved = ckpt["state_dict"]["flow_weights"]
    assert saved.shape == (8,) and torch.all(saved > 0)

    from talr.methods import FLOW

    module = FLOW(pretrained=str(tiny_model_dir))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    assert torch.equal(module.flow_weights, saved)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model with attention dropout: its training forward passes draw from the torch RNG."""
    from conftest import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama-dropout")
    make_tiny_model(tokenizer, attention_dropout=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# (train rows, accumulate, checkpoint every n steps, killed at step, max steps, dropout, DataLoader workers).
# Batch 2 throughout.
LATER_EPOCH = {
    # 4 batches/epoch: epoch 2 = steps 8-11; checkpoint at step 9, killed after 2 batches of epoch 2
    "even": (8, 1, 3, 10, 12, False, 0),
    # 5 micro-batches/epoch (the last of 1 row), windows of 2, 2, 1: epoch 2 = steps 6-8; checkpoint at step 7
    # (2 batches into epoch 2), killed 4 batches into it
    "uneven-accumulate2": (9, 2, 7, 8, 9, False, 0),
    # as "even", with attention dropout: the resumed run must also draw the same dropout masks
    "dropout": (8, 1, 3, 10, 12, True, 0),
    # checkpoint at the end of epoch 1 (step 8), killed in epoch 2; a worker process reads the sampler as soon
    # as the iterator exists, which Lightning creates before it sets the resumed run's epoch
    "epoch-end-workers": (8, 1, 4, 10, 12, False, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LATER_EPOCH))
def test_hard_kill_in_a_later_epoch_then_resume_in_a_fresh_process(tmp_path, tiny_model_dir, dropout_model_dir, case):
    """The resumed process restores the epoch's order from the checkpoint (Lightning creates the iterator
    before it calls `set_epoch`) and each rank's RNG state; three separate processes, compared bit for bit."""
    rows, accumulate, every, kill, steps, dropout, workers = LATER_EPOCH[case]
    model_dir = dropout_model_dir if dropout else tiny_model_dir
    make = lambda path: config(path, model_dir, rows=rows, accumulate=accumulate, every=every, max_steps=steps,  # noqa: E731
                               workers=workers)
    ref = tmp_path / "reference"
    ref.mkdir()
    proc = run_cli("--config", make(ref))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(make(tmp_path).read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "helpers.HardKillAt", "init_args": {"step": kill}})
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(cfg))
    proc = run_cli("--config", killed)
    assert proc.returncode == 137, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    if every == 4:  # at the end of epoch 1
        assert position == {"epoch": 1, "consumed": 4}, position
    else:
        assert ckpt["epoch"] == 2 and position["epoch"] == 2 and 0 < position["consumed"] < -(-rows // 2), position
    resumed = run_cli("--config", make(tmp_path), "--ckpt_path", tmp_path / "ckpt" / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path, (weights(ref), losses_by_step(ref)), steps=steps)
