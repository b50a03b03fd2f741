// The NVLink runtime of a Buffer: owns this rank's NVLink buffer, its CUDA IPC handle and the mappings of the
// peers' buffers. Collectives stay in Python: Python all-gathers `ipc_handle()` over the process group and passes
// the list to `open_peers`.
// Preconditions: one runtime per process and device; all ranks of the NVLink domain create theirs with the same
// num_nvl_bytes.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "device/layout.cuh"

namespace hybrid_ep::runtime {

// Device memory that the peers map too, from which a dispatch takes its output tensors, so that senders write the
// rows straight into them (no copy out of the rings). A block goes back to the arena when the last tensor over it
// dies; the next allocation on a stream waits (on the device) for the work the freeing stream had enqueued by then,
// as the caching allocator does for a tensor's own stream.
// Thread-safe. Owned through shared_ptr by the runtime and by every live block, so it outlives both.
class OutputArena {
public:
    OutputArena(int device_idx, size_t num_bytes);
    ~OutputArena();
    OutputArena(const OutputArena&) = delete;
    OutputArena& operator=(const OutputArena&) = delete;

    void* base() const { return base_; }
    size_t num_bytes() const { return num_bytes_; }
    int device_idx() const { return device_idx_; }
    // Returns: the offset of a block of `num_bytes` bytes, ordered on `stream` after the work that earlier users of
    // its memory had enqueued when they freed it; -1 if no free block is large enough.
    int64_t allocate(size_t num_bytes, cudaStream_t stream);
    // Gives the block at `offset` back; its next user waits for the work enqueued on the device's current stream.
    void release(int64_t offset, size_t num_bytes) noexcept;
    // Returns: the offset of the `num_bytes` bytes at `ptr` if they lie inside the arena, else -1.
    int64_t offset_of(const void* ptr, size_t num_bytes) const;
    // Bytes now held by live blocks.
    size_t num_used_bytes() const;

private:
    struct FreeBlock {
        size_t num_bytes;
        std::vector<std::shared_ptr<void>> events;  // cudaEvent_t the next user waits for
    };
    int device_idx_;
    void* base_ = nullptr;
    size_t num_bytes_;
    size_t num_used_bytes_ = 0;
    mutable std::mutex mutex_;
    std::map<size_t, FreeBlock> free_;  // by offset; adjacent free blocks are merged
};

class NvlRuntime {
public:
    // Arguments:
    //     rank, num_ranks: this rank and the ranks of its NVLink domain (1..kNumMaxNvlRanks).
    //     num_nvl_bytes: bytes of data region (a multiple of 128); the barrier header comes on top.
    //     timeout_secs: how long a device-side wait on a peer may last before the kernel traps.
    //     num_arena_bytes: bytes of the output arena (0: none; every dispatch then receives through the rings).
    NvlRuntime(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_secs, int64_t num_arena_bytes);
    ~NvlRuntime();
    NvlRuntime(const NvlRuntime&) = delete;
    NvlRuntime& operator=(const NvlRuntime&) = delete;

    // Returns: this rank's CUDA IPC handles (bytes: the NVLink buffer's, then the output arena's if it has one) for
    // the peers to open.
    pybind11::bytes ipc_handle() const;
    // Maps every peer's buffer (and output arena). `handles[p]` is rank p's `ipc_handle()`; this rank's own entry is
    // not opened.
    void open_peers(const std::vector<std::string>& handles);
    // Enqueues a device-side barrier of the domain on the current CUDA stream (kernels/intranode/barrier.cu).
    void barrier();
    // Enqueues barrier, zeroing of this rank's ring counters, barrier: the entry of a cached dispatch.
    void prepare_rings();
    // Returns: a tensor over `num_bytes` bytes of rank `rank_idx`'s data region from byte `offset`, as `dtype`
    // (the local buffer for rank_idx == rank; a peer's mapping otherwise).
    at::Tensor buffer_tensor(int rank_idx, at::ScalarType dtype, int64_t offset, int64_t num_bytes) const;
    // Enqueues the count exchange of a dispatch on the current stream (kernels/intranode/notify.cu).
    // Arguments: the layout tensors of get_dispatch_layout (int32 [num_ranks], int32 [num_experts], bool
    //     [num_tokens, num_ranks], on this device), the handle's channel count and the expert alignment;
    //     `trap_on_overflow` for callers that never read the counts (CUDA graph capture): a rank receiving more
    //     than its num_worst_tokens rows then stops every rank with a printed message.
    // Returns: (rank_prefix_matrix [num_ranks, num_ranks], channel_prefix_matrix [num_ranks, num_channels],
    //     recv_channel_prefix_matrix [num_ranks, num_channels], send_head [num_tokens, num_ranks],
    //     num_recv_tokens_per_expert [num_local_experts]), int32 tensors written by the kernel.
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> notify_dispatch(
        const at::Tensor& num_tokens_per_rank, const at::Tensor& num_tokens_per_expert,
        const at::Tensor& is_token_in_rank, int64_t num_channels, int64_t expert_alignment, int64_t num_worst_tokens,
        bool trap_on_overflow);
    // Returns: dispatch outputs of `num_rows` rows in the output arena (recv_x [num_rows, hidden] of `dtype`,
    //     recv_scales [num_rows, num_scales] float32, recv_topk_idx and recv_topk_weights [num_rows, num_topk],
    //     recv_src_idx [num_rows] int32; absent parts are None), which peers write directly; None where the arena
    //     is missing or full, or the current stream is capturing a CUDA graph (a graph would keep writing into
    //     memory that the arena hands out again).
    std::optional<std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                             std::optional<at::Tensor>, std::optional<at::Tensor>>>
    dispatch_outputs(int64_t num_rows, at::ScalarType dtype, int64_t hidden, int64_t num_scales, int64_t num_topk,
                     bool with_src_idx);
    // Enqueues the dispatch kernel on the current stream (kernels/intranode/dispatch.cu); the rings must be idle
    // (notify_dispatch or barrier just before). Outputs are allocated by the caller with `num_out_rows` rows; when
    // they come from `dispatch_outputs`, peers write them directly.
    // Arguments: x [num_tokens, hidden] (BF16 or FP8 bytes), x_scales [num_tokens, hidden / 128] float32 (any
    //     strides) or None, topk_idx/topk_weights [num_tokens, num_topk] or None, send_head [num_tokens, num_ranks]
    //     and rank_prefix_matrix [num_ranks, num_ranks] int32, the outputs, the experts per rank, the handle's
    //     channel count and the ring sizes of the config.
    void dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                  const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                  const at::Tensor& send_head, const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_x,
                  const std::optional<at::Tensor>& recv_scales, const std::optional<at::Tensor>& recv_src_idx,
                  const std::optional<at::Tensor>& recv_topk_idx, const std::optional<at::Tensor>& recv_topk_weights,
                  int64_t num_local_experts, int64_t num_channels, int64_t num_ring_slots, int64_t num_chunk_tokens);
    // Enqueues notify_combine and the combine kernels on the current stream: the pulling one when every rank's x
    // (and weights) lie in its output arena and `allow_pull` (kernels/intranode/combine_pull.cu), else the pushing one
    // (kernels/intranode/combine.cu); the choice is made on the device, the same on every rank.
    // Arguments: x [num_rows, hidden] bf16, topk_weights [num_rows, num_topk] float32 or None, the handle's
    //     rank_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank and send_head, biases
    //     [num_tokens, hidden] bf16 or None, the outputs, the config's SMs and ring sizes, and whether this rank
    //     offers its inputs for pulling.
    void combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                 const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_channel_prefix_matrix,
                 const at::Tensor& recv_src_idx, const at::Tensor& is_token_in_rank, const at::Tensor& send_head,
                 const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                 const at::Tensor& combined_x, const std::optional<at::Tensor>& combined_topk_weights, int64_t num_sms,
                 int64_t num_ring_slots, int64_t num_chunk_tokens, bool allow_pull);
    // Returns (after synchronising the current stream): whether this rank's last combine pulled, i.e. every rank's
    // inputs lay in its output arena (kernels/intranode/combine_inputs.cuh). A diagnostic for tests and tuning.
    bool last_combine_pulled() const;
    // Returns: the offset of `t`'s bytes in this rank's output arena, or -1 where they lie elsewhere (or t is empty).
    int64_t arena_offset(const at::Tensor& t) const;
    // Waits (bounded by the timeout, GIL released) for the host copy of the last notify's counts.
    // Returns: (rows this rank receives, aligned receive count of each of its `num_local_experts` experts,
    //     (first rank whose rows exceed its num_worst_tokens or -1, its rows, its num_worst_tokens)).
    std::tuple<int64_t, std::vector<int64_t>, std::tuple<int64_t, int64_t, int64_t>> wait_recv_counts(
        int64_t num_local_experts) const;
    // Unmaps the peers' buffers (after every rank has stopped using them).
    void close_peers();
    // Frees this rank's buffer (after every peer has unmapped it). The runtime is unusable afterwards.
    void free_buffer();

    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    int64_t num_nvl_bytes() const { return static_cast<int64_t>(layout_.num_data_bytes); }
    int64_t num_timeout_cycles() const { return num_timeout_cycles_; }
    int64_t num_arena_bytes() const { return arena_ ? static_cast<int64_t>(arena_->num_bytes()) : 0; }
    int64_t num_arena_used_bytes() const { return arena_ ? static_cast<int64_t>(arena_->num_used_bytes()) : 0; }
    bool is_available() const { return peers_open_; }

private:
    void check_alive(const char* what) const;
    // Fills the fields every kernel's params share: the peers' buffers, this rank, the rank count and the timeout.
    template <typename Params>
    void fill_domain(Params& params) const {
        for (int p = 0; p < num_ranks_; ++p)
            params.buffer_ptrs[p] = buffer_ptrs_[p];
        params.rank = rank_;
        params.num_ranks = num_ranks_;
        params.num_timeout_cycles = num_timeout_cycles_;
    }

    int rank_;
    int num_ranks_;
    int device_idx_;
    NvlBufferLayout layout_;
    int64_t num_timeout_cycles_;
    int smem_limit_ = 0;  // opt-in shared memory per block of the device
    double timeout_secs_;
    int* host_recv_counts_ = nullptr;  // mapped host memory [kNumHostCountInts] (kernels/api.cuh)
    void* local_ptr_ = nullptr;
    std::vector<void*> buffer_ptrs_;  // [num_ranks]: local_ptr_ at rank_, peer mappings elsewhere
    std::shared_ptr<OutputArena> arena_;
    std::vector<void*> arena_ptrs_;  // [num_ranks]: arena bases (this rank's, peer mappings), nullptr for none
    bool peers_open_ = false;
};

void register_apis(pybind11::module_& m);

}  // namespace hybrid_ep::runtime
