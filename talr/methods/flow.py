"""FLOW (Sanyal et al., ICML 2025): per-sample weights from the initial model's loss, fixed for training."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from talr.data.encoding import Collator
from talr.losses import flow_sample_weights, weighted_token_loss_sum
from talr.methods.sft import SFT
from talr.modeling import cache_dir

log = logging.getLogger(__name__)


class FLOW(SFT):
    """w_s = exp(−L_s(θ0)/τ), L_s the mean token loss of sample s under the initial model, τ the median of
    L_s over the training set; computed once before the first step, not renormalised; loss Σ_s w_s Σ_i ℓ_i / N.

    Args:
        flow_batch_size: batch size of the one forward pass over the training set.
        flow_cache: directory of the cached weights (default `$TALR_CACHE/flow`), keyed by model, data
            and format, so a re-run does not recompute; null or "" disables caching.
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
        path = self._cache_path(examples)
        if path is not None and path.exists():
            cached = torch.load(path, weights_only=True)
            self.flow_weights, self.flow_tau = cached["weights"].to(self.device), float(cached["tau"])
            log.info("FLOW weights loaded from %s", path)
        else:
            losses = self._initial_sample_losses(examples)
            weights, tau = flow_sample_weights(losses)
            self.flow_weights, self.flow_tau = weights.to(self.device), float(tau)
            if path is not None and self.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save({"weights": weights.cpu(), "tau": tau.cpu(), "losses": losses.cpu()}, tmp)
                tmp.replace(path)
        w = self.flow_weights
        stats = {"flow/tau": self.flow_tau, "flow/weight_mean": float(w.mean()), "flow/weight_min": float(w.min()),
                 "flow/weight_median": float(w.median()), "flow/weight_max": float(w.max())}
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(stats, step=0)
            log.info("FLOW: %s", ", ".join(f"{k}={v:.4f}" for k, v in stats.items()))

    @torch.no_grad()
    def _initial_sample_losses(self, examples: list[dict]) -> torch.Tensor:
        """Mean token loss of every training example under the current (initial) model. Each rank scores
        the examples i ≡ rank (mod world) and the results are summed across ranks."""
        from lightning.pytorch.utilities import move_data_to_device
        from tqdm.auto import tqdm

        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = [examples[i] for i in range(rank, len(examples), world)]
        loader = DataLoader(mine, batch_size=self.flow_batch_size, collate_fn=Collator(self.tokenizer.pad_token_id))
        losses = torch.zeros(len(examples), dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        for batch in tqdm(loader, desc="FLOW: initial-model losses", disable=not self.trainer.is_global_zero):
            batch = move_data_to_device(batch, self.device)
            token_losses, mask = self.token_losses(batch)
            per_sample = token_losses.where(mask, 0.0).sum(1) / mask.sum(1).clamp_min(1)
            losses[batch["index"]] = per_sample.double()
        self.model.train(was_training)
        if world > 1:
            losses = self.trainer.strategy.reduce(losses, reduce_op="sum")
        return losses.float()

    def _cache_path(self, examples: list[dict]) -> Path | None:
        if not self.flow_cache:
            return None
        root = cache_dir() / "flow" if self.flow_cache == "default" else Path(self.flow_cache)
        key = hashlib.sha256()
        key.update(json.dumps([self.hparams.pretrained, self.hparams.dtype, _model_fingerprint(self.hparams.pretrained)]).encode())
        for e in examples:
            key.update(json.dumps(e["input_ids"]).encode() + json.dumps(e["labels"]).encode())
        return root / f"{key.hexdigest()[:24]}.pt"

    def weighted_loss_sum(self, token_losses, mask, batch):
        weights = self.flow_weights[batch["index"]]
        return weighted_token_loss_sum(token_losses, mask, weights), {}


def _model_fingerprint(name: str) -> str:
    """Size and mtime of local weight files, so a changed local model never reuses stale weights."""
    path = Path(name).expanduser()
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
