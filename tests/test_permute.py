"""The row movers of HybridEPBuffer's permuted layout (`hybrid_ep._C.gather_rows`, `sum_row_copies`) against
torch: gathers bitwise for every row width and dtype, copy sums bitwise against an fp32 sum in ascending column
order, and every rejected input names its argument."""

from __future__ import annotations

import pytest
import torch

from hybrid_ep import _ext

from distributed import requires_gpus


def kernels():
    if not _ext.has_extension() or not hasattr(_ext._C, "gather_rows"):
        pytest.skip("the extension hybrid_ep._C with the permuted-layout kernels is not built")
    return _ext._C


@requires_gpus(1)
@pytest.mark.parametrize(
    ("dtype", "width"),
    [
        (torch.bfloat16, 7168),  # 16-byte vectors
        (torch.float8_e4m3fn, 7168),
        (torch.float32, 56),  # FP8 scales of hidden 7168
        (torch.float32, 3),  # 4-byte words
        (torch.uint8, 5),  # bytes
    ],
)
@pytest.mark.parametrize("num_out", [0, 1, 1000])
def test_gather_rows(dtype: torch.dtype, width: int, num_out: int) -> None:
    C = kernels()
    g = torch.Generator(device="cuda").manual_seed(0)
    num_src = 300
    src = torch.randint(
        0,
        256,
        (num_src, width * torch.empty((), dtype=dtype).element_size()),
        generator=g,
        device="cuda",
        dtype=torch.uint8,
    ).view(dtype)
    row_of = torch.randint(-1, num_src, (num_out,), generator=g, device="cuda")
    out = C.gather_rows(src, row_of)
    expected = torch.cat([src.view(torch.uint8), src.view(torch.uint8).new_zeros((1, src.view(torch.uint8).size(1)))])
    expected = expected.index_select(0, torch.where(row_of < 0, num_src, row_of))
    assert out.dtype == dtype and tuple(out.shape) == (num_out, width)
    assert torch.equal(out.view(torch.uint8), expected)


def reference_sum(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 sum from +0.0 over the columns of `positions` in ascending order, missing (-1) copies skipped."""
    acc = torch.zeros((positions.size(0), hidden.size(1)), dtype=torch.float32, device=hidden.device)
    for col in range(positions.size(1)):
        column = positions[:, col]
        rows = hidden.index_select(0, column.clamp(min=0)).float()
        acc = torch.where((column >= 0).unsqueeze(1), acc + rows, acc)
    return acc.to(torch.bfloat16)


@requires_gpus(1)
@pytest.mark.parametrize(
    ("num_rows", "num_local_experts", "hidden"), [(0, 8, 64), (1, 1, 8), (2000, 64, 7168), (777, 40, 2056)]
)
def test_sum_row_copies(num_rows: int, num_local_experts: int, hidden: int) -> None:
    C = kernels()
    g = torch.Generator(device="cuda").manual_seed(1)
    num_topk = 8
    # Each row names up to num_topk distinct rows of `values` at random columns, as the permuted layout does.
    picked = torch.rand((num_rows, num_local_experts), generator=g, device="cuda")
    limit = picked.topk(min(num_topk, num_local_experts), dim=1).values[:, -1:] if num_rows else picked
    mask = (picked >= limit) & (torch.rand((num_rows, num_local_experts), generator=g, device="cuda") < 0.5)
    num_values = int(mask.sum()) + 1
    positions = torch.full((num_rows, num_local_experts), -1, dtype=torch.int64, device="cuda")
    positions[mask] = torch.randperm(num_values - 1, generator=g, device="cuda")
    values = torch.randn((num_values, hidden), generator=g, device="cuda").to(torch.bfloat16)
    out = C.sum_row_copies(values, positions)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (num_rows, hidden)
    assert torch.equal(out, reference_sum(values, positions))
    assert torch.equal(C.sum_row_copies(values, positions), out), "not deterministic"
    # Into a given tensor (a combine input in the output arena, say): the same sums, in place.
    given = torch.full((num_rows, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    returned = C.sum_row_copies(values, positions, given)
    assert returned.data_ptr() == given.data_ptr() and torch.equal(given, out)


@requires_gpus(1)
def test_rejected_inputs_name_the_argument() -> None:
    C = kernels()
    x = torch.zeros((4, 8), dtype=torch.bfloat16, device="cuda")
    idx = torch.zeros(4, dtype=torch.int64, device="cuda")
    cases = [
        ("src", lambda: C.gather_rows(x.cpu(), idx)),
        ("src", lambda: C.gather_rows(x.t(), idx)),
        ("row_of", lambda: C.gather_rows(x, idx.int())),
        ("row_of", lambda: C.gather_rows(x, idx.view(2, 2))),
        ("hidden", lambda: C.sum_row_copies(x.float(), idx.view(4, 1))),
        ("hidden", lambda: C.sum_row_copies(x[:, :4], idx.view(4, 1))),
        ("positions", lambda: C.sum_row_copies(x, idx.int().view(4, 1))),
        ("positions", lambda: C.sum_row_copies(x, idx)),
        ("out", lambda: C.sum_row_copies(x, idx.view(4, 1), x.float())),
        ("out", lambda: C.sum_row_copies(x, idx.view(4, 1), x[:2])),
        ("out", lambda: C.sum_row_copies(x, idx.view(4, 1), x.t().contiguous().t())),
        ("out", lambda: C.sum_row_copies(x, idx.view(4, 1), x.cpu())),
    ]
    for name, call in cases:
        with pytest.raises(RuntimeError, match=name):
            call()
    # Still usable after the rejections.
    assert torch.equal(C.gather_rows(x, idx), x[idx])
