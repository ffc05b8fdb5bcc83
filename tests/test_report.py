"""`talr report` on hand-written fixture summaries (tests/fixtures/summaries): exact table values, merging of
a run's files (fit + test + general.json), run identity from paths and config.yaml, paper numbers, plots."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from talr import paper_numbers
from talr.report import fmt_lr, load_wandb_csv, pareto_front, report

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "summaries"
approx = pytest.approx


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return report([str(FIXTURES)], tmp_path_factory.mktemp("report"))


def cell(rows, **key):
    hits = [r for r in rows if all(r[k] == v or (isinstance(v, float) and r[k] == approx(v)) for k, v in key.items())]
    assert len(hits) == 1, (key, hits)
    return hits[0]


def test_per_run_rows(result):
    rows = result["runs"]
    assert len(rows) == 12
    # fit summary (val/acc, general, drift) merged with <run>/test/summary.json (test/acc wins over val/acc)
    r = cell(rows, domain="medcalc", format="cot", model="Qwen2.5-3B-Instruct", method="sft", lr=1e-6)
    assert (r["domain_score"], r["domain_metric"], r["general_score"]) == (approx(0.48), "test/acc", approx(0.62))
    assert (r["ifeval"], r["gsm8k"], r["humaneval"], r["drift"]) == (approx(0.60), approx(0.70), approx(0.56), approx(0.05))
    assert (r["baseline_domain"], r["baseline_general"]) == (approx(0.20), approx(0.65))
    assert (r["paper_domain"], r["paper_general"]) == (0.495, 0.620)  # the paper's per-model numbers
    assert r["sources"].count("summary.json") == 2
    # only val/acc: used as the domain score, and said so
    r = cell(rows, model="Qwen2.5-3B-Instruct", method="sft", lr=5e-6)
    assert (r["domain_score"], r["domain_metric"]) == (approx(0.52), "val/acc")
    # WiSE-FT: identity from wiseft_lr1e-6/alpha_0.50, general scores from `talr evaluate`'s general.json
    r = cell(rows, method="wiseft")
    assert (r["model"], r["lr"], r["alpha"]) == ("Qwen2.5-3B-Instruct", approx(1e-6), 0.5)
    assert (r["domain_score"], r["general_score"], r["humaneval"]) == (approx(0.30), approx(0.66), approx(0.60))
    assert r["drift"] == approx(0.03)  # from drift.json beside the summary
    # a sweep run outside the paper layout: identity from the config.yaml LightningCLI saved; tau 1 -> talr_tau1
    r = cell(rows, method="talr_tau1")
    assert (r["domain"], r["format"], r["model"], r["lr"]) == ("medcalc", "label", "Qwen2.5-3B-Instruct", approx(5e-6))
    # ESCI's metric is test/accuracy
    r = cell(rows, domain="esci")
    assert (r["domain_score"], r["domain_metric"], r["general_score"]) == (approx(0.70), "test/accuracy", approx(0.75))
    assert r["paper_domain"] is None


def test_mean_over_models(result):
    means = result["means"]
    assert len(means) == 9
    expected = {  # (method, lr): (n_models, domain, general, paper domain, paper general)
        ("sft", 1e-6): (2, 0.52, 0.70, 0.534, 0.692),
        ("sft", 5e-6): (2, 0.55, 0.42, 0.558, 0.381),
        ("sft", 2e-5): (1, 0.50, 0.20, None, None),
        ("talr", 1e-6): (2, 0.475, 0.73, 0.501, 0.717),
        ("talr", 5e-6): (1, 0.50, 0.50, 0.542, 0.502),
        ("l2", 1e-6): (1, 0.53, 0.79, 0.506, 0.697),
        ("wiseft", 1e-6): (1, 0.30, 0.66, 0.198, 0.727),
    }
    for (method, lr), (n, dom, gen, pd, pg) in expected.items():
        r = cell(means, domain="medcalc", format="cot", method=method, lr=lr)
        assert (r["n_models"], r["domain_score"], r["general_score"]) == (n, approx(dom), approx(gen)), (method, lr)
        assert (r["paper_domain"], r["paper_general"]) == (pd, pg)
    r = cell(means, domain="medcalc", format="cot", method="sft", lr=1e-6)
    assert (r["ifeval"], r["gsm8k"], r["humaneval"], r["drift"]) == (approx(0.70), approx(0.80), approx(0.60), approx(0.035))
    assert cell(means, method="sft", lr=5e-6, format="cot")["domain_metric"] == "test/acc,val/acc"
    front = {(r["method"], r["lr"]) for r in means if r["pareto"] and (r["domain"], r["format"]) == ("medcalc", "cot")}
    assert front == {("l2", 1e-6), ("sft", 5e-6)}


def test_files(result, tmp_path):
    out = result["files"][0].parent
    names = {p.name for p in result["files"]}
    assert names == {"runs.csv", "means.csv", "tables.md", "pareto.png", "pareto.pdf"}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pareto.pdf").read_bytes()[:5] == b"%PDF-"
    with (out / "means.csv").open() as f:
        means = list(csv.DictReader(f))
    row = next(r for r in means if (r["format"], r["method"], r["lr"]) == ("cot", "talr", "1e-06"))
    assert float(row["domain_score"]) == approx(0.475) and float(row["paper_general"]) == 0.717
    md = (out / "tables.md").read_text()
    assert "| LR 1e-6 | 0.520 / 0.700 (paper 0.534 / 0.692) |" in md
    assert "| LR 2e-5 | 0.500 / 0.200 |" in md


def test_cli(tmp_path, capsys):
    from talr.cli import main

    main(["report", str(FIXTURES / "medcalc"), "--out", str(tmp_path), "--no-plot"])
    assert "0.520 / 0.700" in capsys.readouterr().out
    assert not (tmp_path / "pareto.png").exists() and (tmp_path / "runs.csv").exists()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])


def test_wandb_csv(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("Name,State,val/acc,general/score,lr\n"
                    "medcalc-cot-Qwen3-4B-talr-lr5e-6,finished,0.5,0.6,5e-06\n"
                    "other-run,finished,0.4,,1e-06\n")
    runs = load_wandb_csv(path)
    assert {k: runs[0][k] for k in ("domain", "format", "model", "method", "lr")} == {
        "domain": "medcalc", "format": "cot", "model": "Qwen3-4B", "method": "talr", "lr": 5e-6}
    assert runs[0]["metrics"] == {"val/acc": 0.5, "general/score": 0.6}
    assert runs[1]["lr"] == 1e-6 and runs[1]["metrics"] == {"val/acc": 0.4}
    out = report([], tmp_path / "r", wandb_csvs=[str(path)])  # a run of unknown domain and method plots too
    assert cell(out["runs"], method="talr")["paper_domain"] is None  # Qwen3-4B TALR is reported at 1e-6 only


def test_helpers():
    assert [fmt_lr(x) for x in (1e-6, 5e-6, 2e-5, 1.5e-4, 2e-4)] == ["1e-6", "5e-6", "2e-5", "1.5e-4", "2e-4"]
    assert pareto_front([(0.5, 0.5), (0.6, 0.4), (0.4, 0.4), (None, 0.9), (0.5, 0.5)]) == [True, True, False, False, True]
    assert paper_numbers.lookup("medcalc", "Qwen/Qwen3-4B", "talr", 1e-6) == (0.489, 0.788)
    assert paper_numbers.lookup("medcalc", paper_numbers.MEAN, "lora", 5e-6) is None
    assert len(paper_numbers.rows()) == len(paper_numbers.REPORTED) == 14
