"""Greedy generation, one function for every consumer (domain evaluation, the drift callback).

`greedy_generate` decodes greedily (sampling settings of the model's generation config are overridden; its
other settings, e.g. Qwen2.5's repetition_penalty, apply as they do in lm-eval) and stops each sequence at
the first of the chat format's end-of-turn ids, which include the model's `generation_config.eos_token_id`
(Gemma-3-it: `<end_of_turn>`, not the tokenizer's `<eos>`). It returns the new tokens of each sequence up to
and including that stop token.

Under FSDP2 every forward pass is a collective, so all ranks must run the same number of decoding steps
even when their sequences finish at different times: transformers' `generate` sees the `fully_shard`-ed
model (`_is_fsdp_managed_module`) and steps every rank until all are done (`synced_gpus`); guarded by
tests/test_chat_format.py.
"""

from __future__ import annotations

import torch

from talr.chat import ChatFormat


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, left-padded to the longest (as generation needs)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def pad_id_of(tokenizer, chat_format: ChatFormat) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if chat_format.end_of_turn_ids:
        return chat_format.end_of_turn_ids[0]
    raise ValueError("the tokenizer has no pad token and the chat format no end-of-turn token to pad with")


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    chat_format: ChatFormat) -> list[list[int]]:
    """Greedy continuations of left-padded prompts: per row, the new token ids up to and including the first
    end-of-turn/stop id (all `max_new_tokens` when none comes)."""
    fmt = chat_format.for_model(model)
    stops = list(fmt.end_of_turn_ids)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=pad_id_of(tokenizer, fmt), eos_token_id=stops or None, use_cache=True,
    )
    return [fmt.cut_at_stop(row) for row in out[:, input_ids.shape[1]:].tolist()]


def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                   chat_format: ChatFormat) -> list[list[int]]:
    """`greedy_generate` over token-id prompts (e.g. the drift callback's), left-padded `batch_size` at a time."""
    pad, device = pad_id_of(tokenizer, chat_format.for_model(model)), next(model.parameters()).device
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[start : start + batch_size], pad, device)
        answers += greedy_generate(model, tokenizer, ids, mask, max_new_tokens, chat_format)
    return answers


def decode_answers(tokenizer, answers: list[list[int]], chat_format: ChatFormat) -> list[str]:
    """Text of each answer without special tokens, and without the thinking part when thinking is on."""
    return [chat_format.strip_thinking(tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
