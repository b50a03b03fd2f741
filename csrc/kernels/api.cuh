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

// Barrier, zeroing of this rank's ring counters, barrier (kernels/intranode/notify.cu): the entry of a dispatch
// that runs without notify_dispatch (cached mode).
void prepare_rings(const BarrierParams& params, cudaStream_t stream);

// Checks the NVLink domain arguments shared by the intranode launchers (throws HEPException).
void check_domain(const void* const* buffer_ptrs, int rank, int num_ranks, int64_t num_timeout_cycles);

// Layout of the mapped host counters notify_dispatch fills.
constexpr int kHostOverflowOffset = 1 + kNumMaxLocalExperts;
constexpr int kNumHostCountInts = kHostOverflowOffset + 3;

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
    int num_worst_tokens;             // this rank's fixed output rows, 0 for none
    int trap_on_overflow;             // 1: no host reads the overflow entries (CUDA graph capture), so an overflow
                                      // prints a message and traps on every rank instead
    int* rank_prefix_matrix;          // out [num_ranks, num_ranks]: [i][j] = tokens ranks 0..i send to rank j
    int* channel_prefix_matrix;       // out [num_ranks, num_channels]: [j][c] = this rank's tokens to j, channels 0..c
    int* recv_channel_prefix_matrix;  // out [num_ranks, num_channels]: first receive row of source i's channel c
    int* send_head;                   // out [num_tokens, num_ranks]: row of token t at rank j, or -1
    int* num_recv_tokens_per_expert;  // out [num_experts / num_ranks], aligned
    int* host_recv_counts;            // out, mapped host memory [kNumHostCountInts]: rows received, then the
                                      // aligned per-expert counts, then (at kHostOverflowOffset) the first rank
                                      // whose rows exceed its num_worst_tokens (-1: none), its rows and its
                                      // num_worst_tokens; entry 0 is written last (release)
};

// Exchanges the dispatch counts of the domain (kernels/intranode/notify.cu), on `stream`.
void notify_dispatch(const NotifyDispatchParams& params, cudaStream_t stream);

// Parameters of `notify_combine`.
struct NotifyCombineParams {
    void* buffer_ptrs[kNumMaxNvlRanks];  // [num_ranks] NVLink buffer base of each rank
    int rank;                            // this rank
    int num_ranks;                       // ranks of the NVLink domain
    int64_t num_timeout_cycles;          // bound of every wait on a peer
    int num_tokens;                      // tokens of this rank (rows of the combine output)
    int64_t x_offset;                    // offset of the combine's x in this rank's output arena, or kInputNotInArena
    int64_t weights_offset;  // offset of its top-k weights there, kInputNotInArena, or kInputAbsent (no weights)
    int num_x_rows;          // rows of x
};

// Values of NotifyCombineParams' offsets other than an offset (kernels/intranode/combine_inputs.cuh).
constexpr int64_t kInputNotInArena = -1;
constexpr int64_t kInputAbsent = -2;

// The prelude of a combine (kernels/intranode/notify.cu): a barrier, then this rank's token count and where its
// inputs lie to every rank.
void notify_combine(const NotifyCombineParams& params, cudaStream_t stream);

// Most ranks the dispatch and combine kernels serve (one lane or unrolled register slot per rank).
constexpr int kNumMaxKernelRanks = 8;
static_assert(kNumMaxKernelRanks <= kNumMaxRingRanks, "ring metadata carries a receive row per rank");

// Parameters of `intranode_dispatch` (kernels/intranode/dispatch.cu).
struct DispatchParams {
    void* buffer_ptrs[kNumMaxNvlRanks];    // [num_ranks] NVLink buffer base of each rank
    int rank;                              // this rank
    int num_ranks;                         // ranks of the NVLink domain, 1..kNumMaxKernelRanks
    int64_t num_timeout_cycles;            // bound of every wait on a peer
    const void* x;                         // [num_tokens, num_x_bytes] rows to send
    const float* x_scales;                 // [num_tokens, num_scales] at the strides below, or nullptr (BF16)
    int64_t scale_token_stride;            // elements between the scales of consecutive tokens
    int64_t scale_hidden_stride;           // elements between consecutive scales of one token
    const int64_t* topk_idx;               // [num_tokens, num_topk] or nullptr (cached mode, no top-k)
    const float* topk_weights;             // [num_tokens, num_topk] or nullptr
    const int* send_head;                  // [num_tokens, num_ranks]: receive row of token t at rank j, or -1
    const int* rank_prefix_matrix;         // [num_ranks, num_ranks]: the receive count is entry [num_ranks - 1][rank]
    void* recv_x;                          // out [num_out_rows, num_x_bytes]
    float* recv_scales;                    // out [num_out_rows, num_scales], or nullptr
    int* recv_src_idx;                     // out [num_out_rows], or nullptr (cached mode)
    int64_t* recv_topk_idx;                // out [num_out_rows, num_topk], or nullptr
    float* recv_topk_weights;              // out [num_out_rows, num_topk], or nullptr
    int num_tokens;                        // rows of x
    int num_x_bytes;                       // bytes of one row of x, a multiple of 16
    int num_scales;                        // scales per row, 0 for BF16
    int num_topk;                          // columns of topk_idx, 0 without top-k
    int num_local_experts;                 // experts per rank (localises top-k indices)
    int num_out_rows;                      // rows of the outputs: received rows first, then zero padding
    int num_channels;                      // channels of the handle; the kernel runs 2 blocks per channel
    int num_ring_slots;                    // rows per ring (Config.num_max_nvl_chunked_recv_tokens)
    int num_chunk_tokens;                  // a sender publishes its progress every this many tokens
    int num_claim_tokens;                  // tokens a sender takes per claim of work; set by intranode_dispatch
    void* arena_ptrs[kNumMaxKernelRanks];  // [num_ranks] output arena of each rank (peer mappings), or nullptr
    // Offsets of the outputs above in this rank's arena (device/layout.cuh DispatchOutput; -1 for absent ones), where
    // peers write them directly; out_offsets[kOutX] == -1: they come through the rings.
    int64_t out_offsets[kNumDispatchOutputs];
};

// Moves every row of x to the ranks `send_head` names (kernels/intranode/dispatch.cu), on `stream`. Needs the
// rings of every rank idle: run after notify_dispatch or an intranode barrier.
// Arguments: num_nvl_bytes: the data region's size (checked against the rings); smem_limit: the opt-in shared memory
//     per block of the device.
void intranode_dispatch(const DispatchParams& params, size_t num_nvl_bytes, int smem_limit, cudaStream_t stream);

// Parameters of `intranode_combine` (kernels/intranode/combine.cu).
struct CombineParams {
    void* buffer_ptrs[kNumMaxNvlRanks];     // [num_ranks] NVLink buffer base of each rank
    int rank;                               // this rank
    int num_ranks;                          // ranks of the NVLink domain, 1..kNumMaxKernelRanks
    int64_t num_timeout_cycles;             // bound of every wait on a peer
    const void* x;                          // [num_rows, hidden] bf16: the rows this rank received in the dispatch
    const float* topk_weights;              // [num_rows, num_topk] or nullptr
    const int* rank_prefix_matrix;          // [num_ranks, num_ranks] of the dispatch
    const int* recv_channel_prefix_matrix;  // [num_ranks, num_channels] of the dispatch
    const int* recv_src_idx;                // [num_rows] source token of each received row
    const bool* is_token_in_rank;           // [num_tokens, num_ranks]
    const int* send_head;                   // [num_tokens, num_ranks]: row of token t at rank j, or -1
    const void* bias_0;                     // [num_tokens, hidden] bf16, or nullptr
    const void* bias_1;                     // [num_tokens, hidden] bf16, or nullptr
    void* combined_x;                       // out [num_tokens, hidden] bf16
    float* combined_topk_weights;           // out [num_tokens, num_topk], or nullptr
    int num_tokens;                         // tokens of this rank
    int hidden;                             // a multiple of 8
    int num_topk;                           // columns of topk_weights, 0 without
    int num_channels;                       // channels of the handle
    int num_blocks;                         // blocks of the kernel (Config.num_sms)
    int num_ring_slots;                     // rows per ring
    int num_chunk_tokens;                   // a sender publishes its progress every this many rows
    void* arena_ptrs[kNumMaxKernelRanks];   // [num_ranks] output arena of each rank (peer mappings), or nullptr
};

// Checks the arguments of `intranode_combine` (throws HEPException) without enqueuing anything.
void check_combine(const CombineParams& params, size_t num_nvl_bytes, int smem_limit);

// The work-claim counter (device/layout.cuh) in which the pulling combine counts this rank's finished blocks: nonzero
// after a combine that pulled, zero after one that pushed (the prelude zeroes it).
constexpr int kCombinePullFinishClaim = NvlBufferLayout::kNumClaims - 1;
// The work-claim counter from which the pulling combine's blocks claim the last groups of this rank's tokens.
constexpr int kCombinePullTailClaim = NvlBufferLayout::kNumClaims - 2;

// Returns: whether the pulling combine (kernels/intranode/combine_pull.cu) serves rows of `hidden` BF16 values
// among `num_ranks` ranks on a device with `smem_limit` bytes of shared memory per block. The same on every rank.
bool is_combine_pull_supported(int num_ranks, int hidden, int smem_limit);

// The combine when every rank's x (and top-k weights, if any) lie in its output arena: each rank reads the copies
// of its tokens from the peers' inputs over NVLink and sums them (kernels/intranode/combine_pull.cu), on `stream`,
// after notify_combine and intranode_combine: it is launched programmatically, so its blocks set up while the
// pushing kernel ahead of it ends. The kernel ends at once unless every rank published arena inputs;
// intranode_combine ends at once if they did. Precondition: is_combine_pull_supported.
void intranode_combine_pull(const CombineParams& params, int smem_limit, cudaStream_t stream);

// Brings every received row back to its source and sums the copies of each token in rank order
// (kernels/intranode/combine.cu), on `stream`. Needs notify_combine just before it on the same stream; launched
// programmatically, it waits for notify_combine's end on the device.
void intranode_combine(const CombineParams& params, size_t num_nvl_bytes, int smem_limit, cudaStream_t stream);

// Parameters of `gather_rows` (kernels/permute.cu).
struct GatherRowsParams {
    const uint8_t* src;     // [num_src_rows, num_row_bytes]
    uint8_t* out;           // out [num_out_rows, num_row_bytes]
    const int64_t* row_of;  // [num_out_rows]: the source row of each output row, or < 0 for a zero row
    int64_t num_src_rows;   // rows of src
    int64_t num_out_rows;   // rows of out
    int64_t num_row_bytes;  // bytes of one row
};

// out[i] = src[row_of[i]], a zero row where row_of[i] < 0, on `stream`. A row_of entry >= num_src_rows stops the
// kernel with a device assertion.
// Arguments: params (checked here); num_sms: SM count of the current device (sizes the grid); stream.
void gather_rows(const GatherRowsParams& params, int num_sms, cudaStream_t stream);

// Most rows one output row of `sum_row_copies` sums: a row has one copy per local expert among its top-k.
constexpr int kMaxRowCopies = kMaxNumTopk;

// Parameters of `sum_row_copies` (kernels/permute.cu).
struct SumRowCopiesParams {
    const void* hidden_rows;   // [num_hidden_rows, hidden] bf16
    void* out;                 // out [num_rows, hidden] bf16
    const int64_t* positions;  // [num_rows, num_positions]: rows of hidden_rows to sum, -1 for none
    int64_t num_hidden_rows;   // rows of hidden_rows
    int64_t num_rows;          // rows of out and positions
    int num_positions;         // columns of positions (the local experts)
    int hidden;                // a positive multiple of 8
};

// out[r] = the fp32 sum, in ascending column order from +0.0, of the rows positions[r] names (at most kMaxRowCopies),
// rounded once to bfloat16, on `stream`. A position >= num_hidden_rows, or more than kMaxRowCopies of them in a row,
// stops the kernel with a device assertion.
// Arguments: params (checked here); num_sms: SM count of the current device (sizes the grid); stream.
void sum_row_copies(const SumRowCopiesParams& params, int num_sms, cudaStream_t stream);

}  // namespace hybrid_ep::kernels
