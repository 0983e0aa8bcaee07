"""Public entry points: the fused SDAR loss and the fused per-token log-prob pass."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import terms
from .config import LossConfig
from .dtensor import localize
from .input_checks import check_values
from .linear_stats import _validate, linear_stats, resolve_backend
from .rowwise import rowwise_sdar_loss
from .stats import StatsSpec, accum_dtype


@dataclass
class SDAROutput:
    """loss: 0-d, differentiable w.r.t. hidden (weight, bias when they require grad).
    metrics: dict of detached 0-d tensors (no host sync): gate_mean, gate_active, gap_mean,
    div_mean, clip_frac, ratio_mean, ref_kl, entropy_mean, tokens, pg_loss, sd_loss.
    logprobs / entropy: detached per-token [N] ([B, T] for [B, T, H] hidden states) student
    log-probs / entropies (0 off the mask).
    """

    loss: Tensor
    metrics: dict
    logprobs: Tensor
    entropy: Optional[Tensor] = None


def _own_precision(fn: Callable) -> Callable:
    """The kernels pick their own precisions (fp32 statistics and accumulation): an enclosing
    autocast region must not recast their GEMMs to bf16. Under autocast the trunk hands over bf16
    hidden states next to an fp32 lm_head; the weight then follows hidden's dtype (differentiably)."""

    @functools.wraps(fn)
    def wrapper(hidden: Tensor, weight: Tensor, *args, **kwargs):
        if torch.is_autocast_enabled(hidden.device.type):
            if weight.dtype != hidden.dtype and hidden.dtype != torch.float64:
                weight = weight.to(hidden.dtype)
                for name in ("bias", "teacher_bias"):
                    if kwargs.get(name) is not None:
                        kwargs[name] = kwargs[name].to(hidden.dtype)
                if kwargs.get("teacher_weight") is not None:
                    kwargs["teacher_weight"] = kwargs["teacher_weight"].to(hidden.dtype)
            if kwargs.get("teacher_hidden") is not None:
                kwargs["teacher_hidden"] = kwargs["teacher_hidden"].to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, weight, *args, **kwargs)

    return wrapper


def _follow_hidden_dtype(hidden: Tensor, backend: str, **tensors: Optional[Tensor]) -> dict:
    """The Triton kernels read hidden and the lm_head in one dtype: outside autocast too, a
    weight (bias, teacher tensors) of another dtype follows hidden's, differentiably (an fp32
    lm_head with bf16 hidden states gets its fp32 gradient through the cast). The torch backend
    takes mixed dtypes as they are (it computes in fp32 anyway), so nothing is copied there."""
    if resolve_backend(backend, hidden.device) != "triton":
        return tensors
    return {k: (t.to(hidden.dtype) if t is not None and t.dtype != hidden.dtype else t)
            for k, t in tensors.items()}


@localize  # DTensor (FSDP2) weight / bias: gathered differentiably (sdar_kernels/dtensor.py)
@_own_precision
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, bias: Optional[Tensor] = None,
                          mask: Optional[Tensor] = None, backend: str = "auto", token_chunk: int = 1024,
                          vocab_chunk: int = 2048, check_inputs: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log p(y_i) (and entropy, nats) of softmax((W h + b) / temperature), no [N, V] logits.

    hidden [N, H], weight [V, H], targets [N] int64, mask [N] optional (masked tokens cost no FLOPs
    and return 0); or batched: hidden [B, T, H] with targets / mask [B, T], outputs [B, T].
    Returns (logp [N], entropy [N] or None) in fp32 (fp64 for fp64 input),
    differentiable w.r.t. hidden, weight and bias. check_inputs: raise a ValueError naming the
    token when a hidden row the pass reads is non-finite or a target id lies outside [0, V)
    (one host sync; sdar_kernels/input_checks.py).
    """
    if hidden.dim() == 3:
        b, t = hidden.shape[:2]
        logp, ent = fused_linear_logprobs(hidden.reshape(b * t, -1), weight, _flatten_rows(b, t, "targets", targets),
                                          temperature, with_entropy, bias, _flatten_rows(b, t, "mask", mask),
                                          backend, token_chunk, vocab_chunk, check_inputs)
        return logp.reshape(b, t), (None if ent is None else ent.reshape(b, t))
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid; expected a number > 0")
    for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")
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
    cast = _follow_hidden_dtype(hidden, backend, weight=weight, bias=bias)
    out = linear_stats(hidden, cast["weight"], targets, spec, bias=cast["bias"], mask=mask,
                       backend=backend, check_inputs=check_inputs)
    return out.logp, out.entropy


def _check_inputs(n: int, cfg: LossConfig, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be [N]={n}; got shape {tuple(t.shape)}")
    if cfg.uses_teacher and tensors.get("teacher_logprobs") is None:
        detail = "" if cfg.teacher_use == "rlsd" else f" with sd_coef={cfg.sd_coef}"
        raise ValueError(f"teacher_use={cfg.teacher_use!r}{detail} needs teacher_logprobs [N] (the gap "
                         "t - s drives the gate and the advantage reweighting)")
    if cfg.kl_coef != 0 and tensors.get("ref_logprobs") is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs [N] (or set kl_coef=0)")
    if cfg.ratio_level != "token" and tensors.get("segment_ids") is None:
        raise ValueError(f"LossConfig.ratio_level={cfg.ratio_level!r} needs the sequences: segment_ids [N] for a "
                         "packed stream, or [B, T, H] hidden states (one sequence per row)")


_TRAILING = {"teacher_hidden": "H_T", "teacher_topk_ids": "k", "teacher_topk_logprobs": "k"}


def _flatten_rows(b: int, t: int, name: str, x: Optional[Tensor], per_row: bool = False) -> Optional[Tensor]:
    """[B, T] -> [B * T] ([B, T, X] -> [B * T, X] for teacher_hidden and the top-k inputs); with
    per_row, [B] and [B, 1] broadcast along T first."""
    if x is None:
        return None
    if per_row and tuple(x.shape) in ((b,), (b, 1)):
        return x.reshape(b, 1).expand(b, t).reshape(b * t)
    trailing = _TRAILING.get(name)
    if tuple(x.shape[:2]) != (b, t) or x.dim() != (3 if trailing else 2):
        want = f"[{b}, {t}, {trailing}]" if trailing else f"[B, T]=[{b}, {t}]"
        rows = f"[B]=[{b}], [B, 1] or " if per_row else ""
        raise ValueError(f"{name} must be {rows}{want} with hidden [B, T, H]; got shape {tuple(x.shape)}")
    return x.reshape(b * t, *x.shape[2:])


@localize  # DTensor (FSDP2) weight / bias: gathered differentiably (sdar_kernels/dtensor.py)
@_own_precision
def fused_linear_sdar_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                           old_logprobs: Optional[Tensor], loss_mask: Tensor,
                           teacher_logprobs: Optional[Tensor] = None,
                           teacher_hidden: Optional[Tensor] = None,
                           teacher_weight: Optional[Tensor] = None,
                           ref_logprobs: Optional[Tensor] = None,
                           segment_ids: Optional[Tensor] = None,
                           normalizer: Optional[Tensor | float] = None,
                           bias: Optional[Tensor] = None,
                           teacher_bias: Optional[Tensor] = None,
                           config: LossConfig = LossConfig(), *,
                           importance_weights: Optional[Tensor] = None,
                           entropy_normalizer: Optional[Tensor | float] = None,
                           teacher_topk_ids: Optional[Tensor] = None,
                           teacher_topk_logprobs: Optional[Tensor] = None) -> SDAROutput:
    """The SDAR loss of SDAR_MATH.md, never holding [N, V] logits.

    Packed: hidden [N, H] (student, requires grad), weight [V, H], targets [N] int64, advantages,
    old_logprobs, loss_mask, teacher_logprobs, ref_logprobs, importance_weights [N]; segment_ids [N]
    (contiguous runs) for the sequence-level aggregations and ratios.
    Batched: hidden [B, T, H] and every per-token input [B, T] (advantages and importance_weights
    also [B] or [B, 1], broadcast along T); each row is one sequence (segment_ids default to the row
    index), the seq-mean-token-sum-norm constant defaults to T, and logprobs / entropy come back [B, T].
    old_logprobs None: on-policy, o = sg(s) (ratio 1, gradient of -A s).
    importance_weights: detached per-token weights from the rollout engine (TRL's vLLM
    importance_sampling_ratio, verl's rollout_is_weights), multiplying the policy term after clipping.
    normalizer: the global count the chosen aggregation divides by (terms.token_weights);
    entropy_normalizer: the same for the entropy bonus when LossConfig.entropy_agg aggregates it apart.
    teacher_hidden [N, H_T] / teacher_weight [V, H_T] only for full-vocabulary divergences (the gate
    still reads the gap from teacher_logprobs). teacher_topk_ids [N, k] int64 / teacher_topk_logprobs
    [N, k] only for divergence "topk_forward_kl" (docs/topk_distillation.md): that divergence always
    runs the per-token statistics op + epilogue (grad_in_forward is ignored) and adds
    topk_student_mass / topk_teacher_mass (mean top-k probability mass over loss tokens) to the metrics.
    LossConfig.ratio_level "sequence" / "sequence_token" take that path too (a token's gradient needs
    its whole sequence).
    """
    extra = dict(importance_weights=importance_weights, entropy_normalizer=entropy_normalizer,
                 teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    if hidden.dim() != 3:
        return _sdar_loss_packed_impl(hidden, weight, targets, advantages, old_logprobs, loss_mask, teacher_logprobs,
                                      teacher_hidden, teacher_weight, ref_logprobs, segment_ids, normalizer, bias,
                                      teacher_bias, config, **extra)
    b, t = hidden.shape[:2]
    given = dict(targets=targets, loss_mask=loss_mask, old_logprobs=old_logprobs, teacher_logprobs=teacher_logprobs,
                 ref_logprobs=ref_logprobs, segment_ids=segment_ids, teacher_hidden=teacher_hidden,
                 teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    flat = {k: _flatten_rows(b, t, k, v) for k, v in given.items()}
    if flat["segment_ids"] is None:
        flat["segment_ids"] = torch.arange(b, device=hidden.device).repeat_interleave(t)
    out = _sdar_loss_packed_impl(
        hidden.reshape(b * t, hidden.shape[2]), weight, flat["targets"],
        _flatten_rows(b, t, "advantages", advantages, per_row=True), flat["old_logprobs"], flat["loss_mask"],
        flat["teacher_logprobs"], flat["teacher_hidden"], teacher_weight, flat["ref_logprobs"], flat["segment_ids"],
        normalizer, bias, teacher_bias, config,
        importance_weights=_flatten_rows(b, t, "importance_weights", importance_weights, per_row=True),
        entropy_normalizer=entropy_normalizer, teacher_topk_ids=flat["teacher_topk_ids"],
        teacher_topk_logprobs=flat["teacher_topk_logprobs"], horizon=t)
    out.logprobs = out.logprobs.reshape(b, t)
    out.entropy = None if out.entropy is None else out.entropy.reshape(b, t)
    return out


def _sdar_loss_packed_impl(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                           old_logprobs: Optional[Tensor], loss_mask: Tensor,
                           teacher_logprobs: Optional[Tensor] = None,
                           teacher_hidden: Optional[Tensor] = None,
                           teacher_weight: Optional[Tensor] = None,
                           ref_logprobs: Optional[Tensor] = None,
                           segment_ids: Optional[Tensor] = None,
                           normalizer: Optional[Tensor | float] = None,
                           bias: Optional[Tensor] = None,
                           teacher_bias: Optional[Tensor] = None,
                           config: LossConfig = LossConfig(), *,
                           teacher_topk_ids: Optional[Tensor] = None,
                           teacher_topk_logprobs: Optional[Tensor] = None,
                           importance_weights: Optional[Tensor] = None,
                           entropy_normalizer: Optional[Tensor | float] = None,
                           horizon: Optional[int] = None) -> SDAROutput:
    """fused_linear_sdar_loss (see its docstring) over one packed stream of N tokens; horizon: T of a
    [B, T] call (the seq-mean-token-sum-norm default constant)."""
    cfg = config
    n = hidden.shape[0]
    _check_inputs(n, cfg, advantages=advantages, old_logprobs=old_logprobs, loss_mask=loss_mask,
                  teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs, segment_ids=segment_ids,
                  importance_weights=importance_weights)
    if cfg.topk_divergence:
        from .topk import check_topk_inputs

        teacher_topk_ids, teacher_topk_logprobs = check_topk_inputs(
            n, weight.shape[0], teacher_topk_ids, teacher_topk_logprobs, loss_mask, cfg.check_inputs)
    if cfg.backend == "reference":
        from .reference import reference_sdar_loss

        return reference_sdar_loss(hidden, weight, targets, advantages, old_logprobs, loss_mask,
                                   teacher_logprobs, teacher_hidden, teacher_weight, ref_logprobs,
                                   segment_ids, normalizer, bias, teacher_bias, cfg,
                                   teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
                                   importance_weights=importance_weights, entropy_normalizer=entropy_normalizer,
                                   horizon=horizon)
    full_div = cfg.full_vocab_divergence
    _validate(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias,
              StatsSpec(divergence=cfg.divergence if full_div else "none"))
    if cfg.check_inputs:  # the inputs this config reads, nothing else
        check_values(loss_mask, weight.shape[0], targets,
                     {"hidden": hidden, "advantages": advantages, "old_logprobs": old_logprobs,
                      "teacher_logprobs": teacher_logprobs if cfg.uses_teacher else None,
                      "ref_logprobs": ref_logprobs if cfg.kl_coef != 0 else None,
                      "teacher_hidden": teacher_hidden if full_div else None,
                      "importance_weights": importance_weights if cfg.policy_coef != 0 else None},
                     {"weight": weight, "teacher_weight": teacher_weight if full_div else None,
                      "normalizer": normalizer,
                      "entropy_normalizer": entropy_normalizer if cfg.entropy_coef != 0 else None})
    acc = accum_dtype(hidden.dtype)
    mask = (loss_mask != 0).to(acc)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if (cfg.grad_in_forward and wants_grad and not cfg.topk_divergence and cfg.ratio_level == "token"
            and resolve_backend(cfg.backend, hidden.device) in ("torch", "triton")):
        # the row ops cast a weight of another dtype for their GEMMs themselves and return its
        # gradient in its own dtype, accumulated in fp32 (an fp32 lm_head gets an unrounded dW)
        weights = terms.token_weights(mask, segment_ids, normalizer, cfg, horizon)
        w_ent = terms.entropy_weights(mask, segment_ids, weights, entropy_normalizer, cfg, horizon)
        loss, logp, ent, div = rowwise_sdar_loss(
            hidden, weight, bias, targets, loss_mask, weights, advantages, old_logprobs, teacher_logprobs,
            ref_logprobs, teacher_hidden if full_div else None, teacher_weight if full_div else None,
            teacher_bias if full_div else None, cfg, entropy_weights=w_ent, importance_weights=importance_weights)
        tt = terms.token_terms(logp, ent, div, advantages, old_logprobs, teacher_logprobs, ref_logprobs, cfg,
                               importance_weights=importance_weights)
        return SDAROutput(loss=loss, metrics=terms.loss_metrics(tt, ent, mask, weights), logprobs=logp, entropy=ent)
    spec = StatsSpec(temperature=cfg.temperature, with_entropy=True,
                     divergence=cfg.divergence if full_div else "none", jsd_beta=cfg.jsd_beta,
                     token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)
    cast = _follow_hidden_dtype(hidden, cfg.backend, weight=weight, bias=bias, teacher_hidden=teacher_hidden,
                                teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    weight, bias, teacher_bias = cast["weight"], cast["bias"], cast["teacher_bias"]
    teacher_hidden, teacher_weight = cast["teacher_hidden"], cast["teacher_weight"]
    st = linear_stats(hidden, weight, targets, spec, bias=bias, mask=loss_mask,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                      teacher_bias=teacher_bias, backend=cfg.backend, check_inputs=False)
    div = st.div
    if cfg.topk_divergence:  # k gather-dots per token; the LSE (and its gradient) rides on st.logp
        from .topk import topk_forward_kl

        div, topk_mass = topk_forward_kl(hidden, weight, bias, targets, st.logp, teacher_topk_ids,
                                         teacher_topk_logprobs, loss_mask, cfg.temperature, cfg.topk_tail,
                                         cfg.token_chunk, cfg.topk_logprob_min)
    loss, metrics = sdar_epilogue(st.logp, st.entropy, div, advantages, old_logprobs, mask,
                                  teacher_logprobs, ref_logprobs, segment_ids, normalizer, cfg,
                                  importance_weights=importance_weights, entropy_normalizer=entropy_normalizer,
                                  horizon=horizon)
    if cfg.topk_divergence:
        metrics["topk_student_mass"] = terms.masked_mean(topk_mass, mask)
        metrics["topk_teacher_mass"] = terms.masked_mean(
            torch.where(mask != 0, teacher_topk_logprobs.to(mask.dtype).exp().sum(-1), 0.0), mask)
    return SDAROutput(loss=loss, metrics=metrics, logprobs=st.logp.detach(), entropy=st.entropy.detach())


def sdar_epilogue(logp: Tensor, entropy: Tensor, div: Optional[Tensor], advantages: Tensor, old: Optional[Tensor],
                  mask: Tensor, teacher: Optional[Tensor], ref: Optional[Tensor],
                  segment_ids: Optional[Tensor], normalizer, cfg: LossConfig, *,
                  importance_weights: Optional[Tensor] = None, entropy_normalizer=None,
                  horizon: Optional[int] = None) -> tuple[Tensor, dict]:
    """Total loss and metrics from per-token statistics (all [N]; mask float 0/1; old None = on-policy)."""
    weights = terms.token_weights(mask, segment_ids, normalizer, cfg, horizon)
    w_ent = terms.entropy_weights(mask, segment_ids, weights, entropy_normalizer, cfg, horizon)
    seg = terms._run_ids(segment_ids, mask.shape[0], mask.device) if cfg.ratio_level != "token" else None
    tt = terms.token_terms(logp, entropy, div, advantages, old, teacher, ref, cfg, mask=mask, seg=seg,
                           importance_weights=importance_weights)
    loss = terms.token_loss(tt, entropy, cfg, weights, w_ent).sum()
    return loss, terms.loss_metrics(tt, entropy, mask, weights)
