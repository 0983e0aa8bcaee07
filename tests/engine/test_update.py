"""policy_update: packed micro-batches == one padded batch; no [N, V] tensor; errors; optimizer."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_model_support import build_and_load, random_samples, one_thread  # noqa: E402,F401

from sdar_kernels import LossConfig, fused_linear_sdar_loss  # noqa: E402
from sdar_engine.memory_tracker import LargestTensorTracker  # noqa: E402
from sdar_engine.optim import OptimConfig, build_optimizer, warmup_factor  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_and_load(str(tmp_path_factory.mktemp("tiny")))


def _fresh(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny[2], attn_implementation="sdpa")
    model.train()
    return model


def _padded_teacher_hidden(model, samples, width):
    """[B*width, H] teacher hidden states at the student's response positions (padded batch)."""
    t_width = max(len(s.teacher_prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.zeros(len(samples), t_width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        stream = s.teacher_prompt_ids + s.response_ids
        ids[i, :len(stream)], attn[i, :len(stream)] = torch.tensor(stream), 1
    with torch.no_grad():
        th = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    out = torch.zeros(len(samples), width, th.shape[-1])
    for i, s in enumerate(samples):
        p, t, r = len(s.prompt_ids), len(s.teacher_prompt_ids), len(s.response_ids)
        out[i, p - 1:p - 1 + r] = th[i, t - 1:t - 1 + r]
    return out.reshape(len(samples) * width, -1)


def _padded_grads(model, samples, cfg):
    """Reference: one right-padded batch [B, L] with an attention mask, plain per-sample rows."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    b = len(samples)
    ids = torch.zeros(b, width, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.long)
    tgt, mask = torch.zeros(b, width, dtype=torch.long), torch.zeros(b, width)
    per = {k: torch.zeros(b, width) for k in ("adv", "old", "teacher", "ref")}
    for i, s in enumerate(samples):
        stream, p = s.prompt_ids + s.response_ids, len(s.prompt_ids)
        ids[i, :len(stream)] = torch.tensor(stream)
        attn[i, :len(stream)] = 1
        tgt[i, :len(stream) - 1] = torch.tensor(stream[1:])
        sl = slice(p - 1, len(stream) - 1)
        mask[i, sl] = 1
        per["adv"][i, sl] = s.advantage
        per["old"][i, sl], per["teacher"][i, sl] = s.old_logp, s.teacher_logp
        per["ref"][i, sl] = s.ref_logp
    model.zero_grad()
    extra = {}
    if cfg.full_vocab_divergence:
        extra = dict(teacher_hidden=_padded_teacher_hidden(model, samples, width),
                     teacher_weight=model.lm_head.weight.detach())
    hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    out = fused_linear_sdar_loss(hidden.reshape(b * width, -1), model.lm_head.weight, tgt.reshape(-1),
                                 per["adv"].reshape(-1), per["old"].reshape(-1), mask.reshape(-1),
                                 teacher_logprobs=per["teacher"].reshape(-1),
                                 ref_logprobs=per["ref"].reshape(-1), config=cfg, **extra)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class _GradRecorder(torch.optim.SGD):
    """An optimizer step that only records the accumulated gradients (lr 0): ``grads`` of the
    last step, ``steps`` of every step."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.grads, self.steps = {}, []

    def step(self, closure=None):
        self.grads = {self.names[id(p)]: p.grad.detach().clone()
                      for group in self.param_groups for p in group["params"]}
        self.steps.append(self.grads)


def _relative_errors(grads, ref):
    return {n: ((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)).item() for n, g in grads.items()}


@pytest.mark.parametrize("divergence,row_tokens", [("sampled", 256), ("reverse_kl", 256), ("sampled", 0)])
def test_packed_update_equals_padded_batch(tiny, divergence, row_tokens):
    """row_tokens 256: several samples per row (block-diagonal mask); 0: one sample per row."""
    cfg = LossConfig.preset("sdar", kl_coef=0.01, entropy_coef=0.001, gate_beta=5.0, divergence=divergence)
    samples = random_samples(14, tiny[0].config.vocab_size, seed=3, scored=-6.0)
    for s in samples:
        s.ref_logp = s.old_logp + 0.05
    ref = _padded_grads(_fresh(tiny), samples, cfg)
    model = _fresh(tiny)
    recorder = _GradRecorder(model)
    metrics = policy_update(model, recorder, samples, cfg, max_tokens=120, grad_clip=0.0,
                            row_tokens=row_tokens)
    assert metrics["micro_batches"] >= 3
    assert metrics["rows"] == (metrics["micro_batches"] if row_tokens else len(samples))
    assert metrics["tokens"] == sum(len(s.response_ids) for s in samples)
    errors = _relative_errors(recorder.grads, ref)
    assert len(errors) == len(ref) and max(errors.values()) <= 1e-5, errors
    total = torch.sqrt(sum((g ** 2).sum() for g in ref.values()))
    assert metrics["grad_norm"] == pytest.approx(total.item(), rel=1e-5)


def test_packed_micro_batches_inside_each_ppo_mini_batch_equal_its_padded_batch(tiny):
    """Two mini-batches of 7 samples, each several micro-batches: each optimizer step's gradient
    is the padded-batch gradient of that mini-batch alone (its own normalizer)."""
    from sdar_engine.update import mini_batch_plan, ppo_update

    cfg = LossConfig.preset("sdar", kl_coef=0.01, entropy_coef=0.001)
    samples = random_samples(14, tiny[0].config.vocab_size, seed=3, scored=-6.0)
    for s in samples:
        s.ref_logp = s.old_logp + 0.05
    plan = mini_batch_plan(len(samples), 7, 1, seed=5)
    assert [len(mb) for mb in plan[0]] == [7, 7] and plan[0][0] != list(range(7))  # shuffled
    model = _fresh(tiny)
    recorder = _GradRecorder(model)
    metrics = ppo_update(model, recorder, samples, cfg, plan, max_tokens=120, grad_clip=0.0, row_tokens=256)
    assert len(recorder.steps) == 2 and metrics["micro_batches"] >= 2
    for mb, grads in zip(plan[0], recorder.steps):
        ref = _padded_grads(_fresh(tiny), [samples[i] for i in mb], cfg)
        errors = _relative_errors(grads, ref)
        assert len(errors) == len(ref) and max(errors.values()) <= 1e-5, errors


def test_no_logits_sized_tensor_in_a_training_step(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdar_engine.model import attach_head_forward

    vocab = 16384  # [N, V] logits would be 8x above the threshold the step must stay under
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=256, tie_word_embeddings=True))
    model.config._attn_implementation = "sdpa"
    attach_head_forward(model)
    samples = random_samples(24, vocab, seed=5, prompt=(40, 80), response=(20, 40), scored=-9.0)
    n_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    cfg = LossConfig.preset("sdar", kl_coef=0.0, token_chunk=256, vocab_chunk=1024)
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-4))
    with LargestTensorTracker() as tracker:
        metrics = policy_update(model, opt, samples, cfg, max_tokens=n_tokens, grad_clip=1.0, row_tokens=512)
    assert metrics["micro_batches"] == 1 and tracker.ops > 100
    limit = n_tokens * vocab // 8
    assert tracker.largest.numel < limit, (tracker.top, limit)
    # positive control: the same tracker sees materialized logits
    with LargestTensorTracker() as control:
        model(input_ids=torch.tensor([samples[0].prompt_ids * 4]), use_cache=False)
    assert control.largest.numel >= len(samples[0].prompt_ids) * 4 * vocab


def test_missing_inputs_fail_clearly(tiny):
    model = _fresh(tiny)
    opt, _ = build_optimizer(model, OptimConfig())
    samples = random_samples(3, model.config.vocab_size, seed=2)
    with pytest.raises(ValueError, match="teacher_logp"):
        policy_update(model, opt, samples, LossConfig.preset("sdar", kl_coef=0.0), 256, 1.0)
    with pytest.raises(ValueError, match="ref_model"):
        policy_update(model, opt, samples, LossConfig.preset("grpo", kl_coef=0.01), 256, 1.0)
    with pytest.raises(ValueError, match="samples is empty"):
        policy_update(model, opt, [], LossConfig.preset("grpo"), 256, 1.0)
    for s in samples:
        s.teacher_prompt_ids = None
    with pytest.raises(ValueError, match="divergence='reverse_kl'.*teacher_prompt_ids"):
        policy_update(model, opt, samples, LossConfig.preset("sdar", kl_coef=0.0, divergence="reverse_kl"),
                      256, 1.0)


def test_grpo_update_with_ref_model_moves_weights_and_logs(tiny):
    model, ref_model = _fresh(tiny), _fresh(tiny)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=2))
    samples = random_samples(6, model.config.vocab_size, seed=4, teacher=False)
    w0 = model.lm_head.weight.detach().clone()
    m = policy_update(model, opt, samples, LossConfig.preset("grpo"), 256, 1.0, ref_model=ref_model,
                      scheduler=sched)
    assert all(s.old_logp is not None and s.ref_logp is not None for s in samples)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["ref_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["lr"] == pytest.approx(1e-3 * 2 / 3)  # warmup: the scheduler stepped once
    assert not torch.equal(w0, model.lm_head.weight)


def test_optim_config_and_warmup():
    assert [warmup_factor(s, 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="OptimConfig.lr=-1"):
        OptimConfig(lr=-1)
    with pytest.raises(ValueError, match="OptimConfig.betas"):
        OptimConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=1.5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from sdar_engine.model import ModelConfig, load_policy

    cfg = LossConfig.preset("grpo", kl_coef=0.0)
    grads = []
    for ckpt in (False, True):
        model, _ = load_policy(ModelConfig(path=tiny[2], grad_checkpointing=ckpt), "cpu")
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == ckpt
        samples = random_samples(6, model.config.vocab_size, seed=8, scored=-6.0)
        recorder = _GradRecorder(model)
        policy_update(model, recorder, samples, cfg, max_tokens=100, grad_clip=0.0)
        grads.append(recorder.grads)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-8)
