"""`LogProgress`: a Lightning progress bar that logs lines, for runs whose stdout is not a terminal.

Lightning's own bar (TQDM or Rich) redraws one line in place on stdout, which Python buffers when it is not a
terminal: in a log it shows up only at the end. `LogProgress` logs one line per phase with its duration (data
ready, model ready, the training plan, the first step, each validation) and a training line every N steps
(and at least every `every_s` seconds) with counts, rate, ETA and the progress-bar metrics. The CLI puts it in
place of Lightning's bar when stdout is not a terminal and `trainer.enable_progress_bar` is not false
(talr.trainer_cli); it can also be listed in `trainer.callbacks` like any progress bar.
"""

from __future__ import annotations

import logging
import math
import time

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from talr.progress import _line, duration

log = logging.getLogger("talr.progress")


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
        self._phase(f"ready to train: {int(total) if math.isfinite(total) else '?'} optimizer steps "
                    f"({trainer.num_training_batches} batches per epoch, {limit}); a line every {n} steps")
        self._start = self._last = time.perf_counter()
        self._first_batch = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if getattr(self, "_first_batch", False):  # the module's own start work (baseline) ran after on_train_start
            self._first_batch = False
            self._phase("first training step starting, after the start-of-training work (e.g. baseline validation)")
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

    # -- evaluation loops: validation, test and predict log the same lines -------------------------------------
    def _eval_start(self, what: str, total) -> None:
        self._eval_what, self._eval_total = what, total
        self._eval_start_t = self._eval_last = time.perf_counter()
        self._log("%s: %s batches", what, int(total) if math.isfinite(total) else "?")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            what = "sanity check (validation batches before training)"
        elif trainer.state.fn == TrainerFn.FITTING:
            what = f"validation at step {trainer.global_step}"
        else:
            what = "validation"
        total = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._eval_start(what, sum(total) if isinstance(total, list) else total)

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start("test", sum(trainer.num_test_batches))

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start("predict", sum(trainer.num_predict_batches))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        now = time.perf_counter()
        if now - self._eval_last >= self.every_s:
            self._eval_last = now
            self._log(_line(self._eval_what, batch_idx + 1, self._eval_total, self._eval_start_t))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._log("%s done in %s", self._eval_what, duration(time.perf_counter() - self._eval_start_t))

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end
    on_test_end = on_predict_end = on_validation_end
