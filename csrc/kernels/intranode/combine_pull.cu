// `intranode_combine_pull`: the combine when every rank's inputs lie in its output arena (the choice is made on the
// device, kernels/intranode/combine_inputs.cuh). Each rank reads the copies of its own tokens straight from the
// inputs of the ranks that hold them (1-D bulk copies, peer global -> shared over NVLink) and sums them in fp32 in
// the reference's order (bias_0, bias_1, then ranks ascending), so the result is bitwise that of the pushing kernel
// (kernels/intranode/combine.cu) and of the reference. Nothing goes to a peer but one flag at the end: no rings,
// tails or heads, and the peers' SMs take no part in moving the rows.
//
// Work: a rank's tokens in groups of kGroupTokens; most groups go to blocks in fixed shares (group g to block
// g % num_blocks), the tokens of the last kTailPermille thousandths are claimed at run time, kTailClaimTokens at a
// time, by the blocks that get there first (TokenCursor), so the blocks of a rank end together. Rows are cut into
// num_pieces pieces (one, unless a row is too wide for a token's copies to fit the stages at once); a unit is one piece
// of one token, and a block's units, in order, share one ring of num_stages stages in shared memory, item k (the k-th
// copy of a piece the block loads) in stage k % num_stages.
//   * loaders (kNumLoaders warps): loader w fills the stages s = w mod kNumLoaders: for each item of those, its lane
//     0 waits (bounded) until the stage is free and loads the copy's piece into it (completion counted in bytes on the
//     stage's full barrier); with a copy's first piece, the 16-byte-aligned window around its top-k weights into the
//     stage's tail. NOTES: one warp issued at most about 2 bulk loads per microsecond (28 GB/s of 14 KiB rows, on 4
//     H200 GPUs), so a block needs several to keep its share of the links busy.
//   * reducers (kNumReduceWarps warps in teams of kWarpsPerUnit): team t takes units t, t + teams, ...: each of its
//     warps waits (bounded) for the unit's copies, sums its share of the 16-byte vectors with the biases and stores
//     the BF16 results to combined_x (the team's first warp's lanes below num_topk also sum the copies' weights,
//     with the first piece), then releases the unit's stages (one arrival per warp on each stage's empty barrier).
//     NOTES: a unit holds its stages until it is summed, which one warp took long enough to starve the loaders,
//     while a team of all the warps waited on every unit together (figures at intranode_combine_pull).
// Every warp reads the routing (send_head) a token ahead, so no warp waits on a load of its own per token.
// End: every block, once its loads have landed, adds its share to a reads-done count at every peer (device/
// layout.cuh); the shares of a rank's blocks sum to kReadsDoneTotal whatever their number. Block 0 waits (bounded)
// until every peer's count is complete before the kernel ends, so a rank's combine never completes while a peer may
// still read its inputs (which the caller may then overwrite).
// Start: launched programmatically after intranode_combine (which ends at once when this kernel pulls), so the
// blocks set up their barriers and read their first token's routing before the kernels ahead end, then wait for them
// (griddep_wait).
// Preconditions: notify_combine and intranode_combine were enqueued just before on this stream (notify_combine's
// barrier also orders every rank's writes of its inputs before the peers' reads); the handle comes from a dispatch
// of this Buffer; is_combine_pull_supported.
#include <cuda_bf16.h>

#include <cstdio>

#include "device/bf16.cuh"
#include "device/comm.cuh"
#include "device/exception.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "kernels/intranode/combine_inputs.cuh"
#include "kernels/launch.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

constexpr int kNumLoaders = 4;
constexpr int kNumReduceWarps = 8;
constexpr int kNumPullWarps = kNumLoaders + kNumReduceWarps;
// What the blocks of a rank add up to in each peer's reads-done count: block 0 adds kReadsDoneTotal minus the other
// blocks' 1 each, so a peer needs no block count.
constexpr int kReadsDoneTotal = 1 << 20;
constexpr int kGroupTokens = 4;
// Thousandths of a rank's token groups claimed at run time, at the end (TokenCursor).
constexpr int kTailPermille = 60;
// Tokens per claim of the tail.
constexpr int kTailClaimTokens = 1;
constexpr int kMaxStages = 64;
// After a stage's piece: room for the 16-byte-aligned window around one row of top-k weights (at most
// kNumMaxRingTopk floats, starting anywhere in its first 16 bytes).
constexpr int kWeightsWindowBytes = align16(4 * kNumMaxRingTopk + 15);

// How a row is cut into pieces, and the stages of a block.
struct PieceLayout {
    int num_pieces;
    int piece_bytes;  // a multiple of 16; the last piece may be shorter
    int stage_bytes;  // a piece and a weights window, rounded up to 128
    int num_stages;

    // Returns: the fewest pieces whose stages (beside `static_bytes` of static shared memory) hold a piece of every
    // rank at once; num_stages < num_ranks where none do.
    static PieceLayout of(int num_ranks, int hidden, int smem_limit, size_t static_bytes) {
        const int row_bytes = hidden * 2;
        const long long avail = static_cast<long long>(smem_limit) - static_cast<long long>(static_bytes);
        PieceLayout layout{};
        for (int num_pieces = 1; num_pieces <= 64; num_pieces *= 2) {
            const int piece_bytes = align16((row_bytes + num_pieces - 1) / num_pieces);
            const int stage_bytes = (piece_bytes + kWeightsWindowBytes + 127) / 128 * 128;
            const long long stages = avail > 0 ? avail / stage_bytes : 0;
            layout = {num_pieces, piece_bytes, stage_bytes,
                      static_cast<int>(stages < kMaxStages ? stages : kMaxStages)};
            if (layout.num_stages >= num_ranks)
                break;
        }
        return layout;
    }
};

// The block's ring of stages. Stage s is filled by loader s % kNumLoaders only, so its uses are issued in order, and
// a waiter never looks more than one phase of a barrier ahead (a parity wait cannot tell phase n from n - 2): the
// loader waits for the release of use n - 1 before it issues use n, and a reducer waits for the full barrier of use
// n only once use n is issued (`issued`), by which time use n - 1 has landed and been released.
struct StageRing {
    uint32_t stages;  // shared address of stage 0
    uint64_t* full;   // [num_stages]: one arrival (the loader's) plus the bytes of the copy
    uint64_t* empty;  // [num_stages]: one arrival per reducer warp
    int* issued;      // [num_stages]: uses issued so far (written by the stage's loader)
    int num_stages;
    int stage_bytes;
    int window_offset;  // of the weights window in a stage

    __device__ __forceinline__ uint32_t stage(int item) const {
        return stages + static_cast<uint32_t>(item % num_stages) * stage_bytes;
    }
    // Waits (bounded) until the phase of `bars[item % num_stages]` that ends use `use` of the stage completes.
    __device__ __forceinline__ void wait(uint64_t* bars, int item, int use, const CombineParams& p, int token,
                                         const char* what) const {
        const uint32_t bar = ptx::smem_addr(&bars[item % num_stages]);
        const uint32_t phase = static_cast<uint32_t>(use) & 1u;
        timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
            const bool is_done = ptx::mbarrier_try_wait(bar, phase);
            if (!is_done && is_last_check)
                printf("hybrid_ep combine timeout: rank %d, block %d, warp %d waits for %s of token %d (stage %d)\n",
                       p.rank, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x / kWarpSize), what, token,
                       item % num_stages);
            return !is_done;
        });
    }
};

// Claims of a block's tail, in shared memory: starts[k] is what the block's k-th claim got from the rank's tail
// counter (kUnclaimed until its claimer writes it), next the claims taken so far.
constexpr int kMaxTailClaims = 512;
constexpr int kUnclaimed = -1;
struct TailClaims {
    int next;
    int starts[kMaxTailClaims];

    __device__ __forceinline__ void init() {
        for (int k = threadIdx.x; k < kMaxTailClaims; k += blockDim.x)
            starts[k] = kUnclaimed;
        if (threadIdx.x == 0)
            next = 0;
    }
};

// How a rank's tokens are shared out: num_static_rounds rounds of fixed groups per block, then the tail, claimed
// claim_tokens tokens at a time. Set by the host (intranode_combine_pull); the same on every block.
struct TokenShares {
    int num_static_rounds;
    int claim_tokens;
};

// The tokens of one block: first its fixed share, groups blockIdx.x, blockIdx.x + gridDim.x, ... of kGroupTokens
// tokens (num_static_rounds groups), then runs of claim_tokens tokens of the tail (the tokens from
// num_static_rounds * gridDim.x groups on), claimed at run time from the rank's tail counter, so blocks that ran
// slow take fewer of them. Every warp of the block walks the same sequence: the first warp to need claim k makes
// it and writes it to the shared table; the others read it there.
// NOTES: the blocks of a rank ended up to 20 us apart (of about 500 at 16 SMs on 4 H200 GPUs) with fixed shares
// alone. The claim is out of line: inlined at each of the loops' calls, it made the kernel half again as long and
// 6% slower at 8 SMs, even with no tail at all.
struct TokenCursor {
    int num_tokens;
    int num_static_tokens;  // of this block's sequence
    int64_t tail_begin;     // the first token of the tail
    int claim_tokens;
    TailClaims* claims;
    int* tail_counter;  // this rank's, in its own NVLink buffer (zeroed by the prelude)
    int64_t num_timeout_cycles;
    int rank;

    // Returns: the counter value of the block's k-th tail claim. Warp-collective.
    __device__ __noinline__ int tail_claim(int k) const {
        int claim = 0;
        if (ptx::get_lane_idx() == 0) {
            volatile int* slot = &claims->starts[k];
            claim = *slot;
            if (claim == kUnclaimed) {
                if (atomicCAS(&claims->next, k, k + 1) == k) {
                    claim = atomicAdd(tail_counter, 1);
                    *slot = claim;
                } else {
                    timeout_while(num_timeout_cycles, [&](bool is_last_check) {
                        claim = *slot;
                        if (claim == kUnclaimed && is_last_check)
                            printf("hybrid_ep combine timeout: rank %d, block %d waits for tail claim %d\n", rank,
                                   static_cast<int>(blockIdx.x), k);
                        return claim == kUnclaimed;
                    });
                }
            }
        }
        return __shfl_sync(0xffffffff, claim, 0);
    }

    // Returns: the block's i-th token, or -1 past its last (no token of the block follows the first one past the
    // end). Warp-collective.
    __device__ __forceinline__ int token(int i) const {
        int64_t token;
        if (i < num_static_tokens) {
            const int64_t group = blockIdx.x + static_cast<int64_t>(i / kGroupTokens) * gridDim.x;
            token = group * kGroupTokens + i % kGroupTokens;
        } else {
            const int j = i - num_static_tokens, k = j / claim_tokens;
            if (k >= kMaxTailClaims)
                return -1;
            token = tail_begin + static_cast<int64_t>(tail_claim(k)) * claim_tokens + j % claim_tokens;
        }
        return token < num_tokens ? static_cast<int>(token) : -1;
    }
};

// Returns (lane < num_ranks): the row of `token` in that rank's x, -1 where the rank has no copy (or no token).
__device__ __forceinline__ int load_source_row(const CombineParams& p, int token, int lane_idx) {
    return token >= 0 && lane_idx < p.num_ranks
               ? __ldg(p.send_head + static_cast<int64_t>(token) * p.num_ranks + lane_idx)
               : -1;
}

// The address of rank r's top-k weights of its row `row`.
__device__ __forceinline__ uintptr_t weights_address(const CombineParams& p, const CombineInputs& inputs, int r,
                                                     int row) {
    return reinterpret_cast<uintptr_t>(inputs.weights[r] + static_cast<int64_t>(row) * p.num_topk);
}

// `token` and `row`: the block's first token (cursor.token(0)) and its load_source_row.
__device__ void run_loader(const CombineParams& p, const CombineInputs& inputs, const PieceLayout& pieces,
                           const StageRing& ring, const TokenCursor& cursor, int loader_idx, int token, int row) {
    const int lane_idx = ptx::get_lane_idx();
    const int num_row_bytes = p.hidden * 2;
    const bool has_weights = p.combined_topk_weights != nullptr;
    int item = 0;
    for (int i = 0; token >= 0; ++i) {
        if (lane_idx < p.num_ranks && row >= inputs.num_x_rows[lane_idx]) {
            printf(
                "hybrid_ep combine: rank %d finds token %d at row %d of rank %d, which has %d rows (the handle does "
                "not match this Buffer's last dispatch?)\n",
                p.rank, token, row, lane_idx, inputs.num_x_rows[lane_idx]);
            ptx::trap();
        }
        const unsigned mask = __ballot_sync(0xffffffff, row >= 0);
        const int next_token = cursor.token(i + 1);
        const int next_row = load_source_row(p, next_token, lane_idx);
        for (int piece = 0; piece < pieces.num_pieces; ++piece) {
            const int offset = piece * pieces.piece_bytes;
            const int num_bytes = min(pieces.piece_bytes, num_row_bytes - offset);
            for (unsigned rest = mask; rest != 0; rest &= rest - 1, ++item) {
                const int r = __ffs(rest) - 1;
                const int source_row = __shfl_sync(0xffffffff, row, r);
                if (item % ring.num_stages % kNumLoaders != loader_idx || lane_idx != 0)
                    continue;
                if (item >= ring.num_stages)
                    ring.wait(ring.empty, item, item / ring.num_stages - 1, p, token, "a free stage");
                // With the first piece, the 16-byte-aligned window around the copy's weights; it stays inside the
                // weights tensor's arena block, whose bounds are 4 KiB-aligned.
                uintptr_t window = 0;
                int window_bytes = 0;
                if (piece == 0 && has_weights) {
                    const uintptr_t begin = weights_address(p, inputs, r, source_row);
                    window = begin & ~static_cast<uintptr_t>(15);
                    window_bytes =
                        static_cast<int>(((begin + 4 * p.num_topk + 15) & ~static_cast<uintptr_t>(15)) - window);
                }
                const uint32_t bar = ptx::smem_addr(&ring.full[item % ring.num_stages]);
                const uint32_t stage = ring.stage(item);
                ptx::mbarrier_arrive_expect_tx(bar, num_bytes + window_bytes);
                ptx::tma_load_1d(stage, inputs.x[r] + static_cast<int64_t>(source_row) * num_row_bytes + offset,
                                 num_bytes, bar);
                if (window_bytes > 0)
                    ptx::tma_load_1d(stage + ring.window_offset, reinterpret_cast<const void*>(window), window_bytes,
                                     bar);
                ptx::st_release_cta(&ring.issued[item % ring.num_stages], item / ring.num_stages + 1);
            }
        }
        token = next_token;
        row = next_row;
    }
}

// `token` and `row`: as run_loader's.
template <int kMaxRanks, int kWarpsPerUnit>
__device__ void run_reducer(const CombineParams& p, const CombineInputs& inputs, const PieceLayout& pieces,
                            const StageRing& ring, const TokenCursor& cursor, int reducer_idx, int token, int row) {
    constexpr int kNumTeams = kNumReduceWarps / kWarpsPerUnit;
    const int team_idx = reducer_idx / kWarpsPerUnit, member_idx = reducer_idx % kWarpsPerUnit;
    const int lane_idx = ptx::get_lane_idx();
    const int num_vectors = p.hidden / 8, piece_vectors = pieces.piece_bytes / 16;
    const auto* bias_0 = static_cast<const int4*>(p.bias_0);
    const auto* bias_1 = static_cast<const int4*>(p.bias_1);
    auto* combined_x = static_cast<int4*>(p.combined_x);
    int item = 0, unit = 0;
    for (int i = 0; token >= 0; ++i) {
        const unsigned mask = __ballot_sync(0xffffffff, row >= 0);
        const int num_copies = __popc(mask);
        const int next_token = cursor.token(i + 1);
        const int next_row = load_source_row(p, next_token, lane_idx);
        for (int piece = 0; piece < pieces.num_pieces; ++piece, ++unit, item += num_copies) {
            if (unit % kNumTeams != team_idx)
                continue;
            for (int c = 0; c < num_copies; ++c) {
                const int copy_item = item + c, use = copy_item / ring.num_stages;
                const int* issued = &ring.issued[copy_item % ring.num_stages];
                timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                    const int observed = ptx::ld_acquire_cta(issued);
                    if (observed <= use && is_last_check)
                        printf(
                            "hybrid_ep combine timeout: rank %d, block %d waits for the load of token %d's copy "
                            "(stage %d, use %d, %d issued)\n",
                            p.rank, static_cast<int>(blockIdx.x), token, copy_item % ring.num_stages, use, observed);
                    return observed <= use;
                });
                ring.wait(ring.full, copy_item, use, p, token, "a copy");
            }
            uint32_t copies[kMaxRanks];
#pragma unroll
            for (int c = 0; c < kMaxRanks; ++c)
                copies[c] = c < num_copies ? ring.stage(item + c) : 0;
            const int first = piece * piece_vectors, count = min(piece_vectors, num_vectors - first);
            const int64_t out_vector = static_cast<int64_t>(token) * num_vectors + first;
            // NOTES: every load of kUnroll vectors (copies and biases) is issued before the first add; the adds keep
            // the order bias_0, bias_1, ranks ascending (the stage order), as the pushing kernel's receivers do
            // (kernels/intranode/combine.cu). The two sums stay apart: one helper shared by both put the biases on the
            // stack here (passed by pointer) or doubled the pushing kernel's local-memory instructions (by value).
            constexpr int kStride = kWarpsPerUnit * kWarpSize;
            // Vectors (16 bytes) a lane has in flight: 4 up to 4 ranks (150 registers), 2 for 8 (4 spilled).
            constexpr int kUnroll = kMaxRanks <= 4 ? 4 : 2;
            for (int j0 = member_idx * kWarpSize + lane_idx; j0 < count; j0 += kUnroll * kStride) {
                int4 values[kUnroll][kMaxRanks + 2];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int j = j0 + u * kStride;
                    if (j >= count)
                        break;
                    if (bias_0 != nullptr)
                        values[u][kMaxRanks] = ptx::ld_nc_v4(bias_0 + out_vector + j);
                    if (bias_1 != nullptr)
                        values[u][kMaxRanks + 1] = ptx::ld_nc_v4(bias_1 + out_vector + j);
#pragma unroll
                    for (int c = 0; c < kMaxRanks; ++c)
                        if (c < num_copies)
                            values[u][c] = ptx::ld_shared_v4(copies[c] + 16 * j);
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int j = j0 + u * kStride;
                    if (j >= count)
                        break;
                    float acc[8];
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        acc[e] = 0.0f;
                    if (bias_0 != nullptr)
                        add_bf16x8(acc, values[u][kMaxRanks]);
                    if (bias_1 != nullptr)
                        add_bf16x8(acc, values[u][kMaxRanks + 1]);
#pragma unroll
                    for (int c = 0; c < kMaxRanks; ++c)
                        if (c < num_copies)
                            add_bf16x8(acc, values[u][c]);
                    ptx::st_na_v4(combined_x + out_vector + j, pack_bf16x8(acc));
                }
            }
            if (piece == 0 && member_idx == 0 && p.combined_topk_weights != nullptr) {
                // The copies' weights came with their first pieces; summed ranks ascending.
                float sum = 0.0f;
                int c = 0;
                for (unsigned rest = mask; rest != 0; rest &= rest - 1, ++c) {
                    const int r = __ffs(rest) - 1;
                    const int source_row = __shfl_sync(0xffffffff, row, r);
                    if (lane_idx < p.num_topk) {
                        const uint32_t window = copies[c] + ring.window_offset;
                        const auto misalignment = static_cast<uint32_t>(weights_address(p, inputs, r, source_row) & 15);
                        sum += ptx::ld_shared_f32(window + misalignment + 4 * lane_idx);
                    }
                }
                if (lane_idx < p.num_topk)
                    p.combined_topk_weights[static_cast<int64_t>(token) * p.num_topk + lane_idx] = sum;
            }
            __syncwarp();
            if (lane_idx == 0)
                for (int c = 0; c < num_copies; ++c)
                    ptx::mbarrier_arrive(ptx::smem_addr(&ring.empty[(item + c) % ring.num_stages]));
        }
        token = next_token;
        row = next_row;
    }
}

template <int kMaxRanks, int kWarpsPerUnit>
__global__ void __launch_bounds__(kNumPullWarps* kWarpSize, 1)
    combine_pull_kernel(const __grid_constant__ CombineParams params, const PieceLayout pieces,
                        const TokenShares shares) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ CombineInputs inputs;
    __shared__ uint64_t full_bars[kMaxStages];
    __shared__ uint64_t empty_bars[kMaxStages];
    __shared__ int issued[kMaxStages];
    __shared__ TailClaims tail_claims;

    const int warp_idx = threadIdx.x / kWarpSize, lane_idx = ptx::get_lane_idx();
    if (warp_idx == 0 && lane_idx == 0) {
        for (int s = 0; s < pieces.num_stages; ++s) {
            ptx::mbarrier_init(ptx::smem_addr(&full_bars[s]), 1);
            ptx::mbarrier_init(ptx::smem_addr(&empty_bars[s]), kWarpsPerUnit);
            issued[s] = 0;
        }
        ptx::fence_mbarrier_init();
    }
    tail_claims.init();  // ordered before every use by read_combine_inputs' block barriers
    const TokenCursor cursor{params.num_tokens,
                             shares.num_static_rounds * kGroupTokens,
                             static_cast<int64_t>(shares.num_static_rounds) * gridDim.x * kGroupTokens,
                             shares.claim_tokens,
                             &tail_claims,
                             NvlBufferLayout::claim(params.buffer_ptrs[params.rank], kCombinePullTailClaim),
                             params.num_timeout_cycles,
                             params.rank};
    // The routing of the warp's first token is read before the wait: the dispatch wrote it before notify_combine (a
    // normal launch, so after everything enqueued ahead of it) started, and this kernel starts after that. A first
    // token of the tail waits, for the prelude zeroes the tail counter.
    const bool is_first_static = cursor.num_static_tokens > 0;
    int first_token = is_first_static ? cursor.token(0) : -1;
    int first_row = is_first_static ? load_source_row(params, first_token, lane_idx) : -1;
    // The kernels ahead of this one (programmatic launch) have ended and their writes are visible after this.
    ptx::griddep_wait();
    read_combine_inputs(params, inputs);
    if (!inputs.is_pull)
        return;
    if (!is_first_static) {
        first_token = cursor.token(0);
        first_row = load_source_row(params, first_token, lane_idx);
    }
    const StageRing ring{ptx::smem_addr(smem), full_bars,          empty_bars,        issued,
                         pieces.num_stages,    pieces.stage_bytes, pieces.piece_bytes};
    // The peers' inputs were written before their barrier (generic proxy); the loads below are bulk copies. The
    // barrier set-up above is ordered before them by read_combine_inputs' block barriers.
    ptx::fence_proxy_async_global();

    if (warp_idx < kNumLoaders)
        run_loader(params, inputs, pieces, ring, cursor, warp_idx, first_token, first_row);
    else
        run_reducer<kMaxRanks, kWarpsPerUnit>(params, inputs, pieces, ring, cursor, warp_idx - kNumLoaders, first_token,
                                              first_row);

    // Every load of this block has landed (the reducers waited for all of them): tell every peer. NOTES: relaxed,
    // for what the count covers are reads whose data is already in this block's shared memory, which nothing a peer
    // writes later can change. A release at system scope first waited for this block's stores of combined_x to
    // drain (5 to 14 us on 4 H200 GPUs), on the path of the last block; with these counts instead of one flag from
    // the last block, combine at 8 / 16 / 24 SMs went from 229.1 / 387.3 / 397.0 to 231.5 / 394.3 / 403.6 GB/s,
    // together with the programmatic launches (intranode_combine).
    __syncthreads();
    void* local = params.buffer_ptrs[params.rank];
    if (threadIdx.x == 0) {
        const int share = blockIdx.x == 0 ? kReadsDoneTotal - (static_cast<int>(gridDim.x) - 1) : 1;
        for (int r = 0; r < params.num_ranks; ++r)
            if (r != params.rank)
                ptx::red_add_relaxed_sys(NvlBufferLayout::reads_done(params.buffer_ptrs[r], params.rank), share);
        ptx::red_add_relaxed_gpu(NvlBufferLayout::claim(local, kCombinePullFinishClaim), 1);
    }
    // Block 0 ends once every peer has read all it needed of this rank's inputs.
    const int peer = threadIdx.x;
    if (blockIdx.x == 0 && peer < params.num_ranks && peer != params.rank) {
        wait_peer_value(NvlBufferLayout::reads_done(local, peer), kReadsDoneTotal, params.num_timeout_cycles, "combine",
                        params.rank, "the end of the reads of this rank's inputs (reads-done count)", peer);
    }
}

template <int kMaxRanks, int kWarpsPerUnit = 2>
auto pull_kernel() {
    return combine_pull_kernel<kMaxRanks, kWarpsPerUnit>;
}

PieceLayout pieces_of(int num_ranks, int hidden, int smem_limit) {
    const auto kernel = num_ranks <= 2 ? pull_kernel<2>() : num_ranks <= 4 ? pull_kernel<4>() : pull_kernel<8>();
    return PieceLayout::of(num_ranks, hidden, smem_limit, static_shared_bytes(kernel));
}

// Returns: the shares of `num_tokens` tokens among `num_blocks` blocks (TokenCursor): fixed rounds for all but the
// last `tail_permille` thousandths of the groups and the remainder of the rounds, that tail in claims of
// `claim_tokens` tokens, at most kMaxTailClaims - 2 of them.
TokenShares token_shares(int num_tokens, int num_blocks, int tail_permille, int claim_tokens) {
    const int64_t num_groups = (static_cast<int64_t>(num_tokens) + kGroupTokens - 1) / kGroupTokens;
    TokenShares shares{static_cast<int>(num_groups * (1000 - tail_permille) / 1000 / num_blocks), claim_tokens};
    const auto tail_tokens = [&] {
        return static_cast<int64_t>(num_tokens) -
               static_cast<int64_t>(shares.num_static_rounds) * num_blocks * kGroupTokens;
    };
    while (tail_tokens() > static_cast<int64_t>(kMaxTailClaims - 2) * claim_tokens)
        ++shares.num_static_rounds;
    return shares;
}

}  // namespace

bool is_combine_pull_supported(int num_ranks, int hidden, int smem_limit) {
    if (num_ranks < 1 || num_ranks > kNumMaxKernelRanks || hidden <= 0 || hidden % 8 != 0)
        return false;
    // A piece's copies (one per rank at most) must fit the ring at once.
    return pieces_of(num_ranks, hidden, smem_limit).num_stages >= num_ranks;
}

void intranode_combine_pull(const CombineParams& params, int smem_limit, cudaStream_t stream) {
    HEP_CHECK(is_combine_pull_supported(params.num_ranks, params.hidden, smem_limit),
              "combine: the pulling kernel does not serve rows of ", params.hidden, " values among ", params.num_ranks,
              " ranks");
    const PieceLayout pieces = pieces_of(params.num_ranks, params.hidden, smem_limit);
    const size_t smem = static_cast<size_t>(pieces.num_stages) * pieces.stage_bytes;
    // NOTES: at most kMaxTailClaims - 2 claims, so a block's table holds every claim it can make and its last one,
    // past the end.
    const TokenShares shares = token_shares(params.num_tokens, params.num_blocks, kTailPermille, kTailClaimTokens);
    // NOTES: warps per unit on 4 H200 GPUs (GB/s at 8 / 16 / 24 SMs; the pushing kernel 216 / 355 / 369 in the same
    // run): 1 gave 167 / 312 / 381, 2 gave 230 / 390 / 385, 4 gave 191 / 365 / 399; all 8 (an earlier run) 127 /
    // 246 / 355.
    const int warps_per_unit = params.num_blocks >= 24 ? 4 : 2;
    const auto launch = [&](auto ranks_tag) {
        constexpr int kMaxRanks = decltype(ranks_tag)::value;
        const auto go = [&](auto kernel) {
            CUDA_CHECK(
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
            launch_programmatic(kernel, LaunchArgs{dim3(params.num_blocks), dim3(kNumPullWarps * kWarpSize), smem},
                                stream, params, pieces, shares);
        };
        if (warps_per_unit == 4)
            go(pull_kernel<kMaxRanks, 4>());
        else
            go(pull_kernel<kMaxRanks, 2>());
        return true;
    };
    const int max_ranks = params.num_ranks <= 2 ? 2 : params.num_ranks <= 4 ? 4 : 8;
    HEP_SWITCH_INT(max_ranks, "combine: the rank bound", launch, 2, 4, 8);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
