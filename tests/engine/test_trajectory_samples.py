"""Full-trajectory samples (algo.sample_mode: trajectory): one sample per episode, one conversation.

What was sampled is what is trained (each turn's generation read a prefix of the sample), the
loss mask is 1 exactly on generated tokens, packed == padded gradients, and the teacher's
trajectory log-probs equal a plain per-sequence HF forward.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from loop_fakes import FakeEnv, tiny_config, tiny_model_dir  # noqa: E402
from test_model_support import one_thread  # noqa: E402,F401

from sdar_kernels import LossConfig, fused_linear_sdar_loss  # noqa: E402
from sdar_engine.config import from_dict  # noqa: E402
from sdar_engine.logprobs import score_samples  # noqa: E402
from sdar_engine.model import ModelConfig, load_policy  # noqa: E402
from sdar_engine.packing import Sample, pack  # noqa: E402
from sdar_engine.rollout import HFBackend, run_episodes  # noqa: E402
from sdar_engine.teacher import score_teacher  # noqa: E402
from sdar_engine.trajectory import observation_turn_ids  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402


class RecordingBackend(HFBackend):
    """HF generation that records every (prompt ids, sampled ids) pair it served."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], list[int]]] = []

    def generate(self, prompts_ids, max_new_tokens, temperature, top_p=1.0, stop=None, seeds=None):
        out = super().generate(prompts_ids, max_new_tokens, temperature, top_p, stop, seeds)
        self.calls += [(list(p), list(r)) for p, r in zip(prompts_ids, out)]
        return out


def _load():
    model, tok = load_policy(ModelConfig(path=tiny_model_dir(), attn="sdpa"), "cpu")
    return model, tok


@pytest.fixture(scope="module")
def rollout():
    """(model, tokenizer, samples, backend): 4 tasks x 2 copies of the fake env, 3 turns each."""
    model, tok = _load()
    env = FakeEnv(n_tasks=8)
    backend = RecordingBackend(model, tok)
    ro = run_episodes(env, backend, tok, task_ids=env.task_ids[:4], group_size=2, max_new_tokens=8,
                      temperature=1.0, max_prompt_tokens=512, retrieval="keyword", seed=7,
                      sample_mode="trajectory")
    return model, tok, ro, backend


def _spans(sample: Sample, calls) -> list[tuple[int, int]]:
    """[start, stop) of each generated response inside the sample's response_ids."""
    full, p = sample.prompt_ids + sample.response_ids, len(sample.prompt_ids)
    spans = []
    for prompt, out in calls:
        if full[:len(prompt)] == prompt and full[len(prompt):len(prompt) + len(out)] == out:
            spans.append((len(prompt) - p, len(prompt) - p + len(out)))
    return sorted(set(spans))


def test_one_sample_per_episode_is_what_each_turn_read_and_wrote(rollout):
    _, tok, ro, backend = rollout
    assert len(ro.samples) == 8 and [s.episode for s in ro.samples] == list(range(8))
    assert len(ro.rewards) == len(ro.anchors) == 8 and ro.invalid_steps > 0
    for s in ro.samples:
        spans = _spans(s, backend.calls)
        assert len(spans) == s.meta["turns"] == 3  # every turn's prompt is a prefix of the sample
        generated = [0] * len(s.response_ids)
        for a, b in spans:
            generated[a:b] = [1] * (b - a)
        assert s.response_mask == generated  # policy tokens 1, observation turns 0
        assert 0 < s.num_loss_tokens < len(s.response_ids)
        assert spans[0][0] == 0 and spans[-1][1] == len(s.response_ids)  # starts and ends on the policy
        # the teacher reads the skill-prefixed turn-0 prompt; the rest of its sequence is shared
        teacher, student = tok.decode(s.teacher_prompt_ids), tok.decode(s.prompt_ids)
        assert "Skill:" in teacher and "Skill:" not in student
        assert student.split("<|im_start|>user\n")[1] in teacher


def test_packed_loss_mask_is_the_response_mask(rollout):
    _, _, ro, _ = rollout
    micro = pack(ro.samples, 500, row_tokens=512)
    assert len(micro) >= 2 and any(len(mb.sample_index) > 1 for mb in micro)
    for mb in micro:
        for k, i in enumerate(mb.sample_index):
            s, sl = ro.samples[i], mb.response_slices[k]
            assert mb.loss_mask[sl].tolist() == [float(m) for m in s.response_mask]
            assert mb.targets[sl].tolist() == s.response_ids
        assert mb.loss_mask.sum().item() == sum(ro.samples[i].num_loss_tokens for i in mb.sample_index)


def test_observation_turn_continues_the_chat_template(rollout):
    """Appending ids turn by turn spells exactly the multi-turn chat template's text."""
    _, tok, _, _ = rollout
    first = tok.apply_chat_template([{"role": "user", "content": "go"}], add_generation_prompt=True,
                                    tokenize=False)
    conv = tok(first, add_special_tokens=False)["input_ids"]
    reply = tok("<action>look</action>", add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    conv += reply + [eos]  # the model stopped by itself: the template's end-of-turn is not repeated
    conv += observation_turn_ids(tok, "you see a mug", conv)
    want = tok.apply_chat_template([{"role": "user", "content": "go"},
                                    {"role": "assistant", "content": "<action>look</action>"},
                                    {"role": "user", "content": "you see a mug"}],
                                   add_generation_prompt=True, tokenize=False)
    assert tok.decode(conv) == want
    cut = tok(first, add_special_tokens=False)["input_ids"] + reply  # truncated: no end-of-turn
    piece = observation_turn_ids(tok, "you see a mug", cut)
    assert piece[0] == eos and tok.decode(cut + piece) == want


def test_teacher_and_old_logprobs_equal_a_plain_forward_per_sequence(rollout):
    model, _, ro, _ = rollout
    samples = ro.samples
    temperature = 0.7
    score_teacher(model, samples, max_tokens=600, temperature=temperature)
    score_samples(model, samples, 600, "old", temperature)
    assert len(pack(samples, 600, use_teacher_prompt=True, row_tokens=256)) >= 3
    model.eval()
    worst = 0.0
    for s in samples:
        for context, got in ((s.teacher_prompt_ids, s.teacher_logp), (s.prompt_ids, s.old_logp)):
            seq = torch.tensor([context + s.response_ids])
            with torch.no_grad():
                logits = model(input_ids=seq).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)[:-1].gather(1, seq[0, 1:, None])[:, 0]
            want = logp[len(context) - 1:]
            mask = torch.tensor(s.response_mask, dtype=torch.bool)
            assert got.shape == want.shape
            worst = max(worst, (got[mask] - want[mask]).abs().max().item())
            assert torch.all(got[~mask] == 0)  # observation tokens are not scored
    assert worst <= 1e-5, worst
    # the teacher really reads another context: its log-probs differ from the student's
    assert max((s.teacher_logp - s.old_logp).abs().max().item() for s in samples) > 1e-3


def _padded_grads(model, samples, cfg, full_mask=False):
    """Reference: one right-padded batch [B, L], attention mask, the trajectory loss mask
    (all response tokens when ``full_mask``: the broken behaviour)."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    b = len(samples)
    ids, attn = torch.zeros(b, width, dtype=torch.long), torch.zeros(b, width, dtype=torch.long)
    tgt, mask = torch.zeros(b, width, dtype=torch.long), torch.zeros(b, width)
    per = {k: torch.zeros(b, width) for k in ("adv", "old", "teacher", "ref")}
    for i, s in enumerate(samples):
        stream, p = s.prompt_ids + s.response_ids, len(s.prompt_ids)
        ids[i, :len(stream)], attn[i, :len(stream)] = torch.tensor(stream), 1
        tgt[i, :len(stream) - 1] = torch.tensor(stream[1:])
        sl = slice(p - 1, len(stream) - 1)
        mask[i, sl] = 1.0 if full_mask else torch.tensor(s.response_mask, dtype=torch.float32)
        per["adv"][i, sl] = s.advantage
        per["old"][i, sl], per["teacher"][i, sl], per["ref"][i, sl] = s.old_logp, s.teacher_logp, s.ref_logp
    model.zero_grad()
    hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    seg = torch.arange(b).repeat_interleave(width)
    out = fused_linear_sdar_loss(hidden.reshape(b * width, -1), model.lm_head.weight, tgt.reshape(-1),
                                 per["adv"].reshape(-1), per["old"].reshape(-1), mask.reshape(-1),
                                 teacher_logprobs=per["teacher"].reshape(-1), ref_logprobs=per["ref"].reshape(-1),
                                 segment_ids=seg, config=cfg)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


class _GradRecorder(torch.optim.SGD):
    """An optimizer step that only records the accumulated gradients (lr 0)."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.grads = {}

    def step(self, closure=None):
        self.grads = {self.names[id(p)]: p.grad.detach().clone() for g in self.param_groups for p in g["params"]}


def _max_rel(grads, ref):
    return max(((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)).item() for n, g in grads.items())


@pytest.mark.parametrize("agg,row_tokens", [("token-mean", 512), ("token-mean", 0), ("seq-mean-token-mean", 512)])
def test_packed_update_equals_padded_batch_for_trajectories(rollout, agg, row_tokens):
    _, _, ro, _ = rollout
    g = torch.Generator().manual_seed(11)
    samples = []
    for k, s in enumerate(ro.samples):  # copies with fixed synthetic scores (episode advantages)
        n = len(s.response_ids)
        old = -4.0 + 0.1 * torch.randn(n, generator=g)
        samples.append(Sample(prompt_ids=s.prompt_ids, response_ids=s.response_ids, response_mask=s.response_mask,
                              teacher_prompt_ids=s.teacher_prompt_ids, advantage=(-1.0) ** k * (0.3 + 0.1 * k),
                              episode=s.episode, group=s.group, old_logp=old, ref_logp=old + 0.05,
                              teacher_logp=-4.0 + 0.5 * torch.randn(n, generator=g)))
    cfg = LossConfig.preset("sdar", kl_coef=0.01, entropy_coef=0.001, gate_beta=5.0, agg=agg)
    loss_ref, ref = _padded_grads(_load()[0].train(), samples, cfg)
    model = _load()[0].train()
    recorder = _GradRecorder(model)
    m = policy_update(model, recorder, samples, cfg, max_tokens=500, grad_clip=0.0, row_tokens=row_tokens)
    assert m["micro_batches"] >= 2
    assert m["tokens"] == sum(s.num_loss_tokens for s in samples) < sum(len(s.response_ids) for s in samples)
    assert m["loss"] == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)
    assert len(recorder.grads) == len(ref) and _max_rel(recorder.grads, ref) <= 1e-5
    # observations in the loss (mask 1 on every response token) would give another gradient
    _, broken = _padded_grads(_load()[0].train(), samples, cfg, full_mask=True)
    assert _max_rel(recorder.grads, broken) > 1e-2


def test_two_step_training_run_in_trajectory_mode(tmp_path):
    from sdar_engine.metrics import read_metrics
    from sdar_engine.trainer import Trainer

    cfg = tiny_config(tmp_path, "algo.sample_mode=trajectory", "algo.method=sdar", "algo.ppo_mini_batch_size=2",
                      "rollout.max_prompt_tokens=512")
    trainer = Trainer(cfg, tmp_path, env=FakeEnv(n_tasks=8), eval_env=FakeEnv("test", n_tasks=2))
    last = trainer.fit()
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "success" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["samples"] == 4 and r["episodes"] == 4  # one sample per episode
        assert r["ppo_mini_batches"] == 2 and 0.0 <= r["gate_mean"] <= 1.0
        assert 0 < r["tokens"] < r["rollout_tokens"]  # observation tokens are not in the loss
        assert r["context_cut_rate"] == 0.0
    assert "eval/success" in last


def test_config_key_is_validated(tmp_path):
    base = ["train.device=cpu"]
    assert from_dict({}, base, check_paths=False).algo.sample_mode == "step"
    with pytest.raises(ValueError, match="algo.sample_mode='episode' is invalid; valid: one of step, trajectory"):
        from_dict({}, base + ["algo.sample_mode=episode"], check_paths=False)
    with pytest.raises(ValueError, match="algo.advantage='gigpo' is invalid with algo.sample_mode"):
        from_dict({}, base + ["algo.sample_mode=trajectory", "algo.advantage=gigpo"], check_paths=False)


def test_conversation_cap_ends_episodes_without_a_dangling_observation():
    model, tok = _load()
    env = FakeEnv(n_tasks=4)
    ro = run_episodes(env, HFBackend(model, tok), tok, task_ids=env.task_ids[:2], group_size=1,
                      max_new_tokens=8, temperature=1.0, max_prompt_tokens=140, seed=3,
                      sample_mode="trajectory")
    assert ro.context_cut == 2 and ro.metrics()["context_cut_rate"] == 1.0 and not any(ro.won)
    for s in ro.samples:
        assert s.response_mask[-1] == 1 and len(s.prompt_ids) + len(s.response_ids) <= 140 + 8
        assert s.meta["turns"] < 3


def test_bad_response_mask_is_named():
    s = Sample(prompt_ids=[5, 6], response_ids=[7, 8, 9], response_mask=[1, 0])
    with pytest.raises(ValueError, match=r"samples\[0\].response_mask has 2 entries; its response_ids has 3"):
        pack([s], 100)
    s.response_mask = [1, 2, 0]
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        pack([s], 100)
