"""bench/gpu_check.sh: the CPU dry run goes through every step of the GPU acceptance run (bench variants, a real
`talr fit` of a paper config under ModelParallelStrategy with general evaluation, drift and export) and prints the
table; the offline installer picks the right wheel per distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_prints_the_table_and_the_fit_passes(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for variant in ("plain", "sft", "talr", "flow", "sft_chunked"):
        assert f"| {variant} | eager |" in proc.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    fit = result["fit"]
    assert fit["ok"] and fit["steps"] == 4 and fit["losses_finite"] and fit["exported"]
    assert fit["general_evals"] == 2  # before the first step and at the end
    assert result["bench"]["plain:eager"]["speed_ratio"] == 1.0
    assert 0 < result["bench"]["sft_chunked"]["memory_ratio"] < 1  # no (B, T, V) fp32 logits
    config = (tmp_path / "fit_config.yaml").read_text()
    assert "ModelParallelStrategy" in config and "GeneralEvalCallback" in config and "ModelCheckpoint" not in config


def test_installer_prefers_this_pythons_wheel_and_skips_installed(tmp_path):
    names = ["nosuchdist-1.0-py310-none-any.whl", f"nosuchdist-1.0-py3{sys.version_info.minor}-none-any.whl",
             "nosuchdist-1.0-py399-none-any.whl", "torch-0.0.1-py3-none-any.whl", "talr-0.1.0-py3-none-any.whl",
             "otherdist-2.0-py2.py3-none-any.whl"]
    chosen = [w.name for w in gpu_check.select_wheels([tmp_path / n for n in names])]
    assert sorted(chosen) == sorted([names[1], names[4], names[5]])  # torch is installed; talr always from here
