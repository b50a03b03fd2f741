"""The multi-process launcher (`hybrid_ep.launch`): a rank's failure fails the launch with its message, a launch
that outlives its timeout is killed, and every rank frees its process group before its interpreter shuts down."""

from __future__ import annotations

import atexit
import os
import time
import weakref

import pytest

from hybrid_ep import launch

from distributed import ProcessGroupInfo, parallel_launch


def run_fail_on_rank_1(pg: ProcessGroupInfo) -> None:
    if pg.rank == 1:
        raise ValueError("rank 1 fails on purpose")


def run_abort_on_rank_1(pg: ProcessGroupInfo) -> None:
    if pg.rank == 1:
        os.abort()


def run_sleep(pg: ProcessGroupInfo, seconds: float) -> None:
    time.sleep(seconds)


def run_group_in_a_cycle(pg: ProcessGroupInfo, path: str) -> None:
    """Leaves the process group referenced from a reference cycle (as a caught exception's traceback leaves a frame)
    and records, at interpreter exit, whether the group was still alive then."""
    holder: dict = {"group": pg.group}
    holder["self"] = holder
    group = weakref.ref(pg.group)
    out = f"{path}.{pg.rank}"

    def report() -> None:
        with open(out, "w") as f:
            f.write("alive" if group() is not None else "freed")

    atexit.register(report)


def test_a_failing_rank_fails_the_launch_with_its_message() -> None:
    # Rank 0 then fails too, in the worker's closing barrier; the message starts with rank 1, the cause.
    with pytest.raises(launch.LaunchError, match="rank 1 failed first:") as failure:
        parallel_launch(2, run_fail_on_rank_1, timeout_s=120)
    assert "rank 1 fails on purpose" in str(failure.value) and failure.value.ranks[0] == 1


def test_a_rank_killed_by_a_signal_is_named() -> None:
    # Rank 1 leaves no traceback; rank 0's 'Connection closed by peer' must not hide it.
    with pytest.raises(launch.LaunchError, match="rank 1 died of signal SIGABRT") as failure:
        parallel_launch(2, run_abort_on_rank_1, timeout_s=120)
    assert failure.value.ranks[0] == 1


def test_a_launch_past_its_timeout_is_killed() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        parallel_launch(2, run_sleep, 600.0, timeout_s=5)
    assert time.monotonic() - start < 120


def test_the_process_group_is_freed_before_interpreter_exit(tmp_path) -> None:
    # A gloo group still alive when the interpreter shuts down lets its worker threads free their last work there,
    # which aborts the process now and then ("terminate called without an active exception").
    path = str(tmp_path / "group")
    parallel_launch(2, run_group_in_a_cycle, path, timeout_s=120)
    for rank in range(2):
        with open(f"{path}.{rank}") as f:
            assert f.read() == "freed", f"rank {rank}: the process group outlived the launch's worker"
