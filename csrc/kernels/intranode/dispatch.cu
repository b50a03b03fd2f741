// `intranode_dispatch`: moves rows over NVLink into per-(block, source) rings of the receivers, which copy them out.
//
// Grid: 2 blocks per channel; block b sends the tokens of one half of channel b / 2 (contiguous) and receives what
// block b of every peer sends. Each block has one sender warp and kNumRecvWarps receiver warps:
//   * sender (warp 0): lane 0 runs a bulk-copy pipeline. Row k + kNumPrefetch is loaded global -> shared (TMA,
//     completion on the stage's mbarrier) while row k is stored shared -> peer ring (TMA) for every destination
//     `send_head` names, its metadata (source index, top-k, weights, scales, written into the stage by all lanes)
//     with it. Rows for this rank itself go straight into the outputs. One bulk group per row; a stage is reused
//     after its group completed (`bulk_wait_group`), and that wait also tells which rows are visible at the
//     peers: every num_chunk_tokens rows lane 0 publishes the ring tails (release, system scope). Before a slot is
//     reused the sender waits (bounded) for the receiver's head. The last tail carries kDoneBit.
//   * receivers (warps 1..): grouped per source; a group leader polls its sources' tails (acquire), the group
//     copies the available rows to recv_x / recv_* (16-byte loads that skip L1, localising top-k), then the leader
//     releases the head into the source's buffer. Rows go to `start + j`, where start (the receive row of the
//     sender block's first row for this rank) is written by the sender before its first tail.
// Counters: tails[b][s] (receiver's buffer, written by source s) and heads[b][d] (sender's buffer, written by
// receiver d) start every call at zero: each rank zeroes its own between the two barriers before the kernel
// (notify_dispatch, or prepare_rings in cached mode).
// Preconditions: every rank's rings are idle (notify_dispatch or a barrier ran before on this stream); every rank
// launches with the same num_channels, num_ring_slots, row and metadata sizes.
#include <cstdio>

#include "device/comm.cuh"
#include "device/exception.cuh"
#include "device/layout.cuh"
#include "device/ptx.cuh"
#include "kernels/api.cuh"
#include "kernels/launch.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kNumRecvWarps = 12;
constexpr int kNumThreads = (1 + kNumRecvWarps) * kWarpSize;
constexpr int kDoneBit = 1 << 30;

struct StageLayout {
    int num_x_bytes;
    int num_meta_bytes;
    HEP_HOST_DEVICE int stride() const { return (num_x_bytes + num_meta_bytes + 127) / 128 * 128; }
};

// Shared state of the sender (lane 0 reads and writes it; other lanes fill metadata).
struct SenderState {
    int sent[kNumMaxKernelRanks];       // rows written into the ring at each rank
    int head_seen[kNumMaxKernelRanks];  // last head read for each rank
    int published[kNumMaxKernelRanks];  // last tail published to each rank
    int start[kNumMaxKernelRanks];      // receive row of the first row sent to each rank
    int recv_row[kNumMaxKernelRanks];   // receive row of the current token at each rank, or -1
};

template <int kNumStages>
struct SenderHistory {
    int sent[kNumStages][kNumMaxKernelRanks];  // `sent` after row k, at [k % kNumStages]
};

// Receiver group task, written by the group leader.
struct RecvTask {
    int src_rank;  // -1: the group is done
    int first;     // first ring row to copy
    int count;     // rows to copy
    int start;     // receive row of ring row 0
};

// Waits (bounded) for a local bulk load into a stage.
__device__ __forceinline__ void wait_stage(uint32_t bar, uint32_t phase, int64_t num_timeout_cycles, int rank) {
    timeout_while(num_timeout_cycles, [&](bool is_last_check) {
        const bool is_done = ptx::mbarrier_try_wait(bar, phase);
        if (!is_done && is_last_check)
            printf("hybrid_ep dispatch timeout: rank %d, block %d: a local bulk load never completed\n", rank,
                   static_cast<int>(blockIdx.x));
        return !is_done;
    });
}

template <int kNumStages, int kNumPrefetch>
__device__ void run_sender(const DispatchParams& p, uint8_t* smem, int block_idx) {
    static_assert(kNumPrefetch >= 1 && kNumPrefetch < kNumStages, "prefetch depth must be below the stage count");
    constexpr int kNumInFlight = kNumStages - kNumPrefetch - 1;
    __shared__ SenderState state;
    __shared__ SenderHistory<kNumStages> history;
    __shared__ uint64_t stage_bars[kNumStages];

    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const int num_blocks = 2 * p.num_channels;
    const StageLayout stage_layout{p.num_x_bytes, DispatchMetaLayout{p.num_topk, p.num_scales}.num_bytes()};
    const DispatchMetaLayout meta_layout{p.num_topk, p.num_scales};
    const RingLayout rings{num_ranks, num_blocks, p.num_ring_slots, p.num_x_bytes, meta_layout.num_bytes()};

    // This block's tokens: one half of its channel.
    const int channel = block_idx / 2;
    const int tokens_per_channel = max((p.num_tokens + p.num_channels - 1) / p.num_channels, 1);
    const int channel_begin = min(channel * tokens_per_channel, p.num_tokens);
    const int channel_end = min(channel_begin + tokens_per_channel, p.num_tokens);
    const int channel_mid = min(channel_begin + (tokens_per_channel + 1) / 2, channel_end);
    const int token_begin = block_idx % 2 == 0 ? channel_begin : channel_mid;
    const int num_block_tokens = (block_idx % 2 == 0 ? channel_mid : channel_end) - token_begin;

    if (lane_idx < kNumMaxKernelRanks) {
        state.sent[lane_idx] = state.head_seen[lane_idx] = state.published[lane_idx] = 0;
        state.start[lane_idx] = 0;
    }
    if (lane_idx == 0) {
        for (int s = 0; s < kNumStages; ++s)
            ptx::mbarrier_init(ptx::smem_addr(&stage_bars[s]), 1);
        ptx::fence_mbarrier_init();
    }
    __syncwarp();

    const auto stage_x = [&](int k) { return smem + (k % kNumStages) * stage_layout.stride(); };
    const auto issue_load = [&](int k) {
        const uint32_t bar = ptx::smem_addr(&stage_bars[k % kNumStages]);
        ptx::mbarrier_arrive_expect_tx(bar, p.num_x_bytes);
        ptx::tma_load_1d(ptx::smem_addr(stage_x(k)),
                         static_cast<const uint8_t*>(p.x) + static_cast<int64_t>(token_begin + k) * p.num_x_bytes,
                         p.num_x_bytes, bar);
    };
    // Lane 0: makes tails up to `sent_after` visible at every peer (all bulk groups they count have completed).
    const auto publish = [&](const int* sent_after, bool is_last) {
        ptx::fence_proxy_async_global();
        for (int d = 0; d < num_ranks; ++d) {
            if (d == rank)
                continue;
            const int value = sent_after[d] | (is_last ? kDoneBit : 0);
            if (value == state.published[d])
                continue;
            if (state.published[d] == 0 && sent_after[d] > 0)
                ptx::st_relaxed_sys(NvlBufferLayout::start(p.buffer_ptrs[d], block_idx, rank), state.start[d]);
            ptx::st_release_sys(NvlBufferLayout::tail(p.buffer_ptrs[d], block_idx, rank), value);
            state.published[d] = value;
        }
    };

    if (lane_idx == 0)
        for (int k = 0; k < min(kNumPrefetch, num_block_tokens); ++k)
            issue_load(k);

    for (int k = 0; k < num_block_tokens; ++k) {
        const int token_idx = token_begin + k;
        uint8_t* stage = stage_x(k);
        // Prefetch row k + kNumPrefetch into the stage row k + kNumPrefetch - kNumStages used; once that row's
        // group has completed, every row up to it is visible at its destinations.
        if (lane_idx == 0 && k + kNumPrefetch < num_block_tokens) {
            ptx::bulk_wait_group<kNumInFlight>();
            const int done_k = k + kNumPrefetch - kNumStages;
            if (done_k >= 0 && (done_k + 1) % p.num_chunk_tokens == 0)
                publish(history.sent[done_k % kNumStages], false);
            issue_load(k + kNumPrefetch);
        }

        // Metadata of row k into the stage (every lane), and where the row lands at each rank.
        uint8_t* meta = stage + p.num_x_bytes;
        if (lane_idx == 0)
            *reinterpret_cast<int*>(meta) = token_idx;
        int64_t expert_idx = -1;
        float weight = 0.0f;
        if (lane_idx < p.num_topk) {
            expert_idx = p.topk_idx[static_cast<int64_t>(token_idx) * p.num_topk + lane_idx];
            weight = p.topk_weights[static_cast<int64_t>(token_idx) * p.num_topk + lane_idx];
            reinterpret_cast<int64_t*>(meta + meta_layout.topk_idx_offset())[lane_idx] = expert_idx;
            reinterpret_cast<float*>(meta + meta_layout.weights_offset())[lane_idx] = weight;
        }
        for (int i = lane_idx; i < p.num_scales; i += kWarpSize)
            reinterpret_cast<float*>(meta + meta_layout.scales_offset())[i] =
                p.x_scales[token_idx * p.scale_token_stride + i * p.scale_hidden_stride];
        const int recv_row =
            lane_idx < num_ranks ? p.send_head[static_cast<int64_t>(token_idx) * num_ranks + lane_idx] : -1;
        if (lane_idx < num_ranks)
            state.recv_row[lane_idx] = recv_row;
        ptx::fence_proxy_async_shared();

        // This rank's own copy goes straight to the outputs; the metadata is written here by the lanes.
        const int self_row = __shfl_sync(0xffffffff, recv_row, rank);
        if (self_row >= 0) {
            if (p.recv_src_idx != nullptr && lane_idx == 0)
                p.recv_src_idx[self_row] = token_idx;
            if (lane_idx < p.num_topk && p.recv_topk_idx != nullptr) {
                const int64_t first = static_cast<int64_t>(rank) * p.num_local_experts;
                const bool is_local = expert_idx >= first && expert_idx < first + p.num_local_experts;
                p.recv_topk_idx[static_cast<int64_t>(self_row) * p.num_topk + lane_idx] =
                    is_local ? expert_idx - first : -1;
                p.recv_topk_weights[static_cast<int64_t>(self_row) * p.num_topk + lane_idx] = is_local ? weight : 0.0f;
            }
            for (int i = lane_idx; i < p.num_scales; i += kWarpSize)
                p.recv_scales[static_cast<int64_t>(self_row) * p.num_scales + i] =
                    p.x_scales[token_idx * p.scale_token_stride + i * p.scale_hidden_stride];
        }
        __syncwarp();

        if (lane_idx == 0) {
            const int stage_idx = k % kNumStages;
            wait_stage(ptx::smem_addr(&stage_bars[stage_idx]), (k / kNumStages) & 1, p.num_timeout_cycles, rank);
            const uint32_t stage_addr = ptx::smem_addr(stage);
            // Rotate the destinations so the blocks of a rank do not all hit the same peer at once.
            for (int i = 0; i < num_ranks; ++i) {
                const int d = (rank + 1 + block_idx + i) % num_ranks;
                const int row = state.recv_row[d];
                if (row < 0)
                    continue;
                if (d == rank) {
                    ptx::tma_store_1d(static_cast<uint8_t*>(p.recv_x) + static_cast<int64_t>(row) * p.num_x_bytes,
                                      stage_addr, p.num_x_bytes);
                    continue;
                }
                const int sent = state.sent[d];
                if (sent - state.head_seen[d] >= p.num_ring_slots) {
                    // NOTES: the ring may be full of rows not yet published; publish everything first (an extra
                    // bulk group only makes the later group waits stricter), or the receiver could never free it.
                    ptx::bulk_commit_group();
                    ptx::bulk_wait_group<0>();
                    publish(state.sent, false);
                    const int* head_ptr = NvlBufferLayout::head(p.buffer_ptrs[rank], block_idx, d);
                    timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                        state.head_seen[d] = ptx::ld_acquire_sys(head_ptr);
                        const bool is_full = sent - state.head_seen[d] >= p.num_ring_slots;
                        if (is_full && is_last_check)
                            printf(
                                "hybrid_ep dispatch timeout: rank %d, block %d waits for peer %d to free a ring "
                                "slot: expected head > %d, observed %d\n",
                                rank, block_idx, d, sent - p.num_ring_slots, state.head_seen[d]);
                        return is_full;
                    });
                    ptx::fence_proxy_async_global();
                }
                if (sent == 0)
                    state.start[d] = row;
                const int slot = sent % p.num_ring_slots;
                ptx::tma_store_1d(rings.x(p.buffer_ptrs[d], block_idx, rank, slot), stage_addr, p.num_x_bytes);
                ptx::tma_store_1d(rings.meta(p.buffer_ptrs[d], block_idx, rank, slot), stage_addr + p.num_x_bytes,
                                  stage_layout.num_meta_bytes);
                state.sent[d] = sent + 1;
            }
            ptx::bulk_commit_group();
            for (int d = 0; d < num_ranks; ++d)
                history.sent[k % kNumStages][d] = state.sent[d];
        }
        __syncwarp();
    }

    if (lane_idx == 0) {
        ptx::bulk_wait_group<0>();
        publish(state.sent, true);
    }
    __syncwarp();
}

// Copies `count` ring rows [first, first + count) of ring (block_idx, src_rank) out; this warp takes every
// `num_warps`-th row from `warp_rank`.
__device__ void copy_out(const DispatchParams& p, const RingLayout& rings, const DispatchMetaLayout& meta_layout,
                         int block_idx, const RecvTask& task, int warp_rank, int num_warps) {
    const int lane_idx = ptx::get_lane_idx();
    void* local = p.buffer_ptrs[p.rank];
    const int num_vectors = p.num_x_bytes / 16;
    for (int j = task.first + warp_rank; j < task.first + task.count; j += num_warps) {
        const int slot = j % p.num_ring_slots;
        const int64_t row = task.start + j;
        const auto* src = reinterpret_cast<const int4*>(rings.x(local, block_idx, task.src_rank, slot));
        auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.recv_x) + row * p.num_x_bytes);
        // NOTES: 8 loads in flight per lane before the first store: the copy is latency-bound otherwise.
        constexpr int kUnroll = 8;
        int i = lane_idx;
        for (; i + (kUnroll - 1) * kWarpSize < num_vectors; i += kUnroll * kWarpSize) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                v[u] = ptx::ld_cg_v4(src + i + u * kWarpSize);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                ptx::st_na_v4(dst + i + u * kWarpSize, v[u]);
        }
        for (; i < num_vectors; i += kWarpSize)
            ptx::st_na_v4(dst + i, ptx::ld_cg_v4(src + i));

        const uint8_t* meta = rings.meta(local, block_idx, task.src_rank, slot);
        if (p.recv_src_idx != nullptr && lane_idx == 0)
            p.recv_src_idx[row] = ptx::ld_cg(reinterpret_cast<const int*>(meta));
        if (lane_idx < p.num_topk && p.recv_topk_idx != nullptr) {
            const int64_t expert_idx =
                *reinterpret_cast<const volatile int64_t*>(meta + meta_layout.topk_idx_offset() + 8 * lane_idx);
            const float weight =
                *reinterpret_cast<const volatile float*>(meta + meta_layout.weights_offset() + 4 * lane_idx);
            const int64_t first_expert = static_cast<int64_t>(p.rank) * p.num_local_experts;
            const bool is_local = expert_idx >= first_expert && expert_idx < first_expert + p.num_local_experts;
            p.recv_topk_idx[row * p.num_topk + lane_idx] = is_local ? expert_idx - first_expert : -1;
            p.recv_topk_weights[row * p.num_topk + lane_idx] = is_local ? weight : 0.0f;
        }
        for (int s = lane_idx; s < p.num_scales; s += kWarpSize)
            p.recv_scales[row * p.num_scales + s] =
                *reinterpret_cast<const volatile float*>(meta + meta_layout.scales_offset() + 4 * s);
    }
}

__device__ void run_receiver(const DispatchParams& p, int block_idx, int recv_warp_idx) {
    __shared__ RecvTask tasks[kNumRecvWarps];
    __shared__ int consumed[kNumMaxKernelRanks];
    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const int num_blocks = 2 * p.num_channels;
    const DispatchMetaLayout meta_layout{p.num_topk, p.num_scales};
    const RingLayout rings{num_ranks, num_blocks, p.num_ring_slots, p.num_x_bytes, meta_layout.num_bytes()};

    // Padding rows after the received ones: zero data, -1 indices (spread over every receiver warp of the grid).
    const int num_recv_rows = p.rank_prefix_matrix[(num_ranks - 1) * num_ranks + rank];
    for (int64_t row = num_recv_rows + block_idx * kNumRecvWarps + recv_warp_idx; row < p.num_out_rows;
         row += static_cast<int64_t>(num_blocks) * kNumRecvWarps) {
        auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.recv_x) + row * p.num_x_bytes);
        for (int i = lane_idx; i < p.num_x_bytes / 16; i += kWarpSize)
            dst[i] = make_int4(0, 0, 0, 0);
        if (p.recv_src_idx != nullptr && lane_idx == 0)
            p.recv_src_idx[row] = -1;
        if (p.recv_topk_idx != nullptr && lane_idx < p.num_topk) {
            p.recv_topk_idx[row * p.num_topk + lane_idx] = -1;
            p.recv_topk_weights[row * p.num_topk + lane_idx] = 0.0f;
        }
        for (int s = lane_idx; s < p.num_scales; s += kWarpSize)
            p.recv_scales[row * p.num_scales + s] = 0.0f;
    }

    // Groups of warps, one or more sources each.
    const int num_sources = num_ranks - 1;
    if (num_sources == 0)
        return;
    const int num_groups = min(num_sources, kNumRecvWarps);
    const int warps_per_group = kNumRecvWarps / num_groups;
    const int group_idx = recv_warp_idx / warps_per_group;
    if (group_idx >= num_groups)
        return;
    const int warp_rank = recv_warp_idx % warps_per_group;
    const bool is_leader = warp_rank == 0 && lane_idx == 0;
    RecvTask& task = tasks[group_idx];
    // Sources of this group: the i-th peer after this rank, for i = group_idx, group_idx + num_groups, ...
    const auto source = [&](int i) { return (rank + 1 + group_idx + i * num_groups) % num_ranks; };
    const int num_group_sources = (num_sources - group_idx + num_groups - 1) / num_groups;
    if (is_leader)
        for (int i = 0; i < num_group_sources; ++i)
            consumed[source(i)] = 0;

    unsigned done_mask = 0;
    int next = 0;
    while (true) {
        if (is_leader) {
            task.src_rank = -1;
            if (done_mask != (1u << num_group_sources) - 1) {
                timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                    for (int n = 0; n < num_group_sources; ++n) {
                        const int i = (next + n) % num_group_sources;
                        if (done_mask >> i & 1)
                            continue;
                        const int s = source(i);
                        const int tail = ptx::ld_acquire_sys(NvlBufferLayout::tail(p.buffer_ptrs[rank], block_idx, s));
                        const int available = (tail & ~kDoneBit) - consumed[s];
                        if (available > 0) {
                            task = RecvTask{s, consumed[s], min(available, 8 * warps_per_group),
                                            ptx::ld_cg(NvlBufferLayout::start(p.buffer_ptrs[rank], block_idx, s))};
                            next = (i + 1) % num_group_sources;
                            return false;
                        }
                        if (tail & kDoneBit) {
                            done_mask |= 1u << i;
                            if (done_mask == (1u << num_group_sources) - 1)
                                return false;
                        }
                        if (is_last_check)
                            printf(
                                "hybrid_ep dispatch timeout: rank %d, block %d waits for rows from peer %d: "
                                "expected tail > %d, observed %d\n",
                                rank, block_idx, s, consumed[s], tail & ~kDoneBit);
                    }
                    return true;
                });
            }
        }
        ptx::named_barrier_sync(1 + group_idx, warps_per_group * kWarpSize);
        const RecvTask current = task;
        if (current.src_rank < 0)
            break;
        copy_out(p, rings, meta_layout, block_idx, current, warp_rank, warps_per_group);
        ptx::named_barrier_sync(1 + group_idx, warps_per_group * kWarpSize);
        if (is_leader) {
            consumed[current.src_rank] += current.count;
            ptx::st_release_sys(NvlBufferLayout::head(p.buffer_ptrs[current.src_rank], block_idx, rank),
                                consumed[current.src_rank]);
        }
    }
}

template <int kNumStages, int kNumPrefetch>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(const __grid_constant__ DispatchParams params) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int warp_idx = threadIdx.x / kWarpSize;
    if (warp_idx == 0)
        run_sender<kNumStages, kNumPrefetch>(params, smem, blockIdx.x);
    else
        run_receiver(params, blockIdx.x, warp_idx - 1);
}

}  // namespace

void intranode_dispatch(const DispatchParams& params, size_t num_nvl_bytes, int smem_limit, cudaStream_t stream) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_ranks <= kNumMaxKernelRanks, "dispatch: at most ", kNumMaxKernelRanks,
              " ranks per NVLink domain are supported, got ", params.num_ranks);
    HEP_CHECK(params.num_channels >= 1 && params.num_channels <= kNumMaxChannels, "dispatch: config.num_sms / 2 (",
              params.num_channels, " channels) must be in [1, ", kNumMaxChannels, "]");
    HEP_CHECK(params.num_x_bytes > 0 && params.num_x_bytes % 16 == 0,
              "dispatch: a row of x must be a positive multiple of 16 bytes, got ", params.num_x_bytes);
    HEP_CHECK(params.num_topk >= 0 && params.num_topk <= kNumMaxRingTopk, "dispatch: num_topk must be in [0, ",
              kNumMaxRingTopk, "], got ", params.num_topk);
    HEP_CHECK(params.num_ring_slots >= 1, "dispatch: config.num_max_nvl_chunked_recv_tokens must be positive");
    HEP_CHECK(params.num_chunk_tokens >= 1, "dispatch: config.num_max_nvl_chunked_send_tokens must be positive");
    const DispatchMetaLayout meta_layout{params.num_topk, params.num_scales};
    const RingLayout rings{params.num_ranks, 2 * params.num_channels, params.num_ring_slots, params.num_x_bytes,
                           meta_layout.num_bytes()};
    HEP_CHECK(rings.num_bytes() <= num_nvl_bytes, "dispatch: the rings of this config need ", rings.num_bytes(),
              " bytes of NVLink buffer, but the Buffer has num_nvl_bytes=", num_nvl_bytes,
              "; create the Buffer with num_nvl_bytes >= config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)");

    const int stage_bytes = StageLayout{params.num_x_bytes, meta_layout.num_bytes()}.stride();
    const auto launch = [&](auto kernel, int num_stages) {
        const size_t smem = static_cast<size_t>(num_stages) * stage_bytes;
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        kernel<<<2 * params.num_channels, kNumThreads, smem, stream>>>(params);
    };
    // NOTES: 8 stages keep 4 rows of stores in flight per block (12 stages measured no faster on 4 H200 GPUs); wider
    // rows get fewer stages.
    const int static_smem = 8 * 1024;
    if (8 * stage_bytes + static_smem <= smem_limit)
        launch(dispatch_kernel<8, 3>, 8);
    else if (4 * stage_bytes + static_smem <= smem_limit)
        launch(dispatch_kernel<4, 2>, 4);
    else if (2 * stage_bytes + static_smem <= smem_limit)
        launch(dispatch_kernel<2, 1>, 2);
    else
        HEP_CHECK(false, "dispatch: a row of ", params.num_x_bytes, " bytes is too wide for shared memory (",
                  smem_limit, " bytes per block)");
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
