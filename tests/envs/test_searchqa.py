"""Search-QA suite: Search-R1 formats, EM, expert >= 95 %, random low, determinism, workers."""
import random

import pytest

import sdar_envs
from sdar_envs.searchqa import (INVALID_MESSAGE, build_suite, exact_match, normalize_answer,
                                render_information)


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=0)


def test_splits_disjoint_and_ids_well_formed(suite):
    train, test = suite.task_ids("train"), suite.task_ids("test")
    assert len(test) >= 150 and len(train) >= 4 * len(test) - 10
    assert not set(train) & set(test)
    assert not {suite.question(t).question for t in train} & {suite.question(t).question for t in test}
    for tid in train[:5] + test[:5]:
        env, split, ttype, idx = tid.split("/")
        assert env == "searchqa" and ttype in ("single_hop", "multi_hop", "comparison") and idx.isdigit()
    assert {tid.split("/")[2] for tid in test} == {"single_hop", "multi_hop", "comparison"}


def test_same_world_seed_same_suite():
    a, b = build_suite(world_seed=3), build_suite(seed=9, world_seed=3)  # env seed: no effect
    assert a.task_ids("test") == b.task_ids("test") and a.docs == b.docs
    assert [a.question(t).question for t in a.task_ids("test")[:20]] == \
        [b.question(t).question for t in b.task_ids("test")[:20]]
    assert build_suite(world_seed=4).docs != a.docs
    with pytest.raises(ValueError, match="options \\['colour'\\] are not valid"):
        build_suite(colour="red")


def test_passages_are_wiki18_form(suite):
    doc = suite.docs[0]
    assert set(doc) == {"id", "contents"}
    title, _, text = doc["contents"].partition("\n")
    assert title.startswith('"') and title.endswith('"') and text


def test_information_block_format():
    docs = [{"id": "1", "contents": '"A"\nalpha'}, {"id": "2", "contents": '"B"\nbeta'}]
    assert render_information(docs) == \
        '\n\n<information>Doc 1(Title: "A") alpha\nDoc 2(Title: "B") beta\n</information>\n\n'


def test_game_search_answer_invalid_and_cap(suite):
    tid = suite.task_ids("test")[0]
    g = suite.make_game(tid)
    obs, info = g.reset()
    assert obs == g.task_text and info["admissible_actions"] == []
    obs, r, done, _ = g.step("search[" + g.task_text + "]")
    assert obs.startswith("\n\n<information>Doc 1(Title: ") and obs.count("Doc ") == 3 and not done
    obs, r, done, _ = g.step("invalid[zzz]")
    assert obs == INVALID_MESSAGE and r == 0.0 and not done
    g.step("search[x]")
    obs, r, done, info = g.step("search[y]")
    assert done and r == 0.0 and not info["won"]  # 4-turn cap
    g.reset()
    obs, r, done, info = g.step(f"answer[{suite.question(tid).golden_answers[0].upper()}!]")
    assert done and r == 1.0 and info["won"] and info["score"] == 1.0


def test_squad_normalization():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert exact_match("the Rossar river", ["Rossar", "Rossar river"])
    assert not exact_match("Rossar lake", ["Rossar", "Rossar river"])


def _run(env, policy):
    """Play to the end; returns the final infos."""
    infos = []
    while not all(env.dones):
        infos = env.step(policy(env))[3]
    return infos


def test_expert_wins_at_least_95_percent_on_50_test_tasks():
    env = sdar_envs.make("searchqa", split="test", seed=0)
    env.reset(batch_size=50)
    infos = _run(env, lambda e: e.expert_actions())
    rate = sum(i["won"] for i in infos) / len(infos)
    print(f"searchqa expert EM on 50 test tasks: {rate:.2%}")
    assert rate >= 0.95


def _random_policy(seed):
    rng = random.Random(seed)

    def act(env):
        out = []
        for i in range(env.num_envs):
            words = env.prompt(i).rsplit("Question: ", 1)[1].split()
            if rng.random() < 0.5:
                out.append(f"<think>r</think><search>{' '.join(rng.sample(words, 2))}</search>")
            else:
                out.append(f"<think>r</think><answer>{rng.choice(words)}</answer>")
        return out
    return act


def test_random_policy_stays_low():
    env = sdar_envs.make("searchqa", split="test", seed=0)
    env.reset(batch_size=50)
    infos = _run(env, _random_policy(0))
    rate = sum(i["won"] for i in infos) / len(infos)
    print(f"searchqa random-policy EM on 50 test tasks: {rate:.2%}")
    assert rate <= 0.2


def test_env_level_determinism_and_penalty():
    traces = []
    for _ in range(2):
        env = sdar_envs.make("searchqa", split="train", seed=11)
        obs, _ = env.reset(batch_size=4, group_size=2)
        trace = [obs]
        policy = _random_policy(5)
        while not all(env.dones):
            o, r, d, infos = env.step(policy(env))
            trace.append((o, r, [i["penalty"] for i in infos]))
        traces.append(trace)
    assert traces[0] == traces[1]
    env = sdar_envs.make("searchqa", split="train", seed=11)
    env.reset(batch_size=1)
    _, _, _, infos = env.step(["<search>a</search><answer>b</answer>"])
    assert infos[0]["penalty"] == pytest.approx(0.01) and not infos[0]["is_action_valid"]
    assert env.observation(0) == INVALID_MESSAGE


def test_worker_pool_matches_in_process():
    results = []
    for workers in (0, 2):
        with sdar_envs.make("searchqa", split="test", seed=2, num_workers=workers) as env:
            obs, _ = env.reset(batch_size=3, group_size=2)
            trace = [obs]
            while not all(env.dones):
                o, r, d, _ = env.step(env.expert_actions())
                trace.append((o, r, d))
            if workers:
                assert env._runner.torch_loaded == [False, False]
            results.append(trace)
    assert results[0] == results[1]


def test_train_and_eval_envs_with_different_seeds_stay_disjoint():
    train = sdar_envs.make("searchqa", split="train", seed=0)
    test = sdar_envs.make("searchqa", split="test", seed=1000)
    assert not set(train.task_ids) & set(test.task_ids)
    train_q = {train._runner.suite.question(t).question for t in train.task_ids}
    test_q = {test._runner.suite.question(t).question for t in test.task_ids}
    assert not train_q & test_q
