"""The memory suite (benchmarks/step_memory.py): fit, analytic minimum, budget guard, paths, end to end."""
from __future__ import annotations

import csv

import pytest
import torch

from sdar_benchmarks import step_memory as sm
from sdar_benchmarks.step_memory_worker import run_case

TINY = sm.MemShape(vocab=2048, hidden=64, layers=2)


def test_fit_line_recovers_a_hand_made_line():
    xs = [1024, 2048, 4096, 8192]
    slope, icpt = sm.fit_line(xs, [5_000 + 3 * x for x in xs])
    assert slope == pytest.approx(3) and icpt == pytest.approx(5_000)
    # symmetric noise around the line leaves the least-squares slope unchanged
    slope, _ = sm.fit_line(xs, [5_000 + 3 * x + e for x, e in zip(xs, (10, -10, -10, 10))])
    assert slope == pytest.approx(3, rel=1e-3)
    with pytest.raises(ValueError, match="distinct"):
        sm.fit_line([4, 4], [1, 2])


def test_trunk_minimum_on_a_hand_made_shape():
    shape = sm.MemShape(vocab=100, hidden=8, layers=3, heads=2, kv_heads=1, intermediate=16)  # d_head 4, H_kv 4
    assert sm.layer_activations(shape) == 5 * 8 + 2 * 4 + 4 * 16 + 2  # = 114
    assert sm.trunk_min_bytes_per_token(shape, checkpointing=True) == 4 * (3 * 8 + 2 * 8 + 2 * 4 + 114)
    assert sm.trunk_min_bytes_per_token(shape, checkpointing=False) == 4 * (3 * (8 + 114) + 2 * 8 + 2 * 4)
    assert sm.trunk_min_bytes_per_token(shape, True, elem_bytes=2) == 2 * 162


def test_trunk_minimum_counts_what_the_hf_trunk_keeps():
    """Bytes autograd saves in the real HF Qwen2 trunk (no checkpointing), per token, against the
    formula: the formula must not miss a tensor class (>= 1) nor invent one (<= 1.25)."""
    from sdar_benchmarks.step_memory_worker import build_model

    n = 256
    model = build_model({**TINY.to_spec(), "path": "fused", "layout": "single", "tokens": n, "device": "cpu"})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes() >= n * 4:  # per-token tensors, not weights
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, TINY.vocab, (1, n)), position_ids=torch.arange(n)[None])
    ratio = sum(saved.values()) / n / sm.trunk_min_bytes_per_token(TINY, checkpointing=False)
    assert 1.0 <= ratio <= 1.25, ratio


def test_predict_peak():
    assert sm.predict_peak([], 100) is None
    assert sm.predict_peak([{"status": "ok", "slots": 100, "peak_bytes": 1000}], 300) == pytest.approx(3000)
    rows = [{"status": "ok", "slots": x, "peak_bytes": 50 + 2 * x} for x in (100, 200)] + \
        [{"status": "failed", "slots": 400, "peak_bytes": None}]
    assert sm.predict_peak(rows, 1000) == pytest.approx(2050)


class _FakeServer:
    """Stands in for the fork server: peak = 1 MiB per token over a 100 MiB process."""

    calls: list = []

    def __init__(self, mmap_threshold: int) -> None:
        pass

    def run(self, spec, rss_limit, timeout_s):
        _FakeServer.calls.append(spec["tokens"])
        return {"status": "ok", "peak_bytes": spec["tokens"] * 2**20, "slots": spec["tokens"], "rows": 1,
                "samples": 1, "time_s": 1.0, "base_rss_bytes": 100 * 2**20, "mem_method": "fake"}

    def close(self) -> None:
        pass


def test_budget_guard_extrapolates_instead_of_running(monkeypatch):
    """Cases predicted above the budget are never started; their row carries the prediction."""
    monkeypatch.setattr(sm, "ForkServer", _FakeServer)
    _FakeServer.calls = []
    cases = sm.plan_cases(True, ["fused"], ["single"], "cpu", tokens={"single": (256, 512, 1024, 2048)})
    rows = sm.run_cases(cases, max_bytes=1024 * 2**20, progress=False)  # 1 GiB budget
    assert _FakeServer.calls == [256, 512]  # 1024 tokens -> 1 GiB + 100 MiB predicted: over
    assert [r["status"] for r in rows] == ["ok", "ok", "extrapolated", "extrapolated"]
    assert rows[2]["predicted_bytes"] == pytest.approx(1024 * 2**20)
    assert "budget" in rows[2]["reason"] and "shorter case" in rows[3]["reason"]


def test_paths_really_differ():
    """HF's default path materializes [N, V] logits, the fused paths never do; checkpointing
    really recomputes each decoder layer (its MLP runs twice per step). At N = 512 the largest
    fused tensor is a [V, H] weight gradient / AdamW state (N V / 8 elements)."""
    n = 512
    base = {**TINY.to_spec(), "layout": "single", "tokens": n, "loss_chunk": 32, "device": "cpu",
            "trace_largest": True}
    res = {p: run_case({**base, "path": p}) for p in ("hf_default", "fused", "fused_ckpt_chunked")}
    assert all(r["status"] == "ok" and torch.isfinite(torch.tensor(r["loss"])) for r in res.values())
    assert res["hf_default"]["largest_numel"] >= (n - 1) * TINY.vocab
    for p in ("fused", "fused_ckpt_chunked"):
        assert res[p]["largest_numel"] < n * TINY.vocab / 4, (p, res[p]["largest_numel"])
    assert (res["hf_default"]["layer0_forwards"], res["fused"]["layer0_forwards"],
            res["fused_ckpt_chunked"]["layer0_forwards"]) == (1, 1, 2)


def test_packed_layout_is_one_sample_per_row():
    """Packed cases are ~1-2k-token samples, one per row, so HF never builds a block-diagonal
    [rows, 1, L, L] mask (a shared row would add ~5 L bytes per token to some lengths only)."""
    from sdar_benchmarks.step_memory_worker import build_model, make_batch, sample_lengths

    for n in (2048, 4096, 16384, 32768):
        lengths = sample_lengths(n, "packed")
        assert sum(lengths) == n and 2 * min(lengths) > max(lengths) and max(lengths) <= 2048
    spec = {**TINY.to_spec(), "path": "fused", "layout": "packed", "tokens": 8192, "device": "cpu", "seed": 0}
    mb, samples = make_batch(spec, build_model(spec))
    assert mb.input_ids.shape[0] == len(samples) == 6 and mb.num_tokens == 8192
    starts = (mb.position_ids[:, 1:] == 0).sum()
    assert starts == 0  # no position reset inside a row: no packed-sequence mask


def test_bad_suite_arguments():
    from sdar_benchmarks.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--suite", "memory", "--max-gb", "0"])
    with pytest.raises(ValueError, match="paths"):
        sm.run_suite("/nonexistent", {}, quick=True, paths=["nope"])


def test_quick_suite_end_to_end(tmp_path):
    """`sdar bench --suite memory --quick` (two paths, single layout): every case ran in the fork
    server, HF's slope is several times the fused+ckpt one, and the files are written."""
    from sdar_benchmarks.cli import main

    out = tmp_path / "mem"
    rc = main(["--suite", "memory", "--quick", "--out", str(out), "--no-progress", "--mem-layouts", "single",
               "--mem-paths", "hf_default", "fused_ckpt"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "memory.csv")))
    assert len(rows) == 2 * len(sm.QUICK_TOKENS["single"]) and all(r["status"] == "ok" for r in rows)
    summary = {r["path"]: r for r in csv.DictReader(open(out / "memory_summary.csv"))}
    assert float(summary["hf_default"]["slope_vs_ckpt"]) > 2
    assert float(summary["fused_ckpt"]["min_kib_per_token"]) == pytest.approx(
        sm.trunk_min_bytes_per_token(sm.QUICK_SHAPE, True) / 1024)
    md = (out / "memory.md").read_text()
    assert "trunk-only minimum" in md and "--suite memory" in md
    assert (out / "memory_vs_tokens.png").stat().st_size > 10_000
