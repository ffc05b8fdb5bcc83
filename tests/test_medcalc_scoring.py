"""Official MedCalc-Bench scoring: every real ground truth passes, perturbations fail, no eval."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re

import pytest

from talr.tasks.base import DataError
from talr.tasks.medcalc_scoring import (
    extract_answer, is_correct, output_kind, safe_arithmetic, score_generation,
)


@pytest.fixture(scope="module")
def rows(medcalc_csv):
    with open(medcalc_csv, newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert len(out) == 1047
    return out


def ex(cid, gt, lo=None, hi=None, out_type=""):
    return {"Row Number": "7", "Calculator ID": cid, "Output Type": out_type, "Ground Truth Answer": gt,
            "Lower Limit": gt if lo is None else lo, "Upper Limit": gt if hi is None else hi}


# -- real rows ----------------------------------------------------------------------------------
def test_every_real_ground_truth_scores_correct(rows):
    wrong = [r["Row Number"] for r in rows if not is_correct(r["Ground Truth Answer"], r)]
    assert wrong == []
    wrapped = [r["Row Number"] for r in rows if not score_generation(
        json.dumps({"step_by_step_thinking": r["Ground Truth Explanation"], "answer": r["Ground Truth Answer"]}), r)]
    assert wrapped == []


def test_real_kinds_cover_every_rule(rows):
    kinds = {output_kind(r) for r in rows}
    assert kinds == {"date", "weeks_days", "integer", "decimal"}


def test_perturbed_real_answers_score_wrong(rows):
    for r in rows:
        kind, gt = output_kind(r), r["Ground Truth Answer"]
        if kind == "decimal":
            lo, hi = float(r["Lower Limit"]), float(r["Upper Limit"])
            eps = max(abs(lo), abs(hi), 1.0) * 1e-3
            assert not is_correct(f"{hi + eps:.6f}", r), r["Row Number"]
            assert not is_correct(f"{lo - eps:.6f}", r), r["Row Number"]
            assert is_correct(r["Lower Limit"], r) and is_correct(r["Upper Limit"], r)  # limits inclusive
        elif kind == "integer":
            assert not is_correct(str(int(gt) + 1), r) and not is_correct(str(int(gt) - 1), r)
        elif kind == "date":
            d = dt.datetime.strptime(gt, "%m/%d/%Y") + dt.timedelta(days=1)
            assert not is_correct(d.strftime("%m/%d/%Y"), r), r["Row Number"]
        else:
            weeks, days = map(int, re.findall(r"\d+", gt))
            assert not is_correct(f"({weeks} weeks, {days + 1} days)", r)
            assert not is_correct(f"({weeks + 1} weeks, {days} days)", r)
            assert is_correct(f"({weeks} weeks, {days} days)", r)


def test_real_dates_without_leading_zeros(rows):
    for r in rows:
        if output_kind(r) == "date":
            d = dt.datetime.strptime(r["Ground Truth Answer"], "%m/%d/%Y")
            assert is_correct(f"{d.month}/{d.day}/{d.year}", r)


# -- odd answer formats, by the official rules --------------------------------------------------
def test_decimal_formats():
    e = ex("3", "12.5", "11.875", "13.125")
    assert is_correct("12.5 mL/min", e)
    assert is_correct("12.5 mL/min/1.73 m²", e)
    assert is_correct("The GFR is 12.9", e)
    assert not is_correct("13.2 mL/min/1.73 m²", e)
    assert not is_correct("12.5 mL/min/1.73 m² (was 30 last year)", ex("3", "30", "28.5", "31.5"))
    assert is_correct("str(round(25 / 2, 1))", e)
    assert is_correct("str((10 + 2.5)", e)  # unbalanced parentheses are closed, as officially
    assert is_correct("str(sqrt(156.25))", e) and is_correct("str(math.sqrt(156.25))", e)
    assert not is_correct("str(25 / 3)", e)
    pct = ex("46", "0.531", "0.50445", "0.55755")
    assert is_correct("53.1%", pct) and not is_correct("53.1", pct)
    assert is_correct("0.531", pct)


def test_integer_formats():
    assert is_correct("3 out of 5", ex("4", "3")) and not is_correct("3 out of 5", ex("4", "5"))
    assert is_correct("1, 4, 7", ex("15", "3"))  # a list of numbers counts them
    assert is_correct("2.6", ex("21", "3")) and not is_correct("2.4", ex("21", "3"))
    assert is_correct("The score is 12 points.", ex("28", 12))  # ints as values work too
    assert is_correct("-1", ex("45", "-1")) and not is_correct("1", ex("45", "-1"))


def test_date_formats():
    e = ex("13", "09/03/2014")
    for good in ("09/03/2014", "9/3/2014", "09/3/2014", " 9/03/2014 "):
        assert is_correct(good, e), good
    for bad in ("09/04/2014", "2014-09-03", "03/09/2014", "02/30/2014", "13/03/2014", "Sept 3, 2014"):
        assert not is_correct(bad, e), bad


def test_weeks_days_formats():
    e = ex("69", "('14 weeks', '1 days')")
    for good in ("(14 weeks, 1 days)", "('14 weeks', '1 days')", "[14, 1]", "14 weeks, 1 day", "(14, 1)",
                 '("14 weeks", "1 day")', "14 weeks and 1 day"):
        assert is_correct(good, e), good
    for bad in ("(14 weeks, 2 days)", "(15 weeks, 1 days)", "14 weeks", "99 days", "[1, 14]"):
        assert not is_correct(bad, e), bad


@pytest.mark.parametrize("e", [ex("3", "12.5", "11.875", "13.125"), ex("4", "3"), ex("13", "09/03/2014"),
                               ex("69", "('1 weeks', '2 days')")])
def test_unparseable_answers_are_wrong_not_errors(e):
    for junk in ("", "N/A", "unknown", "str(", "str())", "((((", "str(1/0)", "str(9**9**9**9)", None):
        assert is_correct(junk, e) is False


def test_no_eval_of_model_output(monkeypatch, capfd):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    attack = "str(__import__('os').system('echo hi'))"
    for e in (ex("3", "0", "0", "0"), ex("4", "0"), ex("13", "09/03/2014"), ex("69", "('0 weeks', '0 days')")):
        assert is_correct(attack, e) is False
        assert score_generation(json.dumps({"answer": attack}), e) is False
    assert is_correct("str(().__class__.__bases__[0].__subclasses__())", ex("3", "0", "0", "0")) is False
    assert called == [] and "hi" not in capfd.readouterr().out


def test_safe_arithmetic():
    assert safe_arithmetic("round((140 - 87) * 48.0 * 1 / (1.4 * 72), 3)") == 25.238
    assert safe_arithmetic("2^3 + -1") == 7.0
    assert safe_arithmetic("min(3, 4) + max(1, 2) + abs(-1)") == 6.0
    assert safe_arithmetic("70 kg / (1.75 * 1.75)") == pytest.approx(22.857, abs=1e-3)
    assert safe_arithmetic("1 + 2 # then add the rest") == 3.0
    for bad in ("x + 1", "'a' * 3", "[1, 2]", "round(2.5, 0.5)", "(-8) ** 0.5", "10 ** 10000", "lambda: 1",
                "open('f')", "sqrt(-1)", "1 if 1 else 2", "True + 1"):
        assert safe_arithmetic(bad) is None, bad


# -- answer extraction --------------------------------------------------------------------------
def test_extract_full_json():
    gen = json.dumps({"step_by_step_thinking": 'BMI = 70 / 1.75^2; "answer": 3 is wrong', "answer": "25.2"})
    assert extract_answer(gen) == "25.2"
    assert extract_answer('{"answer": "3", "step_by_step_thinking": "because"}') == "3"
    assert extract_answer('Sure!\n```json\n{"step_by_step_thinking": "...", "answer": 22.857}\n```') == "22.857"
    assert extract_answer('{"Answer": "8.1 mL/min/1.73 m\\u00b2"}') == "8.1 mL/min/1.73 m²"


def test_extract_truncated_and_last_wins():
    assert extract_answer('{"step_by_step_thinking": "so the value is", "answer": "25.2') == "25.2"
    assert extract_answer('{"step_by_step_thinking": "so", "answer": 17') == "17"
    assert extract_answer('{"step_by_step_thinking": "so the answer is 4') == ""
    assert extract_answer('{"answer": "3"} wait, correction: {"answer": "4"}') == "4"
    assert extract_answer('{"answer": 3}\n{"answer": "(4 weeks, 2 days)"}') == "(4 weeks, 2 days)"


def test_extract_quotes_bare_values_and_placeholders():
    assert extract_answer("{'step_by_step_thinking': 'x', 'answer': '09/23/2014'}") == "09/23/2014"
    assert extract_answer("{'answer': '('14 weeks', '1 days')'}") == "('14 weeks', '1 days')"
    assert extract_answer('{"answer": (4 weeks, 2 days)}') == "(4 weeks, 2 days)"
    assert extract_answer('{"answer": 09/23/2014, "note": "x"}') == "09/23/2014"
    for placeholder in ('"str(short_and_direct_answer_of_the_question)"',
                        '"str(value which is the answer to the question)"', "X.XX", '"X.XX"'):
        assert extract_answer('{"answer": %s}' % placeholder) == ""
    assert extract_answer("") == "" and extract_answer("no json at all") == ""


def test_score_generation_end_to_end():
    e = ex("6", "22.857", "21.71415", "23.99985")
    assert score_generation('{"step_by_step_thinking": "70/1.75^2", "answer": "22.86 kg/m²"}', e)
    # official quirk kept on purpose: the last number of "22.86 kg/m^2" is the exponent 2
    assert not score_generation('{"step_by_step_thinking": "70/1.75^2", "answer": "22.86 kg/m^2"}', e)
    assert not score_generation('{"step_by_step_thinking": "the BMI is 22.86", "answer": "25.2"}', e)
    assert not score_generation('The BMI is 22.86.', e)  # no answer key: not found


# -- malformed examples -------------------------------------------------------------------------
def test_unknown_calculator_routes_by_output_type():
    assert is_correct("4", ex("999", "4", out_type="integer"))
    assert is_correct("4.1", ex("999", "4", "3.8", "4.2", out_type="decimal"))
    assert is_correct("1/2/2020", ex("999", "01/02/2020", out_type="date"))
    for out_type in ("", "fraction", None):
        with pytest.raises(DataError) as err:
            is_correct("4", ex("999", "4", out_type=out_type))
        assert err.value.column == "Output Type" and "999" in str(err.value)


@pytest.mark.parametrize("e,column", [
    (ex("3", "abc", "1", "2"), "Ground Truth Answer"),
    (ex("3", "1.5", "", "2"), "Lower Limit"),
    (ex("3", "1.5", "1", "nan"), "Upper Limit"),
    (ex("4", "three"), "Ground Truth Answer"),
    (ex("13", "2014-09-03"), "Ground Truth Answer"),
    (ex("69", "fourteen weeks"), "Ground Truth Answer"),
    (ex("abc", "1"), "Calculator ID"),
    ({"Ground Truth Answer": "1"}, "Calculator ID"),
])
def test_bad_examples_raise_data_error_naming_the_column(e, column):
    with pytest.raises(DataError) as err:
        is_correct("1", e)
    assert err.value.column == column
