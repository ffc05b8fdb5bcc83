"""Data-parallel general evaluation: every rank evaluates its share of each task's documents.

lm-eval already knows how: `Task.build_all_requests(rank, world_size)` gives rank r the documents r, r+W, r+2W, …
of each task; the evaluator pads the shorter ranks with repeats of a request so that every rank runs the same
number of generation batches (the padded answers are never scored), and `gather_object` brings every
document's metric values (and logged samples) to rank 0, which aggregates them as one process would: the
benchmark metrics are means of per-document values (0/1 for the paper's three), so the numbers are the same.
Its in-memory `HFLM` only assumes one process (rank 0 of 1, collectives through `accelerate`);
`data_parallel_lm` gives it the rank, the world size and collectives of an initialized `torch.distributed`
process group (Lightning's under DDP/FSDP2, torchrun's for `talr evaluate`).

One thing lm-eval does not split exactly: few-shot examples (GSM8K's 5 shots) are drawn per document from one
random generator in document order, so a rank that builds only its own documents draws other examples than one
process would (lm-eval's own "TODO: need to offset doc_id by rank"). Inside `data_parallel_evaluation` every rank
builds the prompts of all documents, in order, and keeps its share: the prompts are exactly one process's.

A second: IFEval's scoring draws from Python's global `random` (its letter-frequency checker picks a letter for
the documents whose instruction does not name one, e.g. documents 19 and 22), so the letter a document is
checked for depends on how many draws the documents before it made. A rank that scores only its own documents
would draw other letters than one process. While scoring such a task, every rank also replays the scoring of the
other ranks' documents in between (with an empty answer, the result thrown away: the draws do not depend on the
answer), so each document is scored from one process's random state (`replaying_doc_iterator`).

`broadcast_results` hands rank 0's combined results to every rank.

FSDP2: generation needs the full weights on every rank; `talr.distributed.replicated_copy` gathers them into a
plain model on each rank's own device (it says what that costs), which the callers evaluate here.

A rank that fails mid-evaluation leaves the others waiting in the next collective until the process-group
timeout (the paper configs: 3 h); the error is raised on the failing rank.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist

from talr.distributed import is_distributed

log = logging.getLogger(__name__)

__all__ = ["data_parallel_evaluation", "data_parallel_lm", "broadcast_results", "join_launcher_group"]


def data_parallel_lm(lm, group=None):
    """Make an lm-eval `HFLM` (given an in-memory model) evaluate its rank's share of the documents of a
    `torch.distributed` group; returns `lm`. Every rank of `group` must then call `lm_eval.simple_evaluate` with
    the same arguments; rank 0 gets the combined results, the others None (see `broadcast_results`)."""
    if not is_distributed(group):
        return lm
    lm._rank, lm._world_size = dist.get_rank(group), dist.get_world_size(group)

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:  # what accelerate's gather returns: ranks along dim 0
        parts = [torch.empty_like(tensor) for _ in range(lm._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(obj, dst: int = 0):
        out = [None] * lm._world_size if lm._rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=group)
        if out is None:
            return None
        # lm-eval concatenates the ranks' per-document lists; hand it one list in document order (and empty ones)
        # so that its aggregation (means, standard errors) sums in one process's order: the same floats.
        return [_in_document_order(out)] + [_emptied(o) for o in out[1:]]

    lm.all_gather = all_gather
    lm.gather_object = gather_object
    lm.barrier = lambda: dist.barrier(group=group)
    return lm


@contextlib.contextmanager
def data_parallel_evaluation(lm, group=None):
    """Inside, `lm_eval.simple_evaluate(model=lm, ...)` on every rank of `group` evaluates each rank's share of the
    documents with one process's prompts; rank 0 gets the combined results (then `broadcast_results`)."""
    if not is_distributed(group):
        yield lm
        return
    from lm_eval.api.task import Task

    data_parallel_lm(lm, group)
    build = Task.build_all_requests
    mine: list = []  # this rank's requests

    def build_share(self, *, rank: int = 0, world_size: int = 1, **kwargs):
        build(self, rank=0, world_size=1, **kwargs)  # all documents, few-shot draws in one process's order
        self._instances = [i for i in self._instances if i.doc_id % world_size == rank]  # lm-eval's own split
        if not self._instances:
            raise ValueError(f"{self.config.task}: no document for rank {rank} of {world_size}; lower the ranks "
                             "or raise the limit")
        mine.extend(self._instances)

    def barrier_after_answers() -> None:
        # lm-eval evens out the ranks by running copies of this rank's last request and appends their answers to
        # that request; it calls the barrier right after. Drop the copies' answers before filters and logging.
        for instance in mine:
            del instance.resps[instance.repeats:]
        dist.barrier(group=group)

    lm.barrier = barrier_after_answers

    iterate = Task.doc_iterator
    Task.build_all_requests, Task.doc_iterator = build_share, replaying_doc_iterator(iterate)
    try:
        yield lm
    finally:
        Task.build_all_requests, Task.doc_iterator = build, iterate


# Tasks whose scoring (`process_results`) draws from Python's global `random` (IFEval's letter-frequency checker).
SCORING_DRAWS_RANDOM = ("ifeval",)


def replaying_doc_iterator(iterate):
    """`Task.doc_iterator` (lm-eval's, passed as `iterate`) for a rank of several: yields the rank's documents as
    lm-eval does; for a task in `SCORING_DRAWS_RANDOM` it also scores, between them, the other ranks' documents
    with an empty answer and drops the result, so that the global random state before each of this rank's
    documents is the one a single process would have there."""

    def doc_iterator(self, *, rank: int = 0, limit=None, world_size: int = 1, samples=None):
        if world_size <= 1 or not str(self.config.task).startswith(SCORING_DRAWS_RANDOM):
            return iterate(self, rank=rank, limit=limit, world_size=world_size, samples=samples)
        return _replaying(self, iterate(self, rank=0, limit=limit, world_size=1, samples=samples), rank, world_size)

    return doc_iterator


def _replaying(task, every_doc, rank: int, world_size: int):
    for doc_id, doc in every_doc:  # lm-eval's split: rank r scores the documents whose position % W == r
        if doc_id % world_size == rank:
            yield doc_id, doc
        else:
            task.process_results(doc, [""])


def _in_document_order(parts: list):
    """Merge what each rank gathered ({task: {key: [per-document values]}} or {task: [logged samples]}) into one
    process's order. Rank r holds documents r, r+W, r+2W, … in order (lm-eval's split); logged samples carry
    their doc_id and come filter by filter."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _in_document_order([p[k] for p in parts]) for k in first}
    if any(isinstance(x, dict) and "doc_id" in x for p in parts for x in p):
        samples = [x for p in parts for x in p]
        filters = {x.get("filter"): i for i, x in reversed(list(enumerate(samples)))}
        return sorted(samples, key=lambda x: (filters[x.get("filter")], x["doc_id"]))
    return [p[i] for i in range(max(map(len, parts))) for p in parts if i < len(p)]


def _emptied(obj):
    return {k: _emptied(v) for k, v in obj.items()} if isinstance(obj, dict) else []


def broadcast_results(raw: dict[str, Any] | None, group=None) -> dict[str, Any]:
    """Rank 0's `simple_evaluate` results on every rank."""
    if is_distributed(group):
        box = [raw if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        raw = box[0]
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results on rank 0")
    return raw


def join_launcher_group(device: str) -> tuple[str, bool]:
    """Under a launcher that starts several processes (`torchrun --nproc_per_node N`, WORLD_SIZE > 1): join its
    process group (NCCL on CUDA, gloo otherwise) and return this rank's device (cuda:LOCAL_RANK) and True;
    otherwise (device, False). For `talr evaluate`: each rank then evaluates its share of the documents."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, True
