"""Fused and memory-lean operations used by the methods."""

from talr.ops.chunked_ce import causal_lm_token_losses, chunked_token_losses, output_head

__all__ = ["chunked_token_losses", "causal_lm_token_losses", "output_head"]
