"""Correctness, then benchmark, of layout, dispatch and combine, as users run DeepEP's and Hybrid-EP's tests:

    python tests/test_hybrid_ep.py --num-processes 4

On GPUs (NCCL, one process per GPU) it runs the standard workload of 4096 tokens per rank, hidden 7168, top-8 of
256 experts, with the NVLink buffer sized for every Config it uses, and times an NCCL all_to_all_single of the same
rows in the same run; `--sm-sweep` (default 8,12,16,20,24 on GPUs) repeats dispatch and combine at each SM count.
On GPUs it also times a cached dispatch overlapped (async_finish=True, communication stream) with a GEMM on the
compute stream, beside the two alone and one after the other.
Without GPUs it runs small sizes on 4 gloo ranks. Bandwidth is counted as DeepEP counts it: bytes of all rows a rank
receives (its own included) divided by the time of one call, as seen by rank 0. Labels on GPUs name the SM count.
The same rows go through `hybrid_ep.HybridEPBuffer` (Hybrid-EP's API) too: plain and permuted forms, counted as
Hybrid-EP's test counts them (the plain dispatch's rows at BF16 width; FP8 at (1 + 4/128) / 2 of that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hybrid_ep  # noqa: E402
from hybrid_ep import Config  # noqa: E402
from hybrid_ep.bench import gather_floats, nvl_bytes_for, time_overlap  # noqa: E402
from hybrid_ep.tuned import config_for  # noqa: E402

from cases import (  # noqa: E402
    Scenario,
    dispatch_routed,
    expected_combine,
    expected_dispatch,
    expected_for_rank,
    make_inputs,
    to_device,
)
from distributed import ProcessGroupInfo, num_gpus, parallel_launch  # noqa: E402


def bench(fn: Callable[[], Any], device: torch.device, num_warmups: int, num_tests: int) -> tuple[float, float, float]:
    """Times `fn` as DeepEP's test does: warm-up, one L2 flush, per-call CUDA events, first sample dropped.
    Returns: (mean, min, max) seconds. On the CPU, wall-clock per call.

    NOTES: not `hybrid_ep.bench.time_calls`, which flushes the L2 before every call and keeps every sample (as
    DeepEP's benchmarks do); this script's figures stay comparable with DeepEP's test."""
    for _ in range(num_warmups):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
        flush.zero_()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        for i in range(num_tests):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)][1:]
    else:
        for _ in range(num_tests):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        times = times[1:] if len(times) > 1 else times
    return sum(times) / len(times), min(times), max(times)


def make_routing(args: argparse.Namespace, rank: int, device: torch.device) -> torch.Tensor:
    """Returns: `[num_tokens, num_topk]` int64; uniform is DeepEP's `topk(|randn| + 1)`; skewed:F sends a fraction F
    of each token's choices to the experts of rank 0 (the hot rank).

    NOTES: uniform draws what `hybrid_ep.bench.make_routing` draws; skewed does not (it adds 10, not 100, to the hot
    scores, so float32 rounding can order ties differently, and a bare `skewed` means 0.8 here)."""
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    scores = torch.randn(args.num_tokens, args.num_experts, generator=g, device=device).abs() + 1
    if args.routing.startswith("skewed"):
        fraction = float(args.routing.split(":")[1]) if ":" in args.routing else 0.8
        hot = args.num_experts // args.num_processes
        boost = torch.rand(args.num_tokens, 1, generator=g, device=device) < fraction
        scores[:, :hot] += boost.float() * 10
    return scores.topk(args.num_topk, dim=1).indices.to(torch.int64).contiguous()


# The widest hidden size of the correctness pass (the NVLink buffer must fit it too).
CORRECTNESS_MAX_HIDDEN = 512
# Most tokens per rank in the correctness pass of HybridEPBuffer (its max_num_of_tokens_per_rank covers them).
CORRECTNESS_MAX_TOKENS = 128


def check_correctness(pg: ProcessGroupInfo, buffer: hybrid_ep.Buffer, log: Callable[[str], None]) -> None:
    R, me = pg.world_size, pg.rank
    cases = [
        Scenario("uniform", [64 + 7 * r for r in range(R)], hidden=256, num_experts=8 * R, num_topk=4, seed=1),
        Scenario(
            "holes+fp8",
            [48 + 3 * r for r in range(R)],
            hidden=512,
            num_experts=4 * R,
            num_topk=3,
            seed=2,
            routing="holes",
            fp8=True,
        ),
        Scenario("nowhere", [33] * R, hidden=128, num_experts=2 * R, num_topk=2, seed=3, routing="nowhere"),
    ]
    for s in cases:
        host = make_inputs(s, R)
        exp = expected_for_rank(s, host, me, R)
        inp = to_device(host, pg.device)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx[me], s.num_experts)
        assert torch.equal(per_rank.cpu(), exp.num_tokens_per_rank), f"{s.name}: num_tokens_per_rank"
        assert torch.equal(per_expert.cpu(), exp.num_tokens_per_expert), f"{s.name}: num_tokens_per_expert"
        assert torch.equal(in_rank.cpu(), exp.is_token_in_rank), f"{s.name}: is_token_in_rank"
        x = (inp.x_fp8[me], inp.scales[me]) if s.fp8 else inp.x[me]
        recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_routed(buffer, x, inp, me, s.num_experts)
        if s.fp8:
            assert torch.equal(recv_x[0].cpu().view(torch.uint8), exp.recv_x_fp8.view(torch.uint8)), s.name
            assert torch.equal(recv_x[1].cpu(), exp.recv_scales), s.name
        else:
            assert torch.equal(recv_x.cpu(), exp.recv_x), f"{s.name}: recv_x"
            combined, combined_w, _ = buffer.combine(
                (recv_x.float() * (me + 1)).to(torch.bfloat16), handle, topk_weights=recv_w
            )
            want_x, want_w = expected_combine(s, host, me, R)
            assert torch.equal(combined.cpu(), want_x), f"{s.name}: combined_x"
            assert torch.equal(combined_w.cpu(), want_w), f"{s.name}: combined_topk_weights"
        assert torch.equal(recv_idx.cpu(), exp.recv_topk_idx), f"{s.name}: recv_topk_idx"
        assert torch.equal(recv_w.cpu(), exp.recv_topk_weights), f"{s.name}: recv_topk_weights"
        assert counts == exp.num_recv_tokens_per_expert, f"{s.name}: num_recv_tokens_per_expert_list"
        log(f"[correctness] {s.name}: dispatch/combine/layout as expected ({R} ranks)")


def check_hybrid_ep_buffer(pg: ProcessGroupInfo, hybrid: hybrid_ep.HybridEPBuffer, log: Callable[[str], None]) -> None:
    """Hybrid-EP's own checks: dispatched tokens, the local columns of the probs and the scales bitwise; combine of
    `dispatched * (local experts of the row)` gives each token times its experts; combined probs bitwise; the
    expert-major layout of dispatch_with_permute (pad 32) bitwise, and combine_with_unpermute."""
    R, me, L, E = pg.world_size, pg.rank, hybrid.num_local_experts, hybrid.num_of_experts
    num_tokens = [min(64 + 7 * r, CORRECTNESS_MAX_TOKENS) for r in range(R)]
    s = Scenario("hybrid", num_tokens, hidden=128, num_experts=E, num_topk=min(4, E), seed=5, routing="holes")
    host = make_inputs(s, R)
    inp = to_device(host, pg.device)
    exp = expected_dispatch(s, host, me, R)
    slot = torch.where(exp.recv_topk_idx >= 0, exp.recv_topk_idx, L)
    local_probs = torch.zeros(exp.num_recv_tokens, L + 1).scatter_(1, slot, exp.recv_topk_weights)[:, :L]
    local_map = torch.zeros(exp.num_recv_tokens, L + 1, dtype=torch.bool).scatter_(1, slot, True)[:, :L]
    x, topk_idx = inp.x[me], inp.topk_idx[me]
    routing = dict(topk_idx=topk_idx, topk_weights=inp.topk_weights[me], num_of_experts=E)

    token, probs, _, handle = hybrid.dispatch(hidden=x, **routing)
    assert torch.equal(token.cpu(), exp.recv_x), "HybridEPBuffer: dispatched_token"
    columns = slice(hybrid.local_rank * L, (hybrid.local_rank + 1) * L)
    assert torch.equal(probs[:, columns].cpu(), local_probs), "HybridEPBuffer: dispatched_probs"
    back = (token.float() * handle.local_expert_routing_map.sum(1, keepdim=True)).to(torch.bfloat16)
    combined, combined_probs = hybrid.combine(back, probs=probs, handle=handle)
    num_valid = (topk_idx >= 0).sum(1, keepdim=True)
    assert torch.equal(combined, (x.float() * num_valid).to(torch.bfloat16)), "HybridEPBuffer: combined_token"
    dense = torch.zeros(s.num_tokens[me], E + 1, device=pg.device)
    dense.scatter_(1, torch.where(topk_idx >= 0, topk_idx, E), inp.topk_weights[me])
    assert torch.equal(combined_probs, dense[:, :E]), "HybridEPBuffer: combined_probs"

    # Expert-major, each block zero-padded to 32 rows; FP8 rows (uint8 + scales) take the same layout.
    rows, experts = [], []
    for j in range(L):
        block = local_map[:, j].nonzero().view(-1).tolist()
        rows += block + [-1] * (-len(block) % 32)
        experts += [j] * (len(rows) - len(experts))
    rows_t, experts_t = torch.tensor(rows, dtype=torch.int64), torch.tensor(experts, dtype=torch.int64)
    padding = rows_t < 0

    def pick(t: torch.Tensor) -> torch.Tensor:
        out = t[rows_t.clamp(min=0)].clone()
        out[padding] = 0
        return out

    x8 = inp.x_fp8[me].view(torch.uint8)
    token, _, scales, _, _ = hybrid.dispatch_with_permute(
        hidden=x8, scaling_factor=inp.scales[me], use_fp8=True, pad_multiple=32, **routing
    )
    assert torch.equal(token.cpu(), pick(exp.recv_x_fp8.view(torch.uint8))), "HybridEPBuffer: permuted FP8 rows"
    assert torch.equal(scales.cpu(), pick(exp.recv_scales)), "HybridEPBuffer: permuted scales"
    token, probs, _, _, handle = hybrid.dispatch_with_permute(hidden=x, pad_multiple=32, **routing)
    assert torch.equal(token.cpu(), pick(exp.recv_x)), "HybridEPBuffer: permuted rows"
    want_probs = torch.where(padding, 0.0, local_probs[rows_t.clamp(min=0), experts_t])
    assert torch.equal(probs.cpu(), want_probs), "HybridEPBuffer: permuted probs"
    combined, combined_probs = hybrid.combine_with_unpermute(hidden=token, probs=probs, handle=handle)
    assert torch.equal(combined, (x.float() * num_valid).to(torch.bfloat16)), "HybridEPBuffer: combine_with_unpermute"
    assert torch.equal(combined_probs, dense[:, :E]), "HybridEPBuffer: combined_probs after unpermute"
    log(f"[correctness] HybridEPBuffer: dispatch/combine/permute as expected ({R} ranks)")


def run(pg: ProcessGroupInfo, args: argparse.Namespace) -> None:
    R, me, device = pg.world_size, pg.rank, pg.device
    log = print if me == 0 else (lambda *_: None)
    on_gpu = device.type == "cuda"
    dispatch_config = hybrid_ep.Buffer.get_dispatch_config(R)
    dispatch_fp8_config = config_for("dispatch_fp8", R, hybrid_ep.Buffer.num_sms)
    combine_config = hybrid_ep.Buffer.get_combine_config(R)
    # At each SM count of the sweep, the config Buffer.get_*_config returns with Buffer.num_sms set to it.
    sweep_configs = [(config_for("dispatch", R, s), config_for("combine", R, s)) for s in args.sm_sweep]
    configs = [dispatch_config, dispatch_fp8_config, combine_config] + [c for pair in sweep_configs for c in pair]
    num_nvl_bytes = 0
    if on_gpu and hybrid_ep.has_extension():
        # Every config this run uses (the correctness pass uses the defaults), at the widest row.
        num_nvl_bytes = nvl_bytes_for(configs, max(args.hidden, CORRECTNESS_MAX_HIDDEN), R)
    buffer = hybrid_ep.Buffer(pg.group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)
    hybrid = hybrid_ep.HybridEPBuffer(
        pg.group,
        hidden_dim=max(args.hidden, CORRECTNESS_MAX_HIDDEN),
        max_num_of_tokens_per_rank=max(args.num_tokens, CORRECTNESS_MAX_TOKENS),
        num_local_experts=args.num_experts // R,
    )
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    log(
        f"[setup] {R} ranks, backend {pg.backend}, device {device_name}, hybrid_ep {hybrid_ep.__version__}, "
        f"extension: {hybrid_ep.build_info()['extension']}"
    )
    if num_nvl_bytes > 0:
        log(f"[setup] num_nvl_bytes {num_nvl_bytes / 2**20:.1f} MiB: the largest hint of {len(configs)} configs")
    if not args.skip_check:
        check_correctness(pg, buffer, log)
        check_hybrid_ep_buffer(pg, hybrid, log)

    topk_idx = make_routing(args, me, device)
    if device.type == "cuda" and hybrid_ep.has_extension():
        kernel = buffer.get_dispatch_layout(topk_idx, args.num_experts)
        ref = hybrid_ep.reference.get_dispatch_layout(topk_idx, args.num_experts, R)
        for name, a, b in zip(
            ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
            (kernel[0], kernel[2], kernel[3]),
            (ref[0], ref[2], ref[3]),
        ):
            assert torch.equal(a, b), f"layout kernel differs from the reference in {name}"
        log("[correctness] layout kernel bitwise equal to the reference on the benchmark routing")
    if args.skip_bench:
        hybrid.destroy()
        buffer.destroy()
        return

    g = torch.Generator(device=device).manual_seed(2000 + me)
    x = torch.randn(args.num_tokens, args.hidden, generator=g, device=device).to(torch.bfloat16)
    topk_weights = torch.rand(args.num_tokens, args.num_topk, generator=g, device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.num_experts)
    layout = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, **layout, config=dispatch_config)
    num_recv = recv_x.size(0)
    bf16_bytes = num_recv * args.hidden * 2
    fp8_bytes = num_recv * (args.hidden + args.hidden // 128 * 4)
    x_fp8 = (
        x.float().clamp(-448, 448).to(torch.float8_e4m3fn),
        torch.ones(args.num_tokens, args.hidden // 128, device=device),
    )
    timing = dict(device=device, num_warmups=args.num_warmups, num_tests=args.num_tests)

    results: dict[str, Any] = {}

    def report(label: str, num_bytes: int, t: tuple[float, float, float], config: Config | None = None) -> dict:
        """Logs and returns the figures of one benchmark (a collective: every rank calls it)."""
        entry = dict(
            gbps=num_bytes / 1e9 / t[0],
            time_us=t[0] * 1e6,
            min_us=t[1] * 1e6,
            max_us=t[2] * 1e6,
            bytes=num_bytes,
            rank_time_us=[v * 1e6 for v in gather_floats(pg, t[0])],
        )
        if on_gpu and config is not None:
            entry["num_sms"] = config.num_sms
        log(
            f"[bench] {label}: {num_bytes / 1e9 / t[0]:.2f} GB/s, t: {t[0] * 1e6:.1f} us "
            f"[min {t[1] * 1e6:.1f}, max {t[2] * 1e6:.1f}], {num_bytes / 1e6:.2f} MB received by rank 0"
        )
        return entry

    def labelled(label: str, config: Config) -> str:
        """Returns: `label` with the SM count on GPUs, e.g. "combine BF16 (20 SMs)", "dispatch BF16 (cached
        handle, 20 SMs)"; unchanged on the CPU, where the reference ignores it."""
        if not on_gpu:
            return label
        if label.endswith(")"):
            return f"{label[:-1]}, {config.num_sms} SMs)"
        return f"{label} ({config.num_sms} SMs)"

    def record(label: str, num_bytes: int, t: tuple[float, float, float], config: Config) -> None:
        label = labelled(label, config)
        results[label] = report(label, num_bytes, t, config)

    t = bench(lambda: buffer.get_dispatch_layout(topk_idx, args.num_experts), **timing)
    log(f"[bench] layout: t: {t[0] * 1e6:.1f} us")
    results["layout"] = dict(time_us=t[0] * 1e6)

    def dispatch_cached(x_in: Any, cached_handle: tuple, config: Config) -> Any:
        return buffer.dispatch(x_in, handle=cached_handle, config=config)

    record(
        "dispatch BF16 (cached handle)",
        bf16_bytes,
        bench(lambda: dispatch_cached(x, handle, dispatch_config), **timing),
        dispatch_config,
    )
    record(
        "dispatch FP8 (cached handle)",
        fp8_bytes,
        bench(lambda: dispatch_cached(x_fp8, handle, dispatch_fp8_config), **timing),
        dispatch_fp8_config,
    )
    record(
        "dispatch BF16 (with layout)",
        bf16_bytes,
        bench(lambda: buffer.dispatch(x, **layout, config=dispatch_config), **timing),
        dispatch_config,
    )
    record(
        "combine BF16",
        bf16_bytes,
        bench(lambda: buffer.combine(recv_x, handle, topk_weights=recv_w, config=combine_config), **timing),
        combine_config,
    )

    # The same calls at each SM count, with the recommended config at that SM count; combine needs the handle of a
    # dispatch with as many SMs (channels).
    sweep = []
    for sweep_dispatch, sweep_combine in sweep_configs:
        sweep_recv_x, _, sweep_recv_w, _, sweep_handle, _ = buffer.dispatch(x, **layout, config=sweep_dispatch)
        num_sms = sweep_dispatch.num_sms
        assert torch.equal(sweep_recv_x.view(torch.int16), recv_x.view(torch.int16)), f"recv_x with {num_sms} SMs"
        dispatch_t = bench(lambda: dispatch_cached(x, sweep_handle, sweep_dispatch), **timing)
        combine_t = bench(
            lambda: buffer.combine(sweep_recv_x, sweep_handle, topk_weights=sweep_recv_w, config=sweep_combine),
            **timing,
        )
        sweep.append(
            {
                "num_sms": num_sms,
                "dispatch BF16 (cached handle)": report(
                    f"SM sweep: dispatch BF16 (cached handle, {num_sms} SMs)", bf16_bytes, dispatch_t, sweep_dispatch
                ),
                "combine BF16": report(f"SM sweep: combine BF16 ({num_sms} SMs)", bf16_bytes, combine_t, sweep_combine),
            }
        )
    if sweep:
        results["sm_sweep"] = sweep

    if device.type == "cuda":
        # The same rows moved by NCCL alone: tokens pre-permuted by destination rank.
        dst, tok = in_rank.t().nonzero(as_tuple=True)
        send = x[tok].contiguous()
        send_counts = in_rank.sum(0).tolist()
        counts = torch.tensor(send_counts, device=device)
        all_counts = [torch.zeros_like(counts) for _ in range(R)]
        dist.all_gather(all_counts, counts, group=pg.group)
        recv_counts = [int(c[me]) for c in all_counts]
        recv = torch.empty(sum(recv_counts), args.hidden, dtype=torch.bfloat16, device=device)
        label = "NCCL all_to_all_single, same rows"
        results[label] = report(
            label,
            bf16_bytes,
            bench(lambda: dist.all_to_all_single(recv, send, recv_counts, send_counts, group=pg.group), **timing),
        )
        # DeepEP's anchor figure: every (token, expert) pair as a row.
        pairs = x.repeat_interleave(args.num_topk, dim=0)
        pair_out = torch.empty_like(pairs)
        label = "NCCL all_to_all_single, one row per (token, expert)"
        results[label] = report(
            label,
            pairs.numel() * 2,
            bench(lambda: dist.all_to_all_single(pair_out, pairs, group=pg.group), **timing),
        )
        # Overlap: the cached dispatch with async_finish=True on the communication stream while a GEMM of the
        # tokens with a [hidden, hidden] weight runs on the compute stream.
        weight = torch.randn(args.hidden, args.hidden, generator=g, device=device).to(torch.bfloat16)
        overlap = time_overlap(
            buffer,
            lambda **kw: buffer.dispatch(x, handle=handle, config=dispatch_config, **kw),
            lambda: torch.matmul(x, weight),
            **timing,
        )
        results["overlap"] = dict(
            dispatch_us=overlap.dispatch_s * 1e6,
            gemm_us=overlap.gemm_s * 1e6,
            sequential_us=overlap.sequential_s * 1e6,
            overlapped_us=overlap.overlapped_s * 1e6,
            hidden_fraction=overlap.hidden_fraction,
        )
        log(
            f"[bench] overlap: dispatch BF16 (cached handle, {dispatch_config.num_sms} SMs)"
            f" {overlap.dispatch_s * 1e6:.1f} us, GEMM [{args.num_tokens}, {args.hidden}] x [{args.hidden},"
            f" {args.hidden}] {overlap.gemm_s * 1e6:.1f} us; one after the other {overlap.sequential_s * 1e6:.1f} us"
            f" (sum of the two alone {(overlap.dispatch_s + overlap.gemm_s) * 1e6:.1f} us), overlapped on two"
            f" streams {overlap.overlapped_s * 1e6:.1f} us ({overlap.hidden_fraction:.0%} of the shorter one hidden)"
        )
    # HybridEPBuffer: the same tokens, routing and weights; cached handles, as Hybrid-EP's test times them.
    E = args.num_experts
    hybrid_routing = dict(topk_idx=topk_idx, topk_weights=topk_weights, num_of_experts=E)
    token, probs, _, plain = hybrid.dispatch(hidden=x, **hybrid_routing)
    assert token.size(0) == num_recv, "HybridEPBuffer receives the rows Buffer receives"
    permuted, permuted_probs, _, _, permute = hybrid.dispatch_with_permute(hidden=x, pad_multiple=32, **hybrid_routing)
    x8, scales = x_fp8[0].view(torch.uint8), x_fp8[1]
    hybrid_runs = [
        ("dispatch BF16 (cached handle)", bf16_bytes, hybrid.dispatch_config,
         lambda: hybrid.dispatch(hidden=x, topk_weights=topk_weights, handle=plain)),
        ("combine BF16", bf16_bytes, hybrid.combine_config, lambda: hybrid.combine(token, probs=probs, handle=plain)),
        ("dispatch_with_permute BF16 (cached handle, non-blocking)", bf16_bytes, hybrid.dispatch_config,
         lambda: hybrid.dispatch_with_permute(hidden=x, topk_weights=topk_weights, handle=permute, non_blocking=True)),
        ("dispatch_with_permute FP8 (cached handle, non-blocking)", fp8_bytes, hybrid.dispatch_fp8_config,
         lambda: hybrid.dispatch_with_permute(hidden=x8, scaling_factor=scales, use_fp8=True, topk_weights=topk_weights,
                                              handle=permute, non_blocking=True)),
        ("combine_with_unpermute BF16", bf16_bytes, hybrid.combine_config,
         lambda: hybrid.combine_with_unpermute(hidden=permuted, probs=permuted_probs, handle=permute)),
    ]  # fmt: skip
    for label, num_bytes, config, fn in hybrid_runs:
        record(f"HybridEPBuffer {label}", num_bytes, bench(fn, **timing), config)

    if args.json and me == 0:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), num_ranks=R, backend=pg.backend, results=results), f, indent=2)
        log(f"[bench] wrote {args.json}")
    hybrid.destroy()
    buffer.destroy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpus = num_gpus()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--num-processes",
        type=int,
        default=gpus if gpus > 0 else 4,
        help="ranks (default: every GPU, or 4 CPU ranks without GPUs)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="auto: NCCL when there are enough GPUs, else gloo on the CPU",
    )
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens per rank (4096 on GPUs, 128 on CPUs)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (7168 on GPUs, 256 on CPUs)")
    parser.add_argument("--num-topk", type=int, default=None, help="experts per token (8 on GPUs, 4 on CPUs)")
    parser.add_argument(
        "--num-experts", type=int, default=None, help="global experts (256 on GPUs, 8 per rank on CPUs)"
    )
    parser.add_argument("--routing", default="uniform", help="uniform, or skewed:F (fraction F goes to rank 0)")
    parser.add_argument(
        "--sm-sweep",
        default=None,
        help="comma-separated even SM counts at which to repeat dispatch BF16 and combine (default 8,12,16,20,24 on "
        "GPUs, none on CPUs; 'none' turns it off)",
    )
    parser.add_argument("--num-warmups", type=int, default=None)
    parser.add_argument("--num-tests", type=int, default=None)
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness pass")
    parser.add_argument("--skip-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--json", default=None, help="write the figures of rank 0 to this JSON file")
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.backend == "auto":
        args.backend = "nccl" if 0 < args.num_processes <= gpus else "gloo"
    if args.backend == "nccl" and args.num_processes > gpus:
        parser.error(f"--backend nccl needs one GPU per process: {args.num_processes} processes, {gpus} GPUs")
    on_gpu = args.backend == "nccl"
    defaults = dict(
        num_tokens=4096 if on_gpu else 128,
        hidden=7168 if on_gpu else 256,
        num_topk=8 if on_gpu else 4,
        num_experts=256 if on_gpu else 8 * args.num_processes,
        num_warmups=10 if on_gpu else 2,
        num_tests=30 if on_gpu else 5,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.sm_sweep is None:
        args.sm_sweep = "8,12,16,20,24" if on_gpu else ""
    sm_sweep = args.sm_sweep.strip().lower()
    try:
        args.sm_sweep = [int(v) for v in sm_sweep.split(",")] if sm_sweep not in ("", "none") else []
    except ValueError:
        parser.error(f"--sm-sweep {sm_sweep!r}: expected comma-separated ints, e.g. 8,12,16")
    for num_sms in args.sm_sweep:
        if num_sms < 2 or num_sms % 2 != 0:
            parser.error(f"--sm-sweep: {num_sms} SMs must be even and at least 2 (blocks work in pairs)")
    if args.num_experts % args.num_processes != 0:
        parser.error(f"--num-experts {args.num_experts} must be divisible by --num-processes {args.num_processes}")
    if args.hidden % 128 != 0:
        parser.error(f"--hidden {args.hidden} must be a multiple of 128 (the FP8 benchmark uses 128-channel scales)")
    if not 1 <= args.num_topk <= min(32, args.num_experts):
        parser.error(f"--num-topk {args.num_topk} must be in [1, min(32, num_experts)]")
    if not (args.routing == "uniform" or args.routing.startswith("skewed")):
        parser.error(f"--routing {args.routing!r}: expected uniform or skewed:F")
    return args


def main() -> None:
    args = parse_args()
    parallel_launch(args.num_processes, run, args, backend=args.backend, timeout_s=1800)


if __name__ == "__main__":
    main()
