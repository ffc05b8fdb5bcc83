"""talr: fine-tune LLMs on a domain without losing general skill (SFT, L2-to-init, LoRA, WiSE-FT, FLOW, TALR)."""

__version__ = "0.1.0"
