"""Where does the SDAR loss spend its time? Per-op profile and chunk-size sweep (CPU or GPU).

    python -m sdar_benchmarks.profile_loss --n 4096 --v 16384 --h 896            # op table, naive vs torch
    python -m sdar_benchmarks.profile_loss --n 4096 --v 16384 --sweep 1024x2048 2048x4096

The op table groups torch.profiler self-times into GEMM (aten::mm/addmm/matmul), exp/log,
reductions (max/sum/logsumexp), the online-merge elementwise ops and copies, for one fwd+bwd
call after a warm-up. The sweep times the chunked backend per (token_chunk x vocab_chunk),
interleaved with naive calls so that each ratio is back to back.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Optional

import torch

from .loss_cases import Case, make_inputs, prepare

GROUPS = {"gemm": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"),
          "exp/log": ("aten::exp", "aten::exp_", "aten::log", "aten::logsumexp", "aten::_log_softmax",
                      "aten::_log_softmax_backward_data", "aten::log_softmax"),
          "reduce": ("aten::max", "aten::sum", "aten::amax", "aten::linalg_vecdot", "aten::mul_sum"),
          "index": ("aten::gather", "aten::scatter_add_", "aten::where", "aten::scatter", "aten::index_select",
                    "aten::index_copy"),
          "copy/alloc": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::zeros", "aten::zero_", "aten::empty",
                         "aten::fill_", "aten::clone", "aten::new_zeros", "aten::zeros_like")}


def _group(name: str) -> str:
    for g, names in GROUPS.items():
        if name in names:
            return g
    return "elementwise/other"


def op_profile(case: Case) -> dict[str, float]:
    """Seconds of CPU self time per op group for one call (after one warm-up call)."""
    x = make_inputs(case)
    fn = prepare(case, x)
    fn()
    x.hidden.grad = x.weight.grad = None
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.startswith("cuda") else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
    total = time.perf_counter() - t0
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        out[_group(ev.key)] += ev.self_cpu_time_total / 1e6
    out["wall (profiled)"] = total
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print(f"[{case.label}] top ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f}s" for e in top),
          flush=True)
    return dict(out)


def print_profiles(n: int, v: int, h: int, token_chunk: int, vocab_chunk: int) -> None:
    kw = dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    rows = {"naive": op_profile(Case("loss", "naive", n, v, h, **kw)),
            "rows": op_profile(Case("loss", "torch", n, v, h, **kw)),
            "4-pass": op_profile(Case("loss", "torch", n, v, h, grad_in_forward=False, **kw))}
    keys = sorted(set().union(*rows.values()), key=lambda k: -rows["rows"].get(k, 0))
    print(f"fwd+bwd self time (s) by op group, N={n} V={v} H={h}, chunks {token_chunk}x{vocab_chunk}")
    print(f"{'group':20s} " + " ".join(f"{name:>9s}" for name in rows))
    for k in keys:
        print(f"{k:20s} " + " ".join(f"{r.get(k, 0.0):9.2f}" for r in rows.values()))


def _time(case: Case) -> float:
    x = make_inputs(case)
    fn = prepare(case, x)
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sweep(n: int, v: int, h: int, chunks: list[tuple[int, int]]) -> None:
    """Time ratio torch/naive per chunk setting for both torch paths (grad-in-forward rows, and
    the 4-pass chunked stats + recompute backward); naive re-timed next to each setting."""
    print(f"chunk sweep N={n} V={v} H={h} (each ratio: torch call vs a naive call right before it)")
    for tc, vc in chunks:
        naive = _time(Case("loss", "naive", n, v, h))
        rows = _time(Case("loss", "torch", n, v, h, token_chunk=tc, vocab_chunk=vc))
        four = _time(Case("loss", "torch", n, v, h, token_chunk=tc, vocab_chunk=vc, grad_in_forward=False))
        print(f"token_chunk={tc:6d} vocab_chunk={vc:6d}  naive {naive:7.2f} s | rows (grad-in-fwd) {rows:7.2f} s "
              f"x{rows / naive:4.2f} | 4-pass {four:7.2f} s x{four / naive:4.2f}", flush=True)


def _chunk(text: str) -> tuple[int, int]:
    try:
        tc, vc = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunk {text!r} is invalid; expected TOKENSxVOCAB, e.g. 1024x2048")
    return tc, vc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=16384)
    ap.add_argument("--h", type=int, default=896)
    ap.add_argument("--chunk", type=_chunk, default=(1024, 2048))
    ap.add_argument("--sweep", type=_chunk, nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.sweep:
        sweep(args.n, args.v, args.h, args.sweep)
    else:
        print_profiles(args.n, args.v, args.h, *args.chunk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
