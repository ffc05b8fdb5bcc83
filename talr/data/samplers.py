"""Training order: seeded by (seed, epoch), sharded across data-parallel ranks, resumable mid-epoch.

Both samplers are `DistributedSampler`s, so Lightning uses them as they are instead of wrapping them in its
`DistributedSamplerWrapper` (which reshuffles: length grouping was lost on several processes). Every rank
gets the same number of batches of the same size at each step, also when the training set does not split
evenly: then the epoch's order is padded with its own first rows, like `DistributedSampler` does, so up to
`num_replicas − 1` rows are seen twice in that epoch (`duplicates`); with one process, none.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class _ShardedEpochSampler(DistributedSampler):
    """Common part: `num_replicas`/`rank` given explicitly (no process group needed to build one), `set_epoch`,
    and each rank's share of ceil(n / num_replicas) rows."""

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n = n
        self.per_rank = -(-n // num_replicas)
        self.duplicates = self.per_rank * num_replicas - n

    def __len__(self) -> int:
        return self.per_rank

    def _padded(self, order: list[int]) -> list[int]:
        return order + order[: self.duplicates]


class EpochShuffleSampler(_ShardedEpochSampler):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order; rank r takes
    every num_replicas-th row of it from position r (with one process: the whole permutation)."""

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self._padded(torch.randperm(self.n, generator=g).tolist())
        return iter(order[self.rank:: self.num_replicas])


class LengthGroupedSampler(_ShardedEpochSampler):
    """Shuffled order in which each rank's batches hold rows of similar length (less padding).

    The (seed, epoch) permutation is cut into mega-chunks of `num_replicas * batch_size * mega` rows, each
    sorted by length and cut into global batches of `num_replicas * batch_size` rows; the full global batches
    are shuffled (the one short global batch, if any, stays last so the DataLoader's batches stay aligned),
    and rank r takes slice (r + k) mod num_replicas of the k-th. So each rank gets whole length-sorted batches, and at every step
    the ranks' batches have the same size and similar lengths.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega: int = 32, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(len(lengths), seed, num_replicas, rank)
        self.lengths, self.batch_size, self.mega = lengths, batch_size, mega

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        order = self._padded(order)  # a multiple of num_replicas rows
        step = self.num_replicas * self.batch_size
        chunk = step * self.mega
        batches = []
        for start in range(0, len(order), chunk):
            sorted_chunk = sorted(order[start: start + chunk], key=lambda i: -self.lengths[i])
            batches += [sorted_chunk[j: j + step] for j in range(0, len(sorted_chunk), step)]
        short = [batches.pop()] if batches and len(batches[-1]) < step else []
        rng.shuffle(batches)
        mine = []
        for k, b in enumerate(batches + short):  # len(b) is a multiple of num_replicas
            share = len(b) // self.num_replicas
            part = (self.rank + k) % self.num_replicas  # rotate, or rank 0 always gets each step's longest rows
            mine += b[part * share: (part + 1) * share]
        return iter(mine)


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's `state_dict`/`load_state_dict` protocol: a checkpoint records the epoch
    and how many batches of it were consumed; after loading, the next pass replays that epoch's order and
    skips them. Together with per-epoch seeded sampling this makes a mid-epoch resume see exactly the
    remaining batches.

    On resume Lightning loads this state and calls `iter()` *before* it calls `set_epoch` for the resumed
    epoch, and a DataLoader with workers reads its sampler as soon as the iterator exists. So the sampler's
    epoch is restored here from the checkpoint, and the real iterator is only created at the first batch,
    after Lightning has set the epoch (which matters when the checkpoint ended an epoch)."""

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
        skip, self._skip_next = self._skip_next, 0
        return _DeferredIterator(super().__iter__, skip)


class _DeferredIterator:
    """Makes the DataLoader iterator (which fixes the epoch's order) at the first `next`, then skips `skip`."""

    def __init__(self, make, skip: int):
        self._make, self._skip, self._iterator = make, skip, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._make()
            for _ in range(self._skip):
                next(self._iterator, None)
        return next(self._iterator)
