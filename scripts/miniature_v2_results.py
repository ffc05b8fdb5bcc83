"""Tables, verdict and figures of the miniature v2 (scripts/reproduce_miniature_v2.py) from its copied run files.

    python scripts/miniature_v2_results.py results/miniature_v2

Reads `<results>/steps.json` and each step's summary.json / metrics.csv / hard_token_probs.json, and writes
`results.csv`/`results.md` (one row per step), `verdict.json`/`verdict.md` (the criteria pre-registered in
results/miniature_v2/DESIGN.md, each with its numbers), `tradeoff.png/pdf` (drift against domain gain with the
SFT frontier, per general measure) and `curves.png/pdf` (per-epoch drift, τ, hard-token weight share, share of
tokens with p > 0.2, p of the base model's hardest tokens).
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

STEP = re.compile(r"^(?P<method>[a-z0-9]+)_lr(?P<lr>[\d.]+e-?\d+)(?:_seed(?P<seed>\d+))?$")
GENERAL = {"drift/nll_delta": "ΔL on the base model's own answers", "drift/gsm8k_nll_delta": "ΔL on GSM8K solutions"}
DOMAIN, ANSWER = "val/nll", "val/answer_nll"
STEPS_PER_EPOCH = 5
COLUMNS = ("step", "method", "lr", "seed", DOMAIN, ANSWER, "gain", "answer_gain", *GENERAL, "wall_time_s")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the pre-registered rules (pure functions of the numbers) -------------------------------------------

def frontier(points: list[tuple[float, float]]):
    """F(gain) -> drift: piecewise linear through the non-dominated (gain, drift) points, from (0, 0), sorted by
    gain; beyond the largest gain it continues the last segment."""
    pts = sorted({(0.0, 0.0), *points})
    keep = [p for p in pts if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in pts)]
    keep.sort()

    def f(g: float) -> float:
        if len(keep) == 1:
            return keep[0][1]
        for (g0, d0), (g1, d1) in zip(keep, keep[1:]):
            if g <= g1 or (g1, d1) == keep[-1]:
                return d0 + (d1 - d0) * (g - g0) / (g1 - g0) if g1 != g0 else min(d0, d1)
        return keep[-1][1]

    f.points = keep
    return f


def f1_verdict(sft: dict[float, dict], measure: str) -> dict:
    """F1 on one general measure from seed-0 SFT at three LRs ({lr: {"gain": G, measure: D}})."""
    lo, mid, hi = sorted(sft)
    d = {lr: sft[lr][measure] for lr in sft}
    g = {lr: sft[lr]["gain"] for lr in sft}
    superlinear = d[mid] > 5 * max(d[lo], 0.0) and d[mid] > 0 and d[hi] > 4 * d[mid]
    g_max = max(g.values())
    keeps = g_max > 0 and g[lo] >= 0.5 * g_max and g[mid] >= 0.5 * g_max
    return {"holds": bool(superlinear and keeps), "superlinear_drift": bool(superlinear), "lower_lrs_keep_gain": bool(keeps),
            "drift": {str(k): v for k, v in d.items()}, "gain": {str(k): v for k, v in g.items()},
            "drift_ratios": [d[mid] / d[lo] if d[lo] > 0 else None, d[hi] / d[mid] if d[mid] > 0 else None],
            "gain_share_of_best": {str(k): v / g_max if g_max > 0 else None for k, v in g.items()}}


def talr_verdict(sft0: dict[float, dict], sft_mid: dict[int, dict], talr_mid: dict[int, dict],
                 measures=tuple(GENERAL)) -> dict:
    """TALR's advantage at the middle LR. sft0: seed-0 SFT per LR; sft_mid / talr_mid: per seed at the middle LR,
    each {"gain": G, <measure>: D}."""
    seeds = sorted(set(sft_mid) & set(talr_mid))
    out: dict = {"seeds": seeds, "domain": {}, "measures": {}}
    domain_ok = all(talr_mid[s]["gain"] >= 0.9 * sft_mid[s]["gain"] for s in seeds) and len(seeds) >= 2
    out["domain"] = {"ok": bool(domain_ok), **{str(s): {"talr_gain": talr_mid[s]["gain"], "sft_gain": sft_mid[s]["gain"],
                     "ratio": talr_mid[s]["gain"] / sft_mid[s]["gain"] if sft_mid[s]["gain"] else None} for s in seeds}}
    below_all, refuted_any = True, False
    for m in measures:
        f = frontier([(v["gain"], v[m]) for v in sft0.values()])
        spread = max(abs(sft_mid[seeds[0]][m] - sft_mid[seeds[-1]][m]), abs(talr_mid[seeds[0]][m] - talr_mid[seeds[-1]][m]))
        margins = {s: f(talr_mid[s]["gain"]) - talr_mid[s][m] for s in seeds}
        below = all(margins[s] > 2 * spread for s in seeds)
        on_or_above = all(margins[s] <= 0 for s in seeds)
        below_all &= below
        refuted_any |= on_or_above
        out["measures"][m] = {"spread": spread, "margins": {str(s): v for s, v in margins.items()},
                              "below_by_more_than_2_spread": bool(below), "on_or_above_frontier": bool(on_or_above),
                              "frontier_points": f.points}
    if domain_ok and below_all:
        out["verdict"] = "holds"
    elif refuted_any:
        out["verdict"] = "refuted"
    else:
        failed = [] if domain_ok else ["domain gain < 90% of SFT's in a seed"]
        failed += [f"{m}: not below the frontier by > 2x the seed spread in both seeds"
                   for m, v in out["measures"].items() if not v["below_by_more_than_2_spread"]]
        out["verdict"] = "inconclusive"
        out["why"] = failed
    return out


# -- reading the runs ---------------------------------------------------------------------------------

def step_rows(results: Path) -> list[dict]:
    steps = _json(results / "steps.json") if (results / "steps.json").exists() else []
    base = _json(results / "base" / "summary.json").get("final", {})
    rows = []
    for entry in steps:
        name = entry["step"]
        if name == "data":
            continue
        m = STEP.match(name)
        final = _json(results / entry["dir"] / "summary.json").get("final", {})
        row = {"step": name, "method": m["method"] if m else name, "lr": float(m["lr"]) if m else None,
               "seed": int(m["seed"] or 0) if m else None, DOMAIN: final.get(DOMAIN), ANSWER: final.get(ANSWER),
               "wall_time_s": entry.get("wall_time_s")}
        for key in GENERAL:
            row[key] = 0.0 if name == "base" else final.get(key)
        row["gain"] = base.get(DOMAIN) - row[DOMAIN] if base.get(DOMAIN) is not None and row[DOMAIN] is not None else None
        row["answer_gain"] = (base.get(ANSWER) - row[ANSWER]
                              if base.get(ANSWER) is not None and row[ANSWER] is not None else None)
        rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> dict:
    fits = [r for r in rows if r["lr"] is not None and r["gain"] is not None
            and all(r[k] is not None for k in GENERAL)]
    sft0 = {r["lr"]: r for r in fits if r["method"] == "sft" and r["seed"] == 0}
    out: dict = {}
    if len(sft0) == 3:
        out["F1"] = {m: f1_verdict(sft0, m) for m in GENERAL}
        flags = [v["holds"] for v in out["F1"].values()]
        out["F1"]["overall"] = "holds" if all(flags) else "partially holds" if any(flags) else "does not hold"
        mid = sorted(sft0)[1]
        sft_mid = {r["seed"]: r for r in fits if r["method"] == "sft" and r["lr"] == mid}
        talr_mid = {r["seed"]: r for r in fits if r["method"] == "talr" and r["lr"] == mid}
        if len(set(sft_mid) & set(talr_mid)) >= 2:
            out["TALR"] = talr_verdict(sft0, sft_mid, talr_mid)
        others = {}
        for r in fits:  # outside the verdict: TALR at the other LRs, FLOW, L2 — their margins to the frontier
            if r["method"] != "sft" and not (r["method"] == "talr" and r["lr"] == mid):
                others[r["step"]] = {m: frontier([(v["gain"], v[m]) for v in sft0.values()])(r["gain"]) - r[m]
                                     for m in GENERAL}
        out["margins_outside_the_verdict"] = others
    return out


def curves(results: Path, name: str) -> dict[str, list[tuple[float, float]]]:
    """Per-epoch series of one run: drift measures at epoch ends, and epoch means of τ / hard-weight share."""
    out: dict[str, list] = defaultdict(list)
    per_epoch: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in _metrics(results / name / "metrics.csv"):
        step = int(row["step"]) if row.get("step") not in (None, "") else None
        for key in (*GENERAL, "train/token_share_p_gt_0.2"):
            if row.get(key) not in (None, "") and step is not None:
                out[key].append((step / STEPS_PER_EPOCH, float(row[key])))
        for key in ("train/tau", "train/hard_weight_share"):
            if row.get(key) not in (None, "") and row.get("epoch") not in (None, ""):
                per_epoch[key][int(float(row["epoch"]))].append(float(row[key]))
    for key, epochs in per_epoch.items():
        out[key] = [(e + 1, sum(v) / len(v)) for e, v in sorted(epochs.items())]
    record = _json(results / name / "hard_token_probs.json")
    out["hard_tokens/mean_p"] = [(h["step"] / STEPS_PER_EPOCH, h["mean_p"]) for h in record.get("history", [])]
    return {k: sorted(set(v)) for k, v in out.items()}


# -- output -------------------------------------------------------------------------------------------

def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}" if not math.isnan(v) else "nan"
    return str(v)


def write_markdown(rows: list[dict], verdict: dict, results: Path) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    with open(results / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (results / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    text = ["# Miniature v2: verdict against the pre-registered criteria (DESIGN.md, this folder)", ""]
    if "F1" in verdict:
        text.append(f"**F1: {verdict['F1']['overall']}.**")
        for m, v in verdict["F1"].items():
            if m != "overall":
                text.append(f"- {GENERAL[m]} (`{m}`): holds = {v['holds']} (drift rises faster than the LR: "
                            f"{v['superlinear_drift']}, ratios {[_cell(x) for x in v['drift_ratios']]}; lower LRs keep "
                            f"≥ half of the best gain: {v['lower_lrs_keep_gain']}, shares "
                            f"{ {k: _cell(x) for k, x in v['gain_share_of_best'].items()} })")
    if "TALR" in verdict:
        t = verdict["TALR"]
        text += ["", f"**TALR's advantage at the middle LR: {t['verdict']}.**" + (f" ({'; '.join(t['why'])})" if t.get("why") else "")]
        text.append(f"- domain gain ≥ 90% of SFT's in both seeds: {t['domain']['ok']} "
                    f"({ {s: _cell(v['ratio']) for s, v in t['domain'].items() if s != 'ok'} })")
        for m, v in t["measures"].items():
            text.append(f"- {GENERAL[m]}: margins below the SFT frontier { {s: _cell(x) for s, x in v['margins'].items()} }, "
                        f"seed spread {_cell(v['spread'])} (needs > {_cell(2 * v['spread'])})")
    if verdict.get("margins_outside_the_verdict"):
        text += ["", "Margins below the SFT frontier of runs outside the verdict (positive = below):"]
        text += [f"- {k}: " + ", ".join(f"{m} {_cell(x)}" for m, x in v.items())
                 for k, v in verdict["margins_outside_the_verdict"].items()]
    (results / "verdict.md").write_text("\n".join(text) + "\n")


def plot(rows: list[dict], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = [r for r in rows if r["lr"] is not None and r["gain"] is not None]
    colors = {r["step"]: f"C{i % 10}" for i, r in enumerate(fits)}  # one color per step in every panel
    sft0 = [r for r in fits if r["method"] == "sft" and r["seed"] == 0]
    fig, axes = plt.subplots(1, len(GENERAL), figsize=(6 * len(GENERAL), 4.5))
    for ax, (m, label) in zip(axes, GENERAL.items()):
        usable = [r for r in sft0 if r[m] is not None]
        if usable:
            f = frontier([(r["gain"], r[m]) for r in usable])
            xs = [p[0] for p in f.points]
            ax.plot(xs, [p[1] for p in f.points], "k--", lw=1, label="SFT frontier (seed 0, with the base model)")
        markers = {"sft": "o", "talr": "s", "flow": "^", "l2": "D"}
        for r in fits:
            if r[m] is None:
                continue
            color = colors[r["step"]]  # a hollow marker (second seed) needs its edge colored
            ax.scatter(r["gain"], r[m], marker=markers.get(r["method"], "x"), s=50, edgecolors=color,
                       facecolors="none" if r["seed"] else color, label=r["step"])
            ax.annotate(r["step"].replace("_lr", " "), (r["gain"], r[m]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel="domain gain: base − final held-out CoT-target NLL (nats/token)", ylabel=f"{label} (nats/token)",
               title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(results / f"tradeoff.{ext}", dpi=150, bbox_inches="tight")
    plt.close(fig)

    panels = [*GENERAL, "train/tau", "train/hard_weight_share", "train/token_share_p_gt_0.2", "hard_tokens/mean_p"]
    titles = [*GENERAL.values(), "TALR τ (epoch mean)", "weight share on tokens with p < 0.2 (epoch mean)",
              "share of training tokens with p > 0.2", "mean p of the base model's 16 hardest tokens"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    for ax, key, title in zip(axes.flat, panels, titles):
        for r in fits:
            series = curves(results, r["step"]).get(key, [])
            if series:
                ax.plot([x for x, _ in series], [y for _, y in series], "o-" if r["method"] == "sft" else "s--",
                        ms=3, color=colors[r["step"]], label=r["step"])
        ax.set(title=title, xlabel="epoch")
        if key == "hard_tokens/mean_p":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(results / f"curves.{ext}", dpi=150, bbox_inches="tight")
    plt.close(fig)


def write_results(results: Path) -> dict:
    results = Path(results)
    rows = step_rows(results)
    verdict = verdicts(rows)
    write_markdown(rows, verdict, results)
    if any(r["lr"] is not None for r in rows):
        plot(rows, results)
    return verdict


if __name__ == "__main__":
    print(json.dumps(write_results(Path(sys.argv[1] if len(sys.argv) > 1 else "results/miniature_v2")), indent=1))
