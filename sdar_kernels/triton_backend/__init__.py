"""Triton statistics backend (sdar_kernels/stats.py contract): fused lm_head + softmax statistics.

``stats_forward`` / ``stats_backward`` have exactly the signatures of ``StatsBackend``.
fp32 / bf16 / fp16 inputs run the Triton kernels (fp32 dot in IEEE precision, never TF32);
fp64 inputs fall back to the chunked PyTorch backend (``sdar_kernels.chunked``), which keeps
fp64 accumulation. CPU tensors need ``TRITON_INTERPRET=1`` (tests); otherwise use CUDA.

DETERMINISTIC: the backward writes dL/dz chunks and reduces them with GEMMs and plain
column sums, never atomics, so both passes are bitwise reproducible. The flag is kept
(env SDAR_TRITON_DETERMINISTIC) for callers that assert it; setting it to 0 changes
nothing today because no atomic fast path is shipped.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from ..stats import Stats, StatsSpec
from .backward import stats_backward_triton
from .checks import check_inputs, rowmajor
from .forward import stats_forward_triton

DETERMINISTIC: bool = os.environ.get("SDAR_TRITON_DETERMINISTIC", "1") != "0"

__all__ = ["stats_forward", "stats_backward", "DETERMINISTIC"]


def _torch_backend():
    from .. import chunked  # lazy: only fp64 inputs need it
    return chunked


def _on_device(t: Tensor):
    """Launch on the tensors' GPU, not on whatever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _empty_stats(hidden: Tensor, spec: StatsSpec) -> Stats:
    z = hidden.new_zeros(0, dtype=torch.float32)
    teacher = spec.divergence != "none"
    return Stats(logp=z, lse=z.clone(), entropy=z.clone() if spec.with_entropy else None,
                 div=z.clone() if teacher else None, teacher_lse=z.clone() if teacher else None,
                 div_aux=z.clone() if spec.divergence in ("reverse_kl", "jsd") else None)


def stats_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                  teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                  teacher_bias: Optional[Tensor], spec: StatsSpec) -> Stats:
    """Per-token Stats ([N] fp32; fp64 for fp64 input) of z = (W h + b) / tau; see stats.py."""
    check_inputs(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec)
    if hidden.dtype == torch.float64:
        return _torch_backend().stats_forward(hidden, weight, bias, targets, teacher_hidden,
                                              teacher_weight, teacher_bias, spec)
    if hidden.shape[0] == 0:
        return _empty_stats(hidden, spec)
    teacher = spec.divergence != "none"
    with _on_device(hidden):
        return stats_forward_triton(
            rowmajor(hidden), rowmajor(weight), rowmajor(bias), rowmajor(targets),
            rowmajor(teacher_hidden) if teacher else None,
            rowmajor(teacher_weight) if teacher else None,
            rowmajor(teacher_bias) if teacher else None, spec)


def stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                   teacher_bias: Optional[Tensor], spec: StatsSpec, stats: Stats,
                   g_logp: Optional[Tensor], g_entropy: Optional[Tensor], g_div: Optional[Tensor],
                   need_hidden: bool, need_weight: bool,
                   need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dL/dh [N, H], dL/dW [V, H], dL/db [V]) in the input dtypes; None where not requested."""
    check_inputs(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec)
    if need_bias and bias is None:
        raise ValueError("need_bias=True with bias=None: there is no bias to differentiate")
    if spec.divergence == "none":
        g_div = None
    if hidden.dtype == torch.float64:
        return _torch_backend().stats_backward(
            hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, spec,
            stats, g_logp, g_entropy, g_div, need_hidden, need_weight, need_bias)
    if hidden.shape[0] == 0 or not (need_hidden or need_weight or need_bias):
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    grads = [None if g is None else rowmajor(g.float()) for g in (g_logp, g_entropy, g_div)]
    with _on_device(hidden):
        return stats_backward_triton(
            rowmajor(hidden), rowmajor(weight), rowmajor(bias), rowmajor(targets),
            rowmajor(teacher_hidden), rowmajor(teacher_weight), rowmajor(teacher_bias), spec,
            stats, *grads, need_hidden, need_weight, need_bias)
