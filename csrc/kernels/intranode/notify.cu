// `notify_dispatch`: the count exchange that precedes an intranode dispatch. One block per rank:
//   1. barrier: every rank has finished reading the previous call's notify slots;
//   2. write this rank's token count to every rank, and its count of entries naming each of rank p's experts, into
//      notify slot `rank` of every rank p's NVLink buffer (device/layout.cuh);
//   3. meanwhile count this rank's tokens per (destination, channel) into channel_prefix_matrix;
//   4. barrier: every slot is written;
//   5. read this rank's own slots: rank_prefix_matrix, the aligned per-local-expert receive counts, and the number
//      of rows this rank receives, published to mapped host memory for the host's bounded poll (count last, with a
//      system-scope release, after the per-expert counts).
// Preconditions: all ranks call it with the same num_experts and num_channels; host_recv_counts[0] was set to -1.
#include <cstdio>

#include "device/layout.cuh"
#include "device/nvl_barrier.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

constexpr int kNumNotifyThreads = 1024;
constexpr int kWarpSize = 32;

__global__ void __launch_bounds__(kNumNotifyThreads, 1)
    notify_dispatch_kernel(const __grid_constant__ NotifyDispatchParams params) {
    const int rank = params.rank, num_ranks = params.num_ranks;
    const int num_local_experts = params.num_experts / num_ranks;
    nvl_barrier(params.buffer_ptrs, rank, num_ranks, params.num_timeout_cycles, "notify_dispatch (entry)");

    // Step 2: this rank's counts into every rank's slot `rank`.
    const int num_slot_ints = num_ranks + num_local_experts;
    for (int i = threadIdx.x; i < num_ranks * num_slot_ints; i += blockDim.x) {
        const int dst_rank = i / num_slot_ints, j = i % num_slot_ints;
        int* slot = NvlBufferLayout::notify_slot(params.buffer_ptrs[dst_rank], rank);
        if (j < num_ranks)
            slot[j] = params.num_tokens_per_rank[j];
        else
            slot[kNumMaxNvlRanks + j - num_ranks] =
                params.num_tokens_per_expert[dst_rank * num_local_experts + j - num_ranks];
    }

    // Step 3: tokens per (destination, channel); channel c holds tokens [c * T, (c + 1) * T), T = ceil(N / C).
    const int warp_idx = threadIdx.x / kWarpSize, lane_idx = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int tokens_per_channel = max((params.num_tokens + params.num_channels - 1) / params.num_channels, 1);
    for (int pair = warp_idx; pair < num_ranks * params.num_channels; pair += num_warps) {
        const int dst_rank = pair / params.num_channels, channel = pair % params.num_channels;
        const int begin = min(channel * tokens_per_channel, params.num_tokens);
        const int end = min(begin + tokens_per_channel, params.num_tokens);
        int count = 0;
        for (int t = begin + lane_idx; t < end; t += kWarpSize)
            count += params.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + dst_rank] ? 1 : 0;
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
            count += __shfl_xor_sync(0xffffffff, count, offset);
        if (lane_idx == 0)
            params.channel_prefix_matrix[dst_rank * params.num_channels + channel] = count;
    }
    __syncthreads();
    if (threadIdx.x < num_ranks) {
        int* row = params.channel_prefix_matrix + threadIdx.x * params.num_channels;
        for (int c = 1; c < params.num_channels; ++c)
            row[c] += row[c - 1];
    }

    // Step 4.
    nvl_barrier(params.buffer_ptrs, rank, num_ranks, params.num_timeout_cycles, "notify_dispatch (exchange)");

    // Step 5: prefix over source ranks, per destination; per-expert sums over sources.
    void* local = params.buffer_ptrs[rank];
    if (threadIdx.x < num_ranks) {
        const int dst_rank = threadIdx.x;
        int sum = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank) {
            sum += NvlBufferLayout::notify_slot(local, src_rank)[dst_rank];
            params.rank_prefix_matrix[src_rank * num_ranks + dst_rank] = sum;
        }
    }
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
        int sum = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank)
            sum += NvlBufferLayout::notify_slot(local, src_rank)[kNumMaxNvlRanks + e];
        sum = (sum + params.expert_alignment - 1) / params.expert_alignment * params.expert_alignment;
        params.num_recv_tokens_per_expert[e] = sum;
        params.host_recv_counts[1 + e] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int num_recv_tokens = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank)
            num_recv_tokens += NvlBufferLayout::notify_slot(local, src_rank)[rank];
        __threadfence_system();
        ptx::st_release_sys(params.host_recv_counts, num_recv_tokens);
    }
}

}  // namespace

void notify_dispatch(const NotifyDispatchParams& params, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_experts > 0 && params.num_experts % params.num_ranks == 0,
              "notify_dispatch: num_experts must be a positive multiple of num_ranks, got ", params.num_experts);
    HEP_CHECK(params.num_experts / params.num_ranks <= kNumMaxLocalExperts, "notify_dispatch: at most ",
              kNumMaxLocalExperts, " experts per rank, got ", params.num_experts / params.num_ranks);
    HEP_CHECK(params.num_channels >= 1, "notify_dispatch: num_channels must be positive, got ", params.num_channels);
    HEP_CHECK(params.expert_alignment >= 1, "notify_dispatch: expert_alignment must be positive, got ",
              params.expert_alignment);
    HEP_CHECK(params.num_tokens >= 0, "notify_dispatch: num_tokens must be non-negative");
    notify_dispatch_kernel<<<1, kNumNotifyThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
