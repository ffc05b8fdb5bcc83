"""Completion-only labels on a real chat template, the over-long policy, and the collate."""

from __future__ import annotations

import pytest
import torch

from talr.data.encoding import IGNORE, Collator, encode_chat, encode_rows
from talr.data.sources import read_file
from talr.tasks.medcalc import MedCalc

ROW = {
    "Row Number": "1", "Calculator ID": "6", "Calculator Name": "Body Mass Index (BMI)", "Category": "physical",
    "Output Type": "decimal", "Note ID": "n1", "Note Type": "Extracted",
    "Patient Note": "A 40-year-old man, 70 kg, 175 cm tall.", "Question": "What is the patient's BMI in kg/m^2?",
    "Relevant Entities": "{}", "Ground Truth Answer": "22.857", "Lower Limit": "21.714", "Upper Limit": "24.0",
    "Ground Truth Explanation": "BMI = 70 / 1.75^2 = 22.857.",
}


def test_labels_are_exactly_the_assistant_turn(tokenizer):
    task = MedCalc(source="unused", format="cot")
    prompt, full = encode_chat(tokenizer, task.messages(ROW), task.target(ROW))
    # the prompt is the chat template's own rendering with the generation prompt
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are a helpful assistant")
    examples, counts = encode_rows(task, [ROW], tokenizer, max_length=4096, progress=False)
    ex = examples[0]
    supervised = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert ex["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert all(l != IGNORE for l in ex["labels"][len(prompt):])
    assert tokenizer.decode(supervised) == task.target(ROW) + "<|im_end|>"
    assert supervised[-1] == tokenizer.eos_token_id  # the model learns to stop; nothing after it
    assert counts == {"kept": 1}


def test_label_format_target(tokenizer):
    task = MedCalc(source="unused", format="label")
    assert task.target(ROW) == '{"answer": "22.857"}'
    assert "step_by_step_thinking" not in task.messages(ROW)[0]["content"]


def test_overlong_truncates_note_never_target(tokenizer):
    task = MedCalc(source="unused", format="cot")
    long_row = dict(ROW, **{"Patient Note": "The patient is well. " * 300})
    full_len = len(encode_chat(tokenizer, task.messages(long_row), task.target(long_row))[1])
    limit = full_len // 2
    (ex,), counts = encode_rows(task, [long_row], tokenizer, max_length=limit, progress=False)
    assert counts["truncated"] == 1 and len(ex["input_ids"]) <= limit
    supervised = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert tokenizer.decode(supervised) == task.target(long_row) + "<|im_end|>"
    assert len(ex["row"]["Patient Note"]) < len(long_row["Patient Note"])
    # skip policy: counted, not silently dropped
    examples, counts = encode_rows(task, [long_row, ROW], tokenizer, max_length=limit, overlong="skip", progress=False)
    assert len(examples) == 1 and counts["skipped_overlong"] == 1 and counts["kept"] == 1
    # a target longer than the budget cannot be fitted by shortening the note: skipped and counted
    examples, counts = encode_rows(task, [long_row], tokenizer, max_length=40, progress=False)
    assert examples == [] and counts["skipped_overlong"] == 1
    with pytest.raises(ValueError, match="max_length"):
        encode_rows(task, [long_row], tokenizer, max_length=limit, overlong="error", progress=False)


def test_collate_pads_right_for_training_and_left_for_generation():
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "prompt_ids": [5, 6], "row": {"a": 1}, "index": 0},
        {"input_ids": [9, 10], "labels": [IGNORE, 10], "prompt_ids": [9], "row": {"a": 2}, "index": 1},
    ]
    batch = Collator(pad_id=0, with_prompts=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 10, IGNORE, IGNORE]]
    assert batch["prompt_input_ids"].tolist() == [[5, 6], [0, 9]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["rows"] == [{"a": 1}, {"a": 2}] and batch["index"].tolist() == [0, 1]


def test_real_medcalc_rows_split_by_note_without_overlap(medcalc_csv):
    task = MedCalc(source=str(medcalc_csv), format="cot", val_fraction=0.1, test_fraction=0.2, split_seed=3)
    splits = task.load_splits()
    assert sum(len(v) for v in splits.values()) == len(read_file(medcalc_csv)) == 1047
    notes = {s: {r["Note ID"] for r in rows} for s, rows in splits.items()}
    assert not notes["train"] & notes["test"] and not notes["train"] & notes["validation"]
    assert not notes["validation"] & notes["test"]
    assert 0.1 < len(splits["test"]) / 1047 < 0.3
    again = MedCalc(source=str(medcalc_csv), format="cot", val_fraction=0.1, test_fraction=0.2, split_seed=3).load_splits()
    assert [r["Row Number"] for r in again["test"]] == [r["Row Number"] for r in splits["test"]]


def test_tokens_of_real_rows_fit_with_truncation(tokenizer, medcalc_csv):
    task = MedCalc(source=str(medcalc_csv), format="label", max_examples={"train": 20})
    rows = task.load_splits()["train"]
    examples, counts = encode_rows(task, rows, tokenizer, max_length=512, progress=False)
    assert counts["kept"] + counts["skipped_overlong"] == 20
    assert all(len(e["input_ids"]) <= 512 for e in examples)
    assert counts["truncated"] > 0  # real notes are long (median ≈ 410 prompt tokens)
    assert torch.tensor([len(e["input_ids"]) for e in examples]).max() <= 512


def test_max_examples_is_a_seeded_subset_not_a_prefix(medcalc_csv):
    """The real file is sorted by calculator: a prefix of 96 rows covers 7 calculators; the seeded subset
    must spread over the file, stay in source order, be reproducible, and leave uncapped splits whole."""
    full = MedCalc(source=str(medcalc_csv), format="label").load_splits()
    capped = MedCalc(source=str(medcalc_csv), format="label", max_examples={"train": 96, "validation": 32}).load_splits()
    again = MedCalc(source=str(medcalc_csv), format="label", max_examples={"train": 96, "validation": 32}).load_splits()
    other = MedCalc(source=str(medcalc_csv), format="label", split_seed=1, max_examples={"train": 96}).load_splits()
    assert len(capped["train"]) == 96 and len(capped["validation"]) == 32 and capped["test"] == full["test"]
    assert [r["Row Number"] for r in capped["train"]] == [r["Row Number"] for r in again["train"]]
    assert [r["Row Number"] for r in capped["train"]] != [r["Row Number"] for r in other["train"]]
    position = {r["Row Number"]: i for i, r in enumerate(full["train"])}
    order = [position[r["Row Number"]] for r in capped["train"]]
    assert order == sorted(order)  # a subset in source order
    prefix_calculators = {r["Calculator ID"] for r in full["train"][:96]}
    assert len({r["Calculator ID"] for r in capped["train"]}) > 3 * len(prefix_calculators)
