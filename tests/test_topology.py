"""NVML topology: NVLink domains of recorded machines, the env-file round trip, no-NVML behaviour,
ranks_per_nvlink_domain and the ranks per domain a Buffer uses (num_nvl_ranks, HYBRID_EP_NUM_NVL_RANKS). Runs
without GPUs: the domain logic is tested on the fixtures in tests/fixtures/."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hybrid_ep
from hybrid_ep import buffer as buffer_mod
from hybrid_ep import reference
from hybrid_ep import topology as topo_mod

from distributed import ProcessGroupInfo, parallel_launch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(autouse=True)
def no_topo_env(monkeypatch):
    monkeypatch.delenv("HYBRID_EP_TOPO_FILE", raising=False)
    monkeypatch.delenv("HYBRID_EP_TOPO_DUMP_FILE", raising=False)
    monkeypatch.delenv("HYBRID_EP_NUM_NVL_RANKS", raising=False)


@pytest.mark.parametrize(
    "name, domains",
    [
        ("topo_h200x4.json", [[0, 1, 2, 3]]),
        ("topo_h200x4_probed.json", [[0, 1, 2, 3]]),  # probed by _C on 4 H200 GPUs (fabric info present)
        ("topo_h200x2.json", [[0, 1]]),
        ("topo_h200x2_probed.json", [[0, 1]]),  # probed by _C on 2 H200 GPUs (18 links, each to the switch)
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


@pytest.mark.parametrize(
    "name, group_size, expected",
    [
        ("topo_h200x4.json", 4, 4),
        ("topo_h200x4_probed.json", 4, 4),
        ("topo_h200x4.json", 2, 2),
        ("topo_h200x4.json", 8, 4),
        ("topo_h200x2.json", 4, 2),
        ("topo_h200x2_probed.json", 2, 2),
        ("topo_h200x2_probed.json", 4, 2),
        ("topo_pcie_only.json", 4, 1),
        ("topo_partial.json", 4, 2),
    ],
)
def test_nvl_ranks_for_group(monkeypatch, name, group_size, expected):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture(name))
    assert topo_mod.nvl_ranks_for_group(group_size, on_gpus=True) == expected
    assert topo_mod.nvl_ranks_for_group(group_size, on_gpus=False) == group_size  # no NVLink on the CPU


def test_nvl_ranks_for_group_without_topology_is_one_domain(monkeypatch):
    monkeypatch.setattr(topo_mod, "_C", None)
    assert topo_mod.nvl_ranks_for_group(8, on_gpus=True) == 8


def test_nvl_ranks_for_group_override(monkeypatch):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture("topo_pcie_only.json"))
    assert topo_mod.nvl_ranks_for_group(4, on_gpus=True, override=4) == 4
    assert topo_mod.nvl_ranks_for_group(4, on_gpus=True, override=8) == 4
    assert topo_mod.nvl_ranks_for_group(4, on_gpus=False, override=2) == 2
    with pytest.raises(ValueError, match="HYBRID_EP_NUM_NVL_RANKS"):
        topo_mod.nvl_ranks_for_group(8, on_gpus=True, override=3)
    with pytest.raises(ValueError, match="override"):
        topo_mod.nvl_ranks_for_group(8, on_gpus=True, override=0)
    with pytest.raises(ValueError, match="group_size"):
        topo_mod.nvl_ranks_for_group(0, on_gpus=True)


@pytest.mark.parametrize(
    "name, env, backend, num_nvl_bytes, expected",
    [
        ("topo_h200x4.json", None, "nccl", 1 << 20, 4),  # 4 GPUs on one NVSwitch: as before
        ("topo_h200x4.json", "2", "nccl", 0, 2),
        ("topo_pcie_only.json", None, "nccl", 0, 1),  # reference backend: no NVLink buffer, no limit
        ("topo_pcie_only.json", "4", "nccl", 1 << 20, 4),  # the override wins
        ("topo_pcie_only.json", None, "gloo", 1 << 20, 4),  # gloo ignores NVLink
        ("topo_partial.json", "1", "gloo", 0, 1),
    ],
)
def test_nvl_ranks_for_buffer(monkeypatch, name, env, backend, num_nvl_bytes, expected):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture(name))
    if env is not None:
        monkeypatch.setenv("HYBRID_EP_NUM_NVL_RANKS", env)
    assert buffer_mod.nvl_ranks_for_buffer(4, backend, num_nvl_bytes) == expected


@pytest.mark.parametrize("name, env", [("topo_pcie_only.json", None), ("topo_partial.json", None), (None, "2")])
def test_nvl_buffer_over_several_domains_is_rejected(monkeypatch, name, env):
    if name is not None:
        monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture(name))
    if env is not None:
        monkeypatch.setenv("HYBRID_EP_NUM_NVL_RANKS", env)
    with pytest.raises(NotImplementedError, match=r"num_nvl_ranks=\d.*HYBRID_EP_NUM_NVL_RANKS=4"):
        buffer_mod.nvl_ranks_for_buffer(4, "nccl", 1 << 20)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_num_nvl_ranks_env_names_it(monkeypatch, value):
    monkeypatch.setenv("HYBRID_EP_NUM_NVL_RANKS", value)
    with pytest.raises(ValueError, match="HYBRID_EP_NUM_NVL_RANKS"):
        buffer_mod.nvl_ranks_for_buffer(4, "gloo", 0)


def _gloo_buffer_domains(pg: ProcessGroupInfo, num_nvl_ranks: int) -> None:
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=1 << 20)
    assert (buffer.num_nvl_ranks, buffer.num_rdma_ranks) == (num_nvl_ranks, pg.world_size // num_nvl_ranks)
    num_experts = 4 * pg.world_size
    topk_idx = torch.randint(-1, num_experts, (32, 3), generator=torch.Generator().manual_seed(pg.rank))
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    expected = reference.get_dispatch_layout(topk_idx, num_experts, pg.world_size, num_nvl_ranks)
    assert torch.equal(per_rank, expected[0]) and torch.equal(per_expert, expected[2])
    assert torch.equal(in_rank, expected[3])
    if num_nvl_ranks == pg.world_size:
        assert per_rdma is None
    else:
        assert per_rdma.shape == (pg.world_size // num_nvl_ranks,) and torch.equal(per_rdma, expected[1])


def test_gloo_buffer_is_one_domain_whatever_the_topology(monkeypatch):
    monkeypatch.setenv("HYBRID_EP_TOPO_FILE", fixture("topo_pcie_only.json"))
    parallel_launch(2, _gloo_buffer_domains, 2)


def test_gloo_buffer_takes_the_override(monkeypatch):
    monkeypatch.setenv("HYBRID_EP_NUM_NVL_RANKS", "1")
    parallel_launch(2, _gloo_buffer_domains, 1)
