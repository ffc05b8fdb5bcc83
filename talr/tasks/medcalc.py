"""MedCalc-Bench (Khandekar et al. 2024): clinical calculations from patient notes.

Prompts follow the benchmark's own zero-shot protocol: a system message asking for a JSON answer and
the user message "Here is the patient note: … Here is the task: …". Targets are the JSON the system
message asks for: `{"step_by_step_thinking": <explanation>, "answer": <answer>}` (cot) or
`{"answer": <answer>}` (label). Scoring follows the official rules (`medcalc_scoring`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import MeanMetric, MetricCollection, SumMetric

from talr.data.sources import read_source
from talr.tasks.base import DataError, Format, Task, split_by_group
from talr.tasks.medcalc_scoring import extract_answer, is_correct, score_generation  # noqa: F401 (public API)

log = logging.getLogger(__name__)

HUB_ID = "ncbi/MedCalc-Bench-v1.0"
SYNTHETIC = "synthetic"
COLUMNS = (
    "Row Number", "Calculator ID", "Calculator Name", "Category", "Output Type", "Note ID", "Note Type",
    "Patient Note", "Question", "Relevant Entities", "Ground Truth Answer", "Lower Limit", "Upper Limit",
    "Ground Truth Explanation",
)
REQUIRED = ("Calculator ID", "Note ID", "Patient Note", "Question", "Ground Truth Answer", "Lower Limit", "Upper Limit")

_THINK = "str(your_step_by_step_thinking_procress_to_solve_the_question)"  # sic: the benchmark's wording
SYSTEM_COT = (
    "You are a helpful assistant for calculating a score for a given patient note. Please think step-by-step to "
    "solve the question and then generate the required score. Your output should only contain a JSON dict "
    f'formatted as {{"step_by_step_thinking": {_THINK}, "answer": str(short_and_direct_answer_of_the_question)}}.'
)
SYSTEM_LABEL = (
    "You are a helpful assistant for calculating a score for a given patient note. Please output answer only "
    "without any other text. Your output should only contain a JSON dict formatted as "
    '{"answer": str(value which is the answer to the question)}.'
)
USER_SUFFIX_COT = (
    f'Please directly output the JSON dict formatted as {{"step_by_step_thinking": {_THINK}, '
    '"answer": str(short_and_direct_answer_of_the_question)}:'
)
USER_SUFFIX_LABEL = 'Please directly output the JSON dict formatted as {"answer": str(value which is the answer to the question)}:'


class MedCalc(Task):
    """MedCalc-Bench rows from the hub, a local csv/jsonl/parquet file or folder, or the synthetic generator.

    Args:
        source: `synthetic` (the embedded generator), a hub id such as `ncbi/MedCalc-Bench-v1.0`, a local
            file (e.g. `../shared/data/medcalc_bench/test_data.csv`) or a folder with train/test files.
            A single file is split into train/validation/test by `Note ID`; a source with train and test
            splits keeps its test split and carves validation from train by `Note ID`.
        format: `cot` (explanation + answer) or `label` (answer only).
        synthetic_size: rows generated when `source: synthetic`.
        synthetic_seed: seed of the generator.
    """

    name = "medcalc"
    required_columns = REQUIRED
    group_column = "Note ID"
    id_column = "Row Number"
    shorten_column = "Patient Note"

    def __init__(
        self,
        source: str = SYNTHETIC,
        format: Format = "cot",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        max_examples: dict[str, int] | None = None,
        synthetic_size: int = 240,
        synthetic_seed: int = 0,
    ):
        super().__init__(source, format, val_fraction, test_fraction, split_seed, max_examples)
        self.synthetic_size = synthetic_size
        self.synthetic_seed = synthetic_seed
        self.stats: dict[str, int] = {}

    # -- data ------------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, list[dict]]:
        if self.source == SYNTHETIC:
            from talr.tasks.medcalc_synthetic import generate_rows

            raw = {"all": generate_rows(self.synthetic_size, seed=self.synthetic_seed)}
        else:
            raw = read_source(self.source)
        raw = {split: self._validate(rows, split) for split, rows in raw.items()}
        if set(raw) == {"all"}:
            splits = split_by_group(raw["all"], self.group_column, self.val_fraction, self.test_fraction, self.split_seed)
        elif "train" in raw:
            has_val = "validation" in raw
            carved = split_by_group(raw["train"], self.group_column, 0.0 if has_val else self.val_fraction, 0.0, self.split_seed)
            splits = {
                "train": carved["train"],
                "validation": raw["validation"] if has_val else carved["validation"],
                "test": raw.get("test", []),
            }
        else:
            raise DataError(self.source, f"expected a single file or splits including 'train', found {sorted(raw)}")
        self._check_overlap(splits)
        splits = self.cap(splits)
        for s, rows in splits.items():
            self.stats[f"rows/{s}"] = len(rows)
        return splits

    def _validate(self, rows: list[dict], split: str) -> list[dict]:
        if not rows:
            raise DataError(self.source, f"split {split!r} is empty")
        missing = [c for c in REQUIRED if c not in rows[0]]
        if self.format == "cot" and "Ground Truth Explanation" not in rows[0]:
            missing.append("Ground Truth Explanation")
        if missing:
            raise DataError(self.source, f"missing column(s) {missing}; found {sorted(rows[0])}", column=missing[0])
        needed = REQUIRED + (("Ground Truth Explanation",) if self.format == "cot" else ())
        out = []
        for i, row in enumerate(rows):
            row_id = row.get("Row Number", i + 1)
            for col in needed:
                value = row.get(col)
                if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
                    raise DataError(self.source, "empty value", row=f"{row_id} (split {split})", column=col)
            try:
                int(str(row["Calculator ID"]).strip())
            except ValueError:
                raise DataError(self.source, f"calculator id {row['Calculator ID']!r} is not an integer",
                                row=row_id, column="Calculator ID") from None
            try:  # the ground truth must parse and satisfy its own official rule (limits, dates, pairs)
                consistent = is_correct(str(row["Ground Truth Answer"]), row)
            except DataError as e:
                raise DataError(self.source, str(e).split(": ", 1)[-1], row=f"{row_id} (split {split})", column=e.column) from None
            if not consistent:
                raise DataError(self.source, "the ground truth does not score correct under its own limits",
                                row=f"{row_id} (split {split})", column="Ground Truth Answer")
            out.append({k: (str(v) if k in COLUMNS and not isinstance(v, str) else v) for k, v in row.items()})
        return out

    def _check_overlap(self, splits: dict[str, list[dict]]) -> None:
        """No patient note may be both trained on and evaluated on; count (and refuse) any overlap."""
        train_notes = {r[self.group_column] for r in splits["train"]}
        for s in ("validation", "test"):
            shared = train_notes & {r[self.group_column] for r in splits[s]}
            self.stats[f"note_overlap/train-{s}"] = len(shared)
            if shared:
                log.warning("%d Note IDs appear in both train and %s (e.g. %s)", len(shared), s, sorted(shared)[:3])

    def messages(self, row: Mapping) -> list[dict[str, str]]:
        system, suffix = (SYSTEM_COT, USER_SUFFIX_COT) if self.format == "cot" else (SYSTEM_LABEL, USER_SUFFIX_LABEL)
        user = f"Here is the patient note:\n{row['Patient Note']}\n\nHere is the task:\n{row['Question']}\n\n{suffix}"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def target(self, row: Mapping) -> str:
        answer = str(row["Ground Truth Answer"])
        if self.format == "cot":
            return json.dumps({"step_by_step_thinking": str(row["Ground Truth Explanation"]), "answer": answer})
        return json.dumps({"answer": answer})

    # -- evaluation ------------------------------------------------------------------------------
    def metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MeanMetric(), "answer_found": MeanMetric(), "n": SumMetric()})

    def update_metrics(self, metrics: MetricCollection, generations: Sequence[str], rows: Sequence[Mapping]) -> None:
        answers = [extract_answer(g) for g in generations]
        correct = [bool(a) and is_correct(a, row) for a, row in zip(answers, rows, strict=True)]
        device = metrics["acc"].device
        metrics["acc"].update(torch.tensor(correct, dtype=torch.float32, device=device))
        metrics["answer_found"].update(torch.tensor([bool(a) for a in answers], dtype=torch.float32, device=device))
        metrics["n"].update(torch.tensor(float(len(rows)), device=device))
