"""What a domain task is: rows in its official schema, a prompt, a target, and official scoring.

A task owns everything that depends on the data set; the DataModule owns everything that depends on
the tokenizer (chat template, label masks, batching). Adding a task means writing one module with a
`Task` subclass and registering it in `talr.tasks`.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Literal

from torchmetrics import MetricCollection

SPLITS = ("train", "validation", "test")
Format = Literal["cot", "label"]


class DataError(ValueError):
    """Bad input data. The message always names the file (or source), the row and the column."""

    def __init__(self, source: str, message: str, row: int | str | None = None, column: str | None = None):
        where = [f"source {source!r}"]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.source, self.row, self.column = source, row, column


def split_by_group(
    rows: Sequence[Mapping],
    group_key: str,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Deterministic train/validation/test split in which no group (e.g. a patient note) is in two splits.

    Each group goes to a split by a hash of (seed, group), so the split does not depend on row order and
    adding rows never moves an existing group.
    """
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows:
        digest = hashlib.sha256(f"{seed}:{row[group_key]}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        split = "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"
        out[split].append(dict(row))
    return out


class Task(ABC):
    """A domain task. Subclasses set `name`, `required_columns`, `group_column`, `id_column`."""

    name: str = ""
    required_columns: tuple[str, ...] = ()
    group_column: str = ""  # rows sharing this value never straddle splits
    id_column: str = ""  # unique row id, for error messages and duplicate checks
    shorten_column: str | None = None  # the free-text field the over-long policy may cut

    def __init__(
        self,
        source: str,
        format: Format = "cot",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        max_examples: dict[str, int] | None = None,
    ):
        if format not in ("cot", "label"):
            raise ValueError(f"format must be 'cot' or 'label', got {format!r}")
        self.source, self.format = source, format
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.max_examples = dict(max_examples or {})

    # -- data ------------------------------------------------------------------------------------
    @abstractmethod
    def load_splits(self) -> dict[str, list[dict]]:
        """Rows of each split in {'train', 'validation', 'test'}, validated, capped by `max_examples`."""

    @abstractmethod
    def messages(self, row: Mapping) -> list[dict[str, str]]:
        """The prompt as chat messages (system and user turns); never supervised."""

    @abstractmethod
    def target(self, row: Mapping) -> str:
        """The assistant response to supervise, in `self.format`."""

    def shorten(self, row: Mapping, keep_fraction: float) -> dict:
        """A copy of `row` whose `shorten_column` keeps the first `keep_fraction` of its characters."""
        if self.shorten_column is None:
            raise NotImplementedError(f"task {self.name!r} has no field that may be shortened")
        text = str(row[self.shorten_column])
        out = dict(row)
        out[self.shorten_column] = text[: max(0, int(len(text) * keep_fraction))]
        return out

    # -- evaluation ------------------------------------------------------------------------------
    @abstractmethod
    def metrics(self) -> MetricCollection:
        """A fresh torchmetrics collection for validation/test (accuracy at least)."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, generations: Sequence[str], rows: Sequence[Mapping]) -> None:
        """Score greedy generations against their rows with the task's official rules."""

    def cap(self, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Apply `max_examples` per split: a seeded random subset (`split_seed`), kept in source order.
        Not a prefix: source files are often sorted (MedCalc-Bench by calculator), and a prefix would
        cover only the first few calculators."""
        out = {}
        for name, rows in splits.items():
            k = self.max_examples.get(name)
            if k is None or k >= len(rows):
                out[name] = rows
            else:
                keep = sorted(random.Random(f"{self.split_seed}-{name}").sample(range(len(rows)), max(k, 0)))
                out[name] = [rows[i] for i in keep]
        return out
