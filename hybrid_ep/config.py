"""`Config`: the tunables of the normal-mode kernels, with DeepEP v1's constructor and size hints.

A Config is plain data. `validate()` names every bad value at once. The recommended configs per rank count are
data too (`RECOMMENDED_CONFIGS`), read by `Buffer.get_dispatch_config` / `Buffer.get_combine_config`.
"""

from __future__ import annotations

# Ranks that share one NVLink domain in the DeepEP v1 sizing rules (one HGX board).
NUM_MAX_NVL_PEERS = 8
# Widest top-k the normal-mode kernels accept.
NUM_MAX_TOPK = 32


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class Config:
    """Tunables of one normal-mode dispatch or combine call.

    Arguments:
        num_sms: SMs (thread blocks) the kernel may use; even, since blocks work in sender/receiver pairs.
        num_max_nvl_chunked_send_tokens: tokens a sender moves per step into a peer's NVLink ring.
        num_max_nvl_chunked_recv_tokens: capacity in tokens of one NVLink ring (per channel and peer).
        num_max_rdma_chunked_send_tokens: the same for the network rings (internode).
        num_max_rdma_chunked_recv_tokens: the same for the network rings; rounded up to a multiple of the send
            chunk, as DeepEP does.
    """

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens
        if _is_int(num_max_rdma_chunked_send_tokens) and num_max_rdma_chunked_send_tokens > 0:
            if _is_int(num_max_rdma_chunked_recv_tokens):
                self.num_max_rdma_chunked_recv_tokens = _align(
                    num_max_rdma_chunked_recv_tokens, num_max_rdma_chunked_send_tokens
                )
        self.validate()

    def validate(self) -> Config:
        """Raises ValueError naming every field that is out of range; returns self otherwise."""
        errors = []
        fields = (
            "num_sms",
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        )
        for name in fields:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                errors.append(f"{name}={value!r} must be a positive int")
        if not errors:
            if self.num_sms % 2 != 0:
                errors.append(f"num_sms={self.num_sms} must be even (blocks work in sender/receiver pairs)")
            if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
                errors.append(
                    f"num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens} must be smaller than "
                    f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}"
                )
            if self.num_max_rdma_chunked_send_tokens * 2 > self.num_max_rdma_chunked_recv_tokens:
                errors.append(
                    f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens} must be at most half "
                    f"of num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens}"
                )
        if errors:
            raise ValueError("invalid Config: " + "; ".join(errors))
        return self

    @property
    def num_channels(self) -> int:
        """Returns: channels (sender/receiver block pairs), `num_sms // 2`."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer that normal-mode calls with this config need.

        Arguments:
            hidden_bytes: bytes of one token row at BF16 width (`hidden * max(element_size, 2)`, as in DeepEP).
            num_ranks: ranks of the group.
        Returns:
            int, a multiple of 128.
        """
        _check_positive_int("hidden_bytes", hidden_bytes)
        _check_positive_int("num_ranks", num_ranks)
        # The kernels' layout (csrc/device/layout.cuh, ring_bytes_hint): one ring per (block, rank), each of
        # num_max_nvl_chunked_recv_tokens slots; a slot is the row plus the larger of the dispatch metadata (source
        # token, top-k indices and weights for top-k up to 32, one fp32 scale per 128 channels, the receive row at
        # each of up to 8 ranks) and the combine one, padded to 128 bytes.
        dispatch_meta = _align(8 + 12 * NUM_MAX_TOPK + 4 * (hidden_bytes // 256) + 4 * NUM_MAX_NVL_PEERS, 16)
        combine_meta = _align(4 + 4 * NUM_MAX_TOPK, 16)
        slot_bytes = _align(_align(hidden_bytes, 16) + max(dispatch_meta, combine_meta), 128)
        return _align(self.num_sms * num_ranks * self.num_max_nvl_chunked_recv_tokens * slot_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of network (NVSHMEM) buffer that normal-mode calls need: 0 within one NVLink domain.

        Arguments:
            hidden_bytes: as for `get_nvl_buffer_size_hint`.
            num_ranks: ranks of the group.
        Returns:
            int, a multiple of 128.
        """
        _check_positive_int("hidden_bytes", hidden_bytes)
        _check_positive_int("num_ranks", num_ranks)
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        num_rdma_ranks = num_ranks // NUM_MAX_NVL_PEERS
        num_rings = self.num_channels * num_rdma_ranks
        slot_bytes = _align(hidden_bytes + hidden_bytes // 64 + NUM_MAX_TOPK * (8 + 4) + 4 + 64, 16)
        # Send and receive rings, plus head/tail counters.
        return _align(2 * num_rings * (self.num_max_rdma_chunked_recv_tokens * slot_bytes + 16), 128)

    def __repr__(self) -> str:
        return (
            f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
            f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
            f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
            f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and repr(self) == repr(other)


# Recommended (nvl_send, nvl_recv, rdma_send, rdma_recv) per op, rank count and SM count; the Config gets the SM
# count asked for (Buffer.num_sms) and the chunk sizes listed for the nearest SM count (the smaller of two equally
# near). Rank counts not listed fall back to DEFAULT_CHUNKS. From the tuner's sweep on 4 H200 GPUs (standard
# workload, run with 2 and with 4 ranks; docs/design.md has the figures): dispatch wants small rings from 20 SMs on
# at 4 ranks (BF16 412-416 GB/s with 32-row rings, against 341-347 with 256), FP8 dispatch and combine do not.
# 8 ranks keep the values of the first sweep until measured. `python -m hybrid_ep.tune` writes tuned ones.
DEFAULT_CHUNKS = (12, 256, 6, 128)
RECOMMENDED_CONFIGS = {
    "dispatch": {
        2: {8: (24, 256, 6, 128), 24: (16, 256, 6, 128)},
        4: {8: (16, 128, 6, 128), 16: (12, 128, 6, 128), 20: (8, 32, 6, 128)},
        8: {8: (12, 256, 6, 128)},
    },
    "dispatch_fp8": {
        2: {8: (24, 256, 6, 128)},
        4: {
            8: (16, 256, 6, 128),
            12: (24, 256, 6, 128),
            16: (16, 96, 6, 128),
            20: (24, 128, 6, 128),
            24: (16, 256, 6, 128),
        },
        8: {8: (12, 256, 6, 128)},
    },
    "combine": {
        2: {8: (2, 256, 6, 128)},
        4: {8: (8, 64, 6, 128), 12: (8, 256, 6, 128), 16: (8, 64, 6, 128), 20: (6, 256, 6, 128), 24: (4, 256, 6, 128)},
        8: {8: (6, 64, 6, 128)},
    },
}


def recommended_config(op: str, num_ranks: int, num_sms: int) -> Config:
    """Returns: the recommended Config of `op` ("dispatch", "dispatch_fp8" or "combine") for `num_ranks` ranks and
    `num_sms` SMs."""
    if op not in RECOMMENDED_CONFIGS:
        raise ValueError(f"op={op!r}: expected one of {', '.join(repr(o) for o in RECOMMENDED_CONFIGS)}")
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_sms", num_sms)
    by_num_sms = RECOMMENDED_CONFIGS[op].get(num_ranks)
    if by_num_sms is None:
        return Config(num_sms, *DEFAULT_CHUNKS)
    nearest = min(by_num_sms, key=lambda s: (abs(s - num_sms), s))
    return Config(num_sms, *by_num_sms[nearest])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name}={value!r} must be a positive int")
