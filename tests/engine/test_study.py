"""`sdar study`: the bootstrap on hand-made cases, FINAL vs BEST-SO-FAR kept apart, and a tiny
2-method x 2-seed study on the fake env that is killed mid-run and resumed to the same table."""
import json
import shutil
from pathlib import Path

import pytest

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_config, tiny_model_dir
except ImportError:
    from loop_fakes import FakeEnv, tiny_config, tiny_model_dir

import sdar_engine.study as study
from sdar_engine.config import from_dict
from sdar_engine.study_report import build_table, to_csv, to_markdown
from sdar_engine.study_stats import bootstrap_ci, paired_diff


def test_bootstrap_interval_hand_case():
    # mean of 4 draws from {0,0,0,1} is k/4, k ~ Binomial(4, 1/4): P(k<=2) = 0.949, P(k<=3) = 0.996,
    # so the 2.5 % point is 0 and the 97.5 % point is 3/4 (a normal interval would give [-0.24, 0.74],
    # resampling single values instead of means [0, 1]).
    assert bootstrap_ci([0, 0, 0, 1], resamples=10_000, seed=0) == (0.0, 0.75)
    # n = 3: every resample (1/27 > 2.5 % each) is reachable -> [min, max]
    assert bootstrap_ci([0.1, 0.2, 0.6], resamples=10_000, seed=1) == pytest.approx((0.1, 0.6))
    assert bootstrap_ci([0.3, 0.3], resamples=100, seed=0) == (0.3, 0.3)
    # the same seed gives the same interval; seeds only move it within the resampling noise
    assert bootstrap_ci([0.1, 0.5, 0.2, 0.9], 2000, 7) == bootstrap_ci([0.1, 0.5, 0.2, 0.9], 2000, 7)


def test_paired_difference_uses_seed_pairs():
    ref = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.9}
    method = {s: v + 0.05 for s, v in ref.items()}  # better by 0.05 on every seed
    d = paired_diff(method, ref, resamples=1000, seed=0)
    assert d["mean"] == pytest.approx(0.05) and d["lo"] == pytest.approx(0.05) and d["hi"] == pytest.approx(0.05)
    # unpaired, the seeds' spread would swamp the 0.05
    lo, hi = bootstrap_ci(list(method.values()), 1000, 0)
    assert hi - lo > 0.3


def _record(method, seed, curve):
    final = dict(curve[-1])
    steps = final.pop("step")
    best = {k: max(p[k] for p in curve if p["step"] >= 1) for k in final}
    return {"method": method, "seed": seed, "steps": steps, "final": final, "best": best, "curve": curve}


def test_final_and_best_so_far_are_separate_columns():
    runs = {m: {s: _record(m, s, [{"step": 0, "success": 0.9, "success/a": 0.9},
                                  {"step": 1, "success": 0.5 + 0.1 * (m == "sdar"), "success/a": 0.4},
                                  {"step": 2, "success": 0.2, "success/a": 0.3}]) for s in (0, 1)}
            for m in ("grpo", "sdar")}
    table = build_table(runs, ["grpo", "sdar"], resamples=200, seed=0)
    sdar = table["methods"]["sdar"]
    assert sdar["final"]["success"]["mean"] == pytest.approx(0.2)
    assert sdar["best"]["success"]["mean"] == pytest.approx(0.6)  # step 0 (warm-start, 0.9) excluded
    assert sdar["best"]["success"]["diff_vs_ref"]["mean"] == pytest.approx(0.1)
    assert sdar["final"]["success"]["diff_vs_ref"]["mean"] == pytest.approx(0.0)
    md = to_markdown(table, ["# t"])
    assert "| FINAL success | FINAL Δ vs grpo | BEST-SO-FAR success | BEST-SO-FAR Δ vs grpo |" in md
    assert "| sdar | 2 | 0.200 [0.200, 0.200] | +0.000 [+0.000, +0.000] | 0.600 [0.600, 0.600] |" in md
    rows = [r.split(",") for r in to_csv(table).splitlines()[1:]]
    kinds = {(r[0], r[1], r[2]): r[4] for r in rows}
    assert kinds[("sdar", "final", "success")] == "0.2000" and kinds[("sdar", "best", "success")] == "0.6000"
    assert kinds[("sdar", "final", "success/a")] == "0.3000" and kinds[("sdar", "best", "success/a")] == "0.4000"


TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_kv_heads=1",
        "model.tiny_vocab=400", "model.attn=sdpa", "env.tasks_per_step=2", "env.group_size=2",
        "rollout.max_new_tokens=16", "rollout.eval_temperature=0", "algo.max_tokens=2048", "optim.lr=1e-3",
        "train.steps=2", "train.save_every=1", "train.eval_every=1", "env.eval_tasks=4",
        "train.tensorboard=false", "train.device=cpu", "train.plot=false", "warmstart.enabled=true",
        "warmstart.episodes=8", "warmstart.epochs=3", "warmstart.lr=1e-2", "warmstart.batch_samples=16"]


class Killed(Exception):
    pass


def test_study_runs_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "make_env", lambda cfg, split: FakeEnv(split, n_tasks=8 if split == "train" else 4))
    # the teacher probe (sdar_engine/teacher_probe.py) has its own tests: here only its numbers' way to the table
    monkeypatch.setattr(study, "_teacher_probe", lambda *a: {"student_success": 0.25, "teacher_success": 0.5})
    cfg = from_dict({}, TINY)
    kw = dict(methods=["grpo", "sdar"], seeds=[0, 1], resamples=500, plot=False, command="test")
    calls, armed = [], [True]
    real_run_one = study.run_one

    def run_one(rcfg, rdir, warm_eval, on_step=None):
        calls.append((rcfg.algo.method, rcfg.train.seed))

        def kill_in_last_run(step, metrics):
            if on_step is not None:
                on_step(step, metrics)
            if armed[0] and len(calls) == 4 and step == 1:  # after step 1's checkpoint, before step 2's
                armed[0] = False
                raise Killed()
        return real_run_one(rcfg, rdir, warm_eval, kill_in_last_run)

    monkeypatch.setattr(study, "run_one", run_one)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    with pytest.raises(Killed):
        study.run_study(cfg, killed, **kw)
    out = capsys.readouterr().out
    assert "[sdar study] budget: 2 methods x 2 seeds = 4 runs" in out and "[sdar study] estimate:" in out
    assert calls == [("grpo", 0), ("sdar", 0), ("grpo", 1), ("sdar", 1)]
    assert (killed / "runs/grpo/seed_1/done.json").is_file() and not (killed / "runs/sdar/seed_1/done.json").exists()
    assert (killed / "runs/sdar/seed_1/checkpoints").is_dir() and not (killed / "table.json").exists()
    # the reference: the same study with the killed run done from scratch, uninterrupted
    shutil.copytree(killed, ref)
    shutil.rmtree(ref / "runs/sdar/seed_1")
    first_done = (killed / "runs/grpo/seed_0/done.json").stat().st_mtime_ns

    calls.clear()
    resumed = study.run_study(cfg, killed, **kw)
    out = capsys.readouterr().out
    assert calls == [("sdar", 1)]  # the finished runs are skipped
    assert "warm-start reused" in out and "3 of 4 runs already finished" in out
    assert (killed / "runs/grpo/seed_0/done.json").stat().st_mtime_ns == first_done
    assert json.loads((killed / "runs/sdar/seed_1/done.json").read_text())["resumed_from_step"] == 1
    calls.clear()
    whole = study.run_study(cfg, ref, **kw)
    assert calls == [("sdar", 1)]
    assert json.loads((ref / "runs/sdar/seed_1/done.json").read_text())["resumed_from_step"] is None
    assert resumed == whole
    for name in ("table.md", "table.csv", "table.json"):
        assert (killed / name).read_text() == (ref / name).read_text(), name
    probe_line = "Teacher probe before RL (held-out games): student_success=0.250, teacher_success=0.500"
    assert probe_line in (killed / "table.md").read_text()

    prov = json.loads((killed / "provenance.json").read_text())
    assert prov["eval_task_ids"] == sorted(FakeEnv("test", n_tasks=4).task_ids)
    assert prov["seeds"] == [0, 1] and prov["methods"] == ["grpo", "sdar"] and "torch" in prov["versions"]
    assert prov["machine"]["cpu_count"] >= 1 and "git_dirty" in prov
    table = json.loads((killed / "table.json").read_text())
    assert set(table["methods"]["sdar"]) >= {"final", "best"} and "success/even" in table["metrics"]
    curve = json.loads((killed / "runs/sdar/seed_1/done.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]  # warm-start eval, eval_every=1, final

    with pytest.raises(ValueError, match=r"different config \(optim.lr: 0.001 -> 0.002\)"):
        study.run_study(from_dict({}, TINY + ["optim.lr=2e-3"]), killed, **kw)
    monkeypatch.setattr(study, "make_env", lambda cfg, split: FakeEnv(split, n_tasks=8 if split == "train" else 6))
    with pytest.raises(ValueError, match="held-out task ids changed"):
        study.run_study(cfg, killed, **kw)


def test_study_from_a_given_model_path(tmp_path, monkeypatch):
    """The GPU configs' shape: model.path (relative, as they give it) and no warm-start."""
    monkeypatch.setattr(study, "make_env", lambda cfg, split: FakeEnv(split, n_tasks=8 if split == "train" else 4))
    monkeypatch.setattr(study, "_teacher_probe", lambda *a: None)
    model = Path(tiny_model_dir())
    monkeypatch.chdir(model.parent)
    cfg = tiny_config(tmp_path, f"model.path={model.name}", "train.steps=1", "env.eval_tasks=2")
    table = study.run_study(cfg, tmp_path / "s", methods=["sdar"], seeds=[3], resamples=50, plot=False)
    ws = json.loads((tmp_path / "s/warmstart/done.json").read_text())
    assert ws["model_path"] == model.name and ws["model_in_study"] is False
    assert not (tmp_path / "s/warmstart/model_warmstart").exists()
    assert table["methods"]["sdar"]["seeds"] == [3] and table["reference"] == "sdar"


def test_parse_methods_and_seeds():
    assert study.parse_seeds("3") == [0, 1, 2] and study.parse_seeds("4,7") == [4, 7]
    assert study.parse_methods("grpo,sdar") == ["grpo", "sdar"]
    with pytest.raises(ValueError, match="choose from"):
        study.parse_methods("grpo,ppo")
    with pytest.raises(ValueError, match="--seeds"):
        study.parse_seeds("0")
