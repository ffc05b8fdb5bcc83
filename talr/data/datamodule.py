"""The one domain DataModule every method shares: task rows -> chat-template examples -> batches."""

from __future__ import annotations

import logging

import lightning.pytorch as L
from torch.utils.data import DataLoader

from talr.data.encoding import Collator, OverlongPolicy, encode_rows
from talr.data.samplers import EpochShuffleSampler, LengthGroupedSampler, ResumableLoader
from talr.modeling import BUILTIN, load_tokenizer
from talr.tasks.base import DataError, Task

log = logging.getLogger(__name__)


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
        group_by_length: batch training examples of similar length together (less padding), also on several
            ranks (`talr.data.samplers`).
        num_workers: DataLoader workers.
        seed: shuffling seed.
        trust_remote_code: allow code in the tokenizer repo (linked to the model's setting).
        chat_template_kwargs: extra variables for the chat template, e.g. `{enable_thinking: false}` for Qwen3. The run's
            one chat setting: with the tokenizer and the model's generation config it makes `self.chat_format`
            (talr.chat), which domain generation, drift and the general eval use too.
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
        self.task, self.tokenizer_name, self.trust_remote_code = task, tokenizer, trust_remote_code
        self.max_length, self.overlong = max_length, overlong
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.group_by_length, self.seed = group_by_length, seed
        self.chat_format = None  # talr.chat.ChatFormat, built in setup: the one chat format of the run
        self.tokenizer = None
        self.examples: dict[str, list[dict]] = {}
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        self._register_rng_state()
        if self.examples:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.trust_remote_code)
        from talr.chat import ChatFormat, load_generation_config

        self.chat_format = ChatFormat.from_tokenizer(self.tokenizer, self.chat_template_kwargs,
                                                     load_generation_config(self.tokenizer_name))
        splits = self.task.load_splits()
        rank_zero = getattr(self.trainer, "is_global_zero", True) if self.trainer is not None else True
        for split, rows in splits.items():
            examples, counts = encode_rows(
                self.task, rows, self.tokenizer, self.max_length, self.overlong, split=split, progress=rank_zero,
                chat_format=self.chat_format,
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
            # sharded here (not by Lightning's wrapper, which reshuffles): same order logic on 1 or N ranks
            shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
            shard = {"num_replicas": shard.get("num_replicas", 1), "rank": shard.get("rank", 0)}
            if self.group_by_length:
                sampler = LengthGroupedSampler([len(e["input_ids"]) for e in examples], self.batch_size, self.seed,
                                               **shard)
            else:
                sampler = EpochShuffleSampler(len(examples), self.seed, **shard)
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
