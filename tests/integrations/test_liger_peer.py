"""Liger-Kernel's own LigerFusedLinearGRPOLoss (liger-kernel 0.8.5, compiled=False on the CPU) against
fused_linear_sdar_loss on the same inputs: loss, dL/dh, dL/dW and dL/db.

Liger's loss types follow TRL's, so the mapping is the peer-named presets (sdar_kernels/config.py):

    Liger                                   sdar_kernels
    loss_type="grpo"                        preset "trl_grpo", normalizer = B (masked rows count)
    loss_type="bnpo"                        preset "trl_bnpo" (token mean of the call)
    loss_type="dr_grpo", max_completion_length=L
                                            preset "trl_dr_grpo", loss_scale_factor = B * L
    loss_type="dapo", num_items_in_batch=M  preset "trl_dapo", normalizer = M (default: loss tokens)
    epsilon_low / epsilon_high              clip_low / clip_high
    delta                                   clip_ratio_max
    beta (k3 to ref_per_token_logps)        kl_coef, kl_type "k3_unclamped" (the presets' default)
    use_bias_correction_kl                  kl_ratio_weighted (Liger's default False; TRL's and
                                            the trl_* presets' True)
    importance_sampling_level="sequence"    ratio_level="sequence"
    vllm_is_ratio [B, T] or [B, 1]          importance_weights
    temperature                             temperature
    old_per_token_logps=None (on-policy)    old_logprobs=None
    bias                                    bias

Liger 0.8.5 options with no LossConfig equivalent (not tested here): loss_type "cispo", "sapo",
"vespo", "luspo".
The Liger-as-benchmark-backend checks (its dual-clip mapping, the case builders) stay in
tests/benchmarks/test_liger_grpo.py.

Liger computes log-probabilities in float32 whatever the input dtype (its logits are cast to
float32); ours run in float64 here, so the differences are Liger's float32 rounding: on seed 404,
dr_grpo with KL, temperature and bias, ours equals a float64 evaluation of Liger's formula to 9e-16
while Liger is 2.0e-6 off it in dL/dh, dL/dW, dL/db. 1e-6 is below that floor, so the gradients are
held to GRAD_TOL (||ours - Liger|| / ||Liger||). A loss near 0 (policy terms of both signs
cancelling) has a larger relative rounding error (up to 1.3e-5 at loss = -1.5e-3), so the loss
error is divided by its scale, max(|loss|, mean |A|) (one token's policy term), and held to
LOSS_TOL. Measured over seeds 101, 202, ..., 1010 and every case below: gradients <= 3.1e-6 and
loss <= 2.4e-6 with KL + temperature 0.7 + bias, <= 1.3e-6 and <= 2.6e-7 in every other case.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

pytest.importorskip("liger_kernel.chunked_loss")

from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: E402

from sdar_kernels import LossConfig, fused_linear_sdar_loss  # noqa: E402

SEEDS = [101, 202]
B, T, H, V = 4, 9, 31, 123  # odd shapes; row 1 fully masked
MAX_LEN = 12  # dr_grpo's max_completion_length (> T: the padded length is not the constant)
GRAD_TOL = 5e-6  # Liger's float32 floor (see above); 1e-6 is below it
LOSS_TOL = 5e-6
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
OPTIONS = {  # Liger keyword arguments (module and call) besides loss_type
    "plain": {},
    "kl_temp_bias": {"beta": 0.04, "temperature": 0.7, "bias": True},
    "asym_clip_delta": {"epsilon_low": 0.1, "epsilon_high": 0.28, "delta": 1.6},
    "sequence_level": {"importance_sampling_level": "sequence", "beta": 0.02},
    "vllm_is_ratio": {"vllm_is_ratio": "token"},
    "vllm_is_ratio_per_row": {"vllm_is_ratio": "row", "bias": True},
    "on_policy": {"on_policy": True, "beta": 0.04},
    "bias_corrected_kl": {"use_bias_correction_kl": True, "beta": 0.04, "delta": 1.6},
    "bias_corrected_kl_sequence": {"use_bias_correction_kl": True, "beta": 0.04,
                                   "importance_sampling_level": "sequence"},
    "num_items": {"num_items_in_batch": 57.0},  # dapo's global token count (others ignore it)
}


def _problem(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    hidden = torch.randn(B, T, H, generator=g, dtype=dt)
    weight = torch.randn(V, H, generator=g, dtype=dt) * 0.5
    bias = torch.randn(V, generator=g, dtype=dt) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dt)
    mask[1] = 0
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
                adv=torch.randn(B, generator=g, dtype=dt),
                old=logp + 0.7 * torch.randn(B, T, generator=g, dtype=dt),  # every clip branch fires
                ref=logp + 0.5 * torch.randn(B, T, generator=g, dtype=dt),
                is_token=0.5 + torch.rand(B, T, generator=g, dtype=dt),
                is_row=0.5 + torch.rand(B, 1, generator=g, dtype=dt))


def _liger(p: dict, loss_type: str, opts: dict) -> list[torch.Tensor]:
    h = p["hidden"].clone().requires_grad_()
    w = p["weight"].clone().requires_grad_()
    b = p["bias"].clone().requires_grad_() if opts.get("bias") else None
    beta = opts.get("beta", 0.0)
    fn = LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0, loss_type=loss_type,
                                  max_completion_length=MAX_LEN, temperature=opts.get("temperature", 1.0),
                                  importance_sampling_level=opts.get("importance_sampling_level", "token"),
                                  epsilon_low=opts.get("epsilon_low", 0.2), epsilon_high=opts.get("epsilon_high", 0.2),
                                  use_bias_correction_kl=opts.get("use_bias_correction_kl", False),
                                  delta=opts.get("delta"))
    is_ratio = {"token": p["is_token"], "row": p["is_row"], None: None}[opts.get("vllm_is_ratio")]
    loss, _ = fn(h, w, p["targets"], p["mask"], p["adv"], bias=b,
                 ref_per_token_logps=p["ref"] if beta else None,
                 old_per_token_logps=None if opts.get("on_policy") else p["old"],
                 vllm_is_ratio=is_ratio, num_items_in_batch=opts.get("num_items_in_batch"))
    loss.backward()
    return [loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])


def liger_equivalent(loss_type: str, opts: dict) -> tuple[LossConfig, Optional[float]]:
    """(LossConfig, normalizer) equal to Liger's ``loss_type`` with ``opts`` on [B, T] inputs."""
    overrides = dict(backend="torch", temperature=opts.get("temperature", 1.0),
                     clip_low=opts.get("epsilon_low", 0.2), clip_high=opts.get("epsilon_high", 0.2),
                     clip_ratio_max=opts.get("delta"), kl_coef=opts.get("beta", 0.0),
                     ratio_level=opts.get("importance_sampling_level", "token"),
                     kl_ratio_weighted=opts.get("use_bias_correction_kl", False))
    normalizer = None
    if loss_type == "grpo":
        normalizer = float(B)
    elif loss_type == "dr_grpo":
        overrides["loss_scale_factor"] = float(B * MAX_LEN)
    elif loss_type == "dapo":
        normalizer = opts.get("num_items_in_batch")
    return LossConfig.preset(f"trl_{loss_type}", **overrides), normalizer


def _ours(p: dict, loss_type: str, opts: dict) -> list[torch.Tensor]:
    h = p["hidden"].clone().requires_grad_()
    w = p["weight"].clone().requires_grad_()
    b = p["bias"].clone().requires_grad_() if opts.get("bias") else None
    cfg, normalizer = liger_equivalent(loss_type, opts)
    is_ratio = {"token": p["is_token"], "row": p["is_row"], None: None}[opts.get("vllm_is_ratio")]
    out = fused_linear_sdar_loss(h, w, p["targets"], p["adv"], None if opts.get("on_policy") else p["old"], p["mask"],
                                 ref_logprobs=p["ref"] if cfg.kl_coef else None, bias=b, normalizer=normalizer,
                                 config=cfg, importance_weights=is_ratio)
    out.loss.backward()
    return [out.loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_liger_grpo_loss_equals_ours(loss_type, option, seed):
    p = _problem(seed)
    theirs, ours = _liger(p, loss_type, OPTIONS[option]), _ours(p, loss_type, OPTIONS[option])
    names = ("dL/dh", "dL/dW", "dL/db")[:len(theirs) - 1]
    assert len(ours) == len(theirs)
    errors = {n: _rel(a, b) for n, a, b in zip(names, ours[1:], theirs[1:])}
    scale = max(float(theirs[0].abs()), float(p["adv"].abs().mean()))
    errors["loss"] = float((ours[0] - theirs[0]).abs()) / scale
    assert errors["loss"] <= LOSS_TOL and max(errors[n] for n in names) <= GRAD_TOL, errors
    assert all(float(t.abs().max()) > 0 for t in theirs[1:])  # a gradient that is all zeros proves nothing


def test_the_options_change_the_loss():
    """Each option moves Liger's loss or gradient by far more than TOL (so the matches above are
    not a default config matching itself), and the fully masked row gets no gradient."""
    p = _problem(SEEDS[0])
    base = _liger(p, "bnpo", {})
    for option in ("asym_clip_delta", "sequence_level", "vllm_is_ratio", "on_policy", "kl_temp_bias"):
        moved = _liger(p, "bnpo", OPTIONS[option])
        assert max(_rel(moved[i], base[i]) for i in range(3)) > 1e-3, option
    uncorrected = _liger(p, "bnpo", {"beta": 0.04, "delta": 1.6})  # the same KL without the ratio
    corrected = _liger(p, "bnpo", OPTIONS["bias_corrected_kl"])
    assert max(_rel(corrected[i], uncorrected[i]) for i in range(3)) > 1e-4
    types = {t: _liger(p, t, {}) for t in ("grpo", "bnpo", "dr_grpo")}  # dapo = bnpo on one process
    types["dapo"] = _liger(p, "dapo", OPTIONS["num_items"])
    assert min(_rel(types[a][0], types[b][0]) for a in LOSS_TYPES for b in LOSS_TYPES if a < b) > 1e-3
    assert float(_ours(p, "grpo", {})[1][1].abs().max()) == 0.0


def test_the_mapping_is_needed():
    """Without the per-loss-type normalizer the losses differ: Liger grpo divides by B including
    the fully masked row, ours by default would count only rows with loss tokens."""
    p = _problem(SEEDS[1])
    cfg, _ = liger_equivalent("grpo", {})
    h = p["hidden"].clone().requires_grad_()
    out = fused_linear_sdar_loss(h, p["weight"], p["targets"], p["adv"], p["old"], p["mask"], config=cfg)
    assert _rel(out.loss.detach(), _liger(p, "grpo", {})[0]) > 0.1
