"""Domain evaluation of the model being trained: held-out NLL, greedy generation, the task's official scoring.

`DomainEvaluator` is what `talr.methods.SFT` delegates its validation and test steps to, and what evaluates the
domain outside Lightning's loop: before the first update (the baseline) and after the last one. Per batch it
scores the target's token NLL (from the module's own `token_losses`, the training loss's computation) and, with
generation on, decodes greedy answers (`module.generate`) and feeds them to the task's metrics
(`task.update_metrics`: the official scoring, e.g. MedCalc-Bench's tolerance rules).

Several processes: every rank evaluates its shard of the split (Lightning's distributed sampler inside the loop,
`talr.distributed.eval_shards` outside it); rows the sampler repeats to even out the shards are run (generation
under FSDP2 is a collective every rank must join) but not scored (`talr.distributed.owned_rows`), and the NLL
sums and the metric states are reduced over ranks, so the numbers equal one process's on the whole split.
"""

from __future__ import annotations

import logging

import torch

from talr.callbacks.metrics import publish_metrics
from talr.token_stats import TokenLosses

log = logging.getLogger(__name__)
STAGES = ("val", "test")


class DomainEvaluator(torch.nn.Module):
    """Accumulates one evaluation pass of a task and returns `<stage>/nll` and the task's metrics.

    Args:
        task: the run's `talr.tasks.Task` (its `metrics()` and `update_metrics`).
        generate: decode greedy answers and score them (off: NLL only).

    After each batch, `last_tokens` holds that batch's `TokenLosses` (read through `SFT.last_eval_tokens`).
    A module (torchmetrics states move with it to the device); it holds no persistent state.
    """

    def __init__(self, task, generate: bool = True):
        super().__init__()
        self.task = task
        self.generate = generate
        self.metrics = torch.nn.ModuleDict({s: task.metrics() for s in STAGES})
        self._nll = {s: [0.0, 0.0] for s in STAGES}  # Σ token NLL, number of tokens (this rank's rows)
        self.last_tokens: TokenLosses | None = None

    def step(self, module, batch: dict, stage: str) -> None:
        """Score one batch of `module`'s model: NLL of the targets and, if on, the greedy answers."""
        from talr.distributed import owned_rows

        token_losses, mask = module.token_losses(batch)
        own = owned_rows(batch["index"], module.trainer)
        mask = mask & own[:, None]  # rows repeated by the distributed sampler's padding are not scored
        self.last_tokens = TokenLosses(token_losses.detach(), mask)
        acc = self._nll[stage]
        acc[0] += float(token_losses.where(mask, 0.0).sum())
        acc[1] += float(mask.sum())
        if self.generate:
            # every row, padding too: under FSDP2 each generation step is a collective all ranks must join
            generations = module.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            keep = own.tolist()
            if any(keep):
                self.task.update_metrics(self.metrics[stage], [g for g, k in zip(generations, keep) if k],
                                         [r for r, k in zip(batch["rows"], keep) if k])

    def results(self, module, stage: str) -> dict[str, float]:
        """The pass's global results (a collective with several processes); resets the accumulators."""
        trainer = module.trainer
        nll = torch.tensor(self._nll[stage], dtype=torch.float64, device=module.device)
        if trainer.world_size > 1:
            nll = trainer.strategy.reduce(nll, reduce_op="sum")
        self._nll[stage] = [0.0, 0.0]
        out = {f"{stage}/nll": float(nll[0] / nll[1].clamp_min(1))}
        if self.generate:
            out.update({f"{stage}/{k}": float(v) for k, v in self.metrics[stage].compute().items()
                        if torch.as_tensor(v).numel() == 1})
            self.metrics[stage].reset()
        return out

    @torch.no_grad()
    def validate(self, module, desc: str) -> dict[str, float]:
        """The validation split outside Lightning's loop, on the shards that loop uses; the model is put in eval
        mode for the pass and restored after. Every rank must call it."""
        from lightning.pytorch.utilities import move_data_to_device
        from tqdm.auto import tqdm

        from talr.distributed import eval_shards

        trainer = module.trainer
        was_training = module.model.training
        module.model.eval()
        loader = eval_shards(trainer.datamodule.val_dataloader(), trainer)
        for batch in tqdm(loader, desc=desc, disable=not trainer.is_global_zero):
            self.step(module, move_data_to_device(batch, module.device), "val")
        module.model.train(was_training)
        results = self.results(module, "val")
        if trainer.is_global_zero:
            log.info("%s: %s", desc, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results


class DomainEvaluation:
    """LightningModule mixin: validation and test steps through a `DomainEvaluator`, the baseline before the first
    update and the final evaluation after the last. The host provides `model`, `tokenizer`, `token_losses(batch)`,
    `hparams.generate_in_eval`, `hparams.max_new_tokens`, `hparams.baseline_eval`, and the attributes `evaluator`,
    `baseline`, `last_val` (results) it fills; the trainer's datamodule provides `task` and the splits."""

    # (no class-level `evaluator = None`: it would shadow the submodule nn.Module registers on assignment)
    _validated_at: int | None = None  # global step of the last validation

    def setup(self, stage: str) -> None:
        self.evaluator = DomainEvaluator(self.trainer.datamodule.task, generate=self.hparams.generate_in_eval)

    @property
    def last_eval_tokens(self) -> TokenLosses | None:
        """The last evaluation batch's per-token losses and scored positions (`talr.token_stats`)."""
        return self.evaluator.last_tokens if self.evaluator is not None else None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy answers to left-padded prompts, stopped at the run's end-of-turn ids (talr.chat, talr.generation)."""
        from talr.chat import chat_format_of
        from talr.generation import decode_answers, greedy_generate

        chat_format = chat_format_of(self)
        answers = greedy_generate(self.model, self.tokenizer, input_ids, attention_mask, self.hparams.max_new_tokens,
                                  chat_format)
        return decode_answers(self.tokenizer, answers, chat_format)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.step(self, batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.step(self, batch, "test")

    def on_validation_epoch_end(self) -> None:
        results = self.evaluator.results(self, "val")
        if self.trainer.sanity_checking:
            return
        self.log_dict(results, sync_dist=True)  # already global: the mean over ranks of equal values is a no-op
        self.last_val, self._validated_at = results, self.global_step

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluator.results(self, "test"), sync_dist=True)

    def on_train_start(self) -> None:
        """Evaluate the domain before any update: the baseline every later score is compared to (logged at step 0
        as `val/*` and `baseline/val/*`, not exposed as the latest values)."""
        if self.hparams.baseline_eval and self.global_step == 0 and self.trainer.datamodule.examples.get("validation"):
            self.baseline = self.evaluator.validate(self, "baseline validation")
            publish_metrics(self.trainer, {**self.baseline, **{f"baseline/{k}": v for k, v in self.baseline.items()}},
                            step=0, expose=False)

    def on_train_end(self) -> None:
        """Evaluate the final model, unless the last validation ran at this very step: a run cut short by
        `max_steps` ends mid-epoch, where Lightning does not validate. `limit_val_batches: 0` turns it off."""
        if (self.trainer.datamodule.examples.get("validation") and self.trainer.limit_val_batches != 0
                and self._validated_at != self.global_step):
            self.last_val = self.evaluator.validate(self, "final validation")
            self._validated_at = self.global_step
            publish_metrics(self.trainer, self.last_val, step=self.global_step)
