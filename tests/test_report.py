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
    assert names == {"runs.csv", "experiments.csv", "means.csv", "tables.md", "pareto.png", "pareto.pdf"}
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
    assert paper_numbers.lookup("medcalc", "Qwen2.5-3B-Instruct", "flow", 1e-6) == (0.364, 0.597)
    assert paper_numbers.lookup("medcalc", "Qwen3-4B", "l2", 1e-6) == (0.469, 0.796)
    assert paper_numbers.lookup("medcalc", paper_numbers.MEAN, "lora", 5e-6) is None
    assert len(paper_numbers.rows()) == len(paper_numbers.REPORTED) == 22  # 10 means + 2 models x 6 methods at 1e-6


# -- experiments, repeats, and what was merged -------------------------------------------------------
def make_run(root: Path, name: str, *, source="synthetic", steps=16, seed=0, lr=1e-4, acc=0.5, general=None,
             drift=0.1, method="talr.methods.SFT", max_examples=64, mtime=None) -> Path:
    """A run directory as `talr fit` leaves it: summary.json and the config.yaml LightningCLI saved."""
    import json

    import yaml

    run = root / name
    run.mkdir(parents=True)
    config = {"seed_everything": seed,
              "trainer": {"max_epochs": 1, "max_steps": -1, "accumulate_grad_batches": 1, "devices": 1},
              "model": {"class_path": method, "init_args": {"pretrained": "builtin:SmolLM2-135M-Instruct", "lr": lr,
                                                            "max_new_tokens": 24, "loss_chunk_size": 1024}},
              "data": {"task": {"class_path": "talr.tasks.MedCalc",
                                "init_args": {"source": source, "format": "label",
                                              "max_examples": {"train": max_examples, "validation": 16}}},
                       "max_length": 512, "batch_size": 4, "seed": 0}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    final = {"val/acc": acc, "val/nll": 1.0, "drift/nll_delta": drift}
    if general is not None:
        final["general/score"] = general
    summary = {"method": method.rsplit(".", 1)[-1], "task": {"domain": "medcalc", "format": "label", "source": source},
               "hparams": {"pretrained": "builtin:SmolLM2-135M-Instruct", "lr": lr, "max_new_tokens": 24},
               "data": {"rows/train": max_examples, "rows/validation": 16}, "baseline": {"val/acc": 0.0},
               "final": final, "optimizer_steps": steps, "wall_time_s/fit": 100.0}
    (run / "summary.json").write_text(json.dumps(summary))
    if mtime is not None:
        import os

        os.utime(run / "summary.json", (mtime, mtime))
    return run


def test_different_experiments_are_not_merged(tmp_path, caplog):
    # the case: the synthetic quickstart (16 steps) and a real-data run (4 steps), same method and LR
    make_run(tmp_path / "runs", "quickstart", source="synthetic", steps=16, acc=0.0625, general=0.2)
    make_run(tmp_path / "runs", "real", source="../shared/data/medcalc_bench/test_data.csv", steps=4, acc=0.25,
             drift=0.3, max_examples=16)
    out = report([str(tmp_path / "runs")], tmp_path / "out", plot=False)
    rows = out["experiments"]
    assert len(rows) == 2 and all(r["n"] == 1 for r in rows)
    synthetic = next(r for r in rows if "source=synthetic" in r["setup"])
    real = next(r for r in rows if "source=test_data.csv" in r["setup"])
    assert "steps=16" in synthetic["setup"] and "steps=4" in real["setup"]
    assert "task.max_examples" in real["setup"]
    # each row keeps its own scores: no domain score from one run and drift from the other
    assert (synthetic["domain_score"], synthetic["drift"], synthetic["general_score"]) == (0.0625, approx(0.1), 0.2)
    assert (real["domain_score"], real["drift"], real["general_score"]) == (0.25, approx(0.3), None)
    # two panels, one per setup, so neither Pareto front mixes the two data sets
    assert len({(r["domain"], r["format"], r["setup"]) for r in out["means"]}) == 2
    assert "nothing: every run is its own row" in out["markdown"]


def test_runs_differing_only_in_seed_are_repeats(tmp_path, caplog):
    import logging

    for seed, acc in ((0, 0.50), (1, 0.60), (2, 0.70)):
        make_run(tmp_path / "runs", f"seed{seed}", seed=seed, acc=acc, general=0.4 + seed / 10)
    make_run(tmp_path / "runs", "other_lr", lr=2e-4, acc=0.1, general=0.1)
    with caplog.at_level(logging.INFO, logger="talr.report"):
        out = report([str(tmp_path / "runs")], tmp_path / "out", plot=False)
    assert len(out["runs"]) == 4 and len(out["experiments"]) == 2
    r = cell(out["experiments"], lr=1e-4)
    assert (r["n"], r["seeds"]) == (3, "0/0,1/0,2/0")  # seed_everything/data.seed of each repeat
    assert r["domain_score"] == approx(0.60) and r["domain_score_sd"] == approx(0.10)
    assert r["general_score"] == approx(0.50) and r["general_score_sd"] == approx(0.10)
    assert r["setup"] == ""  # nothing but the seed differs
    assert cell(out["experiments"], lr=2e-4)["domain_score_sd"] is None
    assert "3 runs of sft 1e-4 (SmolLM2-135M-Instruct) are repeats (seeds 0/0,1/0,2/0)" in out["markdown"]
    assert "| 0.600 ± 0.100 |" in out["markdown"]
    assert any("3 runs are repeats" in m and "different seeds" in m for m in caplog.messages)
    runs_csv = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 5 and runs_csv[0].startswith("domain,format,model,method,lr,alpha,setup,seed,")


def test_same_seed_reruns_are_repeats_and_said_so(tmp_path, caplog):
    import logging

    make_run(tmp_path / "runs", "a", acc=0.5)
    make_run(tmp_path / "runs", "b", acc=0.5)
    with caplog.at_level(logging.INFO, logger="talr.report"):
        out = report([str(tmp_path / "runs")], tmp_path / "out", plot=False)
    assert [r["n"] for r in out["experiments"]] == [2]
    assert any("identical settings and seeds (reruns)" in m for m in caplog.messages)


def test_later_files_of_a_run_are_folded_into_it(tmp_path):
    import json

    import yaml

    run = make_run(tmp_path / "runs", "fit", acc=0.5, mtime=1_000_000)
    # `talr test` into another directory, from this run's checkpoint (config.yaml names it)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    test_dir = tmp_path / "runs" / "test_version_1"
    test_dir.mkdir()
    (test_dir / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": str(run / "checkpoints" / "last.ckpt")}))
    (test_dir / "summary.json").write_text(json.dumps({"method": "SFT", "final": {"test/acc": 0.75},
                                                       "wall_time_s/test": 10.0}))
    # `talr evaluate --model <run>/hf --output elsewhere.json`, given explicitly
    (run / "hf").mkdir()
    evaluated = tmp_path / "elsewhere.json"
    evaluated.write_text(json.dumps({"general/score": 0.33, "results": {}, "settings": {"model": str(run / "hf")}}))
    # a base model evaluated on its own: a row of its own
    base = tmp_path / "runs" / "evaluate" / "builtin_SmolLM2-135M-Instruct"
    base.mkdir(parents=True)
    (base / "general.json").write_text(json.dumps({"general/score": 0.5, "results": {},
                                                   "settings": {"model": "builtin:SmolLM2-135M-Instruct"}}))
    out = report([str(tmp_path / "runs")], tmp_path / "out", plot=False, general_jsons=[str(evaluated)])
    assert len(out["runs"]) == 2
    r = cell(out["runs"], method="sft")
    assert (r["domain_score"], r["domain_metric"], r["general_score"]) == (0.75, "test/acc", 0.33)
    assert cell(out["runs"], method="base")["general_score"] == 0.5
    assert "2 later file(s) folded into the run" in out["markdown"] and "test_version_1" in out["markdown"]


def test_missing_general_score_is_said_on_the_plot_and_in_the_log(tmp_path, caplog, monkeypatch):
    import logging

    import matplotlib.pyplot as plt

    make_run(tmp_path / "runs", "quickstart", acc=0.0625)  # the quickstart: drift, no general score
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    with caplog.at_level(logging.WARNING, logger="talr.report"):
        out = report([str(tmp_path / "runs")], tmp_path / "out")
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert any("Not plotted" in t and "sft 1e-4: no general score" in t and "talr evaluate" in t for t in texts)
    assert any("has no general score" in m and "talr evaluate --model <run>/hf" in m for m in caplog.messages)
    assert "## Not on the Pareto plot" in out["markdown"]


def test_evaluate_writes_beside_the_run_by_default(tmp_path, monkeypatch):
    from talr.general.cli import default_output

    run = make_run(tmp_path, "run")
    (run / "hf").mkdir()
    assert default_output(str(run / "hf")) == run / "general.json"
    assert default_output("builtin:SmolLM2-135M-Instruct") == Path("runs/evaluate/builtin_SmolLM2-135M-Instruct/general.json")
    assert default_output("Qwen/Qwen2.5-3B-Instruct") == Path("runs/evaluate/Qwen2.5-3B-Instruct/general.json")


def test_humaneval_column_reads_the_chat_task_and_truncated_sft_has_a_method():
    from talr.report.runs import CLASS_METHOD
    from talr.report.tables import scores

    chat = scores({"metrics": {"general/humaneval_instruct/pass@1": 0.25}, "baseline": {}})
    completion = scores({"metrics": {"general/humaneval/pass@1": 0.5}, "baseline": {}})
    assert (chat["humaneval"], completion["humaneval"]) == (0.25, 0.5)
    assert CLASS_METHOD["TruncatedSFT"] == "truncated"
