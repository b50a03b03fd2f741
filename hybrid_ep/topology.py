"""Which GPUs of this machine reach each other over NVLink, from the NVML probe of `hybrid_ep._C.probe_topology`.

`topology()` returns the probed dict (docs/topology.md gives its format) plus `nvlink_domains`; it never raises for
a missing GPU, driver or extension: it says why in `error`. HYBRID_EP_TOPO_FILE replaces the probe by a recorded
dict and HYBRID_EP_TOPO_DUMP_FILE records one (see hybrid_ep/envs.py).
"""

from __future__ import annotations

import json
from typing import Any

from . import envs
from ._ext import _C, _import_error

NVML_LIBRARY = "libnvidia-ml.so.1"

# nvmlGpuP2PStatus_t values and nvmlIntNvLinkDeviceType_t values (NVML ABI), as `from_raw_nvml_dump` reads them.
_P2P_STATUS = {
    0: "ok",
    1: "chipset_not_supported",
    2: "gpu_not_supported",
    3: "topology_not_supported",
    4: "disabled_by_regkey",
    5: "not_supported",
}
_NVLINK_DEVICE_TYPE_SWITCH = 2
_NVLINK_DEVICE_TYPE_IBMNPU = 1


def _unavailable(error: str) -> dict[str, Any]:
    return {"available": False, "error": error, "driver_version": None, "gpus": [], "nvlink_domains": []}


def _normalized(topo: dict[str, Any]) -> dict[str, Any]:
    """Returns: `topo` with integer `p2p` keys (JSON turns them into strings) and every top-level key present."""
    out = {"available": False, "error": None, "driver_version": None, "gpus": []}
    out.update(topo)
    gpus = []
    for gpu in out["gpus"]:
        gpu = dict(gpu)
        gpu["p2p"] = {int(k): v for k, v in gpu.get("p2p", {}).items()}
        gpu.setdefault("nvlinks", [])
        gpu.setdefault("fabric", None)
        gpus.append(gpu)
    out["gpus"] = gpus
    return out


def probe(library_name: str = NVML_LIBRARY) -> dict[str, Any]:
    """Probes NVML through the extension, without domains, env files or dumps.

    Arguments:
        library_name: the NVML shared library to dlopen.
    Returns:
        the dict of docs/topology.md without `nvlink_domains`; `available` False with the reason in `error` when the
        extension, the library or nvmlInit is missing.
    """
    if _C is None:
        return _normalized({"error": f"hybrid_ep._C is not available ({_import_error})"})
    if not hasattr(_C, "probe_topology"):
        return _normalized({"error": "hybrid_ep._C was built without probe_topology; rebuild the extension"})
    return _normalized(_C.probe_topology(library_name))


def nvlink_domains(topo: dict[str, Any]) -> list[list[int]]:
    """Groups the GPUs of `topo` into NVLink domains.

    Two GPUs are in one domain when a direct NVLink joins them, or when both have an active NVLink to an NVSwitch,
    NVML says NVLink P2P between them is "ok", and (where both report fabric info) they are in the same fabric
    clique and cluster. Domains are the connected components of that relation.

    Arguments:
        topo: a dict as `probe()` returns.
    Returns:
        list of domains, each a sorted list of GPU indices, ordered by their smallest index; a GPU without NVLink is a
        domain of its own.
    """
    gpus = {gpu["index"]: gpu for gpu in topo.get("gpus", [])}
    parent = {idx: idx for idx in gpus}

    def find(idx: int) -> int:
        while parent[idx] != idx:
            parent[idx] = parent[parent[idx]]
            idx = parent[idx]
        return idx

    def join(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    def on_switch(gpu: dict[str, Any]) -> bool:
        return any(link["active"] and link["remote"] == "switch" for link in gpu["nvlinks"])

    def same_fabric(a: dict[str, Any], b: dict[str, Any]) -> bool:
        fa, fb = a.get("fabric"), b.get("fabric")
        if fa is None or fb is None:
            return True
        return fa["clique_id"] == fb["clique_id"] and fa["cluster_uuid"] == fb["cluster_uuid"]

    for idx, gpu in gpus.items():
        for link in gpu["nvlinks"]:
            remote = link["remote"]
            if link["active"] and remote.startswith("gpu:") and int(remote[4:]) in gpus:
                join(idx, int(remote[4:]))
    switched = [idx for idx, gpu in gpus.items() if on_switch(gpu)]
    for i, a in enumerate(switched):
        for b in switched[i + 1 :]:
            ga, gb = gpus[a], gpus[b]
            p2p_ok = ga["p2p"].get(b) == "ok" and gb["p2p"].get(a, "ok") == "ok"
            if p2p_ok and same_fabric(ga, gb):
                join(a, b)

    domains: dict[int, list[int]] = {}
    for idx in sorted(gpus):
        domains.setdefault(find(idx), []).append(idx)
    return sorted(domains.values(), key=lambda domain: domain[0])


def load(path: str) -> dict[str, Any]:
    """Returns: the topology dict recorded at `path` (JSON), normalized as `probe()` returns it."""
    with open(path) as f:
        return _normalized(json.load(f))


def topology(library_name: str = NVML_LIBRARY) -> dict[str, Any]:
    """The NVML topology of this machine and its NVLink domains.

    Reads HYBRID_EP_TOPO_FILE (load a recorded dict instead of probing) and HYBRID_EP_TOPO_DUMP_FILE (write the
    probed dict as JSON).

    Arguments:
        library_name: the NVML shared library to dlopen.
    Returns:
        dict of docs/topology.md: available, error, driver_version, gpus, nvlink_domains (list of lists of GPU
        indices). Never raises for a missing GPU, driver or extension; an unreadable HYBRID_EP_TOPO_FILE raises
        OSError or ValueError naming the file.
    """
    path = envs.topo_file()
    if path is not None:
        try:
            topo = load(path)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"HYBRID_EP_TOPO_FILE={path}: {exc}") from exc
    else:
        topo = probe(library_name)
        dump_path = envs.topo_dump_file()
        if dump_path is not None:
            with open(dump_path, "w") as f:
                json.dump(topo, f, indent=1)
    topo["nvlink_domains"] = nvlink_domains(topo)
    return topo


def _local_gpu_indices(topo: dict[str, Any]) -> list[int]:
    """Returns: the NVML indices of this process's current CUDA device, matched by PCI bus id; [] when unknown."""
    import torch

    if not torch.cuda.is_available():
        return []
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if not all(hasattr(props, name) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        return []
    bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return [gpu["index"] for gpu in topo["gpus"] if gpu["pci_bus_id"].upper() == bus_id]


def ranks_per_nvlink_domain(
    num_ranks: int, local_gpu_indices: list[int] | None = None, override: int | None = None
) -> int:
    """How many consecutive ranks share an NVLink domain, for `get_dispatch_layout`'s `num_ranks_per_domain`.

    Arguments:
        num_ranks: ranks in the group.
        local_gpu_indices: NVML indices of this process's GPUs; None: the current CUDA device, found by PCI bus id.
        override: an explicit answer, returned as is (it wins over the probe).
    Returns:
        `override` if given; else the size of the smallest NVLink domain holding a local GPU (every domain when no
        local GPU is known), capped by `num_ranks`; 1 when the topology is unavailable.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise ValueError(f"override must be a positive int, got {override!r}")
        return override
    topo = topology()
    if not topo["available"] or not topo["nvlink_domains"]:
        return 1
    return _smallest_local_domain(topo, num_ranks, local_gpu_indices)


def _smallest_local_domain(topo: dict[str, Any], num_ranks: int, local_gpu_indices: list[int] | None) -> int:
    """Returns: the size of the smallest NVLink domain of `topo` holding a local GPU (every domain when no local GPU
    is known), capped by `num_ranks`; `topo` is available and has domains."""
    if local_gpu_indices is None:
        local_gpu_indices = _local_gpu_indices(topo)
    local = set(local_gpu_indices)
    sizes = [len(d) for d in topo["nvlink_domains"] if local & set(d)] or [len(d) for d in topo["nvlink_domains"]]
    return min(min(sizes), num_ranks)


def nvl_ranks_for_group(
    group_size: int, on_gpus: bool, override: int | None = None, local_gpu_indices: list[int] | None = None
) -> int:
    """How many consecutive ranks of a group share an NVLink domain, as `Buffer.num_nvl_ranks`.

    Arguments:
        group_size: ranks in the group.
        on_gpus: the group runs on GPUs (NCCL); False for a CPU (gloo) group, which has no NVLink.
        override: an explicit answer (HYBRID_EP_NUM_NVL_RANKS), capped by `group_size`; it wins over the probe.
        local_gpu_indices: as for `ranks_per_nvlink_domain`.
    Returns:
        `override` capped by `group_size` if given; else `group_size` for a CPU group, and for a GPU group whose
        topology is unavailable (no NVML, no extension: one domain, as assumed without a probe); else
        `ranks_per_nvlink_domain(group_size, local_gpu_indices)`. Raises ValueError when the result does not
        divide `group_size`.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if override is not None:
        num_nvl_ranks = min(ranks_per_nvlink_domain(group_size, override=override), group_size)
    elif not on_gpus:
        num_nvl_ranks = group_size
    else:
        topo = topology()
        if topo["available"] and topo["nvlink_domains"]:
            num_nvl_ranks = _smallest_local_domain(topo, group_size, local_gpu_indices)
        else:
            num_nvl_ranks = group_size
    if group_size % num_nvl_ranks != 0:
        raise ValueError(
            f"{num_nvl_ranks} ranks per NVLink domain do not divide the group of {group_size} ranks; set "
            f"HYBRID_EP_NUM_NVL_RANKS to a divisor of {group_size}"
        )
    return num_nvl_ranks


def from_raw_nvml_dump(raw: dict[str, Any]) -> dict[str, Any]:
    """Converts raw NVML readings (tests/fixtures source format: `driver`, `gpus[*].links[*]` with `remote_pci` and
    `remote_type`, and an NxN `p2p_nvlink` matrix of nvmlGpuP2PStatus_t values) into the dict of `probe()`.

    Arguments:
        raw: the parsed JSON of a raw dump.
    Returns:
        the topology dict, classified with the same rules as the C++ probe.
    """
    bus_ids = {gpu["pci_bus_id"].upper(): gpu["index"] for gpu in raw["gpus"]}
    p2p_matrix = raw.get("p2p_nvlink") or []
    gpus = []
    for gpu in raw["gpus"]:
        idx = gpu["index"]
        nvlinks = []
        for link in gpu.get("links", []):
            remote_pci = link.get("remote_pci") if link.get("active") else None
            remote = "unknown"
            if remote_pci is not None:
                if remote_pci.upper() in bus_ids:
                    remote = f"gpu:{bus_ids[remote_pci.upper()]}"
                elif link.get("remote_type") == _NVLINK_DEVICE_TYPE_SWITCH or remote_pci.upper().startswith(
                    "FFFFFFFF:FF:FF"
                ):
                    remote = "switch"
                elif link.get("remote_type") == _NVLINK_DEVICE_TYPE_IBMNPU:
                    remote = "cpu"
            nvlinks.append(
                {
                    "link": link["link"],
                    "active": bool(link["active"]),
                    "remote_pci_bus_id": remote_pci,
                    "remote": remote,
                }
            )
        p2p = {}
        if idx < len(p2p_matrix):
            for other, status in enumerate(p2p_matrix[idx]):
                if other != idx and status is not None:
                    p2p[other] = _P2P_STATUS.get(status, "unknown") if isinstance(status, int) else str(status)
        fabric = gpu.get("fabric")
        gpus.append(
            {
                "index": idx,
                "name": gpu.get("name", ""),
                "pci_bus_id": gpu["pci_bus_id"],
                "nvlinks": nvlinks,
                "p2p": p2p,
                "fabric": fabric if isinstance(fabric, dict) else None,
            }
        )
    return {"available": True, "error": None, "driver_version": raw.get("driver"), "gpus": gpus}
