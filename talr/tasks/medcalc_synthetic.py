"""Deterministic synthetic MedCalc-Bench rows: the embedded default training data of the offline quickstart.

`generate_rows(n, seed)` returns rows in the official 14-column schema (all values strings, like the csv):
short notes (1-3 sentences) holding what real calculators need, the benchmark's question for each, and a
computed step-by-step explanation ending with the answer. About a third of the notes carry two questions.

Official conventions: decimal answers rounded to 3 places, limits 0.95x / 1.05x; intermediates (inches, RR,
IBW, adjusted weight) rounded to 3 places; Cockcroft-Gault weight = actual if BMI < 18.5, min(IBW, actual)
if BMI < 25, else IBW + 0.4 (actual - IBW). Naegele: LMP + 280 days + (cycle - 28). The official rows add
|cycle - 28| even for short cycles (their text says "subtract"), so cycles here are >= 28, where both agree.
"""

from __future__ import annotations

import datetime as dt
import math
import random

__all__ = ["COLUMNS", "CALCULATORS", "generate_rows", "bmi", "mean_arterial_pressure", "anion_gap",
           "ideal_body_weight", "creatinine_clearance", "qtc_bazett", "serum_osmolality", "due_date",
           "gestational_age"]

COLUMNS = (
    "Row Number", "Calculator ID", "Calculator Name", "Category", "Output Type", "Note ID", "Note Type",
    "Patient Note", "Question", "Relevant Entities", "Ground Truth Answer", "Lower Limit", "Upper Limit",
    "Ground Truth Explanation",
)

# id -> (name, category, output type, the benchmark's question, note kind)
CALCULATORS: dict[int, tuple[str, str, str, str, str]] = {
    6: ("Body Mass Index (BMI)", "physical", "decimal",
        "What is the patient's body mass mass index (BMI)? Your answer should be in terms of kg/m².", "body"),
    10: ("Ideal Body Weight", "physical", "decimal",
         "Using the Ideal Body Weight Formula, what is the patient's ideal body weight in terms of kg?", "body"),
    2: ("Creatinine Clearance (Cockcroft-Gault Equation)", "lab", "decimal",
        "What is the patient's Creatinine Clearance using the Cockroft-Gault Equation in terms of mL/min? You "
        "should use the patient's adjusted body weight in kg instead of the patient's actual body weight if the "
        "patient is overweight or obese based on their BMI. If the patient's BMI's normal, set their adjusted "
        "body weight to the minimum of the ideal body and actual weight. If the patient is underweight, please "
        "set their adjusted body weight to their actual body weight.", "body"),
    5: ("Mean Arterial Pressure (MAP)", "physical", "decimal",
        "What is patient's mean arterial pressure in mm Hg?", "vitals"),
    11: ("QTc Bazett Calculator", "physical", "decimal",
         "Using the Bazett Formula for corrected QT interval, what is the patient's corrected QT interval in msec?",
         "vitals"),
    39: ("Anion Gap", "lab", "decimal", "What is the patient's anion gap in terms of mEq/L?", "labs"),
    30: ("Serum Osmolality", "lab", "decimal", "What is the patient's serum osmolality in terms of mOsm/kg?", "labs"),
    13: ("Estimated Due Date", "date", "date",
         "Using Naegele's Rule for estimated due date based on the last menstrual period and cycle length, what "
         "is the the patient's estimated due date? Your response should be in the format of M/D/Y (ie 08/31/2023, "
         "07/03/2000) with just the date and not other text. ", "pregnancy"),
    69: ("Estimated Gestational Age", "date", "integer",
         "Based on the patient's last menstrual period, what is the patient's estimated gestational age? Your "
         "answer should be a tuple, specifying the number of weeks and days (i.e. (4 weeks, 3 days), (0 weeks, 5 "
         "days), (1 week, 5 days), (8 weeks, 0 days)).", "pregnancy"),
}


# -- formulas (public, so tests can check them by hand) ------------------------------------------
def bmi(weight_kg: float, height_cm: float) -> float:
    return weight_kg / (height_cm / 100) ** 2


def mean_arterial_pressure(systolic: float, diastolic: float) -> float:
    return 2 / 3 * diastolic + 1 / 3 * systolic


def anion_gap(sodium: float, chloride: float, bicarbonate: float) -> float:
    return sodium - (chloride + bicarbonate)


def height_inches(height_cm: float) -> float:
    return round(height_cm * 0.393701, 3)


def ideal_body_weight(sex: str, height_cm: float) -> float:
    """Devine: 50 kg (men) or 45.5 kg (women) + 2.3 kg per inch over 60 inches."""
    return (50.0 if sex == "Male" else 45.5) + 2.3 * (height_inches(height_cm) - 60)


def _adjusted_weight(sex: str, weight: float, height_cm: float) -> tuple[str, float, float]:
    """(weight class, IBW, the weight Cockcroft-Gault uses), with the official BMI rule."""
    ibw = round(ideal_body_weight(sex, height_cm), 3)
    b = bmi(weight, height_cm)
    cls = "underweight" if b < 18.5 else "normal weight" if b < 25 else "overweight/obese"
    if cls == "underweight":
        return cls, ibw, weight
    if cls == "normal weight":
        return cls, ibw, min(ibw, weight)
    return cls, ibw, round(ibw + 0.4 * (weight - ibw), 3)


def creatinine_clearance(sex: str, age: int, weight: float, height_cm: float, creatinine: float) -> float:
    adjusted = _adjusted_weight(sex, weight, height_cm)[2]
    return (140 - age) * adjusted * (1 if sex == "Male" else 0.85) / (creatinine * 72)


def qtc_bazett(heart_rate: float, qt_msec: float) -> float:
    return qt_msec / math.sqrt(round(60 / heart_rate, 3))


def serum_osmolality(sodium: float, bun: float, glucose: float) -> float:
    return 2 * sodium + bun / 2.8 + glucose / 18


def due_date(lmp: dt.date, cycle_length: int) -> dt.date:
    return lmp + dt.timedelta(days=280 + cycle_length - 28)


def gestational_age(lmp: dt.date, today: dt.date) -> tuple[int, int]:
    return divmod((today - lmp).days, 7)


# -- formatting ---------------------------------------------------------------------------------
def _num(x: float, places: int = 3) -> str:
    """Like the official csv: rounded, no trailing '.0' (100 not 100.0; 22.857)."""
    text = repr(round(float(x), places) + 0.0)
    return text[:-2] if text.endswith(".0") else text


def _d(x: float) -> str:  # a value as written in a note
    return f"{x:g}"


def _date(d: dt.date) -> str:  # MM/DD/YYYY
    return d.strftime("%m/%d/%Y")


# -- explanations: (relevant entities, answer, lower, upper, explanation) -------------------------
def _decimal(entities: dict, value: float, steps: list[str]) -> tuple:
    answer = _num(value)
    a = float(answer)
    lo, hi = sorted((a * 0.95, a * 1.05))
    return entities, answer, _num(lo, 9), _num(hi, 9), "\n".join(steps)


def _hence(what: str, value: float, unit: str) -> str:
    """The sentence that ends a decimal explanation, as the official rows write it."""
    return f"Hence, the patient's {what} is {_num(value)} {unit}."


def _result(calculation: str, value: float, unit: str, what: str) -> str:
    """An explanation's last step: the calculation, its value, and the concluding sentence."""
    return f"{calculation} = {_num(value)} {unit}. " + _hence(what, value, unit)


def _bmi_steps(p: dict) -> list[str]:
    h, w = p["height"], p["weight"]
    return [f"BMI is the weight in kg divided by the square of the height in m. The patient's height is {_d(h)} cm, "
            f"which is {_num(h / 100)} m, and the patient's weight is {_d(w)} kg. So the BMI is {_d(w)} kg / "
            f"({_num(h / 100)} m * {_num(h / 100)} m) = {_num(bmi(w, h))} kg/m^2."]


def _ibw_steps(p: dict) -> list[str]:
    sex, h = p["sex"], p["height"]
    base = "50" if sex == "Male" else "45.5"
    return [f"The patient is {sex.lower()}, so IBW = {base} kg + 2.3 kg * (height in inches - 60).",
            f"The patient's height is {_d(h)} cm, which is {_d(h)} cm * 0.393701 in/cm = {_num(height_inches(h))} in.",
            f"IBW = {base} kg + 2.3 kg * ({_num(height_inches(h))} in - 60) = {_num(ideal_body_weight(sex, h))} kg."]


def _calc_bmi(p: dict) -> tuple:
    steps = _bmi_steps(p) + [_hence("BMI", bmi(p["weight"], p["height"]), "kg/m^2")]
    return _decimal({"weight": [float(p["weight"]), "kg"], "height": [float(p["height"]), "cm"]},
                    bmi(p["weight"], p["height"]), steps)


def _calc_ibw(p: dict) -> tuple:
    value = ideal_body_weight(p["sex"], p["height"])
    return _decimal({"sex": p["sex"], "height": [float(p["height"]), "cm"]}, value,
                    _ibw_steps(p) + [_hence("ideal body weight", value, "kg")])


def _calc_crcl(p: dict) -> tuple:
    sex, age, w, h, cr = p["sex"], p["age"], p["weight"], p["height"], p["creatinine"]
    coef = "1" if sex == "Male" else "0.85"
    cls, ibw, adj = _adjusted_weight(sex, w, h)
    steps = ["The Cockcroft-Gault equation is CrCl = ((140 - age) * adjusted weight * gender coefficient) / "
             "(serum creatinine * 72), with creatinine in mg/dL and a gender coefficient of 1 for men and 0.85 "
             "for women.",
             f"The patient is a {age}-year-old {sex.lower()}, so the gender coefficient is {coef}, and the serum "
             f"creatinine is {_d(cr)} mg/dL."] + _bmi_steps(p)
    if cls == "underweight":
        steps.append(f"A BMI below 18.5 is underweight, so the adjusted weight is the actual weight, {_d(w)} kg.")
    else:
        steps.append(f"The patient is {cls}, which needs the ideal body weight (IBW).")
        steps += _ibw_steps(p)
        if cls == "normal weight":
            steps.append(f"For a normal BMI the adjusted weight is min(IBW, actual weight) = min({_num(ibw)} kg, "
                         f"{_d(w)} kg) = {_num(adj)} kg.")
        else:
            steps.append(f"For BMI of 25 or more the adjusted weight is IBW + 0.4 * (weight - IBW) = {_num(ibw)} kg + "
                         f"0.4 * ({_d(w)} kg - {_num(ibw)} kg) = {_num(adj)} kg.")
    value = (140 - age) * adj * float(coef) / (cr * 72)
    steps.append(_result(f"CrCl = ((140 - {age}) * {_num(adj)} * {coef}) / ({_d(cr)} * 72)", value, "mL/min",
                         "creatinine clearance"))
    entities = {"sex": sex, "age": [age, "years"], "weight": [float(w), "kg"], "height": [float(h), "cm"],
                "creatinine": [float(cr), "mg/dL"]}
    return _decimal(entities, value, steps)


def _calc_map(p: dict) -> tuple:
    s, d = p["sbp"], p["dbp"]
    value = mean_arterial_pressure(s, d)
    steps = [f"The mean arterial pressure is 2/3 * diastolic pressure + 1/3 * systolic pressure. The blood pressure "
             f"is {s}/{d} mm Hg, so MAP = 2/3 * {d} mm Hg + 1/3 * {s} mm Hg = {_num(value)} mm Hg.",
             _hence("mean arterial pressure", value, "mm Hg")]
    return _decimal({"Systolic Blood Pressure": [float(s), "mm hg"], "Diastolic Blood Pressure": [float(d), "mm hg"]},
                    value, steps)


def _calc_qtc(p: dict) -> tuple:
    hr, qt = p["hr"], p["qt"]
    rr, value = round(60 / hr, 3), qtc_bazett(hr, qt)
    steps = ["Bazett's formula is QTc = QT interval / √(RR interval), with the QT interval in msec and the RR "
             "interval in seconds, RR = 60 / heart rate.",
             f"The heart rate is {hr} beats per minute, so RR = 60/{hr} = {_num(rr)}. The QT interval is {qt} msec.",
             _result(f"QTc = {qt}/√({_num(rr)})", value, "msec", "corrected QT interval")]
    return _decimal({"Heart Rate or Pulse": [hr, "beats per minute"], "QT interval": [qt, "msec"]}, value, steps)


def _calc_gap(p: dict) -> tuple:
    na, cl, hco3 = p["na"], p["cl"], p["hco3"]
    value = anion_gap(na, cl, hco3)
    steps = ["The anion gap is sodium - (chloride + bicarbonate), all in mEq/L.",
             f"The patient's sodium is {na} mEq/L, chloride is {cl} mEq/L and bicarbonate is {hco3} mEq/L.",
             _result(f"So the anion gap is {na} mEq/L - ({cl} mEq/L + {hco3} mEq/L)", value, "mEq/L", "anion gap")]
    return _decimal({"Sodium": [float(na), "mEq/L"], "Chloride": [float(cl), "mEq/L"],
                     "Bicarbonate": [float(hco3), "mEq/L"]}, value, steps)


def _calc_osm(p: dict) -> tuple:
    na, bun, glu = p["na"], p["bun"], p["glucose"]
    value = serum_osmolality(na, bun, glu)
    steps = ["Serum osmolality is 2 * sodium + BUN / 2.8 + glucose / 18, with sodium in mmol/L and BUN and "
             "glucose in mg/dL.",
             f"The patient's sodium is {na} mEq/L, which is {na} mmol/L because sodium has a valence of 1. BUN is "
             f"{bun} mg/dL and glucose is {glu} mg/dL.",
             _result(f"So the osmolality is 2 * {na} + {bun} / 2.8 + {glu} / 18", value, "mOsm/kg",
                     "serum osmolality")]
    return _decimal({"Sodium": [float(na), "mEq/L"], "Blood Urea Nitrogen (BUN)": [float(bun), "mg/dL"],
                     "Glucose": [float(glu), "mg/dL"]}, value, steps)


def _calc_edd(p: dict) -> tuple:
    lmp, cycle = p["lmp"], p["cycle"]
    answer = _date(due_date(lmp, cycle))
    extra = cycle - 28
    shift = (f"The cycle length is {cycle} days, {extra} days longer than the standard 28 days, so we add {extra} "
             "days." if extra else "The cycle length is the standard 28 days, so no adjustment is needed.")
    steps = ["Naegele's rule adds 40 weeks (280 days) to the first day of the last menstrual period, then adds or "
             "subtracts the number of days by which the cycle length differs from 28 days.",
             f"The last menstrual period was {_date(lmp)}. Adding 40 weeks gives "
             f"{_date(lmp + dt.timedelta(days=280))}. {shift}",
             f"Hence, the patient's estimated due date is {answer}."]
    return {"cycle length": cycle, "Last menstrual date": _date(lmp)}, answer, answer, answer, "\n".join(steps)


def _calc_ga(p: dict) -> tuple:
    lmp, today = p["lmp"], p["today"]
    weeks, days = gestational_age(lmp, today)
    answer = f"('{weeks} weeks', '{days} days')"
    steps = [f"The gestational age is the time elapsed since the last menstrual period. Today is {_date(today)} and "
             f"the last menstrual period began on {_date(lmp)}, which is {(today - lmp).days} days earlier.",
             f"{(today - lmp).days} days is {weeks} weeks and {days} days. Hence, the estimated gestational age is "
             f"{answer}."]
    return {"Current Date": _date(today), "Last menstrual date": _date(lmp)}, answer, answer, answer, "\n".join(steps)


_COMPUTE = {6: _calc_bmi, 10: _calc_ibw, 2: _calc_crcl, 5: _calc_map, 11: _calc_qtc, 39: _calc_gap,
            30: _calc_osm, 13: _calc_edd, 69: _calc_ga}

# -- notes --------------------------------------------------------------------------------------
_SETTINGS = (
    "presented to the emergency department with two days of fatigue and poor appetite",
    "was seen in the outpatient clinic for a routine follow-up of long-standing hypertension",
    "was admitted to the medical ward with a productive cough and low-grade fever",
    "came to the clinic after several weeks of worsening exertional shortness of breath",
    "was referred to the internal medicine service for evaluation of unintentional weight loss",
    "was evaluated before an elective knee replacement scheduled for the following month",
)
_CLOSERS = (
    "The remainder of the examination was unremarkable.",
    "There was no history of recent travel, smoking, or alcohol use.",
    "The patient was started on intravenous fluids and observed overnight.",
    "Current medications include metformin and lisinopril, both taken as prescribed.",
)


def _patient(rng: random.Random, kind: str) -> tuple[dict, str]:
    """Random findings for one note kind, and the 1-3 sentence note that reports them."""
    if kind == "pregnancy":
        age = rng.randint(19, 42)
        lmp = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 9100))
        p = {"lmp": lmp, "cycle": rng.randint(28, 32), "today": lmp + dt.timedelta(days=rng.randint(10, 280))}
        visit = rng.choice(["came for a routine prenatal visit", "presented to the obstetrics clinic"])
        note = (f"A {age}-year-old pregnant woman {visit}, reporting mild nausea and fatigue but no vaginal "
                f"bleeding or pelvic pain. "
                f"Her last menstrual period began on {_date(lmp)}, and her menstrual cycles are regular, "
                f"lasting {p['cycle']} days. Today's date is {_date(p['today'])}.")
        return p, note
    sex = rng.choice(["Male", "Female"])
    p = {"sex": sex, "age": rng.randint(22, 88)}
    who = f"A {p['age']}-year-old {'man' if sex == 'Male' else 'woman'} {rng.choice(_SETTINGS)}."
    if kind == "body":
        p["height"] = rng.randint(165, 192) if sex == "Male" else rng.randint(150, 178)
        while True:  # keep BMI off the 18.5 and 25 cut points so the weight class is unambiguous
            p["weight"] = round(rng.uniform(15.5, 40.0) * (p["height"] / 100) ** 2, rng.choice([0, 1]))
            b = bmi(p["weight"], p["height"])
            if abs(b - 18.5) > 0.2 and abs(b - 25) > 0.2:
                break
        p["creatinine"] = round(rng.uniform(0.5, 3.0), rng.choice([1, 2]))
        facts = (f"On examination the patient was {p['height']} cm tall and weighed {_d(p['weight'])} kg, and "
                 f"the serum creatinine was {_d(p['creatinine'])} mg/dL.")
    elif kind == "vitals":
        p["sbp"] = rng.randint(90, 190)
        p["dbp"] = rng.randint(45, min(115, p["sbp"] - 25))
        p["hr"], p["qt"] = rng.randint(48, 135), rng.randrange(320, 470, 2)
        facts = (f"The blood pressure was {p['sbp']}/{p['dbp']} mm Hg with a heart rate of {p['hr']} beats per "
                 f"minute, and the electrocardiogram showed a QT interval of {p['qt']} msec.")
    else:
        p["na"] = rng.randint(124, 152)
        p["cl"] = rng.randint(88, min(112, p["na"] - 16))
        p["hco3"] = rng.randint(10, min(32, p["na"] - p["cl"] - 3))
        p["bun"], p["glucose"] = rng.randint(6, 70), rng.randint(65, 450)
        facts = (f"Laboratory studies showed sodium {p['na']} mEq/L, chloride {p['cl']} mEq/L, bicarbonate "
                 f"{p['hco3']} mEq/L, blood urea nitrogen {p['bun']} mg/dL, and glucose {p['glucose']} mg/dL.")
    return p, " ".join([who, facts, rng.choice(_CLOSERS)])


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` synthetic rows in the official schema, identical for the same (n, seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    ids = sorted(CALCULATORS)
    rows: list[dict] = []
    note_number = 0
    while len(rows) < n:
        note_number += 1
        first = rng.choice(ids)
        kind = CALCULATORS[first][4]
        chosen = [first]
        siblings = [c for c in ids if CALCULATORS[c][4] == kind and c != first]
        if siblings and rng.random() < 0.35:
            chosen.append(rng.choice(siblings))
        p, note = _patient(rng, kind)
        for cid in chosen[: n - len(rows)]:
            name, category, output_type, question, _ = CALCULATORS[cid]
            entities, answer, lower, upper, explanation = _COMPUTE[cid](p)
            rows.append({
                "Row Number": str(len(rows) + 1), "Calculator ID": str(cid), "Calculator Name": name,
                "Category": category, "Output Type": output_type, "Note ID": f"synthetic-{note_number:06d}",
                "Note Type": "Synthetic", "Patient Note": note, "Question": question,
                "Relevant Entities": str(entities), "Ground Truth Answer": answer, "Lower Limit": lower,
                "Upper Limit": upper, "Ground Truth Explanation": explanation,
            })
    return rows
