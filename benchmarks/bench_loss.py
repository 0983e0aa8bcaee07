"""pytest-benchmark suites of the fused SDAR loss (fwd+bwd) and the fused log-prob pass.

    pytest benchmarks/bench_loss.py --benchmark-disable      # smoke: tiny shapes, each case once
    SDAR_BENCH_GRID=quick pytest benchmarks/bench_loss.py    # timed, bigger shapes (see grids.py)

Every case is checked against the naive backend of the same shape and preset (loss value and
gradients, or log-probs), so a wrong fast kernel fails here; Liger's chunked GRPO loss against
naive on the Liger-matched GRPO config (benchmarks/liger_grpo.py). Peak memory is recorded in extra_info from
inside the pytest process (RSS high-water reset around one call); the fresh-subprocess numbers
of ``python -m sdar_benchmarks.cli`` are the ones to quote.
"""
from __future__ import annotations

import os

import pytest
import torch

from sdar_benchmarks.grids import cases
from sdar_benchmarks.loss_cases import Case, make_inputs, prepare, skip_reason
from sdar_benchmarks.memory import measure_peak
from sdar_benchmarks.runner import memory_budget

GRID = os.environ.get("SDAR_BENCH_GRID", "smoke")
DEVICE = "cuda" if torch.cuda.is_available() and GRID == "gpu" else "cpu"
WITH_COMPILE = GRID != "smoke" or os.environ.get("SDAR_BENCH_COMPILE") == "1"


def _params(suite: str) -> list:
    out = []
    for c in cases(suite, GRID, DEVICE):
        if c.backend == "naive":
            continue  # the baseline runs as its own parametrization below
        out.append(pytest.param(c, id=c.label))
    return out


def _naive_params(suite: str) -> list:
    return [pytest.param(c, id=c.label) for c in cases(suite, GRID, DEVICE, backends=["naive"])]


def _skip_if_needed(case: Case) -> None:
    reason = skip_reason(case, memory_budget())
    if reason:
        pytest.skip(reason)
    if case.backend == "compiled" and not WITH_COMPILE:
        pytest.skip("torch.compile takes ~1 min per shape on 2 CPU cores; set SDAR_BENCH_COMPILE=1")


def _naive_reference(case: Case):
    """(value, grad_hidden or None) of the naive backend on the same inputs and preset."""
    base = Case(case.suite, "naive", case.n, case.v, case.h, case.dtype, case.device, preset=case.preset)
    x = make_inputs(base)
    out = prepare(base, x)()
    if case.suite == "loss":
        return out, x.hidden.grad.clone(), x.weight.grad.clone()
    return out, None, None


def _tolerance(case: Case) -> float:
    return 2e-2 if case.dtype == "bfloat16" else 1e-4


def _run(benchmark, case: Case):
    _skip_if_needed(case)
    x = make_inputs(case)
    try:
        fn = prepare(case, x)
        fn()  # warm-up (and compilation); a failing compile is a skip with the reason
    except Exception as exc:  # noqa: BLE001
        if case.backend in ("compiled", "liger"):
            pytest.skip(f"{case.backend} failed on this machine: {exc!r}"[:300])
        raise
    peak, method = measure_peak(fn, case.device)
    rounds = 1 if case.n * case.v >= 2**26 else 3
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    benchmark.extra_info.update(case.to_dict(), peak_mib=peak / 2**20, mem_method=method + " (in-process)")
    return x, out


@pytest.mark.parametrize("case", _params("loss"))
def test_loss_fwd_bwd(benchmark, case: Case):
    x, loss = _run(benchmark, case)
    ref_loss, ref_gh, ref_gw = _naive_reference(case)
    tol = _tolerance(case)
    assert torch.isfinite(loss), f"{case.label}: loss {loss}"
    assert abs(float(loss) - float(ref_loss)) <= tol * max(1.0, abs(float(ref_loss))), (case.label, loss, ref_loss)
    torch.testing.assert_close(x.hidden.grad.float(), ref_gh.float(), rtol=tol * 10, atol=tol * 1e-2)
    torch.testing.assert_close(x.weight.grad.float(), ref_gw.float(), rtol=tol * 10, atol=tol * 1e-2)


@pytest.mark.parametrize("case", _naive_params("loss"))
def test_loss_naive_baseline(benchmark, case: Case):
    _, loss = _run(benchmark, case)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("case", _params("logprobs"))
def test_logprobs_forward(benchmark, case: Case):
    _, (logp, ent) = _run(benchmark, case)
    (ref_logp, ref_ent), _, _ = _naive_reference(case)
    tol = _tolerance(case)
    torch.testing.assert_close(logp.float(), ref_logp.float(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(ent.float(), ref_ent.float(), rtol=tol, atol=tol * 10)
    assert bool((logp <= 0).all()), f"{case.label}: a log-prob is positive"


@pytest.mark.parametrize("case", _naive_params("logprobs"))
def test_logprobs_naive_baseline(benchmark, case: Case):
    _, (logp, ent) = _run(benchmark, case)
    assert bool((ent >= -1e-4).all()) and bool((logp <= 0).all())
