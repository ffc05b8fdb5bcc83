"""Callbacks: run summaries, HF export, general-capability evaluation and code-length drift."""

from talr.callbacks.answer_nll import AnswerSpanNLL
from talr.callbacks.export import ExportHF
from talr.callbacks.hard_token_probs import HardTokenProbs
from talr.callbacks.preemption import CheckpointOnSigterm
from talr.callbacks.summary import RunSummary
from talr.callbacks.reference_nll import ReferenceTextNLL
from talr.callbacks.token_share import HardTokenShare

__all__ = ["AnswerSpanNLL", "CheckpointOnSigterm", "ExportHF", "HardTokenProbs", "HardTokenShare", "ReferenceTextNLL",
           "RunSummary"]
