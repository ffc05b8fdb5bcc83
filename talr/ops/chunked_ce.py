"""Per-token cross-entropy over the LM head without materialising the full (tokens, vocab) logits.

`chunked_token_losses(hidden, weight, labels)` equals
``F.cross_entropy(hidden @ weight.T (+ bias), labels, reduction="none", ignore_index=-100)`` computed in
fp32, and so do its gradients wrt `hidden`, `weight` and `bias` for any upstream gradient (TALR and FLOW
multiply the per-token losses by weights). Only ``(chunk_size, V)`` logits exist at a time, in forward
and in backward: the forward keeps the log-partition of each token (one float per token) and the
backward recomputes each chunk's logits from it. Ignored positions (label -100) are dropped before the
LM head, so their logits are never computed (completion-only SFT skips the prompt's share of the work).

Precision follows the plain path: the matmuls run in the compute dtype (the autocast dtype when
autocast is on, otherwise the inputs' promoted dtype), softmax and losses in fp32; the gradient of
`weight` is accumulated over chunks in fp32 and returned in `weight`'s dtype.

`causal_lm_token_losses(model, input_ids, attention_mask, labels)` runs a Hugging Face causal LM (or a
peft wrapper of one) through its root `forward` (so FSDP's hooks gather and reshard the parameters)
asking for the final hidden state and a single position's logits, then applies the chunked loss with
the usual shift: the (B, T-1) losses and supervised mask of `SFT.token_losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from talr.distributed import base_model, is_dtensor

IGNORE_INDEX = -100

__all__ = ["chunked_token_losses", "causal_lm_token_losses", "output_head"]


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of one chunk (h and w already in the compute dtype), and tanh(z/c) when soft-capped."""
    z = F.linear(h, w, b).float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _ChunkedCE(torch.autograd.Function):
    """Losses of rows whose labels are all valid (>= 0). Saves inputs and one log-partition per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, softcap, dtype):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z, _ = _logits(hidden[s:e].to(dtype), w, b, softcap)
                lse[s:e] = torch.logsumexp(z, dim=-1)
                losses[s:e] = lse[s:e] - z.gather(1, labels[s:e, None]).squeeze(1)
                del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.softcap, ctx.dtype = chunk_size, softcap, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, softcap, dtype = ctx.chunk_size, ctx.softcap, ctx.dtype
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_losses = grad_losses.float()
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            rows = torch.arange(min(chunk, n), device=hidden.device)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e].to(dtype)
                z, t = _logits(h, w, b, softcap)
                g = z.sub_(lse[s:e, None]).exp_()  # softmax, in place
                g[rows[: e - s], labels[s:e]] -= 1.0
                g.mul_(grad_losses[s:e, None])
                if t is not None:  # d(c·tanh(z/c))/dz = 1 − tanh²
                    g.mul_(1.0 - t * t)
                g = g.to(dtype)
                if need_h:
                    grad_h[s:e] = (g @ w).to(hidden.dtype)
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)  # in place, no (V, H) temporary
                elif need_w:
                    grad_w.add_(g.t() @ h)  # one bf16/fp16 product per chunk, summed in fp32
                if need_b:
                    grad_b.add_(g.sum(0))
                del z, g
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )


def _checkpointed(hidden, weight, bias, labels, chunk_size, softcap, dtype) -> Tensor:
    """The same losses with `torch.utils.checkpoint` per chunk (kept to compare against the Function)."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, w, b, y):
        with torch.autocast(h.device.type, enabled=False):
            z, _ = _logits(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), softcap)
            return F.cross_entropy(z, y, reduction="none")

    parts = [checkpoint(piece, hidden[s:s + chunk_size], weight, bias, labels[s:s + chunk_size], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def chunked_token_losses(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    softcap: float | None = None,
    impl: str = "function",
) -> Tensor:
    """Per-token −log p (fp32, shape of `labels`, 0 where the label is -100) of ``hidden @ weight.T + bias``.

    hidden: (..., H) final hidden states; weight: (V, H) output embedding (a plain tensor: under FSDP2 call
    this inside the root's forward or after it, when the weight is unsharded); labels: (...) the target
    at each position, already aligned (no shift here); chunk_size: tokens per chunk; softcap: Gemma-2-style
    final logit soft-capping ``c·tanh(z/c)``; impl: ``"function"`` (custom autograd, default) or
    ``"checkpoint"`` (torch.utils.checkpoint per chunk).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    if is_dtensor(weight):
        raise TypeError("weight is a sharded DTensor: compute the loss while the output layer is gathered "
                        "(after the FSDP root's forward, see causal_lm_token_losses)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    dtype = _compute_dtype(hidden, weight)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE_INDEX
    idx = valid.nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y = flat_labels.index_select(0, idx)
    if impl == "function":
        part = _ChunkedCE.apply(h, weight, bias, y, chunk_size, softcap, dtype)
    elif impl == "checkpoint":
        part = _checkpointed(h, weight, bias, y, chunk_size, softcap, dtype)
    else:
        raise ValueError(f"impl must be 'function' or 'checkpoint', got {impl!r}")
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((idx,), part).view(labels.shape)


# --- Hugging Face causal LMs -------------------------------------------------------------------

_UNSUPPORTED_SCALING = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> tuple[Tensor, Tensor | None, float | None]:
    """(weight, bias, softcap) of a causal LM's output layer; peft wrappers are looked through."""
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise NotImplementedError(
            f"chunked loss needs a plain nn.Linear output layer, got {type(head).__name__} "
            "(LoRA on lm_head or a custom head); use loss_chunk_size=0")
    cfg = getattr(base, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in _UNSUPPORTED_SCALING:
        if getattr(text_cfg, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(base).__name__} scales its logits ({name}); use loss_chunk_size=0")
    return head.weight, head.bias, getattr(text_cfg, "final_logit_softcapping", None)


def causal_lm_token_losses(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                           chunk_size: int = 1024, **model_kwargs) -> tuple[Tensor, Tensor]:
    """(B, T−1) fp32 per-token −log p of each next token and the supervised mask, like `SFT.token_losses`.

    The root forward runs (FSDP2 all-gathers there; the root stays unsharded until backward) with
    ``logits_to_keep=1`` and only the last hidden state kept; the head is then applied chunk by chunk.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=-1,
                logits_to_keep=1, use_cache=False, **model_kwargs)
    hidden = out.hidden_states[-1][:, :-1]
    weight, bias, softcap = output_head(model)
    if is_dtensor(weight) and hasattr(model, "unshard"):  # an FSDP2 root that resharded after forward
        model.unshard()  # gathered again; its backward reduce-scatters the gradient and reshards
        weight, bias, softcap = output_head(model)
    shifted = labels[:, 1:]
    losses = chunked_token_losses(hidden, weight, shifted, chunk_size=chunk_size, bias=bias, softcap=softcap)
    return losses, shifted != IGNORE_INDEX
