"""One launcher for multi-process tests: `parallel_launch(world_size, worker, *args)`.

It is `hybrid_ep.launch`, the launcher of the package's command-line tools, with the settings tests want: a
collective that waits 120 s fails (a hung peer fails the test early), a launch that outlives 300 s is killed, and
every rank runs torch on one CPU thread, under NCCL as under gloo. Each worker process joins a fresh process group
(gloo on the CPU, NCCL with one GPU per rank) and runs `worker(pg, *args)` where `pg` is a `ProcessGroupInfo`. A
failure in any rank fails the launch with that rank's traceback.
"""

from __future__ import annotations

from typing import Any, Callable

from hybrid_ep import launch
from hybrid_ep.launch import ProcessGroupInfo, num_gpus

__all__ = ["ProcessGroupInfo", "gpu_counts", "num_gpus", "parallel_launch", "requires_gpus", "requires_kernels"]

DEFAULT_TIMEOUT_S = 300
# How long a rank may wait in a host-side collective before it fails.
COLLECTIVE_TIMEOUT_S = 120


def parallel_launch(
    world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Runs `fn(pg, *args)` on `world_size` ranks and raises if any rank fails or the launch times out."""
    launch.parallel_launch(
        world_size,
        fn,
        *args,
        backend=backend,
        timeout_s=timeout_s,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
        num_threads=1,
    )


def requires_gpus(n: int):
    """pytest marker: skip unless at least `n` GPUs are visible."""
    # NOTES: imported here, so tests/test_hybrid_ep.py (which uses this launcher) runs where pytest is absent.
    import pytest

    return pytest.mark.skipif(num_gpus() < n, reason=f"needs {n} CUDA GPU(s), found {num_gpus()}")


def gpu_counts(*counts: int) -> list:
    """pytest parameters: one per rank count in `counts`, each skipped unless that many GPUs are visible."""
    import pytest

    return [pytest.param(n, marks=requires_gpus(n)) for n in counts]


def requires_kernels():
    """pytest marker: skip unless hybrid_ep._C has the intranode dispatch/combine kernels."""
    import pytest

    import hybrid_ep

    return pytest.mark.skipif(
        not hybrid_ep.build_info()["features"].get("intranode", False),
        reason="hybrid_ep._C without the intranode dispatch/combine kernels (build_info()['features']['intranode'])",
    )
