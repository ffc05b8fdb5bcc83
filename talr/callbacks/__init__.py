"""Callbacks: run summaries, HF export, general-capability evaluation and code-length drift."""

from talr.callbacks.export import ExportHF
from talr.callbacks.preemption import CheckpointOnSigterm
from talr.callbacks.summary import RunSummary

__all__ = ["CheckpointOnSigterm", "ExportHF", "RunSummary"]
