"""`python -m hybrid_ep.bench`: a tiny run on 2 gloo ranks (the reference path) writes the CloudAI-style run
directory (results.json rows, token matrices, a trace per rank, the plot or a warning); on 2 GPUs `--ahead` times
the calls that never wait on the host enqueued behind a sleep; low-latency mode and bad arguments exit 2 with a
message naming the argument."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import hybrid_ep
from hybrid_ep import bench

from distributed import requires_gpus

# The fields every results.json row carries (docs/bench.md), CloudAI's report columns among them.
ROW_FIELDS = {
    "operation", "data_type", "num_ranks", "num_tokens", "hidden", "num_experts", "num_topk", "routing", "num_sms",
    "config", "deepep_time", "time_min_us", "time_max_us", "time_median_us", "ahead", "bytes", "global_bw",
    "simple_nvl_bw", "simple_rdma_bw", "bus_bw_avg", "bus_bw_min", "bus_bw_max", "backend", "kernels",
}  # fmt: skip
# How CloudAI's DeepEP report reads the run directory's name.
CLOUDAI_DIR = re.compile(r"benchmark_(\d+)_ranks_(.+?)_(low_latency|standard)")


def read_matrix(path: str, kind: type) -> list[list]:
    with open(path) as f:
        return [[kind(v) for v in line.split()] for line in f.read().splitlines()]


def bench_env() -> dict:
    """Returns: the environment of a benchmark subprocess: the built-in configs, and the package the tests import
    (installed or the source tree) first on the path."""
    env = dict(os.environ, HYBRID_EP_TUNED_CONFIG="off")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(hybrid_ep.__file__)), env.get("PYTHONPATH", "")]
    )
    return env


def test_bench_cli_on_gloo(tmp_path) -> None:
    env = bench_env()
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_ep.bench", "--num-processes", "2", "--backend", "gloo", "--tokens", "64",
         "--hidden-size", "128", "--num-topk", "4", "--num-experts", "8", "--data-type", "fp8", "--num-sms", "2,4",
         "--num-warmups", "1", "--num-iterations", "2", "--profile", "--ahead", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "global_bw" in proc.stdout  # what CloudAI's success check looks for
    (run_dir,) = glob.glob(str(tmp_path / "out" / "benchmark_*"))
    match = CLOUDAI_DIR.fullmatch(os.path.basename(run_dir))
    assert match and match.group(1) == "2" and match.group(3) == "standard", run_dir

    rows = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert isinstance(rows, list)  # CloudAI's report skips anything else
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["num_tokens"] == 64 and row["hidden"] == 128 and row["num_ranks"] == 2
        assert row["simple_rdma_bw"] == 0.0
        assert row["deepep_time"] > 0 and row["global_bw"] > 0 and row["simple_nvl_bw"] > 0
        assert row["bus_bw_min"] <= row["bus_bw_avg"] <= row["bus_bw_max"]
        assert row["time_min_us"] <= row["time_median_us"] <= row["time_max_us"]
        assert row["ahead"] is False  # no GPU sleep to enqueue behind on the CPU
    ops = [(r["operation"], r["data_type"], r["num_sms"]) for r in rows]
    for num_sms in (2, 4):
        assert ("dispatch", "fp8", num_sms) in ops and ("dispatch_with_layout", "fp8", num_sms) in ops
        assert ("combine", "bfloat16", num_sms) in ops
    assert ("all_to_all_single", "fp8", None) in ops and ("all_to_all_single", "bfloat16", None) in ops

    matrix = read_matrix(os.path.join(run_dir, "token_matrix.txt"), int)
    assert len(matrix) == 2 and all(len(r) == 2 for r in matrix)
    assert all(0 <= v <= 64 for r in matrix for v in r)
    received = matrix[0][0] + matrix[1][0]  # column 0: what rank 0 receives
    fp8_row_bytes = 128 + 4
    for row in rows:
        width = fp8_row_bytes if row["data_type"] == "fp8" else 128 * 2
        assert row["bytes"] == received * width, row
    matrix_kb = read_matrix(os.path.join(run_dir, "token_matrix_kb.txt"), float)
    for r in range(2):
        for c in range(2):
            assert matrix_kb[r][c] == pytest.approx(matrix[r][c] * fp8_row_bytes / 1024, abs=0.01)

    for rank in range(2):
        with open(os.path.join(run_dir, f"trace_rank{rank}.json")) as f:
            assert "traceEvents" in json.load(f)
    try:
        import matplotlib  # noqa: F401

        assert os.path.exists(os.path.join(run_dir, "bandwidth.png"))
    except ImportError:
        assert "matplotlib is not installed" in proc.stderr


def test_plot_without_matplotlib_warns_and_goes_on(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of matplotlib now fails
    assert bench.plot_bandwidth(str(tmp_path), [], "title") is None
    assert "warning: matplotlib is not installed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_low_latency_mode_exits_2(capsys) -> None:
    assert bench.main(["--mode", "low_latency"]) == 2
    assert "--mode low_latency is not implemented yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--mode", "fast"], "--mode"),
        (["--num-processes", "2", "--num-experts", "7"], "--num-experts"),
        (["--num-topk", "9", "--num-experts", "8"], "--num-topk"),
        (["--num-topk", "0"], "--num-topk"),
        (["--data-type", "fp8", "--hidden-size", "200"], "--hidden-size"),
        (["--hidden-size", "100"], "--hidden-size"),
        (["--data-type", "int4"], "--data-type"),
        (["--tokens", "0"], "--tokens"),
        (["--num-sms", "3"], "--num-sms"),
        (["--num-sms", "8,x"], "--num-sms"),
        (["--num-iterations", "0"], "--num-iterations"),
        (["--num-warmups", "-1"], "--num-warmups"),
        (["--routing", "skewed:1.5"], "--routing"),
        (["--tokens", "many"], "--tokens"),
    ],
)
def test_bench_rejects_bad_arguments(capsys, argv, named) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--backend", "gloo", *argv])
    assert exc.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_rejected(tmp_path, capsys) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--backend", "gloo", "--output-dir", str(path)])
    assert exc.value.code == 2 and "argument --output-dir" in capsys.readouterr().err


def test_sms_list_and_routing_parsing() -> None:
    assert bench.parse_sms_list(["8,16", "24", "16"]) == [8, 16, 24]
    assert bench.parse_routing("uniform") == 0.0 and bench.parse_routing("skewed:0.8") == 0.8
    with pytest.raises(ValueError, match="must be even"):
        bench.parse_sms_list(["7"])


def test_skewed_routing_sends_more_to_rank_0() -> None:
    import torch

    cpu = torch.device("cpu")
    uniform = bench.make_routing(512, 32, 4, 4, "uniform", 0, cpu)
    skewed = bench.make_routing(512, 32, 4, 4, "skewed:0.8", 0, cpu)
    # Choices of rank 0's experts: a quarter of them when uniform; 0.8 + 0.2 / 4 of them when skewed:0.8.
    share_of_rank_0 = lambda idx: float((idx < 8).float().mean())
    assert share_of_rank_0(uniform) == pytest.approx(0.25, abs=0.05)
    assert share_of_rank_0(skewed) == pytest.approx(0.85, abs=0.05)
    assert skewed.shape == (512, 4) and skewed.dtype == torch.int64


def test_progress_bar_in_a_log(capsys) -> None:
    bar = bench.ProgressBar("[x]", 20)
    for _ in range(20):
        bar.update(note="n")
    lines = capsys.readouterr().err.splitlines()
    # Not a terminal: the first step, then one line per tenth.
    assert len(lines) == 11 and lines[-1].startswith("[x] [" + "#" * 30 + "] 20/20")


@requires_gpus(2)
def test_bench_ahead_on_gpus(tmp_path) -> None:
    """--ahead: cached dispatch, combine and the all-to-all are timed behind a GPU sleep and say so; dispatch with
    layout (which waits for its counts on the host) is timed as usual."""
    env = bench_env()
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_ep.bench", "--num-processes", "2", "--tokens", "128", "--num-sms", "8",
         "--num-warmups", "5", "--num-iterations", "20", "--ahead", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = glob.glob(str(tmp_path / "out" / "benchmark_*"))
    rows = json.loads(open(os.path.join(run_dir, "results.json")).read())
    ahead = {(r["operation"], r["data_type"]): r["ahead"] for r in rows}
    assert ahead == {
        ("dispatch", "bfloat16"): True,
        ("dispatch_with_layout", "bfloat16"): False,
        ("combine", "bfloat16"): True,
        ("all_to_all_single", "bfloat16"): True,
    }, ahead
    for row in rows:
        assert 0 < row["time_min_us"] <= row["time_median_us"] <= row["time_max_us"], row
