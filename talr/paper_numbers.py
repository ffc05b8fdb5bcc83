"""The numbers the paper reports (Lin et al., "SFT Doesn't Always Hurt General Capabilities", arXiv 2509.20758),
as data, so `talr report` and the figure notebooks can put them beside ours.

What is here (docs/PAPER.md lists the same numbers with their caveats): MedCalc-Bench, domain score / general
score (both in [0, 1]); the "mean" row of the paper's methods table at LR 1e-6 and 5e-6; and every per-model
cell the paper prints at 1e-6, for Qwen2.5-3B-Instruct and Qwen3-4B, all six methods. The printed "mean" is
not the mean of those two models (it is probably over three models, the third not recovered), so it is kept
as printed. ESCI tables, per-benchmark (IFEval / GSM8K / HumanEval) numbers and the 2e-5 results were not
published in what we could read, and the supervision format of these numbers is not stated there either, so
lookups ignore the format. "–" cells of the paper's table are simply absent.
"""

from __future__ import annotations

SOURCE = "Lin et al., SFT Doesn't Always Hurt General Capabilities (arXiv 2509.20758), as listed in docs/PAPER.md"
MEAN = "mean"  # the `model` of a number averaged over the paper's models
MODELS = ("Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct", "Qwen3-4B", "gemma-3-4b-it")
METHOD_NAMES = {"sft": "SFT", "l2": "L2", "lora": "LoRA", "wiseft": "WiSE-FT", "flow": "FLOW", "talr": "TALR"}

# The paper's MedCalc table as printed: (model, lr) -> each method's (domain score, general score), methods in the
# order of METHOD_NAMES; None where the paper prints "–".
_MEDCALC: dict[tuple[str, float], tuple[tuple[float, float] | None, ...]] = {
    (MEAN, 1e-6): ((0.534, 0.692), (0.506, 0.697), (0.181, 0.490), (0.198, 0.727), (0.469, 0.692), (0.501, 0.717)),
    (MEAN, 5e-6): ((0.558, 0.381), (0.555, 0.395), None, None, (0.553, 0.450), (0.542, 0.502)),
    ("Qwen2.5-3B-Instruct", 1e-6):
        ((0.495, 0.620), (0.490, 0.621), (0.126, 0.583), (0.195, 0.629), (0.364, 0.597), (0.481, 0.648)),
    ("Qwen3-4B", 1e-6):
        ((0.548, 0.784), (0.469, 0.796), (0.195, 0.764), (0.143, 0.788), (0.477, 0.787), (0.489, 0.788)),
}

# (domain, model, method, lr) -> (domain score, general score)
REPORTED: dict[tuple[str, str, str, float], tuple[float, float]] = {
    ("medcalc", model, method, lr): cell
    for (model, lr), cells in _MEDCALC.items()
    for method, cell in zip(METHOD_NAMES, cells, strict=True)
    if cell is not None
}


def same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def lookup(domain: str, model: str, method: str, lr: float) -> tuple[float, float] | None:
    """(domain, general) the paper reports for this cell, or None. `model` is a folder name such as
    "Qwen3-4B" (a hub id "Qwen/Qwen3-4B" works too) or MEAN."""
    model = model.rsplit("/", 1)[-1]
    for (d, m, meth, r), value in REPORTED.items():
        if d == domain and m == model and meth == method and same_lr(r, lr):
            return value
    return None


def rows() -> list[dict]:
    """The reported numbers as flat records (for tables and plots)."""
    return [{"domain": d, "model": m, "method": meth, "lr": r, "domain_score": v[0], "general_score": v[1]}
            for (d, m, meth, r), v in REPORTED.items()]
