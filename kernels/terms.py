"""The O(N) epilogue shared by the fused backends: per-token SDAR terms, aggregation, metrics.

Inputs are per-token tensors [N]; ``logp`` (and ``entropy``, ``div`` when used) carry autograd
history back into the fused statistics op, everything else is treated as data (detached).
"""
from __future__ import annotations

from dataclasses import dataclass
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


def token_weights(mask: Tensor, segment_ids: Optional[Tensor], normalizer, cfg: LossConfig) -> Tensor:
    """Per-token weights w [N] with Agg(x) = sum_i w_i x_i for the four verl modes (SDAR_MATH.md).

    Every mode is linear in x with weights that do not depend on the logits, so the total loss is
    a sum of per-token terms. ``normalizer`` is the *global* count the sum is divided by: tokens
    for token-mean, sequences for the seq-mean modes, a constant for seq-mean-token-sum-norm
    (``loss_scale_factor`` wins there). With it, micro-batches (and ranks) summed reproduce the
    gradient of one big batch. Segment ids label sequences as contiguous runs (a packed stream);
    a sequence must not straddle micro-batches.
    """
    n = mask.shape[0]

    def positive(z: Tensor) -> Tensor:
        return torch.where(z > 0, z, torch.ones_like(z))

    given = None if normalizer is None else torch.as_tensor(normalizer, dtype=mask.dtype, device=mask.device)
    if cfg.agg == "token-mean":
        return mask / positive(mask.sum() if given is None else given)
    seg = _run_ids(segment_ids, n, mask.device)
    count = mask.new_zeros(n).index_add_(0, seg, mask)  # loss tokens per sequence
    if cfg.agg == "seq-mean-token-sum-norm":
        if cfg.loss_scale_factor is not None:
            z = torch.tensor(cfg.loss_scale_factor, dtype=mask.dtype, device=mask.device)
        else:
            z = given if given is not None else (count.max() if n else mask.new_zeros(()))
        return mask / positive(z)
    n_seq = positive((count > 0).sum().to(mask.dtype) if given is None else given)
    if cfg.agg == "seq-mean-token-sum":
        return mask / n_seq
    return mask / (positive(count)[seg] * n_seq)  # seq-mean-token-mean


@dataclass
class TokenTerms:
    """Per-token pieces of the loss ([N] each; None where the config does not use them)."""

    pg: Tensor
    ratio: Tensor
    clipped: Tensor
    kl: Optional[Tensor] = None
    gap: Optional[Tensor] = None
    gate: Optional[Tensor] = None
    div: Optional[Tensor] = None
    sd: Optional[Tensor] = None


def token_terms(logp: Tensor, entropy: Optional[Tensor], div: Optional[Tensor], advantages: Tensor,
                old: Tensor, teacher: Optional[Tensor], ref: Optional[Tensor], cfg: LossConfig) -> TokenTerms:
    """Every per-token term of SDAR_MATH.md from the statistics (logp, entropy, div carry grad)."""
    dt = logp.dtype
    adv, old = advantages.detach().to(dt), old.detach().to(dt)
    gap = (teacher.detach().to(dt) - logp.detach()) if teacher is not None else None
    if cfg.teacher_use == "rlsd" and gap is not None:
        adv = rlsd_advantage(adv, gap, cfg)
    pg, ratio, clipped = ppo_clip(logp, old, adv, cfg)
    out = TokenTerms(pg=pg, ratio=ratio, clipped=clipped, gap=gap)
    if ref is not None:
        out.kl = kl_penalty(logp, ref.detach().to(dt), cfg.kl_type)
    if gap is None or cfg.sd_coef == 0 or cfg.teacher_use in ("none", "rlsd"):
        return out
    if cfg.teacher_use == "skill_sd":
        out.sd = skill_sd_term(logp, old, logp.detach() + gap)
        return out
    out.gate = gate_values(gap, entropy, cfg)
    # sampled divergence t - s, written gap + sg(s) - s: value t - s, gradient through s only
    out.div = (gap + logp.detach() - logp) if cfg.divergence == "sampled" else div
    out.sd = out.gate * out.div
    return out


def token_loss(tt: TokenTerms, entropy: Optional[Tensor], cfg: LossConfig) -> Tensor:
    """l_i = c_pg pg_i + c_kl k_i - c_H H_i + lambda sd_i, so that L = sum_i w_i l_i."""
    loss = cfg.policy_coef * tt.pg if cfg.policy_coef != 0 else torch.zeros_like(tt.pg)
    if cfg.kl_coef != 0:
        loss = loss + cfg.kl_coef * tt.kl
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * entropy
    if tt.sd is not None:
        loss = loss + cfg.sd_coef * tt.sd
    return loss


def loss_metrics(tt: TokenTerms, entropy: Tensor, mask: Tensor, weights: Tensor) -> dict:
    """Detached 0-d metrics (no host sync): means over loss tokens, loss parts aggregated."""
    mean = lambda x: masked_mean(x.detach(), mask)  # noqa: E731
    out = {"pg_loss": (weights * tt.pg).sum().detach(), "ratio_mean": mean(tt.ratio),
           "clip_frac": mean(tt.clipped), "entropy_mean": mean(entropy), "tokens": mask.sum()}
    if tt.kl is not None:
        out["ref_kl"] = mean(tt.kl)
    if tt.gap is not None:
        out["gap_mean"] = mean(tt.gap)
    if tt.gate is not None:
        out["gate_mean"], out["gate_active"] = mean(tt.gate), mean((tt.gate > 0.5).to(tt.gate.dtype))
        out["div_mean"] = mean(tt.div)
    if tt.sd is not None:
        out["sd_loss"] = (weights * tt.sd).sum().detach()
    return out


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
