"""The NVLink runtime of Buffer on GPUs: IPC mapping of every peer's buffer, the device-side barrier, teardown
without leaks, and a dead peer that ends in an error instead of a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import hybrid_ep

from cases import Scenario, layout_kwargs, make_inputs, to_device
from distributed import ProcessGroupInfo, gpu_counts, parallel_launch, requires_gpus

pytestmark = pytest.mark.skipif(
    not hybrid_ep.build_info()["features"].get("nvl_runtime", False), reason="hybrid_ep._C without the NVLink runtime"
)
GPU_COUNTS = gpu_counts(2, 4)


def run_peer_access(pg: ProcessGroupInfo) -> None:
    R, me = pg.world_size, pg.rank
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=1 << 20, explicitly_destroy=True)
    assert buffer.runtime.is_available and buffer.runtime.num_nvl_bytes == 1 << 20
    local = buffer.get_local_buffer_tensor(torch.int32, (4, 64))
    assert local.shape == (4, 64) and local.device == pg.device
    assert buffer.get_local_buffer_tensor(torch.uint8).numel() == 1 << 20
    assert buffer.get_local_buffer_tensor(torch.bfloat16, offset=1024).numel() == ((1 << 20) - 1024) // 2
    for round_idx in range(3):
        local.fill_(100 * round_idx + me)
        buffer.runtime.barrier()  # orders the fill before every peer's reads below
        for p in range(R):
            peer = buffer.runtime.buffer_tensor(p, torch.int32, 0, 4 * 64 * 4)
            assert bool((peer == 100 * round_idx + p).all()), (me, p, round_idx)
        buffer.runtime.barrier()  # nobody overwrites before everyone has read
    start = time.perf_counter()
    for _ in range(1000):
        buffer.runtime.barrier()
    torch.cuda.synchronize()
    if me == 0:
        print(f"[runtime] {R} ranks: 1000 device barriers in {(time.perf_counter() - start) * 1e3:.1f} ms")
    with pytest.raises(RuntimeError, match="must lie within num_nvl_bytes"):
        buffer.runtime.buffer_tensor(0, torch.int32, 0, (1 << 20) + 4)
    with pytest.raises(RuntimeError, match=r"rank_idx must be in \[0, %d\)" % R):
        buffer.runtime.buffer_tensor(R, torch.int32, 0, 4)
    buffer.destroy()
    with pytest.raises(RuntimeError, match="was destroyed"):
        buffer.get_local_buffer_tensor(torch.int32)


def run_create_destroy_cycles(pg: ProcessGroupInfo, num_cycles: int) -> None:
    num_bytes = 64 << 20

    def free_bytes() -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    # One warm-up cycle pays the one-time costs (peer-access mappings, NCCL and allocator buffers).
    hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_bytes, explicitly_destroy=True).destroy()
    free_before = free_bytes()
    for _ in range(num_cycles):
        buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_bytes, explicitly_destroy=True)
        buffer.destroy()
    free_after = free_bytes()
    # A leaked buffer (or a peer mapping that keeps one alive) costs 64 MiB a cycle.
    assert free_before - free_after < num_bytes, (free_before, free_after)


def run_notify(pg: ProcessGroupInfo) -> None:
    """The count exchange against the reference's handle, over back-to-back calls with changing routing."""
    R, me = pg.world_size, pg.rank
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=1 << 20, explicitly_destroy=True)
    routings = ["uniform", "holes", "one_rank", "avoid_last_rank", "nowhere"]
    for i in range(50):
        s = Scenario(
            "notify",
            [0 if i % 7 == 3 else 200 + 37 * r + i for r in range(R)],
            hidden=16,
            num_experts=[R, 8 * R, 64 * R][i % 3],
            num_topk=[1, 8, 3][i % 3],
            seed=i,
            routing=routings[i % 5],
        )
        inp = to_device(make_inputs(s, R), pg.device)
        num_channels, alignment = 1 + i % 12, 1 + i % 4
        layout = layout_kwargs(buffer, inp.topk_idx[me], s.num_experts)
        rank_prefix, channel_prefix, recv_channel_prefix, send_head, per_expert = buffer.runtime.notify_dispatch(
            layout["num_tokens_per_rank"],
            layout["num_tokens_per_expert"],
            layout["is_token_in_rank"],
            num_channels,
            alignment,
        )
        num_recv, per_expert_host, overflow = buffer.runtime.wait_recv_counts(s.num_experts // R)
        assert overflow[0] == -1, (i, overflow)
        _, _, _, ref_counts, ref_handle = hybrid_ep.reference.dispatch(
            inp.x[me],
            group=pg.group,
            **layout,
            topk_idx=inp.topk_idx[me],
            topk_weights=inp.topk_weights[me],
            expert_alignment=alignment,
            num_channels=num_channels,
        )
        assert torch.equal(rank_prefix, ref_handle[0]), (i, rank_prefix, ref_handle[0])
        assert torch.equal(channel_prefix, ref_handle[1]), (i, channel_prefix, ref_handle[1])
        assert torch.equal(recv_channel_prefix, ref_handle[2]), (i, recv_channel_prefix, ref_handle[2])
        assert torch.equal(send_head, ref_handle[5]), (i, send_head, ref_handle[5])
        assert num_recv == ref_handle[3].numel(), (i, num_recv)
        assert per_expert_host == ref_counts and per_expert.tolist() == ref_counts, (i, per_expert_host, ref_counts)
    buffer.destroy()


@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_notify_matches_reference(world_size: int) -> None:
    parallel_launch(world_size, run_notify, backend="nccl")


@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_peer_buffers_and_barrier(world_size: int) -> None:
    parallel_launch(world_size, run_peer_access, backend="nccl")


@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_create_destroy_cycles_leak_nothing(world_size: int) -> None:
    parallel_launch(world_size, run_create_destroy_cycles, 100, backend="nccl")


def run_dead_peer(pg: ProcessGroupInfo, done_path: str) -> None:
    """Rank 1 never enters the extra barrier; rank 0's barrier must end in an error naming peer 1."""
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=1 << 20)
    if pg.rank == 0:
        try:
            buffer.runtime.barrier()
            torch.cuda.synchronize()
            outcome = "no error"
        except RuntimeError as e:
            outcome = f"RuntimeError: {e}"
        with open(done_path, "w") as f:
            f.write(outcome)
    else:
        deadline = time.time() + 120
        while not os.path.exists(done_path) and time.time() < deadline:
            time.sleep(0.2)
    sys.stdout.flush()
    os._exit(0)  # rank 0's CUDA context is gone after the trap; skip the orderly teardown


@requires_gpus(2)
def test_dead_peer_is_an_error_not_a_hang(tmp_path) -> None:
    done_path = str(tmp_path / "rank0.txt")
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import test_runtime, distributed\n"
        "distributed.parallel_launch(2, test_runtime.run_dead_peer, %r, backend='nccl', timeout_s=240)\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), done_path)
    env = dict(os.environ, HYBRID_EP_TIMEOUT_SECS="3")
    # NOTES: run from tmp_path, so `python -c` does not import the source tree (which has no _C) ahead of the
    # installed package.
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert os.path.exists(done_path), output
    with open(done_path) as f:
        outcome = f.read()
    assert outcome.startswith("RuntimeError"), outcome + output
    assert "intranode barrier timeout: rank 0 waits for peer 1" in output, output
