"""Input checks shared by the reference and the kernel paths.

Every check raises ValueError (TypeError for a wrong Python type) naming the argument, what was expected and what
was given. They run on the calling rank before any communication, so a rejected call leaves the Buffer and the group
ready for the next call. Checks of tensor values (expert index range, layout consistency) read device memory; they
are skipped during CUDA graph capture and when HYBRID_EP_CHECK_INPUTS=0.
"""

from __future__ import annotations

from typing import Any

import torch

from . import envs
from .config import NUM_MAX_TOPK

FP8_DTYPE = torch.float8_e4m3fn
# Channels that share one fp32 scale in the FP8 format.
FP8_SCALE_BLOCK = 128


def value_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """Returns: whether value checks may read `tensors` now (not while a CUDA graph is being captured)."""
    if not envs.check_inputs():
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


def describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor(shape={list(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__} {t!r}"[:200]


def check_tensor(
    name: str,
    t: Any,
    *,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    dim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Checks that `t` is a tensor with the given properties; `None` entries of `shape` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if dtype is not None:
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            expected = " or ".join(str(d) for d in dtypes)
            raise ValueError(f"{name} must have dtype {expected}, got {t.dtype}")
    if shape is not None:
        dim = len(shape)
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {list(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"{name} must have shape {expected}, got {list(t.shape)} (dimension {axis} differs)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {list(t.stride())} for shape {list(t.shape)}")
    return t


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_num_experts(num_experts: Any, num_ranks: int, name: str = "num_experts") -> int:
    check_int(name, num_experts, 1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"{name}={num_experts} must be divisible by the number of ranks ({num_ranks})")
    return num_experts


def check_topk_idx(
    topk_idx: Any,
    *,
    num_experts: int | None,
    num_tokens: int | None = None,
    device: torch.device | None = None,
    name: str = "topk_idx",
) -> torch.Tensor:
    """Checks `[num_tokens, num_topk]` int64 with entries in [-1, num_experts) (-1: no expert)."""
    check_tensor(name, topk_idx, dtype=torch.int64, shape=(num_tokens, None), device=device, contiguous=True)
    num_topk = topk_idx.size(1)
    if not 1 <= num_topk <= NUM_MAX_TOPK:
        raise ValueError(f"{name} must have 1 to {NUM_MAX_TOPK} columns (top-k), got {num_topk}")
    if num_experts is not None and topk_idx.numel() > 0 and value_checks_enabled(topk_idx):
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        if bool(bad.any()):
            position = [int(v) for v in bad.nonzero()[0].tolist()]
            value = int(topk_idx[position[0], position[1]])
            raise ValueError(
                f"{name} entries must be -1 or expert indices in [0, {num_experts}), got {value} at {position}"
            )
    return topk_idx


def check_topk_weights(topk_weights: Any, topk_idx: torch.Tensor | None, *, name: str = "topk_weights") -> torch.Tensor:
    shape = tuple(topk_idx.shape) if topk_idx is not None else (None, None)
    device = topk_idx.device if topk_idx is not None else None
    return check_tensor(name, topk_weights, dtype=torch.float32, shape=shape, device=device, contiguous=True)


def split_dispatch_x(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks dispatch's `x`: a BF16 `[N, H]` tensor, or an FP8 tuple `(x [N, H] float8_e4m3fn, scales [N, H/128]
    float32, any strides)`. Returns: (data, scales or None)."""
    if isinstance(x, torch.Tensor):
        check_tensor("x", x, dtype=torch.bfloat16, dim=2, contiguous=True)
        if (x.size(1) * x.element_size()) % 16 != 0:
            raise ValueError(f"x: hidden size {x.size(1)} must be a multiple of 8 for bfloat16 (16-byte rows)")
        return x, None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"x as a tuple must be (x_fp8, scales), got {len(x)} elements")
        data, scales = x
        check_tensor("x[0]", data, dtype=FP8_DTYPE, dim=2, contiguous=True)
        hidden = data.size(1)
        if hidden % FP8_SCALE_BLOCK != 0:
            raise ValueError(f"x[0]: FP8 hidden size must be a multiple of {FP8_SCALE_BLOCK}, got {hidden}")
        check_tensor(
            "x[1] (scales)",
            scales,
            dtype=torch.float32,
            shape=(data.size(0), hidden // FP8_SCALE_BLOCK),
            device=data.device,
        )
        return data, scales
    raise TypeError(f"x must be a bfloat16 tensor or a (float8_e4m3fn tensor, float32 scales) tuple, got {describe(x)}")


def check_combine_x(x: Any) -> torch.Tensor:
    """Checks combine's `x`: `[num_recv_tokens, hidden]` torch.bfloat16, contiguous, hidden a multiple of 8."""
    check_tensor("x", x, dtype=torch.bfloat16, dim=2, contiguous=True)
    if (x.size(1) * x.element_size()) % 16 != 0:
        raise ValueError(f"x: hidden size {x.size(1)} must be a multiple of 8 for bfloat16 (16-byte rows)")
    return x


def check_layout(
    *,
    num_tokens: int,
    num_ranks: int,
    device: torch.device,
    num_tokens_per_rank: Any,
    is_token_in_rank: Any,
    num_tokens_per_expert: Any,
) -> int:
    """Checks the layout arguments of a non-cached dispatch. Returns: num_experts."""
    if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
        missing = [
            n
            for n, v in (
                ("num_tokens_per_rank", num_tokens_per_rank),
                ("is_token_in_rank", is_token_in_rank),
                ("num_tokens_per_expert", num_tokens_per_expert),
            )
            if v is None
        ]
        raise ValueError(
            f"dispatch without a handle needs the layout from get_dispatch_layout; missing: {', '.join(missing)}"
        )
    check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, shape=(num_ranks,), device=device)
    check_tensor(
        "is_token_in_rank",
        is_token_in_rank,
        dtype=torch.bool,
        shape=(num_tokens, num_ranks),
        device=device,
        contiguous=True,
    )
    check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, dim=1, device=device)
    num_experts = check_num_experts(num_tokens_per_expert.size(0), num_ranks, "num_tokens_per_expert.size(0)")
    if value_checks_enabled(is_token_in_rank):
        counted = is_token_in_rank.sum(0, dtype=torch.int32)
        if not torch.equal(counted, num_tokens_per_rank):
            raise ValueError(
                f"num_tokens_per_rank {num_tokens_per_rank.tolist()} does not match the column sums of "
                f"is_token_in_rank {counted.tolist()}"
            )
    return num_experts


def check_dispatch_routing(
    *,
    num_tokens: int,
    num_ranks: int,
    device: torch.device,
    num_tokens_per_rank: Any,
    is_token_in_rank: Any,
    num_tokens_per_expert: Any,
    topk_idx: Any,
    topk_weights: Any,
) -> int:
    """Checks the layout tensors and the optional top-k pair of a non-cached dispatch (ValueError naming the argument).

    Returns: the global number of experts, `num_tokens_per_expert.size(0)`.
    """
    num_experts = check_layout(
        num_tokens=num_tokens,
        num_ranks=num_ranks,
        device=device,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
    )
    if (topk_idx is None) != (topk_weights is None):
        raise ValueError("topk_idx and topk_weights must be given together (or both None)")
    if topk_idx is not None:
        check_topk_idx(topk_idx, num_experts=num_experts, num_tokens=num_tokens, device=device)
        check_topk_weights(topk_weights, topk_idx)
    return num_experts
