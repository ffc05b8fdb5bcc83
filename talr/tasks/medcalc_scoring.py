"""Official MedCalc-Bench answer extraction and correctness rules, without `eval`.

The rules follow the benchmark's evaluation script (ncbi-nlp/MedCalc-Bench, `evaluation/run.py`):

* the answer is the value of the last ``"answer":`` key of the generation;
* calculators 13 and 68 answer a date ``MM/DD/YYYY`` (leading zeros optional), compared as dates;
* calculator 69 answers a (weeks, days) pair; both numbers must match;
* integer calculators compare ``round(answer)`` with the ground truth, after the official parsing
  ("N out of M" -> N; a comma-separated list of numbers -> how many; else the last number);
* decimal calculators need ``Lower Limit <= answer <= Upper Limit``, after the official parsing
  (``str(<arithmetic>)`` -> its value; "x mL/min/1.73 m²" -> x; "53.1%" -> 0.531; else the last number).

Where the official script calls `eval` on model output, this module walks a restricted `ast` instead.
A model answer that cannot be parsed is simply wrong; a malformed *example* raises `DataError`.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import re
from collections.abc import Mapping

from talr.tasks.base import DataError

__all__ = [
    "DATE_CALCULATORS", "WEEKS_DAYS_CALCULATORS", "INTEGER_CALCULATORS", "DECIMAL_CALCULATORS",
    "extract_answer", "is_correct", "score_generation", "output_kind", "safe_arithmetic",
]

DATE_CALCULATORS = frozenset({13, 68})
WEEKS_DAYS_CALCULATORS = frozenset({69})
INTEGER_CALCULATORS = frozenset({4, 15, 16, 17, 18, 20, 21, 25, 27, 28, 29, 32, 33, 36, 43, 45, 48, 51})
DECIMAL_CALCULATORS = frozenset({
    2, 3, 5, 6, 7, 8, 9, 10, 11, 19, 22, 23, 24, 26, 30, 31, 38, 39, 40, 44, 46, 49,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67,
})
PLACEHOLDERS = frozenset({
    "str(short_and_direct_answer_of_the_question)", "str(value which is the answer to the question)", "X.XX",
})
SOURCE = "MedCalc-Bench example"

# -- extraction ---------------------------------------------------------------------------------
_KEY = re.compile(r"""["']answer["']\s*:\s*""", re.IGNORECASE)
# after a closing quote: end of object, end of text, or the next `"key":`
_AFTER_VALUE = re.compile(r"""\s*(?:\}|$|,\s*["'][^"'\n]*["']\s*:)""")
_BARE_END = re.compile(r"""\}|\n|,\s*["'][^"'\n]*["']\s*:""")


def _quoted_value(text: str, quote: str) -> str:
    """The content of a string starting just after its opening `quote` (tolerant of truncation)."""
    i = 0
    while True:
        j = text.find(quote, i)
        if j < 0:  # truncated generation: keep what is there
            return text.strip()
        if text[j - 1: j] != "\\" and _AFTER_VALUE.match(text, j + 1):
            raw = text[:j]
            break
        i = j + 1
    if quote == '"':
        try:
            return json.loads('"' + raw + '"', strict=False)  # JSON escapes such as \u00b2
        except ValueError:
            return raw
    return raw


def extract_answer(generation: str) -> str:
    """The value of the last ``"answer":`` key in a JSON-ish generation, or "" if there is none.

    Accepts double or single quotes, a quoted or bare value (number, tuple, date), and truncated text.
    The official prompt placeholders count as no answer.
    """
    if not generation:
        return ""
    keys = list(_KEY.finditer(generation))
    if not keys:
        return ""
    rest = generation[keys[-1].end():]
    if rest[:1] in ("'", '"'):
        value = _quoted_value(rest[1:], rest[0])
    else:
        end = _BARE_END.search(rest)
        value = rest[: end.start()] if end else rest
    value = value.strip().strip('"').strip()
    return "" if value in PLACEHOLDERS else value


# -- safe arithmetic ----------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _round(x: float, ndigits: float = 0) -> float:
    if ndigits != int(ndigits) or abs(ndigits) > 20:
        raise ValueError("bad ndigits")
    return float(round(x, int(ndigits)))


_FUNCS = {"round": _round, "min": min, "max": max, "abs": abs, "sqrt": math.sqrt}
_MODULES = ("math", "np", "numpy")  # math.sqrt(...) and np.sqrt(...) are the same allowed function
_MAX_EXPR = 500


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)  # floats only: `**` overflows instead of building huge integers
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or (left < 0 and right != int(right))):
            raise ValueError("exponent out of range")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.Call) and not node.keywords and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _MODULES:
            name = func.attr
        elif isinstance(func, ast.Name):
            name = func.id
        else:
            raise ValueError("call of a non-name")
        if name not in _FUNCS or (name in ("sqrt", "abs") and len(node.args) != 1):
            raise ValueError(f"function {name!r} not allowed")
        return float(_FUNCS[name](*[_walk(a) for a in node.args]))
    raise ValueError(f"{type(node).__name__} not allowed")


_UNIT_WORDS = re.compile(r"\b(?:weight|height|mg/dl|g/dl|mmol/l|meq/l|kg|g)\b", re.IGNORECASE)


def safe_arithmetic(expression: str) -> float | None:
    """Value of an arithmetic expression (numbers, + - * / ** ^, unary minus, parentheses, round, min,
    max, abs, sqrt), or None. Cleans it the way the official script does (drops `# comments` and unit
    words, balances parentheses) and never executes anything else."""
    expr = expression.split("#")[0].replace("^", "**")
    expr = _UNIT_WORDS.sub("", expr)
    if len(expr) > _MAX_EXPR:
        return None
    opened, closed = expr.count("("), expr.count(")")
    expr = expr + ")" * (opened - closed) if opened > closed else "(" * (closed - opened) + expr
    try:
        value = _walk(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


# -- parsing model answers (official rules; None = unparseable) ---------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DATE = re.compile(r"^(0?[1-9]|1[0-2])/(0?[1-9]|[12][0-9]|3[01])/(\d{4})")
_WEEKS_DAYS = re.compile(r"(\d+)\s*(?:weeks?\b\s*,?\s*(?:and\s+)?|,\s*)(\d+)", re.IGNORECASE)


def _parse_date(text: str) -> dt.date | None:
    m = _DATE.match(text.strip())
    if not m:
        return None
    try:
        return dt.date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    except ValueError:  # e.g. 02/30/2020
        return None


def _parse_weeks_days(text: str) -> tuple[int, int] | None:
    cleaned = text.replace("[", "(").replace("]", ")").replace("'", "").replace('"', "")
    m = _WEEKS_DAYS.search(cleaned)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _parse_integer(text: str) -> float | None:
    m = re.search(r"(\d+) out of", text)
    if m:
        return float(m.group(1))
    m = re.search(r"-?\d+(?:, ?-?\d+)+", text)
    if m:
        return float(len(m.group(0).split(",")))
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def _parse_decimal(text: str) -> float | None:
    m = re.search(r"str\((.*)\)", text)
    if m:  # the model wrote the formula instead of the value
        return safe_arithmetic(m.group(1))
    m = re.search(r"(-?\d+(?:\.\d+)?)\s*mL/min/1.73", text)
    if m:
        return float(m.group(1))
    percents = re.findall(r"(-?\d+(?:\.\d+)?)%", text)
    if percents:
        return float(percents[-1]) / 100
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


# -- the example side (errors here are data errors) ---------------------------------------------
def _field(example: Mapping, column: str, row) -> str:
    value = example.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        raise DataError(SOURCE, "missing value", row=row, column=column)
    return str(value).strip()


def _number(example: Mapping, column: str, row) -> float:
    text = _field(example, column, row)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(SOURCE, f"not a number: {text!r}", row=row, column=column)
    return value


def output_kind(example: Mapping) -> str:
    """'date', 'weeks_days', 'integer' or 'decimal': by calculator id, else by the Output Type column."""
    row = example.get("Row Number")
    cid_text = _field(example, "Calculator ID", row)
    try:
        cid = int(float(cid_text))
    except (ValueError, OverflowError):
        raise DataError(SOURCE, f"not a calculator id: {cid_text!r}", row=row, column="Calculator ID") from None
    if cid in DATE_CALCULATORS:
        return "date"
    if cid in WEEKS_DAYS_CALCULATORS:
        return "weeks_days"
    if cid in INTEGER_CALCULATORS:
        return "integer"
    if cid in DECIMAL_CALCULATORS:
        return "decimal"
    kind = str(example.get("Output Type") or "").strip().lower()
    if kind not in ("date", "integer", "decimal"):
        raise DataError(SOURCE, f"calculator {cid} is not a known calculator and its output type {kind!r} is "
                        "not one of date/integer/decimal", row=row, column="Output Type")
    return kind


def is_correct(answer: str, example: Mapping) -> bool:
    """Whether an extracted answer is right for one example (a row in the official schema)."""
    kind = output_kind(example)
    row = example.get("Row Number")
    text = "" if answer is None else str(answer)
    if kind == "date":
        truth = _parse_date(_field(example, "Ground Truth Answer", row))
        if truth is None:
            raise DataError(SOURCE, "ground truth is not a MM/DD/YYYY date", row=row, column="Ground Truth Answer")
        return _parse_date(text) == truth
    if kind == "weeks_days":
        truth = _parse_weeks_days(_field(example, "Ground Truth Answer", row))
        if truth is None:
            raise DataError(SOURCE, "ground truth is not a (weeks, days) pair", row=row, column="Ground Truth Answer")
        return _parse_weeks_days(text) == truth
    if kind == "integer":
        truth = _number(example, "Ground Truth Answer", row)
        value = _parse_integer(text)
        return value is not None and math.isfinite(value) and round(value) == round(truth)
    _number(example, "Ground Truth Answer", row)
    lower, upper = _number(example, "Lower Limit", row), _number(example, "Upper Limit", row)
    value = _parse_decimal(text)
    return value is not None and math.isfinite(value) and lower <= value <= upper


def score_generation(generation: str, example: Mapping) -> bool:
    """`is_correct` of the answer extracted from a whole model generation."""
    return is_correct(extract_answer(generation), example)
