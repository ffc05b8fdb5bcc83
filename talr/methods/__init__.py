"""Fine-tuning methods: one base LightningModule (SFT) and one small subclass per method."""

from talr.methods.sft import SFT

__all__ = ["SFT"]
