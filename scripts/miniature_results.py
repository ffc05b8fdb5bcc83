"""Tables and figures of the miniature reproduction (scripts/reproduce_miniature.py), from its copied run files.

    python scripts/miniature_results.py results/miniature      # rebuild from the copied run files

Reads `<results>/steps.json` (step name -> its folder) and writes `<results>/results.csv`, `<results>/results.md` (one row per step, the base model first) and
`<results>/miniature.{png,pdf}`: held-out target NLL against the code-length drift and against IFEval, and
the drift over training steps.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from talr.report import fmt_lr

STEP = re.compile(r"^(?P<method>[a-z0-9]+)_lr(?P<lr>[\d.]+e-?\d+)$")
IFEVAL = "general/ifeval/prompt_level_strict_acc"
COLUMNS = ("step", "method", "lr", "val/acc", "val/answer_found", "val/nll", IFEVAL,
           "general/ifeval/inst_level_strict_acc", "drift/nll_delta", "tokens_seen", "optimizer_steps", "wall_time_s")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def step_row(run_dir: Path, name: str, wall_time_s: float | None = None) -> dict:
    match = STEP.match(name)
    summary = _json(run_dir / "summary.json")
    row: dict = {"step": name, "method": match["method"] if match else name,
                 "lr": float(match["lr"]) if match else None}
    metrics = dict(summary.get("final") or {})
    general = _json(run_dir / "general.json")
    for task, values in (general.get("results") or {}).items():
        metrics.update({f"general/{task}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    metrics.update(_json(run_dir / "drift.json"))
    if name == "base":
        metrics["drift/nll_delta"] = 0.0  # by definition: the reference of the drift is the base model
    row.update({k: metrics.get(k) for k in COLUMNS[3:9]})
    row["tokens_seen"] = summary.get("tokens_seen") if match and match["method"] != "wiseft" else None
    row["optimizer_steps"] = summary.get("optimizer_steps") if row["tokens_seen"] is not None else None
    row["wall_time_s"] = wall_time_s
    return row


def drift_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        points = [(int(r["step"]), float(r["drift/nll_delta"])) for r in csv.DictReader(f)
                  if r.get("drift/nll_delta") not in (None, "")]
    return sorted(set(points))


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def write_tables(rows: list[dict], results: Path, analysis: dict) -> None:
    with open(results / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = ["step", "method", "LR", "held-out acc", "answer found", "held-out target NLL", "IFEval prompt strict",
              "IFEval instr. strict", "drift ΔL(P1)", "tokens", "steps", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lr = fmt_lr(r["lr"]) if r["lr"] is not None else "—"
        lines.append("| " + " | ".join([r["step"], r["method"], lr] + [_cell(r[k]) for k in COLUMNS[3:]]) + " |")
    text = "\n".join(lines) + "\n"
    if analysis:
        shares = ", ".join(f"p<{t}: {s:.1%}" for t, s in analysis.get("share_below", {}).items())
        text += (f"\nTraining rows under the base model (`talr analyze`): {analysis.get('n_examples')} examples, "
                 f"{analysis.get('n_tokens')} supervised tokens, median p {analysis.get('median_p', float('nan')):.3f}, "
                 f"{shares}.\n")
    (results / "results.md").write_text(text)


def plot(rows: list[dict], curves: dict[str, list], results: Path, fmt: str = "label") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, label) in zip(axes[:2], (("drift/nll_delta", "code-length drift ΔL(P1) (nats/token, lower = kept)"),
                                           (IFEVAL, "IFEval prompt-level strict (24 prompts)"))):
        for r in rows:
            if r.get("val/nll") is None or r.get(key) is None:
                continue
            ax.scatter(r[key], r["val/nll"], color="black" if r["method"] == "base" else None)
            ax.annotate(r["step"], (r[key], r["val/nll"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out target NLL (lower = better domain fit)")
    for name, points in curves.items():
        if points:
            axes[2].plot(*zip(*points), marker="o", ms=3, label=name)
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("drift/nll_delta")
    if any(curves.values()):
        axes[2].legend(fontsize=7)
    axes[2].set_title("general-skill drift during training", fontsize=9)
    fig.suptitle(f"Miniature reproduction: SmolLM2-135M-Instruct, MedCalc-Bench {fmt} format (real rows, CPU)",
                 fontsize=10)
    fig.tight_layout()
    paths = [results / "miniature.png", results / "miniature.pdf"]
    for path in paths:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return paths


def write_results(results: Path) -> list[dict]:
    """Rebuild the tables and the figure from `<results>/steps.json` (written by the driver)."""
    results = Path(results)
    index = json.loads((results / "steps.json").read_text()) if (results / "steps.json").exists() else []
    steps = [s for s in index if (results / s["dir"]).exists()]
    rows = [step_row(results / s["dir"], s["step"], s.get("wall_time_s")) for s in steps]
    write_tables(rows, results, _json(results / "base" / "analysis.json"))
    fmt = (_json(results / "base" / "summary.json").get("task") or {}).get("format") or "label"
    plot(rows, {s["step"]: drift_curve(results / s["dir"]) for s in steps}, results, fmt)
    return rows


if __name__ == "__main__":
    write_results(Path(sys.argv[1] if len(sys.argv) > 1 else "results/miniature"))
    print((Path(sys.argv[1] if len(sys.argv) > 1 else "results/miniature") / "results.md").read_text())
