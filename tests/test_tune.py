"""`python -m hybrid_ep.tune` end to end on 2 gloo ranks (the reference path): progress, the results file and the
lookup of it, the per-point log, --install; and the exit status and message of bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hybrid_ep
from hybrid_ep import Buffer, Config, tune, tuned


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No tuned file of the machine leaks in, and Buffer.num_sms is restored."""
    monkeypatch.delenv("HYBRID_EP_TUNED_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    num_sms = Buffer.num_sms
    yield
    Buffer.num_sms = num_sms


def test_tune_cli_on_gloo(tmp_path) -> None:
    """The tuner as a user runs it, on the reference path: progress on stderr, the results file (which the lookup
    then returns), the per-point log, and --install into the per-user cache."""
    out = tmp_path / "out"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("HYBRID_EP_TUNED_CONFIG", None)
    # The package the tests import, whether installed or the source tree.
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(hybrid_ep.__file__)), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_ep.tune", "--num-processes", "2", "--backend", "gloo", "--mode", "quick",
         "--output-dir", str(out), "--install"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for op in tuned.OPS:
        assert f"[tune] {op}" in proc.stderr and f"/{len(tune.CPU_SWEEP.points())}" in proc.stderr
    table = tuned.load(str(out / "results_ep2.json"))
    assert table.num_ranks == 2 and set(table.best) == set(tuned.OPS)
    assert set(table.by_num_sms["combine"]) == set(tune.CPU_SWEEP.num_sms)
    records = [json.loads(line) for line in (out / "tune_ep2.jsonl").read_text().splitlines()]
    assert len(records) == 3 * len(tune.CPU_SWEEP.points())
    assert all(r["ok"] and r["gbps"] > 0 and r["time_us"] > 0 and r["bytes"] > 0 for r in records), records
    installed = tmp_path / "cache" / "hybrid_ep" / "results_ep2.json"
    assert installed.read_text() == (out / "results_ep2.json").read_text()

    data = json.loads(installed.read_text())
    Buffer.set_num_sms(4)
    want = Config(**data["by_num_sms"]["dispatch_bf16"]["4"]["config"])
    assert Buffer.get_dispatch_config(2) == want


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--mode", "slow"], "--mode"),
        (["--num-processes", "2", "--num-experts", "7"], "--num-experts"),
        (["--num-processes", "0"], "--num-processes"),
        (["--hidden-size", "200"], "--hidden-size"),
        (["--num-topk", "33", "--num-experts", "64"], "--num-topk"),
        (["--time-budget", "0"], "--time-budget"),
        (["--routing", "hot"], "--routing"),
    ],
)
def test_tune_rejects_bad_arguments(capsys, argv, named) -> None:
    with pytest.raises(SystemExit) as exc:
        tune.parse_args(["--backend", "gloo", *argv])
    assert exc.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err
