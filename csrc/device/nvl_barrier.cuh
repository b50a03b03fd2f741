// `nvl_barrier`: the block-level device barrier among the ranks of one NVLink domain (protocol in
// device/layout.cuh), used by the barrier kernel and inside kernels that must meet their peers (notify).
// Thread p < num_ranks signals rank p and waits for rank p; every wait is bounded by `timeout_while`.
// Preconditions: called by every thread of exactly one block per rank; blockDim.x >= num_ranks; each rank calls it
// the same number of times. Writes a thread made before the call are visible to every peer after it.
#pragma once

#include <cstdio>

#include "device/comm.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"

namespace hybrid_ep {

__device__ __forceinline__ void nvl_barrier(void* const* buffer_ptrs, int rank, int num_ranks,
                                            int64_t num_timeout_cycles, const char* name) {
    __shared__ int epoch;
    // Every thread's earlier writes are ordered before each signal below: the block barrier orders them before the
    // signalling thread's release, which is cumulative. NOTES: a system fence by every thread first added one fence's
    // latency to each barrier.
    __syncthreads();
    if (threadIdx.x == 0)
        epoch = *NvlBufferLayout::epoch(buffer_ptrs[rank]) + 1;
    __syncthreads();
    const int peer_idx = threadIdx.x;
    if (peer_idx < num_ranks) {
        ptx::red_add_release_sys(NvlBufferLayout::signals(buffer_ptrs[peer_idx]) + rank, 1);
        const int* signal = NvlBufferLayout::signals(buffer_ptrs[rank]) + peer_idx;
        timeout_while(num_timeout_cycles, [&](bool is_last_check) {
            const int observed = ptx::ld_acquire_sys(signal);
            if (observed < epoch && is_last_check)
                printf("hybrid_ep %s timeout: rank %d waits for peer %d: expected signal >= %d, observed %d\n", name,
                       rank, peer_idx, epoch, observed);
            return observed < epoch;
        });
    }
    __syncthreads();
    if (threadIdx.x == 0)
        *NvlBufferLayout::epoch(buffer_ptrs[rank]) = epoch;
    __syncthreads();
}

// Zeroes counter set `set` of the ring tails and heads (device/layout.cuh), the work claims and the reads-done counts
// of this rank's own buffer. Called by every thread of one block, after the
// peers stopped writing them for an earlier call and before they may write them again (a barrier, or a release they
// wait for). Only the entries of ranks below `num_ranks` are ever written (a buffer serves one domain); the others
// keep the zeros of the allocation.
// NOTES: zeroing every rank's entries (kNumMaxNvlRanks per ring) took 2.3 us of each prelude on 4 H200 GPUs.
__device__ __forceinline__ void reset_ring_counters(void* local_buffer, int num_ranks, int set) {
    for (int i = threadIdx.x; i < kNumMaxRings * num_ranks; i += blockDim.x) {
        const int ring_idx = i / num_ranks, r = i % num_ranks;
        *NvlBufferLayout::tail(local_buffer, set, ring_idx, r) = 0;
        *NvlBufferLayout::head(local_buffer, set, ring_idx, r) = 0;
    }
    for (int i = threadIdx.x; i < NvlBufferLayout::kNumClaims; i += blockDim.x)
        *NvlBufferLayout::claim(local_buffer, i) = 0;
    for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
        *NvlBufferLayout::reads_done(local_buffer, i) = 0;
    __syncthreads();
}

}  // namespace hybrid_ep
