"""Callbacks: run summaries, HF export, general-capability evaluation and code-length drift."""

from talr.callbacks.export import ExportHF
from talr.callbacks.preemption import CheckpointOnSigterm
from talr.callbacks.summary import RunSummary
from talr.callbacks.token_share import HardTokenShare

__all__ = ["CheckpointOnSigterm", "ExportHF", "HardTokenShare", "RunSummary"]
