"""``python -m sdar_benchmarks.cli`` (and ``sdar bench``): run a suite, write CSV, markdown and plots.

    python -m sdar_benchmarks.cli --suite loss                 # CPU: acceptance case + grid (see grids.py)
    python -m sdar_benchmarks.cli --suite all --quick          # every suite, small shapes
    python -m sdar_benchmarks.cli --suite loss --grid quick --token-chunk 2048 --vocab-chunk 4096
    python -m sdar_benchmarks.cli --suite memory --max-gb 12   # one training step's peak vs tokens (step_memory.py)

Results go to ``--out`` (default runs/bench-<UTC timestamp>): results.csv, results.md, *.png,
meta.json. Every kernel comparison is a ratio vs the naive backend measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
from typing import Optional

SUITES = ("loss", "logprobs", "trainer", "envs", "memory", "trl", "all")  # "all" leaves memory and trl out
log = logging.getLogger("sdar_bench")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    from .grids import GRIDS
    from .loss_cases import BACKENDS
    from .step_memory import DEFAULT_MMAP_THRESHOLD
    from .step_memory_worker import LAYOUTS as MEM_LAYOUTS
    from .step_memory_worker import PATHS as MEM_PATHS

    ap = argparse.ArgumentParser(prog="sdar bench", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="loss", choices=SUITES)
    ap.add_argument("--out", default=None, help="results directory (default runs/bench-<timestamp>)")
    ap.add_argument("--quick", action="store_true", help="small shapes / few samples (minutes on 2 CPU cores)")
    ap.add_argument("--grid", choices=GRIDS, default=None, help="kernel shape grid (default: gpu on CUDA, "
                    "cpu otherwise; quick with --quick)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--token-chunk", type=int, default=1024)
    ap.add_argument("--vocab-chunk", type=int, default=2048)
    ap.add_argument("--case-timeout", type=float, default=1800, help="seconds per kernel case")
    ap.add_argument("--no-progress", action="store_true")
    mem = ap.add_argument_group("memory suite (benchmarks/step_memory.py)")
    mem.add_argument("--max-gb", type=float, default=8.0, help="GiB one case may use; larger ones are extrapolated")
    mem.add_argument("--mem-paths", nargs="+", choices=MEM_PATHS, default=list(MEM_PATHS))
    mem.add_argument("--mem-layouts", nargs="+", choices=MEM_LAYOUTS, default=list(MEM_LAYOUTS))
    mem.add_argument("--mmap-threshold", type=int, default=DEFAULT_MMAP_THRESHOLD,
                     help="glibc MALLOC_MMAP_THRESHOLD_ of the CPU workers in bytes (0 = glibc's dynamic default)")
    trl = ap.add_argument_group("trl suite (benchmarks/trl_step.py; also uses --repeats, --warmup, --max-gb)")
    trl.add_argument("--trl-paths", nargs="+", choices=("trl", "adapter", "direct", "trl_tiled"), default=None,
                     help="default: trl and adapter (direct when sdar_kernels.integrations.trl is absent)")
    trl.add_argument("--trl-loss-types", nargs="+", choices=("grpo", "bnpo", "dapo"), default=["grpo"])
    if argv and argv[0] == "--":  # `sdar bench -- --suite loss` forwards the separator
        argv = argv[1:]
    args = ap.parse_args(argv)
    for name in ("warmup", "repeats", "token_chunk", "vocab_chunk"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; expected an integer >= "
                     f"{0 if name == 'warmup' else 1}")
    if not args.max_gb > 0 or args.mmap_threshold < 0:
        ap.error(f"--max-gb={args.max_gb} / --mmap-threshold={args.mmap_threshold} is invalid; expected GiB > 0 "
                 "and bytes >= 0")
    return args


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_kernels(args: argparse.Namespace, suites: list[str]) -> list[dict]:
    from .grids import cases
    from .runner import run_cases

    device = _device(args)
    grid = args.grid or ("quick" if args.quick else ("gpu" if device.startswith("cuda") else "cpu"))
    todo = [c for s in suites for c in cases(s, grid, device, args.dtype, args.backends,
                                                args.token_chunk, args.vocab_chunk)]
    log.info("kernel suites %s on grid %s (%s): %d cases", suites, grid, device, len(todo))
    return run_cases(todo, args.warmup, args.repeats, progress=not args.no_progress, timeout_s=args.case_timeout)


def run_trainer(args: argparse.Namespace) -> list[dict]:
    from .trainer_cases import bench_layouts, make_samples, missing_piece, tiny_model

    reason = missing_piece()
    if reason:
        log.warning("trainer suite skipped: %s", reason)
        return []
    count = 8 if args.quick else 32
    samples = make_samples(count, vocab=2048, prompt_len=(16, 192), response_len=(8, 96))
    rows = bench_layouts(samples, tiny_model(), max_tokens=4096, per_batch=8, row_tokens=512,
                         repeats=1 if args.quick else 3)
    for r in rows:
        log.info("trainer %-13s pad %.3f  %.1f tok/s  x%.2f vs padded", r["layout"], r["pad_frac"],
                 r["tokens_per_s"], r["speedup_vs_padded"])
    return rows


def run_envs(args: argparse.Namespace) -> list[dict]:
    """Env steps/s per environment and policy, reusing benchmarks/bench_envs.py."""
    try:
        import sdar_envs

        from . import bench_envs
    except Exception as exc:  # noqa: BLE001 - report, do not crash the other suites
        log.warning("envs suite skipped: %r", exc)
        return [{"env": "all", "status": "skipped", "reason": repr(exc)}]
    rows, batch = [], 4 if args.quick else bench_envs.BATCH
    for name, status in sdar_envs.available().items():
        if status != "ok":
            rows.append({"env": name, "status": "skipped", "reason": status})
            continue
        with sdar_envs.make(name, split="test", seed=0) as env:
            for pname in bench_envs.POLICIES:
                pol = bench_envs.expert_policy if pname == "expert" else bench_envs.random_policy(0)
                r = bench_envs.play(env, pol, batch)
                rows.append({"env": name, "policy": pname, "batch": batch, "env_steps": r.env_steps,
                             "steps_per_s": r.steps_per_s, "reset_s": r.reset_s, "win_rate": r.win_rate,
                             "mean_score": r.mean_score, "status": "ok", "reason": ""})
                log.info("env %-9s %-6s %.1f steps/s", name, pname, r.steps_per_s)
    return rows


def write_results(out: str, meta: dict, kernel_rows: list[dict], trainer_rows: list[dict],
                  env_rows: list[dict]) -> str:
    from .plots import write_plots
    from .report import ENV_COLUMNS, KERNEL_COLUMNS, TRAINER_COLUMNS, markdown_report, write_csv

    os.makedirs(out, exist_ok=True)
    if kernel_rows:
        write_csv(kernel_rows, os.path.join(out, "results.csv"), KERNEL_COLUMNS)
    if trainer_rows:
        write_csv(trainer_rows, os.path.join(out, "trainer.csv"), TRAINER_COLUMNS)
    if env_rows:
        write_csv(env_rows, os.path.join(out, "envs.csv"), ENV_COLUMNS)
    plots = write_plots(kernel_rows, trainer_rows, out)
    md = markdown_report(meta, kernel_rows, trainer_rows, env_rows, plots)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return md


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns 0 when every requested suite ran (skips are fine), 1 if a case failed."""
    from .report import acceptance_lines, code_version, machine_info

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", f"bench-{stamp}")
    shown = sys.argv[1:] if argv is None else argv
    meta = {"command": "python -m sdar_benchmarks.cli " + shlex.join(shown), "machine": machine_info(),
            "code": code_version()}
    t0 = time.perf_counter()
    if args.suite == "trl":
        from .trl_step import run_suite as run_trl

        rows, _ = run_trl(out, meta, quick=args.quick, device=_device(args), paths=args.trl_paths,
                          loss_types=args.trl_loss_types, repeats=args.repeats, warmup=args.warmup,
                          max_gb=args.max_gb, mmap_threshold=args.mmap_threshold, timeout_s=args.case_timeout,
                          progress=not args.no_progress)
        log.info("results in %s (%.0f s)", out, time.perf_counter() - t0)
        return 1 if any(r["status"] == "failed" for r in rows) else 0
    if args.suite == "memory":
        from .step_memory import run_suite

        rows, _ = run_suite(out, meta, quick=args.quick, device=_device(args), max_gb=args.max_gb,
                            paths=args.mem_paths, layouts=args.mem_layouts, mmap_threshold=args.mmap_threshold,
                            timeout_s=args.case_timeout, progress=not args.no_progress)
        log.info("results in %s (%.0f s)", out, time.perf_counter() - t0)
        return 1 if any(r["status"] == "failed" for r in rows) else 0
    suites = ["loss", "logprobs"] if args.suite == "all" else [args.suite]
    kernel_rows = run_kernels(args, [s for s in suites if s in ("loss", "logprobs")]) \
        if any(s in ("loss", "logprobs") for s in suites) else []
    trainer_rows = run_trainer(args) if args.suite in ("trainer", "all") else []
    env_rows = run_envs(args) if args.suite in ("envs", "all") else []
    meta["wall_s"] = time.perf_counter() - t0
    try:  # a shared machine: the load at the end says how noisy the absolute times are
        meta["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    write_results(out, meta, kernel_rows, trainer_rows, env_rows)
    for line in acceptance_lines(kernel_rows) if kernel_rows else []:
        log.info(line)
    log.info("results in %s (%.0f s)", out, meta["wall_s"])
    failed = [r for r in kernel_rows if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
