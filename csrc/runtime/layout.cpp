// Torch wrapper of the `get_dispatch_layout` kernel: checks the inputs, allocates the outputs on `topk_idx`'s
// device and enqueues the kernel on the current torch CUDA stream (asynchronous; no host synchronization).
// NOTES: c10/cuda headers rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit lacks; `c10::cuda::getCurrentCUDAStream` is the function `at::cuda::` re-exports.
// Preconditions: `topk_idx` entries are in [-1, num_experts); the kernel skips any other value, so an out-of-range
// entry is never written out of bounds, but the caller validates the range if it must be reported.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <optional>
#include <tuple>

#include "kernels/api.cuh"
#include "runtime/exception.hpp"
#include "runtime/layout.hpp"

namespace hybrid_ep::layout {

namespace {

// "[4, 64]" without iostreams (see runtime/exception.hpp).
std::string dims_text(at::IntArrayRef dims) {
    std::string out = "[";
    for (size_t i = 0; i < dims.size(); ++i)
        out += (i > 0 ? ", " : "") + std::to_string(dims[i]);
    return out + "]";
}

}  // namespace

// Arguments:
//     topk_idx: [num_tokens, num_topk] torch.int64 on a CUDA device, contiguous; -1 means "no expert".
//     num_experts: experts in total; a positive multiple of num_ranks.
//     num_ranks: ranks in total; rank r holds experts [r * L, (r + 1) * L), L = num_experts / num_ranks.
//     num_ranks_per_domain: P; domain d is ranks [d * P, (d + 1) * P). P >= num_ranks means one domain.
// Returns:
//     num_tokens_per_rank: [num_ranks] torch.int32, tokens with at least one expert on the rank.
//     num_tokens_per_domain: [num_ranks / P] torch.int32, tokens with at least one expert in the domain; None when
//         P >= num_ranks.
//     num_tokens_per_expert: [num_experts] torch.int32, (token, k) entries equal to the expert.
//     is_token_in_rank: [num_tokens, num_ranks] torch.bool.
std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> get_dispatch_layout(
    const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t num_ranks_per_domain) {
    HEP_CHECK(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor, got device ", topk_idx.device().str());
    HEP_CHECK(topk_idx.scalar_type() == at::kLong, "topk_idx must be torch.int64, got ",
              c10::toString(topk_idx.scalar_type()));
    HEP_CHECK(topk_idx.dim() == 2, "topk_idx must be 2-D [num_tokens, num_topk], got shape ",
              dims_text(topk_idx.sizes()));
    HEP_CHECK(topk_idx.is_contiguous(), "topk_idx must be contiguous, got strides ", dims_text(topk_idx.strides()),
              " for shape ", dims_text(topk_idx.sizes()));
    const int64_t num_tokens = topk_idx.size(0);
    const int64_t num_topk = topk_idx.size(1);
    HEP_CHECK(num_topk >= 1 && num_topk <= kernels::kMaxNumTopk, "topk_idx.size(1) (num_topk) must be in [1, ",
              kernels::kMaxNumTopk, "], got ", num_topk);
    HEP_CHECK(num_tokens <= INT_MAX, "topk_idx.size(0) (num_tokens) must be at most ", INT_MAX, ", got ", num_tokens);
    HEP_CHECK(num_experts > 0 && num_experts <= INT_MAX, "num_experts must be in [1, ", INT_MAX, "], got ",
              num_experts);
    HEP_CHECK(num_ranks > 0 && num_ranks <= INT_MAX, "num_ranks must be in [1, ", INT_MAX, "], got ", num_ranks);
    HEP_CHECK(num_experts % num_ranks == 0, "num_experts must be a multiple of num_ranks=", num_ranks, ", got ",
              num_experts);
    HEP_CHECK(num_ranks_per_domain > 0, "num_ranks_per_domain must be positive, got ", num_ranks_per_domain);
    const bool has_domains = num_ranks_per_domain < num_ranks;
    HEP_CHECK(!has_domains || num_ranks % num_ranks_per_domain == 0,
              "num_ranks_per_domain must divide num_ranks=", num_ranks, ", got ", num_ranks_per_domain);
    const int64_t num_domains = has_domains ? num_ranks / num_ranks_per_domain : 0;

    const c10::cuda::CUDAGuard device_guard(topk_idx.device());
    const auto int_options = at::TensorOptions().dtype(at::kInt).device(topk_idx.device());
    auto num_tokens_per_rank = at::empty({num_ranks}, int_options);
    auto num_tokens_per_expert = at::empty({num_experts}, int_options);
    auto is_token_in_rank = at::empty({num_tokens, num_ranks}, int_options.dtype(at::kBool));
    std::optional<at::Tensor> num_tokens_per_domain;
    if (has_domains)
        num_tokens_per_domain = at::empty({num_domains}, int_options);

    const kernels::DispatchLayoutParams params{
        topk_idx.data_ptr<int64_t>(),
        num_tokens_per_rank.data_ptr<int>(),
        has_domains ? num_tokens_per_domain->data_ptr<int>() : nullptr,
        num_tokens_per_expert.data_ptr<int>(),
        is_token_in_rank.data_ptr<bool>(),
        static_cast<int>(num_tokens),
        static_cast<int>(num_topk),
        static_cast<int>(num_experts),
        static_cast<int>(num_ranks),
        static_cast<int>(num_ranks_per_domain),
        static_cast<int>(num_domains),
    };
    int num_sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, topk_idx.device().index()));
    kernels::get_dispatch_layout(params, num_sms, c10::cuda::getCurrentCUDAStream());
    return {num_tokens_per_rank, num_tokens_per_domain, num_tokens_per_expert, is_token_in_rank};
}

void register_apis(pybind11::module_& m) {
    m.def("get_dispatch_layout", &get_dispatch_layout, pybind11::arg("topk_idx"), pybind11::arg("num_experts"),
          pybind11::arg("num_ranks"), pybind11::arg("num_ranks_per_domain"),
          "Dispatch layout of topk_idx [num_tokens, num_topk] int64 (-1 = no expert). Returns (num_tokens_per_rank "
          "[num_ranks] int32, num_tokens_per_domain [num_ranks / num_ranks_per_domain] int32 or None when "
          "num_ranks_per_domain >= num_ranks, num_tokens_per_expert [num_experts] int32, is_token_in_rank "
          "[num_tokens, num_ranks] bool), computed on the current CUDA stream.");
}

}  // namespace hybrid_ep::layout
