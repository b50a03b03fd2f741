"""Tuned configs: results files written as the tuner writes them are what `Buffer.get_dispatch_config` /
`get_combine_config` return; unusable files warn, name the file and fall back to the built-in table."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from hybrid_ep import Buffer, Config, tuned
from hybrid_ep.config import recommended_config


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No tuned file of the machine leaks in: the cache points into tmp_path, the variable is unset, and
    Buffer.num_sms is restored."""
    monkeypatch.delenv("HYBRID_EP_TUNED_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    num_sms = Buffer.num_sms
    yield
    Buffer.num_sms = num_sms


def entry(num_sms: int, send: int, recv: int, gbps: float = 100.0) -> dict:
    return tuned.config_entry(Config(num_sms, send, recv), gbps, 500.0)


def results(num_ranks: int = 4) -> dict:
    """A results file: distinct chunk sizes per op and SM count, so a lookup shows where it read."""
    by_num_sms = {
        "dispatch_bf16": {20: entry(20, 10, 200), 24: entry(24, 12, 240, 150.0)},
        "dispatch_fp8": {24: entry(24, 14, 280)},
        "combine": {20: entry(20, 4, 96), 24: entry(24, 6, 192, 120.0)},
    }
    best = {
        "dispatch_bf16": entry(24, 12, 240, 150.0),
        "dispatch_fp8": entry(24, 14, 280),
        "combine": entry(24, 6, 192),
    }
    return tuned.make_results(num_ranks, best, by_num_sms, mode="quick", device="test")


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_round_trip_file_and_directory(tmp_path, monkeypatch) -> None:
    path = write(tmp_path / "results_ep4.json", results())
    for setting in (path, str(tmp_path)):
        monkeypatch.setenv("HYBRID_EP_TUNED_CONFIG", setting)
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(4) == Config(24, 12, 240)
        assert Buffer.get_combine_config(4) == Config(24, 6, 192)
        assert tuned.config_for("dispatch_fp8", 4, 24) == Config(24, 14, 280)
        Buffer.set_num_sms(20)
        assert Buffer.get_dispatch_config(4) == Config(20, 10, 200)
        # An SM count not tried: the nearest one's chunk sizes (the smaller of two as near), the SMs asked for.
        Buffer.set_num_sms(22)
        assert Buffer.get_dispatch_config(4) == Config(22, 10, 200)
        assert tuned.config_for("dispatch_fp8", 4, 22) == Config(22, 14, 280)
    # A directory without a file for 8 ranks: the built-in table, silently.
    assert Buffer.get_dispatch_config(8) == recommended_config("dispatch", 8, 22)


def test_per_user_cache_and_off(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache" / "hybrid_ep"
    cache.mkdir(parents=True)
    assert tuned.default_path(4) == str(cache / "results_ep4.json")
    Buffer.set_num_sms(24)
    assert Buffer.get_dispatch_config(4) == recommended_config("dispatch", 4, 24)
    write(cache / "results_ep4.json", results())
    assert Buffer.get_dispatch_config(4) == Config(24, 12, 240)
    monkeypatch.setenv("HYBRID_EP_TUNED_CONFIG", "off")
    assert Buffer.get_dispatch_config(4) == recommended_config("dispatch", 4, 24)


def test_results_file_is_read_again_when_it_changes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "results_ep4.json"
    monkeypatch.setenv("HYBRID_EP_TUNED_CONFIG", write(path, results()))
    Buffer.set_num_sms(24)
    assert Buffer.get_combine_config(4) == Config(24, 6, 192)
    data = results()
    data["by_num_sms"]["combine"]["24"] = entry(24, 8, 320)
    write(path, data)
    os.utime(path, ns=(1, 1))  # a new stamp, even on a file system with coarse times
    assert Buffer.get_combine_config(4) == Config(24, 8, 320)


def malformed_cases() -> list[tuple[str, object, str]]:
    bad_config = results()
    bad_config["best"]["combine"]["config"]["num_max_nvl_chunked_send_tokens"] = 999
    missing_op = results()
    del missing_op["best"]["dispatch_fp8"]
    other_format = results()
    other_format["format"] = "something/2"
    wrong_key = results()
    wrong_key["by_num_sms"]["combine"]["24"]["config"]["num_sms"] = 20
    return [
        ("not_json", "{ this is not json", "not JSON"),
        ("not_an_object", "[1, 2]", "expected a JSON object"),
        ("bad_config", bad_config, "num_max_nvl_chunked_send_tokens=999 must be smaller"),
        ("missing_op", missing_op, "best.dispatch_fp8 is missing"),
        ("other_format", other_format, "format is 'something/2'"),
        ("wrong_key", wrong_key, "by_num_sms.combine.24: config.num_sms is 20"),
        ("other_rank_count", results(num_ranks=8), "tuned for 8 ranks, not 4"),
    ]


@pytest.mark.parametrize("name,content,reason", malformed_cases(), ids=[c[0] for c in malformed_cases()])
def test_unusable_file_warns_naming_it_and_falls_back(tmp_path, monkeypatch, name, content, reason) -> None:
    path = write(tmp_path / f"{name}.json", content)
    monkeypatch.setenv("HYBRID_EP_TUNED_CONFIG", path)
    Buffer.set_num_sms(24)
    with pytest.warns(tuned.TunedConfigWarning) as caught:
        assert Buffer.get_dispatch_config(4) == recommended_config("dispatch", 4, 24)
    message = str(caught[0].message)
    assert path in message and reason in message and "built-in" in message, message
    # Once per version of the file: the next call falls back without warning again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Buffer.get_combine_config(4) == recommended_config("combine", 4, 24)


def test_missing_path_warns(tmp_path, monkeypatch) -> None:
    missing = str(tmp_path / "nowhere" / "results_ep4.json")
    monkeypatch.setenv("HYBRID_EP_TUNED_CONFIG", missing)
    with pytest.warns(tuned.TunedConfigWarning, match="HYBRID_EP_TUNED_CONFIG=.*no such file or directory"):
        assert Buffer.get_dispatch_config(4) == recommended_config("dispatch", 4, Buffer.num_sms)


def test_make_results_rejects_what_parse_rejects() -> None:
    with pytest.raises(ValueError, match="best.combine is missing"):
        tuned.make_results(4, {"dispatch_bf16": entry(24, 8, 128), "dispatch_fp8": entry(24, 8, 128)}, {})


def test_built_in_table_nearest_sm_count(monkeypatch) -> None:
    """The built-in table keys its chunk sizes by op, rank count and SM count: the nearest SM count serves (the smaller
    of two equally near), the SM count asked for is kept, FP8 dispatch has entries of its own, and rank counts not
    listed get the default chunks."""
    from hybrid_ep import config as config_module

    table = {
        "dispatch": {4: {8: (16, 128, 6, 128), 16: (12, 96, 6, 128), 24: (8, 32, 6, 128)}},
        "dispatch_fp8": {4: {16: (24, 256, 6, 128)}},
        "combine": {4: {8: (8, 64, 6, 128)}},
    }
    monkeypatch.setattr(config_module, "RECOMMENDED_CONFIGS", table)
    assert recommended_config("dispatch", 4, 8) == Config(8, 16, 128, 6, 128)
    assert recommended_config("dispatch", 4, 10) == Config(10, 16, 128, 6, 128)
    assert recommended_config("dispatch", 4, 12) == Config(12, 16, 128, 6, 128)  # a tie: the smaller SM count
    assert recommended_config("dispatch", 4, 14) == Config(14, 12, 96, 6, 128)
    assert recommended_config("dispatch", 4, 64) == Config(64, 8, 32, 6, 128)
    assert recommended_config("dispatch_fp8", 4, 2) == Config(2, 24, 256, 6, 128)
    assert recommended_config("combine", 4, 40) == Config(40, 8, 64, 6, 128)
    assert recommended_config("combine", 6, 20) == Config(20, *config_module.DEFAULT_CHUNKS)
    # Without a tuned file, the Buffer's lookups read the same table.
    Buffer.set_num_sms(22)
    assert Buffer.get_dispatch_config(4) == Config(22, 8, 32, 6, 128)
    assert tuned.config_for("dispatch_fp8", 4, 22) == Config(22, 24, 256, 6, 128)
    with pytest.raises(ValueError, match="op='dispatch_bf16': expected one of 'dispatch', 'dispatch_fp8', 'combine'"):
        recommended_config("dispatch_bf16", 4, 8)
    with pytest.raises(ValueError, match="num_sms=0 must be a positive int"):
        recommended_config("dispatch", 4, 0)


def test_built_in_table_is_well_formed() -> None:
    """Every entry of the shipped table is a valid Config at its SM count, for every op."""
    from hybrid_ep.config import RECOMMENDED_CONFIGS

    assert set(RECOMMENDED_CONFIGS) == {"dispatch", "dispatch_fp8", "combine"} == set(tuned.LOOKUP_OPS)
    for op, by_ranks in RECOMMENDED_CONFIGS.items():
        for num_ranks, by_num_sms in by_ranks.items():
            assert by_num_sms, (op, num_ranks)
            for num_sms, chunks in by_num_sms.items():
                Config(num_sms, *chunks).validate()
                assert recommended_config(op, num_ranks, num_sms) == Config(num_sms, *chunks)
