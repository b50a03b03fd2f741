"""`HybridEPBuffer`: NVIDIA Hybrid-EP's buffer API, built on `hybrid_ep.Buffer`.

Hybrid-EP sizes its buffer by model shape (hidden size, tokens per rank, local experts) and takes routing as a
routing map or top-k indices; it can also hand out rows grouped by local expert (`dispatch_with_permute`), ready
for a grouped GEMM. Here every call runs through one `Buffer` (DeepEP's v1 API) that the HybridEPBuffer owns:
routing becomes top-k form, `Buffer.get_dispatch_layout` and `Buffer.dispatch` move the rows, `Buffer.combine`
brings them back, and the expert-major permutation runs on the current stream: its index arithmetic as PyTorch
operations, its row moves as two kernels of the extension (PyTorch operations on CPUs).

Backends are the Buffer's: over an NCCL group with the compiled extension, the NVLink kernels (the NVLink buffer is
sized from the hidden size and the SM counts); over gloo, or a group that spans several NVLink domains, the
reference (`hybrid_ep.reference`).

Shapes: N tokens on the calling rank, H hidden, E = L * R experts, L local experts per rank, R ranks, P ranks per
NVLink domain, M rows this rank receives. docs/semantics.md §9 holds the contract; docs/compat.md lists what
differs from Hybrid-EP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _ext, checks, tuned
from .buffer import Buffer, nvl_ranks_for_buffer
from .config import Config

# Most experts one token may select through `routing_map`: the width of the top-k form it becomes.
NUM_MAX_ROUTING_MAP_EXPERTS = 8


@dataclasses.dataclass
class HybridEpConfigInstance:
    """What one call of a HybridEPBuffer runs with. Plain data: changing a returned instance changes nothing.

    Arguments:
        hidden_dim: hidden size of the call's rows.
        max_num_of_tokens_per_rank: most tokens any rank dispatches (the buffer's).
        num_of_tokens_per_rank: tokens the calling rank dispatches (N).
        num_local_experts: experts per rank (L).
        num_of_experts: global experts (E = L * R).
        pad_multiple: expert blocks of `dispatch_with_permute` are padded to a multiple of this (1: no padding).
        use_fp8: whether rows are 1-byte FP8 with float32 scales.
        fuse_permute_dispatch: as asked; the permutation always runs after the dispatch here.
        dispatch_config: the `Config` (SMs, chunk and ring sizes) of `Buffer.dispatch`.
        combine_config: the `Config` of `Buffer.combine`.
    """

    hidden_dim: int
    max_num_of_tokens_per_rank: int
    num_of_tokens_per_rank: int
    num_local_experts: int
    num_of_experts: int
    pad_multiple: int
    use_fp8: bool
    fuse_permute_dispatch: bool
    dispatch_config: Config
    combine_config: Config


class HybridEPHandle(NamedTuple):
    """What `combine`, `combine_with_unpermute` and cached dispatches need from a dispatch. One layout serves both
    dispatch forms; the entries at positions 3, 4, 7, 8, 9 and 10 mean what they mean in Hybrid-EP's 11-tuple
    (3 and 4 in its 7-tuple too). `rows` below is the row count of `dispatched_token` of the plain form: M in
    blocking mode, `max_num_of_tokens_per_rank * group_size` after `non_blocking=True` (the valid rows first).

    Entries:
        buffer_handle: the `Buffer.dispatch` handle (docs/semantics.md §3).
        topk_idx: `[N, K]` torch.int64, the routing of this rank's tokens in top-k form: global expert ids, each
            at most once per row, -1 elsewhere.
        recv_topk_idx: `[rows, K]` torch.int64, local expert ids of each received row, -1 elsewhere (all -1 on
            padding rows).
        num_dispatched_tokens_tensor: `[1]` torch.int32, M: a CPU tensor in blocking mode, on the device after
            `non_blocking=True`; a cached dispatch passes on its handle's.
        local_expert_routing_map: `[rows, L]` torch.bool, row m goes to local expert j.
        permuted_row_source: `[num_permuted_tokens]` torch.int64, `m * L + j` for the permuted row that holds row m
            for local expert j, -1 on padding rows; None for the plain form.
        dense_to_expert_map: `[rows, L]` torch.int64, the permuted row of (m, j), -1 where row m does not go to
            expert j or its copy was dropped (overflow); None for the plain form.
        tokens_per_expert: `[L]` torch.int32 on the device, rows per local expert before padding.
        num_of_tokens_per_rank: N.
        config: the `HybridEpConfigInstance` of the dispatch.
        overflow_flag: `[1]` torch.int32 on the device: 1 when the permuted layout needed more rows than
            `num_permuted_tokens` (the excess was dropped), else 0; 0 for the plain form.
        num_permuted_tokens: rows of the permuted tensors; None for the plain form.
        padded_tokens_per_expert: `[L]` torch.int64, rows per expert block after padding, as returned (on the CPU
            in blocking mode, on the device with non_blocking); None for the plain form.
    """

    buffer_handle: tuple
    topk_idx: torch.Tensor
    recv_topk_idx: torch.Tensor
    num_dispatched_tokens_tensor: torch.Tensor
    local_expert_routing_map: torch.Tensor
    permuted_row_source: Optional[torch.Tensor]
    dense_to_expert_map: Optional[torch.Tensor]
    tokens_per_expert: torch.Tensor
    num_of_tokens_per_rank: int
    config: HybridEpConfigInstance
    overflow_flag: torch.Tensor
    num_permuted_tokens: Optional[int]
    padded_tokens_per_expert: Optional[torch.Tensor]


@dataclasses.dataclass
class _Dispatched:
    """One dispatch, before the outputs take their public form."""

    data: torch.Tensor  # [rows, H], the input's dtype
    scales: Optional[torch.Tensor]  # [rows, H / 128] float32 (FP8)
    local_probs: Optional[torch.Tensor]  # [rows, L] float32: the weight of each (row, local expert)
    handle: HybridEPHandle


class HybridEPBuffer:
    """Expert-parallel dispatch and combine with NVIDIA Hybrid-EP's API, over one `hybrid_ep.Buffer`.

    Arguments:
        group: the `torch.distributed.ProcessGroup` of the expert-parallel ranks (NCCL for GPUs, gloo for CPUs).
        hidden_dim: hidden size H; calls take rows of at most this many channels. A multiple of 8 (of 128 with
            use_fp8).
        max_num_of_tokens_per_rank: most tokens any rank passes to one call. It sizes the fixed outputs of
            `dispatch_with_permute(non_blocking=True)`; a call with more tokens raises ValueError.
        num_local_experts: experts per rank, L; the global count is E = L * group_size.
        use_fp8: `dispatch` takes 1-byte rows (torch.uint8 or torch.float8_e4m3fn) with float32 scales instead of
            torch.bfloat16 rows.
        num_sms_dispatch_api: SMs of dispatch, even; None: `Buffer.num_sms`. With the chunk and ring sizes of
            `Buffer.get_dispatch_config` (tuned where a results file exists).
        num_sms_combine_api: SMs of combine, even; None: `Buffer.num_sms`.
        num_sms_preprocessing_api: int >= 1 or None; accepted, no effect (the layout kernel picks its own grid).
        num_blocks_permute: int >= 1 or None; accepted, no effect (the permutation kernels size their grids).
        num_blocks_unpermute: int >= 1 or None; accepted, no effect (likewise).
        load_cached_kernels: bool; accepted, no effect (kernels are compiled ahead of time, nothing is JIT-built).
        use_shared_buffer: bool; accepted, no effect (outputs are always fresh tensors).
        enable_custom_allgather: bool; accepted, no effect (no allgather of the routing map is needed).
        num_of_hybrid_ep_ranks_per_nvlink_domain: int >= 1 or None; accepted and ignored, as in Hybrid-EP (set
            HYBRID_EP_NUM_NVL_RANKS to override the topology).
        use_mnnvl: bool or None; accepted and ignored, as in Hybrid-EP.

    Attributes:
        group, rank, group_size: the process group, this rank, and its size.
        num_of_hybrid_ep_ranks_per_nvlink_domain: P, ranks per NVLink domain (`Buffer.num_nvl_ranks`).
        local_rank, node_rank, num_of_nodes: `rank % P`, `rank // P`, `group_size // P`.
        hidden_dim, max_num_of_tokens_per_rank, num_local_experts, num_of_experts, use_fp8: as constructed (E).
        num_sms_dispatch_api, num_sms_combine_api: the SM counts used.
        dispatch_config, dispatch_fp8_config, combine_config: the `Config` passed to each Buffer call.
        buffer: the `hybrid_ep.Buffer` underneath (created with explicitly_destroy=True; see `destroy`).
        device: the device of the tensors the calls take.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        hidden_dim: int,
        max_num_of_tokens_per_rank: int,
        num_local_experts: int,
        use_fp8: bool = False,
        num_sms_dispatch_api: Optional[int] = None,
        num_sms_combine_api: Optional[int] = None,
        num_sms_preprocessing_api: Optional[int] = None,
        num_blocks_permute: Optional[int] = None,
        num_blocks_unpermute: Optional[int] = None,
        load_cached_kernels: bool = False,
        use_shared_buffer: bool = True,
        enable_custom_allgather: bool = False,
        num_of_hybrid_ep_ranks_per_nvlink_domain: Optional[int] = None,
        use_mnnvl: Optional[bool] = None,
    ) -> None:
        if group is None:
            raise ValueError("HybridEPBuffer needs a process group: group is None")
        checks.check_int("hidden_dim", hidden_dim, 1)
        checks.check_int("max_num_of_tokens_per_rank", max_num_of_tokens_per_rank, 1)
        checks.check_int("num_local_experts", num_local_experts, 1)
        _check_bool("use_fp8", use_fp8)
        row_multiple = checks.FP8_SCALE_BLOCK if use_fp8 else 8
        if hidden_dim % row_multiple != 0:
            raise ValueError(
                f"hidden_dim={hidden_dim} must be a multiple of {row_multiple} "
                f"({'128-channel FP8 scales' if use_fp8 else '16-byte bfloat16 rows'})"
            )
        for name, value in (
            ("num_sms_dispatch_api", num_sms_dispatch_api),
            ("num_sms_combine_api", num_sms_combine_api),
        ):
            if value is not None:
                checks.check_int(name, value, 2)
                if value % 2 != 0:
                    raise ValueError(f"{name}={value} must be even (blocks work in sender/receiver pairs)")
        for name, value in (
            ("num_sms_preprocessing_api", num_sms_preprocessing_api),
            ("num_blocks_permute", num_blocks_permute),
            ("num_blocks_unpermute", num_blocks_unpermute),
            ("num_of_hybrid_ep_ranks_per_nvlink_domain", num_of_hybrid_ep_ranks_per_nvlink_domain),
        ):
            if value is not None:
                checks.check_int(name, value, 1)
        for name, value in (
            ("load_cached_kernels", load_cached_kernels),
            ("use_shared_buffer", use_shared_buffer),
            ("enable_custom_allgather", enable_custom_allgather),
        ):
            _check_bool(name, value)
        if use_mnnvl is not None:
            _check_bool("use_mnnvl", use_mnnvl)

        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.hidden_dim = hidden_dim
        self.max_num_of_tokens_per_rank = max_num_of_tokens_per_rank
        self.num_local_experts = num_local_experts
        self.num_of_experts = num_local_experts * self.group_size
        self.use_fp8 = use_fp8
        self.num_sms_preprocessing_api = num_sms_preprocessing_api
        self.num_blocks_permute = num_blocks_permute
        self.num_blocks_unpermute = num_blocks_unpermute
        self.load_cached_kernels = load_cached_kernels
        self.use_shared_buffer = use_shared_buffer
        self.enable_custom_allgather = enable_custom_allgather

        R = self.group_size
        dispatch_sms = Buffer.num_sms if num_sms_dispatch_api is None else num_sms_dispatch_api
        combine_sms = Buffer.num_sms if num_sms_combine_api is None else num_sms_combine_api
        self.dispatch_config = tuned.config_for("dispatch", R, dispatch_sms)
        self.dispatch_fp8_config = tuned.config_for("dispatch_fp8", R, dispatch_sms)
        self.combine_config = tuned.config_for("combine", R, combine_sms)
        self.num_sms_dispatch_api = dispatch_sms
        self.num_sms_combine_api = combine_sms

        backend_name = str(dist.get_backend(group)).lower()
        num_nvl_ranks = nvl_ranks_for_buffer(R, backend_name, 0)
        num_nvl_bytes = 0
        if "nccl" in backend_name and _ext.has_extension() and num_nvl_ranks == R:
            # DeepEP's recipe counts rows at BF16 width, FP8 rows included (hidden * max(element size, 2)), so one
            # row size covers both kinds; the largest hint of the three configs fits every call.
            hidden_bytes = hidden_dim * 2
            configs = (self.dispatch_config, self.dispatch_fp8_config, self.combine_config)
            num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, R) for c in configs)
        # NOTES: a group over several NVLink domains gets no NVLink buffer, so the Buffer runs the reference over
        # NCCL instead of refusing (its NVLink kernels need one domain).
        self.buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
        self.device = self.buffer.device
        P = self.buffer.num_nvl_ranks
        self.num_of_hybrid_ep_ranks_per_nvlink_domain = P
        self.local_rank = self.rank % P
        self.node_rank = self.rank // P
        self.num_of_nodes = R // P
        self._destroyed = False

    # -----------------------------------------------------------------------------------------------------------
    # Configuration and lifetime

    def update_template_config(
        self,
        hidden_dim: Optional[int] = None,
        num_of_tokens_per_rank: Optional[int] = None,
        num_local_experts: Optional[int] = None,
        pad_multiple: Optional[int] = None,
        use_fp8: Optional[bool] = None,
        fuse_permute_dispatch: bool = False,
        **kwargs: Any,
    ) -> HybridEpConfigInstance:
        """Returns the configuration a call with these arguments runs with. It changes nothing: there are no
        templates to compile or buffers to grow here, and every call builds its own configuration.

        Arguments:
            hidden_dim: at most the buffer's; None: the buffer's.
            num_of_tokens_per_rank: at most `max_num_of_tokens_per_rank`; None: that maximum.
            num_local_experts: must equal the buffer's; None: the buffer's.
            pad_multiple: int >= 0 or None (0 and None: no padding).
            use_fp8: None: the buffer's.
            fuse_permute_dispatch: recorded only.
            **kwargs: fields of `HybridEpConfigInstance` to set on the returned object (TypeError for other names).
        Returns:
            a new `HybridEpConfigInstance`.
        """
        self._check_alive()
        if hidden_dim is not None:
            checks.check_int("hidden_dim", hidden_dim, 1)
            if hidden_dim > self.hidden_dim:
                raise ValueError(
                    f"hidden_dim={hidden_dim} exceeds the buffer's hidden_dim={self.hidden_dim}; create a "
                    "HybridEPBuffer with a larger hidden_dim"
                )
        if num_of_tokens_per_rank is not None:
            self._check_num_tokens("num_of_tokens_per_rank", num_of_tokens_per_rank)
        if num_local_experts is not None:
            checks.check_int("num_local_experts", num_local_experts, 1)
            if num_local_experts != self.num_local_experts:
                raise ValueError(
                    f"num_local_experts={num_local_experts} differs from the buffer's {self.num_local_experts}"
                )
        if use_fp8 is not None:
            _check_bool("use_fp8", use_fp8)
        config = self._call_config(
            hidden_dim if hidden_dim is not None else self.hidden_dim,
            num_of_tokens_per_rank if num_of_tokens_per_rank is not None else self.max_num_of_tokens_per_rank,
            _check_pad_multiple(pad_multiple),
            self.use_fp8 if use_fp8 is None else use_fp8,
            _check_bool("fuse_permute_dispatch", fuse_permute_dispatch),
        )
        fields = {f.name for f in dataclasses.fields(HybridEpConfigInstance)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(
                f"update_template_config got unknown fields {unknown}; HybridEpConfigInstance has {sorted(fields)} "
                "(Hybrid-EP's kernel template fields do not exist here)"
            )
        for name, value in kwargs.items():
            setattr(config, name, value)
        return config

    def destroy(self) -> None:
        """Frees the Buffer underneath (its NVLink buffer included); a collective over the group. Later calls raise
        RuntimeError; a second `destroy()` does nothing."""
        if self._destroyed:
            return
        self.buffer.destroy()
        self._destroyed = True

    # -----------------------------------------------------------------------------------------------------------
    # Dispatch and combine

    def dispatch(
        self,
        hidden: torch.Tensor,
        scaling_factor: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        num_of_experts: Optional[int] = None,
        probs: Optional[torch.Tensor] = None,
        routing_map: Optional[torch.Tensor] = None,
        num_dispatched_tokens_tensor: Optional[torch.Tensor] = None,
        num_dispatched_tokens: Optional[int] = None,
        handle: Optional[HybridEPHandle] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], HybridEPHandle]:
        """Sends each token to the ranks that hold its experts, once per rank. Collective over the group.

        Routing, without a handle: `topk_idx` (with `num_of_experts`) or `routing_map`, not both. Weights, optional:
        `topk_weights` (top-k form only) or `probs` (either form).

        Arguments:
            hidden: `[N, H]`, contiguous, H <= hidden_dim: torch.bfloat16, or with use_fp8 any 1-byte dtype
                (torch.uint8, torch.float8_e4m3fn); the bytes move unchanged.
            scaling_factor: `[N, H / 128]` torch.float32, required with use_fp8, ignored without.
            topk_idx: `[N, K]` torch.int64, global expert ids, -1 for none; a repeated id counts once (its first
                weight is used). K at most 32.
            topk_weights: `[N, K]` torch.float32 or None.
            num_of_experts: E, required with topk_idx; must be num_local_experts * group_size.
            probs: `[N, E]` torch.float32 or None; the weight of token t for expert e is `probs[t, e]`.
            routing_map: `[N, E]` torch.bool, at most 8 experts per token (ValueError naming routing_map; checked
                where value checks run, docs/semantics.md §6).
            num_dispatched_tokens_tensor: accepted, no effect (a tensor or None).
            num_dispatched_tokens: accepted, no effect (an int >= 0 or None).
            handle: a handle of an earlier dispatch with the same routing on every rank: the routing arguments are
                then ignored and the rows move as that dispatch moved them (weights too, if given).
        Returns:
            dispatched_token: `[M, H]`, hidden's dtype; rows ordered by source rank, then source token index.
            dispatched_probs: `[M, L * P]` torch.float32, or None without weights: the local experts' columns
                `[local_rank * L, (local_rank + 1) * L)` hold each row's weights, every other column is 0.
            dispatched_scaling_factor: `[M, H / 128]` torch.float32 with use_fp8, else None.
            handle: a `HybridEPHandle` for combine and cached dispatches.
        """
        self._check_alive()
        _check_unused_count_args(num_dispatched_tokens_tensor, num_dispatched_tokens)
        out = self._dispatch(
            hidden, scaling_factor, self.use_fp8, topk_idx, topk_weights, num_of_experts, probs, routing_map, handle,
            pad_multiple=1, non_blocking=False, fuse_permute_dispatch=False,
        )  # fmt: skip
        dispatched_probs = None
        if out.local_probs is not None:
            L = self.num_local_experts
            dispatched_probs = torch.zeros(
                (out.data.size(0), L * self.num_of_hybrid_ep_ranks_per_nvlink_domain),
                dtype=torch.float32,
                device=out.data.device,
            )
            dispatched_probs[:, self.local_rank * L : (self.local_rank + 1) * L] = out.local_probs
        return out.data, dispatched_probs, out.scales, out.handle

    def combine(
        self, hidden: torch.Tensor, probs: Optional[torch.Tensor] = None, handle: Optional[HybridEPHandle] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Brings every row back to its source rank and sums the copies of each token, unweighted. Collective.

        Arguments:
            hidden: `[rows, H]` torch.bfloat16, contiguous, in `dispatched_token`'s row order; the caller has applied
                the expert weights and summed over its local experts.
            probs: `[rows, L * P]` torch.float32 or None (an empty tensor of another shape counts as None); only the
                local experts' columns are read.
            handle: the handle of the dispatch (required).
        Returns:
            combined_token: `[N, H]` torch.bfloat16: for each token, the sum over the ranks that received it, in
                ascending rank order, in fp32, rounded once (docs/semantics.md §4).
            combined_probs: `[N, E]` torch.float32, or None without probs: each token's weights put back at its
                experts' columns, 0 elsewhere.
        """
        self._check_alive()
        handle = self._check_handle(handle)
        rows = handle.recv_topk_idx.size(0)
        self._check_combine_hidden(hidden, rows)
        L = self.num_local_experts
        shape = (rows, L * self.num_of_hybrid_ep_ranks_per_nvlink_domain)
        if probs is not None and probs.numel() == 0 and tuple(probs.shape) != shape:
            probs = None
        local_probs = None
        if probs is not None:
            checks.check_tensor("probs", probs, dtype=torch.float32, shape=shape, device=hidden.device)
            local_probs = probs[:, self.local_rank * L : (self.local_rank + 1) * L]
        return self._combine(hidden, local_probs, handle)

    def dispatch_with_permute(
        self,
        *,
        hidden: torch.Tensor,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        num_of_experts_per_rank: Optional[int] = None,
        num_of_experts: Optional[int] = None,
        use_fp8: Optional[bool] = None,
        routing_map: Optional[torch.Tensor] = None,
        probs: Optional[torch.Tensor] = None,
        scaling_factor: Optional[torch.Tensor] = None,
        num_permuted_tokens: Optional[int] = None,
        pad_multiple: Optional[int] = None,
        handle: Optional[HybridEPHandle] = None,
        non_blocking: bool = False,
        fuse_permute_dispatch: bool = False,
        num_dispatched_tokens: Optional[int] = None,
        use_host_meta: Optional[bool] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, HybridEPHandle]:
        """Dispatch, then the received rows grouped by local expert: one row per (row, local expert) pair, expert
        0's block first, each block in dispatch order and zero-padded to a multiple of `pad_multiple`.

        Arguments:
            hidden, topk_idx, topk_weights, num_of_experts, routing_map, probs, scaling_factor, handle: as for
                `dispatch`.
            num_of_experts_per_rank: None or the buffer's num_local_experts.
            use_fp8: 1-byte rows with scales for this call; None: the buffer's use_fp8.
            num_permuted_tokens: rows of the permuted outputs, an int >= 0 and a multiple of pad_multiple; None in
                blocking mode: exactly the rows needed. Fewer than needed: the excess rows are dropped and the
                handle's overflow_flag is set; more: zero rows at the end.
            pad_multiple: int >= 0 or None (0 and None: no padding); None with a permute handle: the handle's.
            non_blocking: no host synchronisation in this class's code, for CUDA graph capture (`Buffer.dispatch`
                must skip its own host waits too): num_permuted_tokens is required (or taken from a permute handle
                of the same pad_multiple), and the dispatch runs with fixed-size outputs of
                `max_num_of_tokens_per_rank * group_size` rows.
            fuse_permute_dispatch: bool; accepted, same results (the permutation runs after the dispatch).
            num_dispatched_tokens: accepted, no effect (an int >= 0 or None).
            use_host_meta: accepted, no effect (a bool or None).
        Returns:
            dispatched_token: `[num_permuted_tokens, H]`, hidden's dtype, in the permuted layout.
            dispatched_probs: `[num_permuted_tokens]` torch.float32, the weight of each row's expert (0 on padding),
                or None without weights.
            dispatched_scaling_factor: `[num_permuted_tokens, H / 128]` torch.float32 (FP8), or None.
            tokens_per_expert: `[L]` torch.int64, the padded block sizes: on the CPU in blocking mode, on the device
                with non_blocking.
            handle: a `HybridEPHandle` with the permuted layout, for combine_with_unpermute.
        """
        self._check_alive()
        _check_unused_count_args(None, num_dispatched_tokens)
        if use_host_meta is not None:
            _check_bool("use_host_meta", use_host_meta)
        _check_bool("non_blocking", non_blocking)
        _check_bool("fuse_permute_dispatch", fuse_permute_dispatch)
        if use_fp8 is None:
            use_fp8 = self.use_fp8
        _check_bool("use_fp8", use_fp8)
        if num_of_experts_per_rank is not None:
            checks.check_int("num_of_experts_per_rank", num_of_experts_per_rank, 1)
            if num_of_experts_per_rank != self.num_local_experts:
                raise ValueError(
                    f"num_of_experts_per_rank={num_of_experts_per_rank} differs from the buffer's "
                    f"num_local_experts={self.num_local_experts}"
                )
        cached = self._check_handle(handle) if handle is not None else None
        if pad_multiple is None and cached is not None and cached.num_permuted_tokens is not None:
            pad = cached.config.pad_multiple
        else:
            pad = _check_pad_multiple(pad_multiple)
        if num_permuted_tokens is None and non_blocking and cached is not None and cached.config.pad_multiple == pad:
            num_permuted_tokens = cached.num_permuted_tokens
        if num_permuted_tokens is None:
            if non_blocking:
                raise ValueError(
                    "num_permuted_tokens is required with non_blocking=True (an int >= 0, a multiple of pad_multiple): "
                    "the output size cannot be read from the device without a host synchronisation"
                )
        else:
            checks.check_int("num_permuted_tokens", num_permuted_tokens, 0)
            if num_permuted_tokens % pad != 0:
                raise ValueError(f"num_permuted_tokens={num_permuted_tokens} must be a multiple of pad_multiple={pad}")

        out = self._dispatch(
            hidden, scaling_factor, use_fp8, topk_idx, topk_weights, num_of_experts, probs, routing_map, cached,
            pad_multiple=pad, non_blocking=non_blocking, fuse_permute_dispatch=fuse_permute_dispatch,
        )  # fmt: skip
        return self._permute(out, pad, num_permuted_tokens, non_blocking, cached)

    def combine_with_unpermute(
        self,
        *,
        hidden: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        handle: Optional[HybridEPHandle] = None,
        pad_multiple: Optional[int] = None,
        fuse_unpermute_combine: bool = False,
        num_dispatched_tokens: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Sums each row's copies over its local experts, then combines. Collective over the group.

        The copies of a row are summed unweighted in fp32 (a fixed reduction over the row's copies, taken in
        ascending local expert order, so results repeat bitwise) and rounded once to bfloat16; `combine` then sums
        over ranks. No host synchronisation.

        Arguments:
            hidden: `[num_permuted_tokens, H]` torch.bfloat16, contiguous, in the permuted layout of the handle.
            probs: `[num_permuted_tokens]` torch.float32 or None (an empty tensor of another shape counts as None).
            handle: the handle of `dispatch_with_permute` (required).
            pad_multiple: None or the handle's pad_multiple.
            fuse_unpermute_combine: bool; accepted, same results.
            num_dispatched_tokens: accepted, no effect (an int >= 0 or None).
        Returns:
            combined_token: `[N, H]` torch.bfloat16, as for `combine`.
            combined_probs: `[N, E]` torch.float32 or None, as for `combine`; weights of dropped rows (overflow) are 0.
        """
        self._check_alive()
        _check_unused_count_args(None, num_dispatched_tokens)
        _check_bool("fuse_unpermute_combine", fuse_unpermute_combine)
        handle = self._check_handle(handle)
        if handle.num_permuted_tokens is None:
            raise ValueError(
                "handle comes from dispatch, not dispatch_with_permute: it has no permuted layout (use combine)"
            )
        if pad_multiple is not None and _check_pad_multiple(pad_multiple) != handle.config.pad_multiple:
            raise ValueError(
                f"pad_multiple={pad_multiple} differs from the handle's pad_multiple={handle.config.pad_multiple}"
            )
        num_rows = handle.num_permuted_tokens
        self._check_combine_hidden(hidden, num_rows)
        if probs is not None and probs.numel() == 0 and tuple(probs.shape) != (num_rows,):
            probs = None
        if probs is not None:
            checks.check_tensor("probs", probs, dtype=torch.float32, shape=(num_rows,), device=hidden.device)

        assert handle.dense_to_expert_map is not None
        dense_to_expert = handle.dense_to_expert_map  # [rows, L]
        rows, L = dense_to_expert.shape
        H, device = hidden.size(1), hidden.device
        # Missing copies read an appended zero row (one gather, no masking pass).
        missing = dense_to_expert < 0
        local_probs = None
        if probs is not None:
            extended = torch.cat([probs, probs.new_zeros(1)])
            local_probs = extended.index_select(0, torch.where(missing, num_rows, dense_to_expert).view(-1))
            local_probs = local_probs.view(rows, L)
        sum_row_copies = _kernel("sum_row_copies", device)
        if sum_row_copies is not None:
            # One pass: each row reads only its own copies (about top-k / ranks of them), no gathered copies. The
            # sums (and the weights) go straight into the output arena where it has room, so the combine pulls.
            num_topk = handle.recv_topk_idx.size(1) if local_probs is not None else 0
            out, weights_out = self.buffer._new_combine_inputs(handle.buffer_handle, H, num_topk)
            unpermuted = sum_row_copies(hidden.contiguous(), dense_to_expert.contiguous(), out)
            return self._combine(unpermuted, local_probs, handle, weights_out)
        unpermuted = torch.empty((rows, H), dtype=torch.bfloat16, device=device)
        if rows > 0:
            # Each row's copies, in ascending local expert order, then none: at most min(K, L) of them.
            num_copies = min(handle.recv_topk_idx.size(1), L)
            experts = _routing_map_to_topk(~missing, num_copies)
            positions = dense_to_expert.gather(1, experts.clamp(min=0))
            positions = torch.where(experts >= 0, positions, num_rows)
            extended = torch.cat([hidden, hidden.new_zeros((1, H))])
            # About 128 MiB of gathered copies at a time.
            chunk = max(1, (128 << 20) // (num_copies * H * hidden.element_size()))
            for begin in range(0, rows, chunk):
                part = positions[begin : begin + chunk]
                copies = extended.index_select(0, part.reshape(-1)).view(part.size(0), num_copies, H)
                unpermuted[begin : begin + chunk] = copies.sum(1, dtype=torch.float32)
        return self._combine(unpermuted, local_probs, handle)

    # -----------------------------------------------------------------------------------------------------------
    # Internals

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this HybridEPBuffer was destroyed; create a new one")

    def _check_num_tokens(self, name: str, num_tokens: int) -> None:
        checks.check_int(name, num_tokens, 0)
        if num_tokens > self.max_num_of_tokens_per_rank:
            raise ValueError(
                f"{name}: {num_tokens} tokens exceed max_num_of_tokens_per_rank={self.max_num_of_tokens_per_rank}; "
                "create the HybridEPBuffer with a larger max_num_of_tokens_per_rank"
            )

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if t.device.type != self.device.type:
            raise ValueError(
                f"{name} must be on {self.device.type} for a HybridEPBuffer over a {self.buffer.backend_name} group, "
                f"got {t.device}"
            )

    def _check_handle(self, handle: Any) -> HybridEPHandle:
        if handle is None:
            raise ValueError("handle is required: pass the handle that dispatch returned")
        if not isinstance(handle, HybridEPHandle):
            raise TypeError(f"handle must be the HybridEPHandle a dispatch returned, got {checks.describe(handle)}")
        if handle.config.num_of_experts != self.num_of_experts:
            raise ValueError(
                f"handle was made for {handle.config.num_of_experts} experts, this HybridEPBuffer has "
                f"{self.num_of_experts}"
            )
        return handle

    def _check_combine_hidden(self, hidden: Any, num_rows: int) -> None:
        checks.check_tensor("hidden", hidden, dtype=torch.bfloat16, dim=2, contiguous=True)
        self._check_device("hidden", hidden)
        if hidden.size(0) != num_rows:
            raise ValueError(f"hidden must have the handle's {num_rows} rows, got {hidden.size(0)}")
        if hidden.size(1) > self.hidden_dim or hidden.size(1) % 8 != 0:
            raise ValueError(
                f"hidden must have a multiple of 8 channels, at most hidden_dim={self.hidden_dim}, got {hidden.size(1)}"
            )

    def _call_config(
        self, hidden_dim: int, num_tokens: int, pad_multiple: int, use_fp8: bool, fuse_permute_dispatch: bool
    ) -> HybridEpConfigInstance:
        return HybridEpConfigInstance(
            hidden_dim=hidden_dim,
            max_num_of_tokens_per_rank=self.max_num_of_tokens_per_rank,
            num_of_tokens_per_rank=num_tokens,
            num_local_experts=self.num_local_experts,
            num_of_experts=self.num_of_experts,
            pad_multiple=pad_multiple,
            use_fp8=use_fp8,
            fuse_permute_dispatch=fuse_permute_dispatch,
            dispatch_config=self.dispatch_fp8_config if use_fp8 else self.dispatch_config,
            combine_config=self.combine_config,
        )

    def _check_hidden(self, hidden: Any, scaling_factor: Any, use_fp8: bool) -> Any:
        """Checks dispatch's rows. Returns: the `x` argument of `Buffer.dispatch`."""
        checks.check_tensor("hidden", hidden, dim=2, contiguous=True)
        self._check_device("hidden", hidden)
        num_tokens, hidden_size = hidden.shape
        self._check_num_tokens("hidden", num_tokens)
        if hidden_size > self.hidden_dim:
            raise ValueError(
                f"hidden has {hidden_size} channels, more than the buffer's hidden_dim={self.hidden_dim}; create a "
                "HybridEPBuffer with a larger hidden_dim"
            )
        if not use_fp8:
            if hidden.dtype != torch.bfloat16:
                raise ValueError(
                    f"hidden must be torch.bfloat16 for a call without FP8 (use_fp8=False), got {hidden.dtype}"
                )
            if hidden_size % 8 != 0:
                raise ValueError(f"hidden must have a multiple of 8 channels (16-byte rows), got {hidden_size}")
            return hidden
        if hidden.element_size() != 1 or hidden.dtype == torch.bool:
            raise ValueError(
                f"hidden must have a 1-byte dtype (torch.uint8 or torch.float8_e4m3fn) with use_fp8=True, "
                f"got {hidden.dtype}"
            )
        block = checks.FP8_SCALE_BLOCK
        if hidden_size % block != 0:
            raise ValueError(f"hidden must have a multiple of {block} channels with use_fp8=True, got {hidden_size}")
        if scaling_factor is None:
            raise ValueError(f"scaling_factor ([{num_tokens}, {hidden_size // block}] torch.float32) is required with "
                             "use_fp8=True")  # fmt: skip
        checks.check_tensor(
            "scaling_factor", scaling_factor, dtype=torch.float32, shape=(num_tokens, hidden_size // block),
            device=hidden.device,
        )  # fmt: skip
        return hidden.view(checks.FP8_DTYPE), scaling_factor

    def _route(
        self,
        num_tokens: int,
        device: torch.device,
        topk_idx: Any,
        topk_weights: Any,
        num_of_experts: Any,
        probs: Any,
        routing_map: Any,
        non_blocking: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Checks the routing arguments of a dispatch without a handle. Returns: (topk_idx `[N, K]` int64 with each
        expert at most once per row, weights `[N, K]` float32 or None)."""
        E = self.num_of_experts
        if topk_idx is not None and routing_map is not None:
            raise ValueError("give the routing as topk_idx or as routing_map, not both")
        if topk_idx is None and routing_map is None:
            raise ValueError("dispatch without a handle needs topk_idx (with num_of_experts) or routing_map")
        if topk_weights is not None and probs is not None:
            raise ValueError("give the weights as topk_weights or as probs, not both")
        if probs is not None:
            checks.check_tensor("probs", probs, dtype=torch.float32, shape=(num_tokens, E), device=device)

        if routing_map is not None:
            if topk_weights is not None:
                raise ValueError("topk_weights goes with topk_idx; with routing_map give the weights as probs [N, E]")
            if num_of_experts is not None:
                checks.check_int("num_of_experts", num_of_experts, 1)
                if num_of_experts != E:
                    raise ValueError(f"num_of_experts={num_of_experts} must be num_local_experts * group_size = {E}")
            checks.check_tensor("routing_map", routing_map, dtype=torch.bool, shape=(num_tokens, E), device=device)
            # NOTES: a device-to-host read; left out where no host synchronisation may happen.
            if checks.value_checks_enabled(routing_map) and not (non_blocking and routing_map.is_cuda):
                per_token = routing_map.sum(1)
                if num_tokens > 0 and int(per_token.max()) > NUM_MAX_ROUTING_MAP_EXPERTS:
                    token = int((per_token > NUM_MAX_ROUTING_MAP_EXPERTS).nonzero()[0, 0])
                    raise ValueError(
                        f"routing_map selects at most {NUM_MAX_ROUTING_MAP_EXPERTS} experts per token, got "
                        f"{int(per_token[token])} for token {token}"
                    )
            idx = _routing_map_to_topk(routing_map, min(NUM_MAX_ROUTING_MAP_EXPERTS, E))
        else:
            if num_of_experts is None:
                raise ValueError(f"num_of_experts is required with topk_idx (num_local_experts * group_size = {E})")
            checks.check_int("num_of_experts", num_of_experts, 1)
            if num_of_experts != E:
                raise ValueError(f"num_of_experts={num_of_experts} must be num_local_experts * group_size = {E}")
            checks.check_topk_idx(topk_idx, num_experts=None, num_tokens=num_tokens, device=device)
            if topk_weights is not None:
                checks.check_tensor(
                    "topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), device=device
                )
            idx = _first_occurrences(topk_idx)

        if probs is not None:
            weights = probs.gather(1, idx.clamp(min=0))
        elif topk_weights is not None:
            weights = topk_weights
        else:
            return idx, None
        return idx, torch.where(idx >= 0, weights, torch.zeros_like(weights))

    def _dispatch(
        self,
        hidden: Any,
        scaling_factor: Any,
        use_fp8: bool,
        topk_idx: Any,
        topk_weights: Any,
        num_of_experts: Any,
        probs: Any,
        routing_map: Any,
        handle: Any,
        *,
        pad_multiple: int,
        non_blocking: bool,
        fuse_permute_dispatch: bool,
    ) -> _Dispatched:
        """Checks every argument, then runs `Buffer.dispatch`: layout and dispatch, or a cached dispatch."""
        x = self._check_hidden(hidden, scaling_factor, use_fp8)
        num_tokens, device = hidden.size(0), hidden.device
        config = self._call_config(hidden.size(1), num_tokens, pad_multiple, use_fp8, fuse_permute_dispatch)
        buffer_config = config.dispatch_config
        L = self.num_local_experts

        if handle is not None:
            handle = self._check_handle(handle)
            if num_tokens != handle.num_of_tokens_per_rank:
                raise ValueError(
                    f"hidden has {num_tokens} tokens, the handle was made for {handle.num_of_tokens_per_rank}"
                )
            idx = handle.topk_idx
            weights = None
            if topk_weights is not None and probs is not None:
                raise ValueError("give the weights as topk_weights or as probs, not both")
            if probs is not None:
                checks.check_tensor(
                    "probs", probs, dtype=torch.float32, shape=(num_tokens, self.num_of_experts), device=device
                )
                weights = probs.gather(1, idx.clamp(min=0))
            elif topk_weights is not None:
                checks.check_tensor(
                    "topk_weights", topk_weights, dtype=torch.float32, shape=tuple(idx.shape), device=device
                )
                weights = topk_weights
            buffer_handle = handle.buffer_handle
            recv_idx = handle.recv_topk_idx
            recv_w = None
            moved = None
            if weights is not None:
                weights = torch.where(idx >= 0, weights, torch.zeros_like(weights))
                # NOTES: on the NVLink kernels the weights travel with the rows, in one dispatch.
                moved = self.buffer._cached_dispatch_with_topk(
                    x, buffer_handle, idx.contiguous(), weights.contiguous(), L, buffer_config
                )
            if moved is not None:
                recv_x, _, recv_w = moved
            else:
                recv_x = self.buffer.dispatch(x, handle=buffer_handle, config=buffer_config)[0]
                if weights is not None:
                    recv_w = self._dispatch_weights(weights, buffer_handle, buffer_config)
        else:
            idx, weights = self._route(
                num_tokens, device, topk_idx, topk_weights, num_of_experts, probs, routing_map, non_blocking
            )
            num_worst_tokens = self.max_num_of_tokens_per_rank * self.group_size if non_blocking else 0
            # Weights always travel (Buffer returns the received top-k only with them); zeros stand in for none.
            sent_weights = (
                weights if weights is not None else torch.zeros(idx.shape, dtype=torch.float32, device=device)
            )
            per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(idx, self.num_of_experts)
            recv_x, recv_idx, recv_w, _, buffer_handle, _ = self.buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=idx,
                topk_weights=sent_weights,
                num_worst_tokens=num_worst_tokens,
                config=buffer_config,
            )
            if weights is None:
                recv_w = None

        data, scales = (recv_x[0].view(hidden.dtype), recv_x[1]) if use_fp8 else (recv_x, None)
        rows = data.size(0)
        if handle is not None and rows == handle.local_expert_routing_map.size(0):
            # NOTES: a cached dispatch moves the rows of the handle's routing, so its localised indices and map
            # are the handle's: reused, not rebuilt (a dozen small operations whose launches bound a cached call).
            recv_idx, local_map, tokens_per_expert = (
                handle.recv_topk_idx,
                handle.local_expert_routing_map,
                handle.tokens_per_expert,
            )
            is_local = recv_idx >= 0
            slot = None
        else:
            # Rows past the valid ones (fixed-size outputs) hold no routing, whatever the Buffer left in them.
            num_valid = buffer_handle[0][self.group_size - 1, self.rank]
            valid_row = torch.arange(rows, device=device) < num_valid
            is_local = valid_row.unsqueeze(1) & (recv_idx >= 0) & (recv_idx < L)
            recv_idx = torch.where(is_local, recv_idx, -1)
            slot = _slots(recv_idx, L)
            local_map = torch.zeros(slot.shape[0], L + slot.shape[1], dtype=torch.bool, device=device)
            local_map = local_map.scatter_(1, slot, True)[:, :L]
            tokens_per_expert = local_map.sum(0, dtype=torch.int32)
        local_probs = None
        if recv_w is not None:
            slot = _slots(recv_idx, L) if slot is None else slot
            src = torch.where(is_local, recv_w, torch.zeros_like(recv_w))
            local_probs = torch.zeros(slot.shape[0], L + slot.shape[1], dtype=torch.float32, device=device)
            local_probs = local_probs.scatter_(1, slot, src)[:, :L]
        if handle is not None:
            # The same routing: the same row count, wherever the first dispatch left it.
            num_dispatched = handle.num_dispatched_tokens_tensor
        elif non_blocking:
            num_dispatched = buffer_handle[0][self.group_size - 1, self.rank].to(torch.int32).reshape(1)
        else:
            num_dispatched = torch.tensor([rows], dtype=torch.int32)
        out_handle = HybridEPHandle(
            buffer_handle=buffer_handle,
            topk_idx=idx,
            recv_topk_idx=recv_idx,
            num_dispatched_tokens_tensor=num_dispatched,
            local_expert_routing_map=local_map,
            permuted_row_source=None,
            dense_to_expert_map=None,
            tokens_per_expert=tokens_per_expert,
            num_of_tokens_per_rank=num_tokens,
            config=config,
            overflow_flag=torch.zeros(1, dtype=torch.int32, device=device),
            num_permuted_tokens=None,
            padded_tokens_per_expert=None,
        )
        return _Dispatched(data, scales, local_probs, out_handle)

    def _dispatch_weights(self, weights: torch.Tensor, buffer_handle: tuple, config: Config) -> torch.Tensor:
        """Moves `[N, K]` float32 weights as a cached dispatch does rows: their bytes travel as bfloat16 lanes
        (a cached Buffer dispatch carries no top-k). Returns: `[rows, K]` float32, each row's source weights."""
        num_tokens, num_topk = weights.shape
        num_lanes = 2 * num_topk
        lanes = torch.zeros((num_tokens, (num_lanes + 7) // 8 * 8), dtype=torch.bfloat16, device=weights.device)
        lanes[:, :num_lanes] = weights.contiguous().view(torch.bfloat16)
        recv = self.buffer.dispatch(lanes, handle=buffer_handle, config=config)[0]
        return recv[:, :num_lanes].contiguous().view(torch.float32)

    def _permute(
        self,
        out: _Dispatched,
        pad: int,
        num_permuted_tokens: Optional[int],
        non_blocking: bool,
        cached: Optional[HybridEPHandle],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, HybridEPHandle]:
        """Groups the dispatched rows by local expert. No host synchronisation, except in blocking mode to size the
        output and to put tokens_per_expert on the CPU, both skipped when a permute handle of the same
        pad_multiple already knows them (the same routing gives the same layout)."""
        local_map = out.handle.local_expert_routing_map  # [rows, L]
        rows, L = local_map.shape
        device = local_map.device
        reuse = cached is not None and cached.num_permuted_tokens is not None and cached.config.pad_multiple == pad
        counts = local_map.sum(0, dtype=torch.int64)
        padded = (counts + pad - 1) // pad * pad
        if num_permuted_tokens is not None:
            num_out = num_permuted_tokens
        elif reuse:
            assert cached is not None and cached.num_permuted_tokens is not None
            num_out = cached.num_permuted_tokens
        else:
            num_out = int(padded.sum())
        # NOTES: a cached dispatch of a permute handle with the same map, padding and size has the handle's
        # layout: reused, not rebuilt.
        if (
            reuse
            and cached is not None
            and cached.permuted_row_source is not None
            and cached.dense_to_expert_map is not None
            and cached.local_expert_routing_map is local_map
            and cached.num_permuted_tokens == num_out
        ):
            source, dense_to_expert, overflow = (
                cached.permuted_row_source,
                cached.dense_to_expert_map,
                cached.overflow_flag,
            )
        else:
            source, dense_to_expert, overflow = _permuted_layout(local_map, padded, num_out)
        kernel = _kernel("gather_rows", device)
        if kernel is not None:
            # Padding rows (-1) are zero-filled by the kernel: one pass over the output.
            kernel_row_of = torch.where(source < 0, -1, torch.div(source, L, rounding_mode="floor"))

            def gather_rows(t: torch.Tensor) -> torch.Tensor:
                return kernel(t.contiguous(), kernel_row_of)

        else:
            # Padding rows read an appended zero row (one gather, no masking pass over the output).
            row_of = torch.where(source < 0, rows, torch.div(source, L, rounding_mode="floor"))

            def gather_rows(t: torch.Tensor) -> torch.Tensor:
                moved = t.view(torch.uint8) if t.element_size() == 1 else t
                extended = torch.cat([moved, moved.new_zeros((1, moved.size(1)))])
                return extended.index_select(0, row_of).view(t.dtype)

        data = gather_rows(out.data)
        scales = gather_rows(out.scales) if out.scales is not None else None
        probs = None
        if out.local_probs is not None:
            extended = torch.cat([out.local_probs.reshape(-1), out.local_probs.new_zeros(1)])
            probs = extended.index_select(0, torch.where(source < 0, rows * L, source))
        if non_blocking:
            tokens_per_expert = padded
        elif reuse and cached is not None and cached.padded_tokens_per_expert is not None:
            tokens_per_expert = cached.padded_tokens_per_expert.cpu()
        else:
            tokens_per_expert = padded.cpu()
        handle = out.handle._replace(
            permuted_row_source=source,
            dense_to_expert_map=dense_to_expert,
            overflow_flag=overflow,
            num_permuted_tokens=num_out,
            padded_tokens_per_expert=tokens_per_expert,
        )
        return data, probs, scales, tokens_per_expert, handle

    def _combine(
        self,
        hidden: torch.Tensor,
        local_probs: Optional[torch.Tensor],
        handle: HybridEPHandle,
        weights_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`Buffer.combine` of `hidden` `[rows, H]`, the local weights `[rows, L]` travelling in top-k slot form
        (written into `weights_out` `[rows, top-k]` torch.float32 where given)."""
        L = self.num_local_experts
        recv_idx = handle.recv_topk_idx
        weights = None
        if local_probs is not None:
            # Slot k of a row holds the weight of its local expert, or 0: the sum over ranks then rebuilds each
            # token's weights exactly (every weight has one nonzero term).
            padded = torch.cat([local_probs, local_probs.new_zeros((local_probs.size(0), 1))], dim=1)
            slots = torch.where(recv_idx >= 0, recv_idx, L)
            if weights_out is None:
                weights = padded.gather(1, slots)
            else:
                weights = torch.gather(padded, 1, slots, out=weights_out)
        combined, combined_w, _ = self.buffer.combine(
            hidden, handle.buffer_handle, topk_weights=weights, config=self.combine_config
        )
        if combined_w is None:
            return combined, None
        idx = handle.topk_idx
        E = self.num_of_experts
        combined_probs = torch.zeros((idx.size(0), E + idx.size(1)), dtype=torch.float32, device=combined_w.device)
        combined_probs.scatter_(1, _slots(idx, E), combined_w)
        return combined, combined_probs[:, :E]


def _permuted_layout(
    local_map: torch.Tensor, padded: torch.Tensor, num_out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-major layout of `local_map` `[rows, L]` torch.bool with blocks of `padded` `[L]` torch.int64 rows,
    cut at `num_out` rows. No host synchronisation.

    Returns:
        source: `[num_out]` torch.int64, `m * L + j` for the row that holds row m for expert j, -1 on padding.
        dense_to_expert: `[rows, L]` torch.int64, the row of (m, j), -1 where m does not go to j or was dropped.
        overflow: `[1]` torch.int32, 1 when the blocks need more than num_out rows, else 0.
    """
    rows, L = local_map.shape
    device = local_map.device
    start = padded.cumsum(0) - padded
    # Position of each (row, expert) pair: its block's start plus the pairs of that expert in earlier rows
    # (scanned along rows of the transpose: a scan over the outer dimension is many times slower).
    earlier = local_map.t().contiguous().to(torch.int64).cumsum(1).t().contiguous()
    position = start.unsqueeze(0) + earlier - 1
    keep = local_map & (position < num_out)
    dense_to_expert = torch.where(keep, position, -1)
    pair = torch.arange(rows * L, dtype=torch.int64, device=device)
    # Pairs that are not placed land past num_out, each in a slot of its own (no two writes share an address).
    source = torch.full((num_out + rows * L,), -1, dtype=torch.int64, device=device)
    source.scatter_(0, torch.where(keep.view(-1), position.view(-1), num_out + pair), pair)
    source = source[:num_out]
    overflow = (padded.sum() > num_out).to(torch.int32).reshape(1)
    return source, dense_to_expert, overflow


def _kernel(name: str, device: torch.device) -> Optional[Callable[..., torch.Tensor]]:
    """Returns: the extension's row mover `name` for tensors on `device`, or None where torch ops serve instead (CPU
    tensors, or an extension built without it)."""
    return getattr(_ext._C, name, None) if device.type == "cuda" and _ext.has_extension() else None


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {checks.describe(value)}")
    return value


def _check_pad_multiple(pad_multiple: Any) -> int:
    """Returns: the block multiple, 1 for None or 0."""
    if pad_multiple is None:
        return 1
    checks.check_int("pad_multiple", pad_multiple, 0)
    return max(pad_multiple, 1)


def _check_unused_count_args(num_dispatched_tokens_tensor: Any, num_dispatched_tokens: Any) -> None:
    if num_dispatched_tokens_tensor is not None and not isinstance(num_dispatched_tokens_tensor, torch.Tensor):
        got = checks.describe(num_dispatched_tokens_tensor)
        raise TypeError(f"num_dispatched_tokens_tensor must be a tensor or None, got {got}")
    if num_dispatched_tokens is not None:
        checks.check_int("num_dispatched_tokens", num_dispatched_tokens, 0)


def _first_occurrences(topk_idx: torch.Tensor) -> torch.Tensor:
    """Returns: `topk_idx` `[N, K]` with every repeat of an expert in a row (after its first slot) set to -1."""
    num_topk = topk_idx.size(1)
    same = topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)  # [N, k, j]
    earlier = torch.ones((num_topk, num_topk), dtype=torch.bool, device=topk_idx.device).tril(-1)  # j < k
    repeat = (same & earlier).any(2) & (topk_idx >= 0)
    return torch.where(repeat, -1, topk_idx).contiguous()


def _slots(idx: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Returns: the scatter index that puts entry k of each row of `idx` `[N, K]` (values in [0, num_columns) or
    -1) in its column, and a -1 entry in column `num_columns + k`, past the ones kept: no two writes of a row share
    an address (a shared one serialises the writes)."""
    spare = num_columns + torch.arange(idx.size(1), dtype=idx.dtype, device=idx.device)
    return torch.where(idx >= 0, idx, spare)


def _routing_map_to_topk(routing_map: torch.Tensor, num_topk: int) -> torch.Tensor:
    """Returns: `[N, num_topk]` torch.int64, the experts of each row of `routing_map` `[N, E]` in ascending order,
    then -1; experts past the first num_topk of a row are left out. No host synchronisation."""
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    slot = routing_map.to(torch.int64).cumsum(1) - 1
    experts = torch.arange(num_experts, dtype=torch.int64, device=device).expand(num_tokens, num_experts)
    # Experts not selected, and the ones past num_topk, land in columns of their own past num_topk.
    slot = torch.where(routing_map & (slot < num_topk), slot, num_topk + experts)
    idx = torch.full((num_tokens, num_topk + num_experts), -1, dtype=torch.int64, device=device)
    return idx.scatter_(1, slot, experts)[:, :num_topk].contiguous()
