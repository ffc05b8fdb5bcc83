"""Shared fixtures: the built-in tokenizer (offline), a tiny random model on it, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MEDCALC_CSV = SHARED_DATA / "medcalc_bench" / "test_data.csv"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def medcalc_csv() -> Path:
    return require(MEDCALC_CSV)


@pytest.fixture(scope="session")
def tokenizer():
    from talr.modeling import BUILTIN, load_tokenizer

    return load_tokenizer(BUILTIN)


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A 2-layer random Llama over the real SmolLM2 vocabulary (so real chat templates apply)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).float()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random model + tokenizer directory, loadable by name like any HF checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
