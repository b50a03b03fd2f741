// `intranode_combine`: every received row goes back to its source rank over NVLink, and each source sums the copies
// of its tokens in fp32, in ascending rank order, after the biases (docs/semantics.md §4), so the result is bitwise
// the reference's.
//
// Work units: the tokens of channel c of rank s (the dispatch's channels, T_s = ceil(N_s / C) tokens) are cut into
// P contiguous sub-ranges; unit u = c * P + q is served by block u % num_blocks, units in ascending order. P is the
// same everywhere (it depends on every rank's token count, published by notify_combine) and makes a unit's rows
// from one rank fit its rings, which keeps the rings deadlock-free: a sender never waits on a ring for rows of the
// unit it is sending, only for the previous unit's rows, which every reducer can finish.
// Rings: block b has M rings ("sub-rings") per source, which share the Config's slots: M = 1 from 3 ranks on, M =
// kNumSenders with one peer. Row t of the block's stream from a source (t counts over its units) is row t / M of
// sub-ring t % M, so the M senders of one peer each write one sub-ring and the reducers still read in stream order.
// Each block has kNumSenders sender warps and kNumReduceWarps reducer warps:
//   * senders (warps 0..kNumSenders-1): with M = 1 the peers are shared out among them (sender w takes runs w, w +
//     kNumSenders, ...); with M > 1 sender w takes sub-ring w / (R - 1) of peer w % (R - 1). So each ring still has
//     one writer and each sender issues from its own lane, shared memory and bulk groups. For each unit, the rows this
//     rank holds for each peer s are a contiguous range (found by binary search in recv_src_idx inside the dispatch's
//     channel range); a sender interleaves the rows of its peers (one per peer in turn) so every peer's reducers
//     advance together, and lane 0 runs the bulk-copy pipeline of device/bulk_pipeline.cuh (global -> shared -> ring of
//     s in block b) with the source token and the weights as metadata, publishing tails (one system-scope fence,
//     relaxed stores) every num_chunk_tokens rows for the rows kPublishLag back, and at the end of each unit. Slots are
//     reused after the reducer's head passed them (bounded wait).
//   * reducers (warps kNumSenders..): batches of up to 32 tokens of the unit; every warp reads the routing of the
//     batch and takes every kNumReduceWarps-th token: it waits (bounded) until the tail of the sub-ring holding
//     each peer's row of that token covers it, then sums bias_0, bias_1 and the copies from ranks 0..R-1 (this rank's
//     own copy read from x directly). The last warp done with the batch releases the heads into the peers'
//     buffers; the others go on to the next batch without waiting (but never start batch k + 2 before batch k is
//     released).
// Counters start every call at zero: notify_combine zeroes this rank's own of the call's counter set before the
// peers may see its entry (device/layout.cuh, combine protocol).
// This kernel pushes; when every rank's inputs lie in its output arena it ends at once, as the pulling kernel
// (kernels/intranode/combine_pull.cu) did the work (kernels/intranode/combine_inputs.cuh).
// Preconditions: notify_combine ran just before on this stream; the handle comes from a dispatch of this Buffer.
#include <cuda_bf16.h>

#include <cstdio>

#include "device/bf16.cuh"
#include "device/bulk_pipeline.cuh"
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

// NOTES: one issuing lane per block was the limit (reducers waited for tails about 60% of the time). Three senders
// serve the three peers of a 4-rank domain one each. With them the reducers became the limit: more reducer warps
// made combine faster every time (9 -> 13 -> 16 at 4 ranks, see intranode_combine), the block's warp count being a
// template parameter. Giving each sender a filler warp, as dispatch has, was slower (10 reducers: 996 against 1195
// GB/s summed over 4 H200 GPUs at 16 SMs; with 17 reducers in 20 warps 1091 against 1310); storing two consecutive
// rows for a peer with one bulk copy did not help either.
constexpr int kNumSenders = 3;
constexpr int kMaxBatchTokens = 32;

// Most sub-rings per (block, source) for a kernel built for at most `max_ranks` ranks: one peer (2 ranks) gets one
// per sender; from 3 ranks on there are at least two peers, so at most one sender each with 3 senders.
// NOTES: with one peer, its one sender per block was the limit; three sub-rings made combine on 2 H200 GPUs 1.23x /
// 1.11x / 1.09x faster at 8 / 16 / 24 SMs (320.7 / 548.6 / 760.4 against 261.1 / 493.2 / 695.1 GB/s summed).
__host__ __device__ constexpr int max_sub_rings(int max_ranks) {
    return max_ranks <= 2 ? kNumSenders : 1;
}

// The unit split every rank agrees on.
struct UnitSplit {
    int num_tokens[kNumMaxKernelRanks];  // token count of each rank
    int num_parts;                       // P: sub-ranges per channel
    int num_units;                       // num_channels * P
    int num_subs;                        // M: sub-rings per (block, source)
    int num_sub_slots;                   // slots of each sub-ring
    int counter_set;                     // of the rings' tails and heads (device/layout.cuh)

    // The rings of the call: M per block and source, each with num_sub_slots of the Config's slots.
    __device__ RingLayout rings(const CombineParams& p, int num_meta_bytes) const {
        return RingLayout{p.num_ranks, p.num_blocks * num_subs, num_sub_slots, p.hidden * 2, num_meta_bytes};
    }

    // Tokens [begin, end) of unit `unit_idx` at rank `rank_idx`.
    __device__ void tokens(int unit_idx, int rank_idx, int num_channels, int& begin, int& end) const {
        const int n = num_tokens[rank_idx];
        const int per_channel = max((n + num_channels - 1) / num_channels, 1);
        const int channel = unit_idx / num_parts, part = unit_idx % num_parts;
        const int channel_begin = min(channel * per_channel, n), channel_end = min(channel_begin + per_channel, n);
        const int per_part = (per_channel + num_parts - 1) / num_parts;
        begin = min(channel_begin + part * per_part, channel_end);
        end = min(begin + per_part, channel_end);
    }
};

struct SenderState {
    int run_before[kNumMaxKernelRanks];  // rows to the destination of run i in this block's earlier units
    int sent[kNumMaxKernelRanks];
    int head_seen[kNumMaxKernelRanks];
    int published[kNumMaxKernelRanks];
    int run_rank[kNumMaxKernelRanks];   // destination of run i of the unit
    int run_first[kNumMaxKernelRanks];  // its first row (of this sender's sub-ring) in x
    int run_count[kNumMaxKernelRanks];  // its rows (of this sender's sub-ring); they are M rows apart in x
    int run_pos[kNumMaxKernelRanks];    // rows of it already taken
};

// Returns: the first index in [begin, end) whose recv_src_idx is >= token (recv_src_idx ascends there).
__device__ __forceinline__ int lower_bound(const int* recv_src_idx, int begin, int end, int token) {
    while (begin < end) {
        const int mid = begin + (end - begin) / 2;
        if (recv_src_idx[mid] < token)
            begin = mid + 1;
        else
            end = mid;
    }
    return begin;
}

template <int kNumStages, int kNumPrefetch, int kPublishLag>
__device__ void run_sender(const CombineParams& p, const UnitSplit& split, uint8_t* smem, int block_idx,
                           int sender_idx) {
    static_assert(kNumPrefetch >= 0 && kNumPrefetch + 1 < kNumStages, "prefetch depth must be below the stage count");
    constexpr int kNumReadPending = kNumStages - kNumPrefetch - 1;
    constexpr int kHistoryDepth = kPublishLag + 1;
    __shared__ SenderState states[kNumSenders];
    __shared__ SentHistory<kHistoryDepth> histories[kNumSenders];
    __shared__ StageBarriers<kNumStages> all_stages[kNumSenders];
    __shared__ int all_stage_dst[kNumSenders][kNumStages];  // destination rank of a stage's row
    SenderState& state = states[sender_idx];
    SentHistory<kHistoryDepth>& history = histories[sender_idx];
    StageBarriers<kNumStages>& stages = all_stages[sender_idx];
    int* stage_dst = all_stage_dst[sender_idx];

    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks, num_channels = p.num_channels;
    const int num_row_bytes = p.hidden * 2;
    const CombineMetaLayout meta_layout{p.num_topk};
    const RingLayout rings = split.rings(p, meta_layout.num_bytes());
    const int stage_stride = (num_row_bytes + meta_layout.num_bytes() + 127) / 128 * 128;
    const int num_runs = num_ranks - 1;
    const int num_subs = split.num_subs;
    // This sender's runs: with one sub-ring per peer, w, w + kNumSenders, ... of the unit's num_runs (one per
    // peer); with M > 1, run w % num_runs, sub-ring w / num_runs (senders past M * num_runs idle).
    const int num_my_runs = num_subs == 1
                                ? (sender_idx < num_runs ? (num_runs - sender_idx + kNumSenders - 1) / kNumSenders : 0)
                                : (sender_idx < num_subs * num_runs ? 1 : 0);
    const int my_sub = num_subs == 1 ? 0 : sender_idx / max(num_runs, 1);
    const int ring_idx = block_idx * num_subs + my_sub;
    smem += sender_idx * kNumStages * stage_stride;

    if (lane_idx < kNumMaxKernelRanks)
        state.sent[lane_idx] = state.head_seen[lane_idx] = state.published[lane_idx] = state.run_before[lane_idx] = 0;
    if (lane_idx == 0)
        stages.init();
    __syncwarp();

    const auto publish = [&](const int* sent_after) {
        // NOTES: one system-scope fence orders every completed row before all the tails that follow.
        ptx::fence_proxy_async_global();
        bool is_fenced = false;
        for (int d = 0; d < num_ranks; ++d) {
            if (d != rank && sent_after[d] != state.published[d]) {
                if (!is_fenced) {
                    ptx::fence_acq_rel_sys();
                    is_fenced = true;
                }
                ptx::st_relaxed_sys(NvlBufferLayout::tail(p.buffer_ptrs[d], split.counter_set, ring_idx, rank),
                                    sent_after[d]);
                state.published[d] = sent_after[d];
            }
        }
    };

    int num_items_before = 0;  // rows sent by this block in earlier units: stage and phase keep counting
    for (int unit_idx = block_idx; unit_idx < split.num_units; unit_idx += p.num_blocks) {
        const int channel = unit_idx / split.num_parts;
        // Lane l < num_my_runs: run i = sender_idx + l * kNumSenders, one peer (rotated by block, so the blocks of a
        // rank start on different peers) and its contiguous run of rows for this unit.
        int run_count = 0;
        if (lane_idx < num_my_runs) {
            const int i = num_subs == 1 ? sender_idx + lane_idx * kNumSenders : sender_idx % num_runs;
            const int s = (rank + 1 + (block_idx + i) % num_runs) % num_ranks;
            const int rows_begin = p.recv_channel_prefix_matrix[s * num_channels + channel];
            const int rows_end = channel + 1 < num_channels
                                     ? p.recv_channel_prefix_matrix[s * num_channels + channel + 1]
                                     : p.rank_prefix_matrix[s * num_ranks + rank];
            int token_begin, token_end;
            split.tokens(unit_idx, s, num_channels, token_begin, token_end);
            const int run_first = lower_bound(p.recv_src_idx, rows_begin, rows_end, token_begin);
            const int num_rows = lower_bound(p.recv_src_idx, run_first, rows_end, token_end) - run_first;
            // Row j of the run has position before + j in the block's stream to s, and goes to sub-ring
            // (before + j) % M: this sender's rows are those of its sub-ring.
            const int before = state.run_before[lane_idx];
            const auto num_below = [&](int position) { return (position + num_subs - 1 - my_sub) / num_subs; };
            run_count = num_below(before + num_rows) - num_below(before);
            state.run_rank[lane_idx] = s;
            state.run_first[lane_idx] = run_first + num_below(before) * num_subs + my_sub - before;
            state.run_count[lane_idx] = run_count;
            state.run_pos[lane_idx] = 0;
            state.run_before[lane_idx] = before + num_rows;
        }
        int num_items = run_count;
        for (int offset = 1; offset < kWarpSize; offset *= 2)
            num_items += __shfl_xor_sync(0xffffffff, num_items, offset);
        __syncwarp();

        // The unit's rows, interleaved over the destinations (one from each run with rows left, in turn), so every
        // peer's reducers progress at the same pace. Lane 0 advances the cursor; every lane gets (destination, row).
        int cursor_run = num_my_runs - 1;
        const auto next_item = [&](int& dst_rank, int& row) {
            int run = 0, pos = 0;
            if (lane_idx == 0) {
                run = cursor_run;
                do
                    run = (run + 1) % num_my_runs;
                while (state.run_pos[run] >= state.run_count[run]);
                cursor_run = run;
                pos = state.run_pos[run]++;
            }
            run = __shfl_sync(0xffffffff, run, 0);
            pos = __shfl_sync(0xffffffff, pos, 0);
            dst_rank = state.run_rank[run];
            row = state.run_first[run] + pos * num_subs;
        };
        const auto stage_ptr = [&](int k) { return smem + ((num_items_before + k) % kNumStages) * stage_stride; };
        // The next item and its metadata, in registers while the loads are in flight.
        int next_dst = 0, next_row = 0, next_src_idx = 0;
        float next_weight = 0.0f;
        const auto load_next = [&]() {
            next_item(next_dst, next_row);
            if (lane_idx == 0)
                next_src_idx = __ldg(p.recv_src_idx + next_row);
            if (lane_idx < p.num_topk)
                next_weight = __ldg(p.topk_weights + static_cast<int64_t>(next_row) * p.num_topk + lane_idx);
        };
        // Every lane: starts the load of item k (the next item) into its free stage and writes its metadata.
        const auto fill_stage = [&](int k) {
            uint8_t* stage = stage_ptr(k);
            if (lane_idx == 0) {
                stages.load(num_items_before + k, ptx::smem_addr(stage),
                            static_cast<const uint8_t*>(p.x) + static_cast<int64_t>(next_row) * num_row_bytes,
                            num_row_bytes);
                *reinterpret_cast<int*>(stage + num_row_bytes) = next_src_idx;
                stage_dst[(num_items_before + k) % kNumStages] = next_dst;
            }
            if (lane_idx < p.num_topk)
                reinterpret_cast<float*>(stage + num_row_bytes + meta_layout.weights_offset())[lane_idx] = next_weight;
            ptx::fence_proxy_async_shared();
            if (k + 1 < num_items)
                load_next();
        };

        int num_filled = 0;
        if (num_items > 0)
            load_next();
        for (; num_filled < min(kNumPrefetch + 1, num_items); ++num_filled)
            fill_stage(num_filled);
        __syncwarp();

        for (int k = 0; k < num_items; ++k) {
            const int item_idx = num_items_before + k;
            if (lane_idx == 0) {
                stages.wait(item_idx, p.num_timeout_cycles, "combine", rank);
                const int dst_rank = stage_dst[item_idx % kNumStages];
                const int sent = state.sent[dst_rank];
                if (sent - state.head_seen[dst_rank] >= rings.num_slots) {
                    wait_ring_slot(NvlBufferLayout::head(p.buffer_ptrs[rank], split.counter_set, ring_idx, dst_rank),
                                   sent, rings.num_slots, state.head_seen[dst_rank], p.num_timeout_cycles, "combine",
                                   rank, sender_idx, dst_rank, [&]() {
                                       ptx::bulk_wait_group<0>();
                                       publish(state.sent);
                                   });
                }
                const int slot = sent % rings.num_slots;
                const uint32_t stage_addr = ptx::smem_addr(stage_ptr(k));
                // The row and its metadata, contiguous in the stage and in the slot.
                ptx::tma_store_1d(rings.x(p.buffer_ptrs[dst_rank], ring_idx, rank, slot), stage_addr,
                                  num_row_bytes + meta_layout.num_bytes());
                state.sent[dst_rank] = sent + 1;
                ptx::bulk_commit_group();
                history.record(item_idx, state.sent, num_ranks);
                // Every num_chunk_tokens rows: the tails of the row kPublishLag back, whose writes have landed.
                if ((k + 1) % p.num_chunk_tokens == 0 && k >= kPublishLag) {
                    ptx::bulk_wait_group<kPublishLag>();
                    publish(history.after(item_idx - kPublishLag));
                }
                if (num_filled < num_items)
                    ptx::bulk_wait_group_read<kNumReadPending>();
            }
            __syncwarp();
            if (num_filled < num_items) {
                fill_stage(num_filled);
                ++num_filled;
                __syncwarp();
            }
        }
        if (lane_idx == 0) {
            ptx::bulk_wait_group<0>();
            publish(state.sent);
        }
        num_items_before += num_items;
        __syncwarp();
    }
}

template <int kMaxRanks, int kNumReduceWarps, int kUnroll>
__device__ void run_reducer(const CombineParams& p, const UnitSplit& split, int block_idx, int reduce_warp_idx) {
    constexpr int kMaxSubs = max_sub_rings(kMaxRanks);
    const int lane_idx = ptx::get_lane_idx();
    const int rank = p.rank, num_ranks = p.num_ranks;
    const int num_row_bytes = p.hidden * 2;
    const CombineMetaLayout meta_layout{p.num_topk};
    const RingLayout rings = split.rings(p, meta_layout.num_bytes());
    const int num_subs = kMaxSubs == 1 ? 1 : split.num_subs;
    void* local = p.buffer_ptrs[rank];
    const int num_vectors = p.hidden / 8;
    // NOTES: a batch's rows from one peer must fit its sub-rings at once (slots are freed per batch).
    const int batch_limit = min(kMaxBatchTokens, num_subs * rings.num_slots);

    // Rows of each peer consumed (its stream position), and (lane 0's, in shared memory: in registers it made the
    // reducer spill) the tail last seen of each of its sub-rings.
    __shared__ int all_tail_seen[kNumReduceWarps][kMaxRanks * kMaxSubs];
    int* tail_seen = all_tail_seen[reduce_warp_idx];
    int consumed[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r)
        consumed[r] = 0;
    if (lane_idx == 0)
        for (int i = 0; i < kMaxRanks * kMaxSubs; ++i)
            tail_seen[i] = 0;
    // Waits (bounded) until the tail of sub-ring q of peer r covers `expected` rows. Returns: the tail observed.
    const auto wait_tail = [&](int r, int q, int expected) {
        const int* tail_ptr = NvlBufferLayout::tail(local, split.counter_set, block_idx * num_subs + q, r);
        int observed = 0;
        timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
            observed = ptx::ld_acquire_sys(tail_ptr);
            if (observed < expected && is_last_check)
                printf(
                    "hybrid_ep combine timeout: rank %d, block %d waits for rows from peer %d (sub-ring %d): "
                    "expected tail >= %d, observed %d\n",
                    rank, block_idx, r, q, expected, observed);
            return observed < expected;
        });
        return observed;
    };

    // Batch k of the block is freed by the warp that finishes it last: warps arrive on done[k % 2] and go on. A
    // warp starts batch k once batch k - 2 is freed (its counter is reset), so no warp is two batches ahead.
    // NOTES: in place of a barrier of all reducer warps per batch (12-20% of their time at 16-24 SMs): combine on 4
    // H200 GPUs went from 874.6 / 1202.8 / 1385.0 / 1446.3 / 1439.2 to 897.5 / 1268.3 / 1383.8 / 1469.1 / 1471.0
    // GB/s summed over ranks at 8 / 12 / 16 / 20 / 24 SMs (one run).
    __shared__ int batch_done[2];
    __shared__ int num_freed;
    if (reduce_warp_idx == 0 && lane_idx == 0)
        batch_done[0] = batch_done[1] = num_freed = 0;
    ptx::named_barrier_sync(1, kNumReduceWarps * kWarpSize);
    int batch_idx = 0;
    for (int unit_idx = block_idx; unit_idx < split.num_units; unit_idx += p.num_blocks) {
        int token_begin, token_end;
        split.tokens(unit_idx, rank, p.num_channels, token_begin, token_end);
        for (int batch_begin = token_begin; batch_begin < token_end; batch_begin += batch_limit, ++batch_idx) {
            const int num_batch = min(batch_limit, token_end - batch_begin);
            if (batch_idx >= 2 && lane_idx == 0) {
                timeout_while(p.num_timeout_cycles, [&](bool is_last_check) {
                    const int observed = ptx::ld_acquire_cta(&num_freed);
                    if (observed < batch_idx - 1 && is_last_check)
                        printf(
                            "hybrid_ep combine timeout: rank %d, block %d, reducer %d waits for batch %d to be "
                            "freed: %d batches freed\n",
                            rank, block_idx, reduce_warp_idx, batch_idx - 2, observed);
                    return observed < batch_idx - 1;
                });
            }
            __syncwarp();
            const int my_token = batch_begin + lane_idx;
            const bool is_valid = lane_idx < num_batch;
            unsigned masks[kMaxRanks];
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r)
                masks[r] =
                    __ballot_sync(0xffffffff, r < num_ranks && is_valid &&
                                                  p.is_token_in_rank[static_cast<int64_t>(my_token) * num_ranks + r]);
            for (int i = reduce_warp_idx; i < num_batch; i += kNumReduceWarps) {
                const int token_idx = batch_begin + i;
                // NOTES: a warp waits for its own token's rows only, not the whole batch's, so reducing overlaps the
                // batch's arrival: +5% combine at 16 SMs on 2 H200 GPUs (490.8 against 466.8 GB/s summed), and on 4
                // (with the tails seen kept in shared memory) 851.9 / 1391.1 / 1413.1 against 817.3 / 1320.7 / 1386.6
                // at 8 / 16 / 24 SMs.
                // The position of this token's row in peer r's stream: row t / M of sub-ring t % M. NOTES:
                // recomputed where needed rather than kept per rank in registers, which the reduction needs.
                const auto stream_position = [&](int r) { return consumed[r] + __popc(masks[r] & ((1u << i) - 1u)); };
                if (lane_idx == 0) {
#pragma unroll
                    for (int r = 0; r < kMaxRanks; ++r) {
                        if (r >= num_ranks || r == rank || !(masks[r] >> i & 1))
                            continue;
                        const int t = stream_position(r);
                        const int q = t % num_subs, expected = t / num_subs + 1;
                        if (tail_seen[r * kMaxSubs + q] < expected)
                            tail_seen[r * kMaxSubs + q] = wait_tail(r, q, expected);
                    }
                }
                __syncwarp();
                const int4* sources[kMaxRanks];
                int self_row = -1;
#pragma unroll
                for (int r = 0; r < kMaxRanks; ++r) {
                    sources[r] = nullptr;
                    if (r >= num_ranks || !(masks[r] >> i & 1))
                        continue;
                    if (r == rank) {
                        self_row = p.send_head[static_cast<int64_t>(token_idx) * num_ranks + rank];
                        sources[r] = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) +
                                                                   static_cast<int64_t>(self_row) * num_row_bytes);
                    } else {
                        const int t = stream_position(r);
                        sources[r] = reinterpret_cast<const int4*>(
                            rings.x(local, block_idx * num_subs + t % num_subs, r, t / num_subs % rings.num_slots));
                    }
                }
                // The metadata of rank r's copy, after its row in the slot.
                const auto meta_of = [&](int r) {
                    return reinterpret_cast<const uint8_t*>(sources[r]) + num_row_bytes;
                };
                const auto* bias_0 = reinterpret_cast<const int4*>(p.bias_0);
                const auto* bias_1 = reinterpret_cast<const int4*>(p.bias_1);
                auto* out = reinterpret_cast<int4*>(p.combined_x) + static_cast<int64_t>(token_idx) * num_vectors;
                // NOTES: kUnroll vectors per lane, every rank's loads issued before the first add: the reduction
                // is latency-bound otherwise. The adds keep the fixed order bias_0, bias_1, rank 0, 1, ...
                for (int j0 = lane_idx; j0 < num_vectors; j0 += kUnroll * kWarpSize) {
                    int4 values[kUnroll][kMaxRanks];
#pragma unroll
                    for (int u = 0; u < kUnroll; ++u) {
                        const int j = j0 + u * kWarpSize;
#pragma unroll
                        for (int r = 0; r < kMaxRanks; ++r)
                            if (sources[r] != nullptr && j < num_vectors)
                                values[u][r] =
                                    r == rank ? ptx::ld_nc_v4(sources[r] + j) : ptx::ld_cg_v4(sources[r] + j);
                    }
#pragma unroll
                    for (int u = 0; u < kUnroll; ++u) {
                        const int j = j0 + u * kWarpSize;
                        if (j >= num_vectors)
                            break;
                        float acc[8];
#pragma unroll
                        for (int e = 0; e < 8; ++e)
                            acc[e] = 0.0f;
                        const int64_t bias_offset = static_cast<int64_t>(token_idx) * num_vectors + j;
                        if (bias_0 != nullptr)
                            add_bf16x8(acc, ptx::ld_nc_v4(bias_0 + bias_offset));
                        if (bias_1 != nullptr)
                            add_bf16x8(acc, ptx::ld_nc_v4(bias_1 + bias_offset));
#pragma unroll
                        for (int r = 0; r < kMaxRanks; ++r)
                            if (sources[r] != nullptr)
                                add_bf16x8(acc, values[u][r]);
                        ptx::st_na_v4(out + j, pack_bf16x8(acc));
                    }
                }
                if (lane_idx < p.num_topk && p.combined_topk_weights != nullptr) {
                    float acc = 0.0f;
#pragma unroll
                    for (int r = 0; r < kMaxRanks; ++r) {
                        if (sources[r] == nullptr)
                            continue;
                        acc += r == rank ? p.topk_weights[static_cast<int64_t>(self_row) * p.num_topk + lane_idx]
                                         : *reinterpret_cast<const volatile float*>(
                                               meta_of(r) + meta_layout.weights_offset() + 4 * lane_idx);
                    }
                    p.combined_topk_weights[static_cast<int64_t>(token_idx) * p.num_topk + lane_idx] = acc;
                }
                if (lane_idx == 0) {
#pragma unroll
                    for (int r = 0; r < kMaxRanks; ++r) {
                        if (r == rank || sources[r] == nullptr)
                            continue;
                        const int src_idx = ptx::ld_cg(reinterpret_cast<const int*>(meta_of(r)));
                        if (src_idx != token_idx) {
                            printf(
                                "hybrid_ep combine: rank %d, block %d got the row of token %d from peer %d where "
                                "token %d was expected (the handle does not match this Buffer's last dispatch?)\n",
                                rank, block_idx, src_idx, r, token_idx);
                            ptx::trap();
                        }
                    }
                }
            }

            // The last warp done with the batch's slots frees them; the others go on to the next batch.
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r)
                consumed[r] += r < num_ranks && r != rank ? __popc(masks[r]) : 0;
            __syncwarp();
            if (lane_idx == 0) {
                // NOTES: the warp's reads of the batch (and its earlier head stores) are ordered before its arrival,
                // and the arrivals before the last warp's one system-scope fence and its heads.
                __threadfence_block();
                const bool is_last = atomicAdd(&batch_done[batch_idx & 1], 1) == kNumReduceWarps - 1;
                if (is_last) {
                    batch_done[batch_idx & 1] = 0;
                    ptx::fence_acq_rel_sys();
#pragma unroll
                    for (int r = 0; r < kMaxRanks; ++r) {
                        if (r >= num_ranks || r == rank || masks[r] == 0)
                            continue;
                        // Sub-ring q has consumed the stream positions below consumed[r] that are q modulo M.
                        for (int q = 0; q < num_subs; ++q)
                            ptx::st_relaxed_sys(NvlBufferLayout::head(p.buffer_ptrs[r], split.counter_set,
                                                                      block_idx * num_subs + q, rank),
                                                (consumed[r] + num_subs - 1 - q) / num_subs);
                    }
                    ptx::st_release_cta(&num_freed, batch_idx + 1);
                }
            }
            __syncwarp();
        }
    }
}

template <int kMaxRanks, int kNumStages, int kNumPrefetch, int kPublishLag, int kNumWarps, int kUnroll>
__global__ void __launch_bounds__((kNumWarps * kWarpSize), 1)
    combine_kernel(const __grid_constant__ CombineParams params) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ UnitSplit split;
    // Every rank's token count and inputs, published by notify_combine in this call. When every rank's inputs lie
    // in its arena, the pulling kernel enqueued after this one does the work.
    __shared__ CombineInputs inputs;
    // Launched programmatically after notify_combine. The pulling kernel, if enqueued after this one, may start now:
    // it sets up and then waits for this kernel to end (its blocks stay resident, idle, while this one pushes).
    ptx::griddep_launch_dependents();
    ptx::griddep_wait();
    read_combine_inputs(params, inputs);
    if (inputs.is_pull)
        return;
    if (threadIdx.x < params.num_ranks)
        split.num_tokens[threadIdx.x] = inputs.num_tokens[threadIdx.x];
    if (threadIdx.x == 0)
        split.counter_set = NvlBufferLayout::combine_counter_set(inputs.seq);
    __syncthreads();
    if (threadIdx.x == 0) {
        int max_per_channel = 1;
        for (int r = 0; r < params.num_ranks; ++r)
            max_per_channel =
                max(max_per_channel, (split.num_tokens[r] + params.num_channels - 1) / params.num_channels);
        // M sub-rings per (block, source) where there are fewer peers than senders, so every sender works: sender
        // w of a block serves sub-ring w / (R - 1) of peer w % (R - 1), which shares out the Config's slots.
        const int num_peers = params.num_ranks - 1;
        int num_subs = num_peers >= 1 && num_peers < kNumSenders ? kNumSenders / num_peers : 1;
        num_subs = min(min(num_subs, max_sub_rings(kMaxRanks)), params.num_ring_slots);
        num_subs = max(min(num_subs, kNumMaxRings / params.num_blocks), 1);
        split.num_subs = num_subs;
        split.num_sub_slots = params.num_ring_slots / num_subs;
        // A unit's rows from one rank must fit its M sub-rings at once.
        const int num_unit_slots = num_subs * split.num_sub_slots;
        const int for_blocks = (params.num_blocks + params.num_channels - 1) / params.num_channels;
        const int for_rings = (max_per_channel + num_unit_slots - 1) / num_unit_slots;
        // NOTES: the smallest P that also gives every block as many units (C * P a multiple of the block count),
        // when one exists within twice the bound: 12 blocks with 18 units ran at the pace of the blocks with two.
        int num_parts = max(max(for_blocks, for_rings), 1);
        for (int p = num_parts; p <= 2 * num_parts; ++p) {
            if (params.num_channels * p % params.num_blocks == 0) {
                num_parts = p;
                break;
            }
        }
        split.num_parts = num_parts;
        split.num_units = params.num_channels * split.num_parts;
    }
    __syncthreads();

    const int warp_idx = threadIdx.x / kWarpSize;
    if (warp_idx < kNumSenders)
        run_sender<kNumStages, kNumPrefetch, kPublishLag>(params, split, smem, blockIdx.x, warp_idx);
    else
        run_reducer<kMaxRanks, kNumWarps - kNumSenders, kUnroll>(params, split, blockIdx.x, warp_idx - kNumSenders);
}

}  // namespace

void check_combine(const CombineParams& params, size_t num_nvl_bytes, int smem_limit) {
    check_domain(params.buffer_ptrs, params.rank, params.num_ranks, params.num_timeout_cycles);
    HEP_CHECK(params.num_ranks <= kNumMaxKernelRanks, "combine: at most ", kNumMaxKernelRanks,
              " ranks per NVLink domain are supported, got ", params.num_ranks);
    HEP_CHECK(params.num_channels >= 1 && params.num_channels <= kNumMaxChannels,
              "combine: the handle's channel count must be in [1, ", kNumMaxChannels, "], got ", params.num_channels);
    HEP_CHECK(params.num_blocks >= 1 && params.num_blocks <= kNumMaxBlocks, "combine: config.num_sms must be in [1, ",
              kNumMaxBlocks, "], got ", params.num_blocks);
    HEP_CHECK(params.hidden > 0 && params.hidden % 8 == 0, "combine: hidden must be a positive multiple of 8, got ",
              params.hidden);
    HEP_CHECK(params.num_topk >= 0 && params.num_topk <= kNumMaxRingTopk, "combine: num_topk must be in [0, ",
              kNumMaxRingTopk, "], got ", params.num_topk);
    HEP_CHECK(params.num_ring_slots >= 1, "combine: config.num_max_nvl_chunked_recv_tokens must be positive");
    HEP_CHECK(params.num_chunk_tokens >= 1, "combine: config.num_max_nvl_chunked_send_tokens must be positive");
    const CombineMetaLayout meta_layout{params.num_topk};
    const RingLayout rings{params.num_ranks, params.num_blocks, params.num_ring_slots, params.hidden * 2,
                           meta_layout.num_bytes()};
    HEP_CHECK(rings.num_bytes() <= num_nvl_bytes, "combine: the rings of this config need ", rings.num_bytes(),
              " bytes of NVLink buffer, but the Buffer has num_nvl_bytes=", num_nvl_bytes,
              "; create the Buffer with num_nvl_bytes >= config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)");

    const int stage_bytes = (params.hidden * 2 + meta_layout.num_bytes() + 127) / 128 * 128;
    HEP_CHECK(kNumSenders * 2 * stage_bytes + 8 * 1024 <= smem_limit, "combine: a row of ", params.hidden * 2,
              " bytes is too wide for shared memory (", smem_limit, " bytes per block, ", kNumSenders, " senders)");
}

void intranode_combine(const CombineParams& params, size_t num_nvl_bytes, int smem_limit, cudaStream_t stream) {
    check_combine(params, num_nvl_bytes, smem_limit);
    const CombineMetaLayout meta_layout{params.num_topk};
    const int stage_bytes = (params.hidden * 2 + meta_layout.num_bytes() + 127) / 128 * 128;
    // Launches `kernel` with `num_warps` warps if its stages fit in shared memory beside the kernel's static shared
    // memory.
    const auto try_launch = [&](auto kernel, int num_warps, int num_stages) {
        const size_t smem = static_cast<size_t>(kNumSenders) * num_stages * stage_bytes;
        if (smem + static_shared_bytes(kernel) > static_cast<size_t>(smem_limit))
            return false;
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        launch_programmatic(kernel, LaunchArgs{dim3(params.num_blocks), dim3(num_warps * kWarpSize), smem}, stream,
                            params);
        return true;
    };
    // Each sender gets its own stages, as many as fit (check_combine guarantees two). NOTES: 5 stages for rows of
    // hidden 7168 were 3-5% slower than 4 on 4 H200 GPUs.
    const auto launch_warps = [&](auto ranks_tag, auto warps_tag, auto unroll_tag) {
        constexpr int kMaxRanks = decltype(ranks_tag)::value;
        constexpr int kWarps = decltype(warps_tag)::value, kUnroll = decltype(unroll_tag)::value;
        return try_launch(combine_kernel<kMaxRanks, 8, 3, 6, kWarps, kUnroll>, kWarps, 8) ||
               try_launch(combine_kernel<kMaxRanks, 6, 2, 4, kWarps, kUnroll>, kWarps, 6) ||
               try_launch(combine_kernel<kMaxRanks, 4, 1, 3, kWarps, kUnroll>, kWarps, 4) ||
               try_launch(combine_kernel<kMaxRanks, 2, 0, 2, kWarps, kUnroll>, kWarps, 2);
    };
    // NOTES: the reducers' warp count is what moved combine on 4 H200 GPUs (GB/s summed over ranks at 8 / 16 / 24
    // SMs): 16 reducers with 2 vectors per lane in flight (19 warps, 96 registers) gave 812 / 1320 / 1376 against
    // 714 / 1215 / 1343 for 13 with 4 (16 warps). 15 reducers were slower than 13 (668 / 1131 / 1307: a 32-token
    // batch takes a third round), 17 no faster than 16, 19 and 21 (80 registers, more spills) slower. With 2 ranks
    // (sub-rings) 16 reducers with 4 vectors gave 344.9 / 579.2 / 783.2 against 319.5 / 546.3 / 747.4 for 13 and
    // 331.1 / 559.0 / 754.6 with 2 vectors; 19 with 2 were slower (317.7 / 536.9 / 737.0). 8 ranks keep 16 warps.
    const auto launch_ranks = [&](auto ranks_tag) {
        constexpr int kMaxRanks = decltype(ranks_tag)::value;
        if constexpr (kMaxRanks == 2)
            return launch_warps(ranks_tag, std::integral_constant<int, 19>{}, std::integral_constant<int, 4>{});
        else if constexpr (kMaxRanks == 4)
            return launch_warps(ranks_tag, std::integral_constant<int, 19>{}, std::integral_constant<int, 2>{});
        else
            return launch_warps(ranks_tag, std::integral_constant<int, 16>{}, std::integral_constant<int, 2>{});
    };
    const int max_ranks = params.num_ranks <= 2 ? 2 : params.num_ranks <= 4 ? 4 : 8;
    const bool is_launched = HEP_SWITCH_INT(max_ranks, "combine: the rank bound", launch_ranks, 2, 4, 8);
    HEP_CHECK(is_launched, "combine: a row of ", params.hidden * 2, " bytes is too wide for shared memory");
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace hybrid_ep::kernels
