"""NVML topology: NVLink domains of recorded machines, the env-file round trip, no-NVML behaviour and
ranks_per_nvlink_domain. Runs without GPUs: the domain logic is tested on the fixtures in tests/fixtures/."""

from __future__ import annotations

import json
import os

import pytest

import hybrid_ep
from hybrid_ep import topology as topo_mod

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(autouse=True)
def no_topo_env(monkeypatch):
    monkeypatch.delenv("HYBRID_EP_TOPO_FILE", raising=False)
    monkeypatch.delenv("HYBRID_EP_TOPO_DUMP_FILE", raising=False)


@pytest.mark.parametrize(
    "name, domains",
    [
        ("topo_h200x4.json", [[0, 1, 2, 3]]),
        ("topo_h200x4_probed.json", [[0, 1, 2, 3]]),  # probed by _C on 4 H200 GPUs (fabric info present)
        ("topo_h200x2.json", [[0, 1]]),
        ("topo_pcie_only.json", [[0], [1], [2], [3]]),
        ("topo_partial.json", [[0, 1], [2, 3]]),
    ],
)
def test_domains_of_fixtures(monkeypatch, name, domains):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture(name))
    topo = topo_mod.topology()
    assert topo["available"] is True
    assert topo["nvlink_domains"] == domains
    for gpu in topo["gpus"]:
        assert all(isinstance(k, int) for k in gpu["p2p"])


def test_raw_dump_converts_to_recorded_fixture():
    with open(fixture("nvml_raw_h200x4.json")) as f:
        converted = topo_mod.from_raw_nvml_dump(json.load(f))
    assert converted == topo_mod.load(fixture("topo_h200x4.json"))
    gpu = converted["gpus"][0]
    assert len(gpu["nvlinks"]) == 18
    assert {link["remote"] for link in gpu["nvlinks"]} == {"switch"}
    assert gpu["p2p"] == {1: "ok", 2: "ok", 3: "ok"}


def test_switch_without_p2p_is_no_domain():
    topo = topo_mod.load(fixture("topo_h200x4.json"))
    for gpu in topo["gpus"]:
        gpu["p2p"] = {other: "not_supported" for other in gpu["p2p"]}
    assert topo_mod.nvlink_domains(topo) == [[0], [1], [2], [3]]


def test_fabric_cliques_split_switch_domain():
    topo = topo_mod.load(fixture("topo_h200x4.json"))
    for gpu in topo["gpus"]:
        gpu["fabric"] = {"clique_id": gpu["index"] // 2, "cluster_uuid": "ab" * 16, "state": "completed"}
    assert topo_mod.nvlink_domains(topo) == [[0, 1], [2, 3]]


def test_dump_then_load_round_trip(monkeypatch, tmp_path):
    path = tmp_path / "topo.json"
    monkeypatch.setenv("HYBRID_EP_TOPO_DUMP_FILE", str(path))
    probed = topo_mod.topology()
    assert path.exists()
    monkeypatch.delenv("HYBRID_EP_TOPO_DUMP_FILE")
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", str(path))
    assert topo_mod.topology() == probed


def test_unreadable_topo_file_names_it(monkeypatch, tmp_path):
    path = tmp_path / "missing.json"
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", str(path))
    with pytest.raises(OSError, match="HYBRID_EP_TOPO_FILE"):
        topo_mod.topology()


@pytest.mark.skipif(not hybrid_ep.build_info()["features"]["nvml_topology"], reason="hybrid_ep._C without topology")
def test_bogus_library_is_reported_not_raised():
    topo = topo_mod.topology(library_name="libhybrid_ep_no_such_nvml.so")
    assert topo["available"] is False
    assert "libhybrid_ep_no_such_nvml.so" in topo["error"]
    assert topo["gpus"] == [] and topo["nvlink_domains"] == []
    raw = hybrid_ep._ext._C.probe_topology("libhybrid_ep_no_such_nvml.so")
    assert set(raw) == {"available", "error", "driver_version", "gpus"}


def test_extension_without_probe_is_reported(monkeypatch):
    monkeypatch.setattr(topo_mod, "_C", object())
    topo = topo_mod.topology()
    assert topo["available"] is False and "probe_topology" in topo["error"]
    monkeypatch.setattr(topo_mod, "_C", None)
    topo = topo_mod.topology()
    assert topo["available"] is False and "hybrid_ep._C" in topo["error"]


def test_real_probe_has_the_documented_keys():
    topo = topo_mod.topology()
    assert set(topo) >= {"available", "error", "driver_version", "gpus", "nvlink_domains"}
    if not topo["available"]:
        assert topo["error"]
    for gpu in topo["gpus"]:
        assert set(gpu) >= {"index", "name", "pci_bus_id", "nvlinks", "p2p", "fabric"}
        for link in gpu["nvlinks"]:
            assert link["remote"] in ("switch", "cpu", "unknown") or link["remote"].startswith("gpu:")


@pytest.mark.parametrize(
    "name, num_ranks, local, expected",
    [
        ("topo_h200x4.json", 8, [0], 4),
        ("topo_h200x4.json", 2, [0], 2),
        ("topo_partial.json", 4, [2], 2),
        ("topo_pcie_only.json", 4, [1], 1),
        ("topo_h200x2.json", 16, [], 2),
    ],
)
def test_ranks_per_nvlink_domain(monkeypatch, name, num_ranks, local, expected):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture(name))
    assert topo_mod.ranks_per_nvlink_domain(num_ranks, local_gpu_indices=local) == expected


def test_ranks_per_nvlink_domain_override_wins(monkeypatch):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture("topo_pcie_only.json"))
    assert topo_mod.ranks_per_nvlink_domain(8, local_gpu_indices=[0], override=8) == 8
    assert topo_mod.ranks_per_nvlink_domain(8, override=4) == 4


@pytest.mark.parametrize("override", [0, -2, 2.0, True])
def test_ranks_per_nvlink_domain_rejects_bad_override(override):
    with pytest.raises(ValueError, match="override"):
        topo_mod.ranks_per_nvlink_domain(8, override=override)


def test_ranks_per_nvlink_domain_rejects_bad_num_ranks():
    with pytest.raises(ValueError, match="num_ranks"):
        topo_mod.ranks_per_nvlink_domain(0, override=1)


def test_ranks_per_nvlink_domain_without_topology(monkeypatch):
    monkeypatch.setattr(topo_mod, "_C", None)
    assert topo_mod.ranks_per_nvlink_domain(8, local_gpu_indices=[0]) == 1
