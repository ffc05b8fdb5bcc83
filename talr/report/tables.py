"""Runs -> experiments (repeats grouped, mean ± sd) -> means over models, and their markdown/CSV forms.

Repeats: runs whose identity (KEY) and setup are equal in everything except the seeds (SEED_FIELDS) are
repeats of one experiment; the experiment row gives the mean of each score, its sample standard deviation
(`<score>_sd`) and `n`. Runs that differ in anything else (data source or content, max_examples, steps,
epochs, max_length, a method hyperparameter, the evaluation's limit, ...) are different experiments and get
rows of their own, labelled in `setup` by the settings that tell them apart.
"""

from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path

from talr import paper_numbers
from talr.report.runs import KEY, SEED_FIELDS

log = logging.getLogger("talr.report")

DOMAIN_METRICS = {"medcalc": ("test/acc", "val/acc"), "esci": ("test/accuracy", "val/accuracy")}
GENERAL = {"ifeval": "general/ifeval/prompt_level_strict_acc", "gsm8k": "general/gsm8k/exact_match_strict_match",
           "humaneval": "general/humaneval/pass@1"}
DRIFT = "drift/nll_delta"
METHOD_ORDER = ("base", "sft", "l2", "lora", "wiseft", "flow", "talr", "talr_tau1", "dft")
COLUMNS = ["domain_score", "domain_metric", "general_score", *GENERAL, "drift", "baseline_domain", "baseline_general"]
SCORES = [c for c in COLUMNS if c != "domain_metric"]
# Settings tied to the model rather than the experiment (Qwen3's enable_thinking): ignored across models.
MODEL_BOUND = ("data.chat_template_kwargs",)


def fmt_lr(lr: float) -> str:
    """1e-06 -> '1e-6', 2e-05 -> '2e-5', 0.0002 -> '2e-4' (the names used in configs/paper)."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def scores(run: dict) -> dict:
    """The table columns of one run record."""
    m, base = run["metrics"], run["baseline"]
    candidates = DOMAIN_METRICS.get(run.get("domain") or "", ("test/acc", "test/accuracy", "val/acc", "val/accuracy"))
    metric = next((k for k in candidates if m.get(k) is not None), None)
    base_metric = next((k for k in candidates if base.get(k) is not None), None)
    return {"domain_score": m.get(metric) if metric else None, "domain_metric": metric,
            "general_score": m.get("general/score"), **{name: m.get(key) for name, key in GENERAL.items()},
            # chat models run HumanEval as lm-eval's humaneval_instruct (talr.general.evaluate)
            "humaneval": m.get("general/humaneval_instruct/pass@1", m.get(GENERAL["humaneval"])),
            "drift": m.get(DRIFT), "baseline_domain": base.get(base_metric) if base_metric else None,
            "baseline_general": base.get("general/score")}


def _order(row: dict) -> tuple:
    method = row.get("method") or ""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (str(row.get("domain")), str(row.get("format")), str(row.get("setup", "")), str(row.get("model", "")),
            rank, method, row.get("lr") or 0.0, row.get("alpha") or 0.0)


def _short(value) -> str:
    text = str(value).replace('": ', '":').replace(", ", ",")
    if "/" in text and not text.startswith("{"):
        text = text.rstrip("/").rsplit("/", 1)[-1]  # a path or hub id: its last part
    return text if len(text) <= 40 else text[:37] + "..."


def _label(setup: dict, fields: list[str]) -> str:
    if any(k.startswith("task.") for k in fields):  # the data fingerprint follows from the task settings shown
        fields = [k for k in fields if k != "data.fingerprint"]
    return "; ".join(f"{k}={_short(setup[k])}" for k in fields if k in setup)


# -- experiments --------------------------------------------------------------------------------------
def experiment_key(run: dict) -> tuple:
    setup = tuple(sorted((k, repr(v)) for k, v in run["setup"].items() if k not in SEED_FIELDS))
    return (*(run.get(k) for k in KEY), setup)


def telling_fields(experiments: list[dict]) -> dict[int, list[str]]:
    """Per experiment (by id), the setup fields that tell it apart: fields that differ between experiments of
    the same identity, and fields every experiment of its panel (domain, format) has but with other values
    (e.g. the data source or the number of steps, not a hyperparameter only one method has)."""
    out: dict[int, set[str]] = {id(e): set() for e in experiments}
    groups: dict[tuple, list[dict]] = {}
    panels: dict[tuple, list[dict]] = {}
    for e in experiments:
        groups.setdefault(tuple(e.get(k) for k in KEY), []).append(e)
        panels.setdefault((e.get("domain"), e.get("format")), []).append(e)

    def differing(members: list[dict], ignore: tuple = ()) -> set[str]:
        # fields every trained member has (evaluation-only records carry only evaluation settings)
        trained = [e for e in members if "steps" in e["setup"]] or members
        names = {k for k in set().union(*(e["setup"] for e in members))
                 if all(k in e["setup"] for e in trained) and k not in ignore}
        return {k for k in names - set(SEED_FIELDS)
                if len({repr(e["setup"][k]) for e in members if k in e["setup"]}) > 1}

    for members in groups.values():
        fields = differing(members)
        for e in members:
            out[id(e)] |= fields
    for members in panels.values():
        shared = differing(members, MODEL_BOUND)
        for e in members:
            out[id(e)] |= shared
    return {k: sorted(v) for k, v in out.items()}


def _unknown_part(e: dict, members: list[dict]) -> str:
    """For experiments told apart only by settings some of them lack (no config.yaml): which they lack."""
    lacking = sorted(set().union(*(m["setup"] for m in members)) - set(e["setup"]) - set(SEED_FIELDS))
    return f"{len(lacking)} settings unknown ({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''})" \
        if lacking else "all settings known"


def group_experiments(runs: list[dict]) -> list[dict]:
    """One record per experiment: its runs (repeats), the shared identity and setup, and a label."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(experiment_key(run), []).append(run)
    experiments = []
    for members in groups.values():
        first = members[0]
        setup = {k: v for k, v in first["setup"].items() if k not in SEED_FIELDS}
        experiments.append({**{k: first.get(k) for k in KEY}, "setup": setup, "runs": members})
    fields = telling_fields(experiments)
    for e in experiments:
        e["fields"] = fields[id(e)]
        e["label"] = _label(e["setup"], e["fields"])
    labels: dict[tuple, list[dict]] = {}
    for e in experiments:
        labels.setdefault((*(e[k] for k in KEY), e["label"]), []).append(e)
    for members in labels.values():
        if len(members) > 1:  # distinct experiments with one label: say what is unknown about them
            for e in members:
                e["label"] = "; ".join(p for p in (e["label"], _unknown_part(e, members)) if p)
    for e in experiments:
        if len(e["runs"]) > 1:
            seeds = [tuple(r["setup"].get(k) for k in SEED_FIELDS) for r in e["runs"]]
            how = "different seeds" if len(set(seeds)) == len(seeds) else "identical settings and seeds (reruns)"
            log.info("report: %d runs are repeats of %s (%s; %s): %s", len(e["runs"]), _name(e), e["label"] or
                     "same setup", how, ", ".join(r["sources"][0] for r in e["runs"]))
    return experiments


def _name(row: dict) -> str:
    lr = f" {fmt_lr(row['lr'])}" if row.get("lr") else ""
    alpha = f" α={row['alpha']}" if row.get("alpha") is not None else ""
    return f"{row.get('domain')}/{row.get('format')}/{row.get('model')}/{row.get('method')}{lr}{alpha}"


def _sd(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _mean(values: list) -> float | None:
    return sum(v) / len(v) if (v := [x for x in values if x is not None]) else None


def _paper(row: dict) -> tuple:
    """The paper's (domain, general) for this model, method and LR, or (None, None)."""
    paper = paper_numbers.lookup(row["domain"] or "", row["model"] or "", row["method"] or "", row["lr"] or 0.0)
    return paper or (None, None)


def _seeds(run: dict) -> str:
    return "/".join(str(run["setup"][k]) for k in SEED_FIELDS if run["setup"].get(k) is not None)


def run_rows(runs: list[dict], experiments: list[dict] | None = None) -> list[dict]:
    """One row per run (repeats not merged): identity, setup label, seeds, scores, files."""
    rows = []
    for e in experiments if experiments is not None else group_experiments(runs):
        for run in e["runs"]:
            row = {**{k: run.get(k) for k in KEY}, "setup": e["label"], "seed": _seeds(run), **scores(run)}
            row["paper_domain"], row["paper_general"] = _paper(row)
            row.update(run_dir=str(run.get("run_dir") or ""), sources=";".join(run["sources"]))
            rows.append(row)
    return sorted(rows, key=_order)


def run_table(runs: list[dict], experiments: list[dict] | None = None) -> list[dict]:
    """One row per experiment: mean of each score over its repeats, `<score>_sd` and `n`, the paper's number."""
    rows = []
    for e in experiments if experiments is not None else group_experiments(runs):
        per_run = [scores(r) for r in e["runs"]]
        row = {k: e[k] for k in KEY}
        row["setup"] = e["label"]
        row["_setup"] = e["setup"]
        row["n"] = len(per_run)
        row["seeds"] = ",".join(s for s in (_seeds(r) for r in e["runs"]) if s)
        for col in COLUMNS:
            if col == "domain_metric":
                row[col] = ",".join(sorted({s[col] for s in per_run if s[col]})) or None
            else:
                row[col] = _mean([s[col] for s in per_run])
        row.update({f"{col}_sd": _sd([s[col] for s in per_run]) for col in ("domain_score", "general_score", "drift")})
        row["paper_domain"], row["paper_general"] = _paper(row)
        row["sources"] = ";".join(s for r in e["runs"] for s in r["sources"])
        rows.append(row)
    return sorted(rows, key=_order)


def mean_table(rows: list[dict]) -> list[dict]:
    """Mean over models per (domain, format, method, lr, alpha, setup), with the paper's mean and a Pareto flag."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        setup = {k: v for k, v in (row.get("_setup") or {}).items() if k not in MODEL_BOUND}
        key = (*(row[k] for k in ("domain", "format", "method", "lr", "alpha")), row.get("setup", ""),
               tuple(sorted((k, repr(v)) for k, v in setup.items())))
        groups.setdefault(key, []).append(row)
    out = []
    for (domain, fmt, method, lr, alpha, label, _), members in groups.items():
        row = {"domain": domain, "format": fmt, "method": method, "lr": lr, "alpha": alpha, "setup": label,
               "n_models": len(members), "models": ",".join(sorted(str(r["model"]) for r in members)),
               "n_runs": sum(r.get("n", 1) for r in members)}
        for col in COLUMNS:
            if col == "domain_metric":
                row[col] = ",".join(sorted({m for r in members if r[col] for m in r[col].split(",")})) or None
            else:
                row[col] = _mean([r[col] for r in members])
        paper = paper_numbers.lookup(domain or "", paper_numbers.MEAN, method or "", lr or 0.0)
        row["paper_domain"], row["paper_general"] = paper or (None, None)
        out.append(row)
    for panel in {panel_of(r) for r in out}:
        members = [r for r in out if panel_of(r) == panel]
        for r, on in zip(members, pareto_front([(r["domain_score"], r["general_score"]) for r in members])):
            r["pareto"] = on
    return sorted(out, key=_order)


def panel_of(row: dict) -> tuple:
    return (row.get("domain"), row.get("format"), row.get("setup") or "")


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


# -- text ---------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return fmt_lr(value) if 0 < abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def _score_cell(row: dict, col: str) -> str:
    text = _cell(row.get(col))
    if row.get(f"{col}_sd") is not None:
        text += f" ± {row[f'{col}_sd']:.3f}"
    return text


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_score_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def paper_style(means: list[dict], domain: str, fmt: str, setup: str = "") -> str:
    """The layout of the paper's methods table (docs/PAPER.md): rows LR, columns methods, cells 'domain / general (paper: d / g)'."""
    members = [r for r in means if panel_of(r) == (domain, fmt, setup)]
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
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
