"""`python -m talr report`: collate runs' `summary.json` files into the paper's tables and a Pareto plot.

    python -m talr report runs/paper --out paper_figures/report
    python -m talr report 'runs/sweeps/**' --wandb-csv wandb_export.csv --out paper_figures/report

Inputs are directories (searched recursively for `summary.json`), summary files, or glob patterns; a wandb
runs-table export (CSV) may be added. What a run is comes from, in increasing priority: the summary's
`hparams` and `method`, the `config.yaml` LightningCLI saved beside it, and the paper layout of its path
`<domain>/<format>/<model>/<method>_lr<lr>[/alpha_<a>]` (configs/paper/*; WiSE-FT runs live under
`wiseft_lr<lr>/alpha_<a>`). Files of one run (fit, a later `test` in `<run>/test`, a `general.json` written by
`python -m talr evaluate` and a `drift.json` ({"drift/nll_delta": …}) beside a summary) are merged, newer
values winning.

Writes `<out>/runs.csv` (one row per model), `<out>/means.csv` (mean over models, as the paper's table),
`<out>/tables.md`, and `<out>/pareto.{png,pdf}`: domain vs general score per method and LR, our Pareto
front marked, the paper's reported numbers (talr.paper_numbers) beside ours.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
from pathlib import Path

from talr import paper_numbers

DOMAIN_METRICS = {"medcalc": ("test/acc", "val/acc"), "esci": ("test/accuracy", "val/accuracy")}
GENERAL = {"ifeval": "general/ifeval/prompt_level_strict_acc", "gsm8k": "general/gsm8k/exact_match_strict_match",
           "humaneval": "general/humaneval/pass@1"}
DRIFT = "drift/nll_delta"
CLASS_METHOD = {"SFT": "sft", "L2Init": "l2", "LoRA": "lora", "FLOW": "flow", "TALR": "talr", "DFT": "dft"}
TASK_DOMAIN = {"MedCalc": "medcalc", "ESCI": "esci"}
METHOD_ORDER = ("sft", "l2", "lora", "wiseft", "flow", "talr", "talr_tau1", "dft")
RUN_DIR = re.compile(r"^(?P<method>[a-z0-9_]+?)_lr(?P<lr>\d[\d.]*e-?\d+)$")
ALPHA_DIR = re.compile(r"^alpha_(?P<alpha>\d[\d.]*)$")
WANDB_NAME = re.compile(r"^(?P<domain>[a-z]+)-(?P<format>cot|label)-(?P<model>.+)-(?P<method>[a-z0-9_]+)"
                        r"-lr(?P<lr>[\d.e+-]+)$")
KEY = ("domain", "format", "model", "method", "lr", "alpha")
COLUMNS = ["domain_score", "domain_metric", "general_score", *GENERAL, "drift", "baseline_domain", "baseline_general"]


def fmt_lr(lr: float) -> str:
    """1e-06 -> '1e-6', 2e-05 -> '2e-5', 0.0002 -> '2e-4' (the names used in configs/paper)."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def method_of(class_name: str | None, hparams: dict) -> str | None:
    method = CLASS_METHOD.get((class_name or "").rsplit(".", 1)[-1])
    if method == "talr" and hparams.get("tau") is not None:
        method = f"talr_tau{float(hparams['tau']):g}"
    return method


# -- loading -----------------------------------------------------------------------------------------
def find_summaries(inputs: list[str]) -> list[Path]:
    found: set[Path] = set()
    for item in inputs:
        paths = [Path(p) for p in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for path in paths:
            if path.is_dir():
                found.update(path.rglob("summary.json"))
            elif path.is_file():
                found.add(path)
    return sorted(found)


def _from_config(path: Path) -> dict:
    """Run identity from the config.yaml LightningCLI saved beside a summary."""
    if not path.exists():
        return {}
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    cfg = cfg.get("fit", cfg)  # a config saved with the subcommand level
    out: dict = {}
    model = cfg.get("model") or {}
    init = model.get("init_args") or {}
    if method := method_of(model.get("class_path"), init):
        out["method"] = method
    if init.get("lr") is not None:
        out["lr"] = float(init["lr"])
    if init.get("pretrained"):
        out["model"] = str(init["pretrained"]).rstrip("/").rsplit("/", 1)[-1]
    task = (cfg.get("data") or {}).get("task") or {}
    if domain := TASK_DOMAIN.get(str(task.get("class_path", "")).rsplit(".", 1)[-1]):
        out["domain"] = domain
    if (task.get("init_args") or {}).get("format"):
        out["format"] = task["init_args"]["format"]
    return out


def _from_path(path: Path) -> dict:
    """Run identity from the paper layout <domain>/<format>/<model>/<method>_lr<lr>[/alpha_<a>]."""
    parts = path.parts
    for i in range(len(parts) - 1, 2, -1):
        match = RUN_DIR.match(parts[i])
        if match and parts[i - 2] in ("cot", "label"):
            out = {"domain": parts[i - 3], "format": parts[i - 2], "model": parts[i - 1],
                   "method": match["method"], "lr": float(match["lr"])}
            alphas = [float(a["alpha"]) for a in map(ALPHA_DIR.match, parts[i + 1:]) if a]
            return {**out, "alpha": alphas[0]} if alphas else out
    return {}


def general_json_metrics(path: Path) -> dict[str, float]:
    """`python -m talr evaluate --output` results as the callback's flat keys."""
    result = json.loads(path.read_text())
    flat = {f"general/{task}/{metric}": float(v) for task, metrics in result.get("results", {}).items()
            for metric, v in metrics.items() if not metric.endswith("_stderr") and isinstance(v, (int, float))}
    if result.get("general/score") is not None:
        flat["general/score"] = float(result["general/score"])
    return flat


def load_summary(path: Path) -> dict:
    """One summary.json as a run record: identity (KEY), metrics, baseline and where it came from."""
    summary = json.loads(path.read_text())
    hparams = summary.get("hparams") or {}
    run: dict = {"domain": None, "format": None, "model": None, "alpha": None,
                 "method": method_of(summary.get("method"), hparams),
                 "lr": float(hparams["lr"]) if hparams.get("lr") is not None else None}
    if hparams.get("pretrained"):
        run["model"] = str(hparams["pretrained"]).rstrip("/").rsplit("/", 1)[-1]
    task = summary.get("task") or {}
    run.update({k: task[k] for k in ("domain", "format") if task.get(k)})
    run.update(_from_config(path.parent / "config.yaml"))
    run.update(_from_path(path.parent.resolve()))
    metrics = dict(summary.get("final") or {})
    if (general := path.parent / "general.json").exists():
        metrics.update(general_json_metrics(general))
    if (drift := path.parent / "drift.json").exists():  # measured after the fact (e.g. WiSE-FT)
        metrics.update({k: float(v) for k, v in json.loads(drift.read_text()).items() if k.startswith("drift/")})
    run.update(metrics=metrics, sources=[str(path)], mtime=path.stat().st_mtime,
               baseline={**(summary.get("baseline") or {}), **(summary.get("general_baseline") or {})})
    return run


def load_wandb_csv(path: str | Path) -> list[dict]:
    """Runs from a wandb runs-table export: identity from the run name the paper configs give
    (`<domain>-<format>-<model>-<method>-lr<lr>`) or the `lr`/`pretrained` columns; metrics from columns
    named like the logged keys (`val/acc`, `general/score`, ...)."""
    runs = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            match = WANDB_NAME.match(row.get("Name") or row.get("name") or "")
            run: dict = {"domain": None, "format": None, "model": None, "method": None, "lr": None, "alpha": None}
            if match:
                run.update(match.groupdict(), lr=float(match["lr"]))
            else:
                run["lr"] = _float(row.get("lr"))
                run["model"] = (row.get("pretrained") or "").rstrip("/").rsplit("/", 1)[-1] or None
            metrics = {k: _float(v) for k, v in row.items() if "/" in k and _float(v) is not None}
            run.update(metrics=metrics, baseline={k[len("baseline/"):]: v for k, v in metrics.items()
                                                  if k.startswith("baseline/")},
                       sources=[f"{path}:{i + 2}"], mtime=float(i))
            runs.append(run)
    return runs


def _float(value) -> float | None:
    try:
        return None if math.isnan(out := float(value)) else out
    except (TypeError, ValueError):
        return None


def merge_runs(runs: list[dict]) -> list[dict]:
    """One record per run identity; metrics of later (newer) files override earlier ones."""
    merged: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: (r["mtime"], r["sources"])):
        key = tuple(run.get(k) for k in KEY)
        if key not in merged:
            merged[key] = {**run, "metrics": dict(run["metrics"]), "baseline": dict(run["baseline"]),
                           "sources": list(run["sources"])}
        else:
            merged[key]["metrics"].update(run["metrics"])
            merged[key]["baseline"].update(run["baseline"])
            merged[key]["sources"] += run["sources"]
    return list(merged.values())


# -- tables ------------------------------------------------------------------------------------------
def scores(run: dict) -> dict:
    """The table columns of one run record."""
    m, base = run["metrics"], run["baseline"]
    candidates = DOMAIN_METRICS.get(run.get("domain") or "", ("test/acc", "test/accuracy", "val/acc", "val/accuracy"))
    metric = next((k for k in candidates if m.get(k) is not None), None)
    base_metric = next((k for k in candidates if base.get(k) is not None), None)
    return {"domain_score": m.get(metric) if metric else None, "domain_metric": metric,
            "general_score": m.get("general/score"), **{name: m.get(key) for name, key in GENERAL.items()},
            "drift": m.get(DRIFT), "baseline_domain": base.get(base_metric) if base_metric else None,
            "baseline_general": base.get("general/score")}


def _order(row: dict) -> tuple:
    method = row.get("method") or ""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (str(row.get("domain")), str(row.get("format")), str(row.get("model", "")), rank, method,
            row.get("lr") or 0.0, row.get("alpha") or 0.0)


def run_table(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        row = {k: run.get(k) for k in KEY}
        row.update(scores(run))
        paper = paper_numbers.lookup(row["domain"] or "", row["model"] or "", row["method"] or "", row["lr"] or 0.0)
        row["paper_domain"], row["paper_general"] = paper or (None, None)
        row["sources"] = ";".join(run["sources"])
        rows.append(row)
    return sorted(rows, key=_order)


def _mean(values: list) -> float | None:
    return sum(v) / len(v) if (v := [x for x in values if x is not None]) else None


def mean_table(rows: list[dict]) -> list[dict]:
    """Mean over models per (domain, format, method, lr, alpha), with the paper's mean and a Pareto flag."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ("domain", "format", "method", "lr", "alpha")), []).append(row)
    out = []
    for (domain, fmt, method, lr, alpha), members in groups.items():
        row = {"domain": domain, "format": fmt, "method": method, "lr": lr, "alpha": alpha,
               "n_models": len(members), "models": ",".join(sorted(str(r["model"]) for r in members))}
        for col in COLUMNS:
            if col == "domain_metric":
                row[col] = ",".join(sorted({r[col] for r in members if r[col]}))
            else:
                row[col] = _mean([r[col] for r in members])
        paper = paper_numbers.lookup(domain or "", paper_numbers.MEAN, method or "", lr or 0.0)
        row["paper_domain"], row["paper_general"] = paper or (None, None)
        out.append(row)
    for panel in {(r["domain"], r["format"]) for r in out}:
        members = [r for r in out if (r["domain"], r["format"]) == panel]
        front = pareto_front([(r["domain_score"], r["general_score"]) for r in members])
        for r, on in zip(members, front):
            r["pareto"] = on
    return sorted(out, key=_order)


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """True for points no other point beats on both axes (higher is better; missing = not on the front)."""
    flags = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None:
            flags.append(False)
            continue
        dominated = any(j != i and a is not None and b is not None and a >= x and b >= y and (a > x or b > y)
                        for j, (a, b) in enumerate(points))
        flags.append(not dominated)
    return flags


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return fmt_lr(value) if 0 < abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def paper_style(means: list[dict], domain: str, fmt: str) -> str:
    """The DESIGN.md §1 layout: rows LR, columns methods, cells 'domain / general (paper: d / g)'."""
    members = [r for r in means if (r["domain"], r["format"]) == (domain, fmt)]
    methods = sorted({r["method"] for r in members}, key=lambda m: _order({"method": m}))
    lines = [f"| {domain} {fmt} | " + " | ".join(paper_numbers.METHOD_NAMES.get(m, str(m)) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for lr in sorted({r["lr"] for r in members if r["lr"] is not None}):
        cells = []
        for method in methods:
            hits = [r for r in members if r["method"] == method and r["lr"] == lr]
            if not hits:
                cells.append("–")
                continue
            r = hits[0]
            cell = f"{_cell(r['domain_score'])} / {_cell(r['general_score'])}"
            if r["paper_domain"] is not None:
                cell += f" (paper {r['paper_domain']:.3f} / {r['paper_general']:.3f})"
            cells.append(cell)
        lines.append(f"| LR {fmt_lr(lr)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


# -- plot --------------------------------------------------------------------------------------------
MARKERS = {"sft": "o", "l2": "s", "lora": "v", "wiseft": "D", "flow": "^", "talr": "*", "talr_tau1": "P", "dft": "X"}


def pareto_plot(means: list[dict], out: Path, paper: bool = True) -> list[Path]:
    """Domain vs general score, one panel per (domain, format): our methods x LRs, our front, the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["domain"], r["format"]) for r in means}, key=str)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (domain, fmt) in zip(axes[0], panels):
        members = [r for r in means if (r["domain"], r["format"]) == (domain, fmt)
                   and r["domain_score"] is not None and r["general_score"] is not None]
        methods = sorted({r["method"] for r in members}, key=lambda m: _order({"method": m}))
        for k, method in enumerate(methods):
            pts = [r for r in members if r["method"] == method]
            ax.scatter([r["domain_score"] for r in pts], [r["general_score"] for r in pts], s=60,
                       marker=MARKERS.get(method, "o"), color=colors[k % len(colors)],
                       label=paper_numbers.METHOD_NAMES.get(method, str(method)))
            for r in pts:
                ax.annotate(fmt_lr(r["lr"]), (r["domain_score"], r["general_score"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            reported = [paper_numbers.lookup(domain, paper_numbers.MEAN, method, r["lr"]) for r in pts]
            reported = [p for p in reported if p] if paper else []
            if reported:
                ax.scatter(*zip(*reported), s=60, marker=MARKERS.get(method, "o"), facecolors="none",
                           edgecolors=colors[k % len(colors)], linewidths=1.2)
        front = sorted((r["domain_score"], r["general_score"]) for r in members if r.get("pareto"))
        if front:
            ax.plot(*zip(*front), "--", color="0.3", lw=1, label="our Pareto front")
        ax.set(title=f"{domain} ({fmt})", xlabel="domain score", ylabel="general score")
        ax.grid(alpha=0.3)
        if members:
            ax.legend(fontsize=7, title="filled: ours, hollow: paper", title_fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pareto.png", out / "pareto.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


# -- CLI ---------------------------------------------------------------------------------------------
def collect(inputs: list[str], wandb_csvs: list[str] = ()) -> list[dict]:
    runs = [load_summary(p) for p in find_summaries(inputs)]
    for path in wandb_csvs:
        runs += load_wandb_csv(path)
    return merge_runs(runs)


def report(inputs: list[str], out: str | Path, wandb_csvs: list[str] = (), plot: bool = True) -> dict:
    """Write the tables (CSV, markdown) and the Pareto plot; returns {"runs", "means", "files"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_table(collect(inputs, wandb_csvs))
    means = mean_table(rows)
    write_csv(rows, out / "runs.csv")
    write_csv(means, out / "means.csv")
    keys = ["domain", "format", "method", "lr", "alpha"]
    sections = [f"# talr report\n\n{len(rows)} runs. Paper numbers: {paper_numbers.SOURCE} (format not stated there)."]
    for domain, fmt in sorted({(r["domain"], r["format"]) for r in means}, key=str):
        sections.append(f"## {domain} / {fmt}: methods x LR (mean over models)\n\n" + paper_style(means, domain, fmt))
    sections.append("## Mean over models\n\n" + markdown(means, keys + ["n_models", *COLUMNS, "paper_domain",
                                                                        "paper_general", "pareto"]))
    sections.append("## Runs\n\n" + markdown(rows, [*KEY, *COLUMNS, "paper_domain", "paper_general"]))
    text = "\n\n".join(sections) + "\n"
    (out / "tables.md").write_text(text)
    files = [out / "runs.csv", out / "means.csv", out / "tables.md"]
    if plot and means:
        files += pareto_plot(means, out)
    return {"runs": rows, "means": means, "files": files, "markdown": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr report", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=["runs"], help="run directories, summary.json files or globs")
    parser.add_argument("--wandb-csv", action="append", default=[], help="a wandb runs-table export (repeatable)")
    parser.add_argument("--out", default="paper_figures/report", help="output directory")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    result = report(args.inputs, args.out, args.wandb_csv, plot=not args.no_plot)
    if not result["runs"]:
        raise SystemExit(f"talr report: no summary.json found under {args.inputs}")
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"]))
    return 0
