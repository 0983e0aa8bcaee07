"""The oracle: SDAR_MATH.md in the plainest PyTorch, with materialized [N, V] logits.

Small inputs only. It shares no code with the fused backends (terms.py, chunked.py) on purpose:
a bug there must not hide in the oracle too. ``dtype`` picks the compute precision: float64
(the default oracle), float32, or None = the input dtype ("plain PyTorch", e.g. bf16, the
baseline of the Cut Cross-Entropy error criterion).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig
from .stats import Stats, StatsSpec

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "input": None}


def _log_softmax(h: Tensor, w: Tensor, b: Optional[Tensor], tau: float, dtype) -> Tensor:
    if dtype is not None:
        h, w, b = h.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
    logits = F.linear(h, w, b) / tau
    return torch.log_softmax(logits, dim=-1)


def _divergence(lp: Tensor, lq: Tensor, kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """(D, KL(p||M) or KL(p||q)) per row from full log-distributions."""
    p, q = lp.exp(), lq.exp()
    if kind == "reverse_kl":
        d = (p * (lp - lq)).sum(-1)
        return d, d
    if kind == "forward_kl":
        return (q * (lq - lp)).sum(-1), None
    # log M = log(beta q + (1 - beta) p), in log space so that underflowing p and q stay finite
    if beta in (0.0, 1.0):
        lm = lq if beta == 1.0 else lp
    else:
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1 - beta))
    kl_pm = (p * (lp - lm)).sum(-1)
    kl_qm = (q * (lq - lm)).sum(-1)
    return beta * kl_qm + (1 - beta) * kl_pm, kl_pm


def reference_stats(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias,
                    spec: StatsSpec, dtype: Optional[torch.dtype] = torch.float64) -> Stats:
    """The Stats contract computed from full logits; differentiable w.r.t. hidden/weight/bias."""
    lp = _log_softmax(hidden, weight, bias, spec.temperature, dtype)
    logp = lp.gather(-1, targets.long()[:, None])[:, 0]
    entropy = -(lp.exp() * lp).sum(-1)
    lse = torch.logsumexp(F.linear(hidden.to(lp.dtype), weight.to(lp.dtype),
                                   bias.to(lp.dtype) if bias is not None else None) / spec.temperature, -1)
    out = Stats(logp=logp, lse=lse, entropy=entropy if spec.with_entropy else None)
    if spec.divergence != "none":
        with torch.no_grad():
            lq = _log_softmax(teacher_hidden, teacher_weight, teacher_bias, spec.temperature, lp.dtype)
        out.div, out.div_aux = _divergence(lp, lq, spec.divergence, spec.jsd_beta)
        out.teacher_lse = torch.logsumexp(F.linear(teacher_hidden.to(lp.dtype), teacher_weight.to(lp.dtype),
                                                   None if teacher_bias is None else teacher_bias.to(lp.dtype))
                                          / spec.temperature, -1)
    return out


def _agg(x: Tensor, m: Tensor, seg: Optional[Tensor], normalizer, cfg: LossConfig) -> Tensor:
    """verl's aggregation modes, written out per sequence with Python loops."""
    if cfg.agg == "token-mean":
        z = m.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=x.dtype)
        return (m * x).sum() / z if float(z) > 0 else (m * x).sum()
    seg = torch.zeros_like(m, dtype=torch.long) if seg is None else seg
    sums, counts = [], []
    for k in torch.unique(seg).tolist():
        sel = seg == k
        if m[sel].sum() > 0:
            sums.append((m[sel] * x[sel]).sum())
            counts.append(m[sel].sum())
    if not sums:
        return (m * x).sum()
    if cfg.agg == "seq-mean-token-sum-norm":
        z = cfg.loss_scale_factor or (normalizer if normalizer is not None else max(counts))
        return torch.stack(sums).sum() / z
    n_seq = len(sums) if normalizer is None else normalizer
    per_seq = [s / c for s, c in zip(sums, counts)] if cfg.agg == "seq-mean-token-mean" else sums
    return torch.stack(per_seq).sum() / n_seq


def reference_sdar_loss(hidden, weight, targets, advantages, old_logprobs, loss_mask, teacher_logprobs=None,
                        teacher_hidden=None, teacher_weight=None, ref_logprobs=None, segment_ids=None,
                        normalizer=None, bias=None, teacher_bias=None, config: LossConfig = LossConfig()):
    """SDAR_MATH.md term by term; returns the same SDAROutput as the fused backends."""
    from .loss import SDAROutput

    cfg = config
    dtype = _DTYPES[cfg.reference_dtype]
    spec = StatsSpec(temperature=cfg.temperature, with_entropy=True,
                     divergence=cfg.divergence if cfg.full_vocab_divergence else "none", jsd_beta=cfg.jsd_beta)
    st = reference_stats(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec, dtype)
    s, ent = st.logp, st.entropy
    f = s.dtype
    m = (loss_mask != 0).to(f)
    A, o = advantages.to(f), old_logprobs.to(f)
    t = teacher_logprobs.to(f) if teacher_logprobs is not None else None
    gap = (t - s).detach() if t is not None else None
    if cfg.teacher_use == "rlsd":
        weight_ = torch.clamp(torch.exp(torch.clamp(torch.sign(A) * gap, max=20)), 1 - cfg.rlsd_clip, 1 + cfg.rlsd_clip)
        A = A * ((1 - cfg.rlsd_weight) + cfg.rlsd_weight * weight_)
    # policy: PPO clip with dual clip
    ratio = torch.exp(torch.clamp(s - o, -20, 20))
    pg = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.dual_clip is not None:
        pg = torch.where(A < 0, torch.min(pg, -A * cfg.dual_clip), pg)
    loss = cfg.policy_coef * _agg(pg, m, segment_ids, normalizer, cfg)
    if cfg.kl_coef != 0:
        r = ref_logprobs.to(f)
        if cfg.kl_type == "k1":
            k = s - r
        elif cfg.kl_type == "k2":
            k = 0.5 * (s - r) ** 2
        else:
            delta = torch.clamp(r - s, -20, 20)
            k = torch.clamp(torch.exp(delta) - delta - 1, -10, 10)
        loss = loss + cfg.kl_coef * _agg(k, m, segment_ids, normalizer, cfg)
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * _agg(ent, m, segment_ids, normalizer, cfg)
    if cfg.sd_coef != 0 and cfg.teacher_use == "sdar":
        if cfg.gate == "gap":
            g = torch.sigmoid(cfg.gate_beta * gap)
        elif cfg.gate == "entropy":
            g = torch.sigmoid(cfg.gate_beta * ent.detach())
        elif cfg.gate == "soft_or":
            g = torch.sigmoid(cfg.gate_beta * (1 - (1 - ent.detach()) * (1 - gap)))
        else:
            g = torch.ones_like(s)
        d = (t - s) if cfg.divergence == "sampled" else st.div
        loss = loss + cfg.sd_coef * _agg(g.detach() * d, m, segment_ids, normalizer, cfg)
    elif cfg.sd_coef != 0 and cfg.teacher_use == "skill_sd":
        u = s - t
        w = torch.exp(torch.clamp(s - o, max=10)).detach()
        sd = w * (torch.exp(torch.clamp(-u, max=20)) - 1 + u)
        loss = loss + cfg.sd_coef * _agg(sd, m, segment_ids, normalizer, cfg)
    return SDAROutput(loss=loss, metrics={"tokens": m.sum().detach()}, logprobs=(s * m).detach(),
                      entropy=(ent * m).detach())
