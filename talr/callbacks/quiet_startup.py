"""What Lightning prints when a run starts, without the noise: a one-line model summary (Lightning's table has
a FLOPs column that is always 0 here, as no `example_input_array` exists), no advertising tips ("💡 Tip:
… litlogger / litmodels") or notice that this summary replaced Lightning's, and no deprecation warnings that
Lightning's or peft's own code triggers in torch or transformers.

`quiet_third_party()` is idempotent and narrow: it drops only those messages. `SFT` calls it on creation and
returns `CompactModelSummary` from `configure_callbacks` in place of Lightning's default summary (a summary
configured explicitly with another depth is kept; `enable_model_summary: false` still turns it off).
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

log = logging.getLogger("talr.model")
# Lightning adds RichModelSummary when rich is installed: to replace it (configure_callbacks replaces the
# trainer's callbacks whose class ours subclasses) ours must derive from it.
_DEFAULT_SUMMARY = RichModelSummary if _RICH_AVAILABLE else ModelSummary


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("💡 Tip:"):
            return False
        # Lightning announcing that CompactModelSummary (returned by SFT.configure_callbacks) replaces its default
        return not (message.startswith("The following callbacks returned in `LightningModule.configure_callbacks`")
                    and message.endswith((": RichModelSummary", ": ModelSummary")))


_TIPS = _DropTips()


def quiet_third_party() -> None:
    """Drop Lightning's tips and the deprecation warnings its own code raises (not ours, not the user's)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _TIPS not in logger.filters:
            logger.addFilter(_TIPS)
    # torch 2.13 deprecates what lightning/pytorch/utilities/_pytree.py (Lightning 2.6) calls on every batch
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # transformers 5 deprecates what peft 0.21's PeftModel.__init__ reads (every LoRA model, and its FSDP2 copy)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class CompactModelSummary(_DEFAULT_SUMMARY):
    """One log line: the model class, parameter counts (trainable share) and size in memory."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes, total_flops: int = 0, **kwargs) -> None:
        columns = dict(summary_data)
        types = dict(zip(columns.get("Name", []), columns.get("Type", [])))
        share = trainable_parameters / max(total_parameters, 1)
        log.info("model: %s, %.1f M parameters, %.1f M trainable (%.1f%%), %.0f MB", types.get("model", "?"),
                 total_parameters / 1e6, trainable_parameters / 1e6, 100 * share, model_size)


def compact_summary_for(trainer) -> list:
    """[CompactModelSummary()] when the trainer has Lightning's default summary (depth 1), else []."""
    defaults = [c for c in trainer.callbacks if type(c) in (ModelSummary, RichModelSummary) and c._max_depth == 1]
    return [CompactModelSummary()] if defaults else []
