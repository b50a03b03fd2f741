"""Dispatch, combine and layout through `hybrid_ep.Buffer` on 1-4 gloo ranks, against results computed from the
seeded global routing (tests/cases.py)."""

from __future__ import annotations

import pytest
import torch

import hybrid_ep

from cases import Scenario, align, cpu, dispatch_routed, expected_combine, expected_for_rank, make_inputs, to_device
from distributed import ProcessGroupInfo, gpu_counts, parallel_launch


def make_buffer(pg: ProcessGroupInfo) -> hybrid_ep.Buffer:
    """Returns: a Buffer over pg; over NCCL with an NVLink buffer, so CUDA calls run the kernels."""
    num_nvl_bytes = 0
    if pg.backend == "nccl" and hybrid_ep.has_extension():
        R = pg.world_size
        configs = (hybrid_ep.Buffer.get_dispatch_config(R), hybrid_ep.Buffer.get_combine_config(R))
        num_nvl_bytes = max(c.get_nvl_buffer_size_hint(1024 * 2, R) for c in configs)
    return hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_nvl_bytes)


def scenarios(num_ranks: int) -> list[Scenario]:
    R = num_ranks
    many = [13 + 5 * r for r in range(R)]
    out = [
        Scenario("uniform", many, hidden=256, num_experts=8 * R, num_topk=4, seed=1),
        Scenario("holes", many, hidden=128, num_experts=4 * R, num_topk=3, seed=2, routing="holes"),
        Scenario("nowhere", many, hidden=64, num_experts=2 * R, num_topk=2, seed=3, routing="nowhere"),
        Scenario("one_expert_per_rank", many, hidden=32, num_experts=R, num_topk=1, seed=4),
        Scenario("zero_tokens", [0] * R, hidden=64, num_experts=4 * R, num_topk=2, seed=5),
        Scenario("fp8", many, hidden=256, num_experts=4 * R, num_topk=2, seed=6, fp8=True),
        Scenario("fp8_holes", many, hidden=384, num_experts=2 * R, num_topk=2, seed=7, routing="holes", fp8=True),
    ]
    for k in range(1, 9):
        out.append(Scenario(f"top{k}", many, hidden=16 * k, num_experts=8 * R, num_topk=k, seed=10 + k))
    if R > 1:
        senders = [0] + many[1:]
        out += [
            Scenario("rank0_sends_nothing", senders, hidden=64, num_experts=4 * R, num_topk=2, seed=20),
            Scenario(
                "last_rank_receives_nothing",
                many,
                hidden=64,
                num_experts=4 * R,
                num_topk=2,
                seed=21,
                routing="avoid_last_rank",
            ),
            Scenario("all_to_rank0", many, hidden=64, num_experts=4 * R, num_topk=3, seed=22, routing="one_rank"),
        ]
    return out


def _check_layout(buffer, pg, s, inp, exp) -> None:
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(inp.topk_idx[pg.rank], s.num_experts)
    assert per_rdma is None and event.event is None
    assert in_rank.device == pg.device
    per_rank, per_expert, in_rank = cpu((per_rank, per_expert, in_rank))
    assert torch.equal(per_rank, exp.num_tokens_per_rank), (s.name, per_rank, exp.num_tokens_per_rank)
    assert torch.equal(per_expert, exp.num_tokens_per_expert), s.name
    assert torch.equal(in_rank, exp.is_token_in_rank), s.name


def run_scenarios(pg: ProcessGroupInfo) -> None:
    R, me = pg.world_size, pg.rank
    buffer = make_buffer(pg)
    for s in scenarios(R):
        host_inp = make_inputs(s, R)
        exp = expected_for_rank(s, host_inp, me, R)
        inp = to_device(host_inp, pg.device)
        _check_layout(buffer, pg, s, inp, exp)
        x = (inp.x_fp8[me], inp.scales[me]) if s.fp8 else inp.x[me]
        alignment = 4 if s.name == "uniform" else 1
        recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_routed(
            buffer, x, inp, me, s.num_experts, expert_alignment=alignment
        )
        assert recv_idx.device == pg.device
        recv_x, recv_idx, recv_w, handle = cpu((recv_x, recv_idx, recv_w, handle))
        if s.fp8:
            assert isinstance(recv_x, tuple) and recv_x[0].dtype == torch.float8_e4m3fn
            assert torch.equal(recv_x[0].view(torch.uint8), exp.recv_x_fp8.view(torch.uint8)), s.name
            assert torch.equal(recv_x[1], exp.recv_scales), s.name
        else:
            assert recv_x.dtype == torch.bfloat16 and torch.equal(recv_x, exp.recv_x), s.name
        assert torch.equal(recv_idx, exp.recv_topk_idx), s.name
        assert torch.equal(recv_w, exp.recv_topk_weights), s.name
        assert counts == [align(c, alignment) for c in exp.num_recv_tokens_per_expert], (s.name, counts)
        rank_prefix_matrix, _, _, recv_src_idx, _, _ = handle
        assert recv_src_idx.tolist() == [t for _, t in exp.rows], s.name
        assert rank_prefix_matrix[:, me].tolist() == [sum(1 for src, _ in exp.rows if src <= i) for i in range(R)], (
            s.name
        )

        # Cached dispatch with the handle moves the same rows.
        cached = cpu(buffer.dispatch(x, handle=to_device_handle(handle, pg.device)))
        assert cached[1:5] == (None, None, None, None)
        cached_x = cached[0][0] if s.fp8 else cached[0]
        first_x = recv_x[0] if s.fp8 else recv_x
        assert torch.equal(cached_x.view(torch.uint8), first_x.view(torch.uint8)), s.name

        # Each rank scales its rows by (rank + 1); combine sums them back, exactly (small integers).
        if not s.fp8:
            bias = None
            if s.name == "holes":
                g = torch.Generator().manual_seed(99 + me)
                bias = [
                    torch.randint(-3, 4, (s.num_tokens[me], s.hidden), generator=g).to(torch.bfloat16) for _ in range(2)
                ]
            dev_handle = to_device_handle(handle, pg.device)
            combined, combined_w, _ = cpu(
                buffer.combine(
                    (recv_x.float() * (me + 1)).to(torch.bfloat16).to(pg.device),
                    dev_handle,
                    topk_weights=recv_w.to(pg.device),
                    bias=tuple(b.to(pg.device) for b in bias) if bias else None,
                )
            )
            want_x, want_w = expected_combine(s, host_inp, me, R, bias)
            assert torch.equal(combined, want_x), s.name
            assert torch.equal(combined_w, want_w), s.name
            combined_none_w = buffer.combine(recv_x.to(pg.device), dev_handle)[1]
            assert combined_none_w is None


def to_device_handle(handle: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device) for t in handle)


def run_worst_tokens(pg: ProcessGroupInfo) -> None:
    R, me = pg.world_size, pg.rank
    buffer = make_buffer(pg)
    s = Scenario("worst", [9 + r for r in range(R)], hidden=64, num_experts=4 * R, num_topk=3, seed=31, routing="holes")
    inp = make_inputs(s, R)
    exp = expected_for_rank(s, inp, me, R)
    worst = sum(s.num_tokens)
    recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_routed(
        buffer, inp.x[me], inp, me, s.num_experts, num_worst_tokens=worst
    )
    m = len(exp.rows)
    assert recv_x.shape == (worst, s.hidden) and recv_idx.shape == (worst, s.num_topk) and counts == []
    assert torch.equal(recv_x[:m], exp.recv_x) and torch.equal(recv_idx[:m], exp.recv_topk_idx)
    assert torch.equal(recv_w[:m], exp.recv_topk_weights)
    assert bool((recv_idx[m:] == -1).all()) and bool((recv_x[m:] == 0).all())
    assert int(handle[0][R - 1, me]) == m
    cached_x = buffer.dispatch(inp.x[me], handle=handle)[0]
    assert cached_x.shape == (worst, s.hidden) and torch.equal(cached_x[:m], exp.recv_x)
    combined, combined_w, _ = buffer.combine(
        (recv_x.float() * (me + 1)).to(torch.bfloat16), handle, topk_weights=recv_w
    )
    want_x, want_w = expected_combine(s, inp, me, R)
    assert torch.equal(combined, want_x) and torch.equal(combined_w, want_w)


def run_events(pg: ProcessGroupInfo) -> None:
    """previous_event / async_finish / allocate_on_comm_stream are accepted on the CPU backend as in DeepEP."""
    R, me = pg.world_size, pg.rank
    buffer = make_buffer(pg)
    s = Scenario("events", [7] * R, hidden=32, num_experts=2 * R, num_topk=2, seed=41)
    inp = make_inputs(s, R)
    exp = expected_for_rank(s, inp, me, R)
    prev = hybrid_ep.Buffer.capture()
    per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(
        inp.topk_idx[me], s.num_experts, previous_event=prev, async_finish=True, allocate_on_comm_stream=True
    )
    event.current_stream_wait()
    recv_x, _, _, _, handle, event = buffer.dispatch(
        inp.x[me],
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inp.topk_idx[me],
        topk_weights=inp.topk_weights[me],
        previous_event=prev,
        async_finish=True,
    )
    with event:
        pass
    assert torch.equal(recv_x, exp.recv_x)
    combined, _, event = buffer.combine((recv_x.float() * (me + 1)).to(torch.bfloat16), handle, async_finish=True)
    event.current_stream_wait()
    assert torch.equal(combined, expected_combine(s, inp, me, R)[0])


def run_size_one_strides(pg: ProcessGroupInfo) -> None:
    """Top-1 routing whose [N, 1] tensors carry stride 0 in the size-1 dimension (still contiguous, as a device copy
    can produce): dispatch and combine must treat them like any other."""
    R, me = pg.world_size, pg.rank
    buffer = make_buffer(pg)
    s = Scenario("top1_strides", [10 + r for r in range(R)], hidden=32, num_experts=2 * R, num_topk=1, seed=51)
    inp = make_inputs(s, R)
    exp = expected_for_rank(s, inp, me, R)
    odd = lambda t: torch.as_strided(t.clone(), (t.size(0), 1), (1, 0))  # noqa: E731
    inp.topk_idx[me], inp.topk_weights[me] = odd(inp.topk_idx[me]), odd(inp.topk_weights[me])
    assert inp.topk_weights[me].is_contiguous() and inp.topk_weights[me].stride() == (1, 0)
    recv_x, recv_idx, recv_w, _, handle, _ = dispatch_routed(buffer, inp.x[me], inp, me, s.num_experts)
    assert torch.equal(recv_x, exp.recv_x) and torch.equal(recv_idx, exp.recv_topk_idx)
    odd_w = torch.as_strided(recv_w.clone(), (recv_w.size(0), 1), (1, 0))
    combined, combined_w, _ = buffer.combine((recv_x.float() * (me + 1)).to(torch.bfloat16), handle, topk_weights=odd_w)
    want_x, want_w = expected_combine(s, inp, me, R)
    assert torch.equal(combined, want_x) and torch.equal(combined_w, want_w)


def test_size_one_strides() -> None:
    parallel_launch(2, run_size_one_strides)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_scenarios(world_size: int) -> None:
    parallel_launch(world_size, run_scenarios)


@pytest.mark.parametrize("world_size", [1, 3])
def test_worst_tokens(world_size: int) -> None:
    parallel_launch(world_size, run_worst_tokens)


@pytest.mark.parametrize("world_size", gpu_counts(2, 4))
def test_scenarios_nccl(world_size: int) -> None:
    parallel_launch(world_size, run_scenarios, backend="nccl")


def test_events_cpu() -> None:
    parallel_launch(2, run_events)
