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


def _agg(x: Tensor, m: Tensor, seg: Optional[Tensor], normalizer, cfg: LossConfig, agg: Optional[str] = None,
         horizon: Optional[int] = None) -> Tensor:
    """verl's aggregation modes, written out per sequence with Python loops."""
    agg = cfg.agg if agg is None else agg
    if agg == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None and normalizer is None and horizon is None:
        raise ValueError("LossConfig.agg='seq-mean-token-sum-norm' on a packed stream needs "
                         "LossConfig.loss_scale_factor or normalizer")
    if agg == "token-mean":
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
    if agg == "seq-mean-token-sum-norm":
        z = cfg.loss_scale_factor or (normalizer if normalizer is not None else horizon)
        return torch.stack(sums).sum() / z
    n_seq = len(sums) if normalizer is None else normalizer
    per_seq = [s / c for s, c in zip(sums, counts)] if agg == "seq-mean-token-mean" else sums
    return torch.stack(per_seq).sum() / n_seq


def reference_sdar_loss(hidden, weight, targets, advantages, old_logprobs, loss_mask, teacher_logprobs=None,
                        teacher_hidden=None, teacher_weight=None, ref_logprobs=None, segment_ids=None,
                        normalizer=None, bias=None, teacher_bias=None, config: LossConfig = LossConfig(),
                        *, teacher_topk_ids=None, teacher_topk_logprobs=None, importance_weights=None,
                        entropy_normalizer=None, horizon=None):
    """SDAR_MATH.md term by term; returns the same SDAROutput as the fused backends.

    Packed [N] inputs only (fused_linear_sdar_loss flattens [B, T] ones and passes horizon=T)."""
    from .loss import SDAROutput

    cfg = config
    dtype = _DTYPES[cfg.reference_dtype]
    spec = StatsSpec(temperature=cfg.temperature, with_entropy=True,
                     divergence=cfg.divergence if cfg.full_vocab_divergence else "none", jsd_beta=cfg.jsd_beta)
    st = reference_stats(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec, dtype)
    s, ent = st.logp, st.entropy
    f = s.dtype
    m = (loss_mask != 0).to(f)
    A = advantages.to(f)
    o = s.detach() if old_logprobs is None else old_logprobs.to(f)  # None: on-policy
    t = teacher_logprobs.to(f) if teacher_logprobs is not None else None
    gap = (t - s).detach() if t is not None else None
    if cfg.teacher_use == "rlsd":
        weight_ = torch.clamp(torch.exp(torch.clamp(torch.sign(A) * gap, max=20)), 1 - cfg.rlsd_clip, 1 + cfg.rlsd_clip)
        A = A * ((1 - cfg.rlsd_weight) + cfg.rlsd_weight * weight_)
    agg = lambda x: _agg(x, m, segment_ids, normalizer, cfg, horizon=horizon)  # noqa: E731
    # policy: PPO clip with dual clip, on the token's or the sequence's ratio
    if cfg.ratio_level == "token":
        log_ratio = torch.clamp(s - o, -20, 20)
    else:
        log_ratio = torch.zeros_like(s)
        for k in torch.unique(segment_ids).tolist():
            sel = segment_ids == k
            d = torch.where(m[sel] > 0, s[sel] - o[sel], torch.zeros_like(s[sel]))
            mean = d.sum() / torch.clamp(m[sel].sum(), min=1)
            if cfg.ratio_level == "sequence":  # TRL: the mean itself, gradient through every token
                value = torch.clamp(mean, -20, 20).expand(int(sel.sum()))
            else:  # verl gspo: value of the mean, each token's own gradient (straight through)
                value = torch.clamp(mean.detach() + s[sel] - s[sel].detach(), max=10)
            log_ratio = log_ratio.masked_scatter(sel, value)
    ratio = torch.exp(log_ratio)
    capped = ratio if cfg.clip_ratio_max is None else torch.clamp(ratio, max=cfg.clip_ratio_max)
    pg = torch.max(-A * capped, -A * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.dual_clip is not None:
        pg = torch.where(A < 0, torch.min(pg, -A * cfg.dual_clip), pg)
    if importance_weights is not None:
        pg = pg * importance_weights.to(f)
    loss = cfg.policy_coef * agg(pg)
    if cfg.kl_coef != 0:
        r = ref_logprobs.to(f)
        base = cfg.kl_type.rstrip("+")
        if base == "k1":
            k = s - r
        elif base == "k2":
            k = 0.5 * (s - r) ** 2
        elif base == "k3_unclamped":
            k = torch.exp(r - s) - (r - s) - 1
        else:
            delta = torch.clamp(r - s, -20, 20)
            k = torch.clamp(torch.exp(delta) - delta - 1, -10, 10)
        if cfg.kl_type.endswith("+"):  # value of k, gradient of k2
            k2 = 0.5 * (s - r) ** 2
            k = k.detach() + k2 - k2.detach()
        if cfg.kl_ratio_weighted:  # TRL use_bias_correction_kl: per_token_kl * coef_1, coef_1 taken before delta
            k = torch.exp(log_ratio) * k
        loss = loss + cfg.kl_coef * agg(k)
    if cfg.entropy_coef != 0:
        if cfg.entropy_agg is None and entropy_normalizer is None:
            loss = loss - cfg.entropy_coef * agg(ent)
        else:
            loss = loss - cfg.entropy_coef * _agg(ent, m, segment_ids, entropy_normalizer, cfg,
                                                  agg=cfg.entropy_agg or cfg.agg, horizon=horizon)
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
        if cfg.topk_divergence:
            lp = _log_softmax(hidden, weight, bias, cfg.temperature, s.dtype)
            d = reference_topk_divergence(lp, teacher_topk_ids, teacher_topk_logprobs, m, cfg.topk_tail,
                                          cfg.topk_logprob_min)
        loss = loss + cfg.sd_coef * agg(g.detach() * d)
    elif cfg.sd_coef != 0 and cfg.teacher_use == "skill_sd":
        u = s - t
        w = torch.exp(torch.clamp(s - o, max=10)).detach()
        sd = w * (torch.exp(torch.clamp(-u, max=20)) - 1 + u)
        loss = loss + cfg.sd_coef * agg(sd)
    return SDAROutput(loss=loss, metrics={"tokens": m.sum().detach()}, logprobs=(s * m).detach(),
                      entropy=(ent * m).detach())


def reference_topk_divergence(lp: Tensor, ids: Tensor, teacher_lp: Tensor, mask: Tensor, tail: str,
                              logprob_min: Optional[float] = None) -> Tensor:
    """Top-k forward KL per row (docs/topk_distillation.md) from the full student log-probs lp [N, V];
    ids / teacher_lp [N, k]; rows where mask is 0 give 0 (their ids may be anything). logprob_min
    ("truncated"): both log-prob sets clamped below first (verl's log_prob_min_clamp)."""
    from .topk import TAIL_FLOOR

    n = lp.shape[0]
    keep = (mask != 0)[:, None]
    ids = torch.where(keep, ids.long().reshape(n, -1), 0)
    lq = torch.where(keep, teacher_lp.reshape(n, -1).to(lp.dtype), 0.0)
    ls = lp.gather(1, ids)
    q = lq.exp()

    def kl_terms(a: Tensor, la: Tensor, lb: Tensor) -> Tensor:  # sum a (la - lb), 0 log 0 = 0
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if tail == "renorm":
        lqn, lsn = lq - torch.logsumexp(lq, -1, keepdim=True), ls - torch.logsumexp(ls, -1, keepdim=True)
        d = kl_terms(lqn.exp(), lqn, lsn)
    elif tail == "truncated":
        if logprob_min is not None:
            ls, lq = torch.clamp(ls, min=logprob_min), torch.clamp(lq, min=logprob_min)
        d = torch.clamp(kl_terms(lq.exp(), lq, ls), min=0)
    else:
        q_tail = torch.clamp(1 - q.sum(-1), min=0)
        p_tail = 1 - ls.exp().sum(-1)
        floor = torch.clamp(p_tail.detach(), min=TAIL_FLOOR)  # value log max(p_T, floor); slope 1/max(p_T, floor)
        log_p_tail = floor.log() + (p_tail - p_tail.detach()) / floor
        q_log_q = torch.where(q_tail > 0, q_tail * q_tail.log(), torch.zeros_like(q_tail))
        d = kl_terms(q, lq, ls) + q_log_q - q_tail * log_p_tail
    return d * keep[:, 0].to(d.dtype)
