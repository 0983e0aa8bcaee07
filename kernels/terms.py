"""The O(N) epilogue shared by the fused backends: per-token SDAR terms, aggregation, metrics.

Inputs are per-token tensors [N]; ``logp`` (and ``entropy``, ``div`` when used) carry autograd
history back into the fused statistics op, everything else is treated as data (detached).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import LossConfig


def ppo_clip(logp: Tensor, old: Tensor, adv: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip (with dual clip) per token; returns (loss, ratio, clipped indicator)."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(logp.dtype)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
    return loss, ratio, clipped


def kl_penalty(logp: Tensor, ref: Tensor, kind: str) -> Tensor:
    """k1 / k2 / k3 estimators of KL(pi || ref) per token (k3 clamped as in verl)."""
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    delta = torch.clamp(ref - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(delta) - delta - 1.0, -10.0, 10.0)


def gate_values(gap: Tensor, entropy: Optional[Tensor], cfg: LossConfig) -> Tensor:
    """The detached SDAR gate g_i for gap = t - s (detached)."""
    if cfg.gate == "none":
        return torch.ones_like(gap)
    if cfg.gate == "gap":
        x = gap
    elif cfg.gate == "entropy":
        x = entropy.detach()
    else:  # soft_or
        x = 1.0 - (1.0 - entropy.detach()) * (1.0 - gap)
    return torch.sigmoid(cfg.gate_beta * x)


def rlsd_advantage(adv: Tensor, gap: Tensor, cfg: LossConfig) -> Tensor:
    """RLSD: A [(1 - w) + w clip(exp(sign(A) gap), 1 - eps, 1 + eps)], gap detached."""
    w, eps = cfg.rlsd_weight, cfg.rlsd_clip
    scale = torch.clamp(torch.exp(torch.clamp(torch.sign(adv) * gap, max=20.0)), 1.0 - eps, 1.0 + eps)
    return adv * ((1.0 - w) + w * scale)


def skill_sd_term(logp: Tensor, old: Tensor, teacher: Tensor) -> Tensor:
    """Skill-SD: w (exp(-u) - 1 + u), u = s - t, w = sg(exp(min(s - o, 10))), -u clamped at 20."""
    u = logp - teacher
    w = torch.exp(torch.clamp(logp - old, max=10.0)).detach()
    return w * (torch.exp(torch.clamp(-u, max=20.0)) - 1.0 + u)


class Aggregator:
    """Agg(x) over masked tokens for the four verl modes; see SDAR_MATH.md.

    ``normalizer`` is the *global* count the sum is divided by: tokens for token-mean, sequences
    for the seq-mean modes, a constant for seq-mean-token-sum-norm (``loss_scale_factor`` wins
    there). With it, micro-batches (and ranks) summed reproduce the gradient of one big batch.
    Segment ids label sequences as contiguous runs (a packed stream); any integer labels work.
    Sequences must not straddle micro-batches.
    """

    def __init__(self, mask: Tensor, segment_ids: Optional[Tensor], normalizer, cfg: LossConfig):
        self.mode, self.mask = cfg.agg, mask
        n = mask.shape[0]
        if self.mode == "token-mean":
            z = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=mask.dtype, device=mask.device)
            self.denominator = torch.where(z > 0, z, torch.ones_like(z))
            return
        self.seg = seg = _run_ids(segment_ids, n, mask.device)
        self.count = mask.new_zeros(n).index_add_(0, seg, mask)  # tokens per sequence
        if self.mode == "seq-mean-token-sum-norm":
            if cfg.loss_scale_factor is not None:
                z = torch.tensor(cfg.loss_scale_factor, dtype=mask.dtype, device=mask.device)
            elif normalizer is not None:
                z = torch.as_tensor(normalizer, dtype=mask.dtype, device=mask.device)
            else:
                z = self.count.max() if n else mask.new_zeros(())
        else:
            z = (self.count > 0).sum().to(mask.dtype) if normalizer is None else torch.as_tensor(
                normalizer, dtype=mask.dtype, device=mask.device)
        self.denominator = torch.where(z > 0, z, torch.ones_like(z))

    def __call__(self, x: Tensor) -> Tensor:
        mx = self.mask * x
        if self.mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            return mx.sum() / self.denominator
        per_seq = mx.new_zeros(mx.shape[0]).index_add_(0, self.seg, mx)
        count = self.count.to(mx.dtype)
        return (per_seq / torch.where(count > 0, count, torch.ones_like(count))).sum() / self.denominator


def _run_ids(segment_ids: Optional[Tensor], n: int, device) -> Tensor:
    """Relabel contiguous runs of equal segment ids as 0, 1, 2, ... (no host sync)."""
    if segment_ids is None or n == 0:
        return torch.zeros(n, dtype=torch.long, device=device)
    seg = segment_ids.long()
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    return torch.cumsum(starts.long(), 0) - 1


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask (0 when the mask is empty); a 0-d tensor, no host sync."""
    total = mask.sum()
    return (mask * x).sum() / torch.where(total > 0, total, torch.ones_like(total))
