"""Fine-tuning methods: one base LightningModule (SFT) and one small subclass per method.

| class | hook it overrides |
|---|---|
| SFT | — (completion-only cross-entropy, Σℓ/N) |
| TALR, DFT | `weighted_loss_sum`: token weights from the same forward pass |
| FLOW | `weighted_loss_sum`: per-sample weights from the initial model |
| L2Init | `after_gradient_normalized`: adds the gradient of λ·Σ(θ−θ0)²/P |
| LoRA | `prepare_model`: peft adapters |
"""

from talr.methods.flow import FLOW
from talr.methods.l2 import L2Init
from talr.methods.lora import LoRA
from talr.methods.sft import SFT
from talr.methods.talr import DFT, TALR

__all__ = ["SFT", "TALR", "DFT", "FLOW", "L2Init", "LoRA"]
