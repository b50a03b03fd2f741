// NVLink runtime: allocation, CUDA IPC export/import and teardown of the Buffer's NVLink buffer (see buffer.hpp).
// Teardown order across ranks (driven from Python): every rank stops using peers, `close_peers`, a process-group
// barrier, then `free_buffer`, so no buffer is freed while a peer still maps it.
#include "runtime/buffer.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstring>

#include "kernels/api.cuh"
#include "runtime/exception.hpp"

namespace hybrid_ep::runtime {

namespace {

// SM clock cycles in `timeout_secs` seconds on `device_idx`.
int64_t timeout_cycles(int device_idx, double timeout_secs) {
    int clock_khz = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_idx) != cudaSuccess || clock_khz <= 0) {
        (void)cudaGetLastError();
        clock_khz = 2'000'000;  // NOTES: an upper bound for Hopper's SM clock, so the timeout is never shorter
    }
    return static_cast<int64_t>(timeout_secs * clock_khz * 1e3);
}

// Blocks of the output arena start on this boundary.
constexpr size_t kArenaAlignment = 4096;

size_t arena_block_bytes(size_t num_bytes) {
    return (num_bytes + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
}

}  // namespace

OutputArena::OutputArena(int device_idx, size_t num_bytes) : device_idx_(device_idx), num_bytes_(num_bytes) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    const cudaError_t status = cudaMalloc(&base_, num_bytes_);
    if (status != cudaSuccess) {
        (void)cudaGetLastError();
        HEP_CHECK(false, "cannot allocate the output arena of ", num_bytes_, " bytes on cuda:", device_idx_, " (",
                  cudaGetErrorString(status), "); set HYBRID_EP_OUTPUT_ARENA_BYTES lower, or 0 for none");
    }
    free_.emplace(0, FreeBlock{num_bytes_, {}});
}

OutputArena::~OutputArena() {
    // NOTES: the last block may die at interpreter exit, after CUDA is gone; a destructor must not throw.
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    free_.clear();
    (void)cudaFree(base_);
    (void)cudaGetLastError();
}

int64_t OutputArena::allocate(size_t num_bytes, cudaStream_t stream) {
    num_bytes = arena_block_bytes(num_bytes);
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.num_bytes < num_bytes)
            continue;
        const size_t offset = it->first;
        FreeBlock block = std::move(it->second);
        free_.erase(it);
        // The rest stays free and keeps its events: its memory may have been freed by the same users.
        if (block.num_bytes > num_bytes)
            free_.emplace(offset + num_bytes, FreeBlock{block.num_bytes - num_bytes, block.events});
        for (const auto& event : block.events)
            CUDA_CHECK(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(event.get()), 0));
        num_used_bytes_ += num_bytes;
        return static_cast<int64_t>(offset);
    }
    return -1;
}

void OutputArena::release(int64_t offset, size_t num_bytes) noexcept {
    num_bytes = arena_block_bytes(num_bytes);
    std::shared_ptr<void> event;
    try {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
        cudaEvent_t raw = nullptr;
        if (cudaEventCreateWithFlags(&raw, cudaEventDisableTiming) == cudaSuccess) {
            event.reset(raw, [](void* e) { (void)cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
            const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_idx_));
            if (cudaEventRecord(raw, stream) != cudaSuccess)
                event.reset();
        }
        (void)cudaGetLastError();
    } catch (...) {
        event.reset();
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    num_used_bytes_ -= num_bytes;
    FreeBlock block{num_bytes, {}};
    if (event)
        block.events.push_back(event);
    size_t start = static_cast<size_t>(offset);
    // Merge with the free neighbours, keeping every event the merged memory waits for.
    auto next = free_.lower_bound(start);
    if (next != free_.end() && next->first == start + block.num_bytes) {
        block.num_bytes += next->second.num_bytes;
        block.events.insert(block.events.end(), next->second.events.begin(), next->second.events.end());
        next = free_.erase(next);
    }
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second.num_bytes == start) {
            start = prev->first;
            block.num_bytes += prev->second.num_bytes;
            block.events.insert(block.events.end(), prev->second.events.begin(), prev->second.events.end());
            free_.erase(prev);
        }
    }
    // NOTES: once a block's events have all completed it needs none of them; dropping those keeps lists short.
    std::vector<std::shared_ptr<void>> pending;
    for (auto& e : block.events)
        if (cudaEventQuery(static_cast<cudaEvent_t>(e.get())) == cudaErrorNotReady)
            pending.push_back(std::move(e));
    (void)cudaGetLastError();
    block.events = std::move(pending);
    free_.emplace(start, std::move(block));
}

int64_t OutputArena::offset_of(const void* ptr, size_t num_bytes) const {
    const auto* bytes = static_cast<const uint8_t*>(ptr);
    const auto* base = static_cast<const uint8_t*>(base_);
    if (bytes < base || bytes + num_bytes > base + num_bytes_)
        return -1;
    return bytes - base;
}

size_t OutputArena::num_used_bytes() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return num_used_bytes_;
}

NvlRuntime::NvlRuntime(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_secs, int64_t num_arena_bytes)
    : rank_(rank), num_ranks_(num_ranks), layout_{static_cast<size_t>(num_nvl_bytes)} {
    HEP_CHECK(num_ranks >= 1 && num_ranks <= kNumMaxNvlRanks, "num_ranks must be in [1, ", kNumMaxNvlRanks,
              "] for one NVLink domain, got ", num_ranks);
    HEP_CHECK(rank >= 0 && rank < num_ranks, "rank must be in [0, ", num_ranks, "), got ", rank);
    HEP_CHECK(num_nvl_bytes >= 0 && num_nvl_bytes % 128 == 0,
              "num_nvl_bytes must be a non-negative multiple of 128, got ", num_nvl_bytes);
    HEP_CHECK(timeout_secs > 0, "timeout_secs must be positive, got ", timeout_secs);
    CUDA_CHECK(cudaGetDevice(&device_idx_));
    timeout_secs_ = timeout_secs;
    CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_idx_));
    num_timeout_cycles_ = timeout_cycles(device_idx_, timeout_secs);
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_recv_counts_), sizeof(int) * kernels::kNumHostCountInts,
                             cudaHostAllocMapped));
    CUDA_CHECK(cudaMalloc(&local_ptr_, layout_.num_total_bytes()));
    // NOTES: zeroed once; barrier signals and epochs only grow from here (device/layout.cuh).
    CUDA_CHECK(cudaMemset(local_ptr_, 0, layout_.num_total_bytes()));
    HEP_CHECK(num_arena_bytes >= 0, "num_arena_bytes must be non-negative, got ", num_arena_bytes);
    if (num_arena_bytes > 0)
        arena_ = std::make_shared<OutputArena>(device_idx_, static_cast<size_t>(num_arena_bytes));
    CUDA_CHECK(cudaDeviceSynchronize());
    buffer_ptrs_.assign(num_ranks, nullptr);
    buffer_ptrs_[rank] = local_ptr_;
    arena_ptrs_.assign(num_ranks, nullptr);
    arena_ptrs_[rank] = arena_ ? arena_->base() : nullptr;
}

NvlRuntime::~NvlRuntime() {
    // NOTES: without an explicit teardown (Buffer(explicitly_destroy=False)) resources go with the process; a
    // destructor must not throw, so errors here are dropped.
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    for (int p = 0; p < num_ranks_; ++p)
        if (p != rank_ && buffer_ptrs_.size() > static_cast<size_t>(p) && buffer_ptrs_[p] != nullptr)
            (void)cudaIpcCloseMemHandle(buffer_ptrs_[p]);
    for (int p = 0; p < num_ranks_; ++p)
        if (p != rank_ && arena_ptrs_.size() > static_cast<size_t>(p) && arena_ptrs_[p] != nullptr)
            (void)cudaIpcCloseMemHandle(arena_ptrs_[p]);
    if (local_ptr_ != nullptr)
        (void)cudaFree(local_ptr_);
    if (host_recv_counts_ != nullptr)
        (void)cudaFreeHost(host_recv_counts_);
    (void)cudaGetLastError();
}

void NvlRuntime::check_alive(const char* what) const {
    HEP_CHECK(local_ptr_ != nullptr, what, ": the NVLink buffer was already freed");
}

pybind11::bytes NvlRuntime::ipc_handle() const {
    check_alive("ipc_handle");
    cudaIpcMemHandle_t handles[2];
    CUDA_CHECK(cudaIpcGetMemHandle(&handles[0], local_ptr_));
    if (arena_)
        CUDA_CHECK(cudaIpcGetMemHandle(&handles[1], arena_->base()));
    return pybind11::bytes(reinterpret_cast<const char*>(handles), (arena_ ? 2 : 1) * sizeof(cudaIpcMemHandle_t));
}

void NvlRuntime::open_peers(const std::vector<std::string>& handles) {
    check_alive("open_peers");
    HEP_CHECK(!peers_open_, "open_peers: the peers are already open");
    HEP_CHECK(static_cast<int>(handles.size()) == num_ranks_, "open_peers: expected ", num_ranks_, " handles, got ",
              handles.size());
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    for (int p = 0; p < num_ranks_; ++p) {
        if (p == rank_)
            continue;
        const size_t size = handles[p].size();
        HEP_CHECK(size == sizeof(cudaIpcMemHandle_t) || size == 2 * sizeof(cudaIpcMemHandle_t),
                  "open_peers: handle of rank ", p, " has ", size, " bytes, expected ", sizeof(cudaIpcMemHandle_t),
                  " or ", 2 * sizeof(cudaIpcMemHandle_t));
        cudaIpcMemHandle_t handle;
        std::memcpy(&handle, handles[p].data(), sizeof(handle));
        cudaError_t status = cudaIpcOpenMemHandle(&buffer_ptrs_[p], handle, cudaIpcMemLazyEnablePeerAccess);
        HEP_CHECK(status == cudaSuccess, "open_peers: cannot map the NVLink buffer of rank ", p, " into rank ", rank_,
                  " (", cudaGetErrorString(status), "); are both GPUs on one host with peer access?");
        if (size == 2 * sizeof(cudaIpcMemHandle_t)) {
            std::memcpy(&handle, handles[p].data() + sizeof(handle), sizeof(handle));
            status = cudaIpcOpenMemHandle(&arena_ptrs_[p], handle, cudaIpcMemLazyEnablePeerAccess);
            HEP_CHECK(status == cudaSuccess, "open_peers: cannot map the output arena of rank ", p, " into rank ",
                      rank_, " (", cudaGetErrorString(status), ")");
        }
    }
    peers_open_ = true;
}

void NvlRuntime::barrier() {
    HEP_CHECK(peers_open_, "barrier: open_peers has not run");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    kernels::BarrierParams params{};
    fill_domain(params);
    kernels::intranode_barrier(params, c10::cuda::getCurrentCUDAStream());
}

void NvlRuntime::prepare_rings() {
    HEP_CHECK(peers_open_, "prepare_rings: open_peers has not run");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    kernels::BarrierParams params{};
    fill_domain(params);
    kernels::prepare_rings(params, c10::cuda::getCurrentCUDAStream());
}

at::Tensor NvlRuntime::buffer_tensor(int rank_idx, at::ScalarType dtype, int64_t offset, int64_t num_bytes) const {
    check_alive("buffer_tensor");
    HEP_CHECK(rank_idx >= 0 && rank_idx < num_ranks_, "rank_idx must be in [0, ", num_ranks_, "), got ", rank_idx);
    HEP_CHECK(rank_idx == rank_ || peers_open_, "buffer_tensor: peers are not open");
    const int64_t element_size = static_cast<int64_t>(c10::elementSize(dtype));
    HEP_CHECK(offset >= 0 && num_bytes >= 0 && offset + num_bytes <= num_nvl_bytes(), "offset (", offset,
              ") + num_bytes (", num_bytes, ") must lie within num_nvl_bytes (", num_nvl_bytes(), ")");
    HEP_CHECK(offset % element_size == 0 && num_bytes % element_size == 0, "offset and num_bytes must be multiples of ",
              element_size, " bytes for this dtype");
    void* ptr = NvlBufferLayout::data(buffer_ptrs_[rank_idx]) + offset;
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA, device_idx_);
    return at::from_blob(ptr, {num_bytes / element_size}, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> NvlRuntime::notify_dispatch(
    const at::Tensor& num_tokens_per_rank, const at::Tensor& num_tokens_per_expert, const at::Tensor& is_token_in_rank,
    int64_t num_channels, int64_t expert_alignment, int64_t num_worst_tokens, bool trap_on_overflow) {
    HEP_CHECK(peers_open_, "notify_dispatch: open_peers has not run");
    const auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
        HEP_CHECK(t.is_cuda() && t.device().index() == device_idx_, name, " must be on cuda:", device_idx_, ", got ",
                  t.device().str());
        HEP_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
                  c10::toString(t.scalar_type()));
        HEP_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim, "-D tensor");
    };
    check(num_tokens_per_rank, "num_tokens_per_rank", at::kInt, 1);
    check(num_tokens_per_expert, "num_tokens_per_expert", at::kInt, 1);
    check(is_token_in_rank, "is_token_in_rank", at::kBool, 2);
    HEP_CHECK(num_tokens_per_rank.size(0) == num_ranks_, "num_tokens_per_rank must have ", num_ranks_, " entries, got ",
              num_tokens_per_rank.size(0));
    HEP_CHECK(is_token_in_rank.size(1) == num_ranks_, "is_token_in_rank must have ", num_ranks_, " columns, got ",
              is_token_in_rank.size(1));
    const int64_t num_experts = num_tokens_per_expert.size(0);
    HEP_CHECK(num_experts > 0 && num_experts % num_ranks_ == 0,
              "num_tokens_per_expert.size(0) must be a positive multiple of ", num_ranks_, ", got ", num_experts);
    HEP_CHECK(num_channels >= 1 && num_channels <= kNumMaxChannels, "num_channels must be in [1, ", kNumMaxChannels,
              "], got ", num_channels);
    HEP_CHECK(expert_alignment >= 1, "expert_alignment must be positive, got ", expert_alignment);

    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    const auto options = at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device_idx_);
    auto rank_prefix_matrix = at::empty({num_ranks_, num_ranks_}, options);
    auto channel_prefix_matrix = at::empty({num_ranks_, num_channels}, options);
    auto num_recv_tokens_per_expert = at::empty({num_experts / num_ranks_}, options);
    auto recv_channel_prefix_matrix = at::empty({num_ranks_, num_channels}, options);
    auto send_head = at::empty({is_token_in_rank.size(0), num_ranks_}, options);

    kernels::NotifyDispatchParams params{};
    fill_domain(params);
    params.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    params.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    params.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    params.num_tokens = static_cast<int>(is_token_in_rank.size(0));
    params.num_experts = static_cast<int>(num_experts);
    params.num_channels = static_cast<int>(num_channels);
    params.expert_alignment = static_cast<int>(expert_alignment);
    params.num_worst_tokens = static_cast<int>(num_worst_tokens);
    params.trap_on_overflow = trap_on_overflow ? 1 : 0;
    params.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    params.channel_prefix_matrix = channel_prefix_matrix.data_ptr<int>();
    params.num_recv_tokens_per_expert = num_recv_tokens_per_expert.data_ptr<int>();
    params.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    params.send_head = send_head.data_ptr<int>();
    int* device_recv_counts = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_recv_counts), host_recv_counts_, 0));
    params.host_recv_counts = device_recv_counts;
    // NOTES: the sentinel is written before the launch, so the poll cannot see a previous call's count.
    reinterpret_cast<volatile int*>(host_recv_counts_)[0] = -1;
    kernels::notify_dispatch(params, c10::cuda::getCurrentCUDAStream());
    return {rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, send_head,
            num_recv_tokens_per_expert};
}

namespace {

// Checks that `t` is a contiguous CUDA tensor of `dtype` on `device_idx` with `dim` dimensions (throws).
void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, int device_idx,
                  bool contiguous = true) {
    HEP_CHECK(t.is_cuda() && t.device().index() == device_idx, name, " must be on cuda:", device_idx, ", got ",
              t.device().str());
    HEP_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
    HEP_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
    HEP_CHECK(!contiguous || t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
T* optional_ptr(const std::optional<at::Tensor>& t) {
    return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

}  // namespace

std::optional<std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>>>
NvlRuntime::dispatch_outputs(int64_t num_rows, at::ScalarType dtype, int64_t hidden, int64_t num_scales,
                             int64_t num_topk, bool with_src_idx) {
    HEP_CHECK(num_rows >= 0 && hidden > 0 && num_scales >= 0 && num_topk >= 0,
              "dispatch_outputs: num_rows, num_scales and num_topk must be non-negative and hidden positive");
    if (!arena_ || !peers_open_ || num_rows == 0)
        return std::nullopt;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
        return std::nullopt;
    // Each output is a block of its own, given back when its tensor dies (as torch.empty would free it): the
    // handle keeps recv_src_idx long after recv_x is gone.
    struct Block {
        std::shared_ptr<OutputArena> arena;
        size_t num_bytes;
        int64_t offset;
        Block(std::shared_ptr<OutputArena> a, size_t n, cudaStream_t stream)
            : arena(std::move(a)), num_bytes(n), offset(arena->allocate(n, stream)) {}
        Block(const Block&) = delete;
        Block& operator=(const Block&) = delete;
        ~Block() {
            if (offset >= 0)
                arena->release(offset, num_bytes);
        }
    };
    const auto take = [&](std::vector<int64_t> sizes, at::ScalarType part_dtype) -> std::optional<at::Tensor> {
        int64_t num_bytes = static_cast<int64_t>(c10::elementSize(part_dtype));
        for (const int64_t size : sizes)
            num_bytes *= size;
        auto block = std::make_shared<Block>(arena_, static_cast<size_t>(num_bytes), stream);
        if (block->offset < 0)
            return std::nullopt;
        const auto options = at::TensorOptions().dtype(part_dtype).device(at::kCUDA, device_idx_);
        return at::from_blob(static_cast<uint8_t*>(arena_->base()) + block->offset, sizes, [block](void*) {}, options);
    };
    // NOTES: a failed allocation gives back the blocks taken before it, when their tensors go on return.
    std::optional<at::Tensor> recv_x = take({num_rows, hidden}, dtype), scales, topk_idx, topk_weights, src_idx;
    if (!recv_x.has_value())
        return std::nullopt;
    if (num_scales > 0 && !(scales = take({num_rows, num_scales}, at::kFloat)).has_value())
        return std::nullopt;
    if (num_topk > 0 && (!(topk_idx = take({num_rows, num_topk}, at::kLong)).has_value() ||
                         !(topk_weights = take({num_rows, num_topk}, at::kFloat)).has_value()))
        return std::nullopt;
    if (with_src_idx && !(src_idx = take({num_rows}, at::kInt)).has_value())
        return std::nullopt;
    return std::make_tuple(*recv_x, scales, topk_idx, topk_weights, src_idx);
}

void NvlRuntime::dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                          const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                          const at::Tensor& send_head, const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_x,
                          const std::optional<at::Tensor>& recv_scales, const std::optional<at::Tensor>& recv_src_idx,
                          const std::optional<at::Tensor>& recv_topk_idx,
                          const std::optional<at::Tensor>& recv_topk_weights, int64_t num_local_experts,
                          int64_t num_channels, int64_t num_ring_slots, int64_t num_chunk_tokens) {
    HEP_CHECK(peers_open_, "dispatch: open_peers has not run");
    HEP_CHECK(x.is_cuda() && x.device().index() == device_idx_ && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D tensor on cuda:", device_idx_);
    HEP_CHECK(recv_x.scalar_type() == x.scalar_type() && recv_x.dim() == 2 && recv_x.size(1) == x.size(1) &&
                  recv_x.is_contiguous(),
              "recv_x must be a contiguous tensor like x");
    const int64_t num_tokens = x.size(0);
    check_tensor(send_head, "send_head", at::kInt, 2, device_idx_);
    check_tensor(rank_prefix_matrix, "rank_prefix_matrix", at::kInt, 2, device_idx_);
    HEP_CHECK(send_head.size(0) == num_tokens && send_head.size(1) == num_ranks_, "send_head must be [", num_tokens,
              ", ", num_ranks_, "]");
    HEP_CHECK(x_scales.has_value() == recv_scales.has_value(), "x_scales and recv_scales go together");
    HEP_CHECK(topk_idx.has_value() == topk_weights.has_value() && topk_idx.has_value() == recv_topk_idx.has_value() &&
                  topk_idx.has_value() == recv_topk_weights.has_value(),
              "topk_idx, topk_weights, recv_topk_idx and recv_topk_weights go together");
    const int64_t num_x_bytes = x.size(1) * x.element_size();
    const int64_t num_out_rows = recv_x.size(0);

    kernels::DispatchParams params{};
    fill_domain(params);
    params.x = x.data_ptr();
    if (x_scales.has_value()) {
        check_tensor(*x_scales, "x_scales", at::kFloat, 2, device_idx_, false);
        HEP_CHECK(x_scales->size(0) == num_tokens, "x_scales must have ", num_tokens, " rows");
        check_tensor(*recv_scales, "recv_scales", at::kFloat, 2, device_idx_);
        HEP_CHECK(recv_scales->size(0) == num_out_rows && recv_scales->size(1) == x_scales->size(1),
                  "recv_scales must be [", num_out_rows, ", ", x_scales->size(1), "]");
        params.x_scales = x_scales->data_ptr<float>();
        params.scale_token_stride = x_scales->stride(0);
        params.scale_hidden_stride = x_scales->stride(1);
        params.num_scales = static_cast<int>(x_scales->size(1));
    }
    if (topk_idx.has_value()) {
        check_tensor(*topk_idx, "topk_idx", at::kLong, 2, device_idx_);
        check_tensor(*topk_weights, "topk_weights", at::kFloat, 2, device_idx_);
        check_tensor(*recv_topk_idx, "recv_topk_idx", at::kLong, 2, device_idx_);
        check_tensor(*recv_topk_weights, "recv_topk_weights", at::kFloat, 2, device_idx_);
        params.num_topk = static_cast<int>(topk_idx->size(1));
        HEP_CHECK(topk_idx->size(0) == num_tokens && topk_weights->sizes() == topk_idx->sizes(),
                  "topk_idx and topk_weights must be [", num_tokens, ", num_topk]");
        HEP_CHECK(recv_topk_idx->size(0) == num_out_rows && recv_topk_idx->size(1) == params.num_topk &&
                      recv_topk_weights->sizes() == recv_topk_idx->sizes(),
                  "recv_topk_idx and recv_topk_weights must be [", num_out_rows, ", ", params.num_topk, "]");
    }
    if (recv_src_idx.has_value()) {
        check_tensor(*recv_src_idx, "recv_src_idx", at::kInt, 1, device_idx_);
        HEP_CHECK(recv_src_idx->size(0) == num_out_rows, "recv_src_idx must have ", num_out_rows, " rows");
    }
    params.topk_idx = optional_ptr<const int64_t>(topk_idx);
    params.topk_weights = optional_ptr<const float>(topk_weights);
    params.send_head = send_head.data_ptr<int>();
    params.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    params.recv_x = recv_x.data_ptr();
    params.recv_scales = optional_ptr<float>(recv_scales);
    params.recv_src_idx = optional_ptr<int>(recv_src_idx);
    params.recv_topk_idx = optional_ptr<int64_t>(recv_topk_idx);
    params.recv_topk_weights = optional_ptr<float>(recv_topk_weights);
    params.num_tokens = static_cast<int>(num_tokens);
    params.num_x_bytes = static_cast<int>(num_x_bytes);
    params.num_local_experts = static_cast<int>(num_local_experts);
    params.num_out_rows = static_cast<int>(num_out_rows);
    params.num_channels = static_cast<int>(num_channels);
    params.num_ring_slots = static_cast<int>(num_ring_slots);
    params.num_chunk_tokens = static_cast<int>(num_chunk_tokens);
    for (int p = 0; p < num_ranks_ && p < kernels::kNumMaxKernelRanks; ++p)
        params.arena_ptrs[p] = arena_ptrs_[p];
    // Peers write the outputs directly only where every one of them lies in the arena (dispatch_outputs).
    for (int i = 0; i < kNumDispatchOutputs; ++i)
        params.out_offsets[i] = -1;
    if (arena_ && num_out_rows > 0) {
        const std::optional<at::Tensor> parts[kNumDispatchOutputs] = {recv_x, recv_scales, recv_topk_idx,
                                                                      recv_topk_weights, recv_src_idx};
        int64_t offsets[kNumDispatchOutputs];
        bool is_direct = true;
        for (int i = 0; i < kNumDispatchOutputs; ++i) {
            offsets[i] = parts[i].has_value() ? arena_->offset_of(parts[i]->data_ptr(), parts[i]->nbytes()) : -1;
            is_direct = is_direct && (!parts[i].has_value() || offsets[i] >= 0);
        }
        if (is_direct)
            for (int i = 0; i < kNumDispatchOutputs; ++i)
                params.out_offsets[i] = offsets[i];
    }
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    kernels::intranode_dispatch(params, layout_.num_data_bytes, smem_limit_, c10::cuda::getCurrentCUDAStream());
}

void NvlRuntime::combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                         const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_channel_prefix_matrix,
                         const at::Tensor& recv_src_idx, const at::Tensor& is_token_in_rank,
                         const at::Tensor& send_head, const std::optional<at::Tensor>& bias_0,
                         const std::optional<at::Tensor>& bias_1, const at::Tensor& combined_x,
                         const std::optional<at::Tensor>& combined_topk_weights, int64_t num_sms,
                         int64_t num_ring_slots, int64_t num_chunk_tokens, bool allow_pull) {
    HEP_CHECK(peers_open_, "combine: open_peers has not run");
    check_tensor(x, "x", at::kBFloat16, 2, device_idx_);
    check_tensor(rank_prefix_matrix, "rank_prefix_matrix", at::kInt, 2, device_idx_);
    check_tensor(recv_channel_prefix_matrix, "recv_channel_prefix_matrix", at::kInt, 2, device_idx_);
    check_tensor(recv_src_idx, "recv_src_idx", at::kInt, 1, device_idx_);
    check_tensor(is_token_in_rank, "is_token_in_rank", at::kBool, 2, device_idx_);
    check_tensor(send_head, "send_head", at::kInt, 2, device_idx_);
    check_tensor(combined_x, "combined_x", at::kBFloat16, 2, device_idx_);
    const int64_t num_tokens = is_token_in_rank.size(0);
    HEP_CHECK(combined_x.size(0) == num_tokens && combined_x.size(1) == x.size(1), "combined_x must be [", num_tokens,
              ", ", x.size(1), "]");
    HEP_CHECK(send_head.size(0) == num_tokens && send_head.size(1) == num_ranks_, "send_head must be [", num_tokens,
              ", ", num_ranks_, "]");
    HEP_CHECK(recv_channel_prefix_matrix.size(0) == num_ranks_, "recv_channel_prefix_matrix must have ", num_ranks_,
              " rows");
    HEP_CHECK(topk_weights.has_value() == combined_topk_weights.has_value(),
              "topk_weights and combined_topk_weights go together");
    kernels::CombineParams params{};
    fill_domain(params);
    params.x = x.data_ptr();
    if (topk_weights.has_value()) {
        check_tensor(*topk_weights, "topk_weights", at::kFloat, 2, device_idx_);
        check_tensor(*combined_topk_weights, "combined_topk_weights", at::kFloat, 2, device_idx_);
        params.num_topk = static_cast<int>(topk_weights->size(1));
        params.topk_weights = topk_weights->data_ptr<float>();
        params.combined_topk_weights = combined_topk_weights->data_ptr<float>();
    }
    for (const auto* bias : {&bias_0, &bias_1}) {
        if (bias->has_value()) {
            check_tensor(**bias, "bias", at::kBFloat16, 2, device_idx_);
            HEP_CHECK((*bias)->sizes() == combined_x.sizes(), "bias must be [", num_tokens, ", ", x.size(1), "]");
        }
    }
    params.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    params.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
    params.recv_src_idx = recv_src_idx.data_ptr<int>();
    params.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    params.send_head = send_head.data_ptr<int>();
    params.bias_0 = bias_0.has_value() ? bias_0->data_ptr() : nullptr;
    params.bias_1 = bias_1.has_value() ? bias_1->data_ptr() : nullptr;
    params.combined_x = combined_x.data_ptr();
    params.num_tokens = static_cast<int>(num_tokens);
    params.hidden = static_cast<int>(x.size(1));
    params.num_channels = static_cast<int>(recv_channel_prefix_matrix.size(1));
    params.num_blocks = static_cast<int>(num_sms);
    params.num_ring_slots = static_cast<int>(num_ring_slots);
    params.num_chunk_tokens = static_cast<int>(num_chunk_tokens);

    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    kernels::NotifyCombineParams notify{};
    fill_domain(notify);
    notify.num_tokens = static_cast<int>(num_tokens);
    // Where the inputs lie: when every rank's lie in its output arena, each rank pulls its tokens' copies from the
    // peers' inputs (kernels/intranode/combine_inputs.cuh). A rank with no rows has nothing to read.
    for (int p = 0; p < num_ranks_; ++p)
        params.arena_ptrs[p] = arena_ptrs_[p];
    // NOTES: rows of x are read with bulk copies, which need 16-byte-aligned addresses.
    const auto input_offset = [&](const at::Tensor& t, size_t alignment) -> int64_t {
        if (t.numel() == 0)
            return 0;
        if (!arena_ || reinterpret_cast<uintptr_t>(t.data_ptr()) % alignment != 0)
            return kernels::kInputNotInArena;
        return arena_->offset_of(t.data_ptr(), t.nbytes());
    };
    const bool is_pull_supported =
        allow_pull && kernels::is_combine_pull_supported(num_ranks_, params.hidden, smem_limit_);
    notify.x_offset = is_pull_supported ? input_offset(x, 16) : kernels::kInputNotInArena;
    notify.weights_offset = topk_weights.has_value() ? input_offset(*topk_weights, 4) : kernels::kInputAbsent;
    notify.num_x_rows = static_cast<int>(x.size(0));
    // NOTES: checked before the prelude is enqueued, so a rejected call leaves no barrier half-done.
    kernels::check_combine(params, layout_.num_data_bytes, smem_limit_);
    kernels::notify_combine(notify, stream);
    // The pushing kernel always (it ends at once if every rank's inputs lie in its arena); the pulling kernel after
    // it only where this rank's inputs allow it (it ends at once unless every rank's do). NOTES: in this order, with
    // programmatic launches, the pulling kernel sets up while the pushing one reads the choice and ends; enqueued
    // first, it left the pushing kernel's launch and exit (about 5 us on 4 H200 GPUs) after the work.
    kernels::intranode_combine(params, layout_.num_data_bytes, smem_limit_, stream);
    if (notify.x_offset >= 0 && notify.weights_offset != kernels::kInputNotInArena)
        kernels::intranode_combine_pull(params, smem_limit_, stream);
}

int64_t NvlRuntime::arena_offset(const at::Tensor& t) const {
    if (!arena_ || !t.is_cuda() || t.device().index() != device_idx_ || t.numel() == 0)
        return -1;
    return arena_->offset_of(t.data_ptr(), t.nbytes());
}

bool NvlRuntime::last_combine_pulled() const {
    HEP_CHECK(peers_open_, "last_combine_pulled: open_peers has not run");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    CUDA_CHECK(cudaStreamSynchronize(c10::cuda::getCurrentCUDAStream()));
    int finished = 0;
    CUDA_CHECK(cudaMemcpy(&finished, NvlBufferLayout::claim(local_ptr_, kernels::kCombinePullFinishClaim), sizeof(int),
                          cudaMemcpyDeviceToHost));
    return finished > 0;
}

std::tuple<int64_t, std::vector<int64_t>, std::tuple<int64_t, int64_t, int64_t>> NvlRuntime::wait_recv_counts(
    int64_t num_local_experts) const {
    HEP_CHECK(num_local_experts >= 0 && num_local_experts <= kNumMaxLocalExperts, "num_local_experts must be in [0, ",
              kNumMaxLocalExperts, "], got ", num_local_experts);
    const volatile int* counts = host_recv_counts_;
    int num_recv_tokens = -1;
    {
        const pybind11::gil_scoped_release no_gil;
        const auto start = std::chrono::steady_clock::now();
        while ((num_recv_tokens = counts[0]) < 0) {
            const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            HEP_CHECK(waited < timeout_secs_, "rank ", rank_, " waited ", timeout_secs_,
                      " s for the token counts of dispatch (notify); a peer may not have called dispatch, or the "
                      "kernel failed (see the device's printed message)");
        }
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    std::vector<int64_t> per_expert(num_local_experts);
    for (int64_t e = 0; e < num_local_experts; ++e)
        per_expert[e] = counts[1 + e];
    const int* overflow = host_recv_counts_ + kernels::kHostOverflowOffset;
    return {num_recv_tokens, per_expert, {overflow[0], overflow[1], overflow[2]}};
}

void NvlRuntime::close_peers() {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    CUDA_CHECK(cudaDeviceSynchronize());
    for (int p = 0; p < num_ranks_; ++p) {
        if (p != rank_ && buffer_ptrs_[p] != nullptr) {
            CUDA_CHECK(cudaIpcCloseMemHandle(buffer_ptrs_[p]));
            buffer_ptrs_[p] = nullptr;
        }
        if (p != rank_ && arena_ptrs_[p] != nullptr) {
            CUDA_CHECK(cudaIpcCloseMemHandle(arena_ptrs_[p]));
            arena_ptrs_[p] = nullptr;
        }
    }
    peers_open_ = false;
}

void NvlRuntime::free_buffer() {
    HEP_CHECK(!peers_open_, "free_buffer: close_peers must run first");
    if (local_ptr_ == nullptr)
        return;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_idx_));
    CUDA_CHECK(cudaFree(local_ptr_));
    CUDA_CHECK(cudaFreeHost(host_recv_counts_));
    local_ptr_ = nullptr;
    host_recv_counts_ = nullptr;
    buffer_ptrs_[rank_] = nullptr;
    // NOTES: the arena's memory goes once the last output tensor over it dies too (outputs outlive the Buffer, as
    // torch.empty ones would); the peers have unmapped it by now.
    arena_.reset();
    arena_ptrs_[rank_] = nullptr;
}

namespace {

int64_t ring_bytes_hint_py(int64_t hidden_bytes, int64_t num_ranks, int64_t num_blocks, int64_t num_slots) {
    return static_cast<int64_t>(ring_bytes_hint(static_cast<int>(hidden_bytes), static_cast<int>(num_ranks),
                                                static_cast<int>(num_blocks), static_cast<int>(num_slots)));
}

}  // namespace

void register_apis(pybind11::module_& m) {
    pybind11::class_<NvlRuntime>(m, "NvlRuntime")
        .def(pybind11::init<int, int, int64_t, double, int64_t>(), pybind11::arg("rank"), pybind11::arg("num_ranks"),
             pybind11::arg("num_nvl_bytes"), pybind11::arg("timeout_secs"), pybind11::arg("num_arena_bytes") = 0)
        .def("ipc_handle", &NvlRuntime::ipc_handle)
        .def("open_peers", &NvlRuntime::open_peers, pybind11::arg("handles"))
        .def("barrier", &NvlRuntime::barrier)
        .def("prepare_rings", &NvlRuntime::prepare_rings)
        .def("buffer_tensor", &NvlRuntime::buffer_tensor, pybind11::arg("rank_idx"), pybind11::arg("dtype"),
             pybind11::arg("offset"), pybind11::arg("num_bytes"))
        .def("dispatch_outputs", &NvlRuntime::dispatch_outputs, pybind11::arg("num_rows"), pybind11::arg("dtype"),
             pybind11::arg("hidden"), pybind11::arg("num_scales"), pybind11::arg("num_topk"),
             pybind11::arg("with_src_idx"))
        .def("notify_dispatch", &NvlRuntime::notify_dispatch, pybind11::arg("num_tokens_per_rank"),
             pybind11::arg("num_tokens_per_expert"), pybind11::arg("is_token_in_rank"), pybind11::arg("num_channels"),
             pybind11::arg("expert_alignment"), pybind11::arg("num_worst_tokens") = 0,
             pybind11::arg("trap_on_overflow") = false)
        .def("dispatch", &NvlRuntime::dispatch, pybind11::arg("x"), pybind11::arg("x_scales"),
             pybind11::arg("topk_idx"), pybind11::arg("topk_weights"), pybind11::arg("send_head"),
             pybind11::arg("rank_prefix_matrix"), pybind11::arg("recv_x"), pybind11::arg("recv_scales"),
             pybind11::arg("recv_src_idx"), pybind11::arg("recv_topk_idx"), pybind11::arg("recv_topk_weights"),
             pybind11::arg("num_local_experts"), pybind11::arg("num_channels"), pybind11::arg("num_ring_slots"),
             pybind11::arg("num_chunk_tokens"))
        .def("combine", &NvlRuntime::combine, pybind11::arg("x"), pybind11::arg("topk_weights"),
             pybind11::arg("rank_prefix_matrix"), pybind11::arg("recv_channel_prefix_matrix"),
             pybind11::arg("recv_src_idx"), pybind11::arg("is_token_in_rank"), pybind11::arg("send_head"),
             pybind11::arg("bias_0"), pybind11::arg("bias_1"), pybind11::arg("combined_x"),
             pybind11::arg("combined_topk_weights"), pybind11::arg("num_sms"), pybind11::arg("num_ring_slots"),
             pybind11::arg("num_chunk_tokens"), pybind11::arg("allow_pull") = true)
        .def("last_combine_pulled", &NvlRuntime::last_combine_pulled)
        .def("arena_offset", &NvlRuntime::arena_offset, pybind11::arg("tensor"))
        .def_static("ring_bytes_hint", &ring_bytes_hint_py, pybind11::arg("hidden_bytes"), pybind11::arg("num_ranks"),
                    pybind11::arg("num_blocks"), pybind11::arg("num_slots"))
        .def("wait_recv_counts", &NvlRuntime::wait_recv_counts, pybind11::arg("num_local_experts"))
        .def("close_peers", &NvlRuntime::close_peers)
        .def("free_buffer", &NvlRuntime::free_buffer)
        .def_property_readonly("rank", &NvlRuntime::rank)
        .def_property_readonly("num_ranks", &NvlRuntime::num_ranks)
        .def_property_readonly("num_nvl_bytes", &NvlRuntime::num_nvl_bytes)
        .def_property_readonly("num_timeout_cycles", &NvlRuntime::num_timeout_cycles)
        .def_property_readonly("num_arena_bytes", &NvlRuntime::num_arena_bytes)
        .def_property_readonly("num_arena_used_bytes", &NvlRuntime::num_arena_used_bytes)
        .def_property_readonly("is_available", &NvlRuntime::is_available);
}

}  // namespace hybrid_ep::runtime
