"""Run a function in 2 gloo processes on CPU, the way torchrun would, with a hard time limit.

`spawn(fn, *args, timeout=...)` starts `fn(*args)` in 2 spawned processes with the torchrun environment
variables set (so Lightning sees an external launcher and each process runs the same `Trainer.fit`),
waits at most `timeout` seconds, kills both on overrun and raises `TimeoutError`: a hang fails the test
instead of stalling the suite. Give the strategy a process-group timeout shorter than `timeout`
(`PG_TIMEOUT`) so a rank stuck in a collective raises with a traceback first.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.multiprocessing as mp

PG_TIMEOUT = datetime.timedelta(seconds=120)  # slack for 7 helpers on 2 cores; a real hang still fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, world: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    fn(*args)


def spawn(fn, *args, nprocs: int = 2, timeout: float = 600) -> None:
    """Run `fn(*args)` on `nprocs` ranks; re-raise a rank's exception; kill everything after `timeout` s."""
    context = mp.start_processes(_worker, args=(free_port(), nprocs, fn, args), nprocs=nprocs,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(10)
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout:.0f} s (hang?)")
