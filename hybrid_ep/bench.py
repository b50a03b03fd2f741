"""`python -m hybrid_ep.bench`: the normal-mode benchmark, with the command line and outputs of CloudAI's DeepEP
workload (docs/bench.md defines every figure).

    python -m hybrid_ep.bench --num-processes 4 --tokens 4096 --hidden-size 7168 --num-topk 8 --num-experts 256 \
        --data-type bfloat16 --num-sms 8,16,24 --output-dir results

At each SM count it times dispatch (cached handle, and with layout) in the chosen data type and combine in BF16,
then an `all_to_all_single` of the same rows on the same process group (NCCL on GPUs). Into
`<output-dir>/benchmark_<N>_ranks_<time>_standard/` it writes `results.json` (a list of rows, one per operation and
SM count), `token_matrix.txt` / `token_matrix_kb.txt` and `bandwidth.png`, with `--profile` a trace per rank. On a
machine without GPUs it runs the pure-PyTorch reference over gloo at small sizes.

The module also holds what the benchmark and the tuner (`hybrid_ep.tune`) share: timing, routing, inputs, buffer
sizing, the progress bar and the checks of the workload arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import _ext, launch, tuned
from .buffer import Buffer
from .checks import FP8_SCALE_BLOCK
from .config import NUM_MAX_TOPK, Config
from .version import __version__

# Bytes zeroed before every timed call on a GPU, to flush the L2 cache (50 MiB on H100/H200).
FLUSH_BYTES = 256 << 20
DATA_TYPES = ("bfloat16", "fp8")
# With --ahead: GPU clock cycles of sleep per timed call (about 1 ms at 2 GHz) put before the timed calls, so the host
# has enqueued all of them before the GPU starts the first.
AHEAD_SLEEP_CYCLES_PER_CALL = 2_000_000
# Exit status of a run stopped by a bad argument or an unsupported mode (argparse's own).
EXIT_USAGE = 2


# ---------------------------------------------------------------------------------------------------------------
# Shared by the benchmark and the tuner


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: mean, fastest, slowest and median of the timed calls."""

    mean_s: float
    min_s: float
    max_s: float
    median_s: float


def time_calls(
    fn: Callable[[], Any], device: torch.device, num_warmups: int, num_tests: int, ahead: bool = False
) -> Timing:
    """Times `fn` as DeepEP's benchmarks do: `num_warmups` untimed calls, then `num_tests` calls, each after an L2
    flush, each between two CUDA events on the current stream. On the CPU, wall-clock per call. With `ahead` (GPUs;
    for calls that never wait on the host), a GPU sleep goes first and the host enqueues every timed call behind it,
    so the times are the GPU's alone, without the gaps of a host slower than the GPU.

    Returns: a Timing in seconds.
    """
    for _ in range(num_warmups):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        torch.cuda.synchronize(device)
        if ahead:
            torch.cuda._sleep(AHEAD_SLEEP_CYCLES_PER_CALL * num_tests)
        for start, end in zip(starts, ends):
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    else:
        for _ in range(num_tests):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return Timing(sum(times) / len(times), min(times), max(times), statistics.median(times))


@dataclasses.dataclass(frozen=True)
class OverlapTiming:
    """Mean seconds of a dispatch and a GEMM alone, one after the other, and overlapped on two streams."""

    dispatch_s: float
    gemm_s: float
    sequential_s: float
    overlapped_s: float

    @property
    def hidden_fraction(self) -> float:
        """Returns: the share of the shorter operation hidden behind the longer one (1.0: fully hidden)."""
        shorter = min(self.dispatch_s, self.gemm_s)
        return (self.dispatch_s + self.gemm_s - self.overlapped_s) / shorter if shorter > 0 else 0.0


def time_overlap(
    buffer: Buffer,
    dispatch: Callable[..., tuple],
    gemm: Callable[[], Any],
    device: torch.device,
    num_warmups: int,
    num_tests: int,
) -> OverlapTiming:
    """Times `dispatch` (called with `previous_event=` and `async_finish=`, returning DeepEP's tuple whose last
    entry is the EventOverlap) and `gemm` alone, back to back on the current stream, and overlapped: the dispatch
    runs on the Buffer's communication stream with `async_finish=True` while `gemm` runs on the current stream,
    which then waits for the dispatch's event.

    Returns: an OverlapTiming.
    """
    timing = dict(device=device, num_warmups=num_warmups, num_tests=num_tests)

    def sequential() -> None:
        dispatch(previous_event=None, async_finish=False)
        gemm()

    def overlapped() -> None:
        outputs = dispatch(previous_event=buffer.capture(), async_finish=True)
        gemm()
        outputs[-1].current_stream_wait()

    return OverlapTiming(
        dispatch_s=time_calls(lambda: dispatch(previous_event=None, async_finish=False), **timing).mean_s,
        gemm_s=time_calls(gemm, **timing).mean_s,
        sequential_s=time_calls(sequential, **timing).mean_s,
        overlapped_s=time_calls(overlapped, **timing).mean_s,
    )


def row_bytes(hidden: int, data_type: str) -> int:
    """Returns: bytes of one dispatched row as DeepEP counts them: BF16 `hidden * 2`; FP8 `hidden` plus one fp32
    scale per 128 channels."""
    if data_type == "fp8":
        return hidden + hidden // FP8_SCALE_BLOCK * 4
    return hidden * 2


def parse_routing(text: str) -> float:
    """Parses `uniform` or `skewed:F` (0 <= F <= 1). Returns: F, 0.0 for uniform. Raises ValueError."""
    if text == "uniform":
        return 0.0
    if text.startswith("skewed:"):
        try:
            fraction = float(text.split(":", 1)[1])
        except ValueError:
            fraction = math.nan
        if 0.0 <= fraction <= 1.0:
            return fraction
    raise ValueError(f"{text!r}: expected uniform or skewed:F with F a fraction in [0, 1], e.g. skewed:0.8")


def make_routing(
    num_tokens: int, num_experts: int, num_topk: int, num_ranks: int, routing: str, rank: int, device: torch.device
) -> torch.Tensor:
    """Top-k expert choices of this rank's tokens, seeded by rank.

    uniform: DeepEP's `topk(|randn| + 1)`, distinct experts, every expert equally likely. skewed:F: a fraction F of
    the tokens picks the experts of rank 0 first (as many of its top-k as rank 0 holds), so rank 0 is the hot
    receiver.

    Returns: `[num_tokens, num_topk]` torch.int64 on `device`.
    """
    hot_fraction = parse_routing(routing)
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    scores = torch.randn(num_tokens, num_experts, generator=g, device=device).abs() + 1
    if hot_fraction > 0:
        hot = torch.rand(num_tokens, 1, generator=g, device=device) < hot_fraction
        scores[:, : num_experts // num_ranks] += hot.to(scores.dtype) * 100
    return scores.topk(num_topk, dim=1).indices.to(torch.int64).contiguous()


@dataclasses.dataclass
class Inputs:
    """One rank's benchmark inputs.

    Arguments:
        x: `[num_tokens, hidden]` torch.bfloat16.
        x_fp8: `(x [num_tokens, hidden] torch.float8_e4m3fn, scales [num_tokens, hidden / 128] torch.float32)`, or
            None when hidden is not a multiple of 128.
        topk_idx: `[num_tokens, num_topk]` torch.int64.
        topk_weights: `[num_tokens, num_topk]` torch.float32.
    """

    x: torch.Tensor
    x_fp8: Optional[tuple[torch.Tensor, torch.Tensor]]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def make_inputs(args: argparse.Namespace, rank: int, num_ranks: int, device: torch.device) -> Inputs:
    """Returns: the Inputs of the workload in `args` (tokens, hidden_size, num_experts, num_topk, routing)."""
    topk_idx = make_routing(args.tokens, args.num_experts, args.num_topk, num_ranks, args.routing, rank, device)
    g = torch.Generator(device=device).manual_seed(2000 + rank)
    x = torch.randn(args.tokens, args.hidden_size, generator=g, device=device).to(torch.bfloat16)
    topk_weights = torch.rand(args.tokens, args.num_topk, generator=g, device=device)
    x_fp8 = None
    if args.hidden_size % FP8_SCALE_BLOCK == 0:
        scales = torch.ones(args.tokens, args.hidden_size // FP8_SCALE_BLOCK, device=device)
        x_fp8 = (x.float().clamp(-448, 448).to(torch.float8_e4m3fn), scales)
    return Inputs(x, x_fp8, topk_idx, topk_weights)


def dispatch_layout(buffer: Buffer, inputs: Inputs, num_experts: int) -> dict[str, Any]:
    """Returns: the keyword arguments of a non-cached `buffer.dispatch` of `inputs` (layout from
    `buffer.get_dispatch_layout`, top-k indices and weights)."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, num_experts)
    return dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
    )


def nvl_bytes_for(configs: Sequence[Config], hidden: int, num_ranks: int) -> int:
    """Returns: the NVLink buffer bytes that fit every config in `configs` at rows of `hidden` BF16 channels (the
    largest `Config.get_nvl_buffer_size_hint`)."""
    return max(config.get_nvl_buffer_size_hint(hidden * 2, num_ranks) for config in configs)


def uses_kernels(device: torch.device) -> bool:
    """Returns: whether dispatch and combine run the NVLink kernels on `device` (a GPU, and the extension holds
    them), rather than the pure-PyTorch reference."""
    return device.type == "cuda" and bool(_ext.build_info()["features"].get("intranode"))


def gather_floats(pg: launch.ProcessGroupInfo, value: float) -> list[float]:
    """Collective. Returns: `value` of every rank, in rank order."""
    mine = torch.tensor([value], dtype=torch.float64, device=pg.device)
    everyone = [torch.zeros_like(mine) for _ in range(pg.world_size)]
    dist.all_gather(everyone, mine, group=pg.group)
    return [float(v) for v in everyone]


def token_matrix(pg: launch.ProcessGroupInfo, num_tokens_per_rank: torch.Tensor) -> torch.Tensor:
    """Collective. Returns: `[num_ranks, num_ranks]` torch.int64 on the CPU: entry [i, j] is the number of tokens
    rank i sends to rank j (its own rows on the diagonal), from each rank's `num_tokens_per_rank`."""
    mine = num_tokens_per_rank.to(torch.int64).contiguous()
    everyone = [torch.zeros_like(mine) for _ in range(pg.world_size)]
    dist.all_gather(everyone, mine, group=pg.group)
    return torch.stack(everyone).cpu()


class ProgressBar:
    """A text progress bar on stderr: redrawn in place on a terminal, one line per tenth elsewhere (logs).

    Arguments:
        label: what is being counted.
        total: the count at completion.
        enabled: draw at all (rank 0 only draws).
    """

    WIDTH = 30

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.done, self.begin, self.last_tenth = 0, time.monotonic(), -1
        self.is_tty = sys.stderr.isatty()

    def update(self, n: int = 1, note: str = "") -> None:
        """Counts `n` more steps done; `note` (e.g. the best so far) is shown after the bar."""
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        tenth = self.done * 10 // self.total
        if not self.is_tty and tenth == self.last_tenth and self.done < self.total:
            return
        self.last_tenth = tenth
        filled = self.done * self.WIDTH // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {time.monotonic() - self.begin:.0f}s {note}"
        if self.is_tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self, note: str = "") -> None:
        """Completes the bar (a run stopped early shows where it stopped)."""
        if self.enabled and self.is_tty and self.done < self.total:
            sys.stderr.write("\n")
        if self.enabled and note:
            sys.stderr.write(f"{self.label}: {note}\n")
            sys.stderr.flush()


def add_workload_arguments(parser: argparse.ArgumentParser, cpu_tokens: int, cpu_hidden: int) -> None:
    """Adds the arguments that describe the run and its workload, shared by the benchmark and the tuner. Defaults
    left at None depend on the backend and are set by `check_workload_arguments`."""
    gpus = launch.num_gpus()
    parser.add_argument(
        "--num-processes",
        type=int,
        default=gpus if gpus > 0 else 2,
        help="ranks, one process per GPU (default: every GPU, or 2 CPU ranks without GPUs)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="auto: NCCL when there is a GPU per rank, else gloo with the pure-PyTorch reference on the CPU",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"tokens per rank (4096 on GPUs, {cpu_tokens} on CPUs)"
    )
    parser.add_argument(
        "--hidden-size", type=int, default=None, help=f"hidden size (7168 on GPUs, {cpu_hidden} on CPUs)"
    )
    parser.add_argument("--num-topk", type=int, default=None, help="experts per token (8 on GPUs, 4 on CPUs)")
    parser.add_argument(
        "--num-experts", type=int, default=None, help="experts over all ranks (256 on GPUs, 8 per rank on CPUs)"
    )
    parser.add_argument(
        "--routing",
        default="uniform",
        help="uniform (every expert equally likely), or skewed:F (a fraction F of the tokens picks rank 0's "
        "experts first)",
    )
    parser.add_argument("--output-dir", default=".", help="where the results go (default: the current directory)")


def check_workload_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cpu_tokens: int, cpu_hidden: int, fp8: bool
) -> None:
    """Fills the backend-dependent defaults of `add_workload_arguments` and checks every value; a bad one stops
    the program through `parser.error` (exit status 2) with a message naming the argument."""
    if args.num_processes < 1:
        parser.error(f"argument --num-processes: {args.num_processes} must be >= 1")
    try:
        args.backend = launch.pick_backend(args.backend, args.num_processes)
    except ValueError as exc:
        parser.error(f"argument --backend: {exc}")
    on_gpu = args.backend == "nccl"
    defaults = dict(
        tokens=4096 if on_gpu else cpu_tokens,
        hidden_size=7168 if on_gpu else cpu_hidden,
        num_topk=8 if on_gpu else 4,
        num_experts=256 if on_gpu else 8 * args.num_processes,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tokens < 1:
        parser.error(f"argument --tokens: {args.tokens} must be >= 1")
    if args.num_experts < 1 or args.num_experts % args.num_processes != 0:
        parser.error(
            f"argument --num-experts: {args.num_experts} must be a positive multiple of --num-processes "
            f"{args.num_processes} (every rank holds as many experts)"
        )
    if not 1 <= args.num_topk <= min(NUM_MAX_TOPK, args.num_experts):
        parser.error(
            f"argument --num-topk: {args.num_topk} must be in [1, min({NUM_MAX_TOPK}, --num-experts "
            f"{args.num_experts})]"
        )
    if args.hidden_size < 1 or args.hidden_size % 8 != 0:
        parser.error(f"argument --hidden-size: {args.hidden_size} must be a positive multiple of 8 (16-byte rows)")
    if fp8 and args.hidden_size % FP8_SCALE_BLOCK != 0:
        parser.error(
            f"argument --hidden-size: {args.hidden_size} must be a multiple of {FP8_SCALE_BLOCK} for FP8 (one scale "
            f"per {FP8_SCALE_BLOCK} channels)"
        )
    try:
        parse_routing(args.routing)
    except ValueError as exc:
        parser.error(f"argument --routing: {exc}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"argument --output-dir: {args.output_dir} exists and is not a directory")


def parse_sms_list(text: Sequence[str]) -> list[int]:
    """Parses SM counts given as `8,16,24` or `8 16 24`. Returns: the counts, in the given order, without repeats.
    Raises ValueError naming a count that is not an even int >= 2."""
    counts: list[int] = []
    for item in ",".join(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not an int") from None
        if value < 2 or value % 2 != 0:
            raise ValueError(f"{value} must be even and >= 2 (blocks work in sender/receiver pairs)")
        if value not in counts:
            counts.append(value)
    if not counts:
        raise ValueError("no SM count given")
    return counts


def device_num_sms() -> int:
    """Returns: the SMs of GPU 0 (0 without a GPU)."""
    return torch.cuda.get_device_properties(0).multi_processor_count if launch.num_gpus() > 0 else 0


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the benchmark's command line; a bad value exits with status 2 and names the argument."""
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_ep.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode",
        choices=("standard", "low_latency"),
        default="standard",
        help="standard: normal-mode dispatch/combine; low_latency is not implemented yet",
    )
    add_workload_arguments(parser, cpu_tokens=64, cpu_hidden=256)
    parser.add_argument("--data-type", choices=DATA_TYPES, default="bfloat16", help="dispatch data type")
    parser.add_argument("--num-warmups", type=int, default=None, help="untimed calls first (20 on GPUs, 1 on CPUs)")
    parser.add_argument("--num-iterations", type=int, default=None, help="timed calls (50 on GPUs, 3 on CPUs)")
    parser.add_argument(
        "--num-sms",
        nargs="+",
        default=None,
        help="SM counts to sweep, e.g. 8,16,24 or 8 16 24 (default 8,12,16,20,24 on GPUs; Buffer.num_sms on CPUs)",
    )
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler trace per rank")
    parser.add_argument(
        "--ahead",
        action="store_true",
        help="on GPUs, time the calls that never wait on the host (cached dispatch, combine, the all-to-all) enqueued "
        "behind a GPU sleep, so small calls are timed without the host's gaps",
    )
    args = parser.parse_args(argv)
    if args.mode == "low_latency":
        return args
    check_workload_arguments(parser, args, cpu_tokens=64, cpu_hidden=256, fp8=args.data_type == "fp8")
    on_gpu = args.backend == "nccl"
    if args.num_warmups is None:
        args.num_warmups = 20 if on_gpu else 1
    if args.num_iterations is None:
        args.num_iterations = 50 if on_gpu else 3
    if args.num_warmups < 0:
        parser.error(f"argument --num-warmups: {args.num_warmups} must be >= 0")
    if args.num_iterations < 1:
        parser.error(f"argument --num-iterations: {args.num_iterations} must be >= 1")
    if args.num_sms is None:
        args.num_sms = ["8,12,16,20,24"] if on_gpu else [str(Buffer.num_sms)]
    try:
        args.num_sms = parse_sms_list(args.num_sms)
    except ValueError as exc:
        parser.error(f"argument --num-sms: {exc}")
    if on_gpu and max(args.num_sms) > device_num_sms():
        parser.error(f"argument --num-sms: {max(args.num_sms)} is more than the {device_num_sms()} SMs of the GPU")
    return args


def run_dir_name(num_ranks: int, mode: str, now: datetime.datetime) -> str:
    """Returns: the run's directory name, `benchmark_<num_ranks>_ranks_<YYYYmmdd-HHMMSS>_<mode>`, the layout
    CloudAI's DeepEP report reads (rank count, time and mode from the name)."""
    return f"benchmark_{num_ranks}_ranks_{now.strftime('%Y%m%d-%H%M%S')}_{mode}"


def make_run_dir(output_dir: str, num_ranks: int, mode: str) -> str:
    """Creates and returns a fresh run directory under `output_dir`; runs started within one second get `-2`, `-3`,
    ... after the time."""
    now = datetime.datetime.now()
    name = run_dir_name(num_ranks, mode, now)
    path, n = os.path.join(output_dir, name), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(output_dir, name.replace(f"_{mode}", f"-{n}_{mode}"))
    os.makedirs(path)
    return path


def result_row(
    pg: launch.ProcessGroupInfo,
    args: argparse.Namespace,
    operation: str,
    data_type: str,
    timing: Timing,
    bytes_per_rank: Sequence[int],
    config: Optional[Config],
    ahead: bool = False,
) -> dict[str, Any]:
    """Collective (gathers every rank's time). Returns: one row of results.json (docs/bench.md).

    Arguments:
        operation: "dispatch", "dispatch_with_layout", "combine" or "all_to_all_single".
        data_type: "bfloat16" or "fp8", the width of the rows counted.
        timing: this rank's Timing.
        bytes_per_rank: bytes each rank receives in one call, by rank.
        config: the Config of the call, or None for the all-to-all.
        ahead: whether the calls were timed enqueued behind a GPU sleep (`time_calls`).
    """
    times = gather_floats(pg, timing.mean_s)
    per_rank_bw = [b / t / 1e9 for b, t in zip(bytes_per_rank, times)]
    row: dict[str, Any] = {
        "operation": operation,
        "data_type": data_type,
        "num_ranks": pg.world_size,
        "num_tokens": args.tokens,
        "hidden": args.hidden_size,
        "num_experts": args.num_experts,
        "num_topk": args.num_topk,
        "routing": args.routing,
        "num_sms": config.num_sms if config is not None else None,
        "config": {name: getattr(config, name) for name in tuned.CONFIG_FIELDS} if config is not None else None,
        "deepep_time": times[0] * 1e6,
        "time_min_us": timing.min_s * 1e6,
        "time_max_us": timing.max_s * 1e6,
        "time_median_us": timing.median_s * 1e6,
        "ahead": ahead,
        "bytes": int(bytes_per_rank[0]),
        "simple_nvl_bw": per_rank_bw[0],
        # Every rank of a launch is on this host: no row crosses the network.
        "simple_rdma_bw": 0.0,
        "global_bw": sum(bytes_per_rank) / times[0] / 1e9,
        "bus_bw_avg": sum(per_rank_bw) / len(per_rank_bw),
        "bus_bw_min": min(per_rank_bw),
        "bus_bw_max": max(per_rank_bw),
        "backend": pg.backend,
        "kernels": uses_kernels(pg.device) and config is not None,
    }
    return row


def _print_row(row: dict[str, Any]) -> None:
    sms = row["num_sms"] if row["num_sms"] is not None else "-"
    print(
        f"{row['operation']:<22} {row['data_type']:<9} {sms:>4} {row['deepep_time']:>11.1f} {row['global_bw']:>10.2f} "
        f"{row['simple_nvl_bw']:>14.2f} {row['simple_rdma_bw']:>15.2f} {row['bus_bw_avg']:>11.2f}",
        flush=True,
    )


def write_token_matrix(run_dir: str, matrix: torch.Tensor, bytes_per_token: int) -> None:
    """Writes `token_matrix.txt` (tokens rank i sends rank j, row i, column j) and `token_matrix_kb.txt` (the same
    in KiB of `bytes_per_token`-byte rows)."""
    with open(os.path.join(run_dir, "token_matrix.txt"), "w") as f:
        for row in matrix.tolist():
            f.write(" ".join(str(int(v)) for v in row) + "\n")
    with open(os.path.join(run_dir, "token_matrix_kb.txt"), "w") as f:
        for row in matrix.tolist():
            f.write(" ".join(f"{v * bytes_per_token / 1024:.2f}" for v in row) + "\n")


def plot_bandwidth(run_dir: str, rows: list[dict[str, Any]], title: str) -> Optional[str]:
    """Writes `bandwidth.png`: simple_nvl_bw of each operation against SMs, the all-to-all as horizontal lines.
    Returns: the path, or None (with a warning on stderr) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as exc:
        print(
            f"warning: matplotlib is not installed ({exc}); skipped the plot (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for operation in ("dispatch", "dispatch_with_layout", "combine"):
        points = sorted((r["num_sms"], r["simple_nvl_bw"], r["data_type"]) for r in rows if r["operation"] == operation)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{operation} ({points[0][2]})")
    for r in rows:
        if r["operation"] == "all_to_all_single":
            ax.axhline(r["simple_nvl_bw"], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"{r['backend']} all_to_all_single ({r['data_type']})", (0.01, r["simple_nvl_bw"]),
                        xycoords=("axes fraction", "data"), fontsize=8, va="bottom")  # fmt: skip
    ax.set_xlabel("SMs")
    ax.set_ylabel("GB/s per rank (DeepEP count, rank 0)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(run_dir, "bandwidth.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bench_worker(pg: launch.ProcessGroupInfo, args: argparse.Namespace, run_dir: str) -> None:
    num_ranks, rank, device = pg.world_size, pg.rank, pg.device
    log: Callable[..., None] = print if rank == 0 else (lambda *_, **__: None)
    fp8 = args.data_type == "fp8"
    kernels = uses_kernels(device)
    dispatch_op = "dispatch_fp8" if fp8 else "dispatch"
    configs = [
        (tuned.config_for(dispatch_op, num_ranks, s), tuned.config_for("combine", num_ranks, s)) for s in args.num_sms
    ]
    num_nvl_bytes = nvl_bytes_for([c for pair in configs for c in pair], args.hidden_size, num_ranks) if kernels else 0
    buffer = Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(
        f"[setup] {num_ranks} ranks, backend {pg.backend}, device {device_name}, hybrid_ep {__version__}, "
        f"{'NVLink kernels' if kernels else 'pure-PyTorch reference'}, NVLink buffer {num_nvl_bytes / 2**20:.1f} MiB"
    )
    table = tuned.lookup(num_ranks)
    log(f"[setup] configs from {table.path if table is not None else 'the built-in table'}")

    inputs = make_inputs(args, rank, num_ranks, device)
    x_in = inputs.x_fp8 if fp8 else inputs.x
    layout = dispatch_layout(buffer, inputs, args.num_experts)
    per_rank, in_rank = layout["num_tokens_per_rank"], layout["is_token_in_rank"]
    matrix = token_matrix(pg, per_rank)
    recv_rows = [int(v) for v in matrix.sum(0).tolist()]
    dispatch_bytes = [n * row_bytes(args.hidden_size, args.data_type) for n in recv_rows]
    combine_bytes = [n * row_bytes(args.hidden_size, "bfloat16") for n in recv_rows]
    timing = dict(device=device, num_warmups=args.num_warmups, num_tests=args.num_iterations)
    # Calls that never wait on the host may be timed enqueued ahead; dispatch with layout waits for its counts.
    ahead = args.ahead and device.type == "cuda"

    rows: list[dict[str, Any]] = []
    baselines = ["bfloat16"] if not fp8 else ["fp8", "bfloat16"]
    bar = ProgressBar("[bench]", 3 * len(configs) + len(baselines), enabled=rank == 0)
    for dispatch_config, combine_config in configs:
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x_in, **layout, config=dispatch_config)
        # Combine takes BF16 rows: with FP8 dispatch, the BF16 rows of the same handle.
        combine_x = buffer.dispatch(inputs.x, handle=handle, config=dispatch_config)[0] if fp8 else recv_x
        t = time_calls(lambda: buffer.dispatch(x_in, handle=handle, config=dispatch_config), **timing, ahead=ahead)
        rows.append(result_row(pg, args, "dispatch", args.data_type, t, dispatch_bytes, dispatch_config, ahead))
        bar.update()
        t = time_calls(lambda: buffer.dispatch(x_in, **layout, config=dispatch_config), **timing)
        rows.append(result_row(pg, args, "dispatch_with_layout", args.data_type, t, dispatch_bytes, dispatch_config))
        bar.update()
        t = time_calls(
            lambda: buffer.combine(combine_x, handle, topk_weights=recv_w, config=combine_config),
            **timing,
            ahead=ahead,
        )
        rows.append(result_row(pg, args, "combine", "bfloat16", t, combine_bytes, combine_config, ahead))
        bar.update(note=f"{dispatch_config.num_sms} SMs")

    # The same rows moved by the process group's own all-to-all: tokens pre-permuted by destination rank, each row
    # as many bytes as the kernels move.
    _, token_idx = in_rank.t().nonzero(as_tuple=True)
    send_counts = [int(v) for v in matrix[rank].tolist()]
    recv_counts = [int(v) for v in matrix[:, rank].tolist()]
    for data_type in baselines:
        width = row_bytes(args.hidden_size, data_type)
        send = torch.zeros(len(token_idx), width, dtype=torch.uint8, device=device)
        recv = torch.empty(sum(recv_counts), width, dtype=torch.uint8, device=device)
        t = time_calls(
            lambda: dist.all_to_all_single(recv, send, recv_counts, send_counts, group=pg.group),
            **timing,
            ahead=ahead,
        )
        nbytes = dispatch_bytes if data_type == args.data_type else combine_bytes
        rows.append(result_row(pg, args, "all_to_all_single", data_type, t, nbytes, None, ahead))
        bar.update()
    bar.close()

    if args.profile:
        _profile(pg, buffer, x_in, layout, configs[-1], run_dir, fp8, inputs.x)
    buffer.destroy()

    if rank != 0:
        return
    print("BENCHMARK: hybrid_ep normal-mode results (rank 0; GB/s counted as DeepEP counts them, docs/bench.md)")
    print(
        f"{'operation':<22} {'data_type':<9} {'SMs':>4} {'deepep_time':>11} {'global_bw':>10} {'simple_nvl_bw':>14} "
        f"{'simple_rdma_bw':>15} {'bus_bw_avg':>11}"
    )
    for row in rows:
        _print_row(row)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    write_token_matrix(run_dir, matrix, row_bytes(args.hidden_size, args.data_type))
    title = (
        f"hybrid_ep {__version__}: {num_ranks} ranks, {device_name}, {args.tokens} tokens, hidden {args.hidden_size}, "
        f"top-{args.num_topk} of {args.num_experts}, {args.routing}"
    )
    plot = plot_bandwidth(run_dir, rows, title)
    print(f"[bench] wrote results.json, token_matrix.txt, token_matrix_kb.txt{', bandwidth.png' if plot else ''}")
    print(f"[bench] results in {run_dir}")


def _profile(
    pg: launch.ProcessGroupInfo,
    buffer: Buffer,
    x_in: Any,
    layout: dict[str, Any],
    configs: tuple[Config, Config],
    run_dir: str,
    fp8: bool,
    x_bf16: torch.Tensor,
) -> None:
    """Records three dispatch/combine pairs (at the last SM count) with torch.profiler and writes the trace of this
    rank, `trace_rank<r>.json` (Chrome trace format: chrome://tracing or Perfetto)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    dispatch_config, combine_config = configs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pg.device.type == "cuda" else [])
    with profile(activities=activities, acc_events=True) as prof:
        for _ in range(3):
            with record_function("hybrid_ep dispatch"):
                recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x_in, **layout, config=dispatch_config)
            combine_x = buffer.dispatch(x_bf16, handle=handle, config=dispatch_config)[0] if fp8 else recv_x
            with record_function("hybrid_ep combine"):
                buffer.combine(combine_x, handle, topk_weights=recv_w, config=combine_config)
        if pg.device.type == "cuda":
            torch.cuda.synchronize(pg.device)
    prof.export_chrome_trace(os.path.join(run_dir, f"trace_rank{pg.rank}.json"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark. Returns: the exit status (0, or 2 for low-latency mode; bad arguments exit 2)."""
    args = parse_args(argv)
    if args.mode == "low_latency":
        print(
            "hybrid_ep.bench: --mode low_latency is not implemented yet (hybrid_ep has no low-latency kernels; see "
            "docs/compat.md); run --mode standard",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.backend == "nccl" and not uses_kernels(torch.device("cuda")):
        print(
            "warning: hybrid_ep._C with the NVLink kernels is not loaded "
            f"({_ext.build_info()['error'] or 'built without them'}); dispatch and combine run the pure-PyTorch "
            "reference, so the figures say nothing about the kernels",
            file=sys.stderr,
        )
    os.makedirs(args.output_dir, exist_ok=True)
    run_dir = make_run_dir(args.output_dir, args.num_processes, args.mode)
    launch.parallel_launch(args.num_processes, _bench_worker, args, run_dir, backend=args.backend)
    return 0


if __name__ == "__main__":
    # NOTES: through the package, so spawned ranks find the worker as hybrid_ep.bench._bench_worker.
    from hybrid_ep import bench as _bench

    sys.exit(_bench.main())
