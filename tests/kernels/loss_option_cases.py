"""[B, T] problems and option cases for the loss options the TRL / verl adapters need (issue #13).

Shared by test_loss_options.py (torch backend, semantics) and test_loss_options_triton.py.
The oracle side flattens [B, T] inputs by hand (rows are sequences, the seq-mean-token-sum-norm
constant is T) and calls the float64 reference directly, so the entry point's own flattening is
under test too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdar_kernels import LossConfig, fused_linear_sdar_loss
from sdar_kernels.reference import reference_sdar_loss, reference_stats
from sdar_kernels.stats import StatsSpec

F64 = torch.float64


@dataclass
class Batch:
    """One [B, T] problem: hidden [B, T, H], per-token inputs [B, T], advantages [B]."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor
    iw: torch.Tensor
    seed: int


def make_batch(seed: int, b: int = 4, t: int = 9, h: int = 31, v: int = 123) -> Batch:
    """Odd shapes; row 0 has prompt tokens, the last row is fully masked; old / ref far enough from
    the policy that both clip sides, the dual clip and the k3 clamp (r - s = 3.5 on two tokens) fire;
    importance weights in [0.5, 1.5] with ~15 % zeros (TRL's token_mask / verl's masked weights)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=F64) * 0.2
    targets = torch.randint(0, v, (b, t), generator=g)
    with torch.no_grad():
        s = reference_stats(hidden.reshape(b * t, h), weight, bias, targets.reshape(-1), None, None, None,
                            StatsSpec()).logp.reshape(b, t)
    noise = lambda scale: scale * torch.randn(b, t, generator=g, dtype=F64)  # noqa: E731
    ref = s + noise(0.4)
    ref[0, 1:3] = s[0, 1:3] + 3.5
    mask = (torch.rand(b, t, generator=g) < 0.8).to(F64)
    mask[0, 0] = 0.0
    mask[b - 1] = 0.0
    iw = 0.5 + torch.rand(b, t, generator=g, dtype=F64)
    iw[torch.rand(b, t, generator=g) < 0.15] = 0.0
    return Batch(hidden, weight, bias, targets, torch.randn(b, generator=g, dtype=F64), s + noise(0.4), ref,
                 s + noise(0.6), mask, iw, seed)


# name: (LossConfig.preset name, overrides, call options)
# call options: old=None (on-policy), iw="token" | "row", entropy_normalizer, normalizer
CASES = {
    "on_policy": ("sdar", {}, {"old": None}),
    "importance_weights": ("sdar", {}, {"iw": "token"}),
    "importance_weights_per_row": ("grpo", {}, {"iw": "row"}),
    "ratio_sequence": ("sdar", {"ratio_level": "sequence"}, {"iw": "token"}),
    "ratio_sequence_token": ("sdar", {"ratio_level": "sequence_token", "dual_clip": None}, {"iw": "token"}),
    "ratio_sequence_on_policy": ("grpo", {"ratio_level": "sequence"}, {"old": None}),
    "clip_ratio_max": ("grpo", {"clip_ratio_max": 1.3, "dual_clip": None}, {}),
    "clip_ratio_max_sequence": ("grpo", {"clip_ratio_max": 1.25, "ratio_level": "sequence"}, {"iw": "token"}),
    "entropy_agg": ("sdar", {"agg": "seq-mean-token-mean", "entropy_agg": "token-mean", "entropy_coef": 0.05}, {}),
    "entropy_normalizer": ("grpo", {"entropy_agg": "seq-mean-token-sum", "entropy_coef": 0.05},
                           {"entropy_normalizer": 5.0, "normalizer": 30.0}),
    "kl_k1_plus": ("grpo", {"kl_type": "k1+", "kl_coef": 0.1}, {}),
    "kl_k3_plus": ("grpo", {"kl_type": "k3+", "kl_coef": 0.1}, {}),
    "kl_k3_unclamped": ("grpo", {"kl_type": "k3_unclamped", "kl_coef": 0.1}, {}),
    # TRL's use_bias_correction_kl: KL x the un-capped ratio (the cap must not reach it), each ratio level
    "kl_ratio_weighted": ("trl_bnpo", {"kl_coef": 0.1, "kl_ratio_weighted": True, "clip_ratio_max": 1.3},
                          {"iw": "token"}),
    "kl_ratio_weighted_sequence": ("trl_grpo", {"kl_coef": 0.1, "kl_ratio_weighted": True,
                                                "ratio_level": "sequence", "clip_ratio_max": 1.3}, {"normalizer": 4.0}),
    "kl_ratio_weighted_sequence_token": ("verl_gspo", {"kl_coef": 0.1, "kl_ratio_weighted": True}, {"iw": "token"}),
    "kl_ratio_weighted_on_policy": ("trl_dapo", {"kl_coef": 0.1, "kl_ratio_weighted": True, "entropy_coef": 0.02},
                                    {"old": None}),
    "sum_norm_horizon": ("sdar", {"agg": "seq-mean-token-sum-norm", "entropy_coef": 0.01}, {"iw": "token"}),
    "trl_grpo": ("trl_grpo", {"kl_coef": 0.04, "entropy_coef": 0.02}, {"iw": "token", "normalizer": 4.0}),
    "trl_bnpo_sequence": ("trl_bnpo", {"ratio_level": "sequence", "clip_ratio_max": 1.5, "kl_coef": 0.04},
                          {"old": None}),
    "trl_dr_grpo": ("trl_dr_grpo", {"loss_scale_factor": 4 * 16.0, "entropy_coef": 0.02}, {"iw": "row"}),
    "trl_dapo": ("trl_dapo", {"clip_high": 0.28, "entropy_coef": 0.02}, {"normalizer": 21.0,
                                                                         "entropy_normalizer": 17.0}),
    "verl_grpo": ("verl_grpo", {"entropy_coef": 0.02, "kl_type": "k3+"}, {"iw": "token"}),
    "verl_gspo": ("verl_gspo", {"agg": "seq-mean-token-mean"}, {"iw": "token"}),
}


def config(name: str, **changes) -> LossConfig:
    preset, overrides, _ = CASES[name]
    return LossConfig.preset(preset, **{**overrides, **changes})


def _call_inputs(p: Batch, opts: dict) -> dict:
    old = p.old if opts.get("old", "given") is not None else None
    iw = {"token": p.iw, "row": p.iw[:, 1], None: None}[opts.get("iw")]
    return dict(old=old, iw=iw, normalizer=opts.get("normalizer"), entropy_normalizer=opts.get("entropy_normalizer"))


def fused_run(p: Batch, cfg: LossConfig, opts: dict, dtype=F64) -> tuple[torch.Tensor, list, object]:
    """The entry point on the [B, T] inputs: (loss, [dh, dW, db], output)."""
    x = _call_inputs(p, opts)
    h = p.hidden.to(dtype).requires_grad_(True)
    w = p.weight.to(dtype).requires_grad_(True)
    bias = p.bias.to(dtype).requires_grad_(True)
    out = fused_linear_sdar_loss(h, w, p.targets, p.advantages, x["old"], p.mask, teacher_logprobs=p.teacher,
                                 ref_logprobs=p.ref, normalizer=x["normalizer"], bias=bias, config=cfg,
                                 importance_weights=x["iw"], entropy_normalizer=x["entropy_normalizer"])
    grads = torch.autograd.grad(out.loss, [h, w, bias], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip((h, w, bias), grads)]
    return out.loss.detach(), grads, out


def oracle_run(p: Batch, cfg: LossConfig, opts: dict) -> tuple[torch.Tensor, list]:
    """The float64 reference on the same problem flattened by hand: rows are sequences, horizon T."""
    b, t, hdim = p.hidden.shape
    x = _call_inputs(p, opts)
    flat = lambda z: None if z is None else z.reshape(b * t)  # noqa: E731
    iw = x["iw"]
    if iw is not None and iw.dim() == 1:
        iw = iw[:, None].expand(b, t)
    h = p.hidden.reshape(b * t, hdim).clone().requires_grad_(True)
    w = p.weight.clone().requires_grad_(True)
    bias = p.bias.clone().requires_grad_(True)
    out = reference_sdar_loss(h, w, flat(p.targets), flat(p.advantages[:, None].expand(b, t)), flat(x["old"]),
                              flat(p.mask), teacher_logprobs=flat(p.teacher), ref_logprobs=flat(p.ref),
                              segment_ids=torch.arange(b).repeat_interleave(t), normalizer=x["normalizer"],
                              bias=bias, config=cfg.replace(backend="reference", reference_dtype="float64"),
                              importance_weights=flat(iw), entropy_normalizer=x["entropy_normalizer"], horizon=t)
    grads = torch.autograd.grad(out.loss, [h, w, bias], allow_unused=True)
    grads = [torch.zeros_like(z) if g is None else g for z, g in zip((h, w, bias), grads)]
    grads[0] = grads[0].reshape(b, t, hdim)
    return out.loss.detach(), grads


def loss_scale(p: Batch, ref_loss: torch.Tensor) -> float:
    """The loss is a signed sum: its error is judged against the size of its terms."""
    m = p.mask
    adv = (m * p.advantages[:, None].abs()).sum() / m.sum().clamp_min(1)
    return max(abs(ref_loss.item()), adv.item())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (denom if denom > 1e-12 else 1.0) if a.numel() else 0.0


def check_against_oracle(p: Batch, name: str, backend: str, grad_in_forward: bool, tol: float,
                         dtype=F64, **changes) -> Optional[object]:
    cfg = config(name, **changes)
    opts = CASES[name][2]
    ref_loss, ref_grads = oracle_run(p, cfg, opts)
    loss, grads, out = fused_run(p, cfg.replace(backend=backend, grad_in_forward=grad_in_forward, token_chunk=8,
                                                vocab_chunk=32), opts, dtype)
    tag = f"case={name} backend={backend} rows={grad_in_forward} seed={p.seed}"
    assert abs(loss.item() - ref_loss.item()) <= tol * loss_scale(p, ref_loss), f"loss {loss} vs {ref_loss} {tag}"
    for gname, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"d{gname} {tag}"
        assert rel_err(g, rg) <= tol, f"d{gname} rel err {rel_err(g, rg):.2e} > {tol} {tag}"
    assert grads[0].abs().max() > 0 and grads[1].abs().max() > 0, f"no gradient at all {tag}"
    assert tuple(out.logprobs.shape) == tuple(p.mask.shape) == tuple(out.entropy.shape), tag
    return out
