// `intranode_barrier`: a device-side barrier among the ranks of one NVLink domain (device/nvl_barrier.cuh), for the
// Buffer's set-up and tests. A rank that never arrives makes the kernel print which peer is missing and trap.
// Preconditions: all ranks launch it the same number of times; buffers were zeroed at allocation.
#include "device/nvl_barrier.cuh"
#include "kernels/api.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

__global__ void __launch_bounds__(kNumMaxNvlRanks)
    intranode_barrier_kernel(const __grid_constant__ BarrierParams params) {
    nvl_barrier(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles, "intranode barrier");
}

}  // namespace

void check_domain(const void* const* buffer_ptrs, int rank, int num_ranks, int64_t num_timeout_cycles) {
    HEP_CHECK(num_ranks >= 1 && num_ranks <= kNumMaxNvlRanks, "num_ranks must be in [1, ", kNumMaxNvlRanks, "], got ",
              num_ranks);
    HEP_CHECK(rank >= 0 && rank < num_ranks, "rank must be in [0, ", num_ranks, "), got ", rank);
    HEP_CHECK(num_timeout_cycles > 0, "num_timeout_cycles must be positive");
    for (int p = 0; p < num_ranks; ++p)
        HEP_CHECK(buffer_ptrs[p] != nullptr, "the NVLink buffer of rank ", p, " is not mapped");
}

void intranode_barrier(const BarrierParams& params, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    intranode_barrier_kernel<<<1, kNumMaxNvlRanks, 0, stream>>>(params);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
