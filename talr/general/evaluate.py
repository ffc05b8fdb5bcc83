"""General-capability evaluation (IFEval, GSM8K, HumanEval) of an in-memory model through lm-eval.

`evaluate_general` wraps the live model in lm-eval's `HFLM(pretrained=model, tokenizer=tok)` (under the
run's chat format: `talr.general.chat_lm`) and runs `lm_eval.simple_evaluate` with lm-eval's own task
definitions (see `talr.general.lm_tasks` for the offline data). It changes nothing about the model: it
runs under `torch.no_grad()` in eval mode, restores the previous train/eval mode and the global random
states afterwards (lm-eval reseeds `random`, numpy and torch, which would otherwise change the rest of a
training run).

Seconds per task (`task_wall_time_s`): lm-eval runs one joint call's requests by type across all tasks, so
`timed_tasks` adds up, per task, the time lm-eval spends loading the task and its data, building its requests
(prompts, few-shot examples), generating its answers, and filtering and scoring them (HumanEval's code execution
included); building the model wrapper, aggregating and lm-eval's environment report count in the total only.
It stays one joint call, so the results are unchanged. Generation is timed by running lm-eval's `generate_until`
once per group of requests with identical generation settings (`ChatFormatHFLM.generate_until`): lm-eval batches
each such group on its own anyway, so the batches and answers are the same; the paper's tasks each have their own
stop sequences, hence one group each.
One lm-eval call per task would not give the joint call's results: IFEval's checker draws a random letter from
Python's global `random` for 2 of its 541 prompts (keys 1122 and 1129 name '#' and '!' as the letter to count),
and the state it draws from depends on how many tasks were loaded in the same call (lm-eval's `Task.task_name`
draws from it on every access; tests/test_general_per_task.py).

Headline metrics (the paper's general score is their mean):
    IFEval    prompt_level_strict_acc   (lm-eval key "prompt_level_strict_acc,none")
    GSM8K     exact_match_strict_match  (lm-eval key "exact_match,strict-match", 5-shot)
    HumanEval pass@1                    (lm-eval key "pass@1,create_test", greedy; with the chat template
                                         applied lm-eval's `humaneval_instruct`, see talr.general.lm_tasks)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from talr.chat import ChatFormat
from talr.general.lm_tasks import CODE_TASKS, HEADLINE, PAPER_TASKS, lm_eval_task_names, make_task_manager

log = logging.getLogger(__name__)

CODE_EXECUTION_HELP = (
    "HumanEval runs model-written code on this machine (in a subprocess with a timeout; not a "
    "sandbox). Opt in explicitly: evaluate_general(..., allow_code_execution=True), "
    "GeneralEvalCallback(allow_code_execution=True), or `python -m talr evaluate --allow-code-execution`; "
    "or leave 'humaneval' out of tasks."
)


def metric_key(metric: str, filter_name: str, n_filters: int) -> str:
    """Our name for lm-eval's "<metric>,<filter>": the filter is kept only when a task has several."""
    if filter_name == "none" or n_filters <= 1:
        return metric
    return f"{metric}_{filter_name.replace('-', '_')}"


def _clean_results(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {"metric[_filter]": value, "metric[_filter]_stderr": value}} from lm-eval's results."""
    out: dict[str, dict[str, float]] = {}
    for task, values in raw.items():
        pairs = [k.split(",", 1) for k in values if "," in k]
        filters = {f for _, f in pairs}
        clean: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "alias", or a stderr lm-eval could not compute ("N/A")
            metric, filter_name = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric[: -len("_stderr")] if stderr else metric
            name = metric_key(base, filter_name, len(filters))
            clean[f"{name}_stderr" if stderr else name] = float(value)
        out[task] = clean
    return out


def headline_metrics(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The paper's headline metric of each benchmark present in lm-eval's results."""
    return {task: float(raw[task][key]) for task, key in HEADLINE.items() if task in raw and key in raw[task]}


def flat_metrics(result: Mapping[str, Any], prefix: str = "general", stderr: bool = False) -> dict[str, float]:
    """{"general/<task>/<metric>": value, ..., "general/score": mean headline} for loggers."""
    flat = {
        f"{prefix}/{task}/{metric}": value
        for task, metrics in result["results"].items()
        for metric, value in metrics.items()
        if stderr or not metric.endswith("_stderr")
    }
    if result.get(f"{prefix}/score") is not None:
        flat[f"{prefix}/score"] = result[f"{prefix}/score"]
    return flat


@contextlib.contextmanager
def timed_tasks(lm):
    """Inside, one lm-eval call adds each task's seconds to the dict this yields (see the module docstring): loading
    the task and its data, building its requests, generating its answers (`lm` a `ChatFormatHFLM`), filtering and
    scoring them. Wraps lm-eval's `ConfigurableTask` (the class of every YAML task) `__init__`, `apply_filters` and
    `process_results` and `Task.build_all_requests` in timers that change nothing else."""
    from lm_eval.api.task import ConfigurableTask, Task

    seconds: dict[str, float] = {}

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:  # the name from the config: lm-eval's `task_name` draws from the global `random`
                name = getattr(getattr(self, "config", None), "task", None)
                if name is not None:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    saved = [(cls, name, cls.__dict__[name]) for cls, name in (
        (ConfigurableTask, "__init__"), (Task, "build_all_requests"), (ConfigurableTask, "apply_filters"),
        (ConfigurableTask, "process_results"))]
    for cls, name, fn in saved:
        setattr(cls, name, timed(fn))
    lm.task_seconds = seconds
    try:
        yield seconds
    finally:
        lm.task_seconds = None
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def check_full_model(model: torch.nn.Module) -> None:
    """lm-eval generates with the whole model on one process; refuse sharded parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return
    sharded = any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()
    )
    if sharded:
        raise NotImplementedError(
            "general evaluation needs the full (unsharded) model, but the parameters are sharded (FSDP/DTensor). "
            "Pass `talr.distributed.unsharded_copy(model)` (GeneralEvalCallback does), or evaluate a saved "
            "directory with `python -m talr evaluate --model <dir>`."
        )


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module):
    """Eval mode + no_grad inside; previous train/eval modes and RNG states restored after."""
    modes = {m: m.training for m in model.modules()}
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def evaluate_general(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: int | float | None = None,
    apply_chat_template: bool = True,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    data_dir: str | Path | None = None,
    allow_code_execution: bool = False,
    seed: int | None = None,
    data_files: Mapping[str, Mapping[str, str]] | None = None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
    chat_format: ChatFormat | None = None,
    data_parallel: bool = False,
) -> dict[str, Any]:
    """Evaluate an in-memory causal LM on general benchmarks with lm-eval; see the module docstring.

    Args:
        tasks: any of "ifeval", "gsm8k", "humaneval" and "humaneval_instruct" (lm-eval's variant
            for chat models; offline-capable); other lm-eval task names work online only. With the
            chat template applied, "humaneval" runs as "humaneval_instruct" (results under that name;
            `config["lm_eval_tasks"]` lists what ran): the completion task scores chat answers as wrong.
        limit: documents per task (the first ones, lm-eval's `limit`); None = the full benchmark.
        apply_chat_template: wrap prompts in the tokenizer's chat template (GSM8K few-shot as a
            multi-turn chat, lm-eval's default); only applied when the tokenizer has one.
        max_gen_toks: cap on generated tokens for every task (None: each task's own setting,
            IFEval 1280, GSM8K 256, HumanEval 1024). Changes results; meant for quick checks.
        data_dir: local data folder (layout in `talr.general.lm_tasks`); None = Hugging Face hub.
        allow_code_execution: required for HumanEval, which executes model-written code.
        seed: lm-eval's random/numpy/torch/few-shot seeds; None = lm-eval's defaults (0, 1234, 1234,
            1234), so GSM8K's few-shot examples are the ones of any default lm-eval run. The global
            random states are restored afterwards either way.
        chat_format: the run's chat format (talr.chat): its template kwargs render every prompt (Qwen3's
            `enable_thinking`), generation stops at its end-of-turn ids, and with thinking on the answer is
            the text after `</think>`. Default: the tokenizer's, without template kwargs.
        data_parallel: under an initialized torch.distributed group, every rank calls this with the same
            arguments and its own full model, evaluates its share of each task's documents, and returns the
            combined results (`talr.general.sharded`); without one, a plain single-process evaluation.

    Returns:
        {"results": {task: {metric: value}}, "general/score": mean headline metric (None if none),
         "headline": {task: value}, "versions": {"tasks": {...}, "lm_eval": str},
         "n_samples": {task: n}, "config": settings, "wall_time_s": float (the whole evaluation),
         "task_wall_time_s": {lm-eval task: seconds spent on it (timed_tasks)}, ["samples": ...]}
        Under data parallelism every rank returns rank 0's results and per-task seconds.
    """
    import lm_eval

    from talr.general.chat_lm import ChatFormatHFLM

    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if set(CODE_TASKS) & set(tasks) and not allow_code_execution:
        raise PermissionError(CODE_EXECUTION_HELP)
    check_full_model(model)
    use_chat = bool(apply_chat_template) and has_chat_template(tokenizer)
    run_tasks = lm_eval_task_names(tasks, use_chat)
    if run_tasks != tasks:
        log.info("chat template applied: lm-eval tasks %s for %s", run_tasks, tasks)
    chat_format = (chat_format if chat_format is not None else ChatFormat.from_tokenizer(tokenizer)).for_model(model)
    config = {
        "tasks": tasks, "lm_eval_tasks": run_tasks, "limit": limit, "apply_chat_template": use_chat,
        "fewshot_as_multiturn": use_chat,
        "batch_size": batch_size, "max_gen_toks": max_gen_toks,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "data_files": {k: dict(v) for k, v in (data_files or {}).items()} or None,
        "allow_code_execution": allow_code_execution, "seed": seed, "bootstrap_iters": bootstrap_iters,
        "chat_format": chat_format.describe(tokenizer),
    }
    seeds = {} if seed is None else dict.fromkeys(
        ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), seed)
    start = time.perf_counter()
    task_dir = Path(tempfile.mkdtemp(prefix="talr_lm_eval_tasks_"))
    try:
        task_manager = make_task_manager(run_tasks, task_dir, data_dir, data_files)
        with preserved_state(model):
            lm = ChatFormatHFLM(pretrained=model, tokenizer=tokenizer, chat_format=chat_format, batch_size=batch_size)
            with contextlib.ExitStack() as stack:
                if data_parallel:  # every rank its share of the documents (talr.general.sharded)
                    from talr.general.sharded import data_parallel_evaluation

                    stack.enter_context(data_parallel_evaluation(lm))
                seconds = stack.enter_context(timed_tasks(lm))
                raw = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=run_tasks,
                    limit=limit,
                    task_manager=task_manager,
                    apply_chat_template=use_chat,
                    fewshot_as_multiturn=use_chat,
                    gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
                    confirm_run_unsafe_code=allow_code_execution,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=log_samples,
                    **seeds,
                )
    finally:
        shutil.rmtree(task_dir, ignore_errors=True)
    if raw is not None:
        raw = {**raw, "task_wall_time_s": seconds}
    if data_parallel and lm.world_size > 1:  # rank 0 combined every rank's documents; share its results and seconds
        from talr.general.sharded import broadcast_results

        raw = broadcast_results(raw)
    if raw is None:  # lm-eval returns None off its rank 0; we never call it there
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    headline = headline_metrics(raw["results"])
    out: dict[str, Any] = {
        "results": _clean_results(raw["results"]),
        "general/score": float(np.mean(list(headline.values()))) if headline else None,
        "headline": headline,
        "versions": {"tasks": dict(raw.get("versions", {})), "lm_eval": version("lm-eval")},
        "n_samples": {t: dict(v) for t, v in raw.get("n-samples", {}).items()},
        "config": config,
        "wall_time_s": time.perf_counter() - start,
        "task_wall_time_s": dict(raw["task_wall_time_s"]),
    }
    if log_samples:
        out["samples"] = raw.get("samples")
    return out
