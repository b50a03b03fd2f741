"""Seeded routing scenarios and the results they must give, computed here from the global routing.

Every rank builds the inputs of ALL ranks from the same seed, so each rank knows what it must receive without any
collective, and without calling hybrid_ep.reference (tests never check the reference against itself).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

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
    # "avoid_last_rank": no token selects an expert of the last rank; "dup_free_one_rank": every token on rank 0.
    routing: str = "uniform"
    fp8: bool = False


@dataclasses.dataclass
class Inputs:
    x: list[torch.Tensor]  # per rank: [N_r, hidden] bf16 (small integers, exact under sums)
    x_fp8: list[torch.Tensor]  # per rank: [N_r, hidden] float8_e4m3fn
    scales: list[torch.Tensor]  # per rank: [N_r, hidden / 128] float32
    topk_idx: list[torch.Tensor]  # per rank: [N_r, K] int64
    topk_weights: list[torch.Tensor]  # per rank: [N_r, K] float32 (exact in binary)


def make_inputs(s: Scenario, num_ranks: int) -> Inputs:
    g = torch.Generator().manual_seed(s.seed)
    xs, x8s, scs, idxs, ws = [], [], [], [], []
    for r in range(num_ranks):
        n = s.num_tokens[r]
        xs.append(torch.randint(-8, 9, (n, s.hidden), generator=g).to(torch.bfloat16))
        x8s.append(torch.randint(-16, 17, (n, s.hidden), generator=g).to(torch.float32).to(torch.float8_e4m3fn))
        scs.append(torch.randint(1, 64, (n, max(s.hidden // 128, 1)), generator=g).to(torch.float32) / 16)
        scores = torch.rand(n, s.num_experts, generator=g)
        experts_per_rank = s.num_experts // num_ranks
        if s.routing == "avoid_last_rank":
            scores[:, s.num_experts - experts_per_rank :] = -1.0
        if s.routing == "one_rank":
            scores[:, experts_per_rank:] = -1.0
        k = s.num_topk
        topk = scores.topk(k, dim=1).indices.to(torch.int64)
        if s.routing in ("avoid_last_rank", "one_rank"):
            picked = torch.gather(scores, 1, topk)
            topk = torch.where(picked < 0, torch.full_like(topk, -1), topk)
        if s.routing == "holes":
            holes = torch.rand(n, k, generator=g) < 0.3
            topk = torch.where(holes, torch.full_like(topk, -1), topk)
        if s.routing == "nowhere":
            nowhere = torch.rand(n, generator=g) < 0.4
            topk[nowhere] = -1
        idxs.append(topk.contiguous())
        ws.append((torch.randint(1, 16, (n, k), generator=g).to(torch.float32) / 8).contiguous())
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
