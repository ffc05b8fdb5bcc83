"""Figure 3a: the probability of a fixed set of hard tokens across training.

At train start the callback takes the first `num_examples` training examples (in the split's order), runs the
base model over them once under no_grad and picks the `num_tokens` supervised (example, position) pairs with
the lowest probability p = exp(−ℓ): the base model's hardest tokens. It then measures p at exactly those pairs
again every `every_n_steps` optimizer steps and at the end of every epoch (one forward pass over the same few
examples each time) and writes the history to `<log_dir>/hard_token_probs.json`, which
`notebooks/figure3_tokens.ipynb` plots.

The forward pass is the module's own `token_losses` (plain or chunked loss; FSDP2 shards included). Under
FSDP2 every forward is a collective, so every rank measures, on the same examples, at the same steps (all
triggers depend only on the global step and epoch, which all ranks share); only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import move_data_to_device

from talr.callbacks.metrics import publish_metrics

log = logging.getLogger(__name__)


class HardTokenProbs(Callback):
    """Record p of the base model's `num_tokens` hardest supervised tokens in `num_examples` training examples.

    Args:
        num_examples: how many training examples (the first ones of the train split) the tokens come from.
        num_tokens: how many (example, position) pairs to follow: the lowest-p supervised tokens overall.
        every_n_steps: also measure every n optimizer steps (0: only at train start and at each epoch end).
        filename: JSON written to the run's log dir on rank 0 (None: keep it in memory only).
    """

    def __init__(self, num_examples: int = 4, num_tokens: int = 16, every_n_steps: int = 0,
                 filename: str | None = "hard_token_probs.json"):
        if num_examples < 1 or num_tokens < 1 or every_n_steps < 0:
            raise ValueError("num_examples and num_tokens must be >= 1, every_n_steps >= 0")
        self.num_examples, self.num_tokens = num_examples, num_tokens
        self.every_n_steps, self.filename = every_n_steps, filename
        self.pairs: list[dict] = []
        self.history: list[dict] = []
        self._batch: dict | None = None
        self._log_dir: Path | None = None

    # -- measurement -----------------------------------------------------------------------------
    def _examples_batch(self, trainer) -> dict:
        from talr.data.encoding import Collator

        examples = trainer.datamodule.examples["train"][: self.num_examples]
        return Collator(trainer.datamodule.tokenizer.pad_token_id)(examples)

    def token_probs(self, pl_module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, mask) of every next token of `batch` under the module's current weights; p on the CPU, float64."""
        batch = move_data_to_device(batch, pl_module.device)
        model = pl_module.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses, mask = pl_module.token_losses(batch)
        finally:
            model.train(training)
        return torch.exp(-losses.double()).cpu(), mask.cpu()

    def _pick(self, pl_module, batch: dict, probs: torch.Tensor, mask: torch.Tensor) -> list[dict]:
        flat = torch.where(mask, probs, torch.full_like(probs, float("inf"))).flatten()
        k = min(self.num_tokens, int(mask.sum()))
        order = torch.argsort(flat, stable=True)[:k]  # ties: the earlier position first, on every rank alike
        width = probs.shape[1]
        tokenizer = getattr(pl_module, "tokenizer", None)
        pairs = []
        for i in sorted(order.tolist()):
            b, t = divmod(i, width)
            token_id = int(batch["input_ids"][b, t + 1])
            pairs.append({"example": b, "position": t, "token_id": token_id,
                          "token": tokenizer.decode([token_id]) if tokenizer is not None else None})
        return pairs

    def measure(self, trainer, pl_module) -> dict:
        probs, _ = self.token_probs(pl_module, self._batch)
        p = [float(probs[q["example"], q["position"]]) for q in self.pairs]
        entry = {"step": trainer.global_step, "epoch": trainer.current_epoch, "p": p,
                 "mean_p": sum(p) / len(p) if p else float("nan")}
        self.history.append(entry)
        publish_metrics(trainer, {"hard_tokens/mean_p": entry["mean_p"]}, trainer.global_step)
        self._write(trainer)
        return entry

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: on every rank, here

    def on_train_start(self, trainer, pl_module) -> None:
        self._batch = self._examples_batch(trainer)
        if self.pairs:  # restored from a checkpoint: keep the base model's choice
            return
        probs, mask = self.token_probs(pl_module, self._batch)
        self.pairs = self._pick(pl_module, self._batch, probs, mask)
        rows = self._batch.get("index")
        for q in self.pairs:
            q["train_index"] = int(rows[q["example"]]) if rows is not None else q["example"]
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and self._last_step() != step:
            self.measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._last_step() != trainer.global_step:
            self.measure(trainer, pl_module)

    def _last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def _write(self, trainer) -> None:
        if not self.filename or not trainer.is_global_zero or self._log_dir is None:
            return
        path = self._log_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"num_examples": self.num_examples, "pairs": self.pairs,
                                    "history": self.history}, indent=1) + "\n")

    def state_dict(self) -> dict:
        return {"pairs": self.pairs, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pairs = list(state_dict.get("pairs", []))
        self.history = list(state_dict.get("history", []))
