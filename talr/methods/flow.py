"""FLOW (Sanyal et al., ICML 2025): per-sample weights from the initial model's loss, fixed for training."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from talr.callbacks.metrics import publish_metrics
from talr.data.encoding import Collator
from talr.losses import flow_sample_weights, sequence_mean_losses, weighted_token_loss_sum
from talr.methods.sft import SFT
from talr.modeling import cache_dir, model_fingerprint

log = logging.getLogger(__name__)


class FLOW(SFT):
    """w_s = exp(−L_s(θ0)/τ), L_s the mean token loss of sample s under the initial model, τ the median of
    L_s over the training set; computed once before the first step, not renormalised; loss Σ_s w_s Σ_i ℓ_i / N.

    Args:
        flow_batch_size: batch size of the one forward pass over the training set.
        flow_cache: directory of the cached weights (default `$TALR_CACHE/flow`), keyed by the model's weights,
            dtype, precision, attention kernel and the encoded training data, so a re-run does not recompute;
            null or "" disables caching. Rank 0 reads and writes it and broadcasts the weights, so it may be
            node-local.
    """

    def __init__(self, *args, flow_batch_size: int = 8, flow_cache: str | None = "default", **kwargs):
        super().__init__(*args, **kwargs)
        self.flow_batch_size = flow_batch_size
        self.flow_cache = flow_cache
        self.register_buffer("flow_weights", torch.empty(0))  # saved in checkpoints: resume reuses them
        self.flow_tau = float("nan")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the weights' size is the training set's, unknown until they are computed or loaded
        if prefix + "flow_weights" in state_dict:
            self.flow_weights = torch.empty_like(state_dict[prefix + "flow_weights"], device=self.flow_weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_fit_start(self) -> None:
        if self.flow_weights.numel():
            return  # restored from a checkpoint
        examples = self.trainer.datamodule.examples["train"]
        strategy, rank_zero = self.trainer.strategy, self.trainer.is_global_zero
        # Rank 0 alone decides between the cache and computing (every rank takes part in the computation, a
        # collective under FSDP): per-rank decisions split the ranks when a cache is node-local or another
        # job writes it meanwhile, and the ranks then wait on each other forever.
        path = self._cache_path(examples) if rank_zero else None
        cached = _read_cache(path) if path is not None else None
        if strategy.broadcast(cached is not None, src=0):
            weights, tau = (cached["weights"], cached["tau"]) if rank_zero else (None, None)
            if rank_zero:
                log.info("FLOW weights loaded from %s", path)
        else:
            losses = self._initial_sample_losses(examples)
            weights, tau = flow_sample_weights(losses)
            weights, tau = weights.cpu(), tau.cpu()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                torch.save({"weights": weights, "tau": tau, "losses": losses.cpu(), "key": self._cache_key()}, tmp)
                tmp.replace(path)
        weights, tau = strategy.broadcast((weights, tau), src=0)  # every rank trains with rank 0's weights
        self.flow_weights, self.flow_tau = weights.to(self.device), float(tau)
        w = self.flow_weights
        stats = {"flow/tau": self.flow_tau, "flow/weight_mean": float(w.mean()), "flow/weight_min": float(w.min()),
                 "flow/weight_median": float(w.median()), "flow/weight_max": float(w.max())}
        publish_metrics(self.trainer, stats, step=0)
        if rank_zero:
            log.info("FLOW: %s", ", ".join(f"{k}={v:.4f}" for k, v in stats.items()))

    @torch.no_grad()
    def _initial_sample_losses(self, examples: list[dict]) -> torch.Tensor:
        """Mean token loss of every training example under the current (initial) model. Each rank scores
        the examples i ≡ rank (mod world) and the results are summed across ranks. Every rank runs the same
        number of forward passes of the same batch size (under FSDP each is a collective): a rank with fewer
        examples pads with copies of one of them, whose results are dropped."""
        from lightning.pytorch.utilities import move_data_to_device
        from tqdm.auto import tqdm

        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = [examples[i] for i in range(rank, len(examples), world)]
        per_rank = -(-len(examples) // world)
        padding = {**examples[0], "index": -1}  # a real example: the model sees nothing unusual
        mine += [padding] * (per_rank - len(mine))
        loader = DataLoader(mine, batch_size=self.flow_batch_size, collate_fn=Collator(self.tokenizer.pad_token_id))
        losses = torch.zeros(len(examples), dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        for batch in tqdm(loader, desc="FLOW: initial-model losses", disable=not self.trainer.is_global_zero):
            batch = move_data_to_device(batch, self.device)
            token_losses, mask = self.token_losses(batch)
            per_sample = sequence_mean_losses(token_losses, mask)  # nan without a supervised token: weight 0
            real = batch["index"] >= 0
            losses[batch["index"][real]] = per_sample[real].double()
        self.model.train(was_training)
        if world > 1:
            losses = self.trainer.strategy.reduce(losses, reduce_op="sum")
        return losses.float()

    def _cache_key(self) -> dict:
        """Everything besides the encoded data that changes the initial-model losses: which weights (hub commit
        or local file identity), dtype and precision, attention kernel, and how the examples were built
        (max length, over-long policy, chat template variables; the token ids are hashed separately).
        Not the loss chunk size: chunking gives the same losses."""
        hp, dm = self.hparams, self.trainer.datamodule
        config = getattr(self.model, "config", None)
        return {
            "version": 2,
            "pretrained": hp.pretrained,
            "weights": model_fingerprint(hp.pretrained, hp.get("revision")),  # `revision` if SFT gains one
            "dtype": hp.dtype,
            "precision": str(self.trainer.precision),
            "attn_implementation": hp.attn_implementation or getattr(config, "_attn_implementation", None),
            "max_length": getattr(dm, "max_length", None),
            "overlong": getattr(dm, "overlong", None),
            "chat_template_kwargs": getattr(dm, "chat_template_kwargs", None),
        }

    def _cache_path(self, examples: list[dict]) -> Path | None:
        if not self.flow_cache:
            return None
        root = cache_dir() / "flow" if self.flow_cache == "default" else Path(self.flow_cache)
        key = hashlib.sha256(json.dumps(self._cache_key(), sort_keys=True, default=str).encode())
        for e in examples:
            key.update(json.dumps(e["input_ids"]).encode() + json.dumps(e["labels"]).encode())
        return root / f"{key.hexdigest()[:24]}.pt"

    def weighted_loss_sum(self, token_losses, mask, batch):
        weights = self.flow_weights[batch["index"]]
        return weighted_token_loss_sum(token_losses, mask, weights), {}


def _read_cache(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # a damaged file is a miss, not a crash on rank 0 while the others wait
        log.warning("FLOW cache %s unreadable (%s); recomputing", path, err)
        return None
