"""One optimizer step's exact loss normalisation and its non-finite verdict (used by `talr.methods.SFT`).

Normalisation is exact: the gradient of one optimizer step equals that of Σ w_i ℓ_i / N with N the number of
supervised tokens of the whole step, over every accumulation micro-batch and every rank. Each micro-batch
backpropagates its unnormalised sum and adds its counts to a `StepWindow`; after the step's last backward the
window is all-reduced once and the gradients are rescaled by accumulate · world_size / N (Lightning divides by
`accumulate_grad_batches`, DDP/FSDP average over ranks). Per-micro-batch means would weight a token of a short
micro-batch more than one of a long micro-batch (the "gradient accumulation bug").

The rescale and the finiteness check are one fused pass over the gradients
(`torch._amp_foreach_non_finite_check_and_unscale_`, the kernel AMP's GradScaler uses: multiply every element by
the scale and raise a flag on any inf/nan), then the flag is all-reduced: FSDP2 ranks hold different shards, and
every rank must reach the same verdict so that all stop, or all skip the step, together. The verdict covers the
loss's gradient; a method's added term (`after_gradient_normalized`, e.g. L2's λ(θ − θ0)) runs after the check
and is finite whenever the weights are (a non-finite weight makes the next loss non-finite, which is caught).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with `nonfinite: stop`; the message names the optimizer step."""


class StepWindow(torch.nn.Module):
    """Counts of the micro-batches of the optimizer step in progress, kept on the device (no sync per
    micro-batch) and reduced once per step by `close`."""

    def __init__(self):
        super().__init__()
        for name in ("supervised", "bad_losses", "tokens"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64), persistent=False)

    def add(self, loss_sum: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One micro-batch: its supervised tokens, whether its loss is non-finite, its (non-padding) tokens."""
        self.supervised += mask.sum()
        self.bad_losses += (~torch.isfinite(loss_sum.detach())).double()
        self.tokens += attention_mask.sum()

    def close(self, trainer) -> tuple[float, float, float]:
        """(supervised tokens, non-finite micro-batch losses, tokens) of the step over every rank; resets."""
        totals = torch.stack([self.supervised, self.bad_losses, self.tokens])
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        for buffer in (self.supervised, self.bad_losses, self.tokens):
            buffer.zero_()
        supervised, bad, tokens = totals.tolist()
        return supervised, bad, tokens


def rescale_and_check(grads: list[torch.Tensor], scale: float, trainer) -> bool:
    """Multiply `grads` in place by `scale`; True when every rank's gradients are all finite (a collective
    with several processes). DTensor gradients are scaled through their local shards."""
    if not grads:
        return True
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    flag = torch.zeros(1, dtype=torch.float32, device=local[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(local, flag, torch.full((1,), scale, device=flag.device))
    if trainer.world_size > 1:
        flag = trainer.strategy.reduce(flag, reduce_op="sum")
    return not bool(flag)


class ExactSteps:
    """LightningModule mixin: closes every optimizer step's window after its last backward (the rescale, the
    method's `after_gradient_normalized` term, the non-finite verdict). The host provides `step_window` (a
    `StepWindow` the training step adds to), `trainable_parameters()`, `after_gradient_normalized()`,
    `hparams.nonfinite` (`stop` | `skip`), `tokens_seen` and `skipped_steps`."""

    _closing_window = False

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
            self.finish_gradient()

    def finish_gradient(self) -> None:
        """Once per optimizer step (`talr.methods.exact_step`): rescale to d(Σ w ℓ / N)/dθ and check finiteness in
        one pass, add the method's term, then act on the verdict, which is the same on every rank."""
        n, bad_losses, tokens = self.step_window.close(self.trainer)
        self.tokens_seen += int(tokens)  # every rank's tokens (summary.json), counted once per step
        params = self.trainable_parameters()
        grads = [p.grad for p in params if p.grad is not None]
        finite = rescale_and_check(grads, self.trainer.accumulate_grad_batches * self.trainer.world_size / max(n, 1.0),
                                   self.trainer)
        self.after_gradient_normalized()
        if not bad_losses and finite:
            return
        self.nonfinite_step(f"loss is non-finite in {int(bad_losses)} micro-batch(es), summed over ranks" if bad_losses
                            else "gradient has non-finite values")
        for p in params:  # skip: AdamW leaves parameters whose grad is None untouched
            p.grad = None

    def nonfinite_step(self, what: str) -> None:
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
