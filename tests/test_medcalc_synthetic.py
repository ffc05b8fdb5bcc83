"""Synthetic MedCalc rows: deterministic, official schema, self-consistent, hand-checked formulas."""

from __future__ import annotations

import ast
import csv
import datetime as dt
import re
from collections import Counter

import pytest

from talr.tasks.medcalc_scoring import is_correct
from talr.tasks.medcalc_synthetic import (
    CALCULATORS, COLUMNS, anion_gap, bmi, creatinine_clearance, due_date, generate_rows, gestational_age,
    ideal_body_weight, mean_arterial_pressure, qtc_bazett, serum_osmolality,
)

N = 600


@pytest.fixture(scope="module")
def rows():
    return generate_rows(N, seed=0)


def test_deterministic_and_seeded(rows):
    assert generate_rows(N, seed=0) == rows
    other = generate_rows(N, seed=1)
    assert other != rows and sum(a["Patient Note"] == b["Patient Note"] for a, b in zip(rows, other)) < N // 10
    assert generate_rows(50, seed=0) == rows[:50]  # a prefix does not depend on n
    assert generate_rows(0) == []
    with pytest.raises(ValueError):
        generate_rows(-1)


def test_schema_equals_the_real_csv_header(rows, medcalc_csv):
    with open(medcalc_csv, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert tuple(header) == COLUMNS
    for r in rows:
        assert tuple(r) == COLUMNS and all(isinstance(v, str) and v for v in r.values())
    assert [r["Row Number"] for r in rows] == [str(i) for i in range(1, N + 1)]


def test_calculators_match_the_real_data(rows, medcalc_csv):
    with open(medcalc_csv, newline="", encoding="utf-8") as f:
        real = {r["Calculator ID"]: r for r in csv.DictReader(f)}
    assert {6, 5, 39, 2, 11, 10, 30, 13} <= set(CALCULATORS)
    assert {r["Calculator ID"] for r in rows} == {str(c) for c in CALCULATORS}
    for r in rows:
        ref = real[r["Calculator ID"]]
        for col in ("Calculator Name", "Category", "Output Type", "Question"):
            assert r[col] == ref[col], (r["Calculator ID"], col)
        assert set(ast.literal_eval(r["Relevant Entities"])) == set(ast.literal_eval(ref["Relevant Entities"]))


def test_every_row_scores_correct_with_its_own_ground_truth(rows):
    assert [r["Row Number"] for r in rows if not is_correct(r["Ground Truth Answer"], r)] == []
    for seed in (1, 2, 3):
        assert all(is_correct(r["Ground Truth Answer"], r) for r in generate_rows(200, seed))


def test_limits_bracket_the_answer(rows):
    for r in rows:
        if r["Output Type"] == "decimal":
            a, lo, hi = (float(r[c]) for c in ("Ground Truth Answer", "Lower Limit", "Upper Limit"))
            assert lo < a < hi
            assert lo == pytest.approx(0.95 * a, abs=1e-6) and hi == pytest.approx(1.05 * a, abs=1e-6)
            assert re.fullmatch(r"-?\d+(\.\d{1,3})?", r["Ground Truth Answer"])  # rounded to 3 places
            assert not is_correct(f"{hi * 1.001 + 1e-3:.4f}", r) and not is_correct(f"{lo * 0.999 - 1e-3:.4f}", r)
        else:
            assert r["Lower Limit"] == r["Upper Limit"] == r["Ground Truth Answer"]


def test_notes_are_short_and_hold_the_values(rows):
    words = [len(r["Patient Note"].split()) for r in rows]
    assert 35 <= min(words) and max(words) <= 80
    for r in rows:
        note = r["Patient Note"]
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", note)) <= 3
        for key, value in ast.literal_eval(r["Relevant Entities"]).items():
            if key == "sex":
                assert (" man " in note) == (value == "Male") and (" woman " in note) == (value == "Female")
            else:
                shown = value if isinstance(value, str) else f"{value[0]:g}" if isinstance(value, list) else str(value)
                assert shown in note, (key, value, note)


def test_explanations_end_with_the_answer(rows):
    for r in rows:
        last = r["Ground Truth Explanation"].splitlines()[-1]
        assert "Hence" in last and f"is {r['Ground Truth Answer']}" in last, last


def test_some_notes_carry_two_questions(rows):
    per_note = Counter(r["Note ID"] for r in rows)
    assert all(re.fullmatch(r"synthetic-\d{6}", k) for k in per_note)
    assert set(per_note.values()) == {1, 2} and 0.1 < sum(v == 2 for v in per_note.values()) / len(per_note) < 0.6
    by_note: dict[str, list[dict]] = {}
    for r in rows:
        by_note.setdefault(r["Note ID"], []).append(r)
    for group in by_note.values():
        assert len({r["Patient Note"] for r in group}) == 1
        assert len({r["Calculator ID"] for r in group}) == len(group)


def test_rows_recompute_from_their_entities(rows):
    """Independent of the explanation text: recompute each answer from Relevant Entities."""
    def v(e, k):
        return e[k][0]

    formula = {
        "6": lambda e: bmi(v(e, "weight"), v(e, "height")),
        "10": lambda e: ideal_body_weight(e["sex"], v(e, "height")),
        "2": lambda e: creatinine_clearance(e["sex"], v(e, "age"), v(e, "weight"), v(e, "height"), v(e, "creatinine")),
        "5": lambda e: mean_arterial_pressure(v(e, "Systolic Blood Pressure"), v(e, "Diastolic Blood Pressure")),
        "11": lambda e: qtc_bazett(v(e, "Heart Rate or Pulse"), v(e, "QT interval")),
        "39": lambda e: anion_gap(v(e, "Sodium"), v(e, "Chloride"), v(e, "Bicarbonate")),
        "30": lambda e: serum_osmolality(v(e, "Sodium"), v(e, "Blood Urea Nitrogen (BUN)"), v(e, "Glucose")),
    }
    for r in rows:
        e = ast.literal_eval(r["Relevant Entities"])
        if r["Calculator ID"] in formula:
            assert float(r["Ground Truth Answer"]) == pytest.approx(formula[r["Calculator ID"]](e), abs=5e-4)
        elif r["Calculator ID"] == "13":
            lmp = dt.datetime.strptime(e["Last menstrual date"], "%m/%d/%Y").date()
            assert e["cycle length"] >= 28  # where Naegele and the official data agree
            assert r["Ground Truth Answer"] == (lmp + dt.timedelta(days=252 + e["cycle length"])).strftime("%m/%d/%Y")


# -- formulas by hand ---------------------------------------------------------------------------
def test_formulas_by_hand():
    assert round(bmi(70, 175), 3) == 22.857
    assert round(mean_arterial_pressure(120, 80), 3) == 93.333
    assert anion_gap(140, 104, 24) == 12
    assert round(ideal_body_weight("Male", 175), 3) == 70.465  # 175 cm = 68.898 in
    assert round(ideal_body_weight("Female", 160), 3) == 52.382  # 160 cm = 62.992 in
    assert round(qtc_bazett(60, 400), 3) == 400
    assert round(qtc_bazett(75, 380), 3) == 424.853  # RR 0.8
    assert round(qtc_bazett(90, 400), 3) == 489.776  # RR rounded to 0.667 first, as officially (not 489.898)
    assert round(serum_osmolality(140, 28, 180), 3) == 300
    assert due_date(dt.date(2021, 1, 1), 28) == dt.date(2021, 10, 8)
    assert due_date(dt.date(2021, 1, 1), 30) == dt.date(2021, 10, 10)
    assert gestational_age(dt.date(2021, 1, 1), dt.date(2021, 2, 15)) == (6, 3)


def test_cockcroft_gault_weight_rules_by_hand():
    # underweight (BMI 16.3): actual weight 50 kg -> 60 * 50 / (2.0 * 72)
    assert round(creatinine_clearance("Male", 80, 50, 175, 2.0), 3) == 20.833
    # normal (BMI 22.9), actual 70 kg < IBW 70.465 -> 80 * 70 / 72
    assert round(creatinine_clearance("Male", 60, 70, 175, 1.0), 3) == 77.778
    # normal (BMI 24.5), IBW 70.465 < actual 75 kg -> 100 * 70.465 / 72
    assert round(creatinine_clearance("Male", 40, 75, 175, 1.0), 3) == 97.868
    # obese (BMI 39.1): ABW = 52.382 + 0.4 * (100 - 52.382) = 71.429 -> 90 * 71.429 * 0.85 / (1.2 * 72)
    assert round(creatinine_clearance("Female", 50, 100, 160, 1.2), 3) == 63.244
