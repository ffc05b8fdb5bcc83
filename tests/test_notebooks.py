"""The figure notebooks run top to bottom on the fixture runs and write PNG + PDF figures."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
NOTEBOOKS = {
    "figure1_lr_sweep": ["figure1_lr_sweep"],
    "figure2_methods": ["figure2_methods", "figure2_pareto"],
    "figure3_tokens": ["figure3_tokens", "figure3_hard_tokens"],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_writes_figures(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("TALR_RUNS", str(FIXTURES / "summaries"))
    monkeypatch.setenv("TALR_ANALYSIS", str(FIXTURES / "analysis.json"))
    monkeypatch.setenv("TALR_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for stem in NOTEBOOKS[name]:
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name != "figure3_tokens":
        assert "12 runs from" in outputs
    else:
        assert "1 analyses, 2 token-share histories, 1 hard-token histories" in outputs
