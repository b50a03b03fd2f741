"""Seeded routing scenarios and the results they must give, computed here from the global routing.

Every rank builds the inputs of ALL ranks from the same seed, so each rank knows what it must receive without any
collective, and without calling hybrid_ep.reference (tests never check the reference against itself).

`expected_for_rank` / `expected_combine` spell the contract out row by row (small sizes, on the CPU);
`expected_dispatch` / `expected_combine_fast` compute the same in a few tensor operations, on the inputs' device,
for thousands of tokens, and add every entry of the dispatch handle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch


@dataclasses.dataclass
class Scenario:
    name: str
    num_tokens: list[int]  # per rank
    hidden: int
    num_experts: int
    num_topk: int
    seed: int = 0
    # "uniform": distinct random experts; "holes": plus random -1 entries; "nowhere": some rows all -1;
    # "avoid_last_rank": no token selects an expert of the last rank; "one_rank": every token on rank 0;
    # "skewed": 90% of tokens pick only experts of rank 0 (as far as top-k allows), so rank 0 receives about 80% of
    # the traffic at 4 ranks and top-8; "empty": every entry -1, no token goes anywhere.
    # Several join with "+", e.g. "skewed+holes".
    routing: str = "uniform"
    fp8: bool = False


@dataclasses.dataclass
class Inputs:
    x: list[torch.Tensor]  # per rank: [N_r, hidden] bf16 (small integers, exact under sums)
    x_fp8: list[torch.Tensor]  # per rank: [N_r, hidden] float8_e4m3fn
    scales: list[torch.Tensor]  # per rank: [N_r, hidden / 128] float32
    topk_idx: list[torch.Tensor]  # per rank: [N_r, K] int64
    topk_weights: list[torch.Tensor]  # per rank: [N_r, K] float32 (exact in binary)


ROUTINGS = ("uniform", "holes", "nowhere", "avoid_last_rank", "one_rank", "skewed", "empty")


def make_inputs(s: Scenario, num_ranks: int, device: Optional[torch.device] = None) -> Inputs:
    """Returns: the inputs of every rank, drawn from `s.seed` on `device` (default: the CPU). The same seed gives
    the same inputs on every rank when the ranks draw on the CPU, or on GPUs of one model (CUDA's generator
    depends on the launch geometry); a GPU draws other numbers than the CPU."""
    device = torch.device("cpu") if device is None else torch.device(device)
    kinds = set(s.routing.split("+"))
    unknown = kinds - set(ROUTINGS)
    if unknown:
        raise ValueError(f"Scenario {s.name!r}: unknown routing {sorted(unknown)}; known: {', '.join(ROUTINGS)}")
    g = torch.Generator(device=device).manual_seed(s.seed)
    on = dict(generator=g, device=device)
    xs, x8s, scs, idxs, ws = [], [], [], [], []
    for r in range(num_ranks):
        n = s.num_tokens[r]
        xs.append(torch.randint(-8, 9, (n, s.hidden), **on).to(torch.bfloat16))
        x8s.append(torch.randint(-16, 17, (n, s.hidden), **on).to(torch.float32).to(torch.float8_e4m3fn))
        scs.append(torch.randint(1, 64, (n, max(s.hidden // 128, 1)), **on).to(torch.float32) / 16)
        scores = torch.rand(n, s.num_experts, **on)
        experts_per_rank = s.num_experts // num_ranks
        if "skewed" in kinds:
            # Scores are in [0, 1): +2 puts rank 0's experts first for the boosted tokens.
            boost = torch.rand(n, 1, **on) < 0.9
            scores[:, :experts_per_rank] += boost.to(scores.dtype) * 2
        if "avoid_last_rank" in kinds:
            scores[:, s.num_experts - experts_per_rank :] = -1.0
        if "one_rank" in kinds:
            scores[:, experts_per_rank:] = -1.0
        k = s.num_topk
        topk = scores.topk(k, dim=1).indices.to(torch.int64)
        if kinds & {"avoid_last_rank", "one_rank"}:
            picked = torch.gather(scores, 1, topk)
            topk = torch.where(picked < 0, torch.full_like(topk, -1), topk)
        if "holes" in kinds:
            holes = torch.rand(n, k, **on) < 0.3
            topk = torch.where(holes, torch.full_like(topk, -1), topk)
        if "nowhere" in kinds:
            nowhere = torch.rand(n, **on) < 0.4
            topk[nowhere] = -1
        if "empty" in kinds:
            topk.fill_(-1)
        idxs.append(topk.contiguous())
        ws.append((torch.randint(1, 16, (n, k), **on).to(torch.float32) / 8).contiguous())
    return Inputs(xs, x8s, scs, idxs, ws)


@dataclasses.dataclass
class Expected:
    rows: list[tuple[int, int]]  # (source rank, source token) of each received row, in order
    recv_x: torch.Tensor
    recv_x_fp8: torch.Tensor
    recv_scales: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]  # unaligned
    num_tokens_per_rank: torch.Tensor  # this rank's layout: [R] int32
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [N_me, R] bool


def expected_for_rank(s: Scenario, inp: Inputs, rank: int, num_ranks: int) -> Expected:
    experts_per_rank = s.num_experts // num_ranks
    num_topk = s.num_topk

    def ranks_of(src: int, t: int) -> set[int]:
        return {int(e) // experts_per_rank for e in inp.topk_idx[src][t].tolist() if e >= 0}

    rows = [(src, t) for src in range(num_ranks) for t in range(s.num_tokens[src]) if rank in ranks_of(src, t)]
    m = len(rows)
    recv_x = torch.zeros(m, s.hidden, dtype=torch.bfloat16)
    recv_x8 = torch.zeros(m, s.hidden, dtype=torch.float8_e4m3fn)
    recv_sc = torch.zeros(m, max(s.hidden // 128, 1), dtype=torch.float32)
    recv_idx = torch.full((m, num_topk), -1, dtype=torch.int64)
    recv_w = torch.zeros(m, num_topk, dtype=torch.float32)
    per_expert = [0] * experts_per_rank
    for i, (src, t) in enumerate(rows):
        recv_x[i] = inp.x[src][t]
        recv_x8[i] = inp.x_fp8[src][t]
        recv_sc[i] = inp.scales[src][t]
        for k, e in enumerate(inp.topk_idx[src][t].tolist()):
            if e >= 0 and e // experts_per_rank == rank:
                recv_idx[i, k] = e - rank * experts_per_rank
                recv_w[i, k] = inp.topk_weights[src][t, k]
                per_expert[e - rank * experts_per_rank] += 1

    n_me = s.num_tokens[rank]
    in_rank = torch.zeros(n_me, num_ranks, dtype=torch.bool)
    for t in range(n_me):
        for r in ranks_of(rank, t):
            in_rank[t, r] = True
    per_expert_global = torch.zeros(s.num_experts, dtype=torch.int32)
    for e in inp.topk_idx[rank].flatten().tolist():
        if e >= 0:
            per_expert_global[e] += 1
    return Expected(
        rows,
        recv_x,
        recv_x8,
        recv_sc,
        recv_idx,
        recv_w,
        per_expert,
        in_rank.sum(0).to(torch.int32),
        per_expert_global,
        in_rank,
    )


def expected_combine(
    s: Scenario, inp: Inputs, rank: int, num_ranks: int, bias: Optional[list[torch.Tensor]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What combine returns on `rank` when every rank r multiplies its received rows by (r + 1) and sends back
    its received weights: x[t] * sum of (r + 1) over ranks r holding t (+ bias); weights of local experts kept."""
    experts_per_rank = s.num_experts // num_ranks
    x = inp.x[rank].float()
    scale = torch.zeros(s.num_tokens[rank], 1)
    for t in range(s.num_tokens[rank]):
        for r in {int(e) // experts_per_rank for e in inp.topk_idx[rank][t].tolist() if e >= 0}:
            scale[t] += r + 1
    out = x * scale
    for b in bias or []:
        out = out + b.float()
    weights = torch.where(inp.topk_idx[rank] >= 0, inp.topk_weights[rank], torch.zeros_like(inp.topk_weights[rank]))
    return out.to(torch.bfloat16), weights


@dataclasses.dataclass
class ExpectedDispatch:
    """What dispatch must give on one rank (docs/semantics.md), every tensor on the inputs' device. Row-indexed
    tensors have M rows (no padding); `pad_rows` adds the padding of `num_worst_tokens`."""

    recv_src_rank: torch.Tensor  # [M] int64: source rank of each received row
    recv_src_idx: torch.Tensor  # [M] int32: source token index of each received row (handle entry 3)
    recv_x: torch.Tensor  # [M, hidden] bf16
    recv_x_fp8: torch.Tensor  # [M, hidden] float8_e4m3fn
    recv_scales: torch.Tensor  # [M, hidden / 128] float32
    recv_topk_idx: torch.Tensor  # [M, K] int64, localised
    recv_topk_weights: torch.Tensor  # [M, K] float32
    num_recv_tokens_per_expert: list[int]  # unaligned
    num_tokens_per_rank: torch.Tensor  # this rank's layout: [R] int32
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [N_me, R] bool (handle entry 4)
    rank_prefix_matrix: torch.Tensor  # [R, R] int32 (handle entry 0)
    channel_prefix_matrix: torch.Tensor  # [R, C] int32 (handle entry 1)
    recv_channel_prefix_matrix: torch.Tensor  # [R, C] int32 (handle entry 2)
    send_head: torch.Tensor  # [N_me, R] int32 (handle entry 5)

    @property
    def num_recv_tokens(self) -> int:
        return self.recv_src_idx.size(0)


def token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Returns: `[N, R]` bool, whether token t names at least one expert of rank r."""
    experts_per_rank = num_experts // num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, -1)  # [N, K]
    ranks = torch.arange(num_ranks, device=topk_idx.device)
    return (owner.unsqueeze(2) == ranks).any(1)


def _channel_counts(in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Returns: `[C, R]` int64, tokens to each rank in channel c = tokens [c*T, (c+1)*T), T = max(ceil(N/C), 1)."""
    num_tokens, num_ranks = in_rank.shape
    per_channel = max(-(-num_tokens // num_channels), 1)
    padded = torch.zeros(num_channels * per_channel, num_ranks, dtype=torch.int64, device=in_rank.device)
    padded[:num_tokens] = in_rank
    return padded.view(num_channels, per_channel, num_ranks).sum(1)


def expected_dispatch(s: Scenario, inp: Inputs, rank: int, num_ranks: int, num_channels: int = 1) -> ExpectedDispatch:
    """The vectorised counterpart of `expected_for_rank`, plus the handle, for a dispatch with
    `Config.num_channels == num_channels`. Returns: an `ExpectedDispatch` on the inputs' device."""
    R, me = num_ranks, rank
    experts_per_rank = s.num_experts // R
    first = me * experts_per_rank
    in_rank = [token_in_rank(inp.topk_idx[src], s.num_experts, R) for src in range(R)]
    count = torch.stack([m.sum(0, dtype=torch.int64) for m in in_rank])  # [src, dst]
    rank_prefix = count.cumsum(0)

    tokens = [m[:, me].nonzero().view(-1) for m in in_rank]  # ascending per source
    recv_src_rank = torch.cat([torch.full_like(t, src) for src, t in enumerate(tokens)])
    gathered = lambda parts: torch.cat([p[t] for p, t in zip(parts, tokens)])  # noqa: E731
    global_idx = gathered(inp.topk_idx)
    is_local = (global_idx >= first) & (global_idx < first + experts_per_rank)
    recv_topk_idx = torch.where(is_local, global_idx - first, -1)
    recv_topk_weights = torch.where(is_local, gathered(inp.topk_weights), 0.0)
    per_expert = torch.bincount(recv_topk_idx[is_local], minlength=experts_per_rank)

    mine = in_rank[me]
    topk_me = inp.topk_idx[me]
    num_tokens_per_expert = torch.bincount(topk_me[topk_me >= 0], minlength=s.num_experts).to(torch.int32)
    counts_me = _channel_counts(mine, num_channels)  # [C, R]
    # Source s's channel c starts at row rpm[s-1][me] plus s's tokens to me in channels < c.
    recv_channel_prefix = []
    for src in range(R):
        to_me = _channel_counts(in_rank[src], num_channels)[:, me]  # [C]
        recv_channel_prefix.append(rank_prefix[src, me] - count[src, me] + to_me.cumsum(0) - to_me)
    # Token t's row on rank r: rows r got from lower ranks, plus t's place among my tokens for r.
    base = count[:me].sum(0)  # [R]
    position = mine.to(torch.int64).cumsum(0) - 1 + base
    send_head = torch.where(mine, position, -1)
    return ExpectedDispatch(
        recv_src_rank=recv_src_rank,
        recv_src_idx=torch.cat(tokens).to(torch.int32),
        recv_x=gathered(inp.x),
        # NOTES: FP8 rows move as bytes, so no indexing kernel needs float8 support.
        recv_x_fp8=gathered([t.view(torch.uint8) for t in inp.x_fp8]).view(torch.float8_e4m3fn),
        recv_scales=gathered(inp.scales),
        recv_topk_idx=recv_topk_idx,
        recv_topk_weights=recv_topk_weights,
        num_recv_tokens_per_expert=per_expert.tolist(),
        num_tokens_per_rank=mine.sum(0, dtype=torch.int32),
        num_tokens_per_expert=num_tokens_per_expert,
        is_token_in_rank=mine,
        rank_prefix_matrix=rank_prefix.to(torch.int32),
        channel_prefix_matrix=counts_me.cumsum(0).t().contiguous().to(torch.int32),
        recv_channel_prefix_matrix=torch.stack(recv_channel_prefix).to(torch.int32),
        send_head=send_head.to(torch.int32),
    )


def pad_rows(t: torch.Tensor, num_rows: int, fill: float | int = 0) -> torch.Tensor:
    """Returns: `t` with rows of `fill` appended up to `num_rows` rows (`t` itself if it has that many)."""
    if t.size(0) >= num_rows:
        return t
    out = t.new_zeros((num_rows, *t.shape[1:]))
    out[: t.size(0)] = t
    if fill != 0:
        out[t.size(0) :] = fill
    return out


def expected_combine_fast(
    s: Scenario,
    inp: Inputs,
    rank: int,
    num_ranks: int,
    bias: Optional[list[torch.Tensor]] = None,
    factors: Optional[list[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectorised counterpart of `expected_combine`, in the contract's order, so it holds bitwise for any data:
    each rank r sends back `(recv_x.float() * factors[r]).to(torch.bfloat16)` (default factor r + 1) and its
    received weights unchanged. Returns: (combined_x `[N, hidden]` bf16, combined_topk_weights `[N, K]` float32),
    on the inputs' device."""
    factors = [r + 1 for r in range(num_ranks)] if factors is None else factors
    x = inp.x[rank]
    in_rank = token_in_rank(inp.topk_idx[rank], s.num_experts, num_ranks)
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for b in bias or []:
        acc = acc + b.float()
    for r in range(num_ranks):
        row = (x.float() * factors[r]).to(torch.bfloat16).float()
        acc = torch.where(in_rank[:, r : r + 1], acc + row, acc)
    weights = inp.topk_weights[rank]
    return acc.to(torch.bfloat16), torch.where(inp.topk_idx[rank] >= 0, weights, torch.zeros_like(weights))


def align(count: int, alignment: int) -> int:
    return (count + alignment - 1) // alignment * alignment


def to_device(inp: Inputs, device: torch.device) -> Inputs:
    """Returns: the same inputs on `device`."""
    return Inputs(*[[t.to(device) for t in getattr(inp, f.name)] for f in dataclasses.fields(Inputs)])


def cpu(obj):
    """Returns: `obj` with every tensor (inside tuples/lists too) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(cpu(o) for o in obj)
    return obj


def layout_kwargs(buffer, topk_idx: torch.Tensor, num_experts: int) -> dict:
    """Returns: `buffer.get_dispatch_layout`'s outputs as dispatch's keyword arguments."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def dispatch_routed(buffer, x, inp: Inputs, rank: int, num_experts: int, **kwargs):
    """Layout, then dispatch of `x` with `rank`'s routing and weights. Returns: dispatch's outputs."""
    layout = layout_kwargs(buffer, inp.topk_idx[rank], num_experts)
    return buffer.dispatch(x, **layout, topk_idx=inp.topk_idx[rank], topk_weights=inp.topk_weights[rank], **kwargs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Returns: `t` reinterpreted as integers of its element size, so -0.0 differs from +0.0 and NaN equals NaN."""
    if t.dtype == torch.bool:
        return t
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int)


def check(what: str, got: Any, want: torch.Tensor) -> None:
    """Asserts `got` equals `want` bit for bit, with the same dtype, shape and device; the message names `what`
    and the first element that differs."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)}, expected {list(want.shape)}"
    assert got.device == want.device, f"{what}: on {got.device}, expected {want.device}"
    a, b = _bits(got), _bits(want)
    if not torch.equal(a, b):
        differ = (a != b).nonzero()
        first = tuple(differ[0].tolist())
        show = lambda t: t[first].float().item() if t.is_floating_point() else t[first].item()  # noqa: E731
        raise AssertionError(
            f"{what}: {differ.size(0)} of {a.numel()} elements differ; first at {list(first)}: got {show(got)}, "
            f"expected {show(want)}"
        )
