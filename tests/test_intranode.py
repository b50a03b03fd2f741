"""Intranode dispatch and combine through the NVLink buffer on 2 and 4 GPUs, bitwise against tests/cases.py.

Every GPU test opens one Buffer with `num_nvl_bytes` sized from the hints of the Configs it uses and runs many
scenarios in one process group:
  * `test_sweep`: token counts 0 to 8192 (different per rank), hidden 2048/4096/7168, top-1 to top-8 with -1 holes,
    1/8/64 experts per rank, uniform/skewed/empty routing, BF16 and FP8, expert_alignment, num_worst_tokens, cached
    dispatch and num_sms 2 to 24 with small rings that wrap; every output and every handle entry is checked. Each
    case combines twice: from plain tensors (pushed through the rings) and from the output arena (pulled), and
    every rank checks that a combine pulled exactly when every rank's inputs lay in its arena.
  * `test_back_to_back`: 1000 dispatch/combine pairs whose routing, sizes and Config change every iteration
    (combines alternately pushed and pulled).
  * `test_combine_is_deterministic`: random (inexact) data; the same combine twice is bitwise equal, pulled equal
    to pushed, and equal to the contract's fixed summation order.
  * `test_nvl_bytes_too_small`: a Config that does not fit is rejected naming num_nvl_bytes; one that fits works.
  * `test_stream_order`: a call with neither previous_event nor async_finish comes after an async dispatch still
    waiting on the communication stream.
`test_checks_on_gloo` runs the same workers at small sizes on 2 gloo ranks (the reference backend), so the
expectations and the checks themselves run on machines without GPUs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import re
import time
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

import hybrid_ep
from hybrid_ep import Config

from cases import (
    ROUTINGS,
    Scenario,
    align,
    check,
    dispatch_routed,
    expected_combine,
    expected_combine_fast,
    expected_dispatch,
    expected_for_rank,
    make_inputs,
    pad_rows,
    token_in_rank,
)
from distributed import ProcessGroupInfo, gpu_counts, parallel_launch, requires_gpus, requires_kernels

needs_kernels = requires_kernels()
GPU_COUNTS = gpu_counts(2, 4)

# Small rings: 16 slots per ring, 4 tokens per step, so thousands of tokens wrap each ring many times.
SMALL_RINGS = Config(8, 4, 16)
# Sizes of the GPU scenarios and what they shrink to on gloo ranks (multiples of 128, for FP8).
SMALL_TOKENS = {0: 0, 1: 1, 127: 13, 4096: 40, 8192: 64}
SMALL_HIDDEN = {2048: 128, 4096: 256, 7168: 384}


@dataclasses.dataclass
class Case:
    """One layout, dispatch, cached dispatch (in the other dtype for FP8) and combine, each checked bitwise."""

    scenario: Scenario
    config: Config  # of dispatch and cached dispatch
    combine_config: Config  # the same num_sms as `config`: combine walks the channels of the handle
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    num_biases: int = 0  # 0: no bias, 1: a lone tensor, 2: a pair
    column_major_scales: bool = False  # FP8 scales as a column-major view
    combine_modes: tuple[str, ...] = ("push", "pull")  # combine inputs: plain tensors, or in the output arena


def nvl_bytes_for(cases: list[Case], num_ranks: int) -> int:
    """Returns: the largest `get_nvl_buffer_size_hint` over the Configs and hidden sizes of `cases`."""
    return max(
        config.get_nvl_buffer_size_hint(c.scenario.hidden * 2, num_ranks)
        for c in cases
        for config in (c.config, c.combine_config)
    )


# ---------------------------------------------------------------------------------------------------------------
# Inputs and one case


def seeded_bias(s: Scenario, rank: int, num_biases: int, device: torch.device) -> list[torch.Tensor]:
    """Returns: `num_biases` tensors `[N_rank, hidden]` bf16 of small integers (exact under sums)."""
    g = torch.Generator(device=device).manual_seed(7919 * s.seed + rank)
    shape = (s.num_tokens[rank], s.hidden)
    return [torch.randint(-3, 4, shape, generator=g, device=device).to(torch.bfloat16) for _ in range(num_biases)]


def run_case(buffer: hybrid_ep.Buffer, pg: ProcessGroupInfo, case: Case) -> bool:
    """Layout, dispatch, cached dispatch and combine of `case`, each output checked bitwise. Returns: whether a
    combine pulled."""
    s, R, me, device = case.scenario, pg.world_size, pg.rank, pg.device
    where = f"[{s.name}, rank {me} of {R}]"
    inp = make_inputs(s, R, device)
    exp = expected_dispatch(s, inp, me, R, case.config.num_channels)
    m, worst = exp.num_recv_tokens, case.num_worst_tokens
    num_rows = worst if worst > 0 else m

    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx[me], s.num_experts)
    assert per_rdma is None, where
    check(f"{where} layout num_tokens_per_rank", per_rank, exp.num_tokens_per_rank)
    check(f"{where} layout num_tokens_per_expert", per_expert, exp.num_tokens_per_expert)
    check(f"{where} layout is_token_in_rank", in_rank, exp.is_token_in_rank)

    scales = inp.scales[me].t().contiguous().t() if case.column_major_scales else inp.scales[me]
    x_bf16, x_fp8 = inp.x[me], (inp.x_fp8[me], scales)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x_fp8 if s.fp8 else x_bf16,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inp.topk_idx[me],
        topk_weights=inp.topk_weights[me],
        expert_alignment=case.expert_alignment,
        num_worst_tokens=worst,
        config=case.config,
    )

    def check_recv_x(what: str, got: Any, fp8: bool) -> None:
        if fp8:
            assert isinstance(got, tuple) and len(got) == 2, f"{what}: expected (recv_x, recv_scales), got {got!r}"
            check(f"{what} (FP8)", got[0], pad_rows(exp.recv_x_fp8, num_rows))
            check(f"{what} scales", got[1], pad_rows(exp.recv_scales, num_rows))
            assert got[1].is_contiguous(), f"{what} scales: strides {got[1].stride()}, expected row-major"
        else:
            check(f"{what} (BF16)", got, pad_rows(exp.recv_x, num_rows))

    check_recv_x(f"{where} dispatch recv_x", recv_x, s.fp8)
    check(f"{where} dispatch recv_topk_idx", recv_idx, pad_rows(exp.recv_topk_idx, num_rows, -1))
    check(f"{where} dispatch recv_topk_weights", recv_w, pad_rows(exp.recv_topk_weights, num_rows))
    want_counts = [] if worst > 0 else [align(c, case.expert_alignment) for c in exp.num_recv_tokens_per_expert]
    assert counts == want_counts, f"{where} num_recv_tokens_per_expert_list: {counts}, expected {want_counts}"
    assert isinstance(handle, tuple) and len(handle) == 6, f"{where} handle: {type(handle).__name__}"
    wants = (
        exp.rank_prefix_matrix,
        exp.channel_prefix_matrix,
        exp.recv_channel_prefix_matrix,
        pad_rows(exp.recv_src_idx, num_rows, -1),
        exp.is_token_in_rank,
        exp.send_head,
    )
    names = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx")
    names += ("is_token_in_rank", "send_head")
    for i, (name, got, want) in enumerate(zip(names, handle, wants)):
        check(f"{where} handle[{i}] ({name})", got, want)

    # Cached: the same rows, in the other dtype when the first call was FP8 (combine needs the BF16 rows).
    cached = buffer.dispatch(x_bf16 if s.fp8 else x_fp8, handle=handle, num_worst_tokens=worst, config=case.config)
    assert cached[1:5] == (None, None, None, None), f"{where} cached dispatch: {cached[1:5]!r}"
    check_recv_x(f"{where} cached dispatch recv_x", cached[0], not s.fp8)
    recv_bf16 = cached[0] if s.fp8 else recv_x

    # Rank r sends back its rows times (r + 1); padding rows hold NaN, which combine must ignore. "push": from plain
    # tensors, so the senders push rows through the rings; "pull": from the output arena (x from new_combine_input,
    # the weights dispatch returned), so each rank reads its tokens' copies from its peers.
    biases = seeded_bias(s, me, case.num_biases, device)
    bias = tuple(biases) if len(biases) == 2 else (biases[0] if biases else None)
    want_x, want_w = expected_combine_fast(s, inp, me, R, biases)
    is_pulled = False
    for mode in case.combine_modes:
        y = (recv_bf16.float() * (me + 1)).to(torch.bfloat16)
        y_weights = recv_w.clone()
        if mode == "pull":
            y = buffer.new_combine_input(handle, s.hidden).copy_(y)
            y_weights = recv_w
        y[m:], y_weights[m:] = float("nan"), float("nan")
        combined, combined_w, _ = buffer.combine(
            y, handle, topk_weights=y_weights, bias=bias, config=case.combine_config
        )
        check(f"{where} combine ({mode}) combined_x", combined, want_x)
        check(f"{where} combine ({mode}) combined_topk_weights", combined_w, want_w)
        is_pulled = check_combine_path(buffer, pg, f"{where} combine ({mode})", y, y_weights) or is_pulled
    return is_pulled


def check_combine_path(
    buffer: hybrid_ep.Buffer, pg: ProcessGroupInfo, where: str, x: torch.Tensor, weights: Optional[torch.Tensor]
) -> bool:
    """The last combine, from `x` and `weights`, pulled on every rank if every rank's lay in its output arena, else
    pushed on every rank. Returns: whether it pulled (False on the reference)."""
    if buffer.runtime is None:
        return False
    runtime = buffer.runtime
    in_arena = all(t is None or t.numel() == 0 or runtime.arena_offset(t) >= 0 for t in (x, weights))
    gathered: list[Any] = [None] * pg.world_size
    dist.all_gather_object(gathered, (in_arena, runtime.last_combine_pulled()), group=pg.group)
    want = all(g[0] for g in gathered)
    assert all(g[1] == want for g in gathered), f"{where}: (inputs in the arena, pulled) per rank: {gathered}"
    return want


# ---------------------------------------------------------------------------------------------------------------
# a) The sweep


def sweep_cases(num_ranks: int, small: bool = False) -> list[Case]:
    """Returns: a representative subset of tokens x hidden x top-k x experts per rank x routing x dtype x Config,
    every value of each dimension at least once, the edge cases by name. `small` shrinks sizes for gloo ranks."""
    R = num_ranks
    tokens_of = (lambda n: SMALL_TOKENS[n]) if small else (lambda n: n)
    hidden_of = (lambda h: SMALL_HIDDEN[h]) if small else (lambda h: h)
    cases: list[Case] = []

    def add(
        name: str,
        pattern: tuple[int, ...],
        hidden: int,
        experts_per_rank: int,
        num_topk: int,
        routing: str,
        config: Config,
        combine_config: Optional[Config] = None,
        *,
        fp8: bool = False,
        worst: bool = False,
        **kwargs: Any,
    ) -> None:
        num_tokens = [tokens_of(pattern[r % len(pattern)]) for r in range(R)]
        num_topk = min(num_topk, experts_per_rank * R)
        s = Scenario(
            name,
            num_tokens,
            hidden_of(hidden),
            experts_per_rank * R,
            num_topk,
            seed=1000 + len(cases),
            routing=routing,
            fp8=fp8,
        )
        worst_tokens = sum(num_tokens) + 3 if worst else 0
        cases.append(Case(s, config, combine_config or config, num_worst_tokens=worst_tokens, **kwargs))

    # The standard workload, then the edges by name.
    add("standard_bf16", (4096,), 7168, 64, 8, "uniform", Config(24, 8, 256), expert_alignment=128, num_biases=2)
    add("standard_fp8", (4096,), 7168, 64, 8, "uniform", Config(16, 8, 256), Config(16, 6, 128), fp8=True)
    add("skewed_8192", (8192,), 7168, 64, 8, "skewed", Config(24, 8, 256), Config(24, 4, 64), num_biases=1)
    add(
        "skewed_holes_fp8_8192",
        (8192, 4096, 0, 127),
        4096,
        8,
        6,
        "skewed+holes",
        Config(16, 8, 256),
        fp8=True,
        worst=True,
        column_major_scales=True,
    )
    add("ring_wrap", (4096, 127, 1, 4096), 2048, 8, 4, "holes", SMALL_RINGS, expert_alignment=4)
    add("ring_wrap_fp8_hot", (4096, 1, 4096, 127), 7168, 64, 8, "skewed", SMALL_RINGS, Config(8, 2, 8), fp8=True)
    # Combine rings of 2 and 5 slots: with one peer they split into sub-rings of 1 slot (2 rows per batch), and of 1
    # slot and 2 (5 slots over 3 senders, one left over).
    add("combine_two_slot_rings", (4096, 127), 2048, 8, 4, "holes", Config(8, 8, 256), Config(8, 1, 2), num_biases=1)
    add("combine_five_slot_rings", (127, 4096), 4096, 8, 6, "skewed", Config(4, 8, 256), Config(6, 2, 5))
    add("one_channel", (4096, 1, 127, 0), 4096, 8, 3, "holes", Config(2, 8, 256), worst=True, num_biases=2)
    add("one_channel_small_rings_fp8", (127, 8192), 2048, 64, 5, "uniform", Config(2, 4, 16), fp8=True)
    add("one_expert_per_rank_top1", (4096,), 2048, 1, 1, "uniform", Config(16, 8, 256))
    add("one_expert_per_rank_topR", (1, 127, 0, 4096), 7168, 1, R, "holes", Config(24, 8, 256), num_biases=2)
    add("empty_routing", (127, 4096, 1, 0), 4096, 8, 5, "empty", Config(8, 8, 256), worst=True, num_biases=1)
    add("zero_tokens", (0,), 2048, 8, 2, "uniform", Config(24, 8, 256), worst=True)
    add("one_token_each_fp8", (1,), 7168, 64, 8, "holes", Config(2, 8, 256), fp8=True, column_major_scales=True)
    add("all_to_rank0_small_rings", (4096,), 2048, 8, 3, "one_rank", SMALL_RINGS, num_biases=1)
    add("last_rank_receives_nothing", (127, 1, 4096, 127), 4096, 64, 7, "avoid_last_rank", Config(16, 8, 256))
    add("nowhere_rows", (4096, 127), 7168, 8, 2, "nowhere", Config(8, 8, 256), expert_alignment=32)

    # Top-1 to top-8, each with another hidden size, expert count, routing, token pattern and Config.
    configs = (Config(2, 8, 256), Config(8, 8, 256), Config(16, 8, 256), Config(24, 8, 256), SMALL_RINGS)
    routings = ("holes", "skewed+holes", "uniform", "nowhere+holes", "skewed")
    patterns = ((127,), (4096, 1), (0, 127, 4096), (8192, 127, 1, 0))
    for k in range(1, 9):
        add(
            f"top{k}",
            patterns[k % 4],
            (2048, 4096, 7168)[k % 3],
            (8, 64)[k % 2],
            k,
            routings[k % 5],
            configs[(k + 2) % 5],
            fp8=k in (2, 3, 7),
            worst=k in (3, 8),
            expert_alignment=(1, 4, 128)[k % 3],
            num_biases=k % 3,
        )
    return cases


def run_sweep(pg: ProcessGroupInfo, small: bool, with_arena: bool = True) -> None:
    """The sweep; `with_arena`: every rank has the default output arena, so most combines from it pull."""
    cases = sweep_cases(pg.world_size, small)
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=nvl_bytes_for(cases, pg.world_size), explicitly_destroy=True)
    start = time.perf_counter()
    num_pulled = sum(run_case(buffer, pg, case) for case in cases)
    if with_arena and buffer.runtime is not None:
        assert num_pulled >= len(cases) // 2, f"only {num_pulled} of {len(cases)} cases pulled"
    if pg.rank == 0:
        elapsed = time.perf_counter() - start
        print(f"[intranode] sweep on {pg.world_size} ranks: {len(cases)} cases, {num_pulled} pulled, {elapsed:.1f} s")
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_sweep(world_size: int) -> None:
    parallel_launch(world_size, run_sweep, False, backend="nccl")


# Without an output arena every rank receives through its rings; with one too small for most outputs on rank 0
# (and the default elsewhere), rank 0 receives large calls through its rings while its peers take rows directly.
ARENA_LAYOUTS = {"none": lambda rank: 0, "mixed": lambda rank: 1 << 20 if rank == 0 else None}


def run_sweep_with_arena(pg: ProcessGroupInfo, layout: str) -> None:
    arena_bytes = ARENA_LAYOUTS[layout](pg.rank)
    if arena_bytes is not None:
        os.environ["HYBRID_EP_OUTPUT_ARENA_BYTES"] = str(arena_bytes)
    run_sweep(pg, False, with_arena=False)


@needs_kernels
@pytest.mark.parametrize("layout", sorted(ARENA_LAYOUTS))
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_sweep_receiving_through_rings(world_size: int, layout: str) -> None:
    parallel_launch(world_size, run_sweep_with_arena, layout, backend="nccl")


def run_arena_outputs(pg: ProcessGroupInfo) -> None:
    """Dispatch outputs come from the output arena, give their memory back when they die, and stay valid after
    the Buffer is destroyed, as torch.empty tensors would."""
    R, me, device = pg.world_size, pg.rank, pg.device
    s = Scenario("arena", [512] * R, 2048, 8 * R, 4, seed=77)
    inp = make_inputs(s, R, device)
    exp = expected_dispatch(s, inp, me, R, Config(8, 8, 256).num_channels)
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=Config(8, 8, 256).get_nvl_buffer_size_hint(4096, R),
                              explicitly_destroy=True)  # fmt: skip
    runtime = buffer.runtime
    assert runtime.num_arena_bytes == 1 << 30 and runtime.num_arena_used_bytes == 0
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx[me], s.num_experts)
    kwargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=inp.topk_idx[me], topk_weights=inp.topk_weights[me], config=Config(8, 8, 256))  # fmt: skip
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(inp.x[me], **kwargs)
    m = exp.num_recv_tokens
    # recv_x, recv_topk_idx, recv_topk_weights and the handle's recv_src_idx, each a 4 KiB-aligned block.
    parts = (m * 2048 * 2, m * 4 * 8, m * 4 * 4, m * 4)
    used = runtime.num_arena_used_bytes
    assert used == sum(-(-p // 4096) * 4096 for p in parts), (used, m)
    # A second dispatch while the first outputs live takes other blocks, and gives the same rows.
    again = buffer.dispatch(inp.x[me], **kwargs)
    assert runtime.num_arena_used_bytes == 2 * used
    check("[arena] second dispatch recv_x", again[0], exp.recv_x)
    assert again[0].data_ptr() != recv_x.data_ptr()
    del again
    assert runtime.num_arena_used_bytes == used
    del recv_idx, recv_w
    assert runtime.num_arena_used_bytes == used - sum(-(-p // 4096) * 4096 for p in parts[1:3])
    buffer.destroy()
    # Outputs outlive the Buffer (the arena's memory goes with the last of them).
    check("[arena] recv_x after destroy", recv_x, exp.recv_x)
    check("[arena] handle recv_src_idx after destroy", handle[3], exp.recv_src_idx)


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_arena_outputs_lifetime(world_size: int) -> None:
    parallel_launch(world_size, run_arena_outputs, backend="nccl")


# ---------------------------------------------------------------------------------------------------------------
# b) Back-to-back calls with changing routing

B2B_CONFIGS = (SMALL_RINGS, Config(2, 2, 8), Config(16, 6, 64), Config(24, 8, 256), Config(4, 2, 8))
B2B_ROUTINGS = ("uniform", "holes", "skewed", "skewed+holes", "nowhere", "one_rank", "avoid_last_rank", "empty")


def back_to_back_case(i: int, num_ranks: int, small: bool) -> Case:
    """Returns: iteration i's Case: sizes, experts, top-k, routing (seed i), dtype and Config all change."""
    rng = random.Random(i)
    experts_per_rank = rng.choice((1, 8, 64))
    s = Scenario(
        f"iteration {i}",
        [rng.randint(8, 40) if small else rng.randint(64, 512) for _ in range(num_ranks)],
        128 if small else 2048,
        experts_per_rank * num_ranks,
        rng.randint(1, min(8, experts_per_rank * num_ranks)),
        seed=50_000 + i,
        routing=B2B_ROUTINGS[i % len(B2B_ROUTINGS)],
        fp8=i % 3 == 2,
    )
    config = B2B_CONFIGS[i % len(B2B_CONFIGS)]
    worst = sum(s.num_tokens) + 1 if i % 7 == 3 else 0
    modes = ("pull",) if i % 2 else ("push",)
    return Case(
        s, config, config, expert_alignment=1 + i % 4, num_worst_tokens=worst, num_biases=i % 3, combine_modes=modes
    )


def run_back_to_back(pg: ProcessGroupInfo, num_iters: int, small: bool) -> None:
    cases = [back_to_back_case(i, pg.world_size, small) for i in range(num_iters)]
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=nvl_bytes_for(cases, pg.world_size), explicitly_destroy=True)
    start = time.perf_counter()
    for case in cases:
        run_case(buffer, pg, case)
    if pg.rank == 0:
        elapsed = time.perf_counter() - start
        print(f"[intranode] {num_iters} back-to-back rounds on {pg.world_size} ranks: {elapsed:.1f} s")
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_back_to_back(world_size: int) -> None:
    parallel_launch(world_size, run_back_to_back, 1000, False, backend="nccl")


# ---------------------------------------------------------------------------------------------------------------
# c) Determinism


def run_determinism(pg: ProcessGroupInfo, small: bool) -> None:
    """Random normal rows and biases, so fp32 sums depend on their order: combine must give the same bits every
    time, whatever the chunk sizes, and the bits of the contract's order (bias_0, bias_1, then ranks ascending)."""
    R, me, device = pg.world_size, pg.rank, pg.device
    hidden = 384 if small else 7168
    configs = (Config(24, 8, 256), Config(24, 4, 32), Config(24, 6, 128))
    holes_tokens = [40 if small else (4096, 127)[r % 2] for r in range(R)]
    scenarios = [
        Scenario("determinism_holes", holes_tokens, hidden, 64 * R, 8, seed=71, routing="holes"),
        Scenario("determinism_skewed", [64 if small else 8192] * R, hidden, 8 * R, 6, seed=72, routing="skewed"),
    ]
    cases = [Case(s, c, c) for s in scenarios for c in configs]
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=nvl_bytes_for(cases, R), explicitly_destroy=True)
    factors = [(r + 1) / 3 for r in range(R)]
    num_pulled = 0
    for s in scenarios:
        where = f"[{s.name}, rank {me} of {R}]"
        inp = make_inputs(s, R, device)
        g = torch.Generator(device=device).manual_seed(s.seed)
        inp.x = [torch.randn(n, s.hidden, generator=g, device=device).to(torch.bfloat16) for n in s.num_tokens]
        g.manual_seed(s.seed * 31 + me)
        shape = (s.num_tokens[me], s.hidden)
        biases = [torch.randn(shape, generator=g, device=device).to(torch.bfloat16) for _ in range(2)]
        exp = expected_dispatch(s, inp, me, R, configs[0].num_channels)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx[me], s.num_experts)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            inp.x[me],
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=inp.topk_idx[me],
            topk_weights=inp.topk_weights[me],
            config=configs[0],
        )
        check(f"{where} recv_x", recv_x, exp.recv_x)
        y = (recv_x.float() * factors[me]).to(torch.bfloat16)
        runs = [
            buffer.combine(y, handle, topk_weights=recv_w, bias=tuple(biases), config=configs[i % len(configs)])
            for i in range(2 * len(configs))
        ]
        # The same sums pulled from the output arena: the same bits as pushed.
        y_arena = buffer.new_combine_input(handle, s.hidden).copy_(y)
        for config in configs:
            runs.append(buffer.combine(y_arena, handle, topk_weights=recv_w, bias=tuple(biases), config=config))
            num_pulled += check_combine_path(buffer, pg, f"{where} combine from the arena", y_arena, recv_w)
        for i, (combined, combined_w, _) in enumerate(runs[1:], 1):
            check(f"{where} combine run {i} against run 0", combined, runs[0][0])
            check(f"{where} combine run {i} against run 0, weights", combined_w, runs[0][1])
        want_x, want_w = expected_combine_fast(s, inp, me, R, biases, factors)
        check(f"{where} combined_x in the contract's order", runs[0][0], want_x)
        check(f"{where} combined_topk_weights", runs[0][1], want_w)
    if buffer.runtime is not None:
        # The holes scenario's inputs fit the arena on every rank (the skewed one's may not on its busiest rank).
        assert num_pulled >= len(configs), f"rank {me}: {num_pulled} combines from the arena pulled"
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_combine_is_deterministic(world_size: int) -> None:
    parallel_launch(world_size, run_determinism, False, backend="nccl")


# ---------------------------------------------------------------------------------------------------------------
# d) num_nvl_bytes too small


def expect_nvl_bytes_error(what: str, fn: Any) -> None:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        assert re.search("num_nvl_bytes", str(e)), f"{what}: the error does not name num_nvl_bytes: {e}"
        return
    raise AssertionError(f"{what}: expected ValueError or RuntimeError naming num_nvl_bytes, the call succeeded")


def run_nvl_bytes_too_small(pg: ProcessGroupInfo) -> None:
    """A Buffer sized exactly for a small Config: larger Configs (more channels, or more ring slots) are rejected
    on every rank before anything moves; the small Config then works, as often as asked."""
    R, me, device = pg.world_size, pg.rank, pg.device
    fits = Config(4, 4, 16)
    s = Scenario("nvl_bytes", [300 + 50 * r for r in range(R)], 4096, 8 * R, 4, seed=91, routing="holes")
    num_nvl_bytes = fits.get_nvl_buffer_size_hint(s.hidden * 2, R)
    more_channels, more_slots = Config(24, 4, 16), Config(4, 8, 256)
    default = hybrid_ep.Buffer.get_dispatch_config(R)
    for big in (more_channels, more_slots, default):
        assert big.get_nvl_buffer_size_hint(s.hidden * 2, R) > num_nvl_bytes, big
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
    inp = make_inputs(s, R, device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx[me], s.num_experts)
    args = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inp.topk_idx[me],
        topk_weights=inp.topk_weights[me],
    )
    x_fp8 = (inp.x_fp8[me], inp.scales[me])
    for name, config in (("more channels", more_channels), ("more ring slots", more_slots)):
        expect_nvl_bytes_error(f"dispatch, {name}", lambda: buffer.dispatch(inp.x[me], **args, config=config))
        expect_nvl_bytes_error(f"FP8 dispatch, {name}", lambda: buffer.dispatch(x_fp8, **args, config=config))
    expect_nvl_bytes_error(f"dispatch, default {default}", lambda: buffer.dispatch(inp.x[me], **args))

    exp = expected_dispatch(s, inp, me, R, fits.num_channels)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(inp.x[me], **args, config=fits)
    check("dispatch after the errors", recv_x, exp.recv_x)
    expect_nvl_bytes_error(
        "cached dispatch, more slots", lambda: buffer.dispatch(inp.x[me], handle=handle, config=more_slots)
    )
    y = (recv_x.float() * (me + 1)).to(torch.bfloat16)
    expect_nvl_bytes_error(
        "combine, more slots", lambda: buffer.combine(y, handle, topk_weights=recv_w, config=Config(4, 8, 256))
    )
    want_x, want_w = expected_combine_fast(s, inp, me, R)
    for _ in range(3):
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, config=fits)
        check("combine after the errors", combined, want_x)
        check("combine after the errors, weights", combined_w, want_w)
    run_case(buffer, pg, Case(s, fits, fits, expert_alignment=2, num_biases=1))
    buffer.destroy()


@needs_kernels
@requires_gpus(2)
def test_nvl_bytes_too_small() -> None:
    parallel_launch(2, run_nvl_bytes_too_small, backend="nccl", timeout_s=180)


# ---------------------------------------------------------------------------------------------------------------
# e) Stream order


def run_stream_order(pg: ProcessGroupInfo) -> None:
    """A call with neither previous_event nor async_finish comes after the communication stream's earlier work, as
    in DeepEP: a cached dispatch left there behind a long sleep (async_finish=True, its event not waited on) has
    written its rows before the combine of those rows reads them, and the combine's outputs are ready in the current
    stream's order."""
    R, me, device = pg.world_size, pg.rank, pg.device
    s = Scenario("stream_order", [2048] * R, 4096, 8 * R, 8, seed=83)
    inp = make_inputs(s, R, device)
    config = Config(16, 8, 256)
    num_nvl_bytes = config.get_nvl_buffer_size_hint(s.hidden * 2, R)
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
    handle = dispatch_routed(buffer, inp.x[me], inp, me, s.num_experts, config=config)[4]
    factors = [2.0, 3.0]
    for i, factor in enumerate(factors):
        scaled = dataclasses.replace(inp, x=[(t.float() * factor).to(torch.bfloat16) for t in inp.x])
        torch.cuda.current_stream().synchronize()
        with torch.cuda.stream(buffer.get_comm_stream()):
            torch.cuda._sleep(200_000_000)  # about 0.1 s
        recv_x, _, _, _, _, event = buffer.dispatch(scaled.x[me], handle=handle, config=config, async_finish=True)
        combined, _, _ = buffer.combine(recv_x, handle, config=config)
        want = expected_combine_fast(s, scaled, me, R, factors=[1.0] * R)[0]
        check(f"[stream order {i}, rank {me} of {R}] combined_x", combined, want)
        event.current_stream_wait()
    buffer.destroy()


@needs_kernels
@pytest.mark.parametrize("world_size", GPU_COUNTS)
def test_stream_order(world_size: int) -> None:
    parallel_launch(world_size, run_stream_order, backend="nccl", timeout_s=180)


# ---------------------------------------------------------------------------------------------------------------
# Without GPUs: the expectations and the workers themselves


def run_all_small(pg: ProcessGroupInfo) -> None:
    run_sweep(pg, True)
    run_back_to_back(pg, 24, True)
    run_determinism(pg, True)


def test_checks_on_gloo() -> None:
    """The GPU tests' workers at small sizes on 2 gloo ranks, where the Buffer runs the reference: every check,
    the handle entries included, holds for the contract's implementation."""
    parallel_launch(2, run_all_small)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_vectorised_expectations_match_loops(num_ranks: int) -> None:
    """`expected_dispatch` and `expected_combine_fast` agree with the row-by-row `expected_for_rank` and
    `expected_combine`, for every routing, top-k up to 8 and unequal token counts (0 included)."""
    R = num_ranks
    routings = list(ROUTINGS) + ["skewed+holes", "nowhere+holes"]
    for i, routing in enumerate(routings):
        k = 1 + i % 8
        s = Scenario(routing, [(0, 9, 17, 30)[(r + i) % 4] for r in range(R)], 128, 8 * R, k, seed=i, routing=routing)
        inp = make_inputs(s, R)
        rows_of = [expected_for_rank(s, inp, r, R).rows for r in range(R)]
        for me in range(R):
            old, new = expected_for_rank(s, inp, me, R), expected_dispatch(s, inp, me, R, num_channels=3)
            assert list(zip(new.recv_src_rank.tolist(), new.recv_src_idx.tolist())) == old.rows, routing
            for name in ("recv_x", "recv_x_fp8", "recv_scales", "recv_topk_idx", "recv_topk_weights"):
                check(f"{routing} rank {me} {name}", getattr(new, name), getattr(old, name))
            for name in ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"):
                check(f"{routing} rank {me} {name}", getattr(new, name), getattr(old, name))
            assert new.num_recv_tokens_per_expert == old.num_recv_tokens_per_expert, routing
            rows_from = [sum(1 for src, _ in old.rows if src == r) for r in range(R)]
            assert new.rank_prefix_matrix[:, me].tolist() == list(itertools.accumulate(rows_from)), routing
            # send_head of rank me's token t for rank r: t's row among rank r's rows.
            for t in range(s.num_tokens[me]):
                for r in range(R):
                    want = rows_of[r].index((me, t)) if (me, t) in rows_of[r] else -1
                    assert int(new.send_head[t, r]) == want, (routing, me, t, r)
            bias = [torch.randint(-3, 4, (s.num_tokens[me], s.hidden)).to(torch.bfloat16) for _ in range(2)]
            for b in (None, bias):
                want_x, want_w = expected_combine(s, inp, me, R, b)
                got_x, got_w = expected_combine_fast(s, inp, me, R, b)
                # NOTES: equal values, not bits: the row-by-row version gives -0.0 for a negative row that goes
                # nowhere (x * 0); the contract's accumulator starts at +0.0, which the fast version follows.
                assert torch.equal(got_x, want_x), (routing, me)
                assert not bool(torch.signbit(got_x[got_x == 0]).any()), (routing, me)
                check(f"{routing} rank {me} combined_topk_weights", got_w, want_w)


def test_new_routings() -> None:
    """ "skewed" sends about 80% of the (token, rank) pairs to rank 0 at 4 ranks and top-8; "empty" sends nothing;
    routings join with "+"; an unknown one is an error."""
    R = 4
    s = Scenario("skewed", [4096] * R, 128, 64 * R, 8, seed=3, routing="skewed")
    inp = make_inputs(s, R)
    pairs = sum(token_in_rank(idx, s.num_experts, R).sum(0) for idx in inp.topk_idx)
    share = float(pairs[0]) / float(pairs.sum())
    assert 0.7 < share < 0.9, share
    s = Scenario("empty", [50] * R, 128, 8 * R, 4, seed=4, routing="empty")
    assert all(bool((idx == -1).all()) for idx in make_inputs(s, R).topk_idx)
    s = Scenario("skewed+holes", [200] * R, 128, 8 * R, 4, seed=5, routing="skewed+holes")
    idx = make_inputs(s, R).topk_idx[0]
    assert 0.2 < float((idx == -1).float().mean()) < 0.4
    with pytest.raises(ValueError, match="unknown routing"):
        make_inputs(Scenario("bad", [4] * R, 128, 8 * R, 2, routing="uniform+typo"), R)
