"""One launcher for multi-process tests: `parallel_launch(world_size, worker, *args)`.

Each worker process joins a fresh process group (gloo on the CPU, NCCL with one GPU per rank) and runs
`worker(pg, *args)` where `pg` is a `ProcessGroupInfo`. A failure in any rank fails the launch with that rank's
traceback; a launch that outlives its timeout is killed and fails, so no test waits forever on a peer.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass
class ProcessGroupInfo:
    rank: int
    world_size: int
    group: dist.ProcessGroup
    device: torch.device
    backend: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
        device_id=device if backend == "nccl" else None,
    )
    try:
        group = dist.group.WORLD
        fn(ProcessGroupInfo(rank, world_size, group, device, backend), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def parallel_launch(
    world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Runs `fn(pg, *args)` on `world_size` ranks and raises if any rank fails or the launch times out."""
    context = mp.start_processes(
        _worker, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while not context.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"parallel_launch({world_size}, {fn.__name__}) did not finish within {timeout_s} s")


def num_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def requires_gpus(n: int):
    """pytest marker: skip unless at least `n` GPUs are visible."""
    # NOTES: imported here, so tests/test_hybrid_ep.py (which uses this launcher) runs where pytest is absent.
    import pytest

    return pytest.mark.skipif(num_gpus() < n, reason=f"needs {n} CUDA GPU(s), found {num_gpus()}")
