"""One prepared GPU check of the fused SDAR loss (issue #10): correctness first, then timings.

    python benchmarks/gpu/run_gpu_check.py            # one H100/H200, <= 8 minutes
    python benchmarks/gpu/run_gpu_check.py --quick    # CPU dry run, tiny shapes (TRITON_INTERPRET=1)

(a) correctness (checks.py): Triton statistics kernels and the public loss on each of our paths
    (recompute, 3-pass, Hopper variant) vs the float64 oracle, small shapes and V = 151936;
    bitwise determinism (two calls, torch.equal).
(b) fwd+bwd timings at H = 4096, V = 151936, bf16 (designs.py), N = 16384 first, headline rows
    first: bare bf16 GEMM (the rate), ours Triton recompute, ours 3-pass, ours recompute with
    the Hopper variant, Liger chunked GRPO (matched settings); then naive (bf16 GEMMs), torch
    rows with bf16 GEMMs, the reverse-KL teacher rows and Liger's fused-linear JSD; then N = 4096.
(c) the markdown table (ms, peak GiB, memory target, TFLOP/s over the row's GEMM passes,
    fraction of the bare GEMM rate) and the issue's targets evaluated (report.py).
A failing design (a path missing from this checkout, OOM, API drift) is a row with its error,
never a crash. Past --budget-s the remaining rows are recorded as skipped.
Output: stdout, and $OUT/gpu_check.md + $OUT/gpu_check.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--quick" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # CPU dry run: Triton kernels in the interpreter

ROOT = Path(__file__).resolve().parents[2]


def _ensure_importable() -> None:
    """Import sdar_kernels and sdar_benchmarks from this checkout even when nothing is installed (a
    bare GPU machine gets the working tree only): the checkout on sys.path, benchmarks/ linked as
    sdar_benchmarks."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import sdar_benchmarks  # noqa: F401
        import sdar_kernels  # noqa: F401
        return
    except ImportError:
        pass
    import tempfile
    shim = Path(tempfile.mkdtemp(prefix="sdar_shim_"))
    (shim / "sdar_benchmarks").symlink_to(ROOT / "benchmarks")
    sys.path.insert(0, str(shim))


_ensure_importable()

import torch  # noqa: E402

from sdar_benchmarks.gpu import checks, designs, report  # noqa: E402
from sdar_benchmarks.gpu.designs import GIB  # noqa: E402

CHECK_SHARE = 0.35  # of --budget-s for part (a); the timings get the rest and whatever (a) left


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_step(step, reps: int, device: str, input_bytes: int) -> tuple[float, float]:
    """(median ms over ``reps`` calls after one warm-up, peak GiB): the peak is the memory the step
    allocates above what was resident before it, plus the bytes of the inputs it reads (tensors
    prepared for other designs do not count). NaN peak off CUDA."""
    step()
    cuda = device == "cuda"
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base + input_bytes) / GIB if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak


def _row(n: int, d: designs.Design, h: int, v: int) -> dict:
    chunk = designs.chunk_bytes(d.chunk, d.teacher)
    return dict(N=n, design=d.name, passes=d.passes, ours=d.ours,
                target=designs.memory_target_gib(n, h, v, d.teacher, chunk))


def run_timings(quick: bool, device: str, only: list[str] | None, deadline: float) -> tuple[list[dict], int, int, int]:
    """Rows of part (b), N descending, headline designs first within each N."""
    h, v = (32, 200) if quick else (4096, 151936)
    sizes = (32, 16) if quick else (16384, 4096)
    reps = 1 if quick else 3
    order = sorted(designs.designs(device), key=lambda d: not d.headline)  # stable: issue order kept
    rows = []
    for n in sizes:
        p = designs.make_problem(n, h, v, device, teacher=True)
        gemm_rate = float("nan")
        try:
            ms, peak = time_step(designs.gemm_step(p), reps, device, designs.input_bytes(p, False))
            gemm_rate = 2 * n * h * v / (ms * 1e-3) / 1e12
            rows.append(dict(N=n, design="bare bf16 GEMM [N,H]x[H,V]", ms=ms, peak=peak, passes=1,
                             tflops=gemm_rate, frac=1.0, target=float("nan"), ours=False, error=""))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(N=n, design="bare bf16 GEMM [N,H]x[H,V]", passes=1, error=checks.short_error(exc)))
        log(f"N={n} {rows[-1]}")
        for d in order:
            if only and not any(part in d.name for part in only):
                continue
            row = _row(n, d, h, v)
            if time.time() > deadline:
                row["error"] = "skipped: past the time budget"
                rows.append(row)
                continue
            try:
                ms, peak = time_step(d.build(p), reps, device, designs.input_bytes(p, d.teacher))
                rate = d.passes * 2 * n * h * v / (ms * 1e-3) / 1e12
                row.update(ms=ms, peak=peak, tflops=rate, frac=rate / gemm_rate, error="")
            except Exception as exc:  # noqa: BLE001 - missing path, OOM, API drift: recorded
                row["error"] = checks.short_error(exc)
            log(f"N={n} {row}")
            rows.append(row)
            free()
        del p
        free()
    return rows, h, v, reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU dry run with tiny shapes")
    ap.add_argument("--only", nargs="+", default=None, help="time only designs whose name contains one of these")
    ap.add_argument("--skip-check", action="store_true", help="skip part (a)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining checks / timings once this many seconds have passed")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error(f"--budget-s={args.budget_s} is invalid; expected a number of seconds > 0")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run, TRITON_INTERPRET=1)"
    log(f"device={name} torch={torch.__version__} quick={args.quick}")
    if device == "cpu" and not args.quick:
        log("no CUDA device: use --quick for a CPU dry run")
        return 2
    t0 = time.time()
    checks_rows = [] if args.skip_check else checks.run_checks(
        args.quick, device, t0 + CHECK_SHARE * args.budget_s, log)
    rows, h, v, reps = run_timings(args.quick, device, args.only, t0 + args.budget_s)
    text = report.markdown(name, checks_rows, rows, h, v, reps)
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.md").write_text(text + "\n")
        Path(out, "gpu_check.json").write_text(json.dumps({"device": name, "checks": checks_rows, "rows": rows,
                                                           "targets": report.targets(rows, max(r["N"] for r in rows))},
                                                          indent=1, default=str))
    failed = [c for c in checks_rows if c["ok"] is False]
    log(f"done in {time.time() - t0:.0f} s; correctness {'FAIL' if failed else 'PASS'} "
        f"({len(checks_rows) - len(failed)}/{len(checks_rows)} not failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
