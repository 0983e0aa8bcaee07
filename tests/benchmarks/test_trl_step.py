"""The trl suite (benchmarks/trl_step.py): one TRL GRPO step through TRL's own loss, the adapter and
the hand-written fused loss on a tiny Llama; the paths agree, the suite runs end to end."""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from sdar_benchmarks import trl_step as ts  # noqa: E402
from sdar_benchmarks.trl_step_worker import run_case  # noqa: E402

TINY = ts.StepShape(vocab=123, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, batch=4, prompt_len=5,
                    completion_len=11)


def _spec(path: str, loss_type: str) -> dict:
    (case,) = [c for c in ts.plan_cases(TINY, [path], [loss_type], 1, 1, "cpu", old_noise=0.3, ragged=True)]
    return case


@pytest.mark.parametrize("loss_type,on_policy", [("grpo", False), ("dapo", False), ("grpo", True)])
def test_paths_compute_the_same_step(loss_type, on_policy):
    """Same seed and inputs (ragged completions, old log-probs off by N(0, 0.3^2) so both clip sides
    fire, or None: on-policy): TRL's _compute_loss and the hand-written fused loss give the same loss
    and gradient norm; so do TRL with 8-row tiles and the adapter, through its fused path (its call
    counter moved)."""
    spec = lambda path: {**_spec(path, loss_type), "on_policy": on_policy}  # noqa: E731
    res = {p: run_case(spec(p)) for p in ("trl", "direct")}
    res["trl_tiled"] = run_case({**spec("trl_tiled"), "trl_tile_tokens": 8})  # 8-row tiles
    if ts.default_paths()[1] == "adapter":
        res["adapter"] = run_case(spec("adapter"))
        assert res["adapter"]["fused_loss_calls"] == 2  # warm-up + measured step, none fell back to TRL
    assert all(r["status"] == "ok" for r in res.values())
    assert res["trl"]["completion_tokens"] < TINY.tokens  # the ragged mask is really in the batch
    ref = res["trl"]
    for path, r in res.items():
        assert r["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5), path
        assert r["first_grad_norm"] == pytest.approx(ref["first_grad_norm"], rel=1e-5), path
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4), path  # after one AdamW step
    if loss_type == "grpo":  # the loss type reaches TRL: sequence mean != token mean on ragged rows
        assert ref["first_loss"] != pytest.approx(run_case(spec("trl") | {"loss_type": "bnpo"})["first_loss"],
                                                   rel=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="paths"):
        ts.run_suite("/nonexistent", {}, quick=True, paths=["nope"])
    with pytest.raises(ValueError, match="loss_types"):
        ts.run_suite("/nonexistent", {}, quick=True, loss_types=["cispo"])
    with pytest.raises(ValueError, match="loss_type"):
        run_case({**_spec("trl", "grpo"), "loss_type": "sapo"})


def test_summary_ratios_and_interleaving():
    cases = ts.plan_cases(TINY, ["trl", "direct"], ["grpo"], 2, 0, "cpu")
    assert [(c["repeat"], c["path"]) for c in cases] == [(0, "trl"), (0, "direct"), (1, "direct"), (1, "trl")]
    rows = [{"loss_type": "grpo", "repeat": i // 2, "path": p, "status": "ok", "time_s": t, "peak_mib": m,
             "first_loss": 1.0, "first_grad_norm": g}
            for i, (p, t, m, g) in enumerate((("trl", 2.0, 100.0, 4.0), ("direct", 1.0, 50.0, 4.4),
                                              ("trl", 4.0, 300.0, 4.0), ("direct", 1.0, 90.0, 4.4)))]
    s = {r["path"]: r for r in ts.summarize(rows)}
    assert s["trl"]["time_s"] == 3.0 and s["direct"]["time_vs_trl"] == pytest.approx(1 / 3)
    assert s["direct"]["time_vs_trl_paired"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert s["direct"]["peak_vs_trl"] == pytest.approx(70 / 200)
    assert s["direct"]["grad_norm_rel_diff"] == pytest.approx(0.1) and s["direct"]["loss_rel_diff"] == 0


def test_suite_end_to_end(tmp_path):
    """`sdar bench --suite trl --quick --repeats 1`: every case ran in the fork server, the files are
    written, the paths agree in value."""
    from sdar_benchmarks.cli import main

    out = tmp_path / "trl"
    rc = main(["--suite", "trl", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress",
               "--trl-paths", "trl", "direct"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "trl_step.csv")))
    assert [r["path"] for r in rows] == ["trl", "direct"] and all(r["status"] == "ok" for r in rows)
    assert all(int(r["completion_tokens"]) == ts.QUICK_SHAPE.tokens for r in rows)
    summary = {r["path"]: r for r in csv.DictReader(open(out / "trl_step_summary.csv"))}
    assert float(summary["direct"]["loss_rel_diff"]) < 1e-5 and float(summary["direct"]["peak_vs_trl"]) > 0
    md = (out / "trl_step.md").read_text()
    assert "--suite trl" in md and "direct / trl: time" in md
