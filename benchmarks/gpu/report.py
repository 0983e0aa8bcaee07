"""Markdown of the GPU check: correctness rows, the timing table, the issue's targets evaluated.

Timing row fields: N, design, ms (median), peak (GiB: allocator peak of the step above what was
resident before it, plus the bytes of the inputs it reads), target (GiB, designs.memory_target_gib),
passes, tflops (passes x 2NHV / time), frac (of the bare GEMM rate measured at the same N),
ours, error.
"""
from __future__ import annotations

import math
import time
from typing import Optional

HEADLINE_N = 16384
RATE_GOAL = 0.60  # 3-pass path: fraction of the bare GEMM rate over its 3 passes
MEMORY_GOAL = 1.10  # peak <= 1.1 x (inputs + dL/dh + fp32 dL/dW + one chunk)
THREE_PASS = "ours triton 3-pass (sampled)"
RECOMPUTE = "ours triton recompute (sampled)"
HOPPER = "ours triton recompute, hopper variant (sampled)"
LIGER = "liger chunked GRPO (matched)"


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _ok(r: Optional[dict]) -> bool:
    return r is not None and not r.get("error") and r.get("ms") is not None


def _find(rows: list[dict], n: int, design: str) -> Optional[dict]:
    return next((r for r in rows if r["N"] == n and r["design"] == design), None)


def _verdict(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("MET" if ok else "MISSED")


def targets(rows: list[dict], n: int = HEADLINE_N) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) of the issue's three goals at N = ``n``."""
    out = []
    three, liger = _find(rows, n, THREE_PASS), _find(rows, n, LIGER)
    ok = _ok(three) and not math.isnan(three.get("frac", float("nan")))
    out.append((f"3-pass >= {RATE_GOAL:.0%} of the bare GEMM rate over its 3 passes (N={n})",
                f"{three['frac']:.2f} ({three['tflops']:.3g} TFLOP/s)" if ok else _why(three),
                _verdict(three["frac"] >= RATE_GOAL if ok else None)))
    for name in (THREE_PASS, RECOMPUTE, HOPPER):
        r = _find(rows, n, name)
        fine = _ok(r) and not math.isnan(r.get("peak", float("nan")))
        out.append((f"{name}: peak <= {MEMORY_GOAL} x (inputs + dL/dh + fp32 dL/dW + one chunk) (N={n})",
                    f"{r['peak']:.2f} GiB = {r['peak'] / r['target']:.2f} x {r['target']:.2f}" if fine
                    else ("peak not measured off CUDA" if _ok(r) else _why(r)),
                    _verdict(r["peak"] <= MEMORY_GOAL * r["target"] if fine else None)))
    for name in (THREE_PASS, RECOMPUTE, HOPPER):
        r = _find(rows, n, name)
        both = _ok(r) and _ok(liger)
        out.append((f"{name} faster than Liger chunked GRPO on the same tokens (N={n})",
                    f"{r['ms']:.1f} ms vs {liger['ms']:.1f} ms (x{liger['ms'] / r['ms']:.2f})" if both
                    else _why(r if not _ok(r) else liger),
                    _verdict(r["ms"] < liger["ms"] if both else None)))
    return out


def _why(r: Optional[dict]) -> str:
    if r is None:
        return "row not run"
    return (r.get("error") or "no time")[:120]


def markdown(device_name: str, checks: list[dict], rows: list[dict], h: int, v: int, reps: int) -> str:
    lines = [f"## GPU check of the fused SDAR loss on {device_name} "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", "### (a) correctness vs the float64 oracle, bitwise determinism", "",
             "| case | ok | errors (err/bound) | s |", "|---|---|---|---|"]
    for c in checks:
        detail = c.get("error") or ", ".join(f"{k} {v}" for k, v in c.get("errors (err/bound)", {}).items())
        verdict = "skipped" if c["ok"] is None else ("PASS" if c["ok"] else "FAIL")
        lines.append(f"| {c['case']} | {verdict} | {detail} | {c.get('s', '-')} |")
    lines += ["", f"### (b) fwd+bwd, H={h}, V={v}, bf16 (median of {reps} after a warm-up; headline rows first)", "",
              "| N | design | ms | peak GiB | target GiB | peak/target | GEMM passes | TFLOP/s | frac of GEMM "
              "| error |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["peak"] / r["target"] if _ok(r) and r.get("target") and not math.isnan(r.get("peak", float("nan"))) \
            else None
        lines.append(f"| {r['N']} | {r['design']} | {_fmt(r.get('ms'), '.1f')} | {_fmt(r.get('peak'), '.2f')} "
                     f"| {_fmt(r.get('target'), '.2f')} | {_fmt(ratio, '.2f')} | {r.get('passes', '-')} "
                     f"| {_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('frac'), '.2f')} | {r.get('error', '')} |")
    n = max((r["N"] for r in rows), default=HEADLINE_N)
    lines += ["", f"### (c) targets (issue #10) at N={n}", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {verdict} |" for t, m, verdict in targets(rows, n)]
    lines += ["", "target GiB = inputs + bf16 dL/dh + fp32 dL/dW + one working chunk (the 1 GiB default scratch of "
              "the recompute backward / fp32 row buffer of the 3-pass path, x2 with a teacher). TFLOP/s counts "
              "GEMM passes x 2NHV. Liger rows: liger-kernel settings in benchmarks/liger_grpo.py."]
    return "\n".join(lines)
