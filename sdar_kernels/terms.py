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


def log_ratio(logp: Tensor, old: Tensor, mask: Optional[Tensor], seg: Optional[Tensor], cfg: LossConfig) -> Tensor:
    """log rho_i per token [N] for ``cfg.ratio_level`` (SDAR_MATH.md); seg: run ids 0..S-1 (_run_ids).

    token: s - o clamped to [-20, 20]. sequence (TRL GSPO): the mean of s - o over the sequence's loss
    tokens (count clamped at 1), clamped to [-20, 20], differentiable through every token of it.
    sequence_token (verl "gspo"): sg(that mean) + s - sg(s), clamped at 10 from above.
    """
    if cfg.ratio_level == "token":
        return torch.clamp(logp - old, -20.0, 20.0)
    m = mask.to(logp.dtype)
    d = torch.where(m > 0, logp - old, torch.zeros_like(logp))  # padding may hold anything in old
    n = logp.shape[0]
    count = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, seg, m)
    mean = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, seg, d) / count.clamp(min=1.0)
    if cfg.ratio_level == "sequence":
        return torch.clamp(mean[seg], -20.0, 20.0)
    return torch.clamp(mean.detach()[seg] + logp - logp.detach(), max=10.0)


def ppo_clip(ratio: Tensor, adv: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """PPO-clip per token from the ratio [N]: max(-A min(rho, clip_ratio_max), -A clip(rho)), then the
    dual clip min(., -A c) where A < 0; returns (loss, clipped indicator)."""
    capped = ratio if cfg.clip_ratio_max is None else torch.clamp(ratio, max=cfg.clip_ratio_max)
    pg1 = -adv * capped
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(ratio.dtype)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
    return loss, clipped


def kl_penalty(logp: Tensor, ref: Tensor, kind: str) -> Tensor:
    """Estimators of KL(pi || ref) per token: k1, k2, k3 (clamped as verl's low_var_kl), k3_unclamped
    (TRL's), and verl's straight-through k1+ / k3+ (value of k1 / k3, gradient of k2)."""
    if kind.endswith("+"):
        k2 = 0.5 * (logp - ref) ** 2
        return k2 - k2.detach() + kl_penalty(logp.detach(), ref, kind[:-1])
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    if kind == "k3_unclamped":
        return torch.exp(ref - logp) - (ref - logp) - 1.0
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


def token_weights(mask: Tensor, segment_ids: Optional[Tensor], normalizer, cfg: LossConfig,
                  horizon: Optional[int] = None, agg: Optional[str] = None) -> Tensor:
    """Per-token weights w [N] with Agg(x) = sum_i w_i x_i for the four verl modes (SDAR_MATH.md).

    Every mode is linear in x with weights that do not depend on the logits, so the total loss is
    a sum of per-token terms. ``normalizer`` is the *global* count the sum is divided by: tokens
    for token-mean, sequences for the seq-mean modes, the whole constant for seq-mean-token-sum-norm
    (``loss_scale_factor`` wins there; without either, ``horizon`` = T of a [B, T] input, and a
    packed stream raises ValueError). With it, micro-batches (and ranks) summed reproduce the
    gradient of one big batch. Segment ids label sequences as contiguous runs (a packed stream);
    a sequence must not straddle micro-batches. ``agg``: the mode (default ``cfg.agg``).
    """
    n = mask.shape[0]
    agg = cfg.agg if agg is None else agg

    def positive(z: Tensor) -> Tensor:
        return torch.where(z > 0, z, torch.ones_like(z))

    given = None if normalizer is None else torch.as_tensor(normalizer, dtype=mask.dtype, device=mask.device)
    if agg == "token-mean":
        return mask / positive(mask.sum() if given is None else given)
    if agg == "seq-mean-token-sum-norm":
        if cfg.loss_scale_factor is not None:
            z = torch.tensor(cfg.loss_scale_factor, dtype=mask.dtype, device=mask.device)
        elif given is not None:
            z = given
        elif horizon is not None:
            z = torch.tensor(float(horizon), dtype=mask.dtype, device=mask.device)
        else:
            raise ValueError(SUM_NORM_NEEDS_CONSTANT)
        return mask / positive(z)
    seg = _run_ids(segment_ids, n, mask.device)
    count = mask.new_zeros(n).index_add_(0, seg, mask)  # loss tokens per sequence
    n_seq = positive((count > 0).sum().to(mask.dtype) if given is None else given)
    if agg == "seq-mean-token-sum":
        return mask / n_seq
    return mask / (positive(count)[seg] * n_seq)  # seq-mean-token-mean


SUM_NORM_NEEDS_CONSTANT = (
    "LossConfig.agg='seq-mean-token-sum-norm' on a packed [N] stream needs its constant denominator: set "
    "LossConfig.loss_scale_factor (the whole number the token sum is divided by; verl 0.9.1: global sequence "
    "count x its loss_scale_factor, or x the padded response length when that is None; TRL dr_grpo: rows "
    "per micro-batch x max_completion_length) or pass normalizer=<that number>; [B, T] inputs default to T")


def entropy_weights(mask: Tensor, segment_ids: Optional[Tensor], weights: Tensor, entropy_normalizer,
                    cfg: LossConfig, horizon: Optional[int] = None) -> Tensor:
    """Per-token weights [N] of the entropy bonus: ``weights`` (the other terms') unless
    ``cfg.entropy_agg`` is set or ``entropy_normalizer`` is given; then the entropy is aggregated on
    its own: token_weights of entropy_agg (default agg) over ``entropy_normalizer`` (None: this
    call's own count, never the policy's normalizer)."""
    if cfg.entropy_coef == 0 or (cfg.entropy_agg is None and entropy_normalizer is None):
        return weights
    return token_weights(mask, segment_ids, entropy_normalizer, cfg, horizon, agg=cfg.entropy_agg or cfg.agg)


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
                old: Optional[Tensor], teacher: Optional[Tensor], ref: Optional[Tensor], cfg: LossConfig, *,
                mask: Optional[Tensor] = None, seg: Optional[Tensor] = None,
                importance_weights: Optional[Tensor] = None) -> TokenTerms:
    """Every per-token term of SDAR_MATH.md from the statistics (logp, entropy, div carry grad).

    old None: on-policy, o = sg(s) (ratio 1, policy gradient -A). mask [N] and seg [N] (run ids,
    _run_ids) are read by the sequence-level ratios only. importance_weights [N] (detached)
    multiply the policy term after clipping. cfg.kl_ratio_weighted: kl is rho_i k_i (rho before the cap)."""
    dt = logp.dtype
    adv = advantages.detach().to(dt)
    old = logp.detach() if old is None else old.detach().to(dt)
    gap = (teacher.detach().to(dt) - logp.detach()) if teacher is not None else None
    if cfg.teacher_use == "rlsd" and gap is not None:
        adv = rlsd_advantage(adv, gap, cfg)
    ratio = torch.exp(log_ratio(logp, old, mask, seg, cfg))
    pg, clipped = ppo_clip(ratio, adv, cfg)
    if importance_weights is not None:
        pg = pg * importance_weights.detach().to(dt)
    out = TokenTerms(pg=pg, ratio=ratio, clipped=clipped, gap=gap)
    if ref is not None:
        out.kl = kl_penalty(logp, ref.detach().to(dt), cfg.kl_type)
        if cfg.kl_ratio_weighted:  # TRL's bias-corrected KL: times the un-capped ratio, gradient through both
            out.kl = out.kl * ratio
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


def token_loss(tt: TokenTerms, entropy: Optional[Tensor], cfg: LossConfig, weights: Tensor,
               entropy_weights: Optional[Tensor] = None) -> Tensor:
    """Per-token contributions [N] with L = their sum: w_i (c_pg pg_i + c_kl k_i + lambda sd_i)
    - c_H w^H_i H_i, with w^H = entropy_weights (default: weights)."""
    loss = cfg.policy_coef * tt.pg if cfg.policy_coef != 0 else torch.zeros_like(tt.pg)
    if cfg.kl_coef != 0:
        loss = loss + cfg.kl_coef * tt.kl
    if tt.sd is not None:
        loss = loss + cfg.sd_coef * tt.sd
    loss = weights * loss
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * (weights if entropy_weights is None else entropy_weights) * entropy
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
