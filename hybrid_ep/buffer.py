"""`Buffer`: DeepEP v1's communication buffer API, so `import hybrid_ep as deep_ep` replaces `deep_ep.Buffer`.

Backends: with CUDA tensors and an NCCL group, calls run on the Buffer's communication stream with DeepEP's event
semantics (`previous_event`, `async_finish`, `allocate_on_comm_stream`); `get_dispatch_layout` runs the compiled
layout kernel, dispatch and combine run the reference (`hybrid_ep.reference`) until the NVLink kernels land. With
CPU tensors and a gloo group everything runs the reference, synchronously.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import _ext, checks, envs, reference, topology, tuned
from .config import Config
from .event import EventHandle, EventOverlap

_NOT_YET = "is not implemented yet in hybrid_ep"


def _not_implemented(feature: str, area: str) -> NotImplementedError:
    return NotImplementedError(f"{feature} {_NOT_YET}; it arrives with the {area} work (see docs/compat.md)")


def nvl_ranks_for_buffer(group_size: int, backend_name: str, num_nvl_bytes: int) -> int:
    """`Buffer.num_nvl_ranks` for a group: `topology.nvl_ranks_for_group` with HYBRID_EP_NUM_NVL_RANKS as override.

    Arguments:
        group_size: ranks in the group.
        backend_name: the group's backend ("nccl" runs on GPUs; anything else on the CPU, without NVLink).
        num_nvl_bytes: the Buffer's NVLink buffer size.
    Returns:
        ranks per NVLink domain, a divisor of `group_size`. Raises NotImplementedError when a GPU group with an
        NVLink buffer spans several domains: the NVLink kernels need the whole group in one domain.
    """
    on_gpus = "nccl" in backend_name
    num_nvl_ranks = topology.nvl_ranks_for_group(group_size, on_gpus, override=envs.num_nvl_ranks())
    if on_gpus and num_nvl_bytes > 0 and num_nvl_ranks < group_size:
        raise NotImplementedError(
            f"Buffer(num_nvl_bytes={num_nvl_bytes}) over {group_size} ranks: the group spans several NVLink "
            f"domains of num_nvl_ranks={num_nvl_ranks} ranks (NVML topology, or HYBRID_EP_NUM_NVL_RANKS), and the "
            f"NVLink kernels need one domain; internode kernels {_NOT_YET} (see docs/compat.md). Pass "
            f"num_nvl_bytes=0 for the reference backend, or set HYBRID_EP_NUM_NVL_RANKS={group_size} if these GPUs "
            "do reach each other"
        )
    return num_nvl_ranks


class Buffer:
    """The communication buffer of one process group, with DeepEP v1's constructor and methods.

    Arguments:
        group: the `torch.distributed.ProcessGroup` of the expert-parallel ranks (NCCL for GPUs, gloo for CPUs).
        num_nvl_bytes: bytes of NVLink buffer (a multiple of 128); see `Config.get_nvl_buffer_size_hint`.
        num_rdma_bytes: bytes of network buffer (a multiple of 128), for internode and low-latency modes.
        low_latency_mode: enable the low-latency kernels.
        num_qps_per_rank: queue pairs per peer for the network kernels.
        allow_nvlink_for_low_latency_mode: let low-latency kernels use NVLink between ranks of one host.
        allow_mnnvl: allow multi-node NVLink.
        use_fabric: allocate the NVLink buffer as fabric memory instead of CUDA IPC memory.
        explicitly_destroy: resources are freed only by `destroy()`, which must then be called.
        enable_shrink: allocate the rank mask used by the low-latency mask APIs.
        comm: an mpi4py communicator instead of `group` (not supported: pass a process group).
        allow_nvlink_for_normal_mode: keyword-only; False asks for the network-only normal mode.

    Attributes:
        num_nvl_ranks: ranks per NVLink domain (consecutive ranks form a domain), read once at construction: the
            HYBRID_EP_NUM_NVL_RANKS override, else the NVML topology for an NCCL group, else (gloo, or no NVML)
            the whole group. See docs/topology.md.
        num_rdma_ranks: `group_size // num_nvl_ranks`, the number of NVLink domains in the group.
    """

    #: SMs the recommended configs use; set with `Buffer.set_num_sms`.
    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        allow_nvlink_for_normal_mode: bool = True,
    ) -> None:
        if group is None and comm is None:
            raise ValueError("Buffer needs a process group (group=...); neither group nor comm was given")
        if group is None:
            raise _not_implemented("Buffer(comm=<mpi4py communicator>)", "runtime (pass a torch.distributed group)")
        checks.check_int("num_nvl_bytes", num_nvl_bytes, 0)
        checks.check_int("num_rdma_bytes", num_rdma_bytes, 0)
        checks.check_int("num_qps_per_rank", num_qps_per_rank, 1)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if value % 128 != 0:
                raise ValueError(f"{name}={value} must be a multiple of 128")
        if not allow_nvlink_for_normal_mode:
            raise _not_implemented("allow_nvlink_for_normal_mode=False (network-only normal mode)", "internode")

        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.use_fabric = use_fabric
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.backend_name = str(dist.get_backend(group)).lower()
        # NOTES: decided before any collective, so every rank of a host raises together when it is rejected.
        self.num_nvl_ranks = nvl_ranks_for_buffer(self.group_size, self.backend_name, num_nvl_bytes)
        self.num_rdma_ranks = self.group_size // self.num_nvl_ranks
        self._destroyed = False
        self.runtime: Any = None
        if "nccl" in self.backend_name:
            self.device = torch.device("cuda", torch.cuda.current_device())
            self._comm_stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(device=self.device, priority=-1)
            if num_nvl_bytes > 0 and _ext.has_extension():
                self._open_nvl_buffer()
        else:
            self.device = torch.device("cpu")
            self._comm_stream = None

    # -----------------------------------------------------------------------------------------------------------
    # Static and simple methods

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs that `get_dispatch_config` / `get_combine_config` use (for all Buffers). Must be even."""
        checks.check_int("new_num_sms", new_num_sms, 2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms={new_num_sms} must be even (blocks work in sender/receiver pairs)")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Returns: whether the extension was compiled for Hopper (sm_90/sm_90a)."""
        if not _ext.has_extension():
            return False
        return "9.0" in str(_ext.build_info().get("arch_list", ""))

    @staticmethod
    def capture() -> EventOverlap:
        """Returns: an `EventOverlap` with an event recorded on the current stream (for `previous_event`)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of network buffer low-latency mode needs (double-buffered send, receive and signal areas).

        Arguments:
            num_max_dispatch_tokens_per_rank: most tokens one rank dispatches in one call.
            hidden: hidden size.
            num_ranks: ranks of the group.
            num_experts: global number of experts.
        Returns:
            int, a multiple of 128.
        """
        for name, value in (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_ranks", num_ranks),
            ("num_experts", num_experts),
        ):
            checks.check_int(name, value, 1)
        num_scales = hidden // 128
        dispatch_msg_bytes = 16 + max(hidden * 2, hidden + num_scales * 4)
        combine_msg_bytes = num_scales * 4 + hidden * 2
        tokens = num_max_dispatch_tokens_per_rank
        send_bytes = max(tokens * dispatch_msg_bytes, num_experts * tokens * combine_msg_bytes)
        recv_bytes = num_experts * tokens * max(dispatch_msg_bytes, combine_msg_bytes)
        signal_bytes = (num_experts * 4 + 127) // 128 * 128
        # Rounded as DeepEP rounds it (one extra 128 bytes when already aligned), so sizes match byte for byte.
        return (2 * (send_bytes + recv_bytes + signal_bytes) + 128) // 128 * 128

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Returns: the dispatch `Config` for `num_ranks` ranks with `Buffer.num_sms` SMs: tuned where a results
        file of `python -m hybrid_ep.tune` is found (see `hybrid_ep.tuned`), else the built-in one."""
        return tuned.config_for("dispatch", num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Returns: the combine `Config` for `num_ranks` ranks with `Buffer.num_sms` SMs: tuned where a results
        file of `python -m hybrid_ep.tune` is found (see `hybrid_ep.tuned`), else the built-in one."""
        return tuned.config_for("combine", num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> torch.cuda.Stream:
        """Returns: the Buffer's communication stream (a high-priority CUDA stream)."""
        self._check_alive()
        if self._comm_stream is None:
            raise RuntimeError("get_comm_stream(): this Buffer runs on the CPU (gloo group) and has no CUDA stream")
        return self._comm_stream

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """A tensor over this rank's raw NVLink buffer (its data region: `num_nvl_bytes` bytes).

        Arguments:
            dtype: element type of the view.
            size: shape of the view, or None for every whole element from `offset` to the end.
            offset: start of the view in bytes; a multiple of dtype's size.
            use_rdma_buffer: view the network buffer instead (internode; not there yet).
        Returns:
            a CUDA tensor sharing the buffer's memory.
        """
        self._check_alive()
        if use_rdma_buffer:
            raise _not_implemented("get_local_buffer_tensor(use_rdma_buffer=True) (the network buffer)", "internode")
        if self.runtime is None:
            raise RuntimeError(
                "get_local_buffer_tensor needs an NVLink buffer: a Buffer over an NCCL group with num_nvl_bytes > 0 "
                "and the compiled extension"
            )
        checks.check_int("offset", offset, 0)
        element_size = torch.empty((), dtype=dtype).element_size()
        num_bytes = (self.num_nvl_bytes - offset) // element_size * element_size if offset <= self.num_nvl_bytes else 0
        if size is not None:
            num_bytes = element_size * int(torch.Size(size).numel())
        view = self.runtime.buffer_tensor(self.rank, dtype, offset, num_bytes)
        return view.view(size) if size is not None else view

    def destroy(self) -> None:
        """Frees the Buffer's resources; needs `explicitly_destroy=True`. The Buffer is unusable afterwards."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs a Buffer built with explicitly_destroy=True")
        if self._destroyed:
            return
        if self._comm_stream is not None:
            self._comm_stream.synchronize()
        if self.runtime is not None:
            # Every rank stops using its peers' buffers, unmaps them, and only then frees its own.
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
            self.runtime.close_peers()
            dist.barrier(group=self.group)
            self.runtime.free_buffer()
            self.runtime = None
        self._comm_stream = None
        self._destroyed = True

    # -----------------------------------------------------------------------------------------------------------
    # Normal mode

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Counts where tokens go, from the routing. Local: no communication.

        Arguments:
            topk_idx: `[num_tokens, num_topk]` torch.int64, expert indices in [0, num_experts), -1 for none.
            num_experts: global number of experts, divisible by the number of ranks.
            previous_event, async_finish, allocate_on_comm_stream: as for `dispatch`.
        Returns:
            num_tokens_per_rank: `[num_ranks]` torch.int32.
            num_tokens_per_rdma_rank: `[num_rdma_ranks]` torch.int32, tokens with at least one expert in each NVLink
                domain; None when all ranks share one domain (`num_nvl_ranks == group_size`).
            num_tokens_per_expert: `[num_experts]` torch.int32.
            is_token_in_rank: `[num_tokens, num_ranks]` torch.bool.
            event: an `EventOverlap`.
        """
        self._check_alive()
        checks.check_num_experts(num_experts, self.group_size)
        checks.check_topk_idx(topk_idx, num_experts=num_experts, device=self.device)

        def run() -> tuple:
            if topk_idx.is_cuda and _ext.has_extension():
                per_rank, per_domain, per_expert, in_rank = _ext.require_extension(
                    "the layout kernel"
                ).get_dispatch_layout(topk_idx, num_experts, self.group_size, self.num_nvl_ranks)
            else:
                per_rank, per_domain, per_expert, in_rank = reference.layout_unchecked(
                    topk_idx, num_experts, self.group_size, self.num_nvl_ranks
                )
            return per_rank, per_domain, per_expert, in_rank

        outputs, event = self._on_comm_stream(run, (topk_idx,), previous_event, async_finish, allocate_on_comm_stream)
        return (*outputs, event)

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: Optional[tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]], Optional[tuple], EventOverlap]:
        """Sends each token to the ranks that hold its experts. Collective over the group.

        Arguments:
            x: `[num_tokens, hidden]` torch.bfloat16, or `(x [num_tokens, hidden] torch.float8_e4m3fn,
                scales [num_tokens, hidden / 128] torch.float32)`, scales with any strides.
            handle: a handle from an earlier dispatch with the same routing (cached mode: no layout, no top-k).
            num_tokens_per_rank: `[num_ranks]` torch.int32, from `get_dispatch_layout`.
            num_tokens_per_rdma_rank: `[num_nodes]` torch.int32 or None; unused within one NVLink domain.
            is_token_in_rank: `[num_tokens, num_ranks]` torch.bool, from `get_dispatch_layout`.
            num_tokens_per_expert: `[num_experts]` torch.int32, from `get_dispatch_layout`.
            topk_idx: `[num_tokens, num_topk]` torch.int64 or None.
            topk_weights: `[num_tokens, num_topk]` torch.float32 or None (given with topk_idx).
            expert_alignment: round each per-expert receive count up to a multiple of this.
            num_worst_tokens: if > 0, outputs have exactly this many rows (the real ones first) and the per-expert
                list is empty: the fixed shapes CUDA graphs need. Outside a graph capture the call still reads the
                counts on the host, so a rank receiving more rows raises ValueError on every rank; inside a capture
                nothing waits on the host and such an overflow stops every rank's kernel with a printed message.
                Under capture, a dispatch without a handle needs num_worst_tokens > 0 (RuntimeError otherwise).
            config: a `Config`; default `get_dispatch_config(num_ranks)`.
            previous_event: an `EventOverlap` the call waits for instead of the current stream.
            async_finish: return an event instead of making the current stream wait for the call.
            allocate_on_comm_stream: allocate outputs on the communication stream (needs previous_event and
                async_finish).
        Returns:
            recv_x: like x, `[num_recv_tokens, hidden]` (and `[num_recv_tokens, hidden / 128]` scales), rows ordered
                by source rank, then source token index.
            recv_topk_idx: `[num_recv_tokens, num_topk]` torch.int64, local expert indices, -1 elsewhere; or None.
            recv_topk_weights: `[num_recv_tokens, num_topk]` torch.float32, 0 where recv_topk_idx is -1; or None.
            num_recv_tokens_per_expert_list: list of ints, one per local expert, aligned; None in cached mode.
            handle: for combine and cached dispatch; None in cached mode.
            event: an `EventOverlap`.
        """
        self._check_alive()
        data, scales = checks.split_dispatch_x(x)
        # Without a config, FP8 rows get the FP8 dispatch one.
        config = self._check_config(config, "dispatch" if scales is None else "dispatch_fp8")
        self._check_device("x", data)

        if self.runtime is not None:
            run = self._kernel_dispatch_fn(
                x,
                handle,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                expert_alignment,
                num_worst_tokens,
                config,
            )
            inputs = (x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
            outputs, event = self._on_comm_stream(run, inputs, previous_event, async_finish, allocate_on_comm_stream)
            return (*outputs, event)

        def run() -> tuple:
            return reference.dispatch(
                x,
                group=self.group,
                handle=handle,
                num_tokens_per_rank=num_tokens_per_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                expert_alignment=expert_alignment,
                num_worst_tokens=num_worst_tokens,
                num_channels=config.num_channels,
            )

        inputs = (x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        outputs, event = self._on_comm_stream(run, inputs, previous_event, async_finish, allocate_on_comm_stream)
        return (*outputs, event)

    def _cached_dispatch_with_topk(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: tuple,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_local_experts: int,
        config: Optional[Config] = None,
    ) -> Optional[tuple[Any, torch.Tensor, torch.Tensor]]:
        """A cached dispatch that also moves each token's top-k (HybridEPBuffer's cached dispatch with new weights),
        in one kernel. Collective over the group.

        Arguments:
            x: as for `dispatch`: `[num_tokens, hidden]` torch.bfloat16, or (FP8 rows, `[num_tokens, hidden / 128]`
                torch.float32 scales).
            handle: the handle of an earlier dispatch with the same routing.
            topk_idx: `[num_tokens, num_topk]` torch.int64, contiguous, -1 for no expert.
            topk_weights: `[num_tokens, num_topk]` torch.float32, contiguous.
            num_local_experts: experts per rank (the received top-k is localised with it).
            config: a `Config`; default as for `dispatch`.
        Returns:
            (recv_x, recv_topk_idx `[num_recv_tokens, num_topk]` torch.int64, recv_topk_weights
            `[num_recv_tokens, num_topk]` torch.float32) as `dispatch` returns them, or None where this Buffer runs
            the pure-PyTorch reference (whose cached mode moves no top-k; the caller moves them otherwise).
        """
        self._check_alive()
        if self.runtime is None:
            return None
        data, scales = checks.split_dispatch_x(x)
        config = self._check_config(config, "dispatch" if scales is None else "dispatch_fp8")
        self._check_device("x", data)
        checks.check_int("num_local_experts", num_local_experts, 1)
        run = self._kernel_dispatch_fn(
            x, handle, None, None, None, topk_idx, topk_weights, 1, 0, config,
            cached_topk_local_experts=num_local_experts,
        )  # fmt: skip
        outputs, _ = self._on_comm_stream(run, (x, handle, topk_idx, topk_weights), None, False, False)
        return outputs[0], outputs[1], outputs[2]

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias: torch.Tensor | tuple[Optional[torch.Tensor], Optional[torch.Tensor]] | None = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Brings rows back to the ranks they came from and sums the copies of each token. Collective.

        Arguments:
            x: `[num_recv_tokens, hidden]` torch.bfloat16, rows in dispatch's output order.
            handle: the handle dispatch returned.
            topk_weights: `[num_recv_tokens, num_topk]` torch.float32 or None; summed like x.
            bias: None, a tensor or a pair of tensors, each `[num_tokens, hidden]` torch.bfloat16, added once.
            config, previous_event, async_finish, allocate_on_comm_stream: as for `dispatch`.
        Returns:
            combined_x: `[num_tokens, hidden]` torch.bfloat16: bias + sum over ranks in ascending rank order, in fp32.
            combined_topk_weights: `[num_tokens, num_topk]` torch.float32, or None.
            event: an `EventOverlap`.
        """
        self._check_alive()
        config = self._check_config(config, "combine")
        checks.check_combine_x(x)
        self._check_device("x", x)
        if self.runtime is not None:
            run = self._kernel_combine_fn(x, handle, topk_weights, bias, config)
            inputs = (x, handle, topk_weights, bias)
            outputs, event = self._on_comm_stream(run, inputs, previous_event, async_finish, allocate_on_comm_stream)
            return (*outputs, event)

        def run() -> tuple:
            return reference.combine(x, handle, group=self.group, topk_weights=topk_weights, bias=bias)

        inputs = (x, handle, topk_weights, bias)
        outputs, event = self._on_comm_stream(run, inputs, previous_event, async_finish, allocate_on_comm_stream)
        return (*outputs, event)

    def new_combine_input(self, handle: tuple, hidden: int) -> torch.Tensor:
        """An uninitialised `[num_recv_tokens, hidden]` torch.bfloat16 tensor for `combine`'s `x` with `handle`.

        When every rank's `x` (and `topk_weights`, if given) lies in its output arena, combine has each rank read its
        tokens' copies straight from the peers, its fastest path; dispatch outputs lie there already. Writing expert
        outputs into this tensor (a GEMM's `out=`, or `copy_`) takes that path for them too. Where the arena is
        missing or full, on a CPU group, or during CUDA graph capture, it is a plain `torch.empty` tensor.

        Arguments:
            handle: the handle dispatch returned (its row count is the tensor's).
            hidden: the row width.
        Returns:
            an uninitialised `[num_recv_tokens, hidden]` torch.bfloat16 tensor on the handle's device.
        """
        self._check_alive()
        checks.check_int("hidden", hidden, 1)
        return self._new_combine_inputs(handle, hidden, 0)[0]

    def _new_combine_inputs(self, handle: tuple, hidden: int, num_topk: int) -> tuple:
        """`new_combine_input`, with the `[num_recv_tokens, num_topk]` torch.float32 tensor for combine's
        `topk_weights` beside it (None for num_topk 0): both in the output arena, or neither."""
        recv_src_idx = reference._check_handle(handle, None, self.group_size)[3]
        num_rows = recv_src_idx.size(0)
        if self.runtime is not None and num_rows > 0:
            outputs = self.runtime.dispatch_outputs(num_rows, torch.bfloat16, hidden, 0, num_topk, False)
            if outputs is not None:
                return outputs[0], outputs[3]
        device = recv_src_idx.device
        weights = torch.empty((num_rows, num_topk), dtype=torch.float32, device=device) if num_topk > 0 else None
        return torch.empty((num_rows, hidden), dtype=torch.bfloat16, device=device), weights

    def internode_dispatch(
        self,
        x: Any,
        handle: Any = None,
        num_tokens_per_rank: Any = None,
        num_tokens_per_rdma_rank: Any = None,
        is_token_in_rank: Any = None,
        num_tokens_per_expert: Any = None,
        topk_idx: Any = None,
        topk_weights: Any = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Any:
        """Direct call of the internode kernels; `dispatch` already serves groups of any size."""
        raise _not_implemented("internode_dispatch (direct call of the internode kernels)", "internode")

    def internode_combine(
        self,
        x: Any,
        handle: Any,
        topk_weights: Any = None,
        bias: Any = None,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Any:
        """Direct call of the internode kernels; `combine` already serves groups of any size."""
        raise _not_implemented("internode_combine (direct call of the internode kernels)", "internode")

    # -----------------------------------------------------------------------------------------------------------
    # Low-latency mode

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        raise _not_implemented("clean_low_latency_buffer (low-latency mode)", "low-latency")

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> Any:
        raise _not_implemented("low_latency_dispatch (low-latency mode)", "low-latency")

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> Any:
        raise _not_implemented("low_latency_combine (low-latency mode)", "low-latency")

    def get_next_low_latency_combine_buffer(self, handle: object) -> Any:
        raise _not_implemented("get_next_low_latency_combine_buffer (low-latency mode)", "low-latency")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise _not_implemented("low_latency_update_mask_buffer (low-latency rank masking)", "low-latency")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise _not_implemented("low_latency_query_mask_buffer (low-latency rank masking)", "low-latency")

    def low_latency_clean_mask_buffer(self) -> None:
        raise _not_implemented("low_latency_clean_mask_buffer (low-latency rank masking)", "low-latency")

    # -----------------------------------------------------------------------------------------------------------
    # Internals

    def _open_nvl_buffer(self) -> None:
        """Allocates this rank's NVLink buffer, exchanges CUDA IPC handles over the group, maps the peers' buffers
        and runs one device-side barrier, which proves every mapping works."""
        ext = _ext.require_extension("the NVLink buffer")
        self.runtime = ext.NvlRuntime(
            self.rank, self.group_size, self.num_nvl_bytes, envs.timeout_secs(), envs.output_arena_bytes()
        )
        handles: list[Any] = [None] * self.group_size
        dist.all_gather_object(handles, self.runtime.ipc_handle(), group=self.group)
        self.runtime.open_peers(handles)
        with torch.cuda.stream(self._comm_stream):
            self.runtime.barrier()
        assert self._comm_stream is not None
        self._comm_stream.synchronize()

    def _check_nvl_bytes(self, config: Config, hidden_bytes: int, num_channels: int) -> None:
        """Raises ValueError, before any collective, when the rings of `config` do not fit the NVLink buffer."""
        hint = Config(2 * num_channels, 1, config.num_max_nvl_chunked_recv_tokens).get_nvl_buffer_size_hint(
            hidden_bytes, self.group_size
        )
        if hint > self.num_nvl_bytes:
            raise ValueError(
                f"num_nvl_bytes={self.num_nvl_bytes} of this Buffer is too small for {config} with rows of "
                f"{hidden_bytes} bytes: it needs {hint} (Config.get_nvl_buffer_size_hint); create the Buffer with "
                "a larger num_nvl_bytes or pass a config with fewer SMs or a smaller num_max_nvl_chunked_recv_tokens"
            )

    def _kernel_dispatch_fn(
        self,
        x: Any,
        handle: Optional[tuple],
        num_tokens_per_rank: Optional[torch.Tensor],
        is_token_in_rank: Optional[torch.Tensor],
        num_tokens_per_expert: Optional[torch.Tensor],
        topk_idx: Optional[torch.Tensor],
        topk_weights: Optional[torch.Tensor],
        expert_alignment: int,
        num_worst_tokens: int,
        config: Config,
        cached_topk_local_experts: Optional[int] = None,
    ) -> Callable[[], tuple]:
        """Checks a dispatch on the NVLink kernels (every check before the first collective) and returns the
        function that runs it. With `cached_topk_local_experts` (experts per rank), a cached dispatch also moves
        topk_idx / topk_weights, localised as a dispatch with layout does."""
        runtime, num_ranks = self.runtime, self.group_size
        data, scales = checks.split_dispatch_x(x)
        num_tokens, hidden, device = data.size(0), data.size(1), data.device
        checks.check_int("expert_alignment", expert_alignment, 1)
        checks.check_int("num_worst_tokens", num_worst_tokens, 0)
        hidden_bytes = hidden * max(data.element_size(), 2)
        cap, chunk = config.num_max_nvl_chunked_recv_tokens, config.num_max_nvl_chunked_send_tokens

        def new_outputs(num_rows: int, num_topk: int, with_src_idx: bool) -> tuple:
            """Returns: (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx), None for absent ones:
            in the output arena where there is room (the peers then write the rows directly), else fresh tensors."""
            num_scales = scales.size(1) if scales is not None else 0
            outputs = runtime.dispatch_outputs(num_rows, data.dtype, hidden, num_scales, num_topk, with_src_idx)
            if outputs is not None:
                return outputs
            recv_x = torch.empty((num_rows, hidden), dtype=data.dtype, device=device)
            recv_scales = None
            if scales is not None:
                recv_scales = torch.empty((num_rows, scales.size(1)), dtype=torch.float32, device=device)
            recv_idx = recv_w = None
            if num_topk > 0:
                recv_idx = torch.empty((num_rows, num_topk), dtype=torch.int64, device=device)
                recv_w = torch.empty((num_rows, num_topk), dtype=torch.float32, device=device)
            recv_src_idx = torch.empty((num_rows,), dtype=torch.int32, device=device) if with_src_idx else None
            return recv_x, recv_scales, recv_idx, recv_w, recv_src_idx

        if handle is not None:
            if (topk_idx is not None or topk_weights is not None) and cached_topk_local_experts is None:
                raise ValueError("dispatch with a handle (cached mode) takes no topk_idx/topk_weights")
            rank_prefix_matrix, _, recv_channel_prefix_matrix, cached_src_idx, _, send_head = reference._check_handle(
                handle, num_tokens, num_ranks
            )
            checks.check_tensor(
                "handle[2] (recv_channel_prefix_matrix)", recv_channel_prefix_matrix, dtype=torch.int32, dim=2
            )
            checks.check_tensor(
                "handle[5] (send_head)", send_head, dtype=torch.int32, shape=(num_tokens, num_ranks), device=device
            )
            num_channels = recv_channel_prefix_matrix.size(1)
            self._check_nvl_bytes(config, hidden_bytes, num_channels)
            num_out_rows = max(cached_src_idx.size(0), num_worst_tokens)
            num_topk = 0
            if cached_topk_local_experts is not None:
                checks.check_tensor(
                    "topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=device, contiguous=True
                )
                checks.check_tensor(
                    "topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), device=device,
                    contiguous=True,
                )  # fmt: skip
                num_topk = topk_idx.size(1)

            def run_cached() -> tuple:
                recv_x, recv_scales, recv_idx, recv_w, _ = new_outputs(num_out_rows, num_topk, False)
                runtime.prepare_rings()
                runtime.dispatch(
                    data, scales, topk_idx, topk_weights, send_head, rank_prefix_matrix, recv_x, recv_scales, None,
                    recv_idx, recv_w, cached_topk_local_experts or 1, num_channels, cap, chunk,
                )  # fmt: skip
                return (recv_x if scales is None else (recv_x, recv_scales)), recv_idx, recv_w, None, None

            return run_cached

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
        num_channels = config.num_channels
        self._check_nvl_bytes(config, hidden_bytes, num_channels)
        num_local_experts = num_experts // num_ranks
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        # NOTES: under CUDA graph capture no kernel runs, so the host cannot read the received counts: only the
        # fixed-size path (num_worst_tokens) can be captured, and its overflow check moves onto the device.
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing and num_worst_tokens == 0:
            raise RuntimeError(
                "dispatch cannot be captured in a CUDA graph with num_worst_tokens=0: the output size would need the "
                "received token count on the host (a synchronisation); pass num_worst_tokens > 0 (fixed-size "
                "outputs) or a handle (cached dispatch)"
            )

        def run() -> tuple:
            rpm, cpm, rcpm, send_head, _ = runtime.notify_dispatch(
                num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_channels, expert_alignment,
                num_worst_tokens, capturing,
            )  # fmt: skip
            if capturing:
                num_out_rows, per_expert = num_worst_tokens, []
            else:
                num_recv, per_expert, (overflow_rank, overflow_rows, overflow_worst) = runtime.wait_recv_counts(
                    num_local_experts
                )
                if overflow_rank >= 0:
                    # Every rank read the same counts, so every rank raises here and none enters the kernel.
                    raise ValueError(
                        f"num_worst_tokens={overflow_worst} on rank {overflow_rank} is smaller than the "
                        f"{overflow_rows} tokens that rank receives"
                    )
                num_out_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
            recv_x, recv_scales, recv_idx, recv_w, recv_src_idx = new_outputs(num_out_rows, num_topk, True)
            runtime.dispatch(
                data, scales, topk_idx, topk_weights, send_head, rpm, recv_x, recv_scales, recv_src_idx, recv_idx,
                recv_w, num_local_experts, num_channels, cap, chunk,
            )  # fmt: skip
            out_handle = (rpm, cpm, rcpm, recv_src_idx, is_token_in_rank, send_head)
            per_expert_list = [] if num_worst_tokens > 0 else list(per_expert)
            return (recv_x if scales is None else (recv_x, recv_scales)), recv_idx, recv_w, per_expert_list, out_handle

        return run

    def _kernel_combine_fn(
        self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor], bias: Any, config: Config
    ) -> Callable[[], tuple]:
        """Checks a combine on the NVLink kernels (before any collective) and returns the function that runs it."""
        runtime, num_ranks = self.runtime, self.group_size
        rank_prefix_matrix, _, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head = (
            reference._check_handle(handle, None, num_ranks)
        )
        num_rows, hidden, device = x.size(0), x.size(1), x.device
        if num_rows != recv_src_idx.size(0):
            raise ValueError(
                f"x must have as many rows as the dispatch returned ({recv_src_idx.size(0)}), got {num_rows}"
            )
        if is_token_in_rank.device != device:
            raise ValueError(f"x must be on {is_token_in_rank.device} like the handle, got {device}")
        num_tokens = is_token_in_rank.size(0)
        checks.check_tensor(
            "handle[2] (recv_channel_prefix_matrix)", recv_channel_prefix_matrix, dtype=torch.int32, dim=2
        )
        checks.check_tensor(
            "handle[5] (send_head)", send_head, dtype=torch.int32, shape=(num_tokens, num_ranks), device=device
        )
        if topk_weights is not None:
            checks.check_tensor(
                "topk_weights", topk_weights, dtype=torch.float32, shape=(num_rows, None), device=device,
                contiguous=True,
            )  # fmt: skip
            if not 1 <= topk_weights.size(1) <= reference.NUM_MAX_TOPK:
                raise ValueError(
                    f"topk_weights must have 1 to {reference.NUM_MAX_TOPK} columns (top-k), got {topk_weights.size(1)}"
                )
        biases = reference._split_bias(bias, num_tokens, hidden, x.dtype, device)
        bias_0 = biases[0] if len(biases) > 0 else None
        bias_1 = biases[1] if len(biases) > 1 else None
        self._check_nvl_bytes(config, hidden * 2, config.num_channels)
        allow_pull = envs.combine_pull()

        def run() -> tuple:
            combined_x = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)
            combined_w = None
            if topk_weights is not None:
                combined_w = torch.empty((num_tokens, topk_weights.size(1)), dtype=torch.float32, device=device)
            runtime.combine(
                x, topk_weights, rank_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank,
                send_head, bias_0, bias_1, combined_x, combined_w, config.num_sms,
                config.num_max_nvl_chunked_recv_tokens, config.num_max_nvl_chunked_send_tokens, allow_pull,
            )  # fmt: skip
            return combined_x, combined_w

        return run

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if self.device.type == "cuda":
            if not t.is_cuda:
                raise ValueError(f"{name} must be a CUDA tensor for a Buffer over an NCCL group, got {t.device}")
        elif t.device.type != "cpu":
            raise ValueError(
                f"{name} must be a CPU tensor for a Buffer over a {self.backend_name} group, got {t.device} "
                "(use an NCCL group for CUDA tensors)"
            )

    def _check_config(self, config: Optional[Config], op: str) -> Config:
        if config is None:
            return tuned.config_for(op, self.group_size, Buffer.num_sms)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a hybrid_ep.Config, got {checks.describe(config)}")
        return config.validate()

    def _on_comm_stream(
        self,
        fn: Callable[[], tuple],
        inputs: tuple,
        previous_event: Optional[EventOverlap],
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ) -> tuple[tuple, EventOverlap]:
        """Runs `fn` with DeepEP's stream semantics. Returns: (fn's outputs, EventOverlap)."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap, got {checks.describe(previous_event)}")
        comm_stream = self._comm_stream
        if comm_stream is None:
            outputs = fn()
            return outputs, EventOverlap(EventHandle.completed() if async_finish else None)

        compute_stream = torch.cuda.current_stream()
        if previous_event is not None and previous_event.event is not None:
            previous_event.event.stream_wait(comm_stream)
        else:
            comm_stream.wait_stream(compute_stream)
        with torch.cuda.stream(comm_stream):
            outputs = fn()
        # Outputs come from the comm stream's allocator pool and are used on the compute stream: record that use,
        # so the caching allocator does not hand their memory to the comm stream while compute still reads it.
        tensors = list(_tensors(outputs))
        for t in tensors:
            t.record_stream(compute_stream)
        if async_finish:
            for t in _tensors(inputs):
                t.record_stream(comm_stream)
            return outputs, EventOverlap(EventHandle(comm_stream), extra_tensors=tuple(tensors))
        compute_stream.wait_stream(comm_stream)
        return outputs, EventOverlap(None)


def _tensors(obj: Any):
    """Yields the CUDA tensors inside nested tuples/lists."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
