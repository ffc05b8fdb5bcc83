"""Code-length drift on general prompts: the paper's ΔL(P1) (Prop. 3.1), measured cheaply during training.

The paper measures general-capability loss as the change in code length on data the starting model
already models well: ΔL(P1) = KL(P1‖q_new) − KL(P1‖q_old) = E_{x~P1}[−log q_new(x)] − E[−log q_old(x)].
We take P1 to be the base model's own greedy answers to a fixed set of short general prompts
(instruction following, math word problems, code; `talr/general/data/drift_prompts.jsonl`), so

    drift/nll        = mean per-token NLL of those answers under the current model
    drift/nll_delta  = drift/nll − the same under the base model (exactly 0 before any update)

The answers are generated once at train start (batched greedy decoding); afterwards each measurement
is one batched forward pass over ~32 short sequences: seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from talr.callbacks.metrics import model_and_tokenizer, publish_metrics
from talr.chat import ChatFormat, chat_format_of
from talr.general.evaluate import preserved_state
from talr.generation import greedy_answers, pad_id_of

log = logging.getLogger(__name__)


def load_prompts(prompts_file: str | Path | None = None, num_prompts: int | None = None) -> list[str]:
    """Prompts from a JSON-lines file ({"prompt": ...} per line); default: the shipped general set."""
    if prompts_file is None:
        text = resources.files("talr.general").joinpath("data", "drift_prompts.jsonl").read_text("utf-8")
        source = "talr/general/data/drift_prompts.jsonl"
    else:
        text, source = Path(prompts_file).expanduser().read_text("utf-8"), str(prompts_file)
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{source}, line {i}: expected an object with a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], apply_chat_template: bool = True,
                   chat_format: ChatFormat | None = None) -> list[list[int]]:
    """Token ids of each prompt as a user turn with the generation prompt, rendered by the run's chat format
    (its template kwargs, e.g. Qwen3's `enable_thinking: false`); plain text without a chat template."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        fmt = chat_format if chat_format is not None else ChatFormat.from_tokenizer(tokenizer)
        return [fmt.encode(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_nll(
    model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int, batch_size: int
) -> float:
    """Mean per-token NLL (nats) of the answers given their prompts, over all answer tokens."""
    device = _device(model)
    total, count = torch.zeros((), dtype=torch.float64), 0
    pairs = [(p, a) for p, a in zip(prompt_ids, answer_ids, strict=True) if a]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [p + a for p, a in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)  # right padding
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, a) in enumerate(chunk):
            target[row, len(p) : len(p) + len(a)] = True
        scored = target[:, 1:]  # position t predicts token t+1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored], reduction="sum")
        total += nll.double().cpu()
        count += int(scored.sum())
    return float(total / max(count, 1))


class CodeLengthDriftCallback(Callback):
    """Log `drift/nll` and `drift/nll_delta` (ΔL on the base model's general answers) every N steps.

    Args:
        prompts_file: JSON-lines file of {"prompt": ...}; None = the shipped 32 general prompts.
        every_n_steps: measure every n optimizer steps (and once at train start: delta 0; and at train end).
        max_new_tokens: length cap of the base model's greedy answers.
        num_prompts: use only the first n prompts.
        batch_size: sequences per forward pass.
        apply_chat_template: wrap prompts in the tokenizer's chat template (when it has one), rendered with the
            run's chat format (`datamodule.chat_format`: the template kwargs of training, e.g. Qwen3's
            `enable_thinking: false`; answers stop at its end-of-turn ids).

    Every rank computes the same numbers (cheap; keeps sharded forward passes in lockstep);
    loggers write on rank 0.
    """

    def __init__(
        self,
        prompts_file: str | None = None,
        every_n_steps: int = 10,
        max_new_tokens: int = 64,
        num_prompts: int | None = None,
        batch_size: int = 8,
        apply_chat_template: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("every_n_steps, max_new_tokens and batch_size must be >= 1")
        self.prompts_file, self.num_prompts = prompts_file, num_prompts
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.batch_size, self.apply_chat_template = batch_size, apply_chat_template
        self.prompt_ids: list[list[int]] | None = None
        self.answer_ids: list[list[int]] | None = None
        self.base_nll: float | None = None
        self.pad_id = 0
        self.last_step: int | None = None

    def setup_reference(self, model, tokenizer, chat_format: ChatFormat | None = None) -> float:
        """Generate the base answers with `model` and record their NLL under it (the reference)."""
        fmt = (chat_format if chat_format is not None else ChatFormat.from_tokenizer(tokenizer)).for_model(model)
        prompts = load_prompts(self.prompts_file, self.num_prompts)
        self.prompt_ids = encode_prompts(tokenizer, prompts, self.apply_chat_template, fmt)
        self.pad_id = pad_id_of(tokenizer, fmt)
        with preserved_state(model):
            self.answer_ids = greedy_answers(model, tokenizer, self.prompt_ids, self.max_new_tokens, self.batch_size,
                                             fmt)
        self.base_nll = self.nll(model)
        return self.base_nll

    def nll(self, model) -> float:
        if self.prompt_ids is None or self.answer_ids is None:
            raise RuntimeError("call setup_reference(base_model, tokenizer) first")
        with preserved_state(model):
            return answer_nll(model, self.prompt_ids, self.answer_ids, self.pad_id, self.batch_size)

    def measure(self, model) -> dict[str, float]:
        """{"drift/nll": NLL now, "drift/nll_delta": NLL now − NLL under the base model}."""
        nll = self.nll(model)
        return {"drift/nll": nll, "drift/nll_delta": nll - self.base_nll}

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from talr.distributed import refuse_fsdp1

        refuse_fsdp1(trainer, "CodeLengthDriftCallback")  # FSDP2: every rank runs the same forward passes

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.base_nll is not None:  # restored from a checkpoint: keep the original reference
            return
        if trainer.global_step > 0:
            log.warning("CodeLengthDriftCallback: resuming at step %d without a stored reference; "
                        "drift is measured from the resumed weights", trainer.global_step)
        model, tokenizer = model_and_tokenizer(pl_module)
        base = self.setup_reference(model, tokenizer, chat_format_of(pl_module, trainer))
        self.last_step = trainer.global_step
        publish_metrics(trainer, {"drift/nll": base, "drift/nll_delta": 0.0}, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            model, _ = model_and_tokenizer(pl_module)
            publish_metrics(trainer, self.measure(model), step)
            self.last_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final model's drift (for the run summary), unless it was just measured at this step."""
        if self.base_nll is not None and trainer.global_step != self.last_step:
            model, _ = model_and_tokenizer(pl_module)
            publish_metrics(trainer, self.measure(model), trainer.global_step)
            self.last_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "answer_ids": self.answer_ids, "base_nll": self.base_nll,
                "pad_id": self.pad_id, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("prompt_ids", "answer_ids", "base_nll", "pad_id", "last_step"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
