"""Callbacks: run summaries, HF export, SIGTERM checkpoints, RNG state, hard-token share and probabilities,
answer-span and reference-text NLL; `metrics.publish_metrics`, the one way they log outside `self.log`.

Loaded lazily (like `talr.general`): `talr.callbacks.metrics` can be imported by modules the callbacks
themselves import (the drift callback) without a cycle.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnswerSpanNLL": "talr.callbacks.answer_nll",
    "CheckpointOnSigterm": "talr.callbacks.preemption",
    "ExportHF": "talr.callbacks.export",
    "HardTokenProbs": "talr.callbacks.hard_token_probs",
    "HardTokenShare": "talr.callbacks.token_share",
    "ReferenceTextNLL": "talr.callbacks.reference_nll",
    "RunSummary": "talr.callbacks.summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'talr.callbacks' has no attribute {name!r}")
