"""The GPU check script (benchmarks/gpu/): its CPU dry run, path verification, targets, report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdar_benchmarks.gpu import designs, report

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ["bare bf16 GEMM [N,H]x[H,V]", report.RECOMPUTE, report.THREE_PASS, report.HOPPER, report.LIGER]


def test_quick_dry_run_runs_every_headline_row(tmp_path):
    """--quick on the CPU (TRITON_INTERPRET=1), sampled designs only (~30 s on 2 cores)."""
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/run_gpu_check.py"), "--quick", "--only",
                           "(sampled)", "GRPO"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["checks"] and all(c["ok"] is not False for c in data["checks"]), data["checks"]
    first = [r["design"] for r in data["rows"] if r["N"] == data["rows"][0]["N"]][:len(HEADLINE)]
    assert first == HEADLINE
    failed = {r["design"]: r["error"] for r in data["rows"] if r.get("error")}
    assert not failed, failed
    md = (tmp_path / "gpu_check.md").read_text()
    assert "### (c) targets" in md and "naive bf16 GEMMs" in md


def test_designs_put_headline_rows_first_and_count_passes():
    ds = designs.designs("cpu")
    heads = [d.name for d in ds if d.headline]
    assert heads == HEADLINE[1:] and all(d.headline for d in ds[:len(heads)])
    passes = {d.name: d.passes for d in ds}
    assert passes[report.THREE_PASS] == 3 and passes[report.RECOMPUTE] == 4 and passes[report.LIGER] == 4


def test_verified_names_the_path_that_ran(monkeypatch):
    from sdar_kernels import triton_backend

    monkeypatch.setattr(triton_backend, "stats_backward", lambda *a, **k: None)
    recompute = lambda: triton_backend.stats_backward()  # noqa: E731 - looked up at call time, as linear_stats does
    assert designs.verified(recompute, three_pass=False) is recompute
    with pytest.raises(RuntimeError, match="3-pass path not in this checkout"):
        designs.verified(recompute, three_pass=True)
    with pytest.raises(RuntimeError, match="did not run the Triton recompute backward"):
        designs.verified(lambda: None, three_pass=False)


def test_variant_sets_and_restores_the_switch(monkeypatch):
    monkeypatch.setenv("SDAR_TRITON_VARIANT", "portable")
    with designs.variant("hopper", "cpu"):
        assert os.environ["SDAR_TRITON_VARIANT"] == "hopper"
    assert os.environ["SDAR_TRITON_VARIANT"] == "portable"
    from sdar_kernels.triton_backend import configs

    monkeypatch.setattr(configs, "kernel_variant", lambda device=None: "portable")
    with pytest.raises(RuntimeError, match="answers 'portable'"):
        with designs.variant("hopper", "cpu"):
            pass
    assert os.environ["SDAR_TRITON_VARIANT"] == "portable"


def test_memory_target():
    n, h, v = 16384, 4096, 151936
    want = (2 * (n * h + v * h) + 2 * n * h + 4 * v * h + (1 << 30)) / 2**30
    assert designs.memory_target_gib(n, h, v, False, 1 << 30) == pytest.approx(want)
    assert designs.chunk_bytes("", False) == 1 << 30


def _rows(three_ms: float, peak: float) -> list[dict]:
    n, h, v = 16384, 4096, 151936
    flop = 2 * n * h * v
    gemm = dict(N=n, design="bare bf16 GEMM [N,H]x[H,V]", ms=30.0, passes=1, tflops=flop / 0.030 / 1e12, frac=1.0)
    rows = [gemm]
    for name, ms, passes in ((report.THREE_PASS, three_ms, 3), (report.RECOMPUTE, 200.0, 4),
                             (report.LIGER, 150.0, 4)):
        rate = passes * flop / (ms * 1e-3) / 1e12
        rows.append(dict(N=n, design=name, ms=ms, passes=passes, tflops=rate, frac=rate / gemm["tflops"],
                         peak=peak, target=5.0, error=""))
    rows.append(dict(N=n, design=report.HOPPER, passes=4, target=5.0, error="RuntimeError: no switch"))
    return rows


@pytest.mark.parametrize("three_ms,peak,verdicts", [(140.0, 5.4, ("MET", "MET", "MET")),
                                                    (160.0, 6.0, ("MISSED", "MISSED", "MISSED"))])
def test_targets(three_ms, peak, verdicts):
    got = {t: (m, v) for t, m, v in report.targets(_rows(three_ms, peak))}
    rate = next(v for t, (m, v) in got.items() if t.startswith("3-pass >="))
    mem = next(v for t, (m, v) in got.items() if t.startswith(report.THREE_PASS + ": peak"))
    fast = next(v for t, (m, v) in got.items() if t.startswith(report.THREE_PASS + " faster"))
    assert (rate, mem, fast) == verdicts
    hopper = [v for t, (m, v) in got.items() if t.startswith(report.HOPPER)]
    assert hopper == ["not measured", "not measured"]
    md = report.markdown("test GPU", [{"case": "c", "ok": True, "errors (err/bound)": {"dh": "1e-3/2e-2"}}],
                         _rows(three_ms, peak), 4096, 151936, 3)
    assert "| c | PASS | dh 1e-3/2e-2 | - |" in md and "RuntimeError: no switch" in md


@pytest.mark.parametrize("divergence", ["sampled", "reverse_kl"])
def test_torch_rows_with_16bit_gemms_equal_the_stock_torch_rows(divergence):
    """The torch-rows design is the stock torch row path (its 16-bit GPU GEMMs are TorchRows'
    own): on the CPU it equals a direct call."""
    import torch

    p = designs.make_problem(48, 32, 300, "cpu", teacher=True, seed=3)
    got = designs.torch16_step(p, divergence)()
    ref = designs.sdar_step(p, designs.sdar_config("torch", True, divergence))()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=1e-6)  # bf16 dL/dh, dL/dW
