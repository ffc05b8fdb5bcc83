"""Seconds per task (talr.general.evaluate.timed_tasks): timing each task inside one joint lm-eval call leaves its
results as they are (same per-task metrics, per-document prompts, generations and scores, general/score), and the
callback logs `general/eval_seconds/<task>` beside the total."""

from __future__ import annotations

import json
import random

import lightning.pytorch as L
import lm_eval
import pytest
import torch
from conftest import SHARED_DATA, make_tiny_model, require

from talr.chat import ChatFormat
from talr.general import GeneralEvalCallback
from talr.general.chat_lm import ChatFormatHFLM
from talr.general.evaluate import headline_metrics, timed_tasks
from talr.general.lm_tasks import make_task_manager

TASKS = ["humaneval_instruct", "gsm8k", "ifeval"]  # IFEval scored last
# IFEval documents 19 and 22 (keys 1122, 1129) make its checker draw a random letter from Python's global `random`
SAMPLES = {"humaneval_instruct": [0, 1], "gsm8k": [0, 1], "ifeval": [0, 19, 22]}


def _comparable(raw: dict) -> dict:
    samples = {task: [(s["doc_id"], s["filter"], s["arguments"], s["resps"], s["filtered_resps"],
                       {m: s[m] for m in s["metrics"]}) for s in rows] for task, rows in raw["samples"].items()}
    return json.loads(json.dumps({"results": raw["results"], "versions": raw["versions"],
                                  "n-samples": raw["n-samples"], "samples": samples,
                                  "score": headline_metrics(raw["results"])}, default=str))


def test_timing_each_task_leaves_the_joint_call_results_unchanged(tokenizer, tmp_path, monkeypatch):
    from lm_eval.api.task import ConfigurableTask, Task
    from lm_eval.tasks.ifeval.instructions import LetterFrequencyChecker

    require(SHARED_DATA / "gsm8k" / "test.jsonl")
    model = make_tiny_model(tokenizer, seed=1, tie_word_embeddings=False)  # untied: varied garbage answers
    draws: list = []  # the global random state whenever IFEval's checker may draw from it
    build = LetterFrequencyChecker.build_description

    def recording_build(self, **kwargs):
        draws.append(hash(random.getstate()))
        return build(self, **kwargs)

    monkeypatch.setattr(LetterFrequencyChecker, "build_description", recording_build)
    originals = [ConfigurableTask.__init__, Task.build_all_requests, ConfigurableTask.apply_filters,
                 ConfigurableTask.process_results]
    out, state = {}, {}
    for mode in ("plain", "timed", "ifeval_alone"):
        draws.clear()
        lm = ChatFormatHFLM(pretrained=model, tokenizer=tokenizer, chat_format=ChatFormat.from_tokenizer(tokenizer),
                            batch_size=2)
        tasks = ["ifeval"] if mode == "ifeval_alone" else TASKS
        kwargs = dict(model=lm, tasks=tasks, task_manager=make_task_manager(tasks, tmp_path / mode, SHARED_DATA),
                      samples=SAMPLES, apply_chat_template=True, fewshot_as_multiturn=True,
                      gen_kwargs={"max_gen_toks": 6}, confirm_run_unsafe_code=True, log_samples=True)
        if mode == "timed":
            with timed_tasks(lm) as seconds:
                raw = lm_eval.simple_evaluate(**kwargs)
        else:
            raw = lm_eval.simple_evaluate(**kwargs)
        out[mode], state[mode] = _comparable(raw), list(draws)

    plain, timed = out["plain"], out["timed"]
    assert {t: n["effective"] for t, n in timed["n-samples"].items()} == {t: len(d) for t, d in SAMPLES.items()}
    assert timed["samples"] == plain["samples"]  # prompts (5-shot draws), generations, per-document metrics
    assert timed["results"] == plain["results"]  # metric values and standard errors, bit for bit
    assert timed["versions"] == plain["versions"] and timed["score"] == plain["score"]
    assert len(state["plain"]) == 4 and state["timed"] == state["plain"]  # 2 documents × strict and loose
    assert list(seconds) == TASKS and all(s > 0 for s in seconds.values())
    assert [ConfigurableTask.__init__, Task.build_all_requests, ConfigurableTask.apply_filters,
            ConfigurableTask.process_results] == originals
    assert lm.task_seconds is None
    # why not one lm-eval call per task: IFEval alone draws its letters from another random state than in a joint call
    assert out["ifeval_alone"]["samples"]["ifeval"] == plain["samples"]["ifeval"]  # (garbage fails either way)
    assert len(state["ifeval_alone"]) == 4 and state["ifeval_alone"] != state["plain"]


def test_callback_logs_seconds_per_task_within_the_total(tokenizer):
    from test_general_eval import MemoryLogger, TinyLM

    events: list = []
    module = TinyLM(make_tiny_model(tokenizer, seed=2), tokenizer, [])
    general = GeneralEvalCallback(tasks=["gsm8k", "ifeval"], limit=2, every_n_epochs=None, at_end=False,
                                  data_dir=str(require(SHARED_DATA)), batch_size=2, max_gen_toks=4)
    data = torch.utils.data.TensorDataset(torch.randint(0, len(tokenizer), (2, 8)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=MemoryLogger(events), callbacks=[general],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))

    (step, baseline), = [(s, m) for kind, s, m in events if kind == "log" and "general/score" in m]
    per_task = {k: v for k, v in baseline.items() if k.startswith("general/eval_seconds/")}
    assert step == 0 and set(per_task) == {"general/eval_seconds/gsm8k", "general/eval_seconds/ifeval"}
    assert all(v > 0 for v in per_task.values()) and sum(per_task.values()) <= baseline["general/eval_seconds"]
    assert module.general_baseline == baseline
    assert float(trainer.callback_metrics["general/eval_seconds/gsm8k"]) == pytest.approx(
        per_task["general/eval_seconds/gsm8k"])
    print("measured:", {k: round(v, 2) for k, v in baseline.items() if "seconds" in k})
