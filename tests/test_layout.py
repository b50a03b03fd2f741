"""get_dispatch_layout: the CUDA kernel against expectations computed from the routing, and bitwise against the
reference (integers, so any correct kernel matches exactly). CPU tests check the reference path."""

from __future__ import annotations

import pytest
import torch

import hybrid_ep

from distributed import requires_gpus

CASES = [
    # (num_tokens, num_topk, num_experts, num_ranks, num_ranks_per_domain, routing)
    (0, 8, 256, 4, 4, "uniform"),
    (1, 1, 4, 4, 4, "uniform"),
    (4096, 8, 256, 4, 4, "uniform"),
    (4096, 8, 256, 8, 4, "holes"),
    (1000, 6, 64, 2, 2, "nowhere"),
    (777, 32, 1024, 16, 8, "holes"),
    (300, 4, 8, 8, 8, "duplicates"),
    (513, 8, 1 << 16, 64, 8, "uniform"),  # per-expert counters too large for shared memory
    (2048, 3, 96, 3, 3, "skewed"),
]


def make_topk(num_tokens: int, num_topk: int, num_experts: int, routing: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if routing == "skewed":
        scores[:, : num_experts // 3] += 1
    if routing == "duplicates":
        return torch.randint(-1, num_experts, (num_tokens, num_topk), generator=g)
    idx = scores.topk(num_topk, dim=1).indices
    if routing == "holes":
        idx[torch.rand(num_tokens, num_topk, generator=g) < 0.25] = -1
    if routing == "nowhere":
        idx[torch.rand(num_tokens, generator=g) < 0.5] = -1
    return idx.to(torch.int64).contiguous()


def expected(topk: torch.Tensor, num_experts: int, num_ranks: int, per_domain: int):
    """Straight from the definitions, one token at a time."""
    experts_per_rank = num_experts // num_ranks
    n = topk.size(0)
    in_rank = torch.zeros(n, num_ranks, dtype=torch.bool)
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    per_domain_count = torch.zeros(num_ranks // per_domain, dtype=torch.int32)
    for t, row in enumerate(topk.tolist()):
        ranks = {e // experts_per_rank for e in row if e >= 0}
        for e in row:
            if e >= 0:
                per_expert[e] += 1
        for r in ranks:
            in_rank[t, r] = True
        for d in {r // per_domain for r in ranks}:
            per_domain_count[d] += 1
    return in_rank.sum(0, dtype=torch.int32), per_domain_count, per_expert, in_rank


@pytest.mark.parametrize("case", CASES[:7], ids=lambda c: f"{c[0]}x{c[1]}-E{c[2]}-R{c[3]}-{c[5]}")
def test_reference_layout_matches_definition(case) -> None:
    n, k, e, r, p, routing = case
    topk = make_topk(n, k, e, routing)
    got = hybrid_ep.reference.get_dispatch_layout(topk, e, r, p)
    want = expected(topk, e, r, p)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert (got[1] is None) == (p == r)
    if p < r:
        assert torch.equal(got[1], want[1])


@requires_gpus(1)
@pytest.mark.skipif(not hybrid_ep.has_extension(), reason="hybrid_ep._C is not built")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-E{c[2]}-R{c[3]}-{c[5]}")
def test_layout_kernel_bitwise_equal(case) -> None:
    from hybrid_ep import _C

    n, k, e, r, p, routing = case
    topk = make_topk(n, k, e, routing, seed=n + k)
    got = _C.get_dispatch_layout(topk.cuda(), e, r, p)
    ref = hybrid_ep.reference.get_dispatch_layout(topk.cuda(), e, r, p)
    for name, a, b in zip(
        ("num_tokens_per_rank", "num_tokens_per_domain", "num_tokens_per_expert", "is_token_in_rank"), got, ref
    ):
        if b is None:
            assert a is None, name
            continue
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    if n <= 1000:
        want = expected(topk, e, r, p)
        assert torch.equal(got[3].cpu(), want[3]) and torch.equal(got[2].cpu(), want[2])


@requires_gpus(1)
@pytest.mark.skipif(not hybrid_ep.has_extension(), reason="hybrid_ep._C is not built")
def test_layout_kernel_rejects_bad_inputs() -> None:
    from hybrid_ep import _C

    topk = make_topk(64, 4, 32, "uniform").cuda()
    bad = [
        ((topk.int(), 32, 4, 4), "topk_idx"),
        ((topk.cpu(), 32, 4, 4), "topk_idx"),
        ((topk.t(), 32, 4, 4), "topk_idx"),
        ((topk, 30, 4, 4), "num_experts"),
        ((topk, 32, 4, 3), "num_ranks_per_domain"),
        ((torch.zeros(4, 33, dtype=torch.int64, device="cuda"), 64, 4, 4), "num_topk|topk_idx"),
    ]
    for args, name in bad:
        with pytest.raises(RuntimeError, match=name):
            _C.get_dispatch_layout(*args)
    # Still fine afterwards.
    assert int(_C.get_dispatch_layout(topk, 32, 4, 4)[0].sum()) > 0
