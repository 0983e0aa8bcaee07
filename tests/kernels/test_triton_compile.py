"""Compile gate (no GPU): the dispatcher's bf16 kernel specializations compile for sm_90a and
sm_80 without register spills, within shared memory, and with wgmma on sm_90a.

Runs `python -m sdar_kernels.triton_backend.compile_report --json` in a subprocess without
TRITON_INTERPRET (the interpreter replaces compiled kernels). By default the most demanding
variant per (kernel, divergence) is compiled (--quick, ~30 s); SDAR_COMPILE_GATE=full
compiles every specialization (~3 min; benchmarks/KERNELS_COMPILE.md is that run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HIDDEN = (896, 1536, 2048, 3584, 4096, 5120, 8192)
SMEM = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sdar_kernels.triton_backend.compile_report", "--json"]
    if os.environ.get("SDAR_COMPILE_GATE", "quick") != "full":
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out, f"compile_report printed no rows (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


def test_every_h_arch_and_kernel_is_covered(rows: list[dict]) -> None:
    seen = {(r["arch"], r["H"], r["kernel"]) for r in rows}
    want = {(a, h, k) for a in (90, 80) for h in HIDDEN for k in ("fwd", "jsd", "bwd", "row_stats", "row_dz")}
    assert want <= seen, f"missing specializations: {sorted(want - seen)[:10]}"
    divs = {(r["kernel"], r["flags"].split("DIV=")[-1]) for r in rows if "DIV=" in r["flags"]}
    assert {(k, d) for k in ("fwd", "bwd", "row_stats", "row_dz") for d in "0123"} <= divs


def test_no_register_spills(rows: list[dict]) -> None:
    bad = [(r["arch"], r["kernel"], r["H"], r["flags"], r["config"], r["spills"]) for r in rows if r["spills"]]
    assert not bad, f"register spills (arch, kernel, H, flags, config, bytes): {bad[:8]}"


def test_shared_memory_fits(rows: list[dict]) -> None:
    bad = [(r["arch"], r["kernel"], r["H"], r["config"], r["smem"]) for r in rows if r["smem"] > SMEM[r["arch"]]]
    assert not bad, f"shared memory over the limit: {bad[:8]}"
    assert all(r["regs"] <= 255 for r in rows)


def test_hopper_ptx_uses_wgmma(rows: list[dict]) -> None:
    bad = [(r["kernel"], r["H"], r["flags"], r["config"]) for r in rows if r["arch"] == 90 and r["wgmma"] is False]
    assert all(r["wgmma"] is None for r in rows if r["kernel"].startswith("row_"))  # no tl.dot there
    assert not bad, f"sm_90a PTX without wgmma: {bad[:8]}"


def test_hopper_variant_uses_tma_and_wgmma_on_sm90_only(rows: list[dict]) -> None:
    """The Hopper variant (hopper_kernels.py) is compiled for sm_90a at every H, with TMA
    descriptors (cp.async.bulk.tensor) and wgmma in its PTX; it is never built for sm_80."""
    hopper = [r for r in rows if r["kernel"].endswith("_hopper")]
    seen = {(r["H"], r["kernel"]) for r in hopper if r["arch"] == 90}
    assert {(h, k) for h in HIDDEN for k in ("fwd_hopper", "jsd_hopper", "bwd_hopper")} <= seen
    assert not [r for r in hopper if r["arch"] != 90], "Hopper variant compiled for sm_80"
    bad = [(r["kernel"], r["H"], r["flags"]) for r in hopper if not (r["tma"] and r["wgmma"])]
    assert not bad, f"Hopper variant without TMA or wgmma: {bad[:8]}"
