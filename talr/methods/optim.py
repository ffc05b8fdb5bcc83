"""The optimiser every method uses: AdamW with linear warmup and cosine decay, stepped per optimizer step."""

from __future__ import annotations

import torch


def adamw_with_cosine_schedule(module) -> dict:
    """Lightning's `configure_optimizers` answer for `module` (a `talr.methods.SFT`): AdamW over its trainable
    parameters, weight decay on matrices only (not on norms and biases), fused on CUDA; `warmup_ratio` of the
    run's optimizer steps of linear warmup, then cosine decay to `min_lr_ratio · lr`."""
    from transformers import get_scheduler

    hp = module.hparams
    decay, no_decay = [], []
    for p in module.trainable_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=module.device.type == "cuda")
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    scheduler = get_scheduler(
        "cosine_with_min_lr", optimizer, num_warmup_steps=int(hp.warmup_ratio * total), num_training_steps=total,
        scheduler_specific_kwargs={"min_lr_rate": hp.min_lr_ratio},
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
