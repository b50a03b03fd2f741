"""Pure-PyTorch reference of DeepEP v1 normal-mode layout, dispatch and combine, over any torch.distributed group.

It runs on the CPU over gloo and on GPUs over NCCL, and it is the semantics the kernels are held to (bitwise; see
docs/semantics.md). Every rank calls each collective function with its own tensors, as with the kernels.

Routing: `topk_idx [num_tokens, num_topk]` int64 names global experts, -1 for none. Rank r owns experts
[r * L, (r + 1) * L) with L = num_experts / num_ranks. A token goes to a rank once, however many of that rank's
experts it selected.

Dispatch order: the rows a rank receives are ordered by source rank, then by token index on the source.

Combine order (fixed, so results are bitwise reproducible): for token t, in fp32,
    acc = bias_0[t] (or 0) + bias_1[t] (or 0), then acc += x_r[row of t on rank r] for r = 0, 1, ..., num_ranks-1
over the ranks that received t, then one rounding to bfloat16. Weights are summed the same way, starting from 0.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from . import checks
from .config import NUM_MAX_TOPK

# (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head)
Handle = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_domain: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Counts where tokens go. Local to the rank: no communication.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` torch.int64, entries in [-1, num_experts).
        num_experts: global number of experts, divisible by `num_ranks`.
        num_ranks: ranks of the group.
        num_ranks_per_domain: ranks per NVLink domain; None (or `num_ranks`) means one domain.
    Returns:
        num_tokens_per_rank: `[num_ranks]` torch.int32, tokens with at least one expert on each rank.
        num_tokens_per_domain: `[num_ranks / num_ranks_per_domain]` torch.int32 (tokens with at least one expert in
            each domain), or None for a single domain.
        num_tokens_per_expert: `[num_experts]` torch.int32, (token, k) entries naming each expert.
        is_token_in_rank: `[num_tokens, num_ranks]` torch.bool.
    """
    checks.check_int("num_ranks", num_ranks, 1)
    checks.check_num_experts(num_experts, num_ranks)
    checks.check_topk_idx(topk_idx, num_experts=num_experts)
    return layout_unchecked(topk_idx, num_experts, num_ranks, _check_domain(num_ranks, num_ranks_per_domain))


def layout_unchecked(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_domain: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`get_dispatch_layout` for arguments the caller has already checked (Buffer checks once for both backends)."""
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks

    valid = topk_idx >= 0
    num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    # Column num_ranks collects the -1 entries and is dropped.
    rank_idx = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    is_token_in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    is_token_in_rank.scatter_(1, rank_idx, True)
    is_token_in_rank = is_token_in_rank[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)

    num_tokens_per_domain = None
    if num_ranks_per_domain < num_ranks:
        num_domains = num_ranks // num_ranks_per_domain
        in_domain = is_token_in_rank.view(num_tokens, num_domains, num_ranks_per_domain).any(2)
        num_tokens_per_domain = in_domain.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_domain, num_tokens_per_expert, is_token_in_rank


def dispatch(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    group: dist.ProcessGroup,
    handle: Optional[Handle] = None,
    num_tokens_per_rank: Optional[torch.Tensor] = None,
    is_token_in_rank: Optional[torch.Tensor] = None,
    num_tokens_per_expert: Optional[torch.Tensor] = None,
    topk_idx: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    num_channels: int = 1,
) -> tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]], Optional[Handle]]:
    """Sends each token to every rank that holds one of its experts. Collective over `group`.

    Arguments:
        x: `[num_tokens, hidden]` torch.bfloat16, or `(x [num_tokens, hidden] torch.float8_e4m3fn,
            scales [num_tokens, hidden / 128] torch.float32)` with any strides for scales.
        group: the process group (gloo for CPU tensors, NCCL for CUDA tensors).
        handle: the handle of an earlier dispatch with the same routing (cached mode): the layout arguments are
            then ignored and topk_idx/topk_weights must be None.
        num_tokens_per_rank: `[num_ranks]` torch.int32, from `get_dispatch_layout`.
        is_token_in_rank: `[num_tokens, num_ranks]` torch.bool, from `get_dispatch_layout`.
        num_tokens_per_expert: `[num_experts]` torch.int32, from `get_dispatch_layout`.
        topk_idx: `[num_tokens, num_topk]` torch.int64 or None; given together with `topk_weights`.
        topk_weights: `[num_tokens, num_topk]` torch.float32 or None.
        expert_alignment: each entry of `num_recv_tokens_per_expert_list` is rounded up to a multiple of this.
        num_worst_tokens: if > 0, outputs have exactly this many rows (the real ones first, then padding:
            zeros, with `recv_topk_idx` -1) and the per-expert list is empty.
        num_channels: channels of the handle's channel prefix matrices (`Config.num_sms // 2`).
    Returns:
        recv_x: like `x`, with `num_recv_tokens` rows ordered by source rank, then source token index.
        recv_topk_idx: `[num_recv_tokens, num_topk]` torch.int64: local expert indices, -1 where the expert is on
            another rank; None without top-k or in cached mode.
        recv_topk_weights: `[num_recv_tokens, num_topk]` torch.float32, 0 where `recv_topk_idx` is -1; None likewise.
        num_recv_tokens_per_expert_list: list of `num_experts / num_ranks` ints (aligned); [] with num_worst_tokens;
            None in cached mode.
        handle: the 6-tuple that combine and cached dispatch take; None in cached mode.
    """
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    data, scales = checks.split_dispatch_x(x)
    num_tokens, device = data.size(0), data.device
    checks.check_int("expert_alignment", expert_alignment, 1)
    checks.check_int("num_worst_tokens", num_worst_tokens, 0)
    checks.check_int("num_channels", num_channels, 1)

    if handle is not None:
        if topk_idx is not None or topk_weights is not None:
            raise ValueError("dispatch with a handle (cached mode) takes no topk_idx/topk_weights")
        rank_prefix_matrix, _, _, cached_src_idx, is_token_in_rank, _ = _check_handle(handle, num_tokens, num_ranks)
        count_matrix = _counts_from_prefix(rank_prefix_matrix)
        num_out_rows = max(cached_src_idx.size(0), num_worst_tokens)
        recv_rows, _ = _exchange_rows(
            _pack(data, scales, None, None, None), is_token_in_rank, count_matrix, rank, group
        )
        recv_x = _unpack_x(recv_rows, data, scales, num_out_rows)
        return recv_x, None, None, None, None

    num_experts = checks.check_dispatch_routing(
        num_tokens=num_tokens,
        num_ranks=num_ranks,
        device=device,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
    assert num_tokens_per_expert is not None and is_token_in_rank is not None

    # Exchange per-destination counts, per-expert counts and per-channel prefixes in one all-gather.
    send_counts = is_token_in_rank.sum(0, dtype=torch.int64)
    channel_prefix_matrix = _channel_prefix(is_token_in_rank, num_channels)  # [num_ranks, num_channels]
    # The last entry is num_worst_tokens, so every rank can tell whether any rank's outputs would overflow and all
    # raise together instead of leaving peers waiting in the exchange.
    worst = torch.tensor([num_worst_tokens], dtype=torch.int64, device=device)
    meta = torch.cat(
        [send_counts, num_tokens_per_expert.to(torch.int64), channel_prefix_matrix.flatten().to(device), worst]
    )
    gathered = _all_gather(meta, group).cpu()  # [num_ranks, num_ranks + num_experts + num_ranks * num_channels]
    count_matrix = gathered[:, :num_ranks]  # [src, dst]
    experts_per_rank = num_experts // num_ranks
    expert_counts = gathered[:, num_ranks + rank * experts_per_rank : num_ranks + (rank + 1) * experts_per_rank]
    src_channel_prefix = gathered[:, num_ranks + num_experts : -1].view(num_ranks, num_ranks, num_channels)[:, rank]

    rank_prefix_matrix = count_matrix.cumsum(0)
    num_recv_tokens = int(rank_prefix_matrix[-1, rank])
    recv_per_rank, worst_per_rank = count_matrix.sum(0).tolist(), gathered[:, -1].tolist()
    for r in range(num_ranks):
        if 0 < worst_per_rank[r] < recv_per_rank[r]:
            raise ValueError(
                f"num_worst_tokens={worst_per_rank[r]} on rank {r} is smaller than the {recv_per_rank[r]} tokens "
                "that rank receives"
            )
    num_out_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv_tokens

    src_idx = torch.arange(num_tokens, dtype=torch.int32, device=device).unsqueeze(1)
    packed = _pack(data, scales, topk_idx, topk_weights, src_idx)
    recv_rows, _ = _exchange_rows(packed, is_token_in_rank, count_matrix, rank, group)
    recv_x = _unpack_x(recv_rows, data, scales, num_out_rows)

    offset = data.size(1) * data.element_size() + (scales.size(1) * 4 if scales is not None else 0)
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        num_topk = topk_idx.size(1)
        global_idx = _columns(recv_rows, offset, num_topk * 8, torch.int64)
        weights = _columns(recv_rows, offset + num_topk * 8, num_topk * 4, torch.float32)
        first = rank * experts_per_rank
        is_local = (global_idx >= first) & (global_idx < first + experts_per_rank)
        recv_topk_idx = torch.full((num_out_rows, num_topk), -1, dtype=torch.int64, device=device)
        recv_topk_weights = torch.zeros((num_out_rows, num_topk), dtype=torch.float32, device=device)
        recv_topk_idx[:num_recv_tokens] = torch.where(is_local, global_idx - first, -1)
        recv_topk_weights[:num_recv_tokens] = torch.where(is_local, weights, 0.0)
        offset += num_topk * 12
    recv_src_idx = torch.full((num_out_rows,), -1, dtype=torch.int32, device=device)
    recv_src_idx[:num_recv_tokens] = _columns(recv_rows, offset, 4, torch.int32).view(-1)

    if num_worst_tokens > 0:
        num_recv_tokens_per_expert_list: list[int] = []
    else:
        counts = expert_counts.sum(0).tolist()
        num_recv_tokens_per_expert_list = [
            (c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts
        ]

    # Receiver side: where each source's channel starts among this rank's rows.
    rank_start = (rank_prefix_matrix[:, rank] - count_matrix[:, rank]).unsqueeze(1)
    channel_start = torch.cat([torch.zeros(num_ranks, 1, dtype=torch.int64), src_channel_prefix[:, :-1]], dim=1)
    channel_prefix_matrix = channel_prefix_matrix.to(torch.int32)
    recv_channel_prefix_matrix = rank_start + channel_start
    send_head = _send_head(is_token_in_rank, count_matrix, rank)
    out_handle = (
        rank_prefix_matrix.to(torch.int32).to(device),
        channel_prefix_matrix,
        recv_channel_prefix_matrix.to(torch.int32).to(device),
        recv_src_idx,
        is_token_in_rank,
        send_head,
    )
    return recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, out_handle


def combine(
    x: torch.Tensor,
    handle: Handle,
    *,
    group: dist.ProcessGroup,
    topk_weights: Optional[torch.Tensor] = None,
    bias: torch.Tensor | tuple[Optional[torch.Tensor], Optional[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sends each received row back to its source rank and sums the copies of each token. Collective over `group`.

    Arguments:
        x: `[num_recv_tokens, hidden]` torch.bfloat16, rows in the order dispatch returned them (padding rows of a
            num_worst_tokens dispatch are ignored).
        handle: the handle dispatch returned.
        topk_weights: `[num_recv_tokens, num_topk]` torch.float32 or None; summed like x.
        bias: None, a tensor, or a pair of tensors (either may be None), each `[num_tokens, hidden]` of x's dtype,
            added once per token.
    Returns:
        combined_x: `[num_tokens, hidden]` torch.bfloat16, in the order of the module docstring.
        combined_topk_weights: `[num_tokens, num_topk]` torch.float32, or None without topk_weights.
    """
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    checks.check_combine_x(x)
    rank_prefix_matrix, _, _, recv_src_idx, is_token_in_rank, _ = _check_handle(handle, None, num_ranks)
    num_rows, hidden, device = x.size(0), x.size(1), x.device
    if num_rows != recv_src_idx.size(0):
        raise ValueError(f"x must have as many rows as the dispatch returned ({recv_src_idx.size(0)}), got {num_rows}")
    if is_token_in_rank.device != device:
        raise ValueError(f"x must be on {is_token_in_rank.device} like the handle, got {device}")
    if topk_weights is not None:
        checks.check_tensor(
            "topk_weights", topk_weights, dtype=torch.float32, shape=(num_rows, None), device=device, contiguous=True
        )
        if not 1 <= topk_weights.size(1) <= NUM_MAX_TOPK:
            raise ValueError(f"topk_weights must have 1 to {NUM_MAX_TOPK} columns (top-k), got {topk_weights.size(1)}")
    num_tokens = is_token_in_rank.size(0)
    biases = _split_bias(bias, num_tokens, hidden, x.dtype, device)

    count_matrix = _counts_from_prefix(rank_prefix_matrix)
    num_recv_tokens = int(count_matrix[:, rank].sum())
    parts = [_as_bytes(x[:num_recv_tokens])]
    if topk_weights is not None:
        parts.append(_as_bytes(topk_weights[:num_recv_tokens]))
    packed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    # The reverse exchange: rows go back to their sources; each source gets its tokens in ascending order per rank.
    back_rows, token_lists = _exchange_rows_back(packed, is_token_in_rank, count_matrix, rank, group)

    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for b in biases:
        acc += b.float()
    acc_weights = None
    if topk_weights is not None:
        acc_weights = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=device)
    row_bytes = hidden * 2
    for r in range(num_ranks):
        rows, tokens = back_rows[r], token_lists[r]
        if tokens.numel() == 0:
            continue
        acc[tokens] += _columns(rows, 0, row_bytes, torch.bfloat16).float()
        if acc_weights is not None:
            acc_weights[tokens] += _columns(rows, row_bytes, acc_weights.size(1) * 4, torch.float32)
    return acc.to(torch.bfloat16), acc_weights


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _check_domain(num_ranks: int, num_ranks_per_domain: Optional[int]) -> int:
    if num_ranks_per_domain is None:
        return num_ranks
    checks.check_int("num_ranks_per_domain", num_ranks_per_domain, 1)
    if num_ranks % num_ranks_per_domain != 0:
        raise ValueError(f"num_ranks={num_ranks} must be divisible by num_ranks_per_domain={num_ranks_per_domain}")
    return num_ranks_per_domain


def _check_handle(handle: Any, num_tokens: Optional[int], num_ranks: int) -> Handle:
    if not isinstance(handle, tuple) or len(handle) != 6:
        raise ValueError(f"handle must be the 6-tuple returned by dispatch, got {checks.describe(handle)}")
    rank_prefix_matrix, _, _, recv_src_idx, is_token_in_rank, _ = handle
    checks.check_tensor(
        "handle[0] (rank_prefix_matrix)", rank_prefix_matrix, dtype=torch.int32, shape=(num_ranks, num_ranks)
    )
    checks.check_tensor("handle[3] (recv_src_idx)", recv_src_idx, dtype=torch.int32, dim=1)
    checks.check_tensor("handle[4] (is_token_in_rank)", is_token_in_rank, dtype=torch.bool, shape=(None, num_ranks))
    if num_tokens is not None and is_token_in_rank.size(0) != num_tokens:
        raise ValueError(f"x has {num_tokens} tokens but the handle was made for {is_token_in_rank.size(0)} tokens")
    return handle


def _counts_from_prefix(rank_prefix_matrix: torch.Tensor) -> torch.Tensor:
    prefix = rank_prefix_matrix.to(torch.int64).cpu()
    return torch.cat([prefix[:1], prefix[1:] - prefix[:-1]], dim=0)


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    num_ranks = dist.get_world_size(group)
    if num_ranks == 1:
        return t.unsqueeze(0).clone()
    out = [torch.empty_like(t) for _ in range(num_ranks)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _pack(
    data: torch.Tensor,
    scales: Optional[torch.Tensor],
    topk_idx: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    src_idx: Optional[torch.Tensor],
) -> torch.Tensor:
    """Returns: `[num_tokens, row_bytes]` torch.uint8, the columns of one token side by side."""
    parts = [_as_bytes(t) for t in (data, scales, topk_idx, topk_weights, src_idx) if t is not None]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Returns: `[rows, row_bytes]` torch.uint8 over a fresh row-major copy of the 2-D tensor `t`.
    NOTES: a copy, because a size-1 dimension may carry any stride (0 seen after a device copy), which `view` to
    another element size rejects although the tensor counts as contiguous."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out.view(torch.uint8)


def _columns(rows: torch.Tensor, offset: int, num_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    # A fresh copy: a one-row slice counts as contiguous but keeps a stride that `view` cannot reinterpret.
    out = torch.empty((rows.size(0), num_bytes), dtype=torch.uint8, device=rows.device)
    out.copy_(rows[:, offset : offset + num_bytes])
    return out.view(dtype)


def _unpack_x(recv_rows: torch.Tensor, data: torch.Tensor, scales: Optional[torch.Tensor], num_out_rows: int) -> Any:
    num_recv, hidden, device = recv_rows.size(0), data.size(1), data.device
    x_bytes = hidden * data.element_size()
    recv_data = torch.zeros(num_out_rows, hidden, dtype=data.dtype, device=device)
    recv_data[:num_recv] = _columns(recv_rows, 0, x_bytes, data.dtype)
    if scales is None:
        return recv_data
    num_scales = scales.size(1)
    recv_scales = torch.zeros(num_out_rows, num_scales, dtype=torch.float32, device=device)
    recv_scales[:num_recv] = _columns(recv_rows, x_bytes, num_scales * 4, torch.float32)
    return recv_data, recv_scales


def _exchange_rows(
    packed: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    count_matrix: torch.Tensor,
    rank: int,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, list[int]]:
    """Sends row t of `packed` to every rank r with is_token_in_rank[t, r], ascending t per destination.
    Returns: (received rows ordered by source rank then source order, per-source counts)."""
    dst_idx, token_idx = is_token_in_rank.t().nonzero(as_tuple=True)
    send = packed[token_idx].contiguous()
    send_counts = count_matrix[rank].tolist()
    recv_counts = count_matrix[:, rank].tolist()
    recv = _all_to_all(send, send_counts, recv_counts, group)
    return recv, recv_counts


def _exchange_rows_back(
    packed: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    count_matrix: torch.Tensor,
    rank: int,
    group: dist.ProcessGroup,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The reverse of `_exchange_rows`. Returns: per rank r, (rows r sent back, the local token index of each)."""
    send_counts = count_matrix[:, rank].tolist()
    recv_counts = count_matrix[rank].tolist()
    recv = _all_to_all(packed.contiguous(), send_counts, recv_counts, group)
    rows = list(recv.split(recv_counts, dim=0))
    tokens = [is_token_in_rank[:, r].nonzero().view(-1) for r in range(len(recv_counts))]
    return rows, tokens


def _all_to_all(
    send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    recv = torch.empty((sum(recv_counts), send.size(1)), dtype=send.dtype, device=send.device)
    if dist.get_world_size(group) == 1:
        recv.copy_(send)
        return recv
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return recv


def _channel_prefix(is_token_in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Returns: `[num_ranks, num_channels]` int64: tokens to each rank in channels 0..c (inclusive).
    Channel c covers tokens [c * ceil(N / C), (c + 1) * ceil(N / C))."""
    num_tokens, num_ranks = is_token_in_rank.shape
    per_channel = max((num_tokens + num_channels - 1) // num_channels, 1)
    channel_of_token = torch.arange(num_tokens, device=is_token_in_rank.device) // per_channel
    counts = torch.zeros(num_channels, num_ranks, dtype=torch.int64, device=is_token_in_rank.device)
    counts.index_add_(0, channel_of_token, is_token_in_rank.to(torch.int64))
    return counts.cumsum(0).t().contiguous()


def _send_head(is_token_in_rank: torch.Tensor, count_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Returns: `[num_tokens, num_ranks]` int32: the row of token t among rank r's received rows, or -1."""
    base = (count_matrix[:rank].sum(0)).to(is_token_in_rank.device)  # rows rank r received from lower ranks
    position = is_token_in_rank.to(torch.int32).cumsum(0, dtype=torch.int32) - 1
    head = position + base.to(torch.int32).unsqueeze(0)
    return torch.where(is_token_in_rank, head, torch.full_like(head, -1))


def _split_bias(
    bias: Any, num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    if bias is None:
        return []
    items = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if len(items) > 2:
        raise ValueError(f"bias must be a tensor or a pair of tensors, got {len(items)} items")
    out = []
    for i, b in enumerate(items):
        if b is None:
            continue
        name = "bias" if not isinstance(bias, (tuple, list)) else f"bias[{i}]"
        out.append(checks.check_tensor(name, b, dtype=dtype, shape=(num_tokens, hidden), device=device))
    return out
