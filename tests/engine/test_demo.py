"""`sdar demo` pipeline end to end on the fake env: tiny build, warm-start, evals, GRPO vs SDAR."""
import json

try:
    from tests.engine.loop_fakes import FakeEnv
except ImportError:
    from loop_fakes import FakeEnv

import sdar_engine.demo as demo
from sdar_engine.config import from_dict


def test_demo_compare_on_fake_env_writes_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "make_env", lambda cfg, split: FakeEnv(split, n_tasks=8 if split == "train" else 4))
    cfg = from_dict({}, ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
                         "model.tiny_kv_heads=1", "model.tiny_vocab=400", "model.attn=sdpa",
                         "env.tasks_per_step=2", "env.group_size=2", "rollout.max_new_tokens=16",
                         "rollout.eval_temperature=0", "algo.max_tokens=2048", "optim.lr=1e-3",
                         "train.steps=1", "train.save_every=1", "env.eval_tasks=2", "train.tensorboard=false", "train.device=cpu",
                         "warmstart.enabled=true", "warmstart.episodes=8", "warmstart.epochs=3",
                         "warmstart.lr=1e-2", "warmstart.batch_samples=16"])
    summary = demo.run_demo(cfg, output=str(tmp_path), compare=True)
    out = capsys.readouterr().out
    assert "held-out success after warm-start" in out and "after grpo RL" in out and "after sdar RL" in out
    for key in ("success_untrained", "success_warmstart", "success_after_grpo", "success_after_sdar"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert json.loads((tmp_path / "summary.json").read_text())["run_dir"] == str(tmp_path)
    ws = json.loads((tmp_path / "warmstart.json").read_text())
    assert ws["expert_success"] == 1.0 and ws["nll_last"] < ws["nll_first"]
    for method in ("grpo", "sdar"):
        run = tmp_path / method
        assert (run / "metrics.jsonl").is_file() and (run / "curves.png").is_file()
        assert (run / "checkpoints" / "step_00000001").is_dir()
    assert (tmp_path / "model_warmstart" / "model.safetensors").is_file()
