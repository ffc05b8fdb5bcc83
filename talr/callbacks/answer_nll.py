"""Held-out NLL of the answer span alone (`val/answer_nll`), beside the whole target's `val/nll`.

A CoT target is an explanation followed by `"answer": "<value>"`; its mean token NLL is dominated by the
explanation. This callback reads the per-token losses the validation step already computed (the module's public
`last_eval_tokens`, a `talr.token_stats.TokenLosses`, like `last_train_tokens` in training), keeps the tokens that spell
the value of the last `"answer": "` in the decoded target, and logs their mean NLL once per validation epoch
(summed over every batch and rank, then divided). No extra forward pass.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback

log = logging.getLogger(__name__)
ANSWER_KEY = '"answer": "'


def answer_span(tokenizer, target_ids: list[int], key: str = ANSWER_KEY) -> list[bool]:
    """Which of the target's tokens overlap the characters of the value after the last `key` (up to the
    closing quote). All False when the decoded target has no such key."""
    ends = [len(tokenizer.decode(target_ids[: i + 1])) for i in range(len(target_ids))]
    text = tokenizer.decode(target_ids)
    at = text.rfind(key)
    if at < 0:
        return [False] * len(target_ids)
    start = at + len(key)
    stop = text.find('"', start)
    stop = len(text) if stop < 0 else stop
    begins = [0, *ends[:-1]]
    return [b < stop and e > start for b, e in zip(begins, ends)]


class AnswerSpanNLL(Callback):
    """Log `<stage>/answer_nll`: the mean NLL of the answer value's tokens over the validation set.

    Args:
        key: the text that precedes the answer value in the target (MedCalc's JSON: `"answer": "`).
    """

    def __init__(self, key: str = ANSWER_KEY):
        self.key = key
        self._spans: dict[tuple[str, int], list[bool]] = {}
        self._sums = torch.zeros(2, dtype=torch.float64)
        self._warned = False
        self._counted = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        stats = getattr(pl_module, "last_eval_tokens", None)
        if stats is None or stats is self._counted:
            if stats is None and not self._warned:
                log.warning("AnswerSpanNLL: %s sets no `last_eval_tokens`; nothing is logged", type(pl_module).__name__)
                self._warned = True
            return
        self._counted = stats  # each batch once
        losses, mask = (t.detach().cpu() for t in stats)
        ids = batch["input_ids"].cpu()
        for b in range(losses.shape[0]):
            positions = mask[b].nonzero().flatten()
            if positions.numel() == 0:
                continue
            key = ("test" if trainer.testing else "val", int(batch["index"][b])) if "index" in batch else None
            span = self._spans.get(key) if key is not None else None
            if span is None:
                span = answer_span(pl_module.tokenizer, ids[b, positions + 1].tolist(), self.key)
                if key is not None:
                    self._spans[key] = span
            chosen = positions[torch.tensor(span, dtype=torch.bool)]
            self._sums += torch.tensor([float(losses[b, chosen].double().sum()), float(chosen.numel())],
                                       dtype=torch.float64)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        sums = self._sums.to(pl_module.device)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) == 0:
            return
        stage = "test" if trainer.testing else "val"
        pl_module.log(f"{stage}/answer_nll", float(sums[0] / sums[1]), sync_dist=False)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end
