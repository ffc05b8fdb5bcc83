"""ESCI task: official-schema loading, validation, prompts, answer extraction and metrics."""

from __future__ import annotations

import json
import logging

import pytest

from esci_fixture import MISSING_PRODUCT, US_SMALL, example_rows, joined_rows, product_rows, write_esci
from talr.tasks.base import DataError
from talr.tasks.esci import ESCI, clean, extract_label


@pytest.fixture
def esci_dir(tmp_path):
    return write_esci(tmp_path / "esci")


def load(source, **kw):
    task = ESCI(source=str(source), **{"format": "label", "val_fraction": 0.5, **kw})
    return task, task.load_splits()


def ids(splits):
    return {s: {r["example_id"] for r in rows} for s, rows in splits.items()}


# -- loading --------------------------------------------------------------------------------------
def test_join_and_locale_filter_counts(esci_dir, caplog):
    with caplog.at_level(logging.WARNING):
        task, splits = load(esci_dir)
    assert set(splits) == {"train", "validation", "test"}
    assert task.stats["examples_read"] == 40
    assert task.stats["dropped_locale"] == US_SMALL["dropped_locale"]
    assert task.stats["dropped_not_small"] == US_SMALL["dropped_not_small"]
    assert task.stats["missing_products"] == US_SMALL["missing"] == 1
    assert "1 examples whose product is not in" in caplog.text
    assert len(splits["test"]) == task.stats["rows_test"] == US_SMALL["test"]
    assert len(splits["train"]) + len(splits["validation"]) == US_SMALL["train_pool"]
    rows = [r for s in splits.values() for r in s]
    assert all(r["product_locale"] == "us" for r in rows)
    assert MISSING_PRODUCT not in {r["example_id"] for r in rows}
    # joined on (locale, id): query 0's products keep their "us" titles although "es" reuses the ids
    titles = {r["product_title"] for r in rows if r["query_id"] == 1000}
    assert titles and all(t.startswith("Product ") for t in titles)


def test_all_locales_and_large_version(esci_dir):
    task, splits = load(esci_dir, locale=None, small_version=False)
    assert sum(map(len, splits.values())) == 39
    assert task.stats["dropped_locale"] == task.stats["dropped_not_small"] == 0
    es = [r for s in splits.values() for r in s if r["product_locale"] == "es"]
    assert len(es) == 4 and all(r["product_title"].startswith("Producto") for r in es)


def test_small_version_filter(esci_dir):
    _, small = load(esci_dir)
    _, full = load(esci_dir, small_version=False)
    assert sum(map(len, small.values())) == US_SMALL["kept"]
    assert sum(map(len, full.values())) == US_SMALL["kept"] + 8
    assert {r["query_id"] for s in small.values() for r in s}.isdisjoint({1006, 1007})


def test_no_query_straddles_splits_and_official_test(esci_dir):
    _, splits = load(esci_dir)
    queries = {s: {r["query_id"] for r in rows} for s, rows in splits.items()}
    assert queries["validation"] and queries["train"]  # val_fraction 0.5 over 4 train queries, seed 0
    assert not queries["train"] & queries["validation"]
    assert not (queries["train"] | queries["validation"]) & queries["test"]
    assert queries["test"] == {1004, 1005}
    assert load(esci_dir)[1] == splits  # deterministic


def test_explicit_files_equal_folder(esci_dir):
    _, by_folder = load(esci_dir)
    task = ESCI(examples_file=str(esci_dir / "shopping_queries_dataset_examples.parquet"),
                products_file=str(esci_dir / "shopping_queries_dataset_products.parquet"), format="label", val_fraction=0.5)
    assert task.load_splits() == by_folder


def test_max_examples_is_a_seeded_random_subset(esci_dir, tmp_path):
    _, full = load(esci_dir)
    _, capped = load(esci_dir, max_examples={"test": 3})
    assert len(capped["test"]) == 3 and ids(capped)["test"] < ids(full)["test"]
    assert capped["train"] == full["train"]
    shuffled = write_esci(tmp_path / "shuffled", examples=example_rows()[::-1])  # file order does not matter
    assert ids(load(shuffled, max_examples={"test": 3})[1]) == ids(capped)
    other_seed = [ids(load(esci_dir, max_examples={"test": 3}, split_seed=s)[1])["test"] for s in range(1, 6)]
    assert any(o != ids(capped)["test"] for o in other_seed)


@pytest.mark.parametrize("example_id", [106, MISSING_PRODUCT])  # checked before the join drops a row
def test_bad_label_names_example_id(tmp_path, example_id):
    examples = example_rows()
    examples[example_id - 100]["esci_label"] = "X"
    folder = write_esci(tmp_path, examples=examples)
    with pytest.raises(DataError, match=rf"row {example_id}.*esci_label.*'X'") as e:
        load(folder)
    assert e.value.row == example_id and e.value.column == "esci_label"


def test_label_words_are_normalised(tmp_path):
    examples = example_rows()
    examples[0]["esci_label"] = "exact"
    _, splits = load(write_esci(tmp_path, examples=examples))
    assert {r["esci_label"] for s in splits.values() for r in s} == set("ESCI")


@pytest.mark.parametrize("which,column", [("examples", "query"), ("examples", "split"), ("products", "product_title")])
def test_missing_column_names_file_and_column(tmp_path, which, column):
    rows = example_rows() if which == "examples" else product_rows()
    rows = [{k: v for k, v in r.items() if k != column} for r in rows]
    folder = write_esci(tmp_path, **{which: rows})
    with pytest.raises(DataError) as e:
        load(folder)
    assert e.value.column == column and f"shopping_queries_dataset_{which}.parquet" in str(e.value)


def test_joined_jsonl_source(tmp_path):
    path = tmp_path / "esci.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in joined_rows()))
    task, splits = load(path)
    _, official = load(write_esci(tmp_path / "official"))
    assert ids(splits) == ids(official)
    assert task.stats["examples_read"] == 39 and task.stats["dropped_locale"] == 8
    # without a split column the test split is carved by query too
    rows = [{k: v for k, v in r.items() if k != "split"} for r in joined_rows()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, splits = load(path, locale=None, small_version=False, val_fraction=0.3, test_fraction=0.3)
    queries = [{r["query_id"] for r in rows} for rows in splits.values()]
    assert sum(map(len, splits.values())) == 39 and all(queries)
    assert not (queries[0] & queries[1] or queries[0] & queries[2] or queries[1] & queries[2])


def test_folder_of_joined_split_files(tmp_path):
    rows = joined_rows()
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == split))
    task, splits = load(tmp_path)
    _, official = load(write_esci(tmp_path / "official"))
    assert ids(splits) == ids(official) and task.stats["examples_read"] == 39


def test_joined_file_missing_column_and_duplicate_ids(tmp_path):
    path = tmp_path / "esci.jsonl"
    rows = [{k: v for k, v in r.items() if k != "product_title"} for r in joined_rows()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="product_title") as e:
        load(path)
    assert str(path) in str(e.value)
    rows = joined_rows()
    rows[-1]["example_id"] = rows[0]["example_id"]  # a test row reusing a train id
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="duplicate example_id") as e:
        load(path, locale=None, small_version=False)
    assert e.value.row == str(rows[0]["example_id"])


# -- cot rationales -------------------------------------------------------------------------------
def test_cot_without_rationales_is_a_clear_error(esci_dir):
    with pytest.raises(DataError, match="format 'cot' needs a rationale") as e:
        load(esci_dir, format="cot")
    assert "rationale_column" in str(e.value) and "rationale_file" in str(e.value) and "format 'label'" in str(e.value)


def test_cot_with_rationale_file(esci_dir, tmp_path):
    side = tmp_path / "rationales.jsonl"
    side.write_text("".join(json.dumps({"example_id": e["example_id"], "why": f"Because {e['example_id']}."}) + "\n"
                            for e in example_rows()))
    task, splits = load(esci_dir, format="cot", rationale_file=str(side), rationale_column="why")
    row = splits["train"][0]
    word = dict(E="Exact", S="Substitute", C="Complement", I="Irrelevant")[row["esci_label"]]
    assert task.target(row) == f"Because {row['example_id']}.\nAnswer: {word}"
    assert extract_label(task.target(row)) == "ESCI".index(row["esci_label"])
    # a side file that lacks one used row still fails, naming that row
    side.write_text("".join(json.dumps({"example_id": i, "why": "x"}) + "\n" for i in range(100, 140) if i != 100))
    with pytest.raises(DataError, match="row 100"):
        load(esci_dir, format="cot", rationale_file=str(side), rationale_column="why")


def test_cot_with_rationale_column(tmp_path):
    path = tmp_path / "esci.jsonl"
    path.write_text("".join(json.dumps({**r, "cot": "Think."}) + "\n" for r in joined_rows()))
    task, splits = load(path, format="cot", rationale_column="cot")
    assert task.target(splits["test"][0]).startswith("Think.\nAnswer: ")


# -- prompt and target ----------------------------------------------------------------------------
def test_prompt_strips_html_omits_missing_and_respects_budget(esci_dir):
    task, splits = load(esci_dir, locale=None, small_version=False)
    rows = {r["example_id"]: r for s in splits.values() for r in s}
    system, user = task.messages(rows[100])
    assert system["role"] == "system" and user["role"] == "user"
    for word in ("Exact", "Substitute", "Complement", "Irrelevant", "Answer:"):
        assert word in system["content"]
    text = user["content"]
    assert "<" not in text and "&amp;" not in text and "&gt;" not in text
    assert "Query: query 0 words\nProduct title: Product 0-0 & more\nBrand: Brand0\nColour: Red\n" in text
    assert "Bullet points: Bullet one; Bullet two > three\nDescription: Very long description sentence." in text
    body = text.split("Bullet points: ")[1]
    assert len(body) - len("\nDescription: ") == 500 and body.endswith("…")
    # missing description (None), empty brand and None colour / bullets are omitted
    text = task.messages(rows[111])[1]["content"]
    assert text == "Query: query 2 words\nProduct title: Product 2-3 & more"
    small = ESCI(source=str(esci_dir), format="label", description_budget=10)
    assert "Bullet points: Bullet on…" in small.messages(rows[100])[1]["content"]
    assert "Description" not in small.messages(rows[100])[1]["content"]
    assert "Answer: Exact" in task.target(rows[100]) and task.target(rows[111]) == "Answer: Irrelevant"


def test_clean_keeps_literal_angle_brackets():
    assert clean("Weight < 2 kg &amp; <b>bold</b><br/>\n<!-- x -->end") == "Weight < 2 kg & bold end"
    assert clean(float("nan")) == clean(None) == clean("  ") == ""


def test_config_keys_parse_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ESCI, "task")
    cfg = parser.parse_string("task:\n  source: /data/esci\n  format: cot\n  locale: null\n  max_examples: {train: 10}\n"
                              "  rationale_file: r.jsonl\n")
    task = parser.instantiate_classes(cfg).task
    assert (task.format, task.locale, task.max_examples, task.rationale_file) == ("cot", None, {"train": 10}, "r.jsonl")
    assert task.small_version is True and task.description_budget == 500


def test_shorten_cuts_visible_description(esci_dir):
    task, splits = load(esci_dir)
    row = next(r for r in splits["train"] + splits["validation"] if r["example_id"] == 100)
    cut = task.shorten(row, 0.1)
    assert len(cut["product_description"]) == int(len(" ".join(row["product_description"][3:-4].split())) * 0.1)
    assert row["product_description"].startswith("<p>")  # the original row is untouched
    none = {**row, "product_description": None}
    assert "Description" not in task.messages(task.shorten(none, 0.5))[1]["content"]


# -- evaluation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,label", [
    ("Answer: Exact", 0), ("answer: substitute", 1), ("ANSWER: COMPLEMENT", 2), ("Answer: Irrelevant.", 3),
    ("Answer: E", 0), ("answer: s", 1), ("Answer: (C)", 2), ("Answer: I", 3), ("Answer: 'i'\n", 3),
    ("**Answer:** Substitute", 1), ("**Answer**: Exact", 0), ("Final answer: Complement", 2),
    ("Answer: E (Exact)", 0), ("Answer: S.\nThanks", 1), ("It looks good.\n\nAnswer: Exact", 0),
    ("Answer: Exact\n...on reflection...\nAnswer: Irrelevant", 3),  # the last answer wins
    ("Answer: Exact\nAnswer: maybe", None),  # ... even when it is unparseable
    ("Answer: I think it is exact", None), ("Answer: Exactly", None), ("Answer: X", None),
    ("Exact", None), ("The answer is Exact", None), ("", None), (None, None), ("Answer:", None),
])
def test_extract_label(text, label):
    assert extract_label(text) == label


def hand_rows(labels):
    return [{"esci_label": x} for x in labels]


def test_metrics_on_a_hand_example():
    task = ESCI(source="unused", format="label")
    metrics = task.metrics()
    generations = ["Answer: Exact", "Answer: Substitute", "Because.\nAnswer: S", "no idea", "answer: irrelevant",
                   "Answer: C"]
    targets = ["E", "E", "S", "C", "I", "E"]
    task.update_metrics(metrics, generations[:4], hand_rows(targets[:4]))  # two batches
    task.update_metrics(metrics, generations[4:], hand_rows(targets[4:]))
    out = {k: float(v) for k, v in metrics.compute().items()}
    # E: tp 1, fn 2 -> 0.5; S: tp 1, fp 1 -> 2/3; C: tp 0 fp 1 fn 1 -> 0; I: tp 1 -> 1
    expected = {"accuracy": 3 / 6, "f1_E": 0.5, "f1_S": 2 / 3, "f1_C": 0.0, "f1_I": 1.0,
                "macro_f1": (0.5 + 2 / 3 + 0 + 1) / 4, "unparseable": 1 / 6, "unparseable_count": 1}
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, abs=1e-6), k
    sklearn = pytest.importorskip("sklearn.metrics")
    y_true, y_pred = [0, 0, 1, 2, 3, 0], [0, 1, 1, 4, 3, 2]
    assert out["macro_f1"] == pytest.approx(sklearn.f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro"))
    assert out["accuracy"] == pytest.approx(sklearn.accuracy_score(y_true, y_pred))


def test_macro_f1_skips_classes_absent_from_targets_and_predictions():
    task = ESCI(source="unused", format="label")
    metrics = task.metrics()
    task.update_metrics(metrics, ["Answer: E", "garbage", "Answer: Exact"], hand_rows("EEE"))
    out = metrics.compute()
    assert float(out["macro_f1"]) == pytest.approx(0.8) and float(out["f1_S"]) == 0.0
    assert float(out["accuracy"]) == pytest.approx(2 / 3) and int(out["unparseable_count"]) == 1
    metrics.reset()
    task.update_metrics(metrics, ["Answer: Exact"], hand_rows("E"))
    assert float(metrics.compute()["accuracy"]) == 1.0
    with pytest.raises(ValueError):
        task.update_metrics(metrics, ["a"], hand_rows("EE"))


def test_overlong_policy_cuts_the_description(esci_dir, tokenizer):
    from talr.data.encoding import IGNORE, encode_chat, encode_rows

    task, splits = load(esci_dir, description_budget=2000)
    row = next(r for r in splits["train"] + splits["validation"] if r["example_id"] == 100)
    _, full = encode_chat(tokenizer, task.messages(row), task.target(row))
    examples, counts = encode_rows(task, [row], tokenizer, len(full) - 50, "truncate", split="train", progress=False)
    assert counts["truncated"] == 1 and len(examples[0]["input_ids"]) <= len(full) - 50
    assert "Description: Very long" in task.messages(examples[0]["row"])[1]["content"]
    labels = [t for t in examples[0]["labels"] if t != IGNORE]
    assert tokenizer.decode(labels).startswith("Answer: Exact")
