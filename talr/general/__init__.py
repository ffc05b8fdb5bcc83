"""General-capability evaluation: IFEval, GSM8K and HumanEval through lm-eval, offline or online.

    evaluate_general(model, tokenizer, ...)  -> results dict (talr.general.evaluate)
    flat_metrics(result)                     -> {"general/<task>/<metric>": v, "general/score": v}
    GeneralEvalCallback(...)                 Lightning callback (talr.general.callbacks)
    CodeLengthDriftCallback(...)             ΔL(P1) on general prompts (talr.general.drift)
    ensure_punkt_tab()                       IFEval's NLTK data, produced offline (talr.general.nltk_data)
    main(argv)                               `python -m talr evaluate` (talr.general.cli)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_general": "talr.general.evaluate",
    "flat_metrics": "talr.general.evaluate",
    "headline_metrics": "talr.general.evaluate",
    "GeneralEvalCallback": "talr.general.callbacks",
    "CodeLengthDriftCallback": "talr.general.drift",
    "ensure_punkt_tab": "talr.general.nltk_data",
    "PAPER_TASKS": "talr.general.lm_tasks",
    "HEADLINE": "talr.general.lm_tasks",
    "main": "talr.general.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: importing talr.general stays cheap (no lightning / lm-eval)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'talr.general' has no attribute {name!r}")
