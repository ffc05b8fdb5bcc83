"""The base LightningModule: the model, the loss, optimisation. Every method is a subclass overriding one hook:

  * `weighted_loss_sum(token_losses, mask, batch)` — the loss numerator Σ w_i ℓ_i (TALR, DFT, FLOW);
  * `after_gradient_normalized()` — add a regulariser's gradient (L2-to-init);
  * `prepare_model(model)` — change what is trained (LoRA).

Each optimizer step's gradient is exactly that of Σ w_i ℓ_i / N, N the supervised tokens of the whole step over
every micro-batch and rank, judged finite once for all ranks (`talr.methods.exact_step`). Domain evaluation
(held-out NLL, generation, the task's scoring, the baseline before step 0) is `talr.tasks.evaluator`.

Public attributes other components read (documented interface; nothing private is read from outside):
`model`, `tokenizer`; `last_train_tokens` / `last_eval_tokens` (`talr.token_stats.TokenLosses` of the last
micro-batch); `baseline` (domain `val/*` before training) and `general_baseline` (`general/*` before training,
written by `talr.general.GeneralEvalCallback`); `last_val` (the latest domain results); `tokens_seen`,
`skipped_steps`.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from talr.callbacks.quiet_startup import compact_summary_for, quiet_third_party
from talr.methods.exact_step import ExactSteps, NonFiniteError, StepWindow
from talr.modeling import BUILTIN, load_model, load_tokenizer
from talr.tasks.evaluator import DomainEvaluation
from talr.token_stats import TokenLosses

log = logging.getLogger(__name__)
__all__ = ["SFT", "NonFiniteError"]


class SFT(ExactSteps, DomainEvaluation, L.LightningModule):
    """Completion-only supervised fine-tuning (the paper's SFT baseline and the base of every method).

    Args:
        pretrained: HF hub id, local HF directory, local `.gguf` file, or `builtin:SmolLM2-135M-Instruct`.
        dtype: weights dtype (`float32`, `bfloat16`, `float16`); use Trainer `precision` for autocast.
        trust_remote_code: allow code shipped in the model repo to run (off by default).
        attn_implementation: e.g. `sdpa`, `eager`, `flash_attention_2` (transformers' default if unset).
        lr: peak learning rate (the paper: 1e-6, 5e-6, 2e-5).
        weight_decay: AdamW weight decay on matrices (not on norms and biases).
        betas: AdamW betas.
        warmup_ratio: share of optimiser steps of linear warmup.
        min_lr_ratio: cosine decay floor as a share of `lr`.
        gradient_checkpointing: recompute activations in backward to save memory.
        max_new_tokens: greedy generation budget for domain accuracy.
        generate_in_eval: score greedy generations in validation/test (off: loss only).
        baseline_eval: evaluate the domain before the first step, logged as `baseline/val/*` and step 0.
        nonfinite: on a non-finite loss or gradient, `stop` with an error naming the step, or `skip` the step
            (counted in `train/skipped_steps`).
        loss_chunk_size: > 0 computes the per-token loss over chunks of this many tokens without materialising
            the full (B, T, V) logits (`talr.ops`; same losses and gradients); 0 = full logits.
        decoder_layer_classes: class names of the model's repeated decoder block (default: its
            `_no_split_modules`): the units FSDP2 shards under `ModelParallelStrategy` and `compile` compiles.
            (Was `fsdp_layer_classes`.)
        fsdp_reshard_after_forward: True = full shard (ZeRO-3); False = keep each layer's gathered weights
            from forward to backward (shard-grad-op, ZeRO-2-like: less communication, more memory).
        fsdp_mixed_precision: under `ModelParallelStrategy`, FSDP2's own mixed precision: `bf16`/`fp16` gathers
            and computes in that dtype, reduces gradients in fp32 and keeps fp32 sharded weights and optimizer
            state (`talr.distributed.shard_model`). Use it with Trainer precision `32-true`; `null` (default)
            computes in the weights' dtype (`bf16-mixed` autocast then does the casting instead).
        compile: `torch.compile` each decoder block in place (parameter names unchanged; works with FSDP2).
    """

    def __init__(
        self,
        pretrained: str = BUILTIN,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 256,
        generate_in_eval: bool = True,
        baseline_eval: bool = True,
        nonfinite: Literal["stop", "skip"] = "stop",
        loss_chunk_size: int = 0,
        decoder_layer_classes: list[str] | None = None,
        fsdp_reshard_after_forward: bool = True,
        fsdp_mixed_precision: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        quiet_third_party()  # Lightning's tips and the deprecation warnings its own code raises
        self.model = None
        self.tokenizer = None
        self.step_window = StepWindow()
        self.skipped_steps = 0
        self._t_batch = 0.0
        self.tokens_seen = 0
        self.baseline: dict[str, float] = {}
        self.general_baseline: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.last_train_tokens: TokenLosses | None = None
        self.evaluator = None  # a talr.tasks.evaluator.DomainEvaluator, built in `setup` from the run's task

    # -- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.pretrained, trust_remote_code=hp.trust_remote_code)
        model = load_model(hp.pretrained, hp.dtype, hp.trust_remote_code, hp.attn_implementation)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = self.prepare_model(model.train())  # from_pretrained returns eval mode
        if getattr(self, "_device_mesh", None) is not None:  # ModelParallelStrategy: FSDP2 on the data-parallel mesh
            from talr.distributed import shard_model

            shard_model(self.model, self.device_mesh, hp.decoder_layer_classes, activation_checkpointing=hp.gradient_checkpointing,
                        reshard_after_forward=hp.fsdp_reshard_after_forward, mixed_precision=hp.fsdp_mixed_precision)
        if hp.compile:
            self.compile_layers()

    def configure_callbacks(self) -> list:
        return compact_summary_for(self.trainer)  # Lightning's summary table, less its always-0 FLOPs column

    def compile_layers(self) -> None:
        from talr.distributed import decoder_layers

        for layer in decoder_layers(self.model, self.hparams.decoder_layer_classes):
            layer.compile()

    def prepare_model(self, model):
        """Hook: return the module to train (LoRA wraps it here)."""
        return model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- loss ------------------------------------------------------------------------------------
    def token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token −log p of each next token in fp32, and the supervised mask (both (B, T) or (B, T−1))."""
        if self.hparams.loss_chunk_size > 0:
            from talr.ops import causal_lm_token_losses

            return causal_lm_token_losses(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          chunk_size=self.hparams.loss_chunk_size)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # shift the labels, not the logits: a flat (B·T, V) view avoids copying the largest tensor
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100)
        return losses.view_as(labels), labels != -100

    def weighted_loss_sum(self, token_losses: torch.Tensor, mask: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Hook: Σ w_i ℓ_i over supervised tokens, and statistics to log. SFT: w_i = 1."""
        return token_losses.where(mask, 0.0).sum(), {}

    def after_gradient_normalized(self) -> None:
        """Hook: runs once per optimiser step after gradients hold d(Σ w ℓ / N)/dθ (L2 adds its term)."""

    def export_hf(self, path, dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (safetensors weights in `dtype`, default the training dtype; config;
        tokenizer). Call it on every rank: under FSDP2 the full weights are gathered into rank 0's CPU memory
        (`talr.distributed.unsharded_copy`), and only rank 0 writes."""
        from talr.distributed import unsharded_copy

        model = unsharded_copy(self.model)  # a collective when sharded; None on ranks other than 0
        if model is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        self.save_hf(model, path, dtype)

    def save_hf(self, model, path, dtype: torch.dtype | None = None) -> None:
        """Hook: write `model` (unsharded; the training model itself is never cast) and the tokenizer to `path`."""
        from talr.callbacks.export import cast_copy

        cast_copy(model, dtype, in_place=model is not self.model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["talr"] = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps, "baseline": self.baseline}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("talr", {})
        self.tokens_seen = state.get("tokens_seen", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.baseline = state.get("baseline", {})

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        token_losses, mask = self.token_losses(batch)
        self.last_train_tokens = TokenLosses(token_losses.detach(), mask)
        loss_sum, stats = self.weighted_loss_sum(token_losses, mask, batch)
        self.step_window.add(loss_sum, mask, batch["attention_mask"])
        denom = mask.sum().clamp_min(1)
        self.log("train/loss", loss_sum.detach() / denom, prog_bar=True)
        self.log("train/ce", token_losses.detach().where(mask, 0.0).sum() / denom)
        attention = batch["attention_mask"]  # padding waste of this batch (see data.group_by_length)
        self.log("train/padding_share", 1.0 - attention.sum() / attention.numel())
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        return loss_sum  # always (even non-finite): every rank must run the same backward and step

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        dt = max(time.perf_counter() - self._t_batch, 1e-9)
        self.log("train/tokens_per_s", batch["attention_mask"].sum().float() / dt)
        self.log("train/supervised_tokens_per_s", (batch["labels"] != -100).sum().float() / dt)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])


    def configure_optimizers(self):
        from talr.methods.optim import adamw_with_cosine_schedule

        return adamw_with_cosine_schedule(self)
