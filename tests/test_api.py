"""DeepEP v1 API parity (names, parameters, defaults), Config, events, build info and not-yet-implemented paths."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import hybrid_ep

from distributed import ProcessGroupInfo, parallel_launch

E = inspect.Parameter.empty
# DeepEP v1 (last upstream v1 release) method signatures: (name, default) after `self`.
DEEPEP_V1 = {
    "__init__": [
        ("group", None),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("use_fabric", False),
        ("explicitly_destroy", False),
        ("enable_shrink", False),
        ("comm", None),
    ],
    "get_dispatch_layout": [
        ("topk_idx", E),
        ("num_experts", E),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", E),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", E),
        ("handle", E),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "internode_dispatch": None,  # same as dispatch
    "internode_combine": None,  # same as combine
    "clean_low_latency_buffer": [("num_max_dispatch_tokens_per_rank", E), ("hidden", E), ("num_experts", E)],
    "low_latency_dispatch": [
        ("x", E),
        ("topk_idx", E),
        ("num_max_dispatch_tokens_per_rank", E),
        ("num_experts", E),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", E),
        ("topk_idx", E),
        ("topk_weights", E),
        ("handle", E),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "get_next_low_latency_combine_buffer": [("handle", E)],
    "low_latency_update_mask_buffer": [("rank_to_mask", E), ("mask", False)],
    "low_latency_query_mask_buffer": [("mask_status", E)],
    "low_latency_clean_mask_buffer": [],
    "get_local_buffer_tensor": [("dtype", E), ("size", None), ("offset", 0), ("use_rdma_buffer", False)],
    "get_comm_stream": [],
    "destroy": [],
}
DEEPEP_V1["internode_dispatch"] = DEEPEP_V1["dispatch"]
DEEPEP_V1["internode_combine"] = DEEPEP_V1["combine"]
DEEPEP_V1_STATIC = {
    "set_num_sms": [("new_num_sms", E)],
    "is_sm90_compiled": [],
    "capture": [],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", E),
        ("hidden", E),
        ("num_ranks", E),
        ("num_experts", E),
    ],
    "get_dispatch_config": [("num_ranks", E)],
    "get_combine_config": [("num_ranks", E)],
}


def _positional(fn) -> list[tuple[str, object]]:
    params = inspect.signature(fn).parameters.values()
    return [
        (p.name, p.default)
        for p in params
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
    ]


@pytest.mark.parametrize("name", sorted(DEEPEP_V1))
def test_method_signature_matches_deepep_v1(name: str) -> None:
    assert _positional(getattr(hybrid_ep.Buffer, name)) == DEEPEP_V1[name]


@pytest.mark.parametrize("name", sorted(DEEPEP_V1_STATIC))
def test_static_signature_matches_deepep_v1(name: str) -> None:
    assert isinstance(inspect.getattr_static(hybrid_ep.Buffer, name), staticmethod)
    assert _positional(getattr(hybrid_ep.Buffer, name)) == DEEPEP_V1_STATIC[name]


def test_module_exports_like_deep_ep() -> None:
    import hybrid_ep as deep_ep

    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert hasattr(deep_ep, name)
    assert deep_ep.topk_idx_t is torch.int64
    assert hybrid_ep.Buffer.num_sms == 20
    assert [p.name for p in inspect.signature(hybrid_ep.Config).parameters.values()] == [
        "num_sms",
        "num_max_nvl_chunked_send_tokens",
        "num_max_nvl_chunked_recv_tokens",
        "num_max_rdma_chunked_send_tokens",
        "num_max_rdma_chunked_recv_tokens",
    ]
    assert [p.name for p in inspect.signature(hybrid_ep.EventOverlap).parameters.values()] == ["event", "extra_tensors"]


def test_config_validation_names_every_bad_value() -> None:
    with pytest.raises(ValueError) as info:
        hybrid_ep.Config(num_sms=0, num_max_nvl_chunked_send_tokens=-1)
    assert "num_sms=0" in str(info.value) and "num_max_nvl_chunked_send_tokens=-1" in str(info.value)
    with pytest.raises(ValueError, match=r"num_sms=7 must be even"):
        hybrid_ep.Config(7)
    with pytest.raises(ValueError, match=r"num_max_nvl_chunked_send_tokens=256 must be smaller"):
        hybrid_ep.Config(20, 256, 256)
    with pytest.raises(ValueError, match=r"at most half"):
        hybrid_ep.Config(20, 6, 256, 128, 128)
    with pytest.raises(ValueError, match=r"num_sms=True must be a positive int"):
        hybrid_ep.Config(True)
    config = hybrid_ep.Config(24, 8, 256, 6, 125)
    assert config.num_max_rdma_chunked_recv_tokens == 126  # rounded up to the send chunk, as DeepEP does
    assert config.num_channels == 12


def test_size_hints() -> None:
    config = hybrid_ep.Config(24, 8, 256)
    hint_4 = config.get_nvl_buffer_size_hint(7168 * 2, 4)
    hint_8 = config.get_nvl_buffer_size_hint(7168 * 2, 8)
    # Each of 12 channels x 4 peers holds a 256-token ring of rows of at least hidden_bytes.
    assert hint_4 % 128 == 0 and hint_4 >= 12 * 4 * 256 * 7168 * 2 and hint_8 > hint_4
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    with pytest.raises(ValueError, match="hidden_bytes"):
        config.get_nvl_buffer_size_hint(0, 4)
    # The hint is the kernels' own bound (csrc/device/layout.cuh ring_bytes_hint), where the extension is built.
    if hybrid_ep.has_extension():
        from hybrid_ep import _ext

        runtime = _ext.require_extension("the ring size bound").NvlRuntime
        for num_sms, num_ranks, num_slots, hidden in ((24, 4, 256, 7168), (8, 2, 32, 2048), (20, 8, 64, 4096)):
            expected = hybrid_ep.Config(num_sms, 4, num_slots).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
            assert runtime.ring_bytes_hint(hidden * 2, num_ranks, num_sms, num_slots) == expected
    ll = hybrid_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 4, 256)
    # Receive area alone: every expert can get 128 BF16 rows of 7168 channels.
    assert ll % 128 == 0 and ll >= 2 * 256 * 128 * 7168 * 2
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        hybrid_ep.Buffer.get_low_latency_rdma_size_hint(128, 0, 4, 256)


def test_set_num_sms_and_recommended_configs() -> None:
    old = hybrid_ep.Buffer.num_sms
    try:
        hybrid_ep.Buffer.set_num_sms(24)
        assert hybrid_ep.Buffer.get_dispatch_config(4).num_sms == 24
        assert hybrid_ep.Buffer.get_combine_config(3).num_sms == 24
        with pytest.raises(ValueError, match="new_num_sms=23 must be even"):
            hybrid_ep.Buffer.set_num_sms(23)
        assert hybrid_ep.Buffer.num_sms == 24
    finally:
        hybrid_ep.Buffer.num_sms = old


def test_event_overlap() -> None:
    overlap = hybrid_ep.EventOverlap()
    with pytest.raises(RuntimeError, match="no event to wait on"):
        overlap.current_stream_wait()
    with overlap:  # nothing to wait for
        pass
    captured = hybrid_ep.Buffer.capture()
    captured.current_stream_wait()
    keep = torch.zeros(3)
    assert hybrid_ep.EventOverlap(None, (keep,)).extra_tensors[0] is keep


def test_build_info_reports_extension_state() -> None:
    info = hybrid_ep.build_info()
    assert info["version"] == hybrid_ep.__version__
    assert set(info["features"]) >= {"layout", "intranode", "internode", "low_latency"}
    assert info["extension"] == hybrid_ep.has_extension()
    if info["extension"]:
        assert info["features"]["layout"] is True and "9.0" in info["arch_list"]
    else:
        assert info["error"]


def test_missing_extension_message() -> None:
    """Without _C, import works, build_info says why, and a kernel call says how to build."""
    code = (
        "import sys, types\n"
        "sys.modules['hybrid_ep._C'] = None\n"  # makes `import hybrid_ep._C` fail
        "import hybrid_ep\n"
        "info = hybrid_ep.build_info()\n"
        "assert info['extension'] is False and info['error'], info\n"
        "from hybrid_ep import _ext\n"
        "try:\n"
        "    _ext.require_extension('get_dispatch_layout on CUDA tensors')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e) and 'get_dispatch_layout' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_env_flag_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_ep import envs

    monkeypatch.setenv("HYBRID_EP_CHECK_INPUTS", "0")
    assert envs.check_inputs() is False
    monkeypatch.setenv("HYBRID_EP_CHECK_INPUTS", "maybe")
    with pytest.raises(ValueError, match="HYBRID_EP_CHECK_INPUTS='maybe'"):
        envs.check_inputs()


def test_output_arena_bytes_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_ep import envs

    monkeypatch.delenv("HYBRID_EP_OUTPUT_ARENA_BYTES", raising=False)
    assert envs.output_arena_bytes() == 1 << 30
    monkeypatch.setenv("HYBRID_EP_OUTPUT_ARENA_BYTES", "0")
    assert envs.output_arena_bytes() == 0
    monkeypatch.setenv("HYBRID_EP_OUTPUT_ARENA_BYTES", "-1")
    with pytest.raises(ValueError, match="HYBRID_EP_OUTPUT_ARENA_BYTES=-1: must be >= 0"):
        envs.output_arena_bytes()
    monkeypatch.setenv("HYBRID_EP_OUTPUT_ARENA_BYTES", "1GiB")
    with pytest.raises(ValueError, match="HYBRID_EP_OUTPUT_ARENA_BYTES='1GiB': expected an integer"):
        envs.output_arena_bytes()


def run_not_implemented(pg: ProcessGroupInfo) -> None:
    buffer = hybrid_ep.Buffer(pg.group, low_latency_mode=True, num_rdma_bytes=1 << 20, explicitly_destroy=True)
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    idx = torch.zeros(2, 1, dtype=torch.int64)
    calls = {
        "low_latency_dispatch": lambda: buffer.low_latency_dispatch(x, idx, 128, 2),
        "low_latency_combine": lambda: buffer.low_latency_combine(x, idx, idx.float(), ()),
        "clean_low_latency_buffer": lambda: buffer.clean_low_latency_buffer(128, 128, 2),
        "get_next_low_latency_combine_buffer": lambda: buffer.get_next_low_latency_combine_buffer(()),
        "low_latency_update_mask_buffer": lambda: buffer.low_latency_update_mask_buffer(0),
        "low_latency_query_mask_buffer": lambda: buffer.low_latency_query_mask_buffer(idx),
        "low_latency_clean_mask_buffer": lambda: buffer.low_latency_clean_mask_buffer(),
        "internode_dispatch": lambda: buffer.internode_dispatch(x),
        "internode_combine": lambda: buffer.internode_combine(x, ()),
        "get_local_buffer_tensor": lambda: buffer.get_local_buffer_tensor(torch.bfloat16, use_rdma_buffer=True),
    }
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match=name):
            call()
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        buffer.get_comm_stream()
    with pytest.raises(RuntimeError, match="get_local_buffer_tensor needs an NVLink buffer"):
        buffer.get_local_buffer_tensor(torch.bfloat16)
    buffer.destroy()
    with pytest.raises(RuntimeError, match="was destroyed"):
        buffer.get_dispatch_layout(idx, 2)
    other = hybrid_ep.Buffer(pg.group)
    with pytest.raises(RuntimeError, match="explicitly_destroy=True"):
        other.destroy()
    for kwargs, pattern in (
        (dict(num_nvl_bytes=100), "num_nvl_bytes=100 must be a multiple of 128"),
        (dict(num_rdma_bytes=-128), "num_rdma_bytes must be >= 0"),
    ):
        with pytest.raises(ValueError, match=pattern):
            hybrid_ep.Buffer(pg.group, **kwargs)
    with pytest.raises(ValueError, match="needs a process group"):
        hybrid_ep.Buffer()
    with pytest.raises(NotImplementedError, match="comm="):
        hybrid_ep.Buffer(comm=object())


def test_not_implemented_features_name_themselves() -> None:
    parallel_launch(1, run_not_implemented)


def test_combine_pull_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_ep import envs

    monkeypatch.delenv("HYBRID_EP_COMBINE_PULL", raising=False)
    assert envs.combine_pull() is True
    monkeypatch.setenv("HYBRID_EP_COMBINE_PULL", "off")
    assert envs.combine_pull() is False
    monkeypatch.setenv("HYBRID_EP_COMBINE_PULL", "2")
    with pytest.raises(ValueError, match="HYBRID_EP_COMBINE_PULL='2'"):
        envs.combine_pull()


def run_new_combine_input(pg: ProcessGroupInfo) -> None:
    """`new_combine_input` gives a tensor combine accepts for the handle (a plain one on the CPU), and rejects bad
    arguments by name, leaving the Buffer usable."""
    buffer = hybrid_ep.Buffer(pg.group, explicitly_destroy=True)
    topk_idx = torch.tensor([[0, 1], [1, -1], [-1, -1]], dtype=torch.int64)
    x = torch.arange(3 * 16, dtype=torch.float32).view(3, 16).to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 2)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    y = buffer.new_combine_input(handle, 16)
    assert y.shape == recv_x.shape and y.dtype == torch.bfloat16 and y.device == recv_x.device
    for name, call, error in (
        ("hidden", lambda: buffer.new_combine_input(handle, 0), ValueError),
        ("hidden", lambda: buffer.new_combine_input(handle, 16.0), TypeError),
        ("handle", lambda: buffer.new_combine_input((1, 2), 16), ValueError),
    ):
        with pytest.raises(error, match=name):
            call()
    y.copy_(recv_x)
    combined, _, _ = buffer.combine(y, handle)
    assert torch.equal(combined, x * (in_rank.sum(1, keepdim=True) > 0))
    buffer.destroy()


def test_new_combine_input_on_cpu() -> None:
    parallel_launch(1, run_new_combine_input)
