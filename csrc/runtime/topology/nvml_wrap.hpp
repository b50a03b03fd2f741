// NVML through dlopen: the few NVML types this extension needs, declared here, and a table of the entry points,
// filled from libnvidia-ml.so.1 at run time. Building needs no nvml.h (a minimal CUDA toolkit lacks it) and no
// libnvidia-ml at link time; a machine without the driver loads the extension and reports NVML as unavailable.
// Preconditions: none. No torch headers.
// NOTES: the values below are NVML's stable ABI (nvml.h, unchanged since the entry points appeared):
//     nvmlReturn_t: NVML_SUCCESS = 0, NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_NOT_SUPPORTED = 3.
//     nvmlEnableState_t: NVML_FEATURE_DISABLED = 0, NVML_FEATURE_ENABLED = 1.
//     nvmlGpuP2PCapsIndex_t: NVML_P2P_CAPS_INDEX_READ = 0, _WRITE = 1, _NVLINK = 2, _ATOMICS = 3, _PCI = 4.
//     nvmlGpuP2PStatus_t: OK = 0, CHIPSET_NOT_SUPPORTED = 1, GPU_NOT_SUPPORTED = 2, IOH_TOPOLOGY_NOT_SUPPORTED = 3,
//         DISABLED_BY_REGKEY = 4, NOT_SUPPORTED = 5, UNKNOWN = 6.
//     nvmlIntNvLinkDeviceType_t: GPU = 0, IBMNPU = 1, SWITCH = 2, UNKNOWN = 0xFF.
//     nvmlGpuFabricState_t (unsigned char): NOT_SUPPORTED = 0, NOT_STARTED = 1, IN_PROGRESS = 2, COMPLETED = 3.
//     nvmlPciInfo_t (v3): busIdLegacy[16], domain, bus, device, pciDeviceId, pciSubSystemId (unsigned int), busId[32].
//     nvmlGpuFabricInfo_t: clusterUuid[16], status (nvmlReturn_t), cliqueId (unsigned int), state.
//     Handles (nvmlDevice_t) are opaque pointers. Enums are passed as int (4 bytes on every supported ABI).
#pragma once

#include <string>

namespace hybrid_ep::topology::nvml {

using Return = int;
using Device = struct OpaqueDevice*;

constexpr Return kSuccess = 0;
constexpr Return kErrorInvalidArgument = 2;
constexpr Return kErrorNotSupported = 3;

constexpr int kFeatureEnabled = 1;
constexpr int kP2PCapsIndexNvlink = 2;
constexpr int kNvLinkDeviceTypeGpu = 0;
constexpr int kNvLinkDeviceTypeIbmNpu = 1;
constexpr int kNvLinkDeviceTypeSwitch = 2;

constexpr unsigned char kFabricStateNotSupported = 0;

// NVML_NVLINK_MAX_LINKS of the newest headers; older drivers answer NVML_ERROR_INVALID_ARGUMENT past their last link.
constexpr unsigned int kMaxNvLinks = 36;
// NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE and NVML_DEVICE_NAME_V2_BUFFER_SIZE.
constexpr unsigned int kNumDriverVersionBytes = 80;
constexpr unsigned int kNumDeviceNameBytes = 96;

struct PciInfo {
    char bus_id_legacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pci_device_id;
    unsigned int pci_sub_system_id;
    char bus_id[32];
};

struct GpuFabricInfo {
    unsigned char cluster_uuid[16];
    Return status;
    unsigned int clique_id;
    unsigned char state;
};

// The entry points used; a null pointer means the library lacks it (only the optional ones may be null).
struct Api {
    Return (*init_v2)();
    Return (*shutdown)();
    const char* (*error_string)(Return);
    Return (*system_get_driver_version)(char*, unsigned int);
    Return (*device_get_count_v2)(unsigned int*);
    Return (*device_get_handle_by_index_v2)(unsigned int, Device*);
    Return (*device_get_pci_info_v3)(Device, PciInfo*);
    Return (*device_get_name)(Device, char*, unsigned int);
    Return (*device_get_nvlink_state)(Device, unsigned int, int*);
    Return (*device_get_nvlink_remote_pci_info_v2)(Device, unsigned int, PciInfo*);
    Return (*device_get_p2p_status)(Device, Device, int, int*);
    // Optional: absent on old drivers.
    Return (*device_get_nvlink_remote_device_type)(Device, unsigned int, int*);
    Return (*device_get_gpu_fabric_info)(Device, GpuFabricInfo*);
};

// Owns one dlopen of the NVML library; closes it when destroyed. Never throws.
class Library {
public:
    Library() = default;
    Library(const Library&) = delete;
    Library& operator=(const Library&) = delete;
    ~Library();

    // Opens `library_name` and resolves the entry points. Returns: an empty string on success, else why not
    // (dlopen's message, or the name of a missing required entry point); the library is then closed.
    std::string load(const std::string& library_name);

    const Api& api() const { return api_; }

    // Returns: "<call> failed: <nvmlErrorString>" for an NVML return code.
    std::string error_text(const char* call, Return status) const;

private:
    void* handle_ = nullptr;
    Api api_{};
};

}  // namespace hybrid_ep::topology::nvml
