"""`python -m hybrid_ep.doctor [--json]`: what this machine has for hybrid_ep, and what is missing.

Reports the driver, CUDA runtime, torch, the extension's build info, the GPUs and their NVLink matrix (as
`nvidia-smi topo -m`: X, NV<n>, SW, PCIe), peer access between the visible devices, NVSHMEM and rdma-core. Always
exits 0 after a report (a missing part is a finding, not a failure); bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import ctypes.util
import glob
import importlib.util
import json
import os
import sys
from typing import Any

INFINIBAND_SYSFS = "/sys/class/infiniband"


def nvml_versions() -> dict[str, Any]:
    """Returns: driver and NVML versions read through nvidia-ml-py (`pynvml`), or the reason they are unknown."""
    try:
        import pynvml
    except ImportError as exc:
        return {
            "driver": None,
            "nvml": None,
            "error": f"nvidia-ml-py is not installed ({exc}): pip install nvidia-ml-py",
        }
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"driver": None, "nvml": None, "error": f"nvmlInit failed: {exc} (no NVIDIA driver?)"}
    try:
        return {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "nvml": pynvml.nvmlSystemGetNVMLVersion(),
            "error": None,
        }
    finally:
        pynvml.nvmlShutdown()


def nvlink_matrix(topo: dict[str, Any]) -> list[list[str]]:
    """Returns: [num_gpus, num_gpus] of "X" (self), "NV<n>" (n direct links), "SW" (same NVSwitch domain), "PCIe"."""
    gpus = topo["gpus"]
    domain_of = {idx: d_idx for d_idx, domain in enumerate(topo["nvlink_domains"]) for idx in domain}
    matrix = []
    for a in gpus:
        row = []
        for b in gpus:
            num_links = sum(1 for link in a["nvlinks"] if link["active"] and link["remote"] == f"gpu:{b['index']}")
            if a["index"] == b["index"]:
                row.append("X")
            elif num_links > 0:
                row.append(f"NV{num_links}")
            elif domain_of.get(a["index"]) == domain_of.get(b["index"]):
                row.append("SW")
            else:
                row.append("PCIe")
        matrix.append(row)
    return matrix


def peer_access() -> dict[str, Any]:
    """Returns: visible CUDA device count and, per ordered pair "i->j", torch.cuda.can_device_access_peer."""
    import torch

    if not torch.cuda.is_available():
        return {"num_devices": 0, "pairs": {}, "error": "torch sees no CUDA device"}
    num_devices = torch.cuda.device_count()
    pairs = {
        f"{i}->{j}": bool(torch.cuda.can_device_access_peer(i, j))
        for i in range(num_devices)
        for j in range(num_devices)
        if i != j
    }
    return {"num_devices": num_devices, "pairs": pairs, "error": None}


def nvshmem() -> dict[str, Any]:
    """Returns: where the `nvidia.nvshmem` package and libnvshmem_host.so* are, or None for each missing one."""
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except ModuleNotFoundError:
        spec = None
    package = None
    libraries: list[str] = []
    if spec is not None and spec.submodule_search_locations:
        package = list(spec.submodule_search_locations)[0]
        libraries = sorted(glob.glob(os.path.join(package, "**", "libnvshmem_host.so*"), recursive=True))
    system = ctypes.util.find_library("nvshmem_host")
    if system is not None:
        libraries.append(system)
    return {"package": package, "host_libraries": libraries}


def rdma_core() -> dict[str, Any]:
    """Returns: the libibverbs that the loader finds (or None) and the devices under /sys/class/infiniband."""
    devices = sorted(os.listdir(INFINIBAND_SYSFS)) if os.path.isdir(INFINIBAND_SYSFS) else []
    return {"libibverbs": ctypes.util.find_library("ibverbs"), "devices": devices}


def collect() -> dict[str, Any]:
    """Returns: the whole report as one dict (what `--json` prints), with `missing`: list of str, what to fix."""
    import torch

    import hybrid_ep
    from hybrid_ep import topology

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "hybrid_ep": hybrid_ep.__version__,
        "build_info": hybrid_ep.build_info(),
    }
    versions = nvml_versions()
    topo = topology.topology()
    report["driver"] = versions["driver"] or topo["driver_version"]
    report["nvml"] = versions["nvml"]
    report["topology"] = {"available": topo["available"], "error": topo["error"]}
    report["gpus"] = [{"index": g["index"], "name": g["name"], "pci_bus_id": g["pci_bus_id"]} for g in topo["gpus"]]
    report["nvlink_matrix"] = nvlink_matrix(topo)
    report["nvlink_domains"] = topo["nvlink_domains"]
    report["peer_access"] = peer_access()
    report["nvshmem"] = nvshmem()
    report["rdma_core"] = rdma_core()

    missing = []
    if versions["error"] is not None:
        missing.append(f"NVML (Python): {versions['error']}")
    if not report["build_info"]["extension"]:
        missing.append(f"hybrid_ep._C: {report['build_info']['error']}")
    if not topo["available"]:
        missing.append(f"NVML topology: {topo['error']}")
    if report["cuda_runtime"] is None:
        missing.append("CUDA runtime: this torch is a CPU-only build")
    if report["peer_access"]["error"] is not None:
        missing.append(f"GPUs: {report['peer_access']['error']}")
    elif not all(report["peer_access"]["pairs"].values()):
        missing.append("P2P: some visible device pairs cannot access each other (see peer_access)")
    if report["nvshmem"]["package"] is None:
        missing.append("NVSHMEM: the nvidia.nvshmem package is not installed (pip install nvidia-nvshmem-cu13)")
    elif not report["nvshmem"]["host_libraries"]:
        missing.append("NVSHMEM: no libnvshmem_host.so* found")
    if report["rdma_core"]["libibverbs"] is None:
        missing.append("rdma-core: libibverbs not found (apt install rdma-core libibverbs-dev)")
    if not report["rdma_core"]["devices"]:
        missing.append(f"RDMA devices: none under {INFINIBAND_SYSFS}")
    report["missing"] = missing
    return report


def render(report: dict[str, Any]) -> str:
    """Returns: the report as readable text."""
    info = report["build_info"]
    lines = [
        "hybrid_ep doctor",
        f"  driver           {report['driver'] or 'not found'}",
        f"  NVML             {report['nvml'] or 'not found'}",
        f"  CUDA runtime     {report['cuda_runtime'] or 'none (CPU-only torch)'}",
        f"  torch            {report['torch']}",
        f"  python           {report['python']}",
        f"  hybrid_ep        {report['hybrid_ep']}, extension {'yes' if info['extension'] else 'no'}",
        "  features         " + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in sorted(info["features"].items())),
        f"  GPUs (NVML)      {len(report['gpus'])}",
    ]
    for gpu in report["gpus"]:
        lines.append(f"    {gpu['index']}: {gpu['name']}  {gpu['pci_bus_id']}")
    if report["gpus"]:
        lines.append("  NVLink matrix")
        width = max(5, max(len(cell) for row in report["nvlink_matrix"] for cell in row) + 1)
        lines.append("    " + "".join(f"GPU{g['index']}".rjust(width) for g in report["gpus"]))
        for gpu, row in zip(report["gpus"], report["nvlink_matrix"]):
            lines.append(f"    GPU{gpu['index']}".ljust(4) + "".join(cell.rjust(width) for cell in row))
        lines.append(f"  NVLink domains   {report['nvlink_domains']}")
    peer = report["peer_access"]
    if peer["error"] is None:
        denied = [pair for pair, ok in peer["pairs"].items() if not ok]
        status = "all pairs ok" if not denied else "no access: " + ", ".join(denied)
        lines.append(f"  P2P/IPC          {peer['num_devices']} visible devices, {status}")
    else:
        lines.append(f"  P2P/IPC          {peer['error']}")
    lines.append(f"  NVSHMEM          package {report['nvshmem']['package'] or 'not installed'}")
    lines.append(f"                   host libs {', '.join(report['nvshmem']['host_libraries']) or 'not found'}")
    rdma = report["rdma_core"]
    lines.append(f"  rdma-core        libibverbs {rdma['libibverbs'] or 'not found'}")
    lines.append(f"                   devices {', '.join(rdma['devices']) or 'none'}")
    if report["missing"]:
        lines.append("Missing:")
        lines += [f"  - {item}" for item in report["missing"]]
    else:
        lines.append("Nothing missing.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_ep.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
