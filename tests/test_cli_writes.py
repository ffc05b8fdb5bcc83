"""Where talr writes: a quickstart-sized run (`fit`, `evaluate --limit 1`, `report`) with HOME, TMPDIR and the
working directory pointed at empty folders writes only into the run directory (under ./runs) and $TALR_CACHE."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA, require
from helpers import fit_config

ROOT = Path(__file__).resolve().parents[1]
# Variables that would move a cache away from its default: the test must see the defaults.
MOVES_CACHES = ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME",
                "XDG_CONFIG_HOME", "MPLCONFIGDIR", "NLTK_DATA", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "TALR_CACHE", "PYTHONPYCACHEPREFIX")


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


@pytest.mark.slow
def test_fit_evaluate_report_write_only_the_run_directory_and_talr_cache(tmp_path, tiny_model_dir):
    data = require(SHARED_DATA / "ifeval")
    home, tmp, cwd, cache, inputs = (tmp_path / d for d in ("home", "tmp", "cwd", "cache", "inputs"))
    for d in (home, tmp, cwd, inputs):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in MOVES_CACHES}
    env.update(HOME=str(home), TMPDIR=str(tmp), TALR_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run_root = cwd / "runs" / "check"
    cfg = fit_config(inputs, tiny_model_dir, "synthetic", trainer={
        "default_root_dir": str(run_root), "max_steps": 2,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_root), "name": "sft"}},
        "callbacks": [{"class_path": "talr.callbacks.RunSummary"}, {"class_path": "talr.callbacks.ExportHF"}]})

    def talr(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "talr", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    talr("fit", "--config", str(cfg))
    run = run_root / "sft" / "version_0"
    talr("evaluate", "--model", str(run / "hf"), "--tasks", "ifeval", "--limit", "1", "--max-gen-toks", "8",
         "--batch-size", "1", "--data-dir", str(data.parent))
    talr("report")  # defaults: reads ./runs, writes ./runs/report

    assert (run / "general.json").exists()  # evaluate's default output, beside the run
    with (cwd / "runs" / "report" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["general_score"] != ""  # report found it without being told
    assert files_under(home) == []
    assert files_under(tmp) == []  # lm-eval's temporary task YAMLs are removed
    assert [p.name for p in cwd.iterdir()] == ["runs"]
    assert (cache / "hf_datasets").is_dir()  # the datasets cache of the local IFEval file
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
