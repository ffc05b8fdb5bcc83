"""Read rows from a local file, a local folder of split files, or a Hugging Face hub data set id."""

from __future__ import annotations

import json
from pathlib import Path

from talr.tasks.base import SPLITS, DataError

LOCAL_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation", "test": "test"}


def read_file(path: str | Path) -> list[dict]:
    """All rows of one csv / jsonl / json / parquet file, as dicts of strings and numbers."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "file not found")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(str(path), f"unsupported file type {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(str(path), f"invalid JSON ({e.msg})", row=i) from None
            return rows
        import pandas as pd

        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_json(path, dtype=False)
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow raise many types; name the file in every case
        raise DataError(str(path), f"could not read as {suffix[1:]}: {e}") from e
    return frame.to_dict(orient="records")


def read_source(source: str) -> dict[str, list[dict]]:
    """Rows per split. A single local file gives {'all': rows}; a folder gives its split files
    (train.*, validation.*/val.*/dev.*, test.*); anything else is a hub data set id."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"all": read_file(path)}
    if path.is_dir():
        found: dict[str, list[dict]] = {}
        for f in sorted(path.iterdir()):
            split = _SPLIT_ALIASES.get(f.stem.lower())
            if split and f.suffix.lower() in LOCAL_SUFFIXES:
                found[split] = read_file(f)
        if not found:
            raise DataError(source, f"folder has no split files named {'/'.join(SPLITS)} with a suffix in {LOCAL_SUFFIXES}")
        return found
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_SUFFIXES:
        raise DataError(source, "local path does not exist")
    return _read_hub(source)


def _read_hub(repo_id: str) -> dict[str, list[dict]]:
    import datasets

    try:
        dsd = datasets.load_dataset(repo_id)
    except Exception as e:
        raise DataError(repo_id, f"could not load from the Hugging Face hub (offline, or not a data set id?): {e}") from e
    out = {}
    for name, ds in dsd.items():
        split = _SPLIT_ALIASES.get(name.lower(), name)
        out[split] = [dict(r) for r in ds]
    return out
