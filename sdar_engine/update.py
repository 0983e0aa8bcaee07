"""One optimizer step of the SDAR / GRPO family over packed micro-batches.

Per micro-batch: trunk -> hidden [N, H]; ``sdar_kernels.fused_linear_sdar_loss`` with the
lm_head weight (no [N, V] logits) and the GLOBAL normalizer (loss tokens of every micro-batch
on every rank), so the accumulated gradient equals that of one big batch. Then clip, step,
and one host sync for the metrics.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .distributed import all_reduce_max, all_reduce_sum, grad_scale
from .logprobs import default_row_tokens, model_device, pack_for_ranks, score_samples
from .model import head_forward
from .packing import MicroBatch, Sample, describe, pack_like

log = logging.getLogger("sdar_engine.update")

# Metrics the kernel reports as means over a call's loss tokens: combined weighted by tokens.
MEAN_METRICS = ("gate_mean", "gate_active", "gap_mean", "div_mean", "clip_frac", "ratio_mean",
                "ref_kl", "entropy_mean")
# Already divided by the global normalizer: summed over micro-batches and ranks.
SUM_METRICS = ("loss", "pg_loss", "sd_loss", "tokens")


def _ensure_scored(model: Any, samples: Sequence[Sample], cfg: Any, max_tokens: int,
                   ref_model: Any, row_tokens: Optional[int]) -> None:
    """Fill what the loss needs and is missing: old log-probs (on-policy) and reference log-probs."""
    if cfg.full_vocab_divergence and any(s.teacher_prompt_ids is None for s in samples):
        raise ValueError(f"LossConfig.divergence={cfg.divergence!r} needs the teacher's full distribution: "
                         "set sample.teacher_prompt_ids on every sample (or use divergence='sampled')")
    if any(s.old_logp is None for s in samples):
        score_samples(model, samples, max_tokens, "old", cfg.temperature, row_tokens=row_tokens)
    if cfg.uses_teacher and any(s.teacher_logp is None for s in samples):
        raise ValueError(f"LossConfig.teacher_use={cfg.teacher_use!r} needs sample.teacher_logp; call "
                         "score_samples(policy, samples, max_tokens, 'teacher', T) right after the rollout")
    if cfg.kl_coef != 0 and any(s.ref_logp is None for s in samples):
        if ref_model is None:
            raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} needs ref_model (a frozen copy of the "
                             "initial weights) or sample.ref_logp; or set kl_coef=0")
        score_samples(ref_model, samples, max_tokens, "ref", cfg.temperature, row_tokens=row_tokens)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and no process group) take CPU tensors."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_normalizer(samples: Sequence[Sample], agg: str, loss_scale_factor: Optional[float]) -> float:
    """The loss denominator over all ranks: tokens (token-mean), sequences (seq-mean-*),
    or the longest response (seq-mean-token-sum-norm without loss_scale_factor)."""
    if agg == "token-mean":
        local = [float(sum(len(s.response_ids) for s in samples))]
    elif agg == "seq-mean-token-sum-norm":
        if loss_scale_factor is not None:
            return float(loss_scale_factor)
        return float(all_reduce_max(max(len(s.response_ids) for s in samples)))
    else:
        local = [float(len(samples))]
    t = torch.tensor(local, dtype=torch.float64, device=_collective_device())
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


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _micro_step(model: Any, mb: MicroBatch, samples: Sequence[Sample], cfg: Any, normalizer: Tensor,
                with_ref: bool, row_tokens: Optional[int], device: torch.device,
                autocast_dtype) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward + backward of one micro-batch; returns (loss, metrics) as detached 0-d tensors."""
    from sdar_kernels import fused_linear_sdar_loss

    mb_dev = mb.to(device)
    extra = _loss_inputs(mb, samples, cfg, with_ref, device)
    with _autocast(device, autocast_dtype):
        if cfg.full_vocab_divergence:
            extra["teacher_hidden"] = _teacher_hidden(model, mb, samples, row_tokens, device)

        def head(hidden, weight, bias):
            if cfg.full_vocab_divergence:  # same lm_head, no gradient to the teacher side
                extra.update(teacher_weight=weight.detach(),
                             teacher_bias=bias.detach() if bias is not None else None)
            out = fused_linear_sdar_loss(hidden, weight, mb_dev.targets, loss_mask=mb_dev.loss_mask,
                                         segment_ids=mb_dev.segment_ids, normalizer=normalizer, bias=bias,
                                         config=cfg, **extra)
            return out.loss, out.metrics

        loss, metrics = head_forward(model, mb_dev.input_ids, mb_dev.position_ids, head)
    (loss * grad_scale()).backward()  # FSDP averages over ranks; the loss is already global
    return loss.detach(), metrics


def _combine(per_mb: list[tuple[Tensor, dict[str, Tensor]]], grad_norm: Tensor) -> dict[str, float]:
    """Sum / token-weighted mean of micro-batch metrics over micro-batches and ranks, plus the
    (already global) grad norm, with one host sync."""
    keys = sorted(set().union(*(m.keys() for _, m in per_mb)) - {"tokens", "pg_loss", "sd_loss"})
    rows = []
    for loss, m in per_mb:
        tok = m["tokens"].double()
        row = [loss.double(), tok, m.get("pg_loss", tok * 0).double(), m.get("sd_loss", tok * 0).double()]
        row += [torch.nan_to_num(m[k].double()) * tok if k in m else tok * 0 for k in keys]
        rows.append(torch.stack([r.reshape(()).to(tok.device) for r in row]))
    total = all_reduce_sum(torch.stack(rows).sum(0))
    total = torch.cat([total, grad_norm.double().reshape(1).to(total.device)]).tolist()  # the sync
    out = {"loss": total[0], "tokens": total[1], "pg_loss": total[2], "sd_loss": total[3],
           "grad_norm": total[-1]}
    total = total[:-1]
    for k, v in zip(keys, total[4:]):
        out[k] = v / total[1] if total[1] > 0 else 0.0
    return out


def policy_update(model: Any, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], loss_config: Any,
                  max_tokens: int, grad_clip: float, ref_model: Any = None, scheduler: Any = None,
                  row_tokens: Optional[int] = None,
                  autocast_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """One optimizer step on ``samples`` (this rank's share); returns global metrics as floats.

    Fills missing old log-probs (on-policy: the current weights) and reference log-probs
    (``ref_model``); teacher log-probs must already be on the samples when the loss uses them.
    Full-vocabulary divergences (reverse_kl, forward_kl, jsd) also run the teacher stream
    (teacher_prompt_ids + response) through the current weights without grad per micro-batch;
    the gate still reads teacher log-probs, so those must be on the samples too.
    ``grad_clip`` <= 0 disables clipping (the norm is still reported). ``scheduler`` (optional)
    steps after the optimizer. ``autocast_dtype`` None means bf16 autocast on CUDA, none on CPU.
    """
    if not samples:
        raise ValueError("samples is empty; policy_update needs at least one sample on every rank")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 2")
    cfg = loss_config
    _ensure_scored(model, samples, cfg, max_tokens, ref_model, row_tokens)
    device = model_device(model)
    rows = default_row_tokens(model) if row_tokens is None else row_tokens
    micro = pack_for_ranks(model, samples, max_tokens, False, rows)
    z = global_normalizer(samples, cfg.agg, cfg.loss_scale_factor)
    normalizer = torch.tensor(z, dtype=torch.float32, device=device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with_ref = all(s.ref_logp is not None for s in samples)
    per_mb = [_micro_step(model, mb, samples, cfg, normalizer, with_ref, rows, device, autocast_dtype)
              for mb in micro]
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
