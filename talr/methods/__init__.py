"""Fine-tuning methods: one base LightningModule (SFT) and one small subclass per method.

| class | hook it overrides |
|---|---|
| SFT | — (completion-only cross-entropy, Σℓ/N) |
| TALR, DFT | `weighted_loss_sum`: token weights from the same forward pass |
| TruncatedSFT | `weighted_loss_sum`: weight 0 for tokens with p < p_min (the "extreme experiment") |
| FLOW | `weighted_loss_sum`: per-sample weights from the initial model |
| L2Init | `after_gradient_normalized`: adds the gradient of λ·Σ(θ−θ0)²/P (or ·Σ); decoupled: `optimizer_step` pulls θ toward θ0 |
| LoRA | `prepare_model`: peft adapters |
"""

from talr.methods.flow import FLOW
from talr.methods.l2 import L2Init
from talr.methods.lora import LoRA
from talr.methods.sft import SFT
from talr.methods.talr import DFT, TALR, TruncatedSFT

__all__ = ["SFT", "TALR", "DFT", "TruncatedSFT", "FLOW", "L2Init", "LoRA"]
