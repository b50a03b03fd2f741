// The NVML topology probe (see runtime/topology/topology.hpp) and its Python binding.
// Preconditions: none. Every NVML call is checked; a failure becomes text in the result, never an exception, so
// that a machine without GPUs or driver can still ask.
#include "runtime/topology/topology.hpp"

#include <cctype>
#include <string>

#include "runtime/topology/nvml_wrap.hpp"

namespace hybrid_ep::topology {

namespace {

// Bus ids compared case-insensitively; NVML pads the domain to 8 hex digits in both places it writes one.
std::string normalized_bus_id(const char* bus_id) {
    std::string out(bus_id);
    for (auto& c : out)
        c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return out;
}

bool is_all_f_bus_id(const nvml::PciInfo& pci) {
    return pci.domain == 0xffffffffu && pci.bus == 0xffu && pci.device == 0xffu;
}

std::string p2p_status_text(int status) {
    switch (status) {
        case 0:
            return "ok";
        case 1:
            return "chipset_not_supported";
        case 2:
            return "gpu_not_supported";
        case 3:
            return "topology_not_supported";
        case 4:
            return "disabled_by_regkey";
        case 5:
            return "not_supported";
        default:
            return "unknown";
    }
}

std::string fabric_state_text(unsigned char state) {
    switch (state) {
        case 1:
            return "not_started";
        case 2:
            return "in_progress";
        case 3:
            return "completed";
        default:
            return "unknown";
    }
}

std::string hex_text(const unsigned char* bytes, int num_bytes) {
    const char* digits = "0123456789abcdef";
    std::string out;
    for (int i = 0; i < num_bytes; ++i) {
        out += digits[bytes[i] >> 4];
        out += digits[bytes[i] & 0xf];
    }
    return out;
}

// Keeps the first error seen, so that one bad read does not hide behind a later one.
void note_error(Topology& topo, const std::string& text) {
    if (!topo.error.has_value())
        topo.error = text;
}

void probe_nvlinks(const nvml::Library& lib, nvml::Device device, const std::vector<std::string>& gpu_bus_ids,
                   Gpu& gpu) {
    const auto& api = lib.api();
    for (unsigned int link_idx = 0; link_idx < nvml::kMaxNvLinks; ++link_idx) {
        int state = 0;
        const nvml::Return status = api.device_get_nvlink_state(device, link_idx, &state);
        // NOTES: NOT_SUPPORTED means no NVLink on this GPU; INVALID_ARGUMENT means past the last link.
        if (status == nvml::kErrorNotSupported || status == nvml::kErrorInvalidArgument)
            break;
        if (status != nvml::kSuccess)
            continue;
        NvLink link{static_cast<int>(link_idx), state == nvml::kFeatureEnabled, std::nullopt, "unknown"};
        if (link.active) {
            nvml::PciInfo remote_pci{};
            int remote_type = -1;
            if (api.device_get_nvlink_remote_device_type != nullptr &&
                api.device_get_nvlink_remote_device_type(device, link_idx, &remote_type) != nvml::kSuccess)
                remote_type = -1;
            if (api.device_get_nvlink_remote_pci_info_v2(device, link_idx, &remote_pci) == nvml::kSuccess) {
                const std::string remote_bus_id = normalized_bus_id(remote_pci.bus_id);
                link.remote_pci_bus_id = std::string(remote_pci.bus_id);
                for (size_t i = 0; i < gpu_bus_ids.size(); ++i)
                    if (gpu_bus_ids[i] == remote_bus_id)
                        link.remote = "gpu:" + std::to_string(i);
                if (link.remote == "unknown" &&
                    (remote_type == nvml::kNvLinkDeviceTypeSwitch || is_all_f_bus_id(remote_pci)))
                    link.remote = "switch";
            }
            if (link.remote == "unknown" && remote_type == nvml::kNvLinkDeviceTypeSwitch)
                link.remote = "switch";
            if (link.remote == "unknown" && remote_type == nvml::kNvLinkDeviceTypeIbmNpu)
                link.remote = "cpu";
        }
        gpu.nvlinks.push_back(std::move(link));
    }
}

void probe_gpus(const nvml::Library& lib, Topology& topo) {
    const auto& api = lib.api();
    unsigned int num_gpus = 0;
    nvml::Return status = api.device_get_count_v2(&num_gpus);
    if (status != nvml::kSuccess) {
        topo.available = false;
        topo.error = lib.error_text("nvmlDeviceGetCount_v2", status);
        return;
    }

    std::vector<nvml::Device> devices(num_gpus, nullptr);
    std::vector<std::string> bus_ids(num_gpus);
    for (unsigned int i = 0; i < num_gpus; ++i) {
        Gpu gpu{static_cast<int>(i), "", "", {}, {}, std::nullopt};
        status = api.device_get_handle_by_index_v2(i, &devices[i]);
        if (status != nvml::kSuccess) {
            devices[i] = nullptr;
            note_error(topo, lib.error_text("nvmlDeviceGetHandleByIndex_v2", status) + " for GPU " + std::to_string(i));
            topo.gpus.push_back(std::move(gpu));
            continue;
        }
        char name[nvml::kNumDeviceNameBytes] = {};
        if ((status = api.device_get_name(devices[i], name, sizeof(name))) == nvml::kSuccess)
            gpu.name = name;
        else
            note_error(topo, lib.error_text("nvmlDeviceGetName", status));
        nvml::PciInfo pci{};
        if ((status = api.device_get_pci_info_v3(devices[i], &pci)) == nvml::kSuccess) {
            gpu.pci_bus_id = pci.bus_id;
            bus_ids[i] = normalized_bus_id(pci.bus_id);
        } else {
            note_error(topo, lib.error_text("nvmlDeviceGetPciInfo_v3", status));
        }
        topo.gpus.push_back(std::move(gpu));
    }

    for (unsigned int i = 0; i < num_gpus; ++i) {
        if (devices[i] == nullptr)
            continue;
        Gpu& gpu = topo.gpus[i];
        probe_nvlinks(lib, devices[i], bus_ids, gpu);
        for (unsigned int j = 0; j < num_gpus; ++j) {
            if (j == i || devices[j] == nullptr)
                continue;
            int p2p = 0;
            status = api.device_get_p2p_status(devices[i], devices[j], nvml::kP2PCapsIndexNvlink, &p2p);
            gpu.p2p.emplace_back(static_cast<int>(j),
                                 status == nvml::kSuccess
                                     ? p2p_status_text(p2p)
                                     : "error: " + lib.error_text("nvmlDeviceGetP2PStatus", status));
        }
        if (api.device_get_gpu_fabric_info != nullptr) {
            nvml::GpuFabricInfo fabric{};
            if (api.device_get_gpu_fabric_info(devices[i], &fabric) == nvml::kSuccess &&
                fabric.state != nvml::kFabricStateNotSupported)
                gpu.fabric =
                    Fabric{fabric.clique_id, hex_text(fabric.cluster_uuid, 16), fabric_state_text(fabric.state)};
        }
    }
}

pybind11::object optional_text(const std::optional<std::string>& text) {
    return text.has_value() ? pybind11::object(pybind11::str(*text)) : pybind11::object(pybind11::none());
}

// Returns: the dict documented in docs/topology.md.
pybind11::dict probe_topology(const std::string& library_name) {
    Topology topo;
    {
        // NOTES: NVML reads sysfs and may take tens of milliseconds per GPU; no Python object is touched here.
        pybind11::gil_scoped_release no_gil;
        topo = probe(library_name);
    }
    pybind11::list gpus;
    for (const auto& gpu : topo.gpus) {
        pybind11::list nvlinks;
        for (const auto& link : gpu.nvlinks) {
            pybind11::dict entry;
            entry["link"] = link.link_idx;
            entry["active"] = link.active;
            entry["remote_pci_bus_id"] = optional_text(link.remote_pci_bus_id);
            entry["remote"] = link.remote;
            nvlinks.append(entry);
        }
        pybind11::dict p2p;
        for (const auto& [other_idx, status] : gpu.p2p)
            p2p[pybind11::int_(other_idx)] = status;
        pybind11::dict entry;
        entry["index"] = gpu.gpu_idx;
        entry["name"] = gpu.name;
        entry["pci_bus_id"] = gpu.pci_bus_id;
        entry["nvlinks"] = nvlinks;
        entry["p2p"] = p2p;
        if (gpu.fabric.has_value()) {
            pybind11::dict fabric;
            fabric["clique_id"] = gpu.fabric->clique_id;
            fabric["cluster_uuid"] = gpu.fabric->cluster_uuid;
            fabric["state"] = gpu.fabric->state;
            entry["fabric"] = fabric;
        } else {
            entry["fabric"] = pybind11::none();
        }
        gpus.append(entry);
    }
    pybind11::dict out;
    out["available"] = topo.available;
    out["error"] = optional_text(topo.error);
    out["driver_version"] = optional_text(topo.driver_version);
    out["gpus"] = gpus;
    return out;
}

}  // namespace

Topology probe(const std::string& library_name) {
    Topology topo;
    nvml::Library lib;
    std::string error = lib.load(library_name);
    if (!error.empty()) {
        topo.error = error;
        return topo;
    }
    const auto& api = lib.api();
    nvml::Return status = api.init_v2();
    if (status != nvml::kSuccess) {
        topo.error = lib.error_text("nvmlInit_v2", status);
        return topo;
    }
    topo.available = true;
    char driver_version[nvml::kNumDriverVersionBytes] = {};
    if ((status = api.system_get_driver_version(driver_version, sizeof(driver_version))) == nvml::kSuccess)
        topo.driver_version = std::string(driver_version);
    else
        note_error(topo, lib.error_text("nvmlSystemGetDriverVersion", status));
    probe_gpus(lib, topo);
    api.shutdown();
    return topo;
}

void register_apis(pybind11::module_& m) {
    m.def("probe_topology", &probe_topology, pybind11::arg("library_name") = "libnvidia-ml.so.1",
          "NVML topology of this machine's GPUs as a dict: available, error, driver_version and gpus (index, name, "
          "pci_bus_id, nvlinks, p2p, fabric); see docs/topology.md. Never raises: a missing library or a failing "
          "nvmlInit is reported in available/error.");
}

}  // namespace hybrid_ep::topology
