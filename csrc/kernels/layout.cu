// `get_dispatch_layout`: from `topk_idx [num_tokens, num_topk]` counts the tokens sent to each rank and domain,
// the (token, k) entries of each expert, and marks which ranks each token goes to.
// Work split: a warp handles 32 / G tokens at a time, G = num_topk rounded up to a power of two, one lane per
// (token, k) entry; lanes that see the same (token, rank) or (token, domain) elect one leader with
// `__match_any_sync`, so a token counts once per rank and per domain however many of its experts live there.
// Counters live in shared memory when they fit (flushed to global with one atomic per non-zero counter), else in
// global memory directly.
// Preconditions: outputs are device memory of the current device; the launcher zeroes them before the kernel.
#include <algorithm>
#include <cstdint>

#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "kernels/launch.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

constexpr int kNumThreads = 256;
constexpr int kNumBlocksPerSM = 4;
constexpr size_t kMaxNumSmemBytes = 48 * 1024;

template <bool kUseSmemCounters>
__global__ void __launch_bounds__(kNumThreads)
    get_dispatch_layout_kernel(const __grid_constant__ DispatchLayoutParams params) {
    // Counters: [num_experts | num_ranks | num_domains], in shared memory or the global outputs themselves.
    extern __shared__ int smem_counters[];
    int* expert_counters = params.num_tokens_per_expert;
    int* rank_counters = params.num_tokens_per_rank;
    int* domain_counters = params.num_tokens_per_domain;
    const int num_counters = params.num_experts + params.num_ranks + params.num_domains;
    if constexpr (kUseSmemCounters) {
        for (int i = threadIdx.x; i < num_counters; i += blockDim.x)
            smem_counters[i] = 0;
        expert_counters = smem_counters;
        rank_counters = smem_counters + params.num_experts;
        domain_counters = rank_counters + params.num_ranks;
        __syncthreads();
    }

    // Lane `lane_idx` reads entry `k_idx` of token `token_slot` of this warp's group of tokens.
    const int lane_idx = static_cast<int>(threadIdx.x) % kWarpSize;
    const int group_size = params.num_topk == 1 ? 1 : 1 << (32 - __clz(params.num_topk - 1));
    const int num_tokens_per_warp = kWarpSize / group_size;
    const int token_slot = lane_idx / group_size;
    const int k_idx = lane_idx % group_size;
    const int num_experts_per_rank = params.num_experts / params.num_ranks;

    // NOTES: the loop bound depends only on the warp, so all 32 lanes reach every `__match_any_sync`.
    const int64_t warp_idx = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
    for (int64_t first_token_idx = warp_idx * num_tokens_per_warp; first_token_idx < params.num_tokens;
         first_token_idx += num_warps * num_tokens_per_warp) {
        const int64_t token_idx = first_token_idx + token_slot;
        int expert_idx = -1;
        if (token_idx < params.num_tokens && k_idx < params.num_topk) {
            const int64_t value = params.topk_idx[token_idx * params.num_topk + k_idx];
            if (value >= 0 && value < params.num_experts)
                expert_idx = static_cast<int>(value);
        }
        const bool is_valid = expert_idx >= 0;
        const int rank_idx = is_valid ? expert_idx / num_experts_per_rank : -1;
        if (is_valid)
            atomicAdd(expert_counters + expert_idx, 1);

        // NOTES: keys are (token, rank) so that lanes of different tokens never match; invalid lanes share a key
        // no valid lane can have, and are skipped.
        const uint64_t rank_key =
            is_valid ? (static_cast<uint64_t>(token_idx) << 32) | static_cast<uint32_t>(rank_idx) : ~0ull;
        const uint32_t rank_peers = __match_any_sync(0xffffffffu, rank_key);
        if (is_valid && __ffs(rank_peers) - 1 == lane_idx) {
            atomicAdd(rank_counters + rank_idx, 1);
            params.is_token_in_rank[token_idx * params.num_ranks + rank_idx] = true;
        }

        if (params.num_domains > 0) {
            const int domain_idx = is_valid ? rank_idx / params.num_ranks_per_domain : -1;
            const uint64_t domain_key =
                is_valid ? (static_cast<uint64_t>(token_idx) << 32) | static_cast<uint32_t>(domain_idx) : ~0ull;
            const uint32_t domain_peers = __match_any_sync(0xffffffffu, domain_key);
            if (is_valid && __ffs(domain_peers) - 1 == lane_idx)
                atomicAdd(domain_counters + domain_idx, 1);
        }
    }

    if constexpr (kUseSmemCounters) {
        __syncthreads();
        for (int i = threadIdx.x; i < num_counters; i += blockDim.x) {
            const int count = smem_counters[i];
            if (count == 0)
                continue;
            if (i < params.num_experts)
                atomicAdd(params.num_tokens_per_expert + i, count);
            else if (i < params.num_experts + params.num_ranks)
                atomicAdd(params.num_tokens_per_rank + (i - params.num_experts), count);
            else
                atomicAdd(params.num_tokens_per_domain + (i - params.num_experts - params.num_ranks), count);
        }
    }
}

}  // namespace

void get_dispatch_layout(const DispatchLayoutParams& params, int num_sms, cudaStream_t stream) {
    HEP_CHECK(params.num_topk >= 1 && params.num_topk <= kMaxNumTopk, "get_dispatch_layout: num_topk must be in [1, ",
              kMaxNumTopk, "], got ", params.num_topk);
    HEP_CHECK(params.num_tokens >= 0, "get_dispatch_layout: num_tokens must be >= 0, got ", params.num_tokens);
    HEP_CHECK(params.num_ranks > 0 && params.num_experts > 0 && params.num_experts % params.num_ranks == 0,
              "get_dispatch_layout: num_experts (", params.num_experts, ") must be a positive multiple of num_ranks (",
              params.num_ranks, ")");
    HEP_CHECK(params.num_tokens_per_rank != nullptr && params.num_tokens_per_expert != nullptr,
              "get_dispatch_layout: num_tokens_per_rank and num_tokens_per_expert are required");
    HEP_CHECK(params.num_tokens == 0 || (params.topk_idx != nullptr && params.is_token_in_rank != nullptr),
              "get_dispatch_layout: topk_idx and is_token_in_rank are required when there are tokens");
    if (params.num_domains > 0) {
        HEP_CHECK(params.num_tokens_per_domain != nullptr,
                  "get_dispatch_layout: num_tokens_per_domain is required with num_domains > 0");
        HEP_CHECK(
            params.num_ranks_per_domain > 0 && params.num_domains * params.num_ranks_per_domain == params.num_ranks,
            "get_dispatch_layout: num_domains (", params.num_domains, ") times num_ranks_per_domain (",
            params.num_ranks_per_domain, ") must equal num_ranks (", params.num_ranks, ")");
    }
    HEP_CHECK(num_sms > 0, "get_dispatch_layout: num_sms must be positive, got ", num_sms);

    // NOTES: the kernel only adds to the outputs, so they are zeroed first; with no tokens this is all there is.
    CUDA_CHECK(cudaMemsetAsync(params.num_tokens_per_rank, 0, sizeof(int) * params.num_ranks, stream));
    CUDA_CHECK(cudaMemsetAsync(params.num_tokens_per_expert, 0, sizeof(int) * params.num_experts, stream));
    if (params.num_domains > 0)
        CUDA_CHECK(cudaMemsetAsync(params.num_tokens_per_domain, 0, sizeof(int) * params.num_domains, stream));
    if (params.num_tokens == 0)
        return;
    CUDA_CHECK(cudaMemsetAsync(params.is_token_in_rank, 0,
                               sizeof(bool) * static_cast<size_t>(params.num_tokens) * params.num_ranks, stream));

    const size_t num_counter_bytes =
        sizeof(int) * (static_cast<size_t>(params.num_experts) + params.num_ranks + params.num_domains);
    const bool use_smem_counters = num_counter_bytes <= kMaxNumSmemBytes;
    const int num_blocks = std::min(ceil_div(params.num_tokens, kNumThreads), kNumBlocksPerSM * num_sms);
    const LaunchArgs args{dim3(num_blocks), dim3(kNumThreads), use_smem_counters ? num_counter_bytes : 0};
    // NOTES: counters in global memory for very many experts (> ~12k): slower atomics, but any size works.
    if (use_smem_counters)
        get_dispatch_layout_kernel<true><<<args.grid, args.block, args.smem, stream>>>(params);
    else
        get_dispatch_layout_kernel<false><<<args.grid, args.block, args.smem, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
