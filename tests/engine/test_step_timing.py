"""Per-phase step timings (time/* metrics): present, non-negative, a partition of the step, logged
on one grep-able line, and excluded from the exactness comparisons (TIMING_KEYS)."""
import logging

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_config
except ImportError:
    from loop_fakes import FakeEnv, tiny_config

from sdar_engine.metrics import PHASE_KEYS, TIMING_KEYS, format_phases, read_metrics
from sdar_engine.trainer import Trainer


def test_step_records_every_phase_and_they_add_up_to_the_step(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdar.trainer")
    cfg = tiny_config(tmp_path, "algo.method=sdar", "algo.loss={kl_coef: 0.01}", "train.steps=1",
                      "train.save_every=1")
    Trainer(cfg, tmp_path, env=FakeEnv(n_tasks=8), eval_env=FakeEnv("test", n_tasks=2)).fit(final_eval=False)
    rec = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "success" in r][-1]
    for key in PHASE_KEYS:
        assert key in rec and rec[key] >= 0.0, key
        assert key in TIMING_KEYS, key  # machine time: never part of a run-to-run comparison
    # teacher (sdar), reference (kl_coef > 0), old log-probs and the update each ran
    assert rec["time/score_teacher"] > 0 and rec["time/score_ref"] > 0 and rec["time/old_logp"] > 0
    assert rec["time/gen"] > 0 and rec["time/prompt"] > 0 and rec["time/teacher_prompt"] > 0
    parts = sum(rec[k] for k in PHASE_KEYS if k != "time/step")
    assert abs(parts - rec["time/step"]) < 1e-3  # every second of the step is in one phase (+ call overheads)
    assert abs(rec["time/step"] - rec["step_seconds"]) < 1e-9
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 seconds ")]
    assert len(lines) == 1 and " gen=" in lines[0] and " old_logp=" in lines[0] and " step=" in lines[0]


def test_format_phases_gives_each_share_of_the_step():
    rec = {"time/gen": 3.0, "time/env": 0.5, "time/update": 0.5, "time/step": 4.0, "loss": 1.0}
    assert format_phases(rec) == "gen=3(75%) env=0.5(12%) update=0.5(12%) step=4"


def test_cpu_generation_runs_on_one_thread_with_the_same_tokens(monkeypatch):
    """The rollout speed-up (sdar_engine/threads.py): generate under 1 intra-op thread gives the
    tokens generating under 2 gives, greedy and seeded sampling, and restores the thread count."""
    import torch

    try:
        from tests.engine.loop_fakes import tiny_model_dir
    except ImportError:
        from loop_fakes import tiny_model_dir
    from sdar_engine.model import ModelConfig, load_policy
    from sdar_engine.rollout import HFBackend

    model, tok = load_policy(ModelConfig(path=tiny_model_dir(), attn="sdpa"), torch.device("cpu"))
    backend = HFBackend(model, tok, "cpu")
    assert backend.threads == 1
    seen = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist() for n in (20, 33, 27, 40)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {}
        for threads in (1, 0):  # 0: whatever torch runs with (2 here)
            backend.threads = threads
            out[threads] = (backend.generate(prompts, 12, 0.0), backend.generate(prompts, 12, 1.0, seeds=[1, 2, 3, 4]))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2, 2]
    assert out[1] == out[0]
    assert any(len(r) > 1 for r in out[1][1])  # sampled something to compare
