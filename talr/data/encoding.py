"""Chat-template encoding with completion-only labels, the over-long policy, and padding collate."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from talr.chat import ChatFormat
from talr.tasks.base import Task

log = logging.getLogger(__name__)
IGNORE = -100
OverlongPolicy = Literal["truncate", "skip", "error"]


def encode_chat(tokenizer, messages: list[dict], target: str, chat_format: ChatFormat | None = None,
                **template_kwargs) -> tuple[list[int], list[int]]:
    """(prompt_ids, full_ids) where the prompt is tokenised on its own, with the generation prompt.

    The labels are full_ids[len(prompt_ids):]: exactly the assistant turn, found by position, never by
    searching for a response template. The turn ends at its last end-of-turn token (`chat_format`'s, e.g.
    `<|im_end|>`, Gemma's `<end_of_turn>`); what the template appends after it (e.g. a newline) is dropped,
    so the last supervised token is the end-of-turn token. `template_kwargs` (without `chat_format`):
    the chat format is the tokenizer's with these template variables.
    """
    fmt = chat_format if chat_format is not None else ChatFormat.from_tokenizer(tokenizer, template_kwargs)
    prompt = fmt.encode(tokenizer, messages, add_generation_prompt=True)
    full = fmt.encode(tokenizer, messages + [{"role": "assistant", "content": target}], add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template renders the prompt differently with and without the assistant turn; "
            "completion-only labels need the prompt to be a prefix of the full conversation"
        )
    completion = full[len(prompt):]
    return prompt, full[: len(prompt) + fmt.completion_end(completion)]


def encode_rows(
    task: Task,
    rows: Sequence[Mapping],
    tokenizer,
    max_length: int,
    overlong: OverlongPolicy = "truncate",
    split: str = "",
    progress: bool = True,
    template_kwargs: dict | None = None,
    chat_format: ChatFormat | None = None,
) -> tuple[list[dict], Counter]:
    """Encode rows into examples {input_ids, labels, prompt_ids, row}; returns them and counts of what the
    over-long policy did. `truncate` shortens the task's free-text field (e.g. the patient note) until the
    example fits; the target is never cut. An example that cannot fit is skipped and counted.
    `chat_format` (talr.chat): the run's; default: the tokenizer's, with `template_kwargs`."""
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    examples = []
    fmt = chat_format if chat_format is not None else ChatFormat.from_tokenizer(tokenizer, template_kwargs)
    for row in tqdm(rows, desc=f"tokenizing {split}", disable=not progress, leave=False):
        prompt, full = encode_chat(tokenizer, task.messages(row), task.target(row), fmt)
        if len(full) > max_length:
            if overlong == "error":
                raise ValueError(f"{split} row {row.get(task.id_column, '?')}: {len(full)} tokens > max_length {max_length}")
            fitted = _shorten_to_fit(task, row, tokenizer, max_length, fmt) if overlong == "truncate" else None
            if fitted is None:
                counts["skipped_overlong"] += 1
                continue
            row, prompt, full = fitted
            counts["truncated"] += 1
        labels = [IGNORE] * len(prompt) + full[len(prompt):]
        examples.append({"input_ids": full, "labels": labels, "prompt_ids": prompt, "row": dict(row)})
        counts["kept"] += 1
    if counts["truncated"] or counts["skipped_overlong"]:
        log.warning("%s: %d examples over %d tokens: %d truncated (%s shortened), %d skipped", split,
                    counts["truncated"] + counts["skipped_overlong"], max_length, counts["truncated"],
                    task.shorten_column, counts["skipped_overlong"])
    return examples, counts


def _shorten_to_fit(task: Task, row: Mapping, tokenizer, max_length: int, fmt: ChatFormat):
    """Largest prefix (by a binary search over the kept fraction) of the free-text field that fits."""
    if task.shorten_column is None:
        return None
    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        short = task.shorten(row, mid)
        prompt, full = encode_chat(tokenizer, task.messages(short), task.target(short), fmt)
        if len(full) <= max_length:
            best, lo = (short, prompt, full), mid
        else:
            hi = mid
    if best is None:
        short = task.shorten(row, 0.0)
        prompt, full = encode_chat(tokenizer, task.messages(short), task.target(short), fmt)
        best = (short, prompt, full) if len(full) <= max_length else None
    return best


class Collator:
    """Right-padded training batches; with `with_prompts`, also left-padded prompts for generation."""

    def __init__(self, pad_id: int, with_prompts: bool = False):
        self.pad_id = pad_id
        self.with_prompts = with_prompts

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
            "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        }
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(e["labels"])
        if self.with_prompts:
            pwidth = max(len(e["prompt_ids"]) for e in examples)
            batch["prompt_input_ids"] = torch.full((len(examples), pwidth), self.pad_id, dtype=torch.long)
            batch["prompt_attention_mask"] = torch.zeros((len(examples), pwidth), dtype=torch.long)
            for i, e in enumerate(examples):
                n = len(e["prompt_ids"])
                batch["prompt_input_ids"][i, pwidth - n:] = torch.tensor(e["prompt_ids"])
                batch["prompt_attention_mask"][i, pwidth - n:] = 1
            batch["rows"] = [e["row"] for e in examples]
        return batch
