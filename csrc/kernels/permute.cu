// The row movers of the expert-major ("permuted") layout of HybridEPBuffer (docs/api.md):
//   * `gather_rows`: out[i] = src[row_of[i]], or a zero row where row_of[i] < 0 (padding of an expert's block);
//     rows are opaque bytes, so BF16, FP8 and scale rows move alike;
//   * `sum_row_copies`: out[r] = the fp32 sum of the rows positions[r][0..L) names (-1: none), taken in ascending
//     index order from +0.0 and rounded once to bfloat16, the unpermute before a combine.
// One warp per output row; grid-stride over the rows. Nothing is shared between rows, so no wait and no flag.
// Preconditions: indices come from the permuted layout of the same handle: row_of[i] < num_src_rows and every
// position < num_hidden_rows (checked on the device: a bad one stops the kernel), at most kMaxRowCopies per row.
#include <cstdint>

#include "device/bf16.cuh"
#include "device/exception.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

constexpr int kNumThreads = 256;
constexpr int kNumWarps = kNumThreads / kWarpSize;
constexpr int kNumBlocksPerSM = 4;
// Vectors a lane has in flight per step.
constexpr int kUnroll = 4;

template <typename Vec>
__global__ void __launch_bounds__(kNumThreads) gather_rows_kernel(const __grid_constant__ GatherRowsParams params) {
    const int lane_idx = ptx::get_lane_idx();
    const int64_t num_vectors = params.num_row_bytes / static_cast<int64_t>(sizeof(Vec));
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kNumWarps;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kNumWarps + threadIdx.x / kWarpSize; i < params.num_out_rows;
         i += num_warps) {
        const int64_t row = params.row_of[i];
        HEP_DEVICE_ASSERT(row < params.num_src_rows);
        const auto* src = reinterpret_cast<const Vec*>(params.src + row * params.num_row_bytes);
        auto* out = reinterpret_cast<Vec*>(params.out + i * params.num_row_bytes);
        for (int64_t base = lane_idx; base < num_vectors; base += kUnroll * kWarpSize) {
            Vec values[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize < num_vectors)
                    values[u] = row >= 0 ? src[base + u * kWarpSize] : Vec{};
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize < num_vectors)
                    out[base + u * kWarpSize] = values[u];
        }
    }
}

__global__ void __launch_bounds__(kNumThreads)
    sum_row_copies_kernel(const __grid_constant__ SumRowCopiesParams params) {
    __shared__ int64_t all_copies[kNumWarps][kMaxRowCopies];
    const int lane_idx = ptx::get_lane_idx(), warp_idx = threadIdx.x / kWarpSize;
    int64_t* copies = all_copies[warp_idx];
    const int num_vectors = params.hidden / 8;
    const auto* hidden = reinterpret_cast<const int4*>(params.hidden_rows);
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kNumWarps;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kNumWarps + warp_idx; r < params.num_rows; r += num_warps) {
        // The row's copies, in ascending index order.
        int num_copies = 0;
        for (int l0 = 0; l0 < params.num_positions; l0 += kWarpSize) {
            const int l = l0 + lane_idx;
            const int64_t position = l < params.num_positions ? params.positions[r * params.num_positions + l] : -1;
            const unsigned mask = __ballot_sync(0xffffffff, position >= 0);
            if (position >= 0) {
                const int slot = num_copies + __popc(mask & ((1u << lane_idx) - 1u));
                HEP_DEVICE_ASSERT(slot < kMaxRowCopies && position < params.num_hidden_rows);
                copies[slot] = position;
            }
            num_copies += __popc(mask);
        }
        __syncwarp();
        auto* out = reinterpret_cast<int4*>(params.out) + r * num_vectors;
        for (int base = lane_idx; base < num_vectors; base += kUnroll * kWarpSize) {
            float acc[kUnroll][8];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    acc[u][e] = 0.0f;
            for (int c = 0; c < num_copies; ++c) {
                const int4* row = hidden + copies[c] * num_vectors;
                int4 values[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    if (base + u * kWarpSize < num_vectors)
                        values[u] = ptx::ld_nc_v4(row + base + u * kWarpSize);
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    if (base + u * kWarpSize < num_vectors)
                        add_bf16x8(acc[u], values[u]);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize < num_vectors)
                    out[base + u * kWarpSize] = pack_bf16x8(acc[u]);
        }
        // The copy list is rewritten for the next row only after every lane has read it.
        __syncwarp();
    }
}

// Blocks for `num_rows` rows, one warp each: enough to fill the device, no more than the rows need.
int grid_size(int64_t num_rows, int num_sms) {
    const int64_t wanted = (num_rows + kNumWarps - 1) / kNumWarps;
    return static_cast<int>(wanted < static_cast<int64_t>(num_sms) * kNumBlocksPerSM ? wanted
                                                                                     : num_sms * kNumBlocksPerSM);
}

}  // namespace

void gather_rows(const GatherRowsParams& params, int num_sms, cudaStream_t stream) {
    HEP_CHECK(params.num_row_bytes >= 0 && params.num_out_rows >= 0 && params.num_src_rows >= 0,
              "gather_rows: sizes must be non-negative");
    if (params.num_out_rows == 0 || params.num_row_bytes == 0)
        return;
    const auto address = reinterpret_cast<uintptr_t>(params.src) | reinterpret_cast<uintptr_t>(params.out);
    const int grid = grid_size(params.num_out_rows, num_sms);
    // The widest vector that divides the row and both bases.
    if (params.num_row_bytes % 16 == 0 && address % 16 == 0)
        gather_rows_kernel<int4><<<grid, kNumThreads, 0, stream>>>(params);
    else if (params.num_row_bytes % 4 == 0 && address % 4 == 0)
        gather_rows_kernel<int><<<grid, kNumThreads, 0, stream>>>(params);
    else
        gather_rows_kernel<uint8_t><<<grid, kNumThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

void sum_row_copies(const SumRowCopiesParams& params, int num_sms, cudaStream_t stream) {
    HEP_CHECK(params.hidden > 0 && params.hidden % 8 == 0,
              "sum_row_copies: hidden must be a positive multiple of 8, got ", params.hidden);
    HEP_CHECK(params.num_rows >= 0 && params.num_positions >= 0, "sum_row_copies: sizes must be non-negative");
    if (params.num_rows == 0)
        return;
    sum_row_copies_kernel<<<grid_size(params.num_rows, num_sms), kNumThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
