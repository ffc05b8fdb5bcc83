"""`talr analyze` writes, by default, where notebooks/figure3_tokens.ipynb reads (paper_figures/analysis)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notebook_default(variable: str) -> str:
    cells = json.loads((ROOT / "notebooks" / "figure3_tokens.ipynb").read_text())["cells"]
    source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return re.search(rf'os\.environ\.get\("{variable}", "([^"]+)"\)', source).group(1)


def test_analyze_default_output_is_the_notebooks_input(tmp_path, tiny_model_dir, monkeypatch):
    from talr.cli import main

    monkeypatch.chdir(tmp_path)
    main(["analyze", "--model", str(tiny_model_dir), "--task", "medcalc", "--source", "synthetic", "--format", "label",
          "--limit", "2", "--max-length", "512", "--no-progress"])
    folder = tmp_path / notebook_default("TALR_ANALYSIS")
    written = sorted(folder.glob("*.json"))
    assert [p.name for p in written] == [f"{tiny_model_dir.name}_medcalc_label_train.json"]
    assert json.loads(written[0].read_text())["n_examples"] == 2
