"""probe_teacher: teacher (skill-prefixed prompt as the policy prompt) vs student, and the expert gap."""
import math
import re

import pytest
import torch

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_config
except ImportError:
    from loop_fakes import FakeEnv, tiny_config

from sdar_engine.teacher_probe import TeacherPromptEnv, expert_gap, probe_teacher


class PromptReader:
    """A generation backend that plays by reading its prompt: "go to <place>" when a skill line
    names the place (only the FakeEnv teacher prompt does), else "go to desk"; then "take <obj>"."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts_ids, max_new_tokens, temperature, top_p=1.0, stop=None, seeds=None):
        out = []
        for ids in prompts_ids:
            text = self.tok.decode(ids, skip_special_tokens=True)
            obj = re.search(r"fetch the (\w+)", text).group(1)
            place = re.search(r"usually on the (\w+)", text)
            act = f"take {obj}" if f"take {obj}" in text else f"go to {place.group(1) if place else 'desk'}"
            text = f"<think>find it</think><action>{act}</action>"
            out.append(self.tok(text, add_special_tokens=False)["input_ids"])
        return out


def _policy(cfg):
    from sdar_engine.model import load_policy

    return load_policy(cfg.model, "cpu")


def test_teacher_prompt_env_shows_the_teacher_prompt_and_delegates_the_rest():
    env = FakeEnv("test", n_tasks=4)
    view = TeacherPromptEnv(env)
    obs, _ = view.reset(batch_size=4)
    assert view.prompt(1) == env.teacher_prompt(1) != env.prompt(1)
    assert view.prompt_candidates(2) == [env.teacher_prompt(2)]
    assert view.task_ids == env.task_ids and obs == [env.observation(i) for i in range(4)]


def test_probe_plays_the_teacher_prompt_as_the_policy(tmp_path):
    cfg = tiny_config(tmp_path, "env.eval_tasks=8", "rollout.max_new_tokens=24")
    model, tok = _policy(cfg)
    got = probe_teacher(cfg, model, FakeEnv("train"), FakeEnv("test", n_tasks=8), tokenizer=tok,
                        backend=PromptReader(tok))
    # places cycle desk/shelf/table/drawer over the 8 held-out tasks: "desk" wins 2 of them
    assert got["student_success"] == 0.25 and got["teacher_success"] == 1.0
    assert got["expert_steps"] == 16 and math.isfinite(got["gap_mean_expert"])
    assert 0.0 < got["gate_mean_expert"] < 1.0
    reused = probe_teacher(cfg, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok,
                           backend=PromptReader(tok), student_success=0.5)
    assert reused["student_success"] == 0.5 and reused["gap_mean_expert"] == got["gap_mean_expert"]


def _logp(model, prompt_ids, response_ids):
    """log p(response | prompt) per token from a plain full-logits forward (the oracle)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def test_expert_gap_is_teacher_minus_student_on_the_expert_tokens(tmp_path):
    from sdar_engine.rollout import render_prompt_ids, stop_token_ids
    from sdar_engine.warmstart import play_expert

    cfg = tiny_config(tmp_path, "env.eval_tasks=4")
    model, tok = _policy(cfg)
    held_out = FakeEnv("test", n_tasks=4)
    got = expert_gap(cfg, model, tok, held_out, held_out.task_ids)
    steps, _ = play_expert(held_out, held_out.task_ids)
    eot = stop_token_ids(tok)[0]
    gaps = []
    for s in steps:
        resp = tok(s.action, add_special_tokens=False)["input_ids"] + [eot]
        gaps.append(_logp(model, render_prompt_ids(tok, s.teacher), resp)
                    - _logp(model, render_prompt_ids(tok, s.prompt), resp))
    flat = torch.cat(gaps)
    assert got["expert_steps"] == len(steps) == 8
    assert abs(got["gap_mean_expert"] - float(flat.mean())) < 1e-4
    assert abs(got["gap_step_mean_expert"] - float(torch.stack([g.sum() for g in gaps]).mean())) < 1e-3
    assert abs(got["gate_mean_expert"] - float(torch.sigmoid(5.0 * flat).mean())) < 1e-4
    assert abs(float(flat.mean())) > 1e-4  # the prompts differ enough for a swapped sign to fail


def test_expert_samples_with_teacher_prompts_pair_each_step(tmp_path):
    from sdar_engine.warmstart import expert_samples, play_expert

    _, tok = _policy(tiny_config(tmp_path))
    train = FakeEnv("train", n_tasks=4)
    steps, _ = play_expert(train, train.task_ids)
    both = expert_samples(steps, tok, teacher_prompts=True)
    n = len(steps)
    assert len(both) == 2 * n and len(expert_samples(steps, tok)) == n
    for a, b, s in zip(both[:n], both[n:], steps):
        assert a.response_ids == b.response_ids and (a.episode, a.step) == (b.episode, b.step)
        assert tok.decode(b.prompt_ids).count("usually on the") == 1
        assert "usually on the" not in tok.decode(a.prompt_ids)


def test_warmstart_teacher_prompts_key_is_a_validated_bool():
    from sdar_engine.config import from_dict

    assert from_dict({}, ["warmstart.teacher_prompts=true"]).warmstart.teacher_prompts is True
    assert from_dict({}).warmstart.teacher_prompts is False
    with pytest.raises(ValueError, match="warmstart.teacher_prompts='yes'"):
        from_dict({"warmstart": {"teacher_prompts": "yes"}})


def test_probe_over_several_sampling_seeds_pairs_the_same_games(tmp_path):
    cfg = tiny_config(tmp_path, "env.eval_tasks=8", "rollout.max_new_tokens=24", "rollout.eval_temperature=0.5")
    model, tok = _policy(cfg)
    got = probe_teacher(cfg, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok,
                        backend=PromptReader(tok), eval_seeds=2)
    # the reader ignores the seed: 2 rounds of the 8 tasks, the teacher wins 6 more per round
    assert got["eval_games"] == 16 and got["student_success"] == 0.25 and got["teacher_success"] == 1.0
    assert got["teacher_only_wins"] == 12 and got["student_only_wins"] == 0
    assert got["teacher_minus_student"] == 0.75 and 0.0 < got["diff_lo"] <= 0.75 <= got["diff_hi"] <= 1.0
    with pytest.raises(ValueError, match="eval_seeds=0"):
        probe_teacher(cfg, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok, eval_seeds=0)
    greedy = tiny_config(tmp_path, "rollout.eval_temperature=0.0")
    with pytest.raises(ValueError, match="eval_seeds=2 needs a sampling"):
        probe_teacher(greedy, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok, eval_seeds=2)


def test_paired_wins_counts_each_task_once_per_round():
    from sdar_engine.teacher_probe import paired_wins

    student = [True, False, False, True, False, False]      # 3 tasks x 2 rounds
    teacher = [True, True, False, False, True, False]
    got = paired_wins(student, teacher, 3, resamples=2000)
    assert got["student_success"] == 2 / 6 and got["teacher_minus_student"] == pytest.approx(1 / 6)
    assert got["teacher_only_wins"] == 2 and got["student_only_wins"] == 1 and got["eval_games"] == 6
    assert got["diff_lo"] <= 1 / 6 <= got["diff_hi"]
    with pytest.raises(ValueError, match="whole rounds"):
        paired_wins(student, teacher[:5], 3)


def test_expert_agreement_counts_greedy_matches_per_prompt(tmp_path):
    cfg = tiny_config(tmp_path, "env.eval_tasks=8", "rollout.max_new_tokens=24")
    model, tok = _policy(cfg)
    got = probe_teacher(cfg, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok,
                        backend=PromptReader(tok), agreement_marker="go to")
    # the expert goes to the task's place; the reader goes there only when a skill names it
    # (teacher prompt), else to the desk, which is right for 2 of the 8 tasks
    assert got["agreement_steps"] == 8 and got["agreement_episodes"] == 8
    assert got["agree_teacher"] == got["agree_first_teacher"] == 1.0
    assert got["agree_student"] == got["agree_first_student"] == 0.25
    with pytest.raises(ValueError, match="marker='fly to'"):
        probe_teacher(cfg, model, None, FakeEnv("test", n_tasks=8), tokenizer=tok,
                      backend=PromptReader(tok), agreement_marker="fly to")
