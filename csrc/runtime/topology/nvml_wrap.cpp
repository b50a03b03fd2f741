// Loading of libnvidia-ml with dlopen and resolution of the entry points (see runtime/topology/nvml_wrap.hpp).
// Preconditions: none; every failure is returned as text, never thrown.
#include "runtime/topology/nvml_wrap.hpp"

#include <dlfcn.h>

namespace hybrid_ep::topology::nvml {

namespace {

template <typename Fn>
bool resolve(void* handle, const char* symbol, Fn& fn) {
    fn = reinterpret_cast<Fn>(dlsym(handle, symbol));
    return fn != nullptr;
}

}  // namespace

Library::~Library() {
    if (handle_ != nullptr)
        dlclose(handle_);
}

std::string Library::load(const std::string& library_name) {
    if (handle_ != nullptr)
        return "";
    // NOTES: RTLD_LOCAL keeps NVML's symbols out of the global namespace, where they could clash with a pynvml or
    // another copy loaded by the same process.
    handle_ = dlopen(library_name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) {
        const char* error = dlerror();
        return "dlopen(" + library_name + ") failed: " + (error != nullptr ? error : "unknown error") +
               " (NVML comes with the NVIDIA driver)";
    }

    const char* missing = nullptr;
    const auto need = [&](const char* symbol, auto& fn) {
        if (!resolve(handle_, symbol, fn) && missing == nullptr)
            missing = symbol;
    };
    need("nvmlInit_v2", api_.init_v2);
    need("nvmlShutdown", api_.shutdown);
    need("nvmlErrorString", api_.error_string);
    need("nvmlSystemGetDriverVersion", api_.system_get_driver_version);
    need("nvmlDeviceGetCount_v2", api_.device_get_count_v2);
    need("nvmlDeviceGetHandleByIndex_v2", api_.device_get_handle_by_index_v2);
    need("nvmlDeviceGetPciInfo_v3", api_.device_get_pci_info_v3);
    need("nvmlDeviceGetName", api_.device_get_name);
    need("nvmlDeviceGetNvLinkState", api_.device_get_nvlink_state);
    need("nvmlDeviceGetNvLinkRemotePciInfo_v2", api_.device_get_nvlink_remote_pci_info_v2);
    need("nvmlDeviceGetP2PStatus", api_.device_get_p2p_status);
    resolve(handle_, "nvmlDeviceGetNvLinkRemoteDeviceType", api_.device_get_nvlink_remote_device_type);
    resolve(handle_, "nvmlDeviceGetGpuFabricInfo", api_.device_get_gpu_fabric_info);

    if (missing != nullptr) {
        dlclose(handle_);
        handle_ = nullptr;
        api_ = Api{};
        return library_name + " lacks " + missing + " (driver too old)";
    }
    return "";
}

std::string Library::error_text(const char* call, Return status) const {
    const char* text = api_.error_string != nullptr ? api_.error_string(status) : nullptr;
    return std::string(call) + " failed: " + (text != nullptr ? text : "NVML error " + std::to_string(status));
}

}  // namespace hybrid_ep::topology::nvml
