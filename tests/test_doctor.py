"""`python -m hybrid_ep.doctor`: the table and the JSON report, run as a user would (a subprocess importing the
installed package), with NVLink fixtures standing in for the machine's topology, and the exit code of bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def run_doctor(tmp_path, *args: str, topo_file: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HYBRID_EP_TOPO_DUMP_FILE", None)
    env.pop("HYBRID_EP_TOPO_FILE", None)
    if topo_file is not None:
        env["HYBRID_EP_TOPO_FILE"] = os.path.join(FIXTURES, topo_file)
    # NOTES: cwd outside the source tree, so that `hybrid_ep` is the installed package, with its `_C`.
    return subprocess.run(
        [sys.executable, "-m", "hybrid_ep.doctor", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_table(tmp_path):
    result = run_doctor(tmp_path)
    assert result.returncode == 0, result.stderr
    for key in ("driver", "CUDA runtime", "torch", "features", "P2P/IPC", "NVSHMEM", "rdma-core"):
        assert key in result.stdout
    assert "Missing:" in result.stdout or "Nothing missing." in result.stdout


def test_json(tmp_path):
    result = run_doctor(tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("driver", "cuda_runtime", "torch", "build_info", "gpus", "nvlink_matrix", "peer_access", "nvshmem"):
        assert key in report
    assert isinstance(report["missing"], list)
    assert "features" in report["build_info"]
    if not report["topology"]["available"]:
        assert any("NVML topology" in item for item in report["missing"])


@pytest.mark.parametrize(
    "topo_file, row0",
    [
        ("topo_h200x2.json", ["X", "NV18"]),
        ("topo_h200x2_probed.json", ["X", "SW"]),
        ("topo_h200x4.json", ["X", "SW", "SW", "SW"]),
        ("topo_partial.json", ["X", "NV4", "PCIe", "PCIe"]),
        ("topo_pcie_only.json", ["X", "PCIe", "PCIe", "PCIe"]),
    ],
)
def test_nvlink_matrix_of_fixtures(tmp_path, topo_file, row0):
    result = run_doctor(tmp_path, "--json", topo_file=topo_file)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nvlink_matrix"][0] == row0
    table = run_doctor(tmp_path, topo_file=topo_file)
    assert "NVLink matrix" in table.stdout and row0[1] in table.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["extra"]])
def test_bad_arguments_exit_2(tmp_path, args):
    result = run_doctor(tmp_path, *args)
    assert result.returncode == 2
    assert "usage" in result.stderr
