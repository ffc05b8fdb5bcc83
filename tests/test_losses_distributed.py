"""sync=True across 2 gloo processes on CPU equals the single-process computation on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talr.losses import add_l2_to_init_grad_, dynamic_tau, l2_to_init_value, talr_weights

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def batch():
    """B = 4 sequences with 5, 2, 6 and 3 supervised tokens; junk (inf/nan) off the mask."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(4, 7, generator=g) * 4.0
    lengths = [5, 2, 6, 3]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    mask[2, 0] = False  # a prompt-like hole at the start
    losses = torch.where(mask, losses, torch.tensor(math.inf))
    losses[1, 6] = math.nan
    return losses, mask


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        losses, mask = batch()
        # 2 x 2 split: weights on each rank, concatenated, equal the whole-batch weights
        part = slice(2 * rank, 2 * rank + 2)
        gathered_tau = dynamic_tau(losses[part], mask[part], sync=True)
        close(gathered_tau, dynamic_tau(losses, mask))
        assert not torch.allclose(dynamic_tau(losses[part], mask[part]), gathered_tau)  # local τ differs
        for kwargs in (
            {},  # dynamic τ, simplex, floor 0.01
            {"w_min": 0.3},
            {"tau": 0.7, "w_min": 0.0},
            {"normalize": "mean"},
        ):
            local = talr_weights(losses[part], mask[part], sync=True, **kwargs)
            pieces = [torch.empty_like(local) for _ in range(WORLD)]
            dist.all_gather(pieces, local)
            close(torch.cat(pieces), talr_weights(losses, mask, sync=False, **kwargs))
        # without sync each rank normalises its own half: different weights
        unsynced = talr_weights(losses[part], mask[part], sync=False)
        assert not torch.allclose(unsynced, talr_weights(losses, mask)[part])

        # unequal batch sizes (3 + 1), and a rank whose only sequence has no supervised token
        for split in (3, 1):
            part = slice(0, split) if rank == 0 else slice(split, 4)
            lo, ma = losses[part], mask[part].clone()
            close(dynamic_tau(lo, ma, sync=True), dynamic_tau(losses, mask))
            if split == 1 and rank == 0:
                ma[:] = False
            full_mask = mask.clone()
            if split == 1:
                full_mask[0] = False
            local = talr_weights(lo, ma, sync=True)
            sizes = [split, 4 - split]
            padded = torch.zeros(3, 7)
            padded[: local.shape[0]] = local
            pieces = [torch.empty_like(padded) for _ in range(WORLD)]
            dist.all_gather(pieces, padded)
            whole = torch.cat([p[:n] for p, n in zip(pieces, sizes)])
            close(whole, talr_weights(losses, full_mask))

        _check_l2_on_dtensors(rank)
    finally:
        dist.destroy_process_group()


def _check_l2_on_dtensors(rank: int) -> None:
    """FSDP2-style Shard(0) DTensors (uneven shards): value all-reduced and grads equal the unsharded ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(1)
    full_init = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    full_params = [p0 + 0.1 * torch.randn(p0.shape, generator=g) for p0 in full_init]
    lam, numel = 1e-3, 17
    init = [distribute_tensor(p0, mesh, [Shard(0)]) for p0 in full_init]
    params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in full_params]

    value = l2_to_init_value(params, init, numel).detach().clone()
    dist.all_reduce(value)
    expected = sum(((p - p0) ** 2).sum() for p, p0 in zip(full_params, full_init)) / numel
    close(value, expected)

    params[1].grad = distribute_tensor(torch.ones(5), mesh, [Shard(0)])
    add_l2_to_init_grad_(params, init, lam, numel)
    close(params[0].grad.full_tensor(), lam * 2 * (full_params[0] - full_init[0]) / numel)
    close(params[1].grad.full_tensor(), lam * 2 * (full_params[1] - full_init[1]) / numel + 1.0)
    # θ0 kept as plain local shards works too
    plain = [p0.to_local() for p0 in init]
    for p in params:
        p.grad = None
    add_l2_to_init_grad_(params, plain, lam, numel)
    close(params[0].grad.full_tensor(), lam * 2 * (full_params[0] - full_init[0]) / numel)


def test_sync_matches_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)
