"""Every rejected input gets a clear error naming the argument, and the Buffer works for the next valid call."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

import hybrid_ep

from cases import Scenario, dispatch_routed, expected_combine, expected_for_rank, make_inputs
from distributed import ProcessGroupInfo, parallel_launch


def expect_error(exc: type[BaseException], pattern: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except exc as e:
        assert re.search(pattern, str(e)), f"error message {str(e)!r} does not match {pattern!r}"
        return
    except Exception as e:  # noqa: BLE001 - report the wrong type with its message
        raise AssertionError(f"expected {exc.__name__} matching {pattern!r}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__} matching {pattern!r}, but the call succeeded")


def _valid_round_trip(buffer: hybrid_ep.Buffer, pg: ProcessGroupInfo, seed: int) -> None:
    R, me = pg.world_size, pg.rank
    s = Scenario("valid", [11, 6, 9, 4][:R], hidden=128, num_experts=4 * R, num_topk=3, seed=seed, routing="holes")
    inp = make_inputs(s, R)
    exp = expected_for_rank(s, inp, me, R)
    recv_x, recv_idx, _, _, handle, _ = dispatch_routed(buffer, inp.x[me], inp, me, s.num_experts)
    assert torch.equal(recv_x, exp.recv_x) and torch.equal(recv_idx, exp.recv_topk_idx)
    combined, _, _ = buffer.combine((recv_x.float() * (me + 1)).to(torch.bfloat16), handle)
    assert torch.equal(combined, expected_combine(s, inp, me, R)[0])


def run_negative(pg: ProcessGroupInfo) -> None:
    R, me = pg.world_size, pg.rank
    buffer = hybrid_ep.Buffer(pg.group)
    s = Scenario("neg", [8] * R, hidden=128, num_experts=4 * R, num_topk=2, seed=5)
    inp = make_inputs(s, R)
    x, idx, w = inp.x[me], inp.topk_idx[me], inp.topk_weights[me]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, s.num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    _valid_round_trip(buffer, pg, seed=100)

    # Layout: dtype, shape, contiguity, range, divisibility, device.
    cases: list[tuple[type[BaseException], str, Callable[[], Any]]] = [
        (
            ValueError,
            r"topk_idx must have dtype torch\.int64, got torch\.int32",
            lambda: buffer.get_dispatch_layout(idx.int(), s.num_experts),
        ),
        (ValueError, r"topk_idx must be 2-D", lambda: buffer.get_dispatch_layout(idx.flatten(), s.num_experts)),
        (ValueError, r"topk_idx must be contiguous", lambda: buffer.get_dispatch_layout(idx.t(), s.num_experts)),
        (
            ValueError,
            r"topk_idx entries must be -1 or expert indices in \[0, %d\), got %d" % (s.num_experts, s.num_experts),
            lambda: buffer.get_dispatch_layout(torch.full_like(idx, s.num_experts), s.num_experts),
        ),
        (
            ValueError,
            r"topk_idx entries .* got -2",
            lambda: buffer.get_dispatch_layout(torch.full_like(idx, -2), s.num_experts),
        ),
        (
            ValueError,
            r"num_experts=%d must be divisible by the number of ranks" % (4 * R + 1),
            lambda: buffer.get_dispatch_layout(idx, 4 * R + 1),
        )
        if R > 1
        else None,
        (
            ValueError,
            r"topk_idx must have 1 to 32 columns",
            lambda: buffer.get_dispatch_layout(torch.zeros(4, 33, dtype=torch.int64), s.num_experts),
        ),
        (
            ValueError,
            r"topk_idx must be on cpu, got meta",
            lambda: buffer.get_dispatch_layout(idx.to("meta"), s.num_experts),
        ),
        (TypeError, r"num_experts must be an int", lambda: buffer.get_dispatch_layout(idx, float(s.num_experts))),
        # Dispatch: x dtype, shape, contiguity, device, FP8 rules, layout and top-k arguments.
        (
            ValueError,
            r"x must have dtype torch\.bfloat16, got torch\.float32",
            lambda: buffer.dispatch(x.float(), **layout, topk_idx=idx, topk_weights=w),
        ),
        (ValueError, r"x must be 2-D", lambda: buffer.dispatch(x.flatten(), **layout)),
        (ValueError, r"x must be contiguous", lambda: buffer.dispatch(x.t().contiguous().t(), **layout)),
        (
            ValueError,
            r"x: hidden size 12 must be a multiple of 8",
            lambda: buffer.dispatch(x[:, :12].contiguous(), **layout),
        ),
        (ValueError, r"x must be a CPU tensor .* got meta", lambda: buffer.dispatch(x.to("meta"), **layout)),
        (
            ValueError,
            r"x\[0\]: FP8 hidden size must be a multiple of 128, got 64",
            lambda: buffer.dispatch((inp.x_fp8[me][:, :64].contiguous(), inp.scales[me][:, :1].contiguous()), **layout),
        ),
        (
            ValueError,
            r"x\[0\] must have dtype torch\.float8_e4m3fn",
            lambda: buffer.dispatch((x, inp.scales[me]), **layout),
        ),
        (
            ValueError,
            r"x\[1\] \(scales\) must have shape \[%d, 1\], got \[%d, 2\]" % (8, 8),
            lambda: buffer.dispatch((inp.x_fp8[me], torch.ones(8, 2)), **layout),
        ),
        (
            ValueError,
            r"x\[1\] \(scales\) must have dtype torch\.float32",
            lambda: buffer.dispatch((inp.x_fp8[me], inp.scales[me].double()), **layout),
        ),
        (TypeError, r"x must be a bfloat16 tensor or a", lambda: buffer.dispatch("x", **layout)),
        (ValueError, r"x as a tuple must be \(x_fp8, scales\), got 1 elements", lambda: buffer.dispatch([x], **layout)),
        (
            ValueError,
            r"missing: num_tokens_per_rank",
            lambda: buffer.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert),
        ),
        (
            ValueError,
            r"num_tokens_per_rank must have dtype torch\.int32",
            lambda: buffer.dispatch(
                x, num_tokens_per_rank=per_rank.long(), is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
            ),
        ),
        (
            ValueError,
            r"is_token_in_rank must have shape \[8, %d\]" % R,
            lambda: buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank[:4], num_tokens_per_expert=per_expert
            ),
        ),
        (
            ValueError,
            r"num_tokens_per_rank .* does not match the column sums of is_token_in_rank",
            lambda: buffer.dispatch(
                x, num_tokens_per_rank=per_rank + 1, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
            ),
        ),
        (
            ValueError,
            r"num_tokens_per_expert.size\(0\)=%d must be divisible" % (4 * R + 1),
            lambda: buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=torch.zeros(4 * R + 1, dtype=torch.int32),
            ),
        )
        if R > 1
        else None,
        (
            ValueError,
            r"topk_idx and topk_weights must be given together",
            lambda: buffer.dispatch(x, **layout, topk_idx=idx),
        ),
        (
            ValueError,
            r"topk_weights must have dtype torch\.float32",
            lambda: buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w.double()),
        ),
        (
            ValueError,
            r"topk_weights must have shape \[8, 2\], got \[8, 3\]",
            lambda: buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=torch.ones(8, 3)),
        ),
        (
            ValueError,
            r"topk_idx entries must be -1 or expert indices",
            lambda: buffer.dispatch(x, **layout, topk_idx=torch.full_like(idx, 10**6), topk_weights=w),
        ),
        (ValueError, r"expert_alignment must be >= 1, got 0", lambda: buffer.dispatch(x, **layout, expert_alignment=0)),
        (ValueError, r"num_worst_tokens must be >= 0", lambda: buffer.dispatch(x, **layout, num_worst_tokens=-1)),
        (
            ValueError,
            r"invalid Config: num_sms=3 must be even",
            lambda: buffer.dispatch(x, **layout, config=_bad_config()),
        ),
        (TypeError, r"config must be a hybrid_ep.Config", lambda: buffer.dispatch(x, **layout, config=(20, 6, 256))),
        (
            ValueError,
            r"allocate_on_comm_stream=True needs previous_event and async_finish",
            lambda: buffer.dispatch(x, **layout, allocate_on_comm_stream=True),
        ),
        # Combine.
        (ValueError, r"handle must be the 6-tuple returned by dispatch", lambda: buffer.combine(x, handle=(1, 2))),
    ]
    for i, case in enumerate(cases):
        if case is not None:
            expect_error(*case)
            _valid_round_trip(buffer, pg, seed=200 + i)

    # Combine errors need a real handle.
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w)
    m = recv_x.size(0)
    combine_cases = [
        (
            ValueError,
            r"x must have dtype torch\.bfloat16, got torch\.float32",
            lambda: buffer.combine(recv_x.float(), handle),
        ),
        (
            ValueError,
            r"x must have as many rows as the dispatch returned \(%d\), got %d" % (m, m + 1),
            lambda: buffer.combine(torch.zeros(m + 1, s.hidden, dtype=torch.bfloat16), handle),
        ),
        (
            ValueError,
            r"topk_weights must have shape \[%d, \*\]" % m,
            lambda: buffer.combine(recv_x, handle, topk_weights=torch.zeros(m + 1, 2)),
        ),
        (
            ValueError,
            r"bias must have shape \[8, 128\]",
            lambda: buffer.combine(recv_x, handle, bias=torch.zeros(7, s.hidden, dtype=torch.bfloat16)),
        ),
        (
            ValueError,
            r"bias\[1\] must have dtype torch\.bfloat16",
            lambda: buffer.combine(recv_x, handle, bias=(None, torch.zeros(8, s.hidden))),
        ),
        (
            ValueError,
            r"x has 7 tokens but the handle was made for 8 tokens",
            lambda: buffer.dispatch(x[:7].contiguous(), handle=handle),
        ),
        (
            ValueError,
            r"cached mode\) takes no topk_idx",
            lambda: buffer.dispatch(x, handle=handle, topk_idx=idx, topk_weights=w),
        ),
    ]
    for i, case in enumerate(combine_cases):
        expect_error(*case)
        _valid_round_trip(buffer, pg, seed=300 + i)

    # num_worst_tokens too small for what some rank receives: every rank raises (naming that rank), so no rank is
    # left waiting in the exchange.
    counts = torch.tensor([recv_x.size(0)])
    everyone = [torch.zeros_like(counts) for _ in range(R)]
    torch.distributed.all_gather(everyone, counts, group=pg.group)
    overflowing = [r for r in range(R) if int(everyone[r]) > 1]
    if overflowing:
        busiest = overflowing[0]  # the error names the first rank that overflows
        expect_error(
            ValueError,
            r"num_worst_tokens=1 on rank %d is smaller than the %d tokens" % (busiest, int(everyone[busiest])),
            lambda: buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=1),
        )
    _valid_round_trip(buffer, pg, seed=400)


def _bad_config() -> hybrid_ep.Config:
    config = hybrid_ep.Config()
    config.num_sms = 3
    return config


def test_negative_inputs_two_ranks() -> None:
    parallel_launch(2, run_negative)


def test_negative_inputs_one_rank() -> None:
    parallel_launch(1, run_negative)
