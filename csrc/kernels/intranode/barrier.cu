// `intranode_barrier`: a device-side barrier among the ranks of one NVLink domain, through the signal words of
// their shared NVLink buffers (protocol in device/layout.cuh). One block; thread p signals and then waits for
// peer p. Every wait is bounded: after `num_timeout_cycles` the waiting thread prints rank, peer, expected and
// observed values, then traps, so a dead peer ends in an error instead of a hang.
// Preconditions: all ranks launch it the same number of times; buffers were zeroed at allocation.
#include <cstdio>

#include "device/comm.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

__global__ void __launch_bounds__(kNumMaxNvlRanks)
    intranode_barrier_kernel(const __grid_constant__ BarrierParams params) {
    const int peer_idx = threadIdx.x;
    __shared__ int epoch;
    if (peer_idx == 0)
        epoch = *NvlBufferLayout::epoch(params.buffer_ptrs[params.rank]) + 1;
    __syncthreads();

    if (peer_idx < params.num_ranks) {
        // NOTES: the release orders this rank's earlier writes (the data peers will read) before the signal.
        ptx::red_add_release_sys(NvlBufferLayout::signals(params.buffer_ptrs[peer_idx]) + params.rank, 1);
        const int* signal = NvlBufferLayout::signals(params.buffer_ptrs[params.rank]) + peer_idx;
        timeout_while(params.num_timeout_cycles, [&](bool is_last_check) {
            const int observed = ptx::ld_acquire_sys(signal);
            if (observed < epoch && is_last_check)
                printf(
                    "hybrid_ep intranode barrier timeout: rank %d waits for peer %d: expected signal >= %d, "
                    "observed %d\n",
                    params.rank, peer_idx, epoch, observed);
            return observed < epoch;
        });
    }
    __syncthreads();
    if (peer_idx == 0)
        *NvlBufferLayout::epoch(params.buffer_ptrs[params.rank]) = epoch;
}

}  // namespace

void intranode_barrier(const BarrierParams& params, cudaStream_t stream) {
    HEP_CHECK(params.num_ranks >= 1 && params.num_ranks <= kNumMaxNvlRanks,
              "intranode_barrier: num_ranks must be in [1, ", kNumMaxNvlRanks, "], got ", params.num_ranks);
    HEP_CHECK(params.rank >= 0 && params.rank < params.num_ranks, "intranode_barrier: rank must be in [0, ",
              params.num_ranks, "), got ", params.rank);
    HEP_CHECK(params.num_timeout_cycles > 0, "intranode_barrier: num_timeout_cycles must be positive");
    intranode_barrier_kernel<<<1, kNumMaxNvlRanks, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
