"""SDARGRPOTrainer.train() end to end on CPU against TRL's own GRPOTrainer (trl 1.16.0).

A tiny random float64 Llama, a local tokenizer and a toy reward; 3 optimizer steps of 2
accumulated micro-batches each. The adapter must run its fused loss, and every step's logged
loss and every parameter gradient (captured right before the optimizer step) must equal TRL's
own trainer on the same seed to 1e-5 relative (TRL's fused lm_head computes in fp32).
"""
from __future__ import annotations

import logging

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from sdar_kernels.integrations.trl import SDARGRPOTrainer  # noqa: E402

from .trl_fixtures import make_trainer, prompt_dataset, tiny_llama, tokenizer  # noqa: E402

# loss_type is TRL's default (dapo); the entropy bonus keeps the logged loss away from 0 (an on-policy
# GRPO loss is ~ -mean(A) = 0 up to rounding, which would make its relative comparison empty).
# Plain SGD: with adamw the step-2 gradients were 5e-4 apart on the same completions (our reading: Adam's
# first update is ~lr * sign(g), so entries that are ~0 up to rounding, TRL's fp32 head vs our fp64,
# move by ~lr either way).
STEPS = dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", entropy_coef=0.01)


class GradRecorder(TrainerCallback):
    """Copies of every parameter gradient at each optimizer step, and the generated completions."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _train(cls, tmp_path, steps: dict = STEPS, **kwargs):
    rec = GradRecorder()
    tr = make_trainer(cls, tiny_llama(seed=0), tmp_path, callbacks=[rec], args=dict(steps), **kwargs)
    completions = []
    original = tr._generate_and_score_completions

    def recording(inputs):
        out = original(inputs)
        completions.append(out["completion_ids"].clone())
        return out

    tr._generate_and_score_completions = recording
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return tr, rec.grads, losses, completions


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_three_steps_match_trl(tmp_path):
    ours, our_grads, our_losses, our_completions = _train(SDARGRPOTrainer, tmp_path / "sdar")
    peer, peer_grads, peer_losses, peer_completions = _train(trl.GRPOTrainer, tmp_path / "trl")
    assert ours.fused_loss_calls == 6 and ours.fallback_loss_calls == 0  # 3 steps x 2 micro-batches
    assert len(our_grads) == len(peer_grads) == 3 and len(our_losses) == len(peer_losses) == 3
    for step in range(3):
        # the same sampled completions (else the comparison below would be meaningless)
        assert torch.equal(our_completions[step], peer_completions[step]), f"sampling diverged at step {step + 1}"
        assert abs(our_losses[step] - peer_losses[step]) <= 1e-5 * abs(peer_losses[step]) + 1e-12, step
        want, got = peer_grads[step], our_grads[step]
        assert want.keys() == got.keys() and len(want) == len(list(peer.model.parameters()))
        errors = {n: _rel(got[n], want[n]) for n in want}
        assert max(errors.values()) < 1e-5, (step, {n: e for n, e in errors.items() if e >= 1e-5})
    assert any(g.abs().sum() > 0 for g in our_grads[0].values())
    # TRL's metrics are still logged
    logged = {k for h in ours.state.log_history for k in h}
    assert {"entropy", "clip_ratio/region_mean", "reward"} <= logged


def test_first_step_matches_trl_with_its_default_optimizer(tmp_path):
    """TRL's default AdamW: the first step's loss and every gradient equal TRL's to 1e-5; the second step
    samples the same completions (its gradients then drift by ~5e-4, see STEPS above)."""
    steps = {**STEPS, "optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 2}
    ours, our_grads, our_losses, our_completions = _train(SDARGRPOTrainer, tmp_path / "sdar", steps)
    peer, peer_grads, peer_losses, peer_completions = _train(trl.GRPOTrainer, tmp_path / "trl", steps)
    assert ours.fused_loss_calls == 4 and ours.fallback_loss_calls == 0
    assert abs(our_losses[0] - peer_losses[0]) <= 1e-5 * abs(peer_losses[0]) + 1e-12
    assert max(_rel(our_grads[0][n], peer_grads[0][n]) for n in peer_grads[0]) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(our_completions, peer_completions))


def test_unsupported_option_warns_once_and_trains_with_trl_loss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdar_kernels.integrations.trl"):
        tr = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path,
                          args=dict(max_steps=2, loss_type="cispo", epsilon_high=5.0))
        tr.train()
    warned = [r for r in caplog.records if "loss_type='cispo'" in r.getMessage()]
    assert len(warned) == 1
    assert tr.fused_loss_calls == 0 and tr.fallback_loss_calls == 2


def test_sdar_mode_trains_with_teacher_logprobs(tmp_path):
    tr = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path, train_dataset=prompt_dataset(teacher=True),
                      teacher_prompt_column="teacher_prompt", args=dict(max_steps=2))
    assert tr.base_loss_config.teacher_use == "sdar" and tr.base_loss_config.sd_coef > 0
    tr.train()
    assert tr.fused_loss_calls == 2
    logged = [h for h in tr.state.log_history if "sdar/gate_mean" in h]
    assert len(logged) == 2
    assert all(0 < h["sdar/gate_mean"] < 1 and h["sdar/gap_mean"] != 0 for h in logged)


def test_teacher_logprobs_equal_a_materialized_pass(tmp_path):
    """The teacher pass scores the completion after the teacher prompt with the current model."""
    tr = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path, train_dataset=prompt_dataset(teacher=True),
                      teacher_prompt_column="teacher_prompt")
    teacher_prompts = ["w91 w90 w1 w2", "w5"]
    completion_ids = torch.tensor([[7, 8, 9, 1], [10, 11, 0, 0]])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = tr.teacher_logprobs(teacher_prompts, completion_ids, completion_mask)
    tok = tokenizer()
    for i, prompt in enumerate(teacher_prompts):
        ids = torch.tensor([tok(prompt)["input_ids"] + completion_ids[i, : int(completion_mask[i].sum())].tolist()])
        with torch.no_grad():
            logits = tr.model(input_ids=ids).logits[0, :-1] / tr.temperature
        n = int(completion_mask[i].sum())
        want = torch.log_softmax(logits, -1)[-n:].gather(-1, ids[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(got[i, :n], want, rtol=1e-10, atol=1e-10)
        assert torch.all(got[i, n:] == 0)


def test_sdar_mode_refuses_an_option_that_forces_trls_loss(tmp_path):
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path, train_dataset=prompt_dataset(teacher=True),
                     teacher_prompt_column="teacher_prompt", args=dict(top_entropy_quantile=0.5))


def test_evaluate_matches_trl(tmp_path):
    """Eval mode (no gradient-accumulation factors, no_grad) through the fused path equals TRL's."""
    results = {}
    for cls in (SDARGRPOTrainer, trl.GRPOTrainer):  # each built (set_seed) right before it samples
        tr = make_trainer(cls, tiny_llama(seed=0), tmp_path / cls.__name__,
                          args=dict(per_device_eval_batch_size=4, entropy_coef=0.01, loss_type="grpo"))
        results[cls] = tr, tr.evaluate(prompt_dataset(4))
    (got, ours), (_, peer) = results[SDARGRPOTrainer], results[trl.GRPOTrainer]
    assert got.fused_loss_calls > 0 and got.fallback_loss_calls == 0
    assert ours["eval_reward"] == peer["eval_reward"]  # the same completions
    for key in ("eval_loss", "eval_entropy"):
        assert ours[key] == pytest.approx(peer[key], rel=1e-5)
