"""Starts one process per rank on this host for the package's command-line tools (`hybrid_ep.bench`,
`hybrid_ep.tune`): `parallel_launch(num_ranks, worker, *args, backend=...)`.

Each process joins a fresh process group (NCCL with one GPU per rank, or gloo on the CPU) and runs
`worker(pg, *args)`, `pg` a `ProcessGroupInfo`. A failure in any rank fails the launch with a `LaunchError` that
gives every failed rank's traceback, the first to fail first; a launch that outlives its timeout is killed and fails,
so no run waits forever on a peer. Each rank frees its process group before its interpreter exits. `worker` must be a
module-level function (processes are spawned, so it is pickled by name). The multi-process tests launch through
here too (tests/distributed.py), with shorter timeouts.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import pickle
import signal
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# How long a rank may wait in a host-side collective before it fails.
COLLECTIVE_TIMEOUT_S = 300
# After a rank fails: how long the others may take to end on their own (and report their own errors) before they
# are stopped.
FAILURE_GRACE_S = 10


class LaunchError(RuntimeError):
    """Ranks of a launch failed. The message names every failed rank: those that died without a traceback (a
    signal, an exit code), then every traceback, the first written first (a rank that fails first is the cause; its
    peers then often fail in a collective, "Connection closed by peer").

    Attributes:
        ranks: the failed ranks in that order.
    """

    def __init__(self, message: str, ranks: list):
        super().__init__(message)
        self.ranks = ranks


@dataclasses.dataclass
class ProcessGroupInfo:
    """What a worker knows about its place in the launch.

    Arguments:
        rank: this process's rank.
        world_size: number of ranks.
        group: the process group of all ranks.
        device: `cuda:<rank>` under NCCL, else the CPU.
        backend: "nccl" or "gloo".
    """

    rank: int
    world_size: int
    group: dist.ProcessGroup
    device: torch.device
    backend: str


def num_gpus() -> int:
    """Returns: the CUDA devices torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_backend(backend: str, num_ranks: int) -> str:
    """Returns: "nccl" or "gloo"; "auto" is NCCL when there is a GPU per rank, else gloo. Raises ValueError when
    NCCL is asked for without a GPU per rank."""
    gpus = num_gpus()
    if backend == "auto":
        return "nccl" if 0 < num_ranks <= gpus else "gloo"
    if backend == "nccl" and num_ranks > gpus:
        raise ValueError(f"backend nccl needs one GPU per rank: {num_ranks} ranks, {gpus} GPUs")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: expected auto, nccl or gloo")
    return backend


def _rendezvous_store(num_ranks: int, timeout_s: float) -> dist.TCPStore:
    """Returns: a TCP store served by this process on a port the OS picks, for the ranks to meet through."""
    # NOTES: picking a free port and letting rank 0 bind it later raced with other sockets (EADDRINUSE on a busy
    # host); a port the launcher already holds cannot be taken in between.
    return dist.TCPStore(
        "127.0.0.1",
        port=0,
        world_size=num_ranks + 1,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    collective_timeout_s: float,
    num_threads: Optional[int],
    fn: Callable,
    args: tuple,
) -> None:
    if num_threads is None and backend == "gloo":
        # NOTES: one thread per rank, so N gloo ranks do not fight over the cores.
        num_threads = 1
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    # The launcher serves the store; this rank joins it as a client.
    store = dist.TCPStore(
        "127.0.0.1",
        port=port,
        world_size=world_size + 1,
        is_master=False,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    try:
        fn(ProcessGroupInfo(rank, world_size, dist.group.WORLD, device, backend), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        # NOTES: objects of `fn` caught in reference cycles (a frame kept by a caught exception's traceback, say)
        # can keep the process group alive into interpreter shutdown. Its gloo worker threads then free their last
        # work there, which takes the GIL from a thread the shutting-down interpreter ends, and the process aborts
        # ("terminate called without an active exception", about 1 run in 50 of test_hybrid_ep_buffer's
        # rejection test). Collecting here frees the group, and joins those threads, while the interpreter lives.
        gc.collect()


def parallel_launch(
    num_ranks: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 1800,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    num_threads: Optional[int] = None,
) -> None:
    """Runs `fn(pg, *args)` on `num_ranks` spawned processes; raises if any rank fails or the launch outlives
    `timeout_s` seconds (every process is then killed).

    Arguments:
        backend: "nccl" (one GPU per rank) or "gloo" (the CPU).
        timeout_s: seconds the whole launch may take.
        collective_timeout_s: seconds a rank may wait in a host-side collective before it fails.
        num_threads: torch's CPU threads per rank; None is 1 under gloo and torch's default under NCCL.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1")
    store = _rendezvous_store(num_ranks, collective_timeout_s)
    context = mp.start_processes(
        _worker,
        args=(num_ranks, store.port, backend, collective_timeout_s, num_threads, fn, args),
        nprocs=num_ranks,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0, grace_period=FAILURE_GRACE_S):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{num_ranks} ranks of {fn.__name__} did not finish within {timeout_s} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
        raise _launch_error(context, fn.__name__, failure) from None


def _launch_error(context: Any, name: str, failure: Exception) -> Exception:
    """Returns: a LaunchError naming every failed rank: first those that died without a traceback (a signal other than
    the SIGTERM / SIGKILL that stop the survivors, or an exit code), then those that left one, in the order they
    wrote it. `failure` (the first failure torch's join noticed, which need not be the first to happen) itself when
    no rank did either."""
    died, raised = [], []
    for rank, (process, path) in enumerate(zip(context.processes, context.error_files)):
        try:
            when = os.stat(path).st_mtime_ns
            with open(path, "rb") as f:
                trace = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            code = process.exitcode
            if code is not None and code > 0:
                died.append((rank, f"rank {rank} exited with code {code}, without a traceback"))
            elif code is not None and code < 0 and -code not in (signal.SIGTERM, signal.SIGKILL):
                died.append((rank, f"rank {rank} died of signal {signal.Signals(-code).name}, without a traceback"))
            continue
        raised.append((when, rank, str(trace).rstrip()))
    if not died and not raised:
        return failure
    raised.sort()
    parts = [f"{len(died) + len(raised)} of {len(context.processes)} ranks of {name} failed:"]
    parts += [line for _, line in died]
    for i, (_, rank, trace) in enumerate(raised):
        parts += ["", f"rank {rank} failed{' first' if i == 0 and not died else ''}:", trace]
    return LaunchError("\n".join(parts), [rank for rank, _ in died] + [rank for _, rank, _ in raised])
