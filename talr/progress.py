"""Progress and the size of the work, for output that is not a terminal (a log file, a batch job, `| tee`).

`iterate(...)` gives a loop a tqdm bar in a terminal and log lines with counts and an ETA otherwise;
`general_eval_plan(...)` says how many documents and tokens a general evaluation has before it starts.
The Lightning progress bar that logs lines (`LogProgress`) is in talr.progress_bar. No Lightning import here.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("talr.progress")
T = TypeVar("T")


def duration(seconds: float) -> str:
    """12 -> '12 s', 95 -> '1 min 35 s', 4000 -> '1 h 06 min'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _line(what: str, done: int, total: float, start: float, extra: str = "", position: int | None = None) -> str:
    """'what: position/total (pct), s each, elapsed, ETA, extra'; the rate counts the `done` items since `start`."""
    elapsed = time.perf_counter() - start
    rate = elapsed / done if done else float("nan")
    known = isinstance(total, (int, float)) and math.isfinite(total) and total > 0
    at = done if position is None else position
    parts = [f"{what}: {at}/{int(total) if known else '?'}" + (f" ({100 * at / total:.0f}%)" if known else "")]
    if done:
        parts.append(f"{rate:.2f} s each" if rate < 100 else f"{duration(rate)} each")
    parts.append(f"elapsed {duration(elapsed)}")
    if known and done:
        parts.append(f"ETA {duration(rate * (total - at))}")
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def iterate(items: Iterable[T], what: str, total: int | None = None, every_s: float = 30.0,
            logger: logging.Logger = log) -> Iterator[T]:
    """`items` with progress: a tqdm bar in a terminal, else a log line at the start, every `every_s` seconds and
    at the end, each with counts and an ETA."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=what, total=total)
        return
    start = last = time.perf_counter()
    logger.info("%s: %s to do", what, total if total is not None else "an unknown number")
    done = 0
    for item in items:
        yield item
        done += 1
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            logger.info(_line(what, done, total or float("nan"), start))
    logger.info(_line(what, done, total or float("nan"), start) + " (done)")


# -- plans: how much work a command has, said before it starts ----------------------------------------
EVAL_SPLIT = {"ifeval": "train", "gsm8k": "test", "humaneval": "test"}  # the split each benchmark scores


def _count_lines(path: str) -> int | None:
    import gzip

    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _token_cap(task: str) -> int | None:
    """The task's own generation cap (max_gen_toks in its YAML), None if it uses lm-eval's default."""
    import re
    from importlib import resources

    from talr.general.lm_tasks import lm_eval_tasks_dir

    texts = []
    try:
        texts.append(resources.files("talr.general").joinpath("tasks", f"{task}.yaml").read_text("utf-8"))
    except (FileNotFoundError, OSError):
        pass
    try:
        texts.append((lm_eval_tasks_dir() / task / f"{task}.yaml").read_text("utf-8"))
    except OSError:
        pass
    for text in texts:
        if match := re.search(r"max_gen_toks:\s*(\d+)", text):
            return int(match.group(1))
    return None


def general_eval_plan(tasks: list[str], limit: float | None = None, data_dir=None, max_gen_toks: int | None = None,
                      batch_size: int | None = None) -> str:
    """'ifeval: 4 of 541 documents, up to 1280 new tokens each; ...': the work of a general evaluation."""
    from talr.general.lm_tasks import resolve_data_files

    try:
        files = resolve_data_files([t for t in tasks if t in EVAL_SPLIT or t == "humaneval_instruct"], data_dir)
    except (OSError, ValueError):
        files = {}
    parts, total = [], 0
    for task in tasks:
        data = files.get({"humaneval_instruct": "humaneval"}.get(task, task))
        split = EVAL_SPLIT.get({"humaneval_instruct": "humaneval"}.get(task, task))
        n = _count_lines(data[split]) if data and split in data else None
        if limit is None:
            docs = n
        else:
            docs = int(limit) if limit >= 1 else (int(n * limit) if n is not None else None)
            docs = min(docs, n) if docs is not None and n is not None else docs
        total += docs or 0
        cap = max_gen_toks or _token_cap(task)
        parts.append(f"{task}: {docs if docs is not None else '?'}"
                     + (f" of {n}" if n is not None else " (hub data)") + " documents, up to "
                     + (f"{cap} new tokens each" if cap else "256 new tokens each (lm-eval's default)"))
    plan = "; ".join(parts)
    if total:
        plan += f" — {total} generations" + (f" in batches of {batch_size}" if batch_size else "")
    return plan
