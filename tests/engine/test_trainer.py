"""Trainer on the tiny model + fake env: 2-step smoke run, warm-start, exact resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_config
except ImportError:
    from loop_fakes import FakeEnv, tiny_config

from sdar_engine.metrics import TIMING_KEYS, read_metrics
from sdar_engine.trainer import Trainer, draw_tasks


def _trainer(cfg, run_dir, resume=False):
    return Trainer(cfg, run_dir, resume=resume, env=FakeEnv(n_tasks=8), eval_env=FakeEnv("test", n_tasks=2))


def test_two_step_smoke_run_writes_metrics_checkpoint_plot(tmp_path):
    cfg = tiny_config(tmp_path, "train.plot=true", "algo.method=sdar")
    last = _trainer(cfg, tmp_path).fit()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in recs if "success" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "success", "gate_mean", "gate_active", "gap_mean", "ref_kl", "entropy_mean",
                "clip_frac", "tokens_per_s", "peak_mem_mb", "loss", "success/even"):
        assert key in train[-1], key
    assert 0.0 <= train[-1]["gate_mean"] <= 1.0 and train[-1]["samples"] > 0
    assert "eval/success" in last and (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def _weights(run_dir):
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    return load_file(str(next(ckpt.glob("*.safetensors"))))


def _train_records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_metrics(run_dir / "metrics.jsonl") if "success" in r]


def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    common = ("train.save_every=2", "train.keep_checkpoints=4", "optim.warmup_steps=3")
    _trainer(tiny_config(a, "train.steps=4", *common), a).fit(final_eval=False)
    _trainer(tiny_config(b, "train.steps=2", *common), b).fit(final_eval=True)  # eval must not perturb
    resumed = _trainer(tiny_config(b, "train.steps=4", *common), b, resume=True)
    assert resumed.step == 2
    resumed.fit(final_eval=False)
    ra, rb = _train_records(a), _train_records(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert ra == rb
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_task_draw_is_a_pure_function_of_seed_and_step():
    pool = [f"t{i}" for i in range(10)]
    assert draw_tasks(pool, 3, 0, 5) == draw_tasks(pool, 3, 0, 5)
    assert draw_tasks(pool, 3, 0, 5) != draw_tasks(pool, 3, 0, 6)
    assert len(draw_tasks(pool, 12, 0, 0)) == 12


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint under"):
        _trainer(tiny_config(tmp_path), tmp_path, resume=True)


def test_warmstart_lowers_nll_and_grpo_method_runs(tmp_path):
    from sdar_engine.model import ModelConfig, load_policy
    from sdar_engine.warmstart import expert_samples, play_expert, supervised_warmstart

    cfg = tiny_config(tmp_path)
    env = FakeEnv(n_tasks=8)
    steps, success = play_expert(env, env.task_ids)
    assert success == 1.0 and len(steps) == 16
    model, tok = load_policy(ModelConfig(path=cfg.model.path, attn="sdpa"), "cpu")
    samples = expert_samples(steps, tok)
    losses = supervised_warmstart(model, samples, epochs=8, lr=1e-2, max_tokens=1024, batch_samples=8)
    assert losses[-1] < 0.7 * losses[0]
    last = _trainer(tiny_config(tmp_path / "g", "algo.method=grpo", "algo.advantage=gigpo",
                                "train.steps=1", "train.save_every=1"), tmp_path / "g").fit(final_eval=False)
    assert "loss" in last and "clip_frac" in last and last["samples"] > 0


def test_eval_tasks_are_fixed_and_cover_the_pool():
    from sdar_engine.trainer import eval_tasks

    pool = [f"alfworld/test/{t}/{i}" for t in ("a", "b", "c") for i in range(10)]
    picked = eval_tasks(pool, 6)
    assert picked == eval_tasks(list(reversed(pool)), 6) and len(set(picked)) == 6
    assert len({p.split("/")[2] for p in picked}) >= 2  # not just the first type in id order
    assert eval_tasks(pool, 0) == sorted(pool)


def test_noisy_expert_visits_off_expert_states_and_still_labels_them_with_the_expert():
    from sdar_engine.warmstart import play_expert

    env = FakeEnv(n_tasks=8, max_steps=6)
    clean, _ = play_expert(env, env.task_ids)
    noisy, success = play_expert(env, env.task_ids, noise=0.5, seed=3)
    assert len(noisy) > len(clean) and 0.0 < success <= 1.0
    assert any("Nothing happens." in s.prompt for s in noisy)  # a state the clean expert never visits
    assert not any("Nothing happens." in s.prompt for s in clean)
    for s in noisy:  # the label is the expert's action for the state in the prompt
        want = "take" if "You see the" in s.prompt else "go to"
        assert f"<action>{want} " in s.action
    assert [s.action for s in play_expert(env, env.task_ids, noise=0.5, seed=3)[0]] == [s.action for s in noisy]
    with pytest.raises(ValueError, match="warmstart.noise=1.0"):
        play_expert(env, env.task_ids, noise=1.0)
