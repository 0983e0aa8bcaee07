"""The differentiable per-token statistics op: dispatch, input checks, masked-token compaction.

``linear_stats`` maps (hidden, lm_head, targets[, teacher]) to per-token (logp, entropy, div)
through one ``torch.autograd.Function`` whose forward and backward call a backend of the
sdar_kernels/stats.py contract. Upstream gradients arrive per token, so any O(N) loss composed on top
(the SDAR epilogue, a user's own) gets exact dL/dh and dL/dW (no grad-in-forward shortcut that
would ignore a per-token grad_output, cf. Liger PR #1298).
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .input_checks import check_values
from .stats import DIVERGENCES, Stats, StatsSpec

_STATS_FIELDS = frozenset(f.name for f in dataclasses.fields(Stats))
_BACKEND_MODULES = {"torch": "sdar_kernels.chunked", "triton": "sdar_kernels.triton_backend"}


class TokenStats(NamedTuple):
    """Per-token outputs, each [N] in the accumulation dtype; None where not requested."""

    logp: Tensor
    entropy: Optional[Tensor]
    div: Optional[Tensor]


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module(_BACKEND_MODULES["triton"])
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' is Triton on CUDA tensors when importable, the chunked PyTorch backend elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the `triton` package and sdar_kernels.triton_backend; "
                         "install triton or use backend='torch'")
    return name


def _module(name: str) -> ModuleType:
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend={name!r} has no statistics kernel; valid: {', '.join(_BACKEND_MODULES)}")
    return importlib.import_module(_BACKEND_MODULES[name])


class _LinearStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_hidden, t_weight, t_bias, spec, backend):
        mod = _module(backend)
        stats = mod.stats_forward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, spec)
        ctx.spec, ctx.backend = spec, backend
        empty = stats.logp.new_zeros(0)
        ent = stats.entropy if stats.entropy is not None else empty
        div = stats.div if stats.div is not None else empty
        # Outputs go through save_for_backward (not attributes on ctx) to avoid reference cycles.
        ctx.save_for_backward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias,
                              stats.lse, stats.entropy, stats.teacher_lse, stats.div_aux)
        ctx.set_materialize_grads(False)
        # Optional per-(row, vocab tile) logit maxima a backend keeps for block skipping
        # (triton_backend.hopper, SDAR_TRITON_SKIP_EPS > 0): carried to the backward as they are.
        ctx.extras = {k: v for k, v in vars(stats).items() if k not in _STATS_FIELDS}
        for t in (ent, div):
            if t.numel() == 0:
                ctx.mark_non_differentiable(t)
        return stats.logp, ent, div

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_div):
        hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse, ent, tlse, aux = ctx.saved_tensors
        need = ctx.needs_input_grad
        # logp itself is not needed by any backward; lse stands in for it.
        stats = Stats(logp=lse, lse=lse, entropy=ent, teacher_lse=tlse, div_aux=aux)
        for k, v in ctx.extras.items():
            setattr(stats, k, v)
        g_ent = g_ent if ent is not None else None
        g_div = g_div if tlse is not None else None
        d_h, d_w, d_b = _module(ctx.backend).stats_backward(
            hidden, weight, bias, targets, t_hidden, t_weight, t_bias, ctx.spec, stats,
            g_logp, g_ent, g_div, need[0], need[1], bias is not None and need[2],
        )
        return d_h, d_w, d_b, None, None, None, None, None, None


def _validate(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, spec: StatsSpec) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H]; got shape {tuple(hidden.shape)} (flatten batch and time first)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]}; got shape {tuple(weight.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden/weight must be floating point; got {hidden.dtype}/{weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V]={weight.shape[0]}; got shape {tuple(bias.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 [N]={hidden.shape[0]}; got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if spec.divergence not in DIVERGENCES:
        raise ValueError(f"divergence={spec.divergence!r} is invalid; valid choices: {', '.join(DIVERGENCES)}")
    if spec.divergence != "none":
        if t_hidden is None or t_weight is None:
            raise ValueError(f"divergence={spec.divergence!r} needs teacher_hidden and teacher_weight")
        if t_hidden.shape[0] != hidden.shape[0] or t_weight.shape != (weight.shape[0], t_hidden.shape[1]):
            raise ValueError(f"teacher_hidden must be [N={hidden.shape[0]}, H_T] and teacher_weight "
                             f"[V={weight.shape[0]}, H_T]; got {tuple(t_hidden.shape)} and {tuple(t_weight.shape)}")


def linear_stats(hidden: Tensor, weight: Tensor, targets: Tensor, spec: StatsSpec, *,
                 bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                 teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                 teacher_bias: Optional[Tensor] = None, backend: str = "auto",
                 check_inputs: bool = True) -> TokenStats:
    """Differentiable per-token statistics of the logits (W h + b) / tau without [N, V] logits.

    hidden [N, H], weight [V, H], targets [N] int64 in [0, V), mask [N] (optional: tokens where it
    is 0 are compacted away and get 0 in every output, at the cost of one host sync). The teacher
    inputs are needed only for a full-vocabulary divergence; the teacher never gets a gradient.
    Returns TokenStats of [N] tensors in fp32 (fp64 for fp64 inputs). check_inputs: raise a
    ValueError naming the token when a hidden row (teacher row) the pass reads is non-finite or
    a target id lies outside [0, V) there (one host sync; sdar_kernels/input_checks.py).
    """
    _validate(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec)
    if mask is not None and mask.shape != (hidden.shape[0],):
        raise ValueError(f"mask must be [N]={hidden.shape[0]}; got shape {tuple(mask.shape)}")
    if check_inputs:
        check_values(mask, weight.shape[0], targets, {"hidden": hidden, "teacher_hidden": teacher_hidden},
                     {"weight": weight, "teacher_weight": teacher_weight})
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        name = "torch"  # the reference path is a whole-loss oracle; stats use the chunked kernel
    t_hidden = teacher_hidden.detach() if teacher_hidden is not None else None
    t_weight = teacher_weight.detach() if teacher_weight is not None else None
    t_bias = teacher_bias.detach() if teacher_bias is not None else None
    n = hidden.shape[0]
    index = None
    if mask is not None:
        index = (mask != 0).nonzero().squeeze(1)
        if index.numel() == n:
            index = None
    if index is not None:
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
        if t_hidden is not None:
            t_hidden = t_hidden.index_select(0, index)
    logp, ent, div = _LinearStatsFn.apply(hidden, weight, bias, targets.long(), t_hidden, t_weight,
                                          t_bias, spec, name)
    ent = ent if spec.with_entropy else None
    div = div if spec.divergence != "none" else None
    if index is not None:
        logp, ent, div = (None if x is None else x.new_zeros(n).index_copy(0, index, x) for x in (logp, ent, div))
    return TokenStats(logp, ent, div)
