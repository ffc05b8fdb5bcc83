"""The one domain DataModule every method shares: task rows -> chat-template examples -> batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Sampler

from talr.data.encoding import Collator, OverlongPolicy, encode_rows
from talr.modeling import BUILTIN, load_tokenizer
from talr.tasks.base import DataError, Task

log = logging.getLogger(__name__)


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which each run of `batch_size` indices has similar lengths (less padding).

    Indices are shuffled, cut into mega-chunks of `batch_size * mega`, sorted by length inside each chunk,
    and the resulting batches are shuffled. Deterministic for a given seed and epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega: int = 32):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start: start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[j: j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b])


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's `state_dict`/`load_state_dict` protocol: a checkpoint records the epoch
    and how many batches of it were consumed; after loading, the next pass replays that epoch's order and
    skips them. Together with per-epoch seeded sampling this makes a mid-epoch resume see exactly the
    remaining batches.

    On resume Lightning loads this state and creates the iterator *before* it calls `set_epoch` for the
    resumed epoch (and with workers the sampler is read when the iterator is created), so the sampler's epoch
    is restored here from the checkpoint rather than trusted to be set already."""

    def __init__(self, *args, position_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn  # () -> (epoch, batches consumed in that epoch)
        self._skip_next = 0

    def state_dict(self) -> dict:
        epoch, consumed = self._position_fn() if self._position_fn else (0, 0)
        return {"epoch": int(epoch), "consumed": int(consumed)}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        if consumed >= len(self):  # the epoch had finished: Lightning moves on and sets the next epoch itself
            return
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self._skip_next = consumed

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip_next = self._skip_next, 0
        for _ in range(skip):
            next(iterator, None)
        return iterator


class DomainDataModule(L.LightningDataModule):
    """Rows of a domain task, rendered with the tokenizer's chat template, with completion-only labels.

    Args:
        task: the domain task (MedCalc, ESCI, …) and its source, format and split options.
        tokenizer: tokenizer name or path; linked to `model.init_args.pretrained` by the CLI.
        max_length: longest example in tokens (prompt + target).
        overlong: what to do with longer examples: `truncate` the task's free-text field (the patient note,
            the product description) until the example fits, `skip` it, or raise an `error`. The target is
            never cut. Counts are logged and kept in `stats`.
        batch_size: training micro-batch size per device.
        eval_batch_size: validation/test batch size (generation is batched with left padding).
        group_by_length: batch training examples of similar length together (less padding).
        num_workers: DataLoader workers.
        seed: shuffling seed.
        trust_remote_code: allow code in the tokenizer repo (linked to the model's setting).
        chat_template_kwargs: extra variables for the chat template, e.g. `{enable_thinking: false}` for Qwen3.
    """

    def __init__(
        self,
        task: Task,
        tokenizer: str = BUILTIN,
        max_length: int = 2048,
        overlong: OverlongPolicy = "truncate",
        batch_size: int = 4,
        eval_batch_size: int = 8,
        group_by_length: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        trust_remote_code: bool = False,
        chat_template_kwargs: dict | None = None,
    ):
        super().__init__()
        self.task = task
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.overlong = overlong
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tokenizer = None
        self.examples: dict[str, list[dict]] = {}
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        self._register_rng_state()
        if self.examples:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.trust_remote_code)
        splits = self.task.load_splits()
        rank_zero = getattr(self.trainer, "is_global_zero", True) if self.trainer is not None else True
        for split, rows in splits.items():
            examples, counts = encode_rows(
                self.task, rows, self.tokenizer, self.max_length, self.overlong, split=split, progress=rank_zero,
                template_kwargs=self.chat_template_kwargs,
            )
            for i, e in enumerate(examples):
                e["index"] = i
            self.examples[split] = examples
            self.stats.update({f"{split}/{k}": v for k, v in counts.items()})
        self.stats.update(getattr(self.task, "stats", {}))
        if not self.examples.get("train") and stage in (None, "fit"):
            raise DataError(self.task.source, "the train split is empty after loading and the over-long policy")
        if rank_zero:
            log.info("data: %s", ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))

    def _register_rng_state(self) -> None:
        """Exact resume needs the RNG state next to the data position (dropout); add the callback that keeps
        it unless the config has one. Runs before Lightning restores callback states from a checkpoint."""
        from talr.callbacks.rng_state import RNGState

        if self.trainer is not None and not any(isinstance(c, RNGState) for c in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, RNGState())  # before the callbacks that write checkpoints

    def _loader(self, split: str, train: bool) -> DataLoader:
        examples = self.examples.get(split, [])
        if not examples:
            raise DataError(self.task.source, f"split {split!r} is empty")
        pad_id = self.tokenizer.pad_token_id
        if train:
            if self.group_by_length:
                sampler = LengthGroupedSampler([len(e["input_ids"]) for e in examples], self.batch_size, self.seed)
            else:
                sampler = EpochShuffleSampler(len(examples), self.seed)
            return ResumableLoader(examples, batch_size=self.batch_size, sampler=sampler, collate_fn=Collator(pad_id),
                                   num_workers=self.num_workers, position_fn=self._train_position)
        return DataLoader(examples, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=Collator(pad_id, with_prompts=True), num_workers=self.num_workers)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, training batches processed in it): what a checkpoint taken now has seen."""
        if self.trainer is None:
            return 0, 0
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation", train=False) if self.examples.get("validation") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def rows(self, split: str) -> list[dict]:
        return [e["row"] for e in self.examples.get(split, [])]
