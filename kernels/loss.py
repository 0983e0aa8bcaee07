"""Public entry points: the fused SDAR loss and the fused per-token log-prob pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import terms
from .config import LossConfig
from .linear_stats import linear_stats
from .stats import StatsSpec, accum_dtype


@dataclass
class SDAROutput:
    """loss: 0-d, differentiable w.r.t. hidden (weight, bias when they require grad).
    metrics: dict of detached 0-d tensors (no host sync): gate_mean, gate_active, gap_mean,
    div_mean, clip_frac, ratio_mean, ref_kl, entropy_mean, tokens, pg_loss, sd_loss.
    logprobs / entropy: detached per-token [N] student log-probs / entropies (0 off the mask).
    """

    loss: Tensor
    metrics: dict
    logprobs: Tensor
    entropy: Optional[Tensor] = None


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, bias: Optional[Tensor] = None,
                          mask: Optional[Tensor] = None, backend: str = "auto", token_chunk: int = 1024,
                          vocab_chunk: int = 2048) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log p(y_i) (and entropy, nats) of softmax((W h + b) / temperature), no [N, V] logits.

    hidden [N, H], weight [V, H], targets [N] int64, mask [N] optional (masked tokens cost no FLOPs
    and return 0). Returns (logp [N], entropy [N] or None) in fp32 (fp64 for fp64 input),
    differentiable w.r.t. hidden, weight and bias.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid; expected a number > 0")
    if backend == "reference":
        from .reference import reference_stats

        st = reference_stats(hidden, weight, bias, targets, None, None, None,
                             StatsSpec(temperature=temperature, with_entropy=with_entropy))
        if mask is not None:
            keep = (mask != 0).to(st.logp.dtype)
            return st.logp * keep, (st.entropy * keep if with_entropy else None)
        return st.logp, (st.entropy if with_entropy else None)
    spec = StatsSpec(temperature=temperature, with_entropy=with_entropy, token_chunk=token_chunk,
                     vocab_chunk=vocab_chunk)
    out = linear_stats(hidden, weight, targets, spec, bias=bias, mask=mask, backend=backend)
    return out.logp, out.entropy


def _check_inputs(n: int, cfg: LossConfig, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be [N]={n}; got shape {tuple(t.shape)}")
    if cfg.uses_teacher and tensors.get("teacher_logprobs") is None:
        raise ValueError(f"teacher_use={cfg.teacher_use!r} with sd_coef={cfg.sd_coef} needs teacher_logprobs [N]")
    if cfg.kl_coef != 0 and tensors.get("ref_logprobs") is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs [N] (or set kl_coef=0)")


def fused_linear_sdar_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                           old_logprobs: Tensor, loss_mask: Tensor,
                           teacher_logprobs: Optional[Tensor] = None,
                           teacher_hidden: Optional[Tensor] = None,
                           teacher_weight: Optional[Tensor] = None,
                           ref_logprobs: Optional[Tensor] = None,
                           segment_ids: Optional[Tensor] = None,
                           normalizer: Optional[Tensor | float] = None,
                           bias: Optional[Tensor] = None,
                           teacher_bias: Optional[Tensor] = None,
                           config: LossConfig = LossConfig()) -> SDAROutput:
    """The SDAR loss of SDAR_MATH.md over one packed stream of N tokens, never holding [N, V] logits.

    hidden [N, H] (student, requires grad), weight [V, H], targets [N] int64, advantages,
    old_logprobs, loss_mask, teacher_logprobs, ref_logprobs [N]; segment_ids [N] (contiguous runs) for the
    sequence-level aggregations; normalizer: global token (or sequence) count, see
    terms.Aggregator. teacher_hidden [N, H_T] / teacher_weight [V, H_T] only for full-vocabulary
    divergences (the gate still reads the gap from teacher_logprobs).
    """
    cfg = config
    n = hidden.shape[0]
    _check_inputs(n, cfg, advantages=advantages, old_logprobs=old_logprobs, loss_mask=loss_mask,
                  teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs, segment_ids=segment_ids)
    if cfg.backend == "reference":
        from .reference import reference_sdar_loss

        return reference_sdar_loss(hidden, weight, targets, advantages, old_logprobs, loss_mask,
                                   teacher_logprobs, teacher_hidden, teacher_weight, ref_logprobs,
                                   segment_ids, normalizer, bias, teacher_bias, cfg)
    acc = accum_dtype(hidden.dtype)
    mask = (loss_mask != 0).to(acc)
    full_div = cfg.full_vocab_divergence
    spec = StatsSpec(temperature=cfg.temperature, with_entropy=True,
                     divergence=cfg.divergence if full_div else "none", jsd_beta=cfg.jsd_beta,
                     token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)
    st = linear_stats(hidden, weight, targets, spec, bias=bias, mask=loss_mask,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                      teacher_bias=teacher_bias, backend=cfg.backend)
    loss, metrics = sdar_epilogue(st.logp, st.entropy, st.div, advantages, old_logprobs, mask,
                                  teacher_logprobs, ref_logprobs, segment_ids, normalizer, cfg)
    return SDAROutput(loss=loss, metrics=metrics, logprobs=st.logp.detach(), entropy=st.entropy.detach())


def sdar_epilogue(logp: Tensor, entropy: Tensor, div: Optional[Tensor], advantages: Tensor, old: Tensor,
                  mask: Tensor, teacher: Optional[Tensor], ref: Optional[Tensor],
                  segment_ids: Optional[Tensor], normalizer, cfg: LossConfig) -> tuple[Tensor, dict]:
    """Total loss and metrics from per-token statistics (all [N]; mask float 0/1)."""
    dt = logp.dtype
    adv, old = advantages.detach().to(dt), old.detach().to(dt)
    agg = terms.Aggregator(mask, segment_ids, normalizer, cfg)
    gap = (teacher.detach().to(dt) - logp.detach()) if teacher is not None else None
    if cfg.teacher_use == "rlsd" and gap is not None:
        adv = terms.rlsd_advantage(adv, gap, cfg)
    pg, ratio, clipped = terms.ppo_clip(logp, old, adv, cfg)
    zero = logp.new_zeros(())
    loss = cfg.policy_coef * agg(pg) if cfg.policy_coef != 0 else zero
    metrics = {"pg_loss": agg(pg).detach(), "ratio_mean": terms.masked_mean(ratio, mask).detach(),
               "clip_frac": terms.masked_mean(clipped, mask).detach(),
               "entropy_mean": terms.masked_mean(entropy, mask).detach(), "tokens": mask.sum().detach()}
    if ref is not None:
        k = terms.kl_penalty(logp, ref.detach().to(dt), cfg.kl_type)
        metrics["ref_kl"] = terms.masked_mean(k, mask).detach()
        if cfg.kl_coef != 0:
            loss = loss + cfg.kl_coef * agg(k)
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * agg(entropy)
    sd = _sd_term(logp, entropy, div, old, gap, cfg, metrics, mask) if gap is not None else None
    if sd is not None:
        metrics["sd_loss"] = agg(sd).detach()
        loss = loss + cfg.sd_coef * agg(sd)
    return loss, metrics


def _sd_term(logp, entropy, div, old, gap, cfg: LossConfig, metrics: dict, mask: Tensor) -> Optional[Tensor]:
    """Per-token teacher term (SDAR gated divergence or Skill-SD), filling its metrics.

    gap = t - sg(s); the sampled divergence t - s is written gap + sg(s) - s so that its value
    is t - s and its gradient flows through s alone.
    """
    metrics["gap_mean"] = terms.masked_mean(gap, mask)
    if cfg.sd_coef == 0 or cfg.teacher_use in ("none", "rlsd"):
        return None
    if cfg.teacher_use == "skill_sd":
        return terms.skill_sd_term(logp, old, logp.detach() + gap)
    gate = terms.gate_values(gap, entropy, cfg)
    d = (gap + logp.detach() - logp) if cfg.divergence == "sampled" else div
    metrics["gate_mean"] = terms.masked_mean(gate, mask)
    metrics["gate_active"] = terms.masked_mean((gate > 0.5).to(gate.dtype), mask)
    metrics["div_mean"] = terms.masked_mean(d.detach(), mask)
    return gate * d
