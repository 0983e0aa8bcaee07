"""Run ONE benchmark case in this (fresh) process and print its result as a JSON line.

    python -m sdar_benchmarks.worker '{"case": {...Case fields...}, "warmup": 1, "repeats": 3}'

The parent (benchmarks/runner.py) starts one such process per case, so each case's peak RSS
is its own. Output: one line ``RESULT {json}`` with times_s (each timed call, seconds),
peak_bytes (extra peak memory of the first timed call), mem_method, warmup_s and value (the
loss, or the sum of log-probs, as a float: backends of one shape must agree).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from .loss_cases import Case, make_inputs, prepare
from .memory import METHOD_FRESH, PeakMeter

RESULT_PREFIX = "RESULT "


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _value(out) -> float:
    if isinstance(out, tuple):
        out = out[0]
    return float(out.float().sum())


def run(case: Case, warmup: int, repeats: int) -> dict:
    """Warm up, then time ``repeats`` calls; the first timed call is also the memory-measured one."""
    x = make_inputs(case)
    fn = prepare(case, x)
    meter = PeakMeter(case.device)
    if case.backend == "compiled":
        warmup = max(warmup, 1)  # compile time goes to warmup_s, never into the timed calls
    if meter.method == METHOD_FRESH and case.backend != "compiled":
        warmup = 0  # without a peak reset the cold call must be the measured one
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(case.device)
    warmup_s = time.perf_counter() - t0
    times, peak, value = [], 0, float("nan")
    for i in range(max(1, repeats)):
        if i == 0:
            x.hidden.grad = x.weight.grad = None  # freed before the baseline, not during the call
            meter.start()
        t = time.perf_counter()
        out = fn()
        _sync(case.device)
        times.append(time.perf_counter() - t)
        if i == 0:
            peak = meter.stop()
            value = _value(out)
        del out
    return {"times_s": times, "peak_bytes": peak, "mem_method": meter.method, "warmup_s": warmup_s,
            "value": value, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sdar_benchmarks.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    case = Case(**spec["case"])
    result = run(case, int(spec.get("warmup", 1)), int(spec.get("repeats", 3)))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
