"""Optimizer steps of the SDAR / GRPO family: PPO epochs x mini-batches x packed micro-batches.

``ppo_update`` runs a step's schedule: the old log-probs of every sample are scored with the
rollout weights first (each mini-batch packed exactly as its update will pack it), then each
epoch takes one ``policy_update`` per mini-batch. ``policy_update`` is one optimizer step: per
micro-batch, trunk -> hidden [N, H]; ``sdar_kernels.fused_linear_sdar_loss`` with the lm_head
weight (no [N, V] logits) and the GLOBAL normalizer (loss tokens of every micro-batch on every
rank), so the accumulated gradient equals that of one big batch. Then clip, step, and one host
sync for the metrics.
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .distributed import (all_reduce_max, all_reduce_max_, all_reduce_sum, collective_device, grad_scale,
                          is_distributed)
from .logprobs import default_row_tokens, model_device, pack_for_ranks, score_samples
from .memory_levers import activation_offload
from .model import head_forward
from .packing import MicroBatch, Sample, describe, pack_like

log = logging.getLogger("sdar_engine.update")

# Ratio statistics reduced by max over micro-batches and ranks (ratio_min is stored negated).
MAX_METRICS = ("ratio_max", "ratio_min")
# Per mini-batch keys of ``ppo_update``'s metrics: ppo/e<epoch>/mb<j>/<key>.
MINI_BATCH_KEYS = ("clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "samples")


def _any_rank(flag: bool) -> bool:
    return bool(all_reduce_max(int(flag)))


def _ensure_scored(model: Any, samples: Sequence[Sample], cfg: Any, max_tokens: int,
                   ref_model: Any, row_tokens: Optional[int]) -> None:
    """Fill what the loss needs and is missing: old log-probs (on-policy) and reference log-probs.

    Whether a pass runs is agreed over ranks (a rank with nothing missing still joins FSDP's
    collectives)."""
    if cfg.full_vocab_divergence and any(s.teacher_prompt_ids is None for s in samples):
        raise ValueError(f"LossConfig.divergence={cfg.divergence!r} needs the teacher's full distribution: "
                         "set sample.teacher_prompt_ids on every sample (or use divergence='sampled')")
    if _any_rank(any(s.old_logp is None for s in samples)):
        score_samples(model, samples, max_tokens, "old", cfg.temperature, row_tokens=row_tokens)
    if cfg.uses_teacher and any(s.teacher_logp is None for s in samples):
        raise ValueError(f"LossConfig.teacher_use={cfg.teacher_use!r} needs sample.teacher_logp; call "
                         "score_samples(policy, samples, max_tokens, 'teacher', T) right after the rollout")
    if cfg.kl_coef != 0 and _any_rank(any(s.ref_logp is None for s in samples)):
        if ref_model is None:
            raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} needs ref_model (a frozen copy of the "
                             "initial weights) or sample.ref_logp; or set kl_coef=0")
        score_samples(ref_model, samples, max_tokens, "ref", cfg.temperature, row_tokens=row_tokens)


def global_normalizer(samples: Sequence[Sample], agg: str, loss_scale_factor: Optional[float]) -> float:
    """The loss denominator over all ranks: tokens (token-mean), sequences (seq-mean-*),
    or the longest response (seq-mean-token-sum-norm without loss_scale_factor)."""
    if agg == "token-mean":
        local = [float(sum(s.num_loss_tokens for s in samples))]
    elif agg == "seq-mean-token-sum-norm":
        if loss_scale_factor is not None:
            return float(loss_scale_factor)
        return float(all_reduce_max(max((s.num_loss_tokens for s in samples), default=0)))
    else:
        local = [float(len(samples))]
    t = torch.tensor(local, dtype=torch.float64, device=collective_device())
    return float(all_reduce_sum(t)[0])


def _loss_inputs(mb: MicroBatch, samples: Sequence[Sample], cfg: Any, with_ref: bool,
                 device) -> dict[str, Tensor]:
    inputs = {"advantages": mb.per_token(samples, "advantage"),
              "old_logprobs": mb.per_token(samples, "old_logp")}
    if cfg.uses_teacher and all(samples[i].teacher_logp is not None for i in mb.sample_index):
        inputs["teacher_logprobs"] = mb.per_token(samples, "teacher_logp")
    if with_ref:  # also for kl_coef == 0: the ref-KL metric is then still logged
        inputs["ref_logprobs"] = mb.per_token(samples, "ref_logp")
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def _teacher_hidden(model: Any, mb: MicroBatch, samples: Sequence[Sample], row_tokens: Optional[int],
                    device: torch.device) -> Tensor:
    """Teacher hidden states [N, H] laid out like ``mb``: the current weights (no grad) reading
    teacher_prompt_ids + the same response; zero off the response positions."""
    tmb = pack_like(samples, mb, use_teacher_prompt=True, row_tokens=row_tokens).to(device)
    hidden = head_forward(model, tmb.input_ids, tmb.position_ids, lambda h, w, b: h.detach())
    out = hidden.new_zeros(mb.targets.shape[0], hidden.shape[1])
    where = {i: k for k, i in enumerate(tmb.sample_index)}
    for k, i in enumerate(mb.sample_index):
        out[mb.response_slices[k]] = hidden[tmb.response_slices[where[i]]]
    return out


def ratio_stats(logp: Tensor, old: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Importance-ratio statistics over the loss tokens ([N] each; 0-d outputs, no host sync).

    approx_kl: token mean of (r - 1) - log r (Schulman's k3 of KL(old || new), >= 0);
    ratio_max, ratio_min: extremes of r (ratio_min negated, so both reduce by max)."""
    on = mask > 0
    log_r = torch.where(on, logp.detach().float() - old.float(), torch.zeros_like(old, dtype=torch.float32))
    r = torch.exp(log_r)
    tokens = mask.sum().clamp_min(1)
    return {"approx_kl": ((r - 1 - log_r) * mask).sum() / tokens,
            "ratio_max": torch.where(on, r, torch.full_like(r, -math.inf)).max(),
            "ratio_min": -torch.where(on, r, torch.full_like(r, math.inf)).min()}


def _micro_step(model: Any, mb: MicroBatch, samples: Sequence[Sample], cfg: Any, normalizer: Tensor,
                with_ref: bool, row_tokens: Optional[int], device: torch.device
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward + backward of one micro-batch; returns (loss, metrics) as detached 0-d tensors."""
    from sdar_kernels import fused_linear_sdar_loss

    mb_dev = mb.to(device)
    extra = _loss_inputs(mb, samples, cfg, with_ref, device)
    if cfg.full_vocab_divergence:
        extra["teacher_hidden"] = _teacher_hidden(model, mb, samples, row_tokens, device)

    def head(hidden, weight, bias):
        if cfg.full_vocab_divergence:  # same lm_head, no gradient to the teacher side
            extra.update(teacher_weight=weight.detach(),
                         teacher_bias=bias.detach() if bias is not None else None)
        out = fused_linear_sdar_loss(hidden, weight, mb_dev.targets, loss_mask=mb_dev.loss_mask,
                                     segment_ids=mb_dev.segment_ids, normalizer=normalizer, bias=bias,
                                     config=cfg, **extra)
        stats = ratio_stats(out.logprobs, extra["old_logprobs"], mb_dev.loss_mask)
        return out.loss, {**out.metrics, **stats}

    with activation_offload(model):  # model.activation_offload: saved tensors wait in host memory
        loss, metrics = head_forward(model, mb_dev.input_ids, mb_dev.position_ids, head)
    (loss * grad_scale()).backward()  # FSDP averages over ranks; the loss is already global
    return loss.detach(), metrics


def _combine(per_mb: list[tuple[Tensor, dict[str, Tensor]]], grad_norm: Tensor) -> dict[str, float]:
    """Sums (loss parts, tokens), token-weighted means (the kernel's per-token means) and maxima
    (ratio extremes) over micro-batches and ranks, plus the (already global) grad norm; one sync."""
    skip = {"tokens", "pg_loss", "sd_loss", *MAX_METRICS}
    keys = sorted(set().union(*(m.keys() for _, m in per_mb)) - skip)
    rows, highs = [], []
    for loss, m in per_mb:
        tok = m["tokens"].double()
        row = [loss.double(), tok, m.get("pg_loss", tok * 0).double(), m.get("sd_loss", tok * 0).double()]
        row += [torch.nan_to_num(m[k].double()) * tok if k in m else tok * 0 for k in keys]
        rows.append(torch.stack([r.reshape(()).to(tok.device) for r in row]))
        highs.append(torch.stack([m[k].double().reshape(()).to(tok.device) for k in MAX_METRICS]))
    device = collective_device()
    total = all_reduce_sum(torch.stack(rows).sum(0).to(device))
    high = all_reduce_max_(torch.stack(highs).max(0).values.to(device))
    flat = torch.cat([total, high, grad_norm.double().reshape(1).to(device)]).tolist()  # the sync
    total, high = flat[:len(keys) + 4], flat[len(keys) + 4:-1]
    out = {"loss": total[0], "tokens": total[1], "pg_loss": total[2], "sd_loss": total[3],
           "grad_norm": flat[-1], "ratio_max": high[0], "ratio_min": -high[1]}
    for k, v in zip(keys, total[4:]):
        out[k] = v / total[1] if total[1] > 0 else 0.0
    return out


def policy_update(model: Any, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], loss_config: Any,
                  max_tokens: int, grad_clip: float, ref_model: Any = None, scheduler: Any = None,
                  row_tokens: Optional[int] = None) -> dict[str, float]:
    """One optimizer step on ``samples`` (this rank's share); returns global metrics as floats.

    Fills missing old log-probs (on-policy: the current weights) and reference log-probs
    (``ref_model``); teacher log-probs must already be on the samples when the loss uses them.
    Full-vocabulary divergences (reverse_kl, forward_kl, jsd) also run the teacher stream
    (teacher_prompt_ids + response) through the current weights without grad per micro-batch;
    the gate still reads teacher log-probs, so those must be on the samples too.
    ``grad_clip`` <= 0 disables clipping (the norm is still reported). ``scheduler`` (optional)
    steps after the optimizer. Forwards run under the model's ``compute_autocast``. Under a
    process group a rank may hold no sample of this step (it still joins the collectives).
    """
    if not samples and not is_distributed():
        raise ValueError("samples is empty; policy_update needs at least one sample")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 2")
    cfg = loss_config
    _ensure_scored(model, samples, cfg, max_tokens, ref_model, row_tokens)
    device = model_device(model)
    rows = default_row_tokens(model) if row_tokens is None else row_tokens
    micro = pack_for_ranks(model, samples, max_tokens, False, rows)
    z = global_normalizer(samples, cfg.agg, cfg.loss_scale_factor)
    if z <= 0:
        raise ValueError("the step's samples hold no response token on any rank; nothing to train on")
    normalizer = torch.tensor(z, dtype=torch.float32, device=device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with_ref = not _any_rank(any(s.ref_logp is None for s in samples))
    per_mb = [_micro_step(model, mb, samples, cfg, normalizer, with_ref, rows, device) for mb in micro]
    max_norm = grad_clip if grad_clip and grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = _combine(per_mb, torch.as_tensor(grad_norm))
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics.update({k: float(v) for k, v in describe(micro).items()})
    return metrics


def mini_batch_plan(num_samples: int, mini_batch_size: int, epochs: int, seed: int) -> list[list[list[int]]]:
    """``plan[e][j]``: sorted global sample indices of mini-batch j of epoch e.

    Each epoch splits its own seeded permutation of ``range(num_samples)`` into
    ceil(num_samples / mini_batch_size) near-equal parts (one part when the size is 0 or covers
    the batch). A pure function of its arguments: every rank computes the same plan.
    """
    if num_samples < 1 or mini_batch_size < 0 or epochs < 1:
        raise ValueError(f"mini_batch_plan(num_samples={num_samples}, mini_batch_size={mini_batch_size}, "
                         f"epochs={epochs}) is invalid; expected >= 1, >= 0, >= 1")
    k = 1 if mini_batch_size == 0 else max(1, math.ceil(num_samples / mini_batch_size))
    plan = []
    for epoch in range(epochs):
        order = list(range(num_samples))
        if k > 1:
            random.Random(f"sdar-ppo/{seed}/{epoch}").shuffle(order)
        plan.append([sorted(order[num_samples * j // k:num_samples * (j + 1) // k]) for j in range(k)])
    return plan


def local_plan(plan: list[list[list[int]]], mine: range) -> list[list[list[int]]]:
    """The plan restricted to the global indices in ``mine``, as indices into this rank's list."""
    return [[[i - mine.start for i in mb if i in mine] for mb in epoch] for epoch in plan]


def ppo_update(model: Any, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], loss_config: Any,
               plan: list[list[list[int]]], max_tokens: int, grad_clip: float, ref_model: Any = None,
               scheduler: Any = None, row_tokens: Optional[int] = None) -> dict[str, float]:
    """PPO epochs x mini-batches over this rank's ``samples`` (``plan`` from ``local_plan``).

    Old log-probs still missing are scored first, all with the rollout weights, each mini-batch
    of epoch 0 packed as its update packs it (under the same autocast), so the first mini-batch
    of the first epoch has ratio 1 up to the loss kernel's own rounding. Returns the mean of each
    metric over the optimizer steps, ``ppo/e<e>/mb<j>/<key>`` per mini-batch (MINI_BATCH_KEYS),
    and the step counts.
    """
    cfg = loss_config
    mbs = [[samples[i] for i in mb] for mb in plan[0]]
    t_old = time.perf_counter()
    if _any_rank(any(s.old_logp is None for s in samples)):
        for chunk in mbs:  # a rank with no sample here still joins the pass (FSDP collectives)
            score_samples(model, chunk, max_tokens, "old", cfg.temperature, row_tokens=row_tokens)
    sums: dict[str, float] = {}
    out: dict[str, float] = {"time/old_logp": time.perf_counter() - t_old}
    steps = 0
    for e, epoch in enumerate(plan):
        for j, mb in enumerate(epoch):
            m = policy_update(model, optimizer, [samples[i] for i in mb], cfg, max_tokens, grad_clip,
                              ref_model=ref_model, scheduler=None, row_tokens=row_tokens)
            m["samples"] = float(_global_count(len(mb)))
            for key in MINI_BATCH_KEYS:
                out[f"ppo/e{e}/mb{j}/{key}"] = m.get(key, float("nan"))
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v
            steps += 1
    if scheduler is not None:  # the learning-rate schedule counts rollout steps, not optimizer steps
        scheduler.step()
    out.update({k: v / steps for k, v in sums.items() if k != "samples"})
    out["ratio_max"] = max(out[f"ppo/e{e}/mb{j}/ratio_max"] for e in range(len(plan)) for j in range(len(plan[e])))
    out["ratio_min"] = min(out[f"ppo/e{e}/mb{j}/ratio_min"] for e in range(len(plan)) for j in range(len(plan[e])))
    out.update(ppo_mini_batches=float(len(plan[0])), optimizer_steps=float(steps))
    return out


def _global_count(n: int) -> int:
    t = torch.tensor([n], dtype=torch.long, device=collective_device())
    return int(all_reduce_sum(t)[0])
