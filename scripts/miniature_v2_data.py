"""The miniature v2's rows: MedCalc-Bench rows whose patient note and CoT target are short enough to train on
whole, split by Note ID, then seeded random subsets (results/miniature_v2/DESIGN.md).

    python scripts/miniature_v2_data.py ../shared/data/medcalc_bench/test_data.csv runs/miniature_v2/data

writes `train.csv` and `validation.csv` (the official columns, rows unchanged) into the output folder, which
`talr.tasks.MedCalc(source=<folder>)` reads as ready-made splits, and prints what was selected. The folder is a
working copy under runs/ (git-ignored): the data is never committed.
"""

from __future__ import annotations

import csv
import random
import sys
from collections import Counter
from pathlib import Path

from talr.tasks.base import split_by_group
from talr.tasks.medcalc import COLUMNS, MedCalc

MAX_NOTE_TOKENS = 200     # the note fits without shortening (shortened notes manufacture hard tokens)
MAX_TARGET_TOKENS = 256   # the CoT target (explanation + answer JSON)
N_TRAIN, N_HELDOUT = 20, 16
HELDOUT_FRACTION = 0.35   # of the Note IDs; enough held-out rows to draw 16 from
SEED = 0


def eligible_rows(rows: list[dict], tokenizer, max_note_tokens: int = MAX_NOTE_TOKENS,
                  max_target_tokens: int = MAX_TARGET_TOKENS) -> list[dict]:
    task = MedCalc(source="unused", format="cot")
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [r for r in rows if count(r["Patient Note"]) <= max_note_tokens
            and count(task.target(r)) <= max_target_tokens]


def select(rows: list[dict], tokenizer, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT,
           heldout_fraction: float = HELDOUT_FRACTION, seed: int = SEED) -> dict[str, list[dict]]:
    """Eligible rows split by Note ID (no note in both splits), then a seeded subset of each, in source order."""
    splits = split_by_group(eligible_rows(rows, tokenizer), "Note ID", heldout_fraction, 0.0, seed)
    out = {}
    for name, k in (("train", n_train), ("validation", n_heldout)):
        pool = splits[name]
        if len(pool) < k:
            raise ValueError(f"only {len(pool)} eligible {name} rows, {k} wanted")
        keep = sorted(random.Random(f"{seed}-{name}").sample(range(len(pool)), k))
        out[name] = [pool[i] for i in keep]
    return out


def write_splits(splits: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def describe(splits: dict[str, list[dict]]) -> dict:
    """Counts only (no data): rows, notes, calculators per split and the calculators both splits share."""
    calcs = {name: Counter(r["Calculator Name"] for r in rows) for name, rows in splits.items()}
    return {
        **{f"rows/{n}": len(r) for n, r in splits.items()},
        **{f"notes/{n}": len({x["Note ID"] for x in r}) for n, r in splits.items()},
        **{f"calculators/{n}": dict(sorted(c.items())) for n, c in calcs.items()},
        "heldout_rows_with_a_trained_calculator": sum(c for k, c in calcs["validation"].items() if k in calcs["train"]),
    }


def main(argv: list[str]) -> None:
    import json

    from talr.data.sources import read_file
    from talr.modeling import BUILTIN, load_tokenizer

    source, out_dir = argv[0], Path(argv[1])
    splits = select(read_file(source), load_tokenizer(argv[2] if len(argv) > 2 else BUILTIN))
    write_splits(splits, out_dir)
    print(json.dumps(describe(splits), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
