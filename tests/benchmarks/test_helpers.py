"""Unit tests of the benchmark helpers: cases, memory meter, ratios, tables, plots."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from sdar_benchmarks.grids import ACCEPTANCE, cases
from sdar_benchmarks.loss_cases import Case, make_inputs, naive_loss, loss_config, skip_reason
from sdar_benchmarks.memory import METHOD_FRESH, PeakMeter, measure_peak
from sdar_benchmarks.plots import write_plots
from sdar_benchmarks.report import acceptance_lines, kernel_table, write_csv
from sdar_benchmarks.runner import add_ratios


def _row(backend, time_s, peak, n=4096, v=151936, h=896, status="ok", value=1.0):
    return {"suite": "loss", "backend": backend, "n": n, "v": v, "h": h, "dtype": "float32", "device": "cpu",
            "status": status, "reason": "", "time_s": time_s, "peak_mib": peak, "value": value,
            "mem_method": "rss-hwm-reset", "repeats": 1}


@pytest.mark.parametrize("field,value", [("suite", "train"), ("backend", "cuda"), ("n", 0), ("dtype", "fp8")])
def test_case_rejects_bad_fields(field, value):
    kw = dict(suite="loss", backend="torch", n=8, v=16, h=4)
    kw[field] = value
    with pytest.raises(ValueError, match=f"Case.{field}="):
        Case(**kw)


def test_skip_reasons():
    assert "CUDA" in skip_reason(Case("loss", "triton", 8, 16, 4))
    big = Case("loss", "naive", 4096, 151936, 896)
    assert "budget" in skip_reason(big, memory_budget=2**30)
    assert skip_reason(Case("loss", "torch", 8, 16, 4)) is None


def test_cpu_grid_starts_with_the_acceptance_case():
    cs = cases("loss", "cpu")
    assert (cs[0].n, cs[0].v, cs[0].h) == ACCEPTANCE and cs[0].backend == "naive"
    assert (cs[1].n, cs[1].v, cs[1].h, cs[1].backend) == (*ACCEPTANCE, "torch")
    assert all(c.dtype == "float32" for c in cs)


def test_naive_loss_matches_the_fused_loss():
    case = Case("loss", "torch", 32, 300, 16)
    x = make_inputs(case)
    from sdar_kernels import fused_linear_sdar_loss

    fused = fused_linear_sdar_loss(x.hidden, x.weight, x.targets, x.advantages, x.old_logprobs, x.loss_mask,
                                   teacher_logprobs=x.teacher_logprobs, ref_logprobs=x.ref_logprobs,
                                   config=loss_config(case)).loss
    assert float(naive_loss(x, loss_config(case)).detach()) == pytest.approx(float(fused.detach()), rel=1e-5, abs=1e-6)


def test_peak_meter_sees_a_large_allocation():
    def alloc():
        t = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        return float(t[-1])
    peak, method = measure_peak(alloc, "cpu")
    if method == METHOD_FRESH:
        pytest.skip("RSS high-water reset not permitted here")
    assert 200 * 2**20 <= peak <= 400 * 2**20, peak / 2**20
    small, _ = measure_peak(lambda: torch.ones(16), "cpu")
    assert small < 32 * 2**20, small / 2**20


def test_add_ratios_pairs_same_shape_only():
    rows = add_ratios([_row("naive", 10.0, 8000.0), _row("torch", 12.0, 500.0),
                       _row("torch", 1.0, 10.0, n=1024), _row("naive", 1.0, 1.0, n=2048, status="failed")])
    assert rows[1]["time_vs_naive"] == pytest.approx(1.2) and rows[1]["mem_vs_naive"] == pytest.approx(0.0625)
    assert rows[2]["time_vs_naive"] is None  # no naive at N=1024
    assert rows[0]["time_vs_naive"] == pytest.approx(1.0)


@pytest.mark.parametrize("t,m,expect", [(12.0, 500.0, ("MET", "MET")), (14.0, 1500.0, ("MISSED", "MISSED"))])
def test_acceptance_line(t, m, expect):
    line = acceptance_lines(add_ratios([_row("naive", 10.0, 8000.0), _row("torch", t, m)]))[0]
    mem_part, time_part = line.split("time ratio")
    assert expect[0] in mem_part and expect[1] in time_part, line


def test_tables_and_csv(tmp_path):
    rows = add_ratios([_row("naive", 10.0, 8000.0), _row("torch", 12.0, 500.0)])
    md = kernel_table(rows)
    assert "| loss | 4096 | 151936 | 896 | float32 | torch | 1.20 | 0.062 |" in md
    path = tmp_path / "r.csv"
    write_csv(rows, str(path), ["suite", "backend"])
    got = list(csv.DictReader(open(path)))
    assert [r["backend"] for r in got] == ["naive", "torch"] and float(got[1]["time_vs_naive"]) == pytest.approx(1.2)


def test_plots_are_written(tmp_path):
    rows = add_ratios([_row(b, t * n / 1024, m * n / 1024, n=n, v=v) for n in (1024, 4096) for v in (32768, 151936)
                       for b, t, m in (("naive", 1.0, 4000.0), ("torch", 1.2, 300.0))])
    trainer = [{"layout": "padded", "tokens_per_s": 100.0, "pad_frac": 0.3, "speedup_vs_padded": 1.0},
               {"layout": "packed-rows", "tokens_per_s": 130.0, "pad_frac": 0.05, "speedup_vs_padded": 1.3}]
    paths = write_plots(rows, trainer, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["loss_memory_vs_n.png", "loss_time_vs_n.png", "trainer_tokens_per_s.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)
