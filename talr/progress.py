"""Progress as log lines, for runs whose output is not a terminal (a log file, a batch job, `| tee`).

Lightning's TQDM bar writes to stdout, which Python buffers when it is not a terminal, and redraws one line
in place: in a log it shows up only at the end. `LogProgress` is a Lightning progress bar that instead logs a
line every N steps (and at least every `every_s` seconds) with counts, rate and an ETA, and one line per phase
(data ready, model ready, the training plan, each validation). The CLI uses it instead of the TQDM bar when
stdout is not a terminal and `trainer.enable_progress_bar` is not false (talr.trainer_cli).

`phase_log(...)` / `iterate(...)` give code outside Lightning's loops the same behaviour: a tqdm bar in a
terminal, log lines with counts and an ETA otherwise.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

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


class LogProgress(ProgressBar):
    """A Lightning progress bar that logs: a line every `every_n_steps` training steps (default: 20 lines per run,
    at least one every `every_s` seconds), validation/test/predict lines at most every `every_s` seconds, and
    one line per phase with its duration. Only rank 0 logs."""

    def __init__(self, every_n_steps: int | None = None, every_s: float = 60.0):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.every_s = every_s
        self._enabled = True
        self._t0 = time.perf_counter()  # the CLI builds the callback just before the trainer
        self._phase_t = self._t0
        self._start = self._last = self._t0
        self._steps_at_start = 0

    # -- ProgressBar protocol ---------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    def _log(self, msg: str, *args) -> None:
        if self._enabled:
            log.info(msg, *args)

    def _phase(self, text: str) -> None:
        now = time.perf_counter()
        self._log("%s (%s; %s since start)", text, duration(now - self._phase_t), duration(now - self._t0))
        self._phase_t = now

    # -- phases -------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        examples = getattr(trainer.datamodule, "examples", None) or {}
        counts = ", ".join(f"{len(v)} {k}" for k, v in examples.items())
        self._phase(f"data ready: {counts or 'no examples'} examples; next: loading the model")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._phase("model ready; next: measurements before the first step (references, baseline validation)")

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self._steps_total = total
        self._steps_at_start = trainer.global_step
        n = self.every_n_steps or max(1, int(total // 20) if math.isfinite(total) else 10)
        self._every = n
        limit = f"max_steps {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else \
            f"max_epochs {trainer.max_epochs}"
        self._phase(f"training: {int(total) if math.isfinite(total) else '?'} optimizer steps "
                    f"({trainer.num_training_batches} batches per epoch, {limit}); a line every {n} steps")
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        done = step - self._steps_at_start
        if done <= 0 or getattr(self, "_logged_step", None) == step:
            return
        now = time.perf_counter()
        if step % self._every and now - self._last < self.every_s and step < self._steps_total:
            return
        self._logged_step, self._last = step, now
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self._log(_line(f"train step (epoch {trainer.current_epoch})", done, self._steps_total, self._start, extra,
                        position=step))

    def on_train_end(self, trainer, pl_module) -> None:
        self._phase(f"training done at step {trainer.global_step}")

    # -- evaluation loops ---------------------------------------------------------------------------------
    def _eval_start(self, what: str, total) -> None:
        self._eval_what, self._eval_total = what, total
        self._eval_start_t = self._eval_last = time.perf_counter()
        self._log("%s: %s batches", what, int(total) if math.isfinite(total) else "?")

    def _eval_batch(self, batch_idx: int) -> None:
        now = time.perf_counter()
        if now - self._eval_last >= self.every_s:
            self._eval_last = now
            self._log(_line(self._eval_what, batch_idx + 1, self._eval_total, self._eval_start_t))

    def _eval_end(self) -> None:
        self._log("%s done in %s", self._eval_what, duration(time.perf_counter() - self._eval_start_t))

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            what = "sanity check (validation batches before training)"
        elif trainer.state.fn == TrainerFn.FITTING:
            what = f"validation at step {trainer.global_step}"
        else:
            what = "validation"
        total = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._eval_start(what, sum(total) if isinstance(total, list) else total)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start("test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(batch_idx)

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start("predict", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch(batch_idx)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._eval_end()
