"""The base LightningModule: model loading, the training step, optimisation, logging, domain evaluation.

Every method is a subclass overriding one hook:
  * `weighted_loss_sum(token_losses, mask, batch)` — the loss numerator Σ w_i ℓ_i (TALR, DFT, FLOW);
  * `after_gradient_normalized()` — add a regulariser's gradient (L2-to-init);
  * `prepare_model(model)` — change what is trained (LoRA).

Normalisation is exact: the gradient of one optimiser step equals that of Σ w_i ℓ_i / N with N the
number of supervised tokens of the whole step, over every accumulation micro-batch and every rank.
Each micro-batch backpropagates its unnormalised sum; after the last backward of the step the gradients
are rescaled by accumulate · world_size / N (Lightning divides by `accumulate_grad_batches`, DDP/FSDP
average over ranks, and N is all-reduced). This avoids the "gradient accumulation bug" of
per-micro-batch means. The rescale runs in `on_after_backward` of the step's last micro-batch, so every
callback's `on_before_optimizer_step` (grad-norm monitors, Lightning's clipping) sees the true gradient.

Non-finite losses or gradients are judged once per optimizer step from a verdict all-reduced over ranks,
so every rank stops, or skips the step, together (`nonfinite`).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from talr.callbacks.quiet_startup import compact_summary_for, quiet_third_party
from talr.modeling import BUILTIN, load_model, load_tokenizer

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class SFT(L.LightningModule):
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
        fsdp_layer_classes: under `ModelParallelStrategy`, decoder-layer class names sharded as FSDP2 units
            (default: the model's `_no_split_modules`).
        fsdp_reshard_after_forward: True = full shard (ZeRO-3); False = keep each layer's gathered weights
            from forward to backward (shard-grad-op, ZeRO-2-like: less communication, more memory).
        fsdp_mixed_precision: under `ModelParallelStrategy`, FSDP2's own mixed precision: `bf16`/`fp16` gathers
            and computes in that dtype, reduces gradients in fp32 and keeps fp32 sharded weights and optimizer
            state (`talr.distributed.shard_model`). Use it with Trainer precision `32-true`; `null` (default)
            computes in the weights' dtype (`bf16-mixed` autocast then does the casting instead).
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
        fsdp_layer_classes: list[str] | None = None,
        fsdp_reshard_after_forward: bool = True,
        fsdp_mixed_precision: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        quiet_third_party()  # Lightning's tips and the deprecation warnings its own code raises
        self.model = None
        self.tokenizer = None
        self.register_buffer("_window_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_window_bad_losses", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_window_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.skipped_steps = 0
        self._closing_window = False
        self._t_batch = 0.0
        self.tokens_seen = 0
        self.baseline: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self._validated_at: int | None = None  # global step of the last validation

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

            shard_model(self.model, self.device_mesh, hp.fsdp_layer_classes, activation_checkpointing=hp.gradient_checkpointing,
                        reshard_after_forward=hp.fsdp_reshard_after_forward, mixed_precision=hp.fsdp_mixed_precision)
        if hp.compile:
            self.compile_layers()

    def configure_callbacks(self) -> list:
        return compact_summary_for(self.trainer)  # Lightning's summary table, less its always-0 FLOPs column

    def compile_layers(self) -> None:
        from talr.distributed import decoder_layers

        for layer in decoder_layers(self.model, self.hparams.fsdp_layer_classes):
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
        self._last_token_stats = (token_losses.detach(), mask)  # read by callbacks (HardTokenShare, Figure 3c)
        loss_sum, stats = self.weighted_loss_sum(token_losses, mask, batch)
        n = mask.sum()
        self._window_tokens += n
        self._window_bad_losses += (~torch.isfinite(loss_sum.detach())).double()  # judged once per step, all ranks
        self._window_seen += batch["attention_mask"].sum()
        denom = n.clamp_min(1)
        self.log("train/loss", loss_sum.detach() / denom, prog_bar=True)
        self.log("train/ce", token_losses.detach().where(mask, 0.0).sum() / denom)
        attention = batch["attention_mask"]  # padding waste of this batch (see data.group_by_length)
        self.log("train/padding_share", 1.0 - attention.sum() / attention.numel())
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        return loss_sum  # always (even non-finite): every rank must run the same backward and step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self._closing_window = True  # the closure about to run is the last micro-batch of this step
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            self._closing_window = False

    def on_after_backward(self) -> None:
        # After the window's last backward (gradients already reduced across ranks) and before any
        # callback's `on_before_optimizer_step`, which therefore sees the true gradient d(Σ w ℓ / N)/dθ.
        if self._closing_window:
            self._finish_gradient()

    def _finish_gradient(self) -> None:
        """Once per optimizer step: rescale to d(Σ w ℓ / N)/dθ, add the method's term, then decide — from
        verdicts all-reduced over ranks, so identically everywhere — whether the step is non-finite."""
        windows = (self._window_tokens, self._window_bad_losses, self._window_seen)
        totals = torch.stack(windows)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        n, bad_losses, seen = totals.tolist()
        for window in windows:
            window.zero_()
        self.tokens_seen += int(seen)  # every rank's tokens (summary.json), counted once per step
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(n, 1.0)
        params = self.trainable_parameters()
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self.after_gradient_normalized()
        if bad_losses:
            self._nonfinite(f"loss is non-finite in {int(bad_losses)} micro-batch(es), summed over ranks")
        elif grads and not self._all_finite(grads):
            self._nonfinite("gradient has non-finite values")
        else:
            return
        for p in params:  # skip: AdamW leaves parameters whose grad is None untouched
            p.grad = None

    def _all_finite(self, grads: list[torch.Tensor]) -> bool:
        """The same answer on every rank (all-reduced: FSDP2 ranks hold different shards). Per-tensor norms read each
        gradient once, no mask of its size; a norm is inf/nan iff an element is (or its square overflows)."""
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(local)).float().sum())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return not bool(bad)

    def _nonfinite(self, what: str) -> None:
        """Called on every rank with the same verdict: raise (`stop`) or count a skipped step (`skip`)."""
        step = self.global_step
        if self.hparams.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite training at optimizer step {step} (epoch {self.current_epoch}): {what}. "
                "The last checkpoint written before this step is intact; set model.init_args.nonfinite=skip to skip such steps."
            )
        self.skipped_steps += 1
        log.warning("skipping optimizer step %d: %s (%d skipped so far)", step, what, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        dt = max(time.perf_counter() - self._t_batch, 1e-9)
        self.log("train/tokens_per_s", batch["attention_mask"].sum().float() / dt)
        self.log("train/supervised_tokens_per_s", (batch["labels"] != -100).sum().float() / dt)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        decay, no_decay = [], []
        for p in self.trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_scheduler(
            "cosine_with_min_lr", optimizer, num_warmup_steps=int(hp.warmup_ratio * total), num_training_steps=total,
            scheduler_specific_kwargs={"min_lr_rate": hp.min_lr_ratio},
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- domain evaluation -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        task = self.trainer.datamodule.task
        self.eval_metrics = torch.nn.ModuleDict({s: task.metrics() for s in ("val", "test")})
        self._eval_nll = {s: [0.0, 0.0] for s in ("val", "test")}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy answers to left-padded prompts, stopped at the run's end-of-turn ids (talr.chat, talr.generation)."""
        from talr.chat import chat_format_of
        from talr.generation import decode_answers, greedy_generate

        chat_format = chat_format_of(self)
        answers = greedy_generate(self.model, self.tokenizer, input_ids, attention_mask, self.hparams.max_new_tokens,
                                  chat_format)
        return decode_answers(self.tokenizer, answers, chat_format)

    def _eval_step(self, batch: dict, stage: str) -> None:
        token_losses, mask = self.token_losses(batch)
        own = self._own_rows(batch)
        mask = mask & own[:, None]  # rows repeated by the distributed sampler's padding are not scored
        self._last_eval_token_stats = (token_losses.detach(), mask)  # read by talr.callbacks.AnswerSpanNLL
        acc = self._eval_nll[stage]
        acc[0] += float(token_losses.where(mask, 0.0).sum())
        acc[1] += float(mask.sum())
        if self.hparams.generate_in_eval:
            # every row, padding too: under FSDP2 each generation step is a collective all ranks must join
            generations = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            keep = own.tolist()
            if any(keep):
                self.trainer.datamodule.task.update_metrics(
                    self.eval_metrics[stage], [g for g, k in zip(generations, keep) if k],
                    [r for r, k in zip(batch["rows"], keep) if k])

    def _own_rows(self, batch: dict) -> torch.Tensor:
        from talr.distributed import owned_rows

        return owned_rows(batch["index"], self.trainer)

    def _eval_results(self, stage: str) -> dict[str, float]:
        nll = torch.tensor(self._eval_nll[stage], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            nll = self.trainer.strategy.reduce(nll, reduce_op="sum")
        self._eval_nll[stage] = [0.0, 0.0]
        out = {f"{stage}/nll": float(nll[0] / nll[1].clamp_min(1))}
        if self.hparams.generate_in_eval:
            out.update({f"{stage}/{k}": float(v) for k, v in self.eval_metrics[stage].compute().items()
                        if torch.as_tensor(v).numel() == 1})
            self.eval_metrics[stage].reset()
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        results = self._eval_results("val")
        if self.trainer.sanity_checking:
            return
        self.log_dict(results, sync_dist=True)  # already global: the mean over ranks of equal values is a no-op
        self.last_val, self._validated_at = results, self.global_step

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._eval_results("test"), sync_dist=True)

    def on_train_start(self) -> None:
        """Evaluate the domain before any update: the baseline every later score is compared to."""
        if self.hparams.baseline_eval and self.global_step == 0 and self.trainer.datamodule.examples.get("validation"):
            self.baseline = self._validate_now("baseline validation", step=0, also_as="baseline/")

    def on_train_end(self) -> None:
        """Evaluate the final model, unless the last validation ran at this very step: a run cut short by
        `max_steps` ends mid-epoch, where Lightning does not validate. `limit_val_batches: 0` turns it off."""
        if (self.trainer.datamodule.examples.get("validation") and self.trainer.limit_val_batches != 0
                and self._validated_at != self.global_step):
            self.last_val = self._validate_now("final validation", step=self.global_step)
            self._validated_at = self.global_step
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.last_val.items()})

    @torch.no_grad()
    def _validate_now(self, desc: str, step: int, also_as: str = "") -> dict[str, float]:
        """The validation split outside Lightning's loop, on the shards that loop uses (`eval_shards`); the
        results are logged at `step` (and again under the prefix `also_as`) and returned."""
        from lightning.pytorch.utilities import move_data_to_device
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        from talr.distributed import eval_shards

        loader = eval_shards(self.trainer.datamodule.val_dataloader(), self.trainer)
        for batch in tqdm(loader, desc=desc, disable=not self.trainer.is_global_zero):
            self._eval_step(move_data_to_device(batch, self.device), "val")
        self.model.train(was_training)
        results = self._eval_results("val")
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({**results, **({f"{also_as}{k}": v for k, v in results.items()} if also_as else {})},
                                   step=step)
            log.info("%s: %s", desc, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results
