"""`python -m talr report`: collate runs' `summary.json` files into the paper's tables and a Pareto plot.

    python -m talr report runs/paper --out paper_figures/report
    python -m talr report 'runs/sweeps/**' --wandb-csv wandb_export.csv --general base_general.json

Inputs are directories (searched recursively for `summary.json` and `general.json`), summary files, or glob
patterns; wandb runs-table exports (CSV) and `talr evaluate` JSONs may be added. What a run is comes from, in
increasing priority: the summary's `hparams` and `method`, the `config.yaml` LightningCLI saved beside it, and
the paper layout of its path `<domain>/<format>/<model>/<method>_lr<lr>[/alpha_<a>]` (configs/paper/*).
Files of one run are merged (talr.report.runs): a later `talr test` in `<run>/test`, a `general.json` written
by `talr evaluate` (by default into the run directory when `--model` is the run's `hf/`), a `drift.json`.

Runs are never merged across experiments: two runs are one experiment only if they agree on everything but
the seeds (data source and fingerprint, task settings such as max_examples, steps, epochs, max_length,
method hyperparameters, evaluation limits); then they are repeats, shown as mean ± sd with `n`
(talr.report.tables). Rows of one (method, LR) that differ in setup are labelled by what differs.

Writes `<out>/runs.csv` (one row per run), `<out>/experiments.csv` (one row per experiment, repeats
aggregated), `<out>/means.csv` (mean over models, as the paper's table), `<out>/tables.md`, and
`<out>/pareto.{png,pdf}`: domain vs general score per method and LR, our Pareto front marked, the paper's
reported numbers (talr.paper_numbers) beside ours; points without a general score are listed on the plot.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from talr import paper_numbers
from talr.report.plot import missing_points, pareto_plot
from talr.report.runs import (KEY, SEED_FIELDS, collect, find_summaries, general_json_metrics, load_summary,
                              load_wandb_csv, merge_runs, method_of)
from talr.report.tables import (COLUMNS, DOMAIN_METRICS, GENERAL, fmt_lr, group_experiments, markdown, mean_table, panel_of,
                                paper_style, pareto_front, run_rows, run_table, scores, write_csv)

__all__ = ["KEY", "SEED_FIELDS", "COLUMNS", "DOMAIN_METRICS", "GENERAL", "collect", "find_summaries",
           "general_json_metrics", "load_summary", "load_wandb_csv", "merge_runs", "method_of", "fmt_lr",
           "markdown", "mean_table", "paper_style", "pareto_front", "pareto_plot", "run_rows", "run_table",
           "scores", "report", "main"]
log = logging.getLogger("talr.report")


def _merged_note(runs: list[dict], experiments: list[dict]) -> str:
    """What was merged, in words: files folded into a run, and runs grouped as repeats."""
    lines = [f"- {len(r['merged'])} later file(s) folded into the run in `{r['run_dir']}`: "
             + ", ".join(f"`{m}`" for m in r["merged"]) for r in runs if r.get("merged")]
    lines += [f"- {e['n']} runs of {e['method']} {fmt_lr(e['lr']) if e.get('lr') else ''} ({e['model']}"
              f"{'; ' + e['setup'] if e['setup'] else ''}) are repeats (seeds {e['seeds'] or 'unknown'}), shown as "
              "mean ± sd" for e in experiments if e["n"] > 1]
    return "\n".join(lines) or "- nothing: every run is its own row."


def report(inputs: list[str], out: str | Path, wandb_csvs: list[str] = (), plot: bool = True,
           general_jsons: list[str] = ()) -> dict:
    """Write the tables (CSV, markdown) and the Pareto plot; returns {"runs", "experiments", "means", "files"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = collect(inputs, wandb_csvs, general_jsons)
    grouped = group_experiments(records)
    runs = run_rows(records, grouped)
    experiments = run_table(records, grouped)
    means = mean_table(experiments)
    write_csv(runs, out / "runs.csv")
    write_csv(experiments, out / "experiments.csv")
    write_csv(means, out / "means.csv")
    keys = ["domain", "format", "method", "lr", "alpha", "setup"]
    sections = [f"# talr report\n\n{len(runs)} runs, {len(experiments)} experiments. Paper numbers: "
                f"{paper_numbers.SOURCE} (format not stated there).",
                "## What was merged\n\n" + _merged_note(records, experiments)]
    for domain, fmt, setup in sorted({panel_of(r) for r in means}, key=str):
        title = f"## {domain} / {fmt}{' / ' + setup if setup else ''}: methods x LR (mean over models)"
        sections.append(f"{title}\n\n" + paper_style(means, domain, fmt, setup))
    sections.append("## Mean over models\n\n" + markdown(means, keys + ["n_models", "n_runs", *COLUMNS,
                                                                        "paper_domain", "paper_general", "pareto"]))
    sections.append("## Experiments (repeats: mean ± sd over n runs)\n\n"
                    + markdown(experiments, [*KEY, "setup", "n", "seeds", *COLUMNS, "paper_domain", "paper_general"]))
    if lacking := missing_points(means):
        sections.append("## Not on the Pareto plot\n\n" + "\n".join(
            f"- {r['method']} {fmt_lr(r['lr']) if r.get('lr') else ''} ({r['domain']}/{r['format']}"
            f"{'; ' + r['setup'] if r.get('setup') else ''}): no {' and no '.join(r['lacks'])}" for r in lacking)
            + "\n\nGeneral score: `talr evaluate --model <run>/hf` writes `<run>/general.json`, which this report "
              "reads; or fit with `--config configs/general_eval.yaml`.")
    text = "\n\n".join(sections) + "\n"
    (out / "tables.md").write_text(text)
    files = [out / "runs.csv", out / "experiments.csv", out / "means.csv", out / "tables.md"]
    if plot and means:
        files += pareto_plot(means, out)
    return {"runs": runs, "experiments": experiments, "means": means, "files": files, "markdown": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr report", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=["runs"],
                        help="run directories, summary.json files or globs (default: runs)")
    parser.add_argument("--wandb-csv", action="append", default=[], help="a wandb runs-table export (repeatable)")
    parser.add_argument("--general", action="append", default=[], metavar="JSON",
                        help="a `talr evaluate` output (repeatable); joins the run whose hf/ it evaluated, "
                             "else is a row of its own")
    parser.add_argument("--out", default="runs/report", help="output directory (default: runs/report)")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    result = report(args.inputs, args.out, args.wandb_csv, plot=not args.no_plot, general_jsons=args.general)
    if not result["runs"]:
        raise SystemExit(f"talr report: no summary.json or general.json found under {args.inputs}")
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"]))
    return 0
