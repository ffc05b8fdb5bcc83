"""Amazon ESCI Shopping Queries (KDD Cup 2022): 4-way relevance of a (query, product) pair.

Labels: E (Exact), S (Substitute), C (Complement), I (Irrelevant), as class indices 0..3. Targets end
with one line `Answer: <Word>` (e.g. `Answer: Exact`); for format "cot" a rationale comes before it.
The official release ships no rationales, so "cot" needs them from a column or a side file.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from talr.data.sources import read_file, read_source
from talr.tasks.base import Format, DataError, Task, split_by_group

log = logging.getLogger(__name__)

LABELS = ("E", "S", "C", "I")
WORDS = ("Exact", "Substitute", "Complement", "Irrelevant")
INVALID = len(LABELS)  # class index of an unparseable answer: always wrong, never a real class
EXAMPLES_FILE = "shopping_queries_dataset_examples.parquet"
PRODUCTS_FILE = "shopping_queries_dataset_products.parquet"
EXAMPLE_COLUMNS = ("example_id", "query", "query_id", "product_id", "product_locale", "esci_label", "split")
PRODUCT_COLUMNS = ("product_id", "product_locale", "product_title")
STATS = ("examples_read", "dropped_locale", "dropped_not_small", "missing_products", "duplicate_products")
PRODUCT_FIELDS = ("product_title", "product_description", "product_bullet_point", "product_brand", "product_color")
_LABEL_OF = {**{k: k for k in LABELS}, **{w.upper(): k for k, w in zip(LABELS, WORDS)}}
_SPLIT_OF = {"train": "train", "test": "test", "validation": "validation", "val": "validation", "dev": "validation"}

SYSTEM = (
    "You judge how relevant a product is to an online shopping query. Choose exactly one label:\n"
    "- Exact: the product is relevant and satisfies all the query's specifications.\n"
    "- Substitute: the product is somewhat relevant; it fails some aspects of the query but can serve "
    "as a functional substitute.\n"
    "- Complement: the product does not fulfil the query but could be used together with an exact item.\n"
    "- Irrelevant: the product is irrelevant, or it fails a central aspect of the query.\n"
)
_LABEL_LINE = "'Answer: <label>' where <label> is Exact, Substitute, Complement or Irrelevant."
ANSWER_FORMAT = {"cot": "Reason briefly, then end with a final line " + _LABEL_LINE,
                 "label": "Reply with one line only: " + _LABEL_LINE}

_TAG = re.compile(r"</?[A-Za-z!][^<>]*>")  # real tags only: "size < 5 in" stays
_ANSWER = re.compile(r"\banswer\b[\s*_]*:", re.I)
_VALUE = re.compile(
    r"[\s*_\"'`(\[]*(?:(exact|substitute|complement|irrelevant)\b|([esci])(?![a-z0-9])(?![ \t]*[a-z0-9]))", re.I
)


def missing(value) -> bool:
    """None, NaN and blank strings are missing."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def clean(value) -> str:
    """Visible text of an HTML-ish field: tags dropped, entities unescaped, whitespace collapsed."""
    if missing(value):
        return ""
    return " ".join(html.unescape(_TAG.sub(" ", str(value))).split())


def extract_label(generation: str | None) -> int | None:
    """Class index (0..3 for E, S, C, I) of the LAST `Answer: X` in a generation, or None.

    X is a full label word or a single letter, any case, optionally wrapped in markdown/quotes/brackets
    (`**Answer:** Exact`, `answer: s.`, `Answer: (C)`). A single letter followed by another word on the
    same line (`Answer: I think ...`) is not an answer. If the last `Answer:` holds no valid label, the
    generation is unparseable (None) even if an earlier one did.
    """
    last = None
    for last in _ANSWER.finditer(generation or ""):
        pass
    if last is None:
        return None
    value = _VALUE.match(generation, last.end())
    if value is None:
        return None
    return LABELS.index(_LABEL_OF[(value.group(1) or value.group(2)).upper()])


class ESCIScores(MulticlassF1Score):
    """Per-class F1 (`f1_E` .. `f1_I`), `macro_f1`, and the `unparseable` rate and `unparseable_count`.

    Unparseable answers are an extra class 4 that no target has: a false negative for the true class,
    never a false positive of a real class. `macro_f1` averages the real classes that occur in targets
    or predictions (sklearn's `f1_score(..., labels=<those classes>, average="macro")`); a class absent
    from both reports F1 0 and is left out of the average.
    """

    def __init__(self, **kwargs):
        super().__init__(num_classes=len(LABELS) + 1, average=None, **kwargs)

    def compute(self) -> dict[str, torch.Tensor]:
        f1 = super().compute()[:INVALID]
        seen = (self.tp + self.fp + self.fn)[:INVALID] > 0
        total = (self.tp + self.fn)[:INVALID].sum()  # every row is a tp or an fn of its true class
        return {
            "macro_f1": f1[seen].mean() if seen.any() else torch.tensor(0.0),
            **{f"f1_{k}": f1[i] for i, k in enumerate(LABELS)},
            "unparseable": self.fp[INVALID] / total.clamp(min=1), "unparseable_count": self.fp[INVALID].clone(),
        }


class ESCI(Task):
    """Amazon ESCI Shopping Queries: label a (query, product) pair Exact/Substitute/Complement/Irrelevant.

    Args:
        source: a folder holding the two official parquet files (`shopping_queries_dataset_examples.parquet`,
            `shopping_queries_dataset_products.parquet`); or a local csv/jsonl/json/parquet file, a folder of
            split files (train.*, test.*, ...) or a hub data set id whose rows are already joined (columns
            example_id, query, query_id, product_title, esci_label; optional product_description,
            product_bullet_point, product_brand, product_color, product_locale, small_version, split).
            May be omitted when `examples_file` and `products_file` are given.
        format: "label" (target `Answer: Exact`, the default: ESCI ships no rationales) or "cot" (a
            rationale, then the `Answer:` line; needs `rationale_column` or `rationale_file`).
        locale: keep rows whose product_locale is this ("us", "es", "jp"); None keeps all locales.
        small_version: keep only rows with small_version == 1 (the reduced set of KDD Cup task 1); False keeps
            all rows (the large version of tasks 2 and 3).
        val_fraction: share of training queries moved to validation (grouped by query_id, seeded hash).
        test_fraction: share of queries for test, used only when the data has no official test split.
        split_seed: seed of the validation carve-out and of the shuffle before `max_examples`.
        max_examples: cap per split, e.g. {"train": 2000, "test": 500}. Each split is first shuffled by a
            seeded hash of example_id, so a cap is a fixed random subset independent of file order.
        examples_file: the official examples file (any supported format), joined with `products_file`.
        products_file: the official products file.
        description_budget: characters of bullet points + description kept in the prompt (bullets first).
        rationale_column: for "cot", the column holding rationales (in the data, or in `rationale_file`).
        rationale_file: for "cot", a jsonl/csv/parquet side file with columns example_id and the rationale
            column (`rationale_column`, default "rationale").
    """

    name = "esci"
    required_columns = ("example_id", "query", "query_id", "product_title", "esci_label")
    group_column = "query_id"
    id_column = "example_id"
    shorten_column = "product_description"

    def __init__(
        self, source: str | None = None, format: Format = "label", locale: str | None = "us", small_version: bool = True,
        val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
        max_examples: dict[str, int] | None = None, examples_file: str | None = None, products_file: str | None = None,
        description_budget: int = 500, rationale_column: str | None = None, rationale_file: str | None = None,
    ):
        super().__init__(source or examples_file or "", format, val_fraction, test_fraction, split_seed, max_examples)
        if source is None and not (examples_file and products_file):
            raise ValueError("esci needs `source`, or both `examples_file` and `products_file`")
        if bool(examples_file) != bool(products_file):
            raise ValueError("esci: give both `examples_file` and `products_file`, or neither")
        folder = Path(source or "").expanduser()
        if source and not examples_file and ((folder / EXAMPLES_FILE).exists() or (folder / PRODUCTS_FILE).exists()):
            examples_file, products_file = str(folder / EXAMPLES_FILE), str(folder / PRODUCTS_FILE)
        self.locale, self.small_version, self.description_budget = locale, small_version, description_budget
        self.examples_file, self.products_file = examples_file, products_file
        self.rationale_column, self.rationale_file = rationale_column, rationale_file
        self.stats: dict[str, int] = {}

    # -- data ------------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, list[dict]]:
        self.stats = dict.fromkeys(STATS, 0)
        tables, where = self._official() if self.examples_file else self._joined()
        if "all" in tables:
            rows = tables.pop("all")
            if rows and "split" in rows[0]:
                for row in rows:
                    split = _SPLIT_OF.get(str(row["split"]).strip().lower())
                    if split is None:
                        raise DataError(where, f"unknown split {row['split']!r}", row=row["example_id"], column="split")
                    tables.setdefault(split, []).append(row)
            else:
                tables = split_by_group(rows, "query_id", self.val_fraction, self.test_fraction, self.split_seed)
        if "validation" not in tables:
            carved = split_by_group(tables.get("train", []), "query_id", self.val_fraction, 0.0, self.split_seed)
            tables["train"], tables["validation"] = carved["train"], carved["validation"]
        splits = {s: tables.get(s, []) for s in ("train", "validation", "test")}
        self._check_ids(splits, where)
        splits = self.cap({s: sorted(rows, key=self._order) for s, rows in splits.items()})
        if self.format == "cot":
            self._attach_rationales(splits, where)
        self.stats.update({f"rows_{s}": len(rows) for s, rows in splits.items()})
        return splits

    def _official(self) -> tuple[dict[str, list[dict]], str]:
        """Join the official examples and products files on (product_locale, product_id)."""
        need = EXAMPLE_COLUMNS + ("small_version",) * self.small_version
        examples = self._filter(_frame(self.examples_file, need), self.examples_file)
        products = _frame(self.products_file, PRODUCT_COLUMNS)
        products = products[[c for c in ("product_locale", "product_id", *PRODUCT_FIELDS) if c in products.columns]]
        if self.locale is not None:
            products = products[products["product_locale"] == self.locale]
        dup = products.duplicated(["product_locale", "product_id"])
        self.stats["duplicate_products"] = int(dup.sum())
        if dup.any():
            log.warning("esci: %d duplicate products in %s; kept the first of each", dup.sum(), self.products_file)
        examples = examples.drop(columns=[c for c in PRODUCT_FIELDS if c in examples.columns])
        joined = examples.merge(products[~dup], on=["product_locale", "product_id"], how="left", indicator=True)
        lost = joined["_merge"] != "both"
        self.stats["missing_products"] = int(lost.sum())
        if lost.any():
            log.warning("esci: dropped %d examples whose product is not in %s", lost.sum(), self.products_file)
        return {"all": _records(joined[~lost].drop(columns="_merge"))}, self.examples_file

    def _joined(self) -> tuple[dict[str, list[dict]], str]:
        """Rows already joined: a local file, a folder of split files, or a hub data set id."""
        import pandas as pd

        need = self.required_columns + ("product_locale",) * (self.locale is not None)
        need += ("small_version",) * self.small_version
        out = {}
        for split, rows in read_source(self.source).items():
            name = self.source if split == "all" else f"{self.source} [{split}]"
            frame = self._filter(_check(pd.DataFrame(rows), need, name), name)
            out[split] = _records(frame)
        return out, self.source

    def _filter(self, frame, where: str):
        """Keep the configured locale and small_version rows (counting the rest); check the labels."""
        self.stats["examples_read"] += len(frame)
        if self.locale is not None:
            keep = frame["product_locale"] == self.locale
            self.stats["dropped_locale"] += int((~keep).sum())
            frame = frame[keep]
        if self.small_version:
            keep = frame["small_version"].map(lambda v: str(v).strip().lower() in ("1", "1.0", "true"))
            self.stats["dropped_not_small"] += int((~keep).sum())
            frame = frame[keep]
        labels = frame["esci_label"].map(lambda v: _LABEL_OF.get(str(v).strip().upper()))
        if labels.isna().any():
            bad = frame[labels.isna()].iloc[0]
            message = f"esci_label {bad['esci_label']!r} is not one of E, S, C, I"
            raise DataError(where, message, row=bad["example_id"], column="esci_label")
        return frame.assign(esci_label=labels)

    def _check_ids(self, splits: dict[str, list[dict]], where: str) -> None:
        seen: dict = {}
        for split, key in ((s, str(r["example_id"])) for s, rows in splits.items() for r in rows):
            if key in seen:
                raise DataError(where, f"duplicate example_id (in {seen[key]} and {split})", row=key, column="example_id")
            seen[key] = split

    def _order(self, row: Mapping) -> bytes:
        return hashlib.sha256(f"{self.split_seed}:{row['example_id']}".encode()).digest()

    def _attach_rationales(self, splits: dict[str, list[dict]], where: str) -> None:
        column = self.rationale_column or "rationale"
        side = {}
        if self.rationale_file:
            side_rows = _records(_frame(self.rationale_file, ("example_id", column)))
            side = {str(r["example_id"]): r[column] for r in side_rows if not missing(r[column])}
        for split, rows in splits.items():
            for row in rows:
                text = side.get(str(row["example_id"]))
                if text is None and self.rationale_column and not missing(row.get(self.rationale_column)):
                    text = row[self.rationale_column]
                if text is None:
                    raise DataError(
                        self.rationale_file or where,
                        f"format 'cot' needs a rationale for every row, and this {split} row has none. ESCI "
                        "ships no rationales: set rationale_column (a column of the data) or rationale_file "
                        f"(a jsonl/csv with columns example_id and {column!r}), or use format 'label'",
                        row=row["example_id"], column=column,
                    )
                row["rationale"] = str(text).strip()

    # -- prompt and target -----------------------------------------------------------------------
    def messages(self, row: Mapping) -> list[dict[str, str]]:
        lines = [f"Query: {clean(row.get('query'))}"]
        for label, key in (("Product title", "product_title"), ("Brand", "product_brand"), ("Colour", "product_color")):
            if clean(row.get(key)):
                lines.append(f"{label}: {clean(row.get(key))}")
        budget = self.description_budget
        bullets = "" if missing(row.get("product_bullet_point")) else str(row["product_bullet_point"])
        bullets = "; ".join(c for c in (clean(b) for b in bullets.splitlines()) if c)
        for label, text in (("Bullet points", bullets), ("Description", clean(row.get("product_description")))):
            if text and budget > 0:
                if len(text) > budget:
                    text = text[: max(0, budget - 1)].rstrip() + "…"
                budget -= len(text)
                lines.append(f"{label}: {text}")
        system = SYSTEM + ANSWER_FORMAT[self.format]
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]

    def target(self, row: Mapping) -> str:
        """`Answer: <Word>`; for "cot", `<rationale>\\nAnswer: <Word>`."""
        answer = f"Answer: {WORDS[LABELS.index(row['esci_label'])]}"
        if self.format == "label":
            return answer
        if missing(row.get("rationale")):  # load_splits attaches them, or fails with the full story
            raise DataError(self.source, "format 'cot' needs a rationale", row=row.get("example_id"), column="rationale")
        return f"{str(row['rationale']).strip()}\n{answer}"

    def shorten(self, row: Mapping, keep_fraction: float) -> dict:
        """Cut the visible (HTML-free) description to `keep_fraction` of its characters."""
        text = clean(row.get(self.shorten_column))
        return {**row, self.shorten_column: text[: max(0, int(len(text) * keep_fraction))]}

    # -- evaluation ------------------------------------------------------------------------------
    def metrics(self) -> MetricCollection:
        """`accuracy` (micro), `macro_f1`, `f1_E`..`f1_I`, `unparseable` (rate), `unparseable_count`."""
        return MetricCollection(
            {"accuracy": MulticlassAccuracy(num_classes=INVALID + 1, average="micro"), "scores": ESCIScores()},
            compute_groups=False,
        )

    def update_metrics(self, metrics: MetricCollection, generations: Sequence[str], rows: Sequence[Mapping]) -> None:
        if len(generations) != len(rows):
            raise ValueError(f"{len(generations)} generations for {len(rows)} rows")
        preds = torch.tensor([INVALID if (p := extract_label(g)) is None else p for g in generations], dtype=torch.long)
        target = torch.tensor([LABELS.index(_LABEL_OF[str(r["esci_label"]).upper()]) for r in rows], dtype=torch.long)
        metrics.update(preds, target)


def _frame(path: str, need: Sequence[str]):
    """One file as a checked DataFrame (parquet read directly, without a detour through dicts)."""
    import pandas as pd

    if Path(path).suffix.lower() == ".parquet" and Path(path).exists():
        try:
            frame = pd.read_parquet(path)
        except Exception as e:
            raise DataError(str(path), f"could not read as parquet: {e}") from e
    else:
        frame = pd.DataFrame(read_file(path))
    return _check(frame, need, path)


def _check(frame, need: Sequence[str], where: str):
    """`frame`, once it has rows and every column in `need` (else a DataError naming file and column)."""
    if len(frame) == 0:
        raise DataError(str(where), "no rows")
    for column in need:
        if column not in frame.columns:
            raise DataError(str(where), "required column is missing", column=column)
    return frame


def _records(frame) -> list[dict]:
    """Rows as dicts, with pandas' NaN/NA turned into None."""
    frame = frame.astype(object)
    return frame.where(frame.notna(), None).to_dict(orient="records")
