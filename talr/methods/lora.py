"""LoRA through peft; only the adapters train; merged weights for evaluation and export."""

from __future__ import annotations

import copy

import torch

from talr.methods.sft import SFT

FLOW_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRA(SFT):
    """Low-rank adapters (peft). Defaults follow FLOW's setting: r = α = 64, dropout 0, on the attention and
    MLP projections. Checkpoints hold only the adapter weights; `merged_model()` gives a plain HF model.

    Args:
        r: adapter rank.
        lora_alpha: scaling numerator (scale = lora_alpha / r).
        lora_dropout: dropout on the adapter input.
        target_modules: module names to adapt.
        init_seed: seed of the adapters' random initialisation, fixed so that every rank builds the same
            adapters before FSDP2 shards them (fully_shard does not broadcast) and reruns start alike.
    """

    def __init__(self, *args, r: int = 64, lora_alpha: int = 64, lora_dropout: float = 0.0,
                 target_modules: list[str] | None = None, init_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_args = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=list(target_modules or FLOW_TARGETS))
        self.init_seed = init_seed
        self.strict_loading = False  # adapter-only checkpoints: the frozen base comes from `pretrained`

    def prepare_model(self, model):
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):  # the global RNG stream is left as it was
            torch.manual_seed(self.init_seed)
            return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **self.lora_args))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def merged_model(self):
        """A copy of the model with the adapters merged in (the training model is left untouched)."""
        return copy.deepcopy(self.model).merge_and_unload()

    def save_hf(self, model, path, dtype: torch.dtype | None = None) -> None:
        """The adapter (training dtype) in `<path>/adapter`, the merged model (a plain HF model, cast to `dtype`
        after merging) in `path`."""
        from talr.callbacks.export import cast_copy

        model.save_pretrained(f"{path}/adapter")
        # never merge into the training model; a gathered copy (FSDP2) may be merged in place
        merged = self.merged_model() if model is self.model else model.merge_and_unload()
        cast_copy(merged, dtype, in_place=True).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
