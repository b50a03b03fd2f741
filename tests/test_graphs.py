"""CUDA graphs: a dispatch + expert function + combine step captured once and replayed with new inputs.

* `test_graph_replay`: layout, dispatch with `num_worst_tokens` (fixed-size outputs, no host synchronisation),
  for FP8 also a cached BF16 dispatch, an expert function and combine are captured once; each of 200 replays gets
  fresh routing (uniform, skewed, with -1 holes) and data written into the captured input tensors, and every
  output of every replay is checked bitwise against tests/cases.py.
* `test_cached_graph_replay`: the cached-handle path (fixed routing, new rows every replay).
* `test_capture_needs_fixed_size`: a dispatch that would need the received count on the host fails at capture
  with a RuntimeError naming num_worst_tokens, and the Buffer works afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import hybrid_ep
from hybrid_ep import Config

from cases import (
    Inputs,
    Scenario,
    check,
    dispatch_routed,
    expected_combine_fast,
    expected_dispatch,
    layout_kwargs,
    make_inputs,
    pad_rows,
)
from distributed import ProcessGroupInfo, gpu_counts, parallel_launch, requires_gpus, requires_kernels

needs_kernels = requires_kernels()
GPU_COUNTS = gpu_counts(2, 4)

NUM_TOKENS, HIDDEN, EXPERTS_PER_RANK, NUM_TOPK = 512, 2048, 8, 8
NUM_REPLAYS = 200
REPLAY_ROUTINGS = ("uniform", "skewed", "holes", "skewed+holes")
CONFIG = Config(8, 8, 64)


def scenario(i: int, num_ranks: int, fp8: bool = False) -> Scenario:
    return Scenario(
        f"replay {i}",
        [NUM_TOKENS] * num_ranks,
        HIDDEN,
        EXPERTS_PER_RANK * num_ranks,
        NUM_TOPK,
        seed=70_000 + i,
        routing=REPLAY_ROUTINGS[i % len(REPLAY_ROUTINGS)],
        fp8=fp8,
    )


def new_buffer(pg: ProcessGroupInfo) -> hybrid_ep.Buffer:
    num_nvl_bytes = CONFIG.get_nvl_buffer_size_hint(HIDDEN * 2, pg.world_size)
    return hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)


def capture(step: Callable[[], tuple]) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """Runs `step` twice eagerly on a side stream (allocations and lazy set-up happen outside the capture), then
    captures it. Returns: (graph, the outputs the graph writes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def load(static: dict[str, torch.Tensor], inp: Inputs, rank: int) -> None:
    """Writes rank `rank`'s inputs into the captured input tensors."""
    static["x"].copy_(inp.x[rank])
    static["x_fp8"].copy_(inp.x_fp8[rank])
    static["scales"].copy_(inp.scales[rank])
    static["topk_idx"].copy_(inp.topk_idx[rank])
    static["topk_weights"].copy_(inp.topk_weights[rank])


def run_graph_replay(pg: ProcessGroupInfo, fp8: bool) -> None:
    R, me, device = pg.world_size, pg.rank, pg.device
    buffer = new_buffer(pg)
    first = make_inputs(scenario(0, R, fp8), R, device)
    static = {
        "x": first.x[me].clone(),
        "x_fp8": first.x_fp8[me].clone(),
        "scales": first.scales[me].clone(),
        "topk_idx": first.topk_idx[me].clone(),
        "topk_weights": first.topk_weights[me].clone(),
    }
    # The most rows a rank can receive: every token of every rank.
    worst = NUM_TOKENS * R
    num_experts = EXPERTS_PER_RANK * R

    def step() -> tuple:
        x = (static["x_fp8"], static["scales"]) if fp8 else static["x"]
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x,
            **layout_kwargs(buffer, static["topk_idx"], num_experts),
            topk_idx=static["topk_idx"],
            topk_weights=static["topk_weights"],
            num_worst_tokens=worst,
            config=CONFIG,
        )
        assert counts == [], f"num_recv_tokens_per_expert_list with num_worst_tokens: {counts}"
        recv_bf16 = (
            buffer.dispatch(static["x"], handle=handle, num_worst_tokens=worst, config=CONFIG)[0] if fp8 else recv_x
        )
        # The expert function: rank r scales its rows by r + 1 (the factors expected_combine_fast assumes).
        y = (recv_bf16.float() * (me + 1)).to(torch.bfloat16)
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, config=CONFIG)
        return recv_x, recv_idx, recv_w, handle, combined, combined_w

    graph, (recv_x, recv_idx, recv_w, handle, combined, combined_w) = capture(step)
    for i in range(NUM_REPLAYS):
        s = scenario(i, R, fp8)
        inp = make_inputs(s, R, device)
        load(static, inp, me)
        graph.replay()
        exp = expected_dispatch(s, inp, me, R, CONFIG.num_channels)
        where = f"[replay {i} ({s.routing}), {'FP8' if fp8 else 'BF16'}, rank {me} of {R}]"
        if fp8:
            check(f"{where} recv_x (FP8)", recv_x[0], pad_rows(exp.recv_x_fp8, worst))
            check(f"{where} recv_scales", recv_x[1], pad_rows(exp.recv_scales, worst))
        else:
            check(f"{where} recv_x", recv_x, pad_rows(exp.recv_x, worst))
        check(f"{where} recv_topk_idx", recv_idx, pad_rows(exp.recv_topk_idx, worst, -1))
        check(f"{where} recv_topk_weights", recv_w, pad_rows(exp.recv_topk_weights, worst))
        check(f"{where} handle[3] (recv_src_idx)", handle[3], pad_rows(exp.recv_src_idx, worst, -1))
        check(f"{where} handle[5] (send_head)", handle[5], exp.send_head)
        want_x, want_w = expected_combine_fast(s, inp, me, R)
        check(f"{where} combined_x", combined, want_x)
        check(f"{where} combined_topk_weights", combined_w, want_w)
    if me == 0:
        print(f"[graphs] {NUM_REPLAYS} replays on {R} ranks ({'FP8' if fp8 else 'BF16'}): every output bitwise")
    del graph
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_graph_replay(world_size: int, fp8: bool) -> None:
    parallel_launch(world_size, run_graph_replay, fp8, backend="nccl")


def run_cached_graph_replay(pg: ProcessGroupInfo) -> None:
    R, me, device = pg.world_size, pg.rank, pg.device
    buffer = new_buffer(pg)
    s = scenario(1, R)  # skewed routing, fixed for every replay
    routed = make_inputs(s, R, device)
    _, _, recv_w, _, handle, _ = dispatch_routed(buffer, routed.x[me], routed, me, s.num_experts, config=CONFIG)
    x = routed.x[me].clone()

    def step() -> tuple:
        recv_x = buffer.dispatch(x, handle=handle, config=CONFIG)[0]
        y = (recv_x.float() * (me + 1)).to(torch.bfloat16)
        return recv_x, buffer.combine(y, handle, topk_weights=recv_w, config=CONFIG)[0]

    graph, (recv_x, combined) = capture(step)
    for i in range(NUM_REPLAYS):
        rows = make_inputs(dataclasses.replace(s, seed=80_000 + i), R, device)
        inp = dataclasses.replace(rows, topk_idx=routed.topk_idx, topk_weights=routed.topk_weights)
        x.copy_(inp.x[me])
        graph.replay()
        exp = expected_dispatch(s, inp, me, R, CONFIG.num_channels)
        where = f"[cached replay {i}, rank {me} of {R}]"
        check(f"{where} recv_x", recv_x, exp.recv_x)
        check(f"{where} combined_x", combined, expected_combine_fast(s, inp, me, R)[0])
    del graph
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_cached_graph_replay(world_size: int) -> None:
    parallel_launch(world_size, run_cached_graph_replay, backend="nccl")


def run_capture_needs_fixed_size(pg: ProcessGroupInfo) -> None:
    R, me, device = pg.world_size, pg.rank, pg.device
    buffer = new_buffer(pg)
    s = scenario(0, R)
    inp = make_inputs(s, R, device)
    routed = dict(
        **layout_kwargs(buffer, inp.topk_idx[me], s.num_experts),
        topk_idx=inp.topk_idx[me],
        topk_weights=inp.topk_weights[me],
        config=CONFIG,
    )
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    error = None
    with torch.cuda.graph(graph):
        try:
            buffer.dispatch(inp.x[me], **routed)
        except RuntimeError as e:
            error = str(e)
    assert error is not None and "num_worst_tokens" in error, f"capture without num_worst_tokens: {error!r}"
    del graph
    # Nothing was enqueued: the Buffer still works, eagerly.
    recv_x = buffer.dispatch(inp.x[me], **routed)[0]
    check(f"[rank {me}] dispatch after the refused capture", recv_x, expected_dispatch(s, inp, me, R).recv_x)
    buffer.destroy()


@needs_kernels
@requires_gpus(2)
def test_capture_needs_fixed_size() -> None:
    parallel_launch(2, run_capture_needs_fixed_size, backend="nccl")
