"""Compile gate and report: every bf16 specialization the dispatcher launches, for sm_90a and sm_80.

    python -m sdar_kernels.triton_backend.compile_report [--quick] [--out benchmarks/KERNELS_COMPILE.md]

Needs no GPU (Triton ships ptxas). Checks: no register spills, shared memory within the
architecture's limit, and `wgmma` in the sm_90a PTX. Exit status 1 when a check fails.
--quick compiles only the most demanding variant per (kernel, divergence) (the CI test).
--json prints one JSON object per compiled specialization (used by the test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from datetime import datetime, timezone

from tqdm import tqdm

from .compile_check import SM80, SM90, SMEM_LIMIT, CompileResult, compile_variant, launch_variants

HIDDEN_SIZES = (896, 1536, 2048, 3584, 4096, 5120, 8192)
TARGETS = {90: SM90, 80: SM80}


def gate_failures(arch: int, res: CompileResult, family: str = "") -> list[str]:
    """Human-readable reasons a compiled specialization fails the gate (empty = pass)."""
    bad = []
    if res.spills:
        bad.append(f"{res.spills} bytes of register spills")
    if res.smem > SMEM_LIMIT[arch]:
        bad.append(f"shared memory {res.smem} B > {SMEM_LIMIT[arch]} B")
    if arch == 90 and res.wgmma is False:  # None: a kernel without tl.dot
        bad.append("no wgmma in sm_90a PTX")
    if arch == 90 and family.endswith("_hopper") and not res.tma:
        bad.append("no TMA (cp.async.bulk.tensor) in the Hopper variant's sm_90a PTX")
    return bad


def run(quick: bool, hidden_sizes=HIDDEN_SIZES) -> list[dict]:
    """Compile each distinct specialization once; one row per (arch, H, variant)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_report: unset TRITON_INTERPRET (it replaces kernels by the interpreter)")
    jobs = [(arch, h, v) for arch in TARGETS for h in hidden_sizes
            for v in launch_variants(h, arch, full=not quick)]
    cache: dict = {}
    rows = []
    for arch, h, v in tqdm(jobs, desc="compile", unit="spec", file=sys.stderr):
        key = (arch, v.family, v.flags)
        if key not in cache:
            cache[key] = compile_variant(v, TARGETS[arch])
        res = cache[key]
        rows.append(dict(arch=arch, H=h, kernel=v.family, flags=v.flag_label(),
                         config=v.config.label(), regs=res.regs, spills=res.spills,
                         smem=res.smem, wgmma=res.wgmma, tma=res.tma,
                         failures=gate_failures(arch, res, v.family)))
    return rows


def summary_table(rows: list[dict]) -> list[str]:
    """Per (arch, kernel, H): tile configs, max registers, total spills, max smem."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["kernel"], r["H"])].append(r)
    out = ["| target | kernel | H | tile configs (BNxBVxBK warps stages) | variants | max regs "
           "| spills (B) | max smem (KB) | wgmma |", "|---|---|---|---|---|---|---|---|---|"]
    for (arch, kernel, h), rs in sorted(groups.items(), key=lambda x: (-x[0][0], x[0][1], x[0][2])):
        configs = " / ".join(sorted({r["config"] for r in rs}))
        wg = ("n/a" if all(r["wgmma"] is None for r in rs) else "all" if all(r["wgmma"] for r in rs)
              else ("none" if arch == 80 else "MISSING"))
        out.append(f"| sm_{arch}{'a' if arch == 90 else ''} | {kernel} | {h} | {configs} | {len(rs)} "
                   f"| {max(r['regs'] for r in rs)} | {sum(r['spills'] for r in rs)} "
                   f"| {max(r['smem'] for r in rs) / 1024:.0f} | {wg} |")
    return out


def detail_table(rows: list[dict]) -> list[str]:
    """One line per distinct compiled specialization (H values it serves merged)."""
    merged: dict = {}
    for r in rows:
        key = (r["arch"], r["kernel"], r["flags"], r["config"])
        merged.setdefault(key, dict(r, Hs=[]))["Hs"].append(r["H"])
    out = ["| target | kernel | flags | H | tile config | regs | spills (B) | smem (KB) | wgmma |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (arch, kernel, flags, cfg), r in sorted(merged.items(), key=lambda x: (-x[0][0], x[0][1:])):
        hs = ",".join(str(h) for h in r["Hs"])
        out.append(f"| sm_{arch}{'a' if arch == 90 else ''} | {kernel} | {flags} | {hs} | {cfg} | {r['regs']} | {r['spills']} "
                   f"| {r['smem'] / 1024:.0f} | {'n/a' if r['wgmma'] is None else 'yes' if r['wgmma'] else 'no'} |")
    return out


def write_markdown(rows: list[dict], path: str, quick: bool) -> None:
    import triton
    fails = [r for r in rows if r["failures"]]
    lines = ["# Triton kernel compile report (bf16)", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`python -m sdar_kernels.triton_backend.compile_report{' --quick' if quick else ''}` "
             f"with Triton {triton.__version__} (bundled ptxas), no GPU. Targets: sm_90a "
             f"(H100/H200, smem limit 227 KB) and sm_80 (A100, 163 KB). Registers and spills "
             f"are from `ptxas -v`; smem from Triton's metadata. Teacher H_T = H.",
             "", f"Gate: no spills, smem within limit, `wgmma` in sm_90a PTX. "
             f"Result: **{'PASS' if not fails else f'FAIL ({len(fails)} rows)'}**.", "",
             "Kernels: `fwd` = stats_fwd_kernel (DIV 0 none, 1 reverse_kl, 2 forward_kl, "
             "3 jsd pass 1), `jsd` = jsd_fwd_kernel (jsd pass 2), `bwd` = dlogits_kernel; "
             "`row_stats` / `row_dz` = the 3-pass path's row kernels (no tl.dot: wgmma n/a). "
             "`*_hopper` = the Hopper variant (hopper_kernels.py, SDAR_TRITON_VARIANT=hopper; "
             "sm_90a only, TMA descriptors: the gate also requires `cp.async.bulk.tensor`).", "",
             "## Summary per kernel family and H", ""]
    lines += summary_table(rows) + ["", "## Every distinct specialization", ""] + detail_table(rows)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="most demanding variant per mode only")
    ap.add_argument("--out", default=None, help="markdown path (e.g. benchmarks/KERNELS_COMPILE.md)")
    ap.add_argument("--json", action="store_true", help="print rows as JSON lines")
    ap.add_argument("--hidden", type=int, nargs="*", default=list(HIDDEN_SIZES))
    args = ap.parse_args(argv)
    rows = run(args.quick, tuple(args.hidden))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if args.out:
        write_markdown(rows, args.out, args.quick)
        print(f"wrote {args.out} ({len(rows)} rows)", file=sys.stderr)
    fails = [r for r in rows if r["failures"]]
    for r in fails:
        print(f"GATE FAIL sm_{r['arch']} {r['kernel']} H={r['H']} {r['flags']} {r['config']}: "
              f"{'; '.join(r['failures'])}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
