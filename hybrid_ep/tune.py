"""`python -m hybrid_ep.tune`: finds the best `Config` of dispatch BF16, dispatch FP8 and combine on this machine.

    python -m hybrid_ep.tune --num-processes 4 --mode quick            # within 2 minutes on 4 GPUs
    python -m hybrid_ep.tune --num-processes 4 --mode full --install   # at most ten minutes

It sweeps SMs (`num_sms`), NVLink chunk sizes (`num_max_nvl_chunked_send_tokens`) and NVLink ring sizes
(`num_max_nvl_chunked_recv_tokens`) on the standard workload (4096 tokens per rank, hidden 7168, top-8 of 256
experts), timing each point as `python -m hybrid_ep.bench` does (dispatch with a cached handle, GB/s of rank 0
counted as DeepEP counts them) and checking that its outputs equal those of the first point bit for bit. Into
`--output-dir` it writes:

* `results_ep<N>.json`: per op, the best config overall and at each SM count, with its GB/s and time; read by
  `Buffer.get_dispatch_config` / `get_combine_config` through `HYBRID_EP_TUNED_CONFIG`, or from the per-user cache
  where `--install` copies it (`hybrid_ep.tuned` says how);
* `tune_ep<N>.jsonl`: one JSON object per point tried, written as the sweep goes.

Without GPUs it runs a tiny sweep of the pure-PyTorch reference over gloo, which exercises every step but says
nothing about speed. A sweep that reaches its time budget stops early and says so in both files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import _ext, launch, tuned
from .bench import (
    ProgressBar,
    add_workload_arguments,
    check_workload_arguments,
    device_num_sms,
    dispatch_layout,
    make_inputs,
    nvl_bytes_for,
    row_bytes,
    time_calls,
    token_matrix,
    uses_kernels,
)
from .buffer import Buffer
from .config import Config, recommended_config
from .version import __version__


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The values tried of each Config field; every combination with send < recv is a point."""

    num_sms: tuple[int, ...]
    nvl_send: tuple[int, ...]
    nvl_recv: tuple[int, ...]
    # Untimed and timed calls per point.
    num_warmups: int
    num_tests: int
    # Seconds the sweep may take (starting the processes and allocating the buffer come on top, ~20 s).
    budget_s: float

    def points(self, max_sms: Optional[int] = None) -> list[tuple[int, int, int]]:
        """Returns: (num_sms, nvl_send, nvl_recv) of every point, SMs outermost; SM counts above `max_sms` are
        left out."""
        return [
            (s, send, recv)
            for s in self.num_sms
            if max_sms is None or s <= max_sms
            for send in self.nvl_send
            for recv in self.nvl_recv
            if send < recv
        ]


SWEEPS = {
    "quick": Sweep((8, 16, 24, 32), (4, 8, 16, 32), (128, 256, 512), num_warmups=3, num_tests=10, budget_s=90),
    "full": Sweep(
        (8, 12, 16, 20, 24, 28, 32, 40, 48, 64),
        (2, 4, 6, 8, 12, 16, 24, 32),
        (64, 128, 256, 512, 1024),
        num_warmups=5,
        num_tests=20,
        budget_s=540,
    ),
}
# Without GPUs, whatever the mode: the reference ignores all but the channel count, so this only exercises the
# machinery.
CPU_SWEEP = Sweep((2, 4), (4, 8), (16, 32), num_warmups=1, num_tests=2, budget_s=120)
CPU_TOKENS, CPU_HIDDEN = 64, 128


def log_path(output_dir: str, num_ranks: int) -> str:
    """Returns: the path of the per-point log, `<output_dir>/tune_ep<num_ranks>.jsonl`."""
    return os.path.join(output_dir, f"tune_ep{num_ranks}.jsonl")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the tuner's command line; a bad value exits with status 2 and names the argument."""
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_ep.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", choices=tuple(SWEEPS), default="quick", help="quick (within 2 min on GPUs) or full (within 10 min)"
    )
    add_workload_arguments(parser, cpu_tokens=CPU_TOKENS, cpu_hidden=CPU_HIDDEN)
    parser.add_argument(
        "--install",
        action="store_true",
        help="also copy results_ep<N>.json to the per-user cache, where Buffer.get_dispatch_config finds it",
    )
    parser.add_argument("--num-warmups", type=int, default=None, help="untimed calls per point (default: the mode's)")
    parser.add_argument("--num-iterations", type=int, default=None, help="timed calls per point (default: the mode's)")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds the sweep may take (default: the mode's)"
    )
    args = parser.parse_args(argv)
    check_workload_arguments(parser, args, cpu_tokens=CPU_TOKENS, cpu_hidden=CPU_HIDDEN, fp8=True)
    sweep = SWEEPS[args.mode] if args.backend == "nccl" else CPU_SWEEP
    changes: dict[str, Any] = {}
    for name, field, minimum in (
        ("num_warmups", "num_warmups", 0),
        ("num_iterations", "num_tests", 1),
        ("time_budget", "budget_s", 1),
    ):
        value = getattr(args, name)
        if value is not None:
            if value < minimum:
                parser.error(f"argument --{name.replace('_', '-')}: {value} must be >= {minimum}")
            changes[field] = value
    args.sweep = dataclasses.replace(sweep, **changes)
    return args


@dataclasses.dataclass
class Point:
    """One timed point of one op, as the log records it."""

    op: str
    config: Config
    ok: bool
    error: Optional[str]
    gbps: float
    time_us: float
    min_us: float
    max_us: float

    def record(self, num_bytes: int, elapsed_s: float) -> dict[str, Any]:
        return {
            "op": self.op,
            "num_sms": self.config.num_sms,
            "config": {name: getattr(self.config, name) for name in tuned.CONFIG_FIELDS},
            "ok": self.ok,
            "error": self.error,
            "gbps": self.gbps,
            "time_us": self.time_us,
            "min_us": self.min_us,
            "max_us": self.max_us,
            "bytes": num_bytes,
            "elapsed_s": round(elapsed_s, 3),
        }


def _same(a: Any, b: Any) -> bool:
    """Returns: whether two outputs (tensors, or tuples of tensors and None) are equal bit for bit."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is None and b is None


def _tune_worker(pg: launch.ProcessGroupInfo, args: argparse.Namespace) -> None:
    num_ranks, rank, device = pg.world_size, pg.rank, pg.device
    log: Callable[..., None] = print if rank == 0 else (lambda *_, **__: None)
    sweep: Sweep = args.sweep
    kernels = uses_kernels(device)
    points = sweep.points(device_num_sms() if device.type == "cuda" else None)
    # The network (rdma) fields are not used within one NVLink domain: kept as the built-in table has them.
    table_ops = {results_op: op for op, results_op in tuned.LOOKUP_OPS.items()}
    base = {op: recommended_config(table_ops[op], num_ranks, 2) for op in tuned.OPS}

    def config(op: str, point: tuple[int, int, int]) -> Config:
        return Config(*point, base[op].num_max_rdma_chunked_send_tokens, base[op].num_max_rdma_chunked_recv_tokens)

    all_configs = [config(op, p) for op in tuned.OPS for p in points]
    num_nvl_bytes = nvl_bytes_for(all_configs, args.hidden_size, num_ranks) if kernels else 0
    buffer = Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(
        f"[tune] {num_ranks} ranks, {device_name}, mode {args.mode}, {len(points)} points per op, NVLink buffer "
        f"{num_nvl_bytes / 2**20:.1f} MiB, {'NVLink kernels' if kernels else 'pure-PyTorch reference'}",
        flush=True,
    )

    inputs = make_inputs(args, rank, num_ranks, device)
    assert inputs.x_fp8 is not None  # hidden is a multiple of 128 (checked with the arguments)
    layout = dispatch_layout(buffer, inputs, args.num_experts)
    per_rank = layout["num_tokens_per_rank"]
    num_recv = int(token_matrix(pg, per_rank).sum(0)[0])
    num_bytes = {
        "dispatch_bf16": num_recv * row_bytes(args.hidden_size, "bfloat16"),
        "dispatch_fp8": num_recv * row_bytes(args.hidden_size, "fp8"),
        "combine": num_recv * row_bytes(args.hidden_size, "bfloat16"),
    }

    # One handle per SM count (a cached dispatch runs on its handle's channels), and the outputs of the first
    # point, which every other point must reproduce.
    # An SM count whose dispatch the checks reject (on every rank alike, before any communication) is left out.
    handles: dict[int, tuple] = {}
    recv_x = recv_w = None
    for point in points:
        if point[0] not in handles:
            try:
                recv_x, _, recv_w, _, handles[point[0]], _ = buffer.dispatch(
                    inputs.x, **layout, config=config("dispatch_bf16", point)
                )
            except (ValueError, RuntimeError) as exc:
                log(f"[tune] {point[0]} SMs left out: {type(exc).__name__}: {exc}", flush=True)
                handles[point[0]] = ()
    points = [p for p in points if handles[p[0]]]
    if not points:
        raise RuntimeError("no SM count of the sweep could run a dispatch; see the messages above")
    calls: dict[str, Callable[[Config], Any]] = {
        "dispatch_bf16": lambda c: buffer.dispatch(inputs.x, handle=handles[c.num_sms], config=c)[0],
        "dispatch_fp8": lambda c: buffer.dispatch(inputs.x_fp8, handle=handles[c.num_sms], config=c)[0],
        "combine": lambda c: buffer.combine(recv_x, handles[c.num_sms], topk_weights=recv_w, config=c)[:2],
    }
    expected = {op: calls[op](config(op, points[0])) for op in tuned.OPS}

    records: list[dict[str, Any]] = []
    stopped: list[str] = []
    start = time.monotonic()
    with open(log_path(args.output_dir, num_ranks), "w") if rank == 0 else contextlib.nullcontext() as log_file:
        for op_idx, op in enumerate(tuned.OPS):
            deadline = start + sweep.budget_s * (op_idx + 1) / len(tuned.OPS)
            bar = ProgressBar(f"[tune] {op:<13}", len(points), enabled=rank == 0)
            best: Optional[Point] = None
            for point in points:
                result = _run_point(op, config(op, point), calls[op], expected[op], num_bytes[op], device, sweep)
                # Every rank agrees on a failed check, and on rank 0's decision to stop at the deadline.
                flags = torch.tensor(
                    [0 if result.ok else 1, int(rank == 0 and time.monotonic() > deadline)], device=device
                )
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pg.group)
                if flags[0] and result.ok:
                    result.ok, result.error = False, "outputs differ from the first point's on another rank"
                record = result.record(num_bytes[op], time.monotonic() - start)
                records.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if result.ok and (best is None or result.gbps > best.gbps):
                    best = result
                bar.update(note=f"best {best.gbps:.1f} GB/s at {_describe(best.config)}" if best is not None else "")
                if flags[1]:
                    stopped.append(op)
                    break
            bar.close(f"stopped at the time budget after {bar.done} of {len(points)} points" if op in stopped else "")
    buffer.destroy()
    if rank == 0:
        _write_results(args, num_ranks, device_name, kernels, records, stopped, len(points))


def _run_point(
    op: str,
    config: Config,
    call: Callable[[Config], Any],
    expected: Any,
    num_bytes: int,
    device: torch.device,
    sweep: Sweep,
) -> Point:
    """Checks one point's outputs against `expected`, then times it. Returns: its Point (not ok, with the reason,
    when the outputs differ or the call's checks reject the config)."""
    try:
        ok = _same(call(config), expected)
        t = time_calls(lambda: call(config), device, sweep.num_warmups, sweep.num_tests)
    except (ValueError, RuntimeError) as exc:
        # Raised by the checks before any communication, on every rank alike.
        return Point(op, config, False, f"{type(exc).__name__}: {exc}", 0.0, 0.0, 0.0, 0.0)
    error = None if ok else "outputs differ from the first point's"
    return Point(op, config, ok, error, num_bytes / t.mean_s / 1e9, t.mean_s * 1e6, t.min_s * 1e6, t.max_s * 1e6)


def _describe(config: Config) -> str:
    return (
        f"{config.num_sms} SMs, chunk {config.num_max_nvl_chunked_send_tokens}, "
        f"ring {config.num_max_nvl_chunked_recv_tokens}"
    )


def _write_results(
    args: argparse.Namespace,
    num_ranks: int,
    device_name: str,
    kernels: bool,
    records: list[dict[str, Any]],
    stopped: list[str],
    num_points: int,
) -> None:
    """Picks the best point of each op, overall and per SM count, and writes results_ep<N>.json (rank 0)."""
    best: dict[str, dict[str, Any]] = {}
    by_num_sms: dict[str, dict[int, dict[str, Any]]] = {op: {} for op in tuned.OPS}
    for op in tuned.OPS:
        for record in records:
            if record["op"] != op or not record["ok"]:
                continue
            entry = tuned.config_entry(Config(**record["config"]), record["gbps"], record["time_us"])
            if op not in best or entry["gbps"] > best[op]["gbps"]:
                best[op] = entry
            current = by_num_sms[op].get(record["num_sms"])
            if current is None or entry["gbps"] > current["gbps"]:
                by_num_sms[op][record["num_sms"]] = entry
    missing = [op for op in tuned.OPS if op not in best]
    if missing:
        print(
            f"[tune] error: no point of {', '.join(missing)} ran correctly (see {log_path(args.output_dir, num_ranks)}"
            "); results not written",
            file=sys.stderr,
        )
        return
    sweep: Sweep = args.sweep
    data = tuned.make_results(
        num_ranks,
        best,
        by_num_sms,
        mode=args.mode,
        device=device_name,
        backend=args.backend,
        kernels=kernels,
        hybrid_ep_version=__version__,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        workload=dict(
            num_tokens=args.tokens,
            hidden=args.hidden_size,
            num_topk=args.num_topk,
            num_experts=args.num_experts,
            routing=args.routing,
        ),
        sweep=dict(
            num_sms=list(sweep.num_sms),
            nvl_send=list(sweep.nvl_send),
            nvl_recv=list(sweep.nvl_recv),
            num_warmups=sweep.num_warmups,
            num_tests=sweep.num_tests,
            num_points_per_op=num_points,
        ),
        stopped_at_time_budget=stopped,
    )
    path = os.path.join(args.output_dir, tuned.results_file_name(num_ranks))
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print("[tune] best configs (GB/s of rank 0, counted as DeepEP counts them):")
    for op in tuned.OPS:
        entry = best[op]
        print(f"[tune]   {op:<13} {entry['gbps']:8.2f} GB/s {entry['time_us']:9.1f} us  {entry['config']}")
    print(f"[tune] wrote {path} and {log_path(args.output_dir, num_ranks)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the tuner. Returns: the exit status (0; 1 when nothing could be tuned; bad arguments exit 2)."""
    args = parse_args(argv)
    if args.backend == "nccl" and not uses_kernels(torch.device("cuda")):
        print(
            "hybrid_ep.tune: tuning needs the NVLink kernels of hybrid_ep._C, which are not loaded "
            f"({_ext.build_info()['error'] or 'built without them'}); {_ext.BUILD_HINT}",
            file=sys.stderr,
        )
        return 1
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, tuned.results_file_name(args.num_processes))
    begin = time.time()
    launch.parallel_launch(args.num_processes, _tune_worker, args, backend=args.backend)
    if not os.path.exists(path) or os.path.getmtime(path) < begin:
        return 1
    if args.install:
        target = tuned.default_path(args.num_processes)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        print(f"[tune] installed {target}: Buffer.get_dispatch_config / get_combine_config now use it")
    else:
        print(f"[tune] to use it: export HYBRID_EP_TUNED_CONFIG={os.path.abspath(path)} (or rerun with --install)")
    return 0


if __name__ == "__main__":
    # NOTES: through the package, so spawned ranks find the worker as hybrid_ep.tune._tune_worker.
    from hybrid_ep import tune as _tune

    sys.exit(_tune.main())
