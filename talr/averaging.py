"""WiSE-FT model averaging: θ_α = (1 − α)·θ0 + α·θ_ft, written as HF model directories.

Used as ``talr average --init Qwen/Qwen2.5-3B-Instruct --finetuned runs/x/final --alphas 0.25,0.5``
(or ``--alpha 0.5 --alpha 0.75``); one directory ``alpha_0.50`` etc. per α under ``--output-dir``,
loadable like any checkpoint. ``finetuned`` must be a full (merged) model directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["interpolate_state_dicts", "average_models", "alpha_dirname", "main"]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects nan
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def interpolate_state_dicts(
    sd0: Mapping[str, torch.Tensor], sd1: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 − α)·sd0 + α·sd1`` key by key, as new tensors.

    Floating tensors are combined in float32 (float64 stays float64) and cast back to sd0's dtype;
    α = 0 returns sd0's values and α = 1 sd1's values bitwise. Non-floating tensors must be equal in
    both and are copied. Tensors that alias each other in both inputs (tied embeddings) alias in the
    output too. Raises ValueError naming the key on mismatched keys, shapes or integer buffers.
    """
    alpha = _check_alpha(alpha)
    if set(sd0) != set(sd1):
        only0, only1 = sorted(set(sd0) - set(sd1)), sorted(set(sd1) - set(sd0))
        raise ValueError(f"state dicts have different keys: only in the first {only0[:5]}, only in the second {only1[:5]}")
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, torch.Tensor] = {}
    for key, a in sd0.items():
        b = sd1[key]
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch for {key!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        alias = (_storage_key(a), _storage_key(b))
        if alias in done:
            out[key] = done[alias]
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.device, a.dtype)):
                raise ValueError(f"non-floating tensor {key!r} differs between the two models")
            value = a.clone()
        elif alpha == 0.0:
            value = a.clone()
        elif alpha == 1.0:
            value = b.to(device=a.device, dtype=a.dtype, copy=True)
        else:
            work = torch.promote_types(a.dtype, torch.float32)
            mixed = a.to(work) * (1.0 - alpha) + b.to(a.device, work) * alpha
            value = mixed.to(a.dtype)
        done[alias] = out[key] = value
    return out


def alpha_dirname(alpha: float) -> str:
    """``alpha_0.50`` for two-decimal α; more digits when two would round (0.125 -> ``alpha_0.125``)."""
    text = f"{alpha:.2f}"
    return f"alpha_{text if float(text) == alpha else repr(float(alpha))}"


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from talr.modeling import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def average_models(
    init: str,
    finetuned: str,
    alphas: Sequence[float],
    output_dir: str,
    dtype: str | torch.dtype = "float32",
) -> list[Path]:
    """Write θ_α = (1 − α)·θ_init + α·θ_finetuned for each α as an HF directory under ``output_dir``.

    ``init`` is a hub id, local directory, .gguf file or ``builtin:...`` (talr.modeling.resolve);
    ``finetuned`` a full (merged) model directory or hub id. The output
    takes the config, generation config and tokenizer of ``finetuned``, plus ``averaging.json``.
    Returns the directories in the order of ``alphas`` (duplicates dropped).
    """
    alphas = list(dict.fromkeys(_check_alpha(a) for a in alphas))
    if not alphas:
        raise ValueError("no alpha given")
    torch_dtype = _resolve_dtype(dtype)
    from talr.modeling import DTYPES, load_model, resolve

    # talr's own loader for both, so the initial model is the class talr trained (e.g. Gemma-3's language
    # model, not the multimodal checkpoint class)
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    log.info("loading %s and %s (%s)", init, finetuned, torch_dtype)
    model_ft = load_model(str(finetuned), dtype_name)
    model_init = load_model(str(init), dtype_name)
    sd_ft, sd_init = model_ft.state_dict(), model_init.state_dict()
    tokenizer = _load_tokenizer(resolve(str(finetuned), tokenizer_only=True)[0])

    out_root = Path(output_dir)
    paths = []
    for alpha in alphas:
        path = out_root / alpha_dirname(alpha)
        sd = interpolate_state_dicts(sd_init, sd_ft, alpha)
        model_ft.save_pretrained(path, state_dict=sd)  # transformers 5 always writes safetensors
        del sd
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        meta = {"init": str(init), "finetuned": str(finetuned), "alpha": alpha, "dtype": str(torch_dtype)}
        (path / "averaging.json").write_text(json.dumps(meta, indent=2) + "\n")
        log.info("wrote %s", path)
        paths.append(path)
    return paths


def _load_tokenizer(path: str):
    local = Path(path)
    if local.is_dir() and not any(
        (local / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        log.warning("no tokenizer files in %s; the averaged models get none", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        log.warning("could not load a tokenizer from %s (%s); the averaged models get none", path, err)
        return None


def _parse_alpha_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talr average",
        description="WiSE-FT: write θ_α = (1-α)·θ_init + α·θ_finetuned for each α as an HF model directory.",
    )
    parser.add_argument("--init", required=True,
                        help="the model fine-tuning started from: a hub id, a local HF directory, a .gguf file, "
                             "or builtin:SmolLM2-135M-Instruct (the quickstart's)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned full model directory")
    parser.add_argument("--alpha", type=float, action="append", default=[], help="an α in [0, 1] (repeatable)")
    parser.add_argument("--alphas", type=_parse_alpha_list, default=[], help="comma-separated α grid, e.g. 0,0.25,0.5")
    parser.add_argument("--output-dir", required=True, help="one alpha_<α> directory per α is written here")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; α defaults to 0.5 when neither --alpha nor --alphas is given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    alphas = [*args.alpha, *args.alphas] or [0.5]
    try:
        alphas = [_check_alpha(a) for a in alphas]
        _resolve_dtype(args.dtype)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in average_models(args.init, args.finetuned, alphas, args.output_dir, dtype=args.dtype):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
