// `notify_dispatch`: the count exchange that precedes an intranode dispatch. One block per rank:
//   1. barrier: every rank has finished reading the previous call's notify slots;
//   2. write this rank's token count to every rank, and its count of entries naming each of rank p's experts, into
//      notify slot `rank` of every rank p's NVLink buffer (device/layout.cuh)
//      (and, computed before the barrier, its per-channel counts to p);
//   3. barrier: every slot is written;
//   4. read this rank's own slots: rank_prefix_matrix, the aligned per-local-expert receive counts,
//      recv_channel_prefix_matrix, then send_head (where each token lands at each rank), and the number of rows this
//      rank receives, published to mapped host memory for the host's bounded poll (count last, with a system-scope
//      release, after the per-expert counts).
// `notify_combine` is the prelude of a combine, with no barrier: this rank's token count (the combine kernel's
// receivers split their tokens like the senders do) and where its inputs lie (kernels/intranode/combine_inputs.cuh)
// to every rank.
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

// Block-wide exclusive prefix sum of one int per thread (blockDim.x == kNumNotifyThreads). Returns: the sum of the
// values of lower-indexed threads; `total` receives the sum of all.
__device__ __forceinline__ int block_exclusive_scan(int value, int& total) {
    __shared__ int warp_sums[kNumNotifyThreads / kWarpSize];
    const int warp_idx = threadIdx.x / kWarpSize, lane_idx = threadIdx.x % kWarpSize;
    int inclusive = value;
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int other = __shfl_up_sync(0xffffffff, inclusive, offset);
        if (lane_idx >= offset)
            inclusive += other;
    }
    if (lane_idx == kWarpSize - 1)
        warp_sums[warp_idx] = inclusive;
    __syncthreads();
    if (warp_idx == 0) {
        int sum = warp_sums[lane_idx];
        for (int offset = 1; offset < kWarpSize; offset *= 2) {
            const int other = __shfl_up_sync(0xffffffff, sum, offset);
            if (lane_idx >= offset)
                sum += other;
        }
        warp_sums[lane_idx] = sum;
    }
    __syncthreads();
    const int warp_base = warp_idx > 0 ? warp_sums[warp_idx - 1] : 0;
    total = warp_sums[kNumNotifyThreads / kWarpSize - 1];
    __syncthreads();
    return warp_base + inclusive - value;
}

__global__ void __launch_bounds__(kNumNotifyThreads, 1)
    notify_dispatch_kernel(const __grid_constant__ NotifyDispatchParams params) {
    const int rank = params.rank, num_ranks = params.num_ranks, num_channels = params.num_channels;
    const int num_local_experts = params.num_experts / num_ranks;
    const int warp_idx = threadIdx.x / kWarpSize, lane_idx = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;

    // Step 1: tokens per (destination, channel); channel c holds tokens [c * T, (c + 1) * T), T = ceil(N / C).
    // Computed before the barrier, from local data only.
    const int tokens_per_channel = max((params.num_tokens + num_channels - 1) / num_channels, 1);
    for (int pair = warp_idx; pair < num_ranks * num_channels; pair += num_warps) {
        const int dst_rank = pair / num_channels, channel = pair % num_channels;
        const int begin = min(channel * tokens_per_channel, params.num_tokens);
        const int end = min(begin + tokens_per_channel, params.num_tokens);
        int count = 0;
        for (int t = begin + lane_idx; t < end; t += kWarpSize)
            count += params.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + dst_rank] ? 1 : 0;
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
            count += __shfl_xor_sync(0xffffffff, count, offset);
        if (lane_idx == 0)
            params.channel_prefix_matrix[dst_rank * num_channels + channel] = count;
    }
    __syncthreads();
    if (threadIdx.x < num_ranks) {
        int* row = params.channel_prefix_matrix + threadIdx.x * num_channels;
        for (int c = 1; c < num_channels; ++c)
            row[c] += row[c - 1];
    }

    // Step 2: barrier: every rank has finished reading the previous call's slots.
    nvl_barrier(params.buffer_ptrs, rank, num_ranks, params.num_timeout_cycles, "notify_dispatch (entry)");
    // No peer writes this rank's ring counters until the next barrier: start the call from zero.
    reset_ring_counters(params.buffer_ptrs[rank], num_ranks, kDispatchCounterSet);

    // Step 3: this rank's counts into every rank's slot `rank`.
    for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x)
        NvlBufferLayout::notify_slot(params.buffer_ptrs[i / num_ranks], rank)[i % num_ranks] =
            params.num_tokens_per_rank[i % num_ranks];
    for (int i = threadIdx.x; i < num_ranks * num_local_experts; i += blockDim.x) {
        const int dst_rank = i / num_local_experts, e = i % num_local_experts;
        NvlBufferLayout::notify_slot(params.buffer_ptrs[dst_rank], rank)[kSlotExpertOffset + e] =
            params.num_tokens_per_expert[i];
    }
    for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x)
        NvlBufferLayout::notify_slot(params.buffer_ptrs[i / num_channels],
                                     rank)[kSlotChannelOffset + i % num_channels] = params.channel_prefix_matrix[i];
    if (threadIdx.x < num_ranks)
        NvlBufferLayout::notify_slot(params.buffer_ptrs[threadIdx.x], rank)[kSlotWorstOffset] = params.num_worst_tokens;

    // Step 4.
    nvl_barrier(params.buffer_ptrs, rank, num_ranks, params.num_timeout_cycles, "notify_dispatch (exchange)");

    // Step 5: prefix over source ranks, per destination; per-expert sums over sources; receive-side channel starts.
    void* local = params.buffer_ptrs[rank];
    __shared__ int rank_prefix[kNumMaxNvlRanks * kNumMaxNvlRanks];
    if (threadIdx.x < num_ranks) {
        const int dst_rank = threadIdx.x;
        int sum = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank) {
            sum += NvlBufferLayout::notify_slot(local, src_rank)[dst_rank];
            rank_prefix[src_rank * num_ranks + dst_rank] = sum;
            params.rank_prefix_matrix[src_rank * num_ranks + dst_rank] = sum;
        }
    }
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
        int sum = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank)
            sum += NvlBufferLayout::notify_slot(local, src_rank)[kSlotExpertOffset + e];
        sum = (sum + params.expert_alignment - 1) / params.expert_alignment * params.expert_alignment;
        params.num_recv_tokens_per_expert[e] = sum;
        params.host_recv_counts[1 + e] = sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x) {
        const int src_rank = i / num_channels, channel = i % num_channels;
        const int rank_start = src_rank > 0 ? rank_prefix[(src_rank - 1) * num_ranks + rank] : 0;
        const int channel_start =
            channel > 0 ? NvlBufferLayout::notify_slot(local, src_rank)[kSlotChannelOffset + channel - 1] : 0;
        params.recv_channel_prefix_matrix[i] = rank_start + channel_start;
    }

    // Step 6: send_head[t][d]: the row of token t among rank d's received rows, or -1.
    const int num_tokens_per_thread = (params.num_tokens + kNumNotifyThreads - 1) / kNumNotifyThreads;
    const int begin = min(static_cast<int>(threadIdx.x) * num_tokens_per_thread, params.num_tokens);
    const int end = min(begin + num_tokens_per_thread, params.num_tokens);
    for (int dst_rank = 0; dst_rank < num_ranks; ++dst_rank) {
        const bool* column = params.is_token_in_rank + dst_rank;
        int count = 0;
        for (int t = begin; t < end; ++t)
            count += column[static_cast<int64_t>(t) * num_ranks] ? 1 : 0;
        int total;
        int row = block_exclusive_scan(count, total) + (rank > 0 ? rank_prefix[(rank - 1) * num_ranks + dst_rank] : 0);
        for (int t = begin; t < end; ++t) {
            const bool is_in = column[static_cast<int64_t>(t) * num_ranks];
            params.send_head[static_cast<int64_t>(t) * num_ranks + dst_rank] = is_in ? row++ : -1;
        }
    }

    __syncthreads();
    if (threadIdx.x == 0) {
        // Every rank sees every rank's rows and num_worst_tokens, so all report the same overflow together.
        int overflow_rank = -1, overflow_rows = 0, overflow_worst = 0;
        for (int r = 0; r < num_ranks && overflow_rank < 0; ++r) {
            const int rows = rank_prefix[(num_ranks - 1) * num_ranks + r];
            const int worst = NvlBufferLayout::notify_slot(local, r)[kSlotWorstOffset];
            if (worst > 0 && rows > worst)
                overflow_rank = r, overflow_rows = rows, overflow_worst = worst;
        }
        if (params.trap_on_overflow && overflow_rank >= 0) {
            // NOTES: every rank found the same overflow, so all of them stop here and no peer waits for them.
            printf(
                "hybrid_ep dispatch: num_worst_tokens=%d on rank %d is smaller than the %d tokens that rank "
                "receives (seen by rank %d); raise num_worst_tokens\n",
                overflow_worst, overflow_rank, overflow_rows, rank);
            __trap();
        }
        params.host_recv_counts[kHostOverflowOffset] = overflow_rank;
        params.host_recv_counts[kHostOverflowOffset + 1] = overflow_rows;
        params.host_recv_counts[kHostOverflowOffset + 2] = overflow_worst;
        int num_recv_tokens = 0;
        for (int src_rank = 0; src_rank < num_ranks; ++src_rank)
            num_recv_tokens += NvlBufferLayout::notify_slot(local, src_rank)[rank];
        __threadfence_system();
        ptx::st_release_sys(params.host_recv_counts, num_recv_tokens);
    }
}

// Threads of the preludes (notify_combine, prepare_rings): thread p < num_ranks signals or writes to rank p, and all
// of them zero the ring counters of the domain's ranks and the claims.
constexpr int kNumPreludeThreads = 256;

// The combine prelude, with no barrier (combine protocol in device/layout.cuh): this rank's n-th combine zeroes its
// counter set 1 + n % 2, its claims and reads-done counts, then writes its token count and where its inputs lie
// into combine entry n % 2 of its slot in every rank's buffer, n last (release), and counts the combine. The combine
// kernels wait for every rank's entry. NOTES: with a barrier first (and one entry and one counter set), each
// combine's prelude took one more round trip among the ranks.
__global__ void __launch_bounds__(kNumPreludeThreads)
    notify_combine_kernel(const __grid_constant__ NotifyCombineParams params) {
    // The combine kernels after it are launched programmatically and wait for this kernel's end before they read.
    ptx::griddep_launch_dependents();
    void* local = params.buffer_ptrs[params.rank];
    // Every thread reads the count before thread 0 writes it (after the reset's block barrier).
    const int seq = *NvlBufferLayout::combine_count(local) + 1;
    // The peers wrote these for this rank's combine n - 2 and finished before they wrote their entries of combine
    // n - 1, which this rank's kernels waited for; they write them again only after the release below.
    reset_ring_counters(local, params.num_ranks, NvlBufferLayout::combine_counter_set(seq));
    if (threadIdx.x < params.num_ranks) {
        CombineSlot* slot = NvlBufferLayout::combine_slot(params.buffer_ptrs[threadIdx.x], params.rank, seq);
        slot->num_tokens = params.num_tokens;
        slot->x_offset = params.x_offset;
        slot->weights_offset = params.weights_offset;
        slot->num_x_rows = params.num_x_rows;
        // Orders the zeros above (the block barrier, then this release) and the entry before the count.
        ptx::st_release_sys(&slot->seq, seq);
    }
    if (threadIdx.x == 0)
        *NvlBufferLayout::combine_count(local) = seq;
}

// Barrier, reset of this rank's ring counters, barrier: what a cached dispatch needs before its kernel.
__global__ void __launch_bounds__(kNumPreludeThreads)
    prepare_rings_kernel(const __grid_constant__ BarrierParams params) {
    nvl_barrier(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles, "dispatch (entry)");
    reset_ring_counters(params.buffer_ptrs[params.rank], params.num_ranks, kDispatchCounterSet);
    nvl_barrier(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles, "dispatch (reset)");
}

}  // namespace

void prepare_rings(const BarrierParams& params, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    prepare_rings_kernel<<<1, kNumPreludeThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

void notify_dispatch(const NotifyDispatchParams& params, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_experts > 0 && params.num_experts % params.num_ranks == 0,
              "notify_dispatch: num_experts must be a positive multiple of num_ranks, got ", params.num_experts);
    HEP_CHECK(params.num_experts / params.num_ranks <= kNumMaxLocalExperts, "notify_dispatch: at most ",
              kNumMaxLocalExperts, " experts per rank, got ", params.num_experts / params.num_ranks);
    HEP_CHECK(params.num_channels >= 1 && params.num_channels <= kNumMaxChannels,
              "notify_dispatch: num_channels must be in [1, ", kNumMaxChannels, "], got ", params.num_channels);
    HEP_CHECK(params.expert_alignment >= 1, "notify_dispatch: expert_alignment must be positive, got ",
              params.expert_alignment);
    HEP_CHECK(params.num_tokens >= 0, "notify_dispatch: num_tokens must be non-negative");
    notify_dispatch_kernel<<<1, kNumNotifyThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

void notify_combine(const NotifyCombineParams& params, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_tokens >= 0, "notify_combine: num_tokens must be non-negative");
    notify_combine_kernel<<<1, kNumPreludeThreads, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
