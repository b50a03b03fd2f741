"""`hybrid_ep.HybridEPBuffer` (NVIDIA Hybrid-EP's API over `hybrid_ep.Buffer`) on 2-3 gloo ranks and 2-4 GPUs.

The checks follow Hybrid-EP's own test: dispatched tokens, the local columns of the dispatched probs and the
scales bitwise; combine of `dispatched * (local experts of the row)`, which gives back each token times its number
of experts; combined probs bitwise equal to the input probs; the expert-major padded layout of
`dispatch_with_permute` bitwise, and `combine_with_unpermute`. On top: the non-blocking path with exact, larger and
smaller `num_permuted_tokens`, FP8 rows, cached handles, -1 entries, repeated experts, rejected inputs, and the
non-blocking permuted step captured in a CUDA graph and replayed with new routing.

Expected results come from the seeded inputs of every rank (tests/cases.py), so no collective is needed for them.
Tokens are small integers and weights exact binary fractions: every sum is exact, so combines compare bitwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import pytest
import torch

import hybrid_ep

from cases import Inputs, Scenario, align, expected_dispatch, make_inputs, to_device
from distributed import ProcessGroupInfo, gpu_counts, parallel_launch, requires_gpus

PADS = (1, 32)


def scenario(num_ranks: int) -> Scenario:
    """6 experts per rank, top-4 with about 30% of the entries -1, 256 channels (2 FP8 scales per row)."""
    return Scenario(
        "hybrid_ep_buffer",
        [13 + 5 * r for r in range(num_ranks)],
        hidden=256,
        num_experts=6 * num_ranks,
        num_topk=4,
        seed=7,
        routing="holes",
    )


def make_buffer(pg: ProcessGroupInfo, s: Scenario, **kwargs) -> hybrid_ep.HybridEPBuffer:
    return hybrid_ep.HybridEPBuffer(
        pg.group,
        hidden_dim=s.hidden,
        max_num_of_tokens_per_rank=max(s.num_tokens),
        num_local_experts=s.num_experts // pg.world_size,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Expected results, from the inputs of every rank


@dataclasses.dataclass
class Want:
    """What one rank receives, in receive order (source rank, then source token)."""

    src_rank: list[int]
    src_idx: list[int]
    x: torch.Tensor  # [M, H] bf16
    x_fp8: torch.Tensor  # [M, H] uint8
    scales: torch.Tensor  # [M, H / 128] float32
    local_map: torch.Tensor  # [M, L] bool
    local_probs: torch.Tensor  # [M, L] float32

    @property
    def num_rows(self) -> int:
        return len(self.src_idx)


def want_dispatch(s: Scenario, host: Inputs, rank: int, num_ranks: int) -> Want:
    exp = expected_dispatch(s, host, rank, num_ranks)
    L = s.num_experts // num_ranks
    M = exp.num_recv_tokens
    local_map = torch.zeros(M, L, dtype=torch.bool)
    local_probs = torch.zeros(M, L)
    for i in range(M):
        for k in range(s.num_topk):
            j = int(exp.recv_topk_idx[i, k])
            if j >= 0:
                local_map[i, j] = True
                local_probs[i, j] = exp.recv_topk_weights[i, k]
    return Want(
        exp.recv_src_rank.tolist(),
        exp.recv_src_idx.tolist(),
        exp.recv_x,
        exp.recv_x_fp8.view(torch.uint8),
        exp.recv_scales,
        local_map,
        local_probs,
    )


def want_layout(want: Want, pad: int, num_rows: Optional[int] = None) -> tuple[list, list[int]]:
    """Returns: (the permuted rows, each `(received row, local expert)` or None for a zero row, cut or extended to
    num_rows; the padded block size of each local expert)."""
    order: list = []
    per_expert = []
    for j in range(want.local_map.size(1)):
        block = [(i, j) for i in range(want.num_rows) if want.local_map[i, j]]
        per_expert.append(align(len(block), pad))
        order += block + [None] * (per_expert[-1] - len(block))
    if num_rows is not None:
        order = order[:num_rows] + [None] * max(0, num_rows - len(order))
    return order, per_expert


def permuted(want: Want, order: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns: the permuted (tokens bf16, FP8 bytes, scales, probs) for `order`."""
    rows = [e[0] if e is not None else None for e in order]

    def pick(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((len(order), *t.shape[1:]), dtype=t.dtype)
        for p, i in enumerate(rows):
            if i is not None:
                out[p] = t[i]
        return out

    probs = torch.zeros(len(order))
    for p, e in enumerate(order):
        if e is not None:
            probs[p] = want.local_probs[e[0], e[1]]
    return pick(want.x), pick(want.x_fp8), pick(want.scales), probs


def want_combine(
    s: Scenario, host: Inputs, wants: list[Want], rank: int, pad: int = 1, num_rows: Optional[list[int]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """combined_token and combined_probs on `rank` when every rank r sends back each received row once per local
    expert copy it kept (copies past num_rows[r] are dropped): each token times its kept copies, and the weights
    of the kept (token, expert) pairs."""
    R = len(wants)
    L = s.num_experts // R
    n = s.num_tokens[rank]
    copies = torch.zeros(n, 1)
    probs = torch.zeros(n, s.num_experts)
    for r, want in enumerate(wants):
        order, _ = want_layout(want, pad, num_rows[r] if num_rows is not None else None)
        for e in order:
            if e is not None and want.src_rank[e[0]] == rank:
                t = want.src_idx[e[0]]
                copies[t] += 1
                probs[t, r * L + e[1]] = want.local_probs[e[0], e[1]]
    return (host.x[rank].float() * copies).to(torch.bfloat16), probs


def dense_routing(s: Scenario, host: Inputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns: (routing_map [N, E] bool, probs [N, E] float32) of `rank`'s top-k routing."""
    idx, w = host.topk_idx[rank], host.topk_weights[rank]
    routing_map = torch.zeros(idx.size(0), s.num_experts, dtype=torch.bool)
    probs = torch.zeros(idx.size(0), s.num_experts)
    for t in range(idx.size(0)):
        for k in range(idx.size(1)):
            e = int(idx[t, k])
            if e >= 0:
                routing_map[t, e] = True
                probs[t, e] = w[t, k]
    return routing_map, probs


# ---------------------------------------------------------------------------------------------------------------
# Workers


def run_checks(pg: ProcessGroupInfo) -> None:
    R, me, dev = pg.world_size, pg.rank, pg.device
    s = scenario(R)
    host = make_inputs(s, R)
    inp = to_device(host, dev)
    wants = [want_dispatch(s, host, r, R) for r in range(R)]
    want = wants[me]
    L, E, M = s.num_experts // R, s.num_experts, wants[me].num_rows
    host_map, host_probs = dense_routing(s, host, me)
    routing_map, probs = host_map.to(dev), host_probs.to(dev)
    x, topk_idx, topk_weights = inp.x[me], inp.topk_idx[me], inp.topk_weights[me]
    want_x, want_probs = want_combine(s, host, wants, me)

    buffer = make_buffer(pg, s)
    P, local_rank = buffer.num_of_hybrid_ep_ranks_per_nvlink_domain, buffer.local_rank
    assert (buffer.rank, buffer.group_size, buffer.num_of_experts) == (me, R, E)
    assert R % P == 0 and local_rank == me % P and buffer.node_rank == me // P and buffer.num_of_nodes == R // P

    def check_probs(dispatched_probs: torch.Tensor) -> None:
        assert dispatched_probs.shape == (M, L * P) and dispatched_probs.dtype == torch.float32
        local = slice(local_rank * L, (local_rank + 1) * L)
        assert torch.equal(dispatched_probs[:, local].cpu(), want.local_probs)
        others = torch.ones(L * P, dtype=torch.bool)
        others[local] = False
        assert not bool(dispatched_probs[:, others.to(dev)].any())

    # Plain dispatch and combine: top-k form with and without weights, routing map with and without probs.
    routings = {
        "topk": dict(topk_idx=topk_idx, topk_weights=topk_weights, num_of_experts=E),
        "topk_probs": dict(topk_idx=topk_idx, probs=probs, num_of_experts=E),
        "topk_unweighted": dict(topk_idx=topk_idx, num_of_experts=E),
        "routing_map": dict(routing_map=routing_map, probs=probs),
        "routing_map_unweighted": dict(routing_map=routing_map),
    }
    handle = None
    for name, routing in routings.items():
        weighted = "unweighted" not in name
        token, dispatched_probs, scales, handle = buffer.dispatch(hidden=x, **routing)
        assert token.dtype == torch.bfloat16 and torch.equal(token.cpu(), want.x), name
        assert scales is None
        if weighted:
            check_probs(dispatched_probs)
        else:
            assert dispatched_probs is None, name
        assert torch.equal(handle.local_expert_routing_map.cpu(), want.local_map), name
        assert handle.num_dispatched_tokens_tensor.tolist() == [M], name
        assert torch.equal(handle.tokens_per_expert.cpu(), want.local_map.sum(0, dtype=torch.int32)), name
        back = (token.float() * handle.local_expert_routing_map.sum(1, keepdim=True)).to(torch.bfloat16)
        combined, combined_probs = buffer.combine(back, probs=dispatched_probs, handle=handle)
        assert torch.equal(combined.cpu(), want_x), name
        # As Hybrid-EP's test checks it: combined / top-k gives back the tokens where no entry is -1.
        full = (topk_idx >= 0).all(1)
        expected = x.float()[full] * s.num_topk
        assert torch.allclose(combined.float()[full], expected, atol=2e-5, rtol=1e-2), name
        if weighted:
            assert torch.equal(combined_probs.cpu(), host_probs), name
        else:
            assert combined_probs is None, name

    # Cached dispatch: the handle's routing; the weights given now travel too.
    assert handle is not None
    token, dispatched_probs, _, cached = buffer.dispatch(hidden=x, probs=probs, handle=handle)
    assert torch.equal(token.cpu(), want.x)
    check_probs(dispatched_probs)
    token, dispatched_probs, _, _ = buffer.dispatch(hidden=x, handle=cached)
    assert torch.equal(token.cpu(), want.x) and dispatched_probs is None

    # A repeated expert counts once, with its first weight.
    repeated = topk_idx.clone()
    repeated_w = topk_weights.clone()
    keep = repeated[:, 0] >= 0
    repeated[:, 1] = torch.where(keep, repeated[:, 0], repeated[:, 1])
    repeated_w[:, 1] = torch.where(keep, repeated_w[:, 0] + 1, repeated_w[:, 1])
    single = torch.where(keep.unsqueeze(1) & (torch.arange(s.num_topk, device=dev) == 1), -1, repeated)
    got = buffer.dispatch(hidden=x, topk_idx=repeated, topk_weights=repeated_w, num_of_experts=E)
    ref = buffer.dispatch(hidden=x, topk_idx=single, topk_weights=repeated_w, num_of_experts=E)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])

    # dispatch_with_permute / combine_with_unpermute, blocking, exact size.
    for pad in PADS:
        order, per_expert = want_layout(want, pad)
        want_tokens, _, _, want_pprobs = permuted(want, order)
        for name, routing in (("topk", routings["topk"]), ("routing_map", routings["routing_map"])):
            fused = pad == 32
            token, pprobs, scales, tokens_per_expert, handle = buffer.dispatch_with_permute(
                hidden=x, pad_multiple=pad, fuse_permute_dispatch=fused, num_of_experts_per_rank=L, **routing
            )
            assert torch.equal(token.cpu(), want_tokens), (name, pad)
            assert torch.equal(pprobs.cpu(), want_pprobs), (name, pad)
            assert scales is None
            assert tokens_per_expert.device.type == "cpu" and tokens_per_expert.dtype == torch.int64
            assert tokens_per_expert.tolist() == per_expert, (name, pad)
            assert handle.num_permuted_tokens == len(order) and int(handle.overflow_flag[0]) == 0
            combined, combined_probs = buffer.combine_with_unpermute(
                hidden=token, probs=pprobs, handle=handle, pad_multiple=pad, fuse_unpermute_combine=fused
            )
            assert torch.equal(combined.cpu(), want_x), (name, pad)
            assert torch.equal(combined_probs.cpu(), host_probs), (name, pad)
            if buffer.buffer.runtime is not None:
                # The unpermuted rows and their weights went into the output arena: the combine pulled.
                assert buffer.buffer.runtime.last_combine_pulled(), (name, pad)
            # Cached: the handle's routing, size and counts; the weights given now.
            token, pprobs, _, tokens_per_expert, _ = buffer.dispatch_with_permute(
                hidden=x, topk_weights=topk_weights if name == "topk" else None, handle=handle
            )
            assert torch.equal(token.cpu(), want_tokens) and tokens_per_expert.tolist() == per_expert, (name, pad)
            assert (pprobs is None) == (name != "topk"), (name, pad)

    # Non-blocking: fixed-size outputs; exact, larger (zero tail) and smaller (overflow) num_permuted_tokens.
    larger = None
    for pad in PADS:
        exacts = [len(want_layout(w, pad)[0]) for w in wants]
        exact = exacts[me]
        for size in (lambda n: n, lambda n: n + 2 * pad, lambda n: max(n - 2 * pad, 0), lambda n: 0):
            num_rows = size(exact)
            order, per_expert = want_layout(want, pad, num_rows)
            want_tokens, _, _, want_pprobs = permuted(want, order)
            token, pprobs, _, tokens_per_expert, handle = buffer.dispatch_with_permute(
                hidden=x,
                routing_map=routing_map,
                probs=probs,
                pad_multiple=pad,
                num_permuted_tokens=num_rows,
                non_blocking=True,
            )
            case = (pad, num_rows, exact)
            assert token.shape == (num_rows, s.hidden) and torch.equal(token.cpu(), want_tokens), case
            assert torch.equal(pprobs.cpu(), want_pprobs), case
            assert tokens_per_expert.device == token.device and tokens_per_expert.tolist() == per_expert, case
            assert int(handle.overflow_flag[0]) == int(num_rows < exact), case
            assert handle.num_dispatched_tokens_tensor.device == token.device
            assert int(handle.num_dispatched_tokens_tensor[0]) == M, case
            assert handle.recv_topk_idx.size(0) == max(s.num_tokens) * R, case
            combined, combined_probs = buffer.combine_with_unpermute(hidden=token, probs=pprobs, handle=handle)
            # Each rank drops the copies its own num_permuted_tokens does not fit.
            drop_x, drop_probs = want_combine(s, host, wants, me, pad, [size(n) for n in exacts])
            assert torch.equal(combined.cpu(), drop_x), case
            assert torch.equal(combined_probs.cpu(), drop_probs), case
            if num_rows > exact:
                larger = handle

    # Cached, non-blocking: num_permuted_tokens and pad_multiple from the handle.
    token, pprobs, _, _, again = buffer.dispatch_with_permute(hidden=x, probs=probs, handle=larger, non_blocking=True)
    assert again.num_permuted_tokens == larger.num_permuted_tokens and again.config.pad_multiple == PADS[-1]
    # The same routing and size: the layout is reused, not rebuilt.
    assert again.dense_to_expert_map is larger.dense_to_expert_map
    order, _ = want_layout(want, PADS[-1], larger.num_permuted_tokens)
    want_tokens, _, _, want_pprobs = permuted(want, order)
    assert torch.equal(token.cpu(), want_tokens) and torch.equal(pprobs.cpu(), want_pprobs)
    # The cached call's handle holds the same layout: unpermuting through it gives what the first one gives.
    combined, combined_probs = buffer.combine_with_unpermute(hidden=token, probs=pprobs, handle=again)
    want_combined, want_combined_probs = buffer.combine_with_unpermute(hidden=token, probs=pprobs, handle=larger)
    assert torch.equal(combined, want_combined) and torch.equal(combined_probs, want_combined_probs)

    # FP8 through the BF16 buffer's permuted form (use_fp8 per call).
    x8, scales_in = inp.x_fp8[me].view(torch.uint8), inp.scales[me]
    order, per_expert = want_layout(want, 32)
    _, want_x8, want_scales, _ = permuted(want, order)
    token, _, scales, _, _ = buffer.dispatch_with_permute(
        hidden=x8, scaling_factor=scales_in, use_fp8=True, routing_map=routing_map, pad_multiple=32
    )
    assert token.dtype == torch.uint8 and torch.equal(token.cpu(), want_x8) and torch.equal(scales.cpu(), want_scales)
    buffer.destroy()

    # FP8 buffer: 1-byte rows of either dtype with float32 scales.
    fp8_buffer = make_buffer(pg, s, use_fp8=True)
    for dtype in (torch.uint8, torch.float8_e4m3fn):
        hidden = inp.x_fp8[me].view(dtype)
        token, dispatched_probs, scales, handle = fp8_buffer.dispatch(
            hidden=hidden, scaling_factor=scales_in, topk_idx=topk_idx, topk_weights=topk_weights, num_of_experts=E
        )
        assert token.dtype == dtype and torch.equal(token.view(torch.uint8).cpu(), want.x_fp8), dtype
        assert torch.equal(scales.cpu(), want.scales), dtype
        check_probs(dispatched_probs)
        token, _, scales, _ = fp8_buffer.dispatch(hidden=hidden, scaling_factor=scales_in, handle=handle)
        assert torch.equal(token.view(torch.uint8).cpu(), want.x_fp8) and torch.equal(scales.cpu(), want.scales)
    fp8_buffer.destroy()


def run_rejections(pg: ProcessGroupInfo) -> None:
    """Every rejected input raises naming the argument, before any collective; the buffer works afterwards."""
    R, me, dev = pg.world_size, pg.rank, pg.device
    s = scenario(R)
    host = make_inputs(s, R)
    inp = to_device(host, dev)
    wants = [want_dispatch(s, host, r, R) for r in range(R)]
    L, E, H = s.num_experts // R, s.num_experts, s.hidden
    host_map, host_probs = dense_routing(s, host, me)
    routing_map, probs = host_map.to(dev), host_probs.to(dev)
    x, topk_idx, topk_weights = inp.x[me], inp.topk_idx[me], inp.topk_weights[me]
    good = dict(hidden=x, topk_idx=topk_idx, topk_weights=topk_weights, num_of_experts=E)
    group = pg.group
    buffer = make_buffer(pg, s)
    fp8_buffer = make_buffer(pg, s, use_fp8=True)
    token, dispatched_probs, _, handle = buffer.dispatch(**good)
    back = (token.float() * handle.local_expert_routing_map.sum(1, keepdim=True)).to(torch.bfloat16)
    ptoken, pprobs, _, _, phandle = buffer.dispatch_with_permute(
        routing_map=routing_map, probs=probs, hidden=x, pad_multiple=32
    )
    N = x.size(0)
    too_many = torch.zeros(max(s.num_tokens) + 1, H, dtype=torch.bfloat16, device=dev)
    crowded = routing_map.clone()
    crowded[0, :9] = True

    def new(**kwargs):
        args = dict(group=group, hidden_dim=H, max_num_of_tokens_per_rank=64, num_local_experts=L)
        args.update(kwargs)
        return hybrid_ep.HybridEPBuffer(**args)

    bad = [
        ("group", lambda: new(group=None)),
        ("hidden_dim", lambda: new(hidden_dim=0)),
        ("hidden_dim", lambda: new(hidden_dim=100)),
        ("hidden_dim", lambda: new(hidden_dim=64, use_fp8=True)),
        ("max_num_of_tokens_per_rank", lambda: new(max_num_of_tokens_per_rank=0)),
        ("num_local_experts", lambda: new(num_local_experts="2")),
        ("use_fp8", lambda: new(use_fp8=1)),
        ("num_sms_dispatch_api", lambda: new(num_sms_dispatch_api=3)),
        ("num_sms_combine_api", lambda: new(num_sms_combine_api=0)),
        ("num_sms_preprocessing_api", lambda: new(num_sms_preprocessing_api=0)),
        ("num_blocks_permute", lambda: new(num_blocks_permute=-1)),
        ("num_blocks_unpermute", lambda: new(num_blocks_unpermute=1.5)),
        ("load_cached_kernels", lambda: new(load_cached_kernels=None)),
        ("use_shared_buffer", lambda: new(use_shared_buffer=1)),
        ("enable_custom_allgather", lambda: new(enable_custom_allgather="no")),
        ("num_of_hybrid_ep_ranks_per_nvlink_domain", lambda: new(num_of_hybrid_ep_ranks_per_nvlink_domain=0)),
        ("use_mnnvl", lambda: new(use_mnnvl="yes")),
        # dispatch
        ("hidden", lambda: buffer.dispatch(hidden=x.float(), topk_idx=topk_idx, num_of_experts=E)),
        ("hidden", lambda: buffer.dispatch(hidden=torch.cat([x, x], 1), topk_idx=topk_idx, num_of_experts=E)),
        ("hidden", lambda: buffer.dispatch(hidden=too_many, routing_map=routing_map)),
        ("hidden", lambda: buffer.dispatch(hidden=x.t(), routing_map=routing_map)),
        ("routing_map", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx, routing_map=routing_map)),
        ("topk_idx", lambda: buffer.dispatch(hidden=x)),
        ("num_of_experts", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx)),
        ("num_of_experts", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx, num_of_experts=E + R)),
        ("num_of_experts", lambda: buffer.dispatch(hidden=x, routing_map=routing_map, num_of_experts=E - 1)),
        ("topk_idx", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx.int(), num_of_experts=E)),
        ("topk_idx", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx[:-1], num_of_experts=E)),
        ("topk_idx", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx + E, num_of_experts=E)),
        ("topk_weights", lambda: buffer.dispatch(hidden=x, topk_idx=topk_idx, topk_weights=probs, num_of_experts=E)),
        ("probs", lambda: buffer.dispatch(**good, probs=probs)),
        ("probs", lambda: buffer.dispatch(hidden=x, routing_map=routing_map, probs=topk_weights)),
        ("topk_weights", lambda: buffer.dispatch(hidden=x, routing_map=routing_map, topk_weights=topk_weights)),
        ("routing_map", lambda: buffer.dispatch(hidden=x, routing_map=crowded)),
        ("routing_map", lambda: buffer.dispatch(hidden=x, routing_map=routing_map.int())),
        ("routing_map", lambda: buffer.dispatch(hidden=x, routing_map=routing_map[:, :-1])),
        ("handle", lambda: buffer.dispatch(hidden=x, handle=(1, 2))),
        ("hidden", lambda: buffer.dispatch(hidden=x[:-1], handle=handle)),
        ("probs", lambda: buffer.dispatch(hidden=x, handle=handle, probs=probs[:, :-1])),
        ("num_dispatched_tokens", lambda: buffer.dispatch(**good, num_dispatched_tokens=-1)),
        ("num_dispatched_tokens_tensor", lambda: buffer.dispatch(**good, num_dispatched_tokens_tensor=3)),
        ("hidden", lambda: fp8_buffer.dispatch(**good)),
        (
            "scaling_factor",
            lambda: fp8_buffer.dispatch(hidden=inp.x_fp8[me].view(torch.uint8), routing_map=routing_map),
        ),
        (
            "scaling_factor",
            lambda: fp8_buffer.dispatch(
                hidden=inp.x_fp8[me], scaling_factor=inp.scales[me].double(), routing_map=routing_map
            ),
        ),
        # combine
        ("handle", lambda: buffer.combine(back)),
        ("handle", lambda: buffer.combine(back, handle=handle[:4])),
        ("hidden", lambda: buffer.combine(back[:-1], handle=handle)),
        ("hidden", lambda: buffer.combine(back.float(), handle=handle)),
        ("probs", lambda: buffer.combine(back, probs=dispatched_probs[:, :-1], handle=handle)),
        ("probs", lambda: buffer.combine(back, probs=dispatched_probs.double(), handle=handle)),
        # dispatch_with_permute
        ("num_permuted_tokens", lambda: buffer.dispatch_with_permute(**good, non_blocking=True)),
        ("num_permuted_tokens", lambda: buffer.dispatch_with_permute(**good, pad_multiple=32, num_permuted_tokens=33)),
        ("num_permuted_tokens", lambda: buffer.dispatch_with_permute(**good, num_permuted_tokens=-1)),
        ("pad_multiple", lambda: buffer.dispatch_with_permute(**good, pad_multiple=-1)),
        ("num_of_experts_per_rank", lambda: buffer.dispatch_with_permute(**good, num_of_experts_per_rank=L + 1)),
        ("use_fp8", lambda: buffer.dispatch_with_permute(**good, use_fp8="no")),
        ("hidden", lambda: buffer.dispatch_with_permute(**good, use_fp8=True)),
        ("non_blocking", lambda: buffer.dispatch_with_permute(**good, non_blocking=1)),
        ("fuse_permute_dispatch", lambda: buffer.dispatch_with_permute(**good, fuse_permute_dispatch=None)),
        ("use_host_meta", lambda: buffer.dispatch_with_permute(**good, use_host_meta="x")),
        # combine_with_unpermute
        ("handle", lambda: buffer.combine_with_unpermute(hidden=back, handle=handle)),
        ("handle", lambda: buffer.combine_with_unpermute(hidden=ptoken)),
        ("pad_multiple", lambda: buffer.combine_with_unpermute(hidden=ptoken, handle=phandle, pad_multiple=16)),
        ("hidden", lambda: buffer.combine_with_unpermute(hidden=ptoken[:-1], handle=phandle)),
        ("probs", lambda: buffer.combine_with_unpermute(hidden=ptoken, probs=pprobs[:-1], handle=phandle)),
        (
            "fuse_unpermute_combine",
            lambda: buffer.combine_with_unpermute(hidden=ptoken, handle=phandle, fuse_unpermute_combine=0),
        ),  # fmt: skip
        # update_template_config
        ("num_local_experts", lambda: buffer.update_template_config(num_local_experts=L + 1)),
        ("hidden_dim", lambda: buffer.update_template_config(hidden_dim=H + 8)),
        ("num_of_tokens_per_rank", lambda: buffer.update_template_config(num_of_tokens_per_rank=10**6)),
        ("num_of_sms", lambda: buffer.update_template_config(num_of_sms=3)),
    ]
    if dev.type == "cuda":
        bad.append(("hidden", lambda: buffer.dispatch(hidden=x.cpu(), routing_map=routing_map)))
    for name, call in bad:
        with pytest.raises((ValueError, TypeError)) as error:
            call()
        assert name in str(error.value), (name, str(error.value))

    # The buffers still work: a full round trip on each.
    want_x, want_probs = want_combine(s, host, wants, me)
    token, dispatched_probs, _, handle = buffer.dispatch(**good)
    assert torch.equal(token.cpu(), wants[me].x)
    back = (token.float() * handle.local_expert_routing_map.sum(1, keepdim=True)).to(torch.bfloat16)
    combined, combined_probs = buffer.combine(back, probs=dispatched_probs, handle=handle)
    assert torch.equal(combined.cpu(), want_x) and torch.equal(combined_probs.cpu(), host_probs)
    token, _, scales, _ = fp8_buffer.dispatch(
        hidden=inp.x_fp8[me], scaling_factor=inp.scales[me], routing_map=routing_map
    )
    assert torch.equal(token.view(torch.uint8).cpu(), wants[me].x_fp8) and torch.equal(scales.cpu(), wants[me].scales)

    config = buffer.update_template_config(num_of_tokens_per_rank=N, pad_multiple=32, use_fp8=True)
    assert (config.num_of_tokens_per_rank, config.pad_multiple, config.use_fp8) == (N, 32, True)
    assert config.dispatch_config == buffer.dispatch_fp8_config and config.num_of_experts == E

    buffer.destroy()
    fp8_buffer.destroy()
    buffer.destroy()  # a second destroy does nothing
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.dispatch(**good)


def run_no_host_sync(pg: ProcessGroupInfo) -> None:
    """On the NVLink kernels, `dispatch_with_permute(non_blocking=True)` and `combine_with_unpermute` make no
    synchronising PyTorch call (torch.cuda sync debug mode "error"), with the Buffer's value checks off."""
    from hybrid_ep.bench import uses_kernels

    if not uses_kernels(pg.device):
        return
    R, me, dev = pg.world_size, pg.rank, pg.device
    s = scenario(R)
    host = make_inputs(s, R)
    inp = to_device(host, dev)
    host_map, host_probs = dense_routing(s, host, me)
    routing_map, probs = host_map.to(dev), host_probs.to(dev)
    buffer = make_buffer(pg, s)
    want = want_dispatch(s, host, me, R)
    num_rows = 256
    order, _ = want_layout(want, 32, num_rows)
    want_tokens, _, _, want_pprobs = permuted(want, order)
    args = dict(hidden=inp.x[me], routing_map=routing_map, probs=probs, pad_multiple=32, num_permuted_tokens=num_rows)
    os.environ["HYBRID_EP_CHECK_INPUTS"] = "0"
    buffer.dispatch_with_permute(**args, non_blocking=True)  # warm-up: allocator, streams
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token, pprobs, _, tokens_per_expert, handle = buffer.dispatch_with_permute(**args, non_blocking=True)
        combined, combined_probs = buffer.combine_with_unpermute(hidden=token, probs=pprobs, handle=handle)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del os.environ["HYBRID_EP_CHECK_INPUTS"]
    assert torch.equal(token.cpu(), want_tokens) and torch.equal(pprobs.cpu(), want_pprobs)
    assert int(handle.overflow_flag[0]) == 0
    buffer.destroy()


def run_graph_replay(pg: ProcessGroupInfo, num_replays: int) -> None:
    """`dispatch_with_permute(non_blocking=True)` + an expert function + `combine_with_unpermute`, captured once in
    a CUDA graph without a handle and replayed with new routing, probs and tokens written into the captured inputs;
    every replay's permuted tokens, probs and combined tokens bitwise as expected."""
    from hybrid_ep.bench import uses_kernels

    if not uses_kernels(pg.device):
        return
    R, me, dev = pg.world_size, pg.rank, pg.device
    base = scenario(R)
    buffer = make_buffer(pg, base)
    num_rows = 256  # permuted rows: more than any rank receives times its experts here, a multiple of 32
    host = make_inputs(base, R)
    host_map, host_probs = dense_routing(base, host, me)
    static = dict(hidden=host.x[me].to(dev), routing_map=host_map.to(dev), probs=host_probs.to(dev))

    def step() -> tuple:
        token, pprobs, _, _, handle = buffer.dispatch_with_permute(
            **static, pad_multiple=32, num_permuted_tokens=num_rows, non_blocking=True
        )
        combined, combined_probs = buffer.combine_with_unpermute(hidden=token, probs=pprobs, handle=handle)
        return token, pprobs, handle.overflow_flag, combined, combined_probs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token, pprobs, overflow_flag, combined, combined_probs = step()
    for i in range(num_replays):
        s = dataclasses.replace(base, seed=base.seed + 1 + i)
        host = make_inputs(s, R)
        host_map, host_probs = dense_routing(s, host, me)
        for name, value in (("hidden", host.x[me]), ("routing_map", host_map), ("probs", host_probs)):
            static[name].copy_(value)
        graph.replay()
        wants = [want_dispatch(s, host, r, R) for r in range(R)]
        order, _ = want_layout(wants[me], 32, num_rows)
        want_tokens, _, _, want_pprobs = permuted(wants[me], order)
        want_x, want_probs = want_combine(s, host, wants, me, pad=32, num_rows=[num_rows] * R)
        where = f"[replay {i}, rank {me} of {R}]"
        assert torch.equal(token.cpu(), want_tokens), f"{where} permuted tokens"
        assert torch.equal(pprobs.cpu(), want_pprobs), f"{where} permuted probs"
        assert int(overflow_flag[0]) == 0, f"{where} overflow_flag"
        assert torch.equal(combined.cpu(), want_x), f"{where} combined tokens"
        assert torch.equal(combined_probs.cpu(), want_probs), f"{where} combined probs"
    del graph
    buffer.destroy()


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("world_size", [2, 3])
def test_hybrid_ep_buffer(world_size: int) -> None:
    parallel_launch(world_size, run_checks)


def test_rejected_inputs_leave_the_buffer_usable() -> None:
    parallel_launch(2, run_rejections)


@pytest.mark.parametrize("world_size", gpu_counts(2, 4))
def test_hybrid_ep_buffer_nccl(world_size: int) -> None:
    parallel_launch(world_size, run_checks, backend="nccl")


@requires_gpus(2)
def test_rejected_inputs_nccl() -> None:
    parallel_launch(2, run_rejections, backend="nccl")


@requires_gpus(2)
def test_non_blocking_makes_no_host_sync() -> None:
    parallel_launch(2, run_no_host_sync, backend="nccl")


@pytest.mark.parametrize("world_size", gpu_counts(2, 4))
def test_graph_replay_of_permuted_step(world_size: int) -> None:
    parallel_launch(world_size, run_graph_replay, 20, backend="nccl")
