// Torch wrappers of the permuted-layout kernels (kernels/permute.cu): check the inputs, allocate the output on the
// input's device and enqueue the kernel on the current torch CUDA stream (no host synchronisation, so they are
// safe inside CUDA graph capture).
// Preconditions: none; every input is checked here, indices on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <optional>

#include "kernels/api.cuh"
#include "runtime/exception.hpp"
#include "runtime/permute.hpp"

namespace hybrid_ep::permute {

namespace {

int device_num_sms(const at::Tensor& t) {
    int num_sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, t.device().index()));
    return num_sms;
}

void check_cuda_2d(const char* name, const at::Tensor& t) {
    HEP_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device().str());
    HEP_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dimensions");
    HEP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// Arguments:
//     src: [num_src_rows, W] CUDA tensor of any dtype, contiguous.
//     row_of: [num_out_rows] torch.int64 on src's device, contiguous: the source row of each output row, or -1 for a
//         zero row; entries >= num_src_rows stop the kernel.
// Returns: [num_out_rows, W] of src's dtype.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& row_of) {
    check_cuda_2d("src", src);
    HEP_CHECK(row_of.is_cuda() && row_of.device() == src.device(), "row_of must be on src's device ",
              src.device().str(), ", got ", row_of.device().str());
    HEP_CHECK(row_of.scalar_type() == at::kLong, "row_of must be torch.int64, got ",
              c10::toString(row_of.scalar_type()));
    HEP_CHECK(row_of.dim() == 1 && row_of.is_contiguous(), "row_of must be 1-D and contiguous, got ", row_of.dim(),
              " dimensions");
    const c10::cuda::CUDAGuard device_guard(src.device());
    auto out = at::empty({row_of.size(0), src.size(1)}, src.options());
    const kernels::GatherRowsParams params{
        static_cast<const uint8_t*>(src.data_ptr()),
        static_cast<uint8_t*>(out.data_ptr()),
        row_of.data_ptr<int64_t>(),
        src.size(0),
        row_of.size(0),
        src.size(1) * static_cast<int64_t>(src.element_size()),
    };
    kernels::gather_rows(params, device_num_sms(src), c10::cuda::getCurrentCUDAStream());
    return out;
}

// Arguments:
//     hidden: [num_hidden_rows, H] torch.bfloat16 CUDA tensor, contiguous, H a multiple of 8.
//     positions: [num_rows, L] torch.int64 on hidden's device, contiguous: the rows of hidden to sum for each output
//         row, -1 for none; at most kMaxRowCopies per row, each < num_hidden_rows (else the kernel stops).
//     out: where the sums go, [num_rows, H] torch.bfloat16 on hidden's device, contiguous (a combine input in the
//         output arena, say); None for a new tensor.
// Returns: [num_rows, H] torch.bfloat16 (`out` when given), the fp32 sums in ascending column order, rounded once.
at::Tensor sum_row_copies(const at::Tensor& hidden, const at::Tensor& positions, const std::optional<at::Tensor>& out) {
    check_cuda_2d("hidden", hidden);
    check_cuda_2d("positions", positions);
    HEP_CHECK(hidden.scalar_type() == at::kBFloat16, "hidden must be torch.bfloat16, got ",
              c10::toString(hidden.scalar_type()));
    HEP_CHECK(hidden.size(1) % 8 == 0 && hidden.size(1) > 0 && hidden.size(1) <= INT_MAX,
              "hidden.size(1) must be a positive multiple of 8, got ", hidden.size(1));
    HEP_CHECK(positions.device() == hidden.device(), "positions must be on hidden's device ", hidden.device().str(),
              ", got ", positions.device().str());
    HEP_CHECK(positions.scalar_type() == at::kLong, "positions must be torch.int64, got ",
              c10::toString(positions.scalar_type()));
    HEP_CHECK(positions.size(1) <= INT_MAX, "positions.size(1) must be at most ", INT_MAX);
    if (out.has_value()) {
        HEP_CHECK(out->device() == hidden.device(), "out must be on hidden's device ", hidden.device().str(), ", got ",
                  out->device().str());
        HEP_CHECK(out->scalar_type() == at::kBFloat16, "out must be torch.bfloat16, got ",
                  c10::toString(out->scalar_type()));
        HEP_CHECK(out->dim() == 2, "out must be 2-D, got ", out->dim(), " dimensions");
        HEP_CHECK(out->size(0) == positions.size(0) && out->size(1) == hidden.size(1), "out must have shape [",
                  positions.size(0), ", ", hidden.size(1), "], got [", out->size(0), ", ", out->size(1), "]");
        HEP_CHECK(out->is_contiguous(), "out must be contiguous");
    }
    const c10::cuda::CUDAGuard device_guard(hidden.device());
    const at::Tensor sums = out.has_value() ? *out : at::empty({positions.size(0), hidden.size(1)}, hidden.options());
    const kernels::SumRowCopiesParams params{
        hidden.data_ptr(),
        sums.data_ptr(),
        positions.data_ptr<int64_t>(),
        hidden.size(0),
        positions.size(0),
        static_cast<int>(positions.size(1)),
        static_cast<int>(hidden.size(1)),
    };
    kernels::sum_row_copies(params, device_num_sms(hidden), c10::cuda::getCurrentCUDAStream());
    return sums;
}

void register_apis(pybind11::module_& m) {
    m.def("gather_rows", &gather_rows, pybind11::arg("src"), pybind11::arg("row_of"),
          "Rows of src [R, W] (any dtype) picked by row_of [M] int64 (-1: a zero row). Returns [M, W] of src's dtype, "
          "computed on the current CUDA stream.");
    m.def("sum_row_copies", &sum_row_copies, pybind11::arg("hidden"), pybind11::arg("positions"),
          pybind11::arg("out") = pybind11::none(),
          "For each row of positions [N, L] int64 (-1: none), the fp32 sum of the rows of hidden [R, H] bfloat16 it "
          "names, in ascending column order, rounded once. Returns [N, H] bfloat16 (out, when given: contiguous, "
          "on hidden's device), on the current CUDA stream.");
}

}  // namespace hybrid_ep::permute
