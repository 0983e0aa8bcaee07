"""SDARGRPOTrainer._compute_loss against TRL's own GRPOTrainer._compute_loss (trl 1.16.0).

The SAME prepared inputs go through the real TRL method on a GRPOTrainer and through the adapter
on an SDARGRPOTrainer holding an identical copy of a tiny random float64 Llama; the loss and every
parameter gradient must agree to 1e-6 relative. TRL's log-prob pass is swapped for a float64 one
on the peer instance (its fused head computes in fp32: trl_fixtures.use_float64_logprobs);
test_trl_fused_head_agrees keeps TRL's fp32 head at 1e-5. Cases: each fused loss type x importance-sampling
level x on-policy / given old log-probs, each crossed with a strength-2 covering array of
(beta, entropy_coef, delta, vLLM importance-sampling ratio), gradient accumulation 1 or 3.
"""
from __future__ import annotations

import itertools
import logging

import pytest
import torch

trl = pytest.importorskip("trl")

from sdar_kernels import LossConfig  # noqa: E402
from sdar_kernels.integrations.trl import SDARGRPOTrainer  # noqa: E402

from .trl_fixtures import loss_inputs, make_trainer, tiny_llama, use_float64_logprobs  # noqa: E402

# every pair of settings of (beta, entropy, delta, is_ratio) appears in some row
import os
BACKEND = os.environ.get("H5_BACKEND", "auto")
FLAGS = [(0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]
CASES = [(lt, lvl, old, flags, ga)
         for (lt, lvl, old), (k, flags) in itertools.product(
             itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), (False, True)),
             enumerate(FLAGS))
         for ga in [(1, 3)[k % 2]]]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    model = tiny_llama(seed=0)
    peer = make_trainer(trl.GRPOTrainer, model, tmp_path_factory.mktemp("trl"))
    ours = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path_factory.mktemp("sdar"),
                        loss_config=LossConfig(teacher_use="none", sd_coef=0.0, backend=BACKEND))
    use_float64_logprobs(peer)
    for tr in (peer, ours):
        tr.model.train()
    return peer, ours


def _configure(tr, loss_type, level, flags, ga, bias_kl=False):
    beta, entropy, delta, is_ratio = flags
    tr.loss_type, tr.importance_sampling_level = loss_type, level
    tr.beta = 0.04 if beta else 0.0
    tr.args.use_bias_correction_kl = bias_kl  # TRL's default True: KL x ratio (test_bias_corrected_kl_matches_trl)
    tr.entropy_coef = 0.05 if entropy else 0.0
    tr._entropy_bonus_enabled = bool(entropy)
    tr.args.delta = 1.4 if delta else None
    tr.use_vllm = tr.vllm_importance_sampling_correction = bool(is_ratio)
    tr.current_gradient_accumulation_steps = ga


def _loss_and_grads(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    loss = fn(tr.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("loss_type,level,old,flags,ga", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'old' if c[2] else 'onpolicy'}-f{''.join(map(str, c[3]))}-ga{c[4]}"
                              for c in CASES])
def test_fused_loss_matches_trl(trainers, loss_type, level, old, flags, ga):
    peer, ours = trainers
    for tr in trainers:
        _configure(tr, loss_type, level, flags, ga)
    seed = 1000 + CASES.index((loss_type, level, old, flags, ga))
    inputs = loss_inputs(peer, seed, old=old, ref=bool(flags[0]), is_ratio=bool(flags[3]), tool_mask=old)
    assert ours.fallback_reasons(inputs) == []
    want_loss, want = _loss_and_grads(peer, lambda m, x: trl.GRPOTrainer._compute_loss(peer, m, x), inputs)
    calls = ours.fused_loss_calls
    got_loss, got = _loss_and_grads(ours, ours._compute_loss, inputs)
    assert ours.fused_loss_calls == calls + 1
    assert _rel(got_loss, want_loss) < 1e-6, (got_loss.item(), want_loss.item())
    assert want.keys() == got.keys() and len(want) == len(list(peer.model.parameters()))
    errors = {n: _rel(got[n], want[n]) for n in want}
    assert max(errors.values()) < 1e-6, {n: e for n, e in errors.items() if e >= 1e-6}
    # TRL's metrics are logged by the fused path too, with TRL's values
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "clip_ratio/low_min", "clip_ratio/high_max") + (("kl",) if flags[0] else ()) + (
                    ("policy_loss",) if flags[1] else ()):
        assert ours._metrics["train"][name][-1] == pytest.approx(peer._metrics["train"][name][-1], rel=1e-6, abs=1e-12)


def test_inputs_exercise_the_clip(trainers):
    """The noise on old log-probs makes both clip sides fire (else the clip would go untested)."""
    peer, _ = trainers
    _configure(peer, "bnpo", "token", (0, 0, 0, 0), 1)
    trl.GRPOTrainer._compute_loss(peer, peer.model, loss_inputs(peer, 7, old=True, ref=False))
    assert peer._metrics["train"]["clip_ratio/low_mean"][-1] > 0
    assert peer._metrics["train"]["clip_ratio/high_mean"][-1] > 0


@pytest.mark.parametrize("option,value,needle", [
    ("loss_type", "cispo", "loss_type='cispo'"),
    ("top_entropy_quantile", 0.5, "top_entropy_quantile=0.5"),
    ("off_policy_mask_threshold", 0.3, "off_policy_mask_threshold=0.3"),
])
def test_unsupported_option_falls_back_with_one_warning(trainers, caplog, option, value, needle):
    peer, ours = trainers
    _configure(ours, "grpo", "token", (0, 0, 0, 0), 1)
    _configure(peer, "grpo", "token", (0, 0, 0, 0), 1)
    for tr in trainers:
        tr.beta = 0.04
        setattr(tr, option, value)
    try:
        inputs = loss_inputs(peer, 3, old=True, ref=True)
        fused, fallback = ours.fused_loss_calls, ours.fallback_loss_calls
        with caplog.at_level(logging.WARNING, logger="sdar_kernels.integrations.trl"):
            got = [ours._compute_loss(ours.model, inputs) for _ in range(2)]
        warned = [r for r in caplog.records if needle in r.getMessage()]
        assert len(warned) == 1 and "TRL's own" in warned[0].getMessage()
        assert ours.fused_loss_calls == fused and ours.fallback_loss_calls == fallback + 2
        want = trl.GRPOTrainer._compute_loss(peer, peer.model, inputs)
        assert _rel(got[0].detach(), want.detach()) < 1e-5  # TRL's fp32 head (ours) vs the fp64 swap (peer)
    finally:
        for tr in trainers:
            setattr(tr, option, {"loss_type": "grpo", "top_entropy_quantile": 1.0,
                                 "off_policy_mask_threshold": None}[option])


# (loss_type, level, old log-probs given, (beta, entropy, delta, is_ratio), grad. accum.): both levels, with
# and without delta (the KL weight is coef_1 before TRL caps it) and the vLLM IS ratio (policy term only)
BIAS_KL_CASES = [("dapo", "token", True, (1, 0, 1, 0), 1), ("bnpo", "token", False, (1, 1, 0, 1), 3),
                 ("grpo", "token", True, (1, 1, 0, 1), 1), ("grpo", "sequence", True, (1, 0, 1, 1), 3),
                 ("dr_grpo", "sequence", False, (1, 1, 1, 0), 1), ("dapo", "sequence", True, (1, 1, 0, 0), 1)]


@pytest.mark.parametrize("loss_type,level,old,flags,ga", BIAS_KL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'old' if c[2] else 'onpolicy'}-f{''.join(map(str, c[3]))}"
                              for c in BIAS_KL_CASES])
def test_bias_corrected_kl_matches_trl(trainers, loss_type, level, old, flags, ga):
    """use_bias_correction_kl=True (TRL 1.16's default) with beta > 0 runs the fused loss
    (LossConfig.kl_ratio_weighted), not TRL's: loss, every gradient and the logged kl to 1e-6."""
    peer, ours = trainers
    for tr in trainers:
        _configure(tr, loss_type, level, flags, ga, bias_kl=True)
    try:
        inputs = loss_inputs(peer, 2000 + BIAS_KL_CASES.index((loss_type, level, old, flags, ga)), old=old,
                             ref=True, is_ratio=bool(flags[3]), tool_mask=old)
        assert ours.fallback_reasons(inputs) == [] and ours.trl_loss_config().kl_ratio_weighted
        want_loss, want = _loss_and_grads(peer, lambda m, x: trl.GRPOTrainer._compute_loss(peer, m, x), inputs)
        fused, fallback = ours.fused_loss_calls, ours.fallback_loss_calls
        got_loss, got = _loss_and_grads(ours, ours._compute_loss, inputs)
        assert ours.fused_loss_calls == fused + 1 and ours.fallback_loss_calls == fallback
        assert _rel(got_loss, want_loss) < 1e-6, (got_loss.item(), want_loss.item())
        assert want.keys() == got.keys() and len(want) == len(list(peer.model.parameters()))
        errors = {n: _rel(got[n], want[n]) for n in want}
        assert max(errors.values()) < 1e-6, {n: e for n, e in errors.items() if e >= 1e-6}
        assert ours._metrics["train"]["kl"][-1] == pytest.approx(peer._metrics["train"]["kl"][-1], rel=1e-6)
    finally:
        for tr in trainers:
            tr.args.use_bias_correction_kl = False


def test_owned_fields_come_from_grpo_config_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdar_kernels.integrations.trl"):
        tr = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path,
                          loss_config=LossConfig(teacher_use="none", sd_coef=0.0, clip_low=0.1, token_chunk=7))
    cfg = tr.trl_loss_config()
    assert cfg.clip_low == tr.args.epsilon and cfg.dual_clip is None and cfg.token_chunk == 7
    assert [r for r in caplog.records if "clip_low=0.1 -> 0.2 (epsilon)" in r.getMessage()]


def test_teacher_config_without_teacher_column_raises(tmp_path):
    with pytest.raises(ValueError, match="teacher_prompt_column"):
        make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path, loss_config=LossConfig.preset("sdar"))


def test_trl_fused_head_agrees(tmp_path):
    """TRL's own fp32 fused lm_head (not swapped) against the adapter: equal to fp32 rounding."""
    peer = make_trainer(trl.GRPOTrainer, tiny_llama(seed=0), tmp_path / "a")
    ours = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0), tmp_path / "b")
    for tr in (peer, ours):
        tr.model.train()
        _configure(tr, "grpo", "token", (0, 0, 0, 0), 2)
    inputs = loss_inputs(peer, 11, old=True, ref=False)
    want_loss, want = _loss_and_grads(peer, lambda m, x: trl.GRPOTrainer._compute_loss(peer, m, x), inputs)
    got_loss, got = _loss_and_grads(ours, ours._compute_loss, inputs)
    assert _rel(got_loss, want_loss) < 1e-5
    assert max(_rel(got[n], want[n]) for n in want) < 1e-5


def _fp64_reference(tmp_path, loss_type, flags, inputs_seed):
    peer = make_trainer(trl.GRPOTrainer, tiny_llama(seed=0), tmp_path / "fp64")
    use_float64_logprobs(peer)
    peer.model.train()
    _configure(peer, loss_type, "token", flags, 1)
    inputs = loss_inputs(peer, inputs_seed, old=True, ref=bool(flags[0]), is_ratio=bool(flags[3]))
    loss, grads = _loss_and_grads(peer, lambda m, x: trl.GRPOTrainer._compute_loss(peer, m, x), inputs)
    return inputs, loss, grads


def test_bf16_autocast_stays_near_float64(tmp_path):
    """Mixed precision (bf16 autocast, fp32 weights) goes through the fused path and stays within bf16
    error of the float64 loss (measured: loss 1.4e-3, gradients 7.5e-3 relative; TRL's own bf16 path
    3.5e-3 and 8.5e-3 on the same inputs)."""
    inputs, want_loss, want = _fp64_reference(tmp_path, "grpo", (0, 1, 0, 0), 5)
    ours = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0, dtype=torch.float32), tmp_path / "bf16",
                        args=dict(bf16=True))
    ours.model.train()
    _configure(ours, "grpo", "token", (0, 1, 0, 0), 1)
    assert ours.accelerator.mixed_precision == "bf16"
    x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    with ours.compute_loss_context_manager():
        got_loss, got = _loss_and_grads(ours, ours._compute_loss, x32)
    assert ours.fused_loss_calls == 1
    assert _rel(got_loss.double(), want_loss) < 1e-2
    assert max(_rel(got[n].double(), want[n]) for n in want) < 2e-2


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="the Triton backend runs on CUDA or under TRITON_INTERPRET=1")
def test_triton_backend_matches_trl(tmp_path):
    """The adapter on the Triton backend (fp32 model; CPU under TRITON_INTERPRET=1) against TRL in fp64."""
    pytest.importorskip("triton")
    inputs, want_loss, want = _fp64_reference(tmp_path, "dapo", (1, 1, 1, 1), 9)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = make_trainer(SDARGRPOTrainer, tiny_llama(seed=0, dtype=torch.float32).to(device), tmp_path / "tr",
                        loss_config=LossConfig(teacher_use="none", sd_coef=0.0, backend="triton"),
                        args=dict(use_cpu=device == "cpu"))
    ours.model.train()
    _configure(ours, "dapo", "token", (1, 1, 1, 1), 1)
    x = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    x = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
    got_loss, got = _loss_and_grads(ours, ours._compute_loss, x)
    assert ours.fused_loss_calls == 1
    assert _rel(got_loss.double().cpu(), want_loss) < 1e-4
    assert max(_rel(got[n].double().cpu(), want[n]) for n in want) < 1e-4


def test_bf16_model_with_fp32_lm_head_matches_trl(tmp_path):
    """cast_lm_head_to_fp32 on a bf16 model: both paths run the head in fp32 on the same bf16 trunk."""
    inputs, _, _ = _fp64_reference(tmp_path, "grpo", (0, 1, 0, 0), 5)
    x = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    results = []
    for cls in (trl.GRPOTrainer, SDARGRPOTrainer):
        tr = make_trainer(cls, tiny_llama(seed=0, dtype=torch.bfloat16), tmp_path / cls.__name__,
                          args=dict(cast_lm_head_to_fp32=True))
        tr.model.train()
        _configure(tr, "grpo", "token", (0, 1, 0, 0), 1)
        fn = tr._compute_loss if cls is SDARGRPOTrainer else (lambda m, x, tr=tr: trl.GRPOTrainer._compute_loss(tr, m, x))
        with tr.compute_loss_context_manager():
            results.append(_loss_and_grads(tr, fn, x))
    (want_loss, want), (got_loss, got) = results
    assert tr.fused_loss_calls == 1 and tr.model.lm_head.weight.dtype == torch.float32
    assert _rel(got_loss.double(), want_loss.double()) < 1e-5  # measured 8.3e-8
    assert max(_rel(got[n].double(), want[n].double()) for n in want) < 1e-5  # measured 2.3e-7
