"""The chunked PyTorch backend against the materialized float64 oracle, for every config option."""
from __future__ import annotations

import pytest
import torch

from sdar_kernels import LossConfig, fused_linear_logprobs
from sdar_kernels.reference import reference_stats
from sdar_kernels.stats import StatsSpec

from .problems import fresh_seed, make_problem, rel_err, run_loss

# One entry per option value of SDAR_MATH.md (each on top of the sdar preset).
OPTIONS = [
    dict(), dict(gate="entropy"), dict(gate="soft_or"), dict(gate="none"), dict(gate_beta=0.0),
    dict(divergence="reverse_kl"), dict(divergence="forward_kl"), dict(divergence="jsd", jsd_beta=0.3),
    dict(divergence="jsd", jsd_beta=0.0), dict(divergence="jsd", jsd_beta=1.0),
    dict(kl_type="k1"), dict(kl_type="k2"), dict(kl_coef=0.0), dict(entropy_coef=0.01),
    dict(dual_clip=None), dict(clip_low=0.1, clip_high=0.28), dict(policy_coef=0.0),
    dict(teacher_use="skill_sd", sd_coef=0.001), dict(teacher_use="rlsd", sd_coef=0.0),
    dict(teacher_use="none", sd_coef=0.0),
    dict(agg="seq-mean-token-mean"), dict(agg="seq-mean-token-sum"),
    dict(agg="seq-mean-token-sum-norm", loss_scale_factor=64.0),
    dict(temperature=0.5), dict(temperature=2.0), dict(sd_coef=1.0, divergence="reverse_kl", entropy_coef=0.1),
]
PRESETS = ["grpo", "sdar", "grpo_opsd", "opsd", "skill_sd", "rlsd"]


def _check_against_reference(cfg: LossConfig, dtype: torch.dtype, tol: float, n=77, h=31, v=123, scale=3.0,
             grad_in_forward: bool = True, **kw) -> None:
    seed = fresh_seed()
    # the oracle sees exactly the (rounded) values the kernel sees: the error is the kernel's alone
    p = make_problem(n, h, v, seed, scale=scale, temperature=cfg.temperature, **kw).rounded(dtype)
    ref_loss, ref_grads, _ = run_loss(p, cfg.replace(backend="reference", reference_dtype="float64"), torch.float64)
    fused = cfg.replace(backend="torch", token_chunk=16, vocab_chunk=32, grad_in_forward=grad_in_forward)
    loss, grads, _ = run_loss(p, fused, dtype)
    # The loss is a signed sum (advantages of both signs cancel), so its error is measured
    # against the size of its terms, sum_i w_i |A_i|, not against the possibly tiny total.
    m = p.mask
    scale = max(abs(ref_loss.item()), ((m * p.advantages.abs()).sum() / m.sum().clamp_min(1)).item())
    assert abs(loss.item() - ref_loss.item()) <= tol * scale, f"loss seed={seed} {loss} vs {ref_loss}"
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"non-finite d{name} seed={seed}"
        assert rel_err(g, rg) <= tol, f"d{name} rel err {rel_err(g, rg):.2e} > {tol} seed={seed}"


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "sdar")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["rows", "tiles"])
def test_every_option_matches_reference(opts, dtype, tol, grad_in_forward):
    _check_against_reference(LossConfig.preset("sdar", **opts), dtype, tol, grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_reference(name):
    _check_against_reference(LossConfig.preset(name), torch.float64, 1e-9)


def test_the_comparison_can_fail():
    """Guards the comparison itself: the oracle changes with an option, and the torch backend run
    with another option than the oracle's is far outside the tolerance the tests above use."""
    p = make_problem(40, 16, 50, fresh_seed(), scale=3.0)
    ref = lambda **o: run_loss(p, LossConfig.preset("sdar", backend="reference", **o), torch.float64)  # noqa: E731
    (ra, ga, _), (rb, gb, _) = ref(), ref(gate="none", entropy_coef=0.01)
    assert abs(ra.item() - rb.item()) > 1e-6 and rel_err(ga[0], gb[0]) > 1e-3
    loss, grads, _ = run_loss(p, LossConfig.preset("sdar", backend="torch", gate="none", entropy_coef=0.01),
                              torch.float64)
    assert rel_err(grads[0], ga[0]) > 1e3 * 1e-9 and rel_err(grads[0], gb[0]) <= 1e-9
    assert all(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_logprobs_match_reference(with_entropy, temperature):
    seed = fresh_seed()
    p = make_problem(53, 31, 1001, seed, scale=5.0)
    leaves = p.leaves(torch.float64)
    logp, ent = fused_linear_logprobs(leaves["hidden"], leaves["weight"], p.targets, temperature, with_entropy,
                                      bias=leaves["bias"], backend="torch", vocab_chunk=128, token_chunk=16)
    ref = reference_stats(leaves["hidden"], leaves["weight"], leaves["bias"], p.targets, None, None, None,
                          StatsSpec(temperature=temperature, with_entropy=True))
    assert rel_err(logp, ref.logp) <= 1e-10, f"seed={seed}"
    if with_entropy:
        assert rel_err(ent, ref.entropy) <= 1e-10, f"seed={seed}"
        obj_a, obj_r = (logp * 0.7 + ent * 0.3).sum(), (ref.logp * 0.7 + ref.entropy * 0.3).sum()
    else:
        assert ent is None
        obj_a, obj_r = logp.sum(), ref.logp.sum()
    ga = torch.autograd.grad(obj_a, [leaves["hidden"], leaves["weight"], leaves["bias"]])
    gr = torch.autograd.grad(obj_r, [leaves["hidden"], leaves["weight"], leaves["bias"]])
    for a, r in zip(ga, gr):
        assert rel_err(a, r) <= 1e-10, f"seed={seed}"


def test_per_token_upstream_gradient_reaches_weight():
    """Liger PR #1298: a per-token grad_output must weigh each token's dW contribution."""
    seed = fresh_seed()
    p = make_problem(30, 8, 40, seed)
    leaves = p.leaves(torch.float64)
    w_tok = torch.rand(30, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    logp, _ = fused_linear_logprobs(leaves["hidden"], leaves["weight"], p.targets, bias=leaves["bias"], backend="torch")
    (gw,) = torch.autograd.grad((w_tok * logp).sum(), [leaves["weight"]])
    ref = reference_stats(leaves["hidden"], leaves["weight"], leaves["bias"], p.targets, None, None, None, StatsSpec())
    (rw,) = torch.autograd.grad((w_tok * ref.logp).sum(), [leaves["weight"]])
    assert rel_err(gw, rw) <= 1e-10, f"seed={seed}"


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    p = make_problem(20, 8, 30, fresh_seed())
    h = p.hidden.clone().requires_grad_(True)
    logp, _ = fused_linear_logprobs(h, p.weight, p.targets, backend="torch")
    logp.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert p.weight.grad is None


def test_bf16_error_no_worse_than_plain_bf16_pytorch():
    """Cut Cross-Entropy's criterion: err(fused bf16) <= err(plain bf16 PyTorch) + 1e-2."""
    for opts in (dict(), dict(divergence="reverse_kl"), dict(divergence="jsd"), dict(entropy_coef=0.01)):
        seed = fresh_seed()
        p = make_problem(64, 64, 1001, seed, scale=4.0).rounded(torch.bfloat16)
        cfg = LossConfig.preset("sdar", **opts)
        truth, truth_g, _ = run_loss(p, cfg.replace(backend="reference", reference_dtype="float64"), torch.float64)
        plain, plain_g, _ = run_loss(p, cfg.replace(backend="reference", reference_dtype="input"), torch.bfloat16)
        fused, fused_g, _ = run_loss(p, cfg.replace(backend="torch", vocab_chunk=256), torch.bfloat16)
        assert rel_err(fused, truth) <= rel_err(plain, truth) + 1e-2, f"loss {opts} seed={seed}"
        for f, pl, t in zip(fused_g, plain_g, truth_g):
            assert f.dtype == torch.bfloat16
            assert rel_err(f, t) <= rel_err(pl, t) + 1e-2, f"grad {opts} seed={seed}"


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["rows", "tiles"])
def test_extreme_logits_with_bias_reverse_kl_stay_exact(grad_in_forward):
    """Regression (found by hypothesis): logits ~2e4 with a bias. Forming log p as z - (max + log S)
    rounds the large LSE and cost 1e-6 relative in every gradient; (z - max) - log S is exact."""
    cfg = LossConfig.preset("opsd", divergence="reverse_kl", kl_type="k1", dual_clip=None, temperature=0.5)
    p = make_problem(300, 64, 1001, 222, scale=1e4, n_seq=1, mask_frac=0.6, bias=True, temperature=0.5)
    _, ref_grads, _ = run_loss(p, cfg.replace(backend="reference"), torch.float64)
    _, grads, _ = run_loss(p, cfg.replace(backend="torch", vocab_chunk=512, grad_in_forward=grad_in_forward),
                           torch.float64)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-9
