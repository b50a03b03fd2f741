// Declarations of the kernel launchers and their parameter structs. Launchers take raw device pointers, one
// params struct and a `cudaStream_t`; they check their arguments (throwing `HEPException`), enqueue all work on
// `stream` and return without synchronizing.
// Preconditions: host code; no torch headers. Pointers are device pointers on the current CUDA device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "device/layout.cuh"

namespace hybrid_ep::kernels {

// Largest `num_topk` the layout kernel accepts: one token's entries are handled by at most one warp.
constexpr int kMaxNumTopk = 32;

// Parameters of `get_dispatch_layout`, passed to the kernel as one `__grid_constant__` struct.
struct DispatchLayoutParams {
    const int64_t* topk_idx;     // [num_tokens, num_topk]; entries < 0 or >= num_experts are skipped
    int* num_tokens_per_rank;    // [num_ranks]; tokens with at least one expert on the rank
    int* num_tokens_per_domain;  // [num_domains], or nullptr; tokens with at least one expert in the domain
    int* num_tokens_per_expert;  // [num_experts]; (token, k) entries equal to the expert
    bool* is_token_in_rank;      // [num_tokens, num_ranks]; whether the token has an expert on the rank
    int num_tokens;              // rows of topk_idx, >= 0
    int num_topk;                // columns of topk_idx, 1..kMaxNumTopk
    int num_experts;             // > 0, a multiple of num_ranks; rank r holds experts [r * L, (r + 1) * L)
    int num_ranks;               // > 0
    int num_ranks_per_domain;    // P: domain d is ranks [d * P, (d + 1) * P); unused when num_domains == 0
    int num_domains;             // num_ranks / P when num_tokens_per_domain is wanted, else 0
};

// Computes the dispatch layout of `topk_idx` (see `DispatchLayoutParams`); every output is fully written,
// also when `num_tokens == 0`.
// Arguments:
//     params: pointers and sizes; checked here.
//     num_sms: SM count of the current device (sizes the grid).
//     stream: the stream all work is enqueued on.
void get_dispatch_layout(const DispatchLayoutParams& params, int num_sms, cudaStream_t stream);

// Parameters of `intranode_barrier`.
struct BarrierParams {
    void* buffer_ptrs[kNumMaxNvlRanks];  // [num_ranks] NVLink buffer base of each rank, mapped into this process
    int rank;                            // this rank, in [0, num_ranks)
    int num_ranks;                       // ranks of the NVLink domain, 1..kNumMaxNvlRanks
    int64_t num_timeout_cycles;          // SM clock cycles a wait on a peer may last before the kernel traps
};

// Waits, on `stream`, until every rank of the domain has reached the same barrier (device/layout.cuh). Bounded:
// a rank that never arrives makes the kernel print which peer is missing and trap.
void intranode_barrier(const BarrierParams& params, cudaStream_t stream);

// Checks the NVLink domain arguments shared by the intranode launchers (throws HEPException).
void check_domain(const void* const* buffer_ptrs, int rank, int num_ranks, int64_t num_timeout_cycles);

// Parameters of `notify_dispatch`.
struct NotifyDispatchParams {
    void* buffer_ptrs[kNumMaxNvlRanks];  // [num_ranks] NVLink buffer base of each rank, mapped into this process
    int rank;                            // this rank, in [0, num_ranks)
    int num_ranks;                       // ranks of the NVLink domain
    int64_t num_timeout_cycles;          // bound of every wait on a peer
    const int* num_tokens_per_rank;      // [num_ranks] tokens this rank sends to each rank
    const int* num_tokens_per_expert;    // [num_experts] (token, k) entries of this rank naming each expert
    const bool* is_token_in_rank;        // [num_tokens, num_ranks]
    int num_tokens;                      // tokens of this rank
    int num_experts;                  // global experts, a multiple of num_ranks, at most kNumMaxLocalExperts per rank
    int num_channels;                 // channels of channel_prefix_matrix, >= 1
    int expert_alignment;             // receive counts are rounded up to a multiple of this, >= 1
    int* rank_prefix_matrix;          // out [num_ranks, num_ranks]: [i][j] = tokens ranks 0..i send to rank j
    int* channel_prefix_matrix;       // out [num_ranks, num_channels]: [j][c] = this rank's tokens to j, channels 0..c
    int* num_recv_tokens_per_expert;  // out [num_experts / num_ranks], aligned
    int* host_recv_counts;            // out, mapped host memory [1 + num_local_experts]: rows received, then the
                                      // aligned per-expert counts; entry 0 is written last (release)
};

// Exchanges the dispatch counts of the domain (kernels/intranode/notify.cu), on `stream`.
void notify_dispatch(const NotifyDispatchParams& params, cudaStream_t stream);

}  // namespace hybrid_ep::kernels
