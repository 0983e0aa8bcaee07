"""Multi-turn rollout on the fake env: one sample per live step, rewards, penalties, teacher ids."""
import pytest
import torch

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_model_dir
except ImportError:  # rootdir without package layout
    from loop_fakes import FakeEnv, tiny_model_dir

from sdar_engine.model import ModelConfig, load_policy
from sdar_engine.rollout import HFBackend, render_prompt_ids, run_episodes, stop_token_ids
from sdar_engine.teacher import teacher_prompt_ids


class ScriptedBackend:
    """Answers from a queue of texts per call (tokenized), recording the prompts it saw."""

    def __init__(self, tokenizer, turns):
        self.tok, self.turns, self.seen = tokenizer, list(turns), []

    def generate(self, prompts_ids, max_new_tokens, temperature, top_p=1.0, stop=None, seeds=None):
        self.seen.append(len(prompts_ids))
        texts = self.turns.pop(0)
        eot = stop_token_ids(self.tok)[0]
        return [self.tok(t, add_special_tokens=False)["input_ids"] + [eot] for t in texts[:len(prompts_ids)]]


@pytest.fixture(scope="module")
def policy():
    return load_policy(ModelConfig(path=tiny_model_dir(), attn="sdpa"), "cpu")


def test_samples_rewards_penalties_and_done_drop(policy):
    _, tok = policy
    env = FakeEnv(n_tasks=2, max_steps=3)
    # task 0 (even): place desk, obj apple; task 1 (odd): shelf, mug. G=2 -> envs 0,1 task 0; 2,3 task 1.
    turns = [["<think>x</think><action>go to desk</action>", "no tags here",
              "<think>x</think><action>go to shelf</action>", "<think>x</think><action>look</action>"],
             ["<think>x</think><action>take apple</action>", "<think>x</think><action>look</action>",
              "<think>x</think><action>look</action>", "<think>x</think><action>look</action>"],
             ["<think>x</think><action>look</action>"] * 3]
    backend = ScriptedBackend(tok, turns)
    ro = run_episodes(env, backend, tok, task_ids=env.task_ids, group_size=2, max_new_tokens=8,
                      temperature=1.0, retrieval="keyword")
    assert ro.won == [True, False, False, False]
    assert backend.seen == [4, 4, 3]  # env 0 won at step 2: no third-turn prompt for it
    assert len(ro.samples) == 2 + 3 + 3 + 3
    # canonical order: by episode, then step (not by turn)
    assert [(s.group, s.episode, s.step) for s in ro.samples[:6]] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, 2), (1, 2, 0)]
    # episode reward 10 at every step of env 0; env 1's untagged step 0 costs 0.1
    by_ep = {}
    for s, r in zip(ro.samples, ro.rewards):
        by_ep.setdefault(s.episode, []).append(r)
    assert by_ep[0] == [10.0, 10.0]
    assert by_ep[1] == pytest.approx([-0.1, 0.0, 0.0])
    assert ro.invalid_steps == 1
    assert ro.step_rewards[:2] == [0.0, 10.0]  # env 0 won at its second step
    assert ro.samples[1].meta == {"action": "<think>x</think><action>take apple</action>",
                                  "task": env.task_ids[0]}
    m = ro.metrics()
    assert m["success"] == 0.25 and m["success/even"] == 0.5 and m["success/odd"] == 0.0
    # teacher prompt: skill header + the same student prompt, rendered before the step
    s0 = ro.samples[0]
    assert s0.teacher_prompt_ids is not None and len(s0.teacher_prompt_ids) > len(s0.prompt_ids)
    assert "Skill:" in tok.decode(s0.teacher_prompt_ids) and "You are in a room" in tok.decode(s0.teacher_prompt_ids)
    assert s0.response_ids[-1] == stop_token_ids(tok)[0]


def test_max_turns_cut_and_no_teacher_without_retrieval(policy):
    _, tok = policy
    env = FakeEnv(n_tasks=2)
    backend = ScriptedBackend(tok, [["<think>a</think><action>look</action>"] * 2] * 5)
    ro = run_episodes(env, backend, tok, task_ids=env.task_ids, group_size=1, max_new_tokens=8,
                      temperature=1.0, max_turns=2)
    assert len(ro.samples) == 4 and ro.won == [False, False]
    assert all(s.teacher_prompt_ids is None for s in ro.samples)


def test_hf_backend_left_pads_and_stops_at_eos(policy):
    model, tok = policy
    env = FakeEnv(n_tasks=2)
    env.reset(batch_size=2)
    prompts = [render_prompt_ids(tok, env.prompt(0)), render_prompt_ids(tok, "short")]
    assert len(prompts[0]) != len(prompts[1])
    backend = HFBackend(model, tok, "cpu")
    torch.manual_seed(0)
    out = backend.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1.0)
    assert len(out) == 2 and all(1 <= len(r) <= 6 for r in out)
    eos = set(stop_token_ids(tok))
    assert all(t not in eos for r in out for t in r[:-1])  # eos only ever last
    greedy = backend.generate(prompts[:1], max_new_tokens=6, temperature=0.0)
    alone = backend.generate(prompts[:1] * 2, max_new_tokens=6, temperature=0.0)
    assert greedy[0] == alone[0] == alone[1]  # padding does not change the result
    assert model.training  # generation restores the mode
    full = teacher_prompt_ids(env, tok, [0, 1], "keyword")
    assert teacher_prompt_ids(env, tok, [0, 1], "keyword", max_prompt_tokens=len(full[0]))[0] == full[0]
    # a cap below the skills + current step is an error naming the key, never a cut through the skills
    with pytest.raises(ValueError, match="rollout.max_prompt_tokens=5 is too small for this teacher prompt"):
        teacher_prompt_ids(env, tok, [0, 1], "keyword", max_prompt_tokens=5)
    with pytest.raises(ValueError, match="retrieval='bm25'.*keyword, full, random, ucb"):
        teacher_prompt_ids(env, tok, [0], "bm25")


def test_seeded_sampling_ignores_batch_company_and_chunking(policy):
    """A prompt's tokens depend on its seed only: alone, in a padded batch or in chunks alike."""
    model, tok = policy
    env = FakeEnv(n_tasks=4)
    env.reset(batch_size=4)
    prompts = [render_prompt_ids(tok, env.prompt(i)) for i in range(4)] + [render_prompt_ids(tok, "short")]
    seeds = [11, 12, 13, 14, 15]
    backend = HFBackend(model, tok, "cpu")
    together = backend.generate(prompts, 8, temperature=1.0, top_p=0.9, seeds=seeds)
    alone = [backend.generate([p], 8, 1.0, 0.9, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    chunked = HFBackend(model, tok, "cpu", gen_batch=2).generate(prompts, 8, 1.0, 0.9, seeds=seeds)
    assert together == alone == chunked
    assert backend.generate(prompts, 8, 1.0, 0.9, seeds=[s + 100 for s in seeds]) != together
    with pytest.raises(ValueError, match="seeds has 1 entries for 5 prompts"):
        backend.generate(prompts, 8, 1.0, seeds=[1])


def test_seeded_sampling_draws_from_the_tempered_nucleus():
    from collections import Counter

    from sdar_engine.rollout import SeededSampling, sampling_seed, top_p_filter

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    kept = top_p_filter(logits / 0.5, 0.9)  # softmax(logits / 0.5) = .844, .114, .015, ...: two reach 0.9
    assert torch.isfinite(kept).tolist() == [[True, True, False, False, False]]
    sampler = SeededSampling(0.5, 0.9, seeds=[3], device=torch.device("cpu"))
    counts = Counter(int(sampler(None, logits).argmax()) for _ in range(4000))
    p0 = torch.softmax(logits[0, :2] / 0.5, 0)[0].item()  # 0.881 within the nucleus
    assert set(counts) == {0, 1} and abs(counts[0] / 4000 - p0) < 0.02, (counts, p0)
    assert sampling_seed("rollout", 0, 1) == 6495046112679028601  # the same in every process (not hash())


def test_episode_shares_replay_the_whole_batch(policy):
    """Two shares of the episodes (as two ranks play them) give the whole batch's samples."""
    model, tok = policy
    backend = HFBackend(model, tok, "cpu")
    kw = dict(task_ids=FakeEnv(n_tasks=3).task_ids, group_size=2, max_new_tokens=6, temperature=1.0, seed=7)
    whole = run_episodes(FakeEnv(n_tasks=3), backend, tok, **kw)
    parts = [run_episodes(FakeEnv(n_tasks=3), backend, tok, episodes=eps, **kw) for eps in (range(2), range(2, 6))]
    key = lambda ro: [(s.group, s.episode, s.step, s.prompt_ids, s.response_ids) for s in ro.samples]  # noqa: E731
    assert key(whole) == key(parts[0]) + key(parts[1]) and len(whole.samples) >= 6
    assert whole.rewards == parts[0].rewards + parts[1].rewards
    assert (whole.episode_ids, parts[1].episode_ids) == (list(range(6)), [2, 3, 4, 5])
    other = run_episodes(FakeEnv(n_tasks=3), backend, tok, **{**kw, "seed": 8})
    assert key(other) != key(whole)
