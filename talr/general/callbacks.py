"""Lightning callback: general-capability evaluation (IFEval, GSM8K, HumanEval) during fine-tuning.

Evaluates `pl_module.model` with `pl_module.tokenizer` through `talr.general.evaluate_general` before
the first step (the baseline), every `every_n_epochs` epochs and/or `every_n_steps` optimizer steps,
and after training; logs `general/<task>/<metric>`, `general/score` and the cost (`general/eval_seconds` for the
whole evaluation, `general/eval_seconds/<task>` for each task: `talr.general.evaluate.timed_tasks`) to every
logger at the current global step and puts them in `trainer.callback_metrics` (so
`ModelCheckpoint(monitor="general/score")` works), through `talr.callbacks.metrics.publish_metrics`. The baseline
is also kept as `pl_module.general_baseline` (a dict; the base module's public attribute) for run summaries.

Several processes, `data_parallel: true` (default): every rank evaluates its share of each task's documents
and lm-eval combines them exactly as one process would (`talr.general.sharded`; under FSDP2 each rank first gets
a full replica of the model on its device: one model in the training dtype per GPU during the evaluation).
`data_parallel: false`: only global rank 0 evaluates; the others wait at a barrier and then receive the
numbers by broadcast, so every rank logs and monitors the same values. The other ranks wait in a
collective for the whole evaluation, so the process-group timeout (Lightning default: 30 min) must exceed it, e.g.
`DDPStrategy(timeout=datetime.timedelta(hours=3))` (or `ModelParallelStrategy(timeout=...)`) for full
benchmarks on a large model.
Under FSDP2 (`ModelParallelStrategy`) every rank first takes part in gathering the full weights into
rank 0's CPU memory (`talr.distributed.unsharded_copy`); rank 0 moves that copy to its device, evaluates
it and frees it. Memory cost on rank 0 during an evaluation: one full copy of the model on its GPU (in the
training parameters' dtype, fp32 for the paper configs: 4 bytes × parameters) next to its shard, and
up to two in CPU memory while the copy is built. FSDP1 (`FSDPStrategy`) is refused at setup.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer

from talr.callbacks.metrics import model_and_tokenizer, publish_metrics
from talr.chat import chat_format_of
from talr.distributed import refuse_fsdp1, replicated_copy, unsharded_copy
from talr.general.evaluate import CODE_EXECUTION_HELP, evaluate_general, flat_metrics
from talr.general.lm_tasks import CODE_TASKS, PAPER_TASKS

log = logging.getLogger(__name__)


def eval_seconds(result: dict[str, Any]) -> dict[str, float]:
    """{"general/eval_seconds": the whole evaluation, "general/eval_seconds/<task>": the seconds spent on that task}
    (lm-eval task names, as in the metric keys: "humaneval_instruct" under a chat template)."""
    return {"general/eval_seconds": result["wall_time_s"],
            **{f"general/eval_seconds/{task}": s for task, s in result.get("task_wall_time_s", {}).items()}}


class GeneralEvalCallback(Callback):
    """Evaluate general capability (the paper's IFEval / GSM8K / HumanEval score) while training.

    Args:
        tasks: lm-eval task names; the paper's three by default. "humaneval" needs
            `allow_code_execution=True` (it runs model-written code).
        limit: documents per task (first N); None = the full benchmarks (slow on CPU).
        every_n_epochs: evaluate after every n-th training epoch; None/0 = never per epoch.
        every_n_steps: evaluate every n optimizer steps; None/0 = never per step.
        at_start: baseline before the first update (skipped when resuming at global_step > 0).
        at_end: evaluate when training ends (unless this step was just evaluated).
        apply_chat_template: use the tokenizer's chat template (when it has one), rendered with the run's chat
            format (`datamodule.chat_format`, i.e. `data.chat_template_kwargs`: the prompts training saw).
        data_dir: local benchmark data (layout in talr.general.lm_tasks); None = Hugging Face hub.
        allow_code_execution: opt in to HumanEval's code execution.
        batch_size: generation batch size.
        max_gen_toks: cap generated tokens per answer (None: each task's own); for quick checks only.
        seed: evaluation seeds (None: lm-eval's defaults); global RNG states are restored after.
        data_parallel: with several processes, every rank evaluates its share of the documents (same results as
            one process); false: rank 0 evaluates alone while the others wait.
    """

    def __init__(
        self,
        tasks: Sequence[str] = PAPER_TASKS,
        limit: int | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        apply_chat_template: bool = True,
        data_dir: str | None = None,
        allow_code_execution: bool = False,
        batch_size: int = 8,
        max_gen_toks: int | None = None,
        seed: int | None = None,
        data_parallel: bool = True,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if set(CODE_TASKS) & set(self.tasks) and not allow_code_execution:
            raise PermissionError(CODE_EXECUTION_HELP)
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.limit = limit
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_steps = every_n_steps or 0
        self.at_start, self.at_end = at_start, at_end
        self.apply_chat_template = apply_chat_template
        self.data_dir = str(Path(data_dir).expanduser()) if data_dir is not None else None
        self.allow_code_execution = allow_code_execution
        self.batch_size, self.max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self.data_parallel = data_parallel
        self.chat_format = None  # the run's talr.chat.ChatFormat, resolved at each evaluation
        self.last_step: int | None = None  # global step of the last evaluation
        self.history: list[dict[str, Any]] = []  # {"step", "epoch", "when", "metrics"} per evaluation

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_fsdp1(trainer, "GeneralEvalCallback")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module, "start")
        elif trainer.global_step > 0:  # resumed: the baseline comes from the checkpointed history
            start = [h["metrics"] for h in self.history if h["when"] == "start"]
            if start:
                pl_module.general_baseline = dict(start[0])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step != self.last_step:
                self.evaluate(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module, "end")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")
        self.history = list(state_dict.get("history", []))

    # -- evaluation ------------------------------------------------------------------------------
    def run_eval(self, model, tokenizer, data_parallel: bool = False) -> dict[str, Any]:
        return evaluate_general(
            model, tokenizer, tasks=self.tasks, limit=self.limit, apply_chat_template=self.apply_chat_template,
            batch_size=self.batch_size, max_gen_toks=self.max_gen_toks, data_dir=self.data_dir,
            allow_code_execution=self.allow_code_execution, seed=self.seed, chat_format=self.chat_format,
            **({"data_parallel": True} if data_parallel else {}),
        )

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, when: str) -> dict[str, float]:
        """Evaluate (every rank its share, or rank 0 alone), share the numbers with every rank, log them at the current
        step."""
        payload: dict[str, Any] = {}
        error: Exception | None = None
        model, tokenizer = model_and_tokenizer(pl_module)
        self.chat_format = chat_format_of(pl_module, trainer)
        data_parallel = self.data_parallel and trainer.world_size > 1  # every rank its share (talr.general.sharded)
        if data_parallel and self.limit is not None and self.limit < trainer.world_size:
            # fewer documents than ranks: some rank would have none to evaluate; rank 0 evaluates them all
            if when == "start" and trainer.is_global_zero:
                log.info("general eval: limit %d < %d ranks, evaluated on rank 0", self.limit, trainer.world_size)
            data_parallel = False
        # a collective under FSDP2: the full model on every rank / on rank 0's CPU (None elsewhere); else the model
        copy = replicated_copy(model) if data_parallel else unsharded_copy(model)
        if trainer.is_global_zero or data_parallel:
            try:
                if copy is not model:
                    copy = copy.to(pl_module.device)
                result = self.run_eval(copy, tokenizer, data_parallel=True) if data_parallel else self.run_eval(copy, tokenizer)
                payload = {"metrics": {**flat_metrics(result), **eval_seconds(result)}}
            except Exception as err:  # other ranks must not hang at the barrier
                error, payload = err, {"error": f"{type(err).__name__}: {err}"}
        del copy
        if trainer.world_size > 1 and not data_parallel:  # data parallel: every rank holds the combined results
            trainer.strategy.barrier("talr_general_eval")
            payload = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if "error" in payload:
            raise RuntimeError(f"general evaluation failed on rank 0: {payload['error']}")
        metrics = payload["metrics"]
        step = trainer.global_step
        publish_metrics(trainer, metrics, step)
        self.last_step = step
        if when == "start":  # the module's public baseline attribute, read by talr.callbacks.RunSummary
            pl_module.general_baseline = dict(metrics)
        self.history.append({"step": step, "epoch": trainer.current_epoch, "when": when, "metrics": metrics})
        if trainer.is_global_zero:
            shown = {k: v for k, v in metrics.items() if k == "general/score" or k.count("/") == 2}
            log.info("general eval (%s, step %d): %s", when, step,
                     ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        return metrics
