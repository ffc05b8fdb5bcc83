"""The domain-vs-general Pareto plot: one panel per (domain, format, setup), the paper's points beside ours."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

from talr import paper_numbers
from talr.report.tables import _name, _order, fmt_lr, panel_of

log = logging.getLogger("talr.report")
MARKERS = {"sft": "o", "l2": "s", "lora": "v", "wiseft": "D", "flow": "^", "talr": "*", "talr_tau1": "P", "dft": "X"}
HINT = ("general score: `talr evaluate --model <run>/hf` (writes <run>/general.json) or fit with "
        "--config configs/general_eval.yaml")


def missing_points(means: list[dict]) -> list[dict]:
    """Rows that cannot be placed on the plot, each with what it lacks."""
    out = []
    for r in means:
        lacks = [name for name, col in (("domain score", "domain_score"), ("general score", "general_score"))
                 if r.get(col) is None]
        if lacks:
            out.append({**r, "lacks": lacks})
    return out


def pareto_plot(means: list[dict], out: Path, paper: bool = True) -> list[Path]:
    """Domain vs general score per panel: our methods x LRs, our front, the paper's. Points that lack a score
    are listed on their panel (and logged) instead of silently left out."""
    import os

    from talr.modeling import cache_dir

    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))  # not ~/.config or ~/.cache
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({panel_of(r) for r in means}, key=str)
    missing = missing_points(means)
    for r in missing:
        log.warning("report: %s%s has no %s: not on the Pareto plot (%s)", _name({**r, "model": r.get("models")}),
                    f" [{r['setup']}]" if r.get("setup") else "", " and no ".join(r["lacks"]), HINT)
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        domain, fmt, setup = panel
        members = [r for r in means if panel_of(r) == panel
                   and r["domain_score"] is not None and r["general_score"] is not None]
        methods = sorted({r["method"] for r in members}, key=lambda m: _order({"method": m}))
        for k, method in enumerate(methods):
            pts = [r for r in members if r["method"] == method]
            ax.scatter([r["domain_score"] for r in pts], [r["general_score"] for r in pts], s=60,
                       marker=MARKERS.get(method, "o"), color=colors[k % len(colors)],
                       label=paper_numbers.METHOD_NAMES.get(method, str(method)))
            for r in pts:
                ax.annotate(fmt_lr(r["lr"]) if r.get("lr") else "", (r["domain_score"], r["general_score"]),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
            reported = [paper_numbers.lookup(domain, paper_numbers.MEAN, method, r["lr"] or 0.0) for r in pts]
            reported = [p for p in reported if p] if paper else []
            if reported:
                ax.scatter(*zip(*reported), s=60, marker=MARKERS.get(method, "o"), facecolors="none",
                           edgecolors=colors[k % len(colors)], linewidths=1.2)
        front = sorted((r["domain_score"], r["general_score"]) for r in members if r.get("pareto"))
        if front:
            ax.plot(*zip(*front), "--", color="0.3", lw=1, label="our Pareto front")
        title = f"{domain} ({fmt})" + ("\n" + textwrap.fill(setup, 70) if setup else "")
        ax.set(title=title, xlabel="domain score", ylabel="general score")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if members:
            ax.legend(fontsize=7, title="filled: ours, hollow: paper", title_fontsize=7)
        lacking = [r for r in missing if panel_of(r) == panel]
        if lacking:
            names = [f"{r['method']} {fmt_lr(r['lr']) if r.get('lr') else ''}: no {' / '.join(r['lacks'])}"
                     for r in lacking[:6]] + ([f"... and {len(lacking) - 6} more"] if len(lacking) > 6 else [])
            text = ("Not plotted:\n" + "\n".join(names) + "\n(general score: talr evaluate --model <run>/hf)")
            ax.text(0.5, 0.5 if not members else 0.02, text, transform=ax.transAxes, ha="center",
                    va="center" if not members else "bottom", fontsize=7, color="0.25",
                    bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    if not panels:
        axes[0][0].text(0.5, 0.5, "no runs", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pareto.png", out / "pareto.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
