"""PPO schedule and precision: mini-batch plans, on-policy ratio 1 under the update's autocast,
clipping in later mini-batches, float32 master weights for a bfloat16-stored model."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_model_support import build_and_load, random_samples, one_thread  # noqa: E402,F401

from sdar_kernels import LossConfig  # noqa: E402
from sdar_engine.model import ModelConfig, load_policy, set_compute_dtype  # noqa: E402
from sdar_engine.optim import OptimConfig, build_optimizer  # noqa: E402
from sdar_engine.update import local_plan, mini_batch_plan, policy_update, ppo_update  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_and_load(str(tmp_path_factory.mktemp("tiny")))[2]


def test_mini_batch_plan_partitions_each_epoch_and_is_seeded():
    plan = mini_batch_plan(10, 4, 2, seed=7)
    assert [len(mb) for epoch in plan for mb in epoch] == [3, 3, 4, 3, 3, 4]  # ceil(10 / 4) = 3 parts
    for epoch in plan:
        assert sorted(i for mb in epoch for i in mb) == list(range(10))
    assert plan[0] != plan[1] and plan == mini_batch_plan(10, 4, 2, seed=7) != mini_batch_plan(10, 4, 2, seed=8)
    assert mini_batch_plan(10, 0, 1, seed=7) == mini_batch_plan(10, 64, 1, seed=7) == [[list(range(10))]]
    # rank 1 owns global samples 6..9: its share of each mini-batch, as indices into its own list
    assert local_plan(plan, range(6, 10)) == [[[i - 6 for i in mb if i >= 6] for mb in e] for e in plan]
    with pytest.raises(ValueError, match="mini_batch_plan"):
        mini_batch_plan(0, 4, 1, seed=0)


def _scored_elsewhere(model, samples, dtype):
    """Old log-probs scored under another compute dtype (the pre-fix behaviour: no autocast)."""
    from sdar_engine.logprobs import score_samples

    saved = model.sdar_compute_dtype
    set_compute_dtype(model, dtype)
    score_samples(model, samples, 4096, "old", 1.0)
    set_compute_dtype(model, saved)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_mini_batch_is_on_policy_and_later_ones_clip(tiny_dir, dtype):
    """2 epochs x 2 mini-batches at a large lr: the first update sees ratio 1 (old log-probs
    scored under the same autocast as the update), the later ones are pushed past the clip range."""
    model, _ = load_policy(ModelConfig(path=tiny_dir, dtype=dtype, attn="sdpa"), "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    opt, _ = build_optimizer(model, OptimConfig(lr=3e-3))
    samples = random_samples(12, model.config.vocab_size, seed=3)
    for s in samples:
        s.advantage *= 5
    plan = mini_batch_plan(len(samples), 6, 2, seed=0)
    m = ppo_update(model, opt, samples, LossConfig.preset("grpo", kl_coef=0.0), plan, 4096, 1.0)
    first = max(m["ppo/e0/mb0/ratio_max"] - 1, 1 - m["ppo/e0/mb0/ratio_min"])
    assert m["ppo/e0/mb0/clip_frac"] == 0.0 and first <= 1e-6, m
    assert m["ppo/e0/mb0/approx_kl"] <= 1e-12
    assert m["optimizer_steps"] == 4 and m["ppo/e1/mb0/samples"] + m["ppo/e1/mb1/samples"] == 12
    later = [m[f"ppo/e{e}/mb{j}/clip_frac"] for e, j in ((0, 1), (1, 0), (1, 1))]
    assert min(later) > 0 and max(later) > 0.5, later
    assert m["ppo/e1/mb1/approx_kl"] > 1e-3 and m["ratio_max"] > 1.2
    if dtype == "bfloat16":  # control: old log-probs without the update's autocast are off by far more
        fresh, _ = load_policy(ModelConfig(path=tiny_dir, dtype=dtype, attn="sdpa"), "cpu")
        opt, _ = build_optimizer(fresh, OptimConfig(lr=3e-3))
        _scored_elsewhere(fresh, samples, torch.float32)
        m = ppo_update(fresh, opt, samples, LossConfig.preset("grpo", kl_coef=0.0), plan, 4096, 1.0)
        assert max(m["ppo/e0/mb0/ratio_max"] - 1, 1 - m["ppo/e0/mb0/ratio_min"]) > 1e-4  # 100x the bound


def _changed_fraction(model, before) -> float:
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    return changed / sum(p.numel() for p in model.parameters())


def test_bf16_stored_model_trains_float32_master_weights(tiny_dir, tmp_path):
    """10 AdamW steps at lr 1e-6 change >= 99 % of the weights of a bf16 checkpoint (fp32 master
    copy, bf16 compute); stepping the bf16 weights themselves changes few (the control)."""
    from transformers import AutoModelForCausalLM

    bf16_dir = tmp_path / "bf16"
    stored = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    stored.save_pretrained(bf16_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(tiny_dir, name)):
            (bf16_dir / name).write_bytes(open(os.path.join(tiny_dir, name), "rb").read())
    samples = random_samples(6, stored.config.vocab_size, seed=4, teacher=False)
    loss = LossConfig.preset("grpo", kl_coef=0.0)
    fractions = {}
    for master in (True, False):
        model, _ = load_policy(ModelConfig(path=str(bf16_dir), dtype="bfloat16", attn="sdpa"), "cpu")
        if master:
            opt, _ = build_optimizer(model, OptimConfig(lr=1e-6))
        else:
            model.to(torch.bfloat16)
            with pytest.raises(ValueError, match="float32 master weights"):
                build_optimizer(model, OptimConfig(lr=1e-6))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(10):
            for s in samples:
                s.old_logp = None
            policy_update(model, opt, samples, loss, 4096, 1.0)
        fractions[master] = _changed_fraction(model, before)
    assert fractions[True] >= 0.99 and fractions[False] < 0.5, fractions


def test_old_teacher_and_ref_passes_share_the_update_autocast(tiny_dir):
    """bf16 compute: the reference (same initial weights, loaded apart) scores bitwise like the
    policy, the teacher pass like an old pass over the teacher prompts, and both differ from
    float32 scoring (the autocast region is really entered)."""
    import copy

    from sdar_engine.logprobs import score_samples
    from sdar_engine.teacher import score_teacher

    cfg = ModelConfig(path=tiny_dir, dtype="bfloat16", attn="sdpa")
    policy, _ = load_policy(cfg, "cpu")
    ref, _ = load_policy(cfg, "cpu")
    samples = random_samples(8, policy.config.vocab_size, seed=9)
    score_samples(policy, samples, 4096, "old", 1.0)
    score_samples(ref, samples, 4096, "ref", 1.0)
    score_teacher(policy, samples, 4096, 1.0)
    as_student = [copy.copy(s) for s in samples]
    for s in as_student:
        s.prompt_ids, s.old_logp = s.teacher_prompt_ids, None
    score_samples(policy, as_student, 4096, "old", 1.0)
    fp32 = [copy.copy(s) for s in samples]
    _scored_elsewhere(policy, fp32, torch.float32)
    for s, t, f in zip(samples, as_student, fp32):
        assert torch.equal(s.old_logp, s.ref_logp) and torch.equal(s.teacher_logp, t.old_logp)
    assert max((s.old_logp - f.old_logp).abs().max().item() for s, f in zip(samples, fp32)) > 1e-4
