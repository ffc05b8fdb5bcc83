"""A second P1 for the code-length drift: the NLL of fixed human-written answers (e.g. GSM8K solutions).

`talr.general.CodeLengthDriftCallback` measures ΔL(P1) on the base model's own greedy answers to shipped
prompts. This callback measures the same quantity on answers the model did not write: the first
`num_examples` (prompt, answer) rows of a JSON-lines file, each scored as a chat turn (the prompt as the user
message, the answer as the assistant message followed by the end-of-turn token). Logged:

    drift/<name>_nll        mean per-token NLL of those answers under the current model
    drift/<name>_nll_delta  the same minus its value under the base model (exactly 0 before any update)

One batched forward pass per measurement; every rank computes it (FSDP2 forward passes stay in lockstep).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer

from talr.callbacks.metrics import model_and_tokenizer, publish_metrics
from talr.general.drift import CodeLengthDriftCallback, encode_prompts

log = logging.getLogger(__name__)


def load_pairs(data_file: str | Path, prompt_key: str, answer_key: str, num_examples: int) -> list[tuple[str, str]]:
    """The first `num_examples` (prompt, answer) pairs of a JSON-lines file."""
    pairs = []
    for i, line in enumerate(Path(data_file).expanduser().read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
            raise ValueError(f"{data_file}, line {i}: expected non-empty strings {prompt_key!r} and {answer_key!r}")
        pairs.append((prompt, answer))
        if len(pairs) == num_examples:
            break
    if not pairs:
        raise ValueError(f"{data_file}: no rows")
    return pairs


class ReferenceTextNLL(CodeLengthDriftCallback):
    """ΔL on fixed human-written answers, logged as `drift/<name>_nll(_delta)` every N steps.

    Args:
        data_file: JSON-lines file, e.g. `../shared/data/gsm8k/test.jsonl` ({"question", "answer"} rows).
        name: metric name part (`gsm8k` gives `drift/gsm8k_nll_delta`).
        prompt_key, answer_key: the fields holding the prompt and the human-written answer.
        num_examples: the first n rows of the file.
        every_n_steps: measure every n optimizer steps (and once at train start: delta 0).
        batch_size: sequences per forward pass.
        apply_chat_template: wrap prompts in the tokenizer's chat template (when it has one).
    """

    def __init__(self, data_file: str, name: str = "gsm8k", prompt_key: str = "question", answer_key: str = "answer",
                 num_examples: int = 16, every_n_steps: int = 10, batch_size: int = 8,
                 apply_chat_template: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, batch_size=batch_size, apply_chat_template=apply_chat_template)
        if num_examples < 1:
            raise ValueError("num_examples must be >= 1")
        self.data_file, self.name = data_file, name
        self.prompt_key, self.answer_key, self.num_examples = prompt_key, answer_key, num_examples

    def setup_reference(self, model, tokenizer, chat_format=None) -> float:
        pairs = load_pairs(self.data_file, self.prompt_key, self.answer_key, self.num_examples)
        self.prompt_ids = encode_prompts(tokenizer, [p for p, _ in pairs], self.apply_chat_template)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for _, a in pairs]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.base_nll = self.nll(model)
        return self.base_nll

    def measure(self, model) -> dict[str, float]:
        nll = self.nll(model)
        return {f"drift/{self.name}_nll": nll, f"drift/{self.name}_nll_delta": nll - self.base_nll}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.base_nll is not None:  # restored from a checkpoint: keep the original reference
            return
        model, tokenizer = model_and_tokenizer(pl_module)
        base = self.setup_reference(model, tokenizer)
        self.last_step = trainer.global_step
        publish_metrics(trainer, {f"drift/{self.name}_nll": base, f"drift/{self.name}_nll_delta": 0.0},
                       trainer.global_step)
