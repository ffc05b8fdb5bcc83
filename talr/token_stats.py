"""What the module exposes of each micro-batch's loss, for callbacks (the public interface of `talr.methods.SFT`).

After every training micro-batch `SFT.last_train_tokens`, and after every evaluation batch
`SFT.last_eval_tokens`, hold a `TokenLosses`: the per-token −log p the step computed (detached, fp32) and the
mask of the positions that count. Callbacks read them in `on_train_batch_end` / `on_validation_batch_end`
(`talr.callbacks.HardTokenShare`, `talr.callbacks.AnswerSpanNLL`): no extra forward pass. Position t scores
token t + 1 of `batch["input_ids"]` (the labels are shifted, not the logits). A pair unpacks like a tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenLosses(NamedTuple):
    """One batch's per-token losses: `losses` (B, T) fp32 −log p of the next token, `mask` (B, T) bool —
    supervised positions (in evaluation, also only the rows this rank scores)."""

    losses: torch.Tensor
    mask: torch.Tensor
