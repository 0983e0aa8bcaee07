"""Host side of the Triton backward: dlogits chunks from Triton, dL/dh and dL/dW from GEMMs.

The vocabulary is cut into chunks whose [N, chunk] dL/dz scratch fits SCRATCH_BYTES. Per
chunk: one `dlogits_kernel` launch, then dh += dz @ W[chunk] (fp32 accumulation across
chunks), dW[chunk] = dz^T @ h (one GEMM over all N, fp32 accumulation inside), and
db[chunk] = column sums of the kernel's fp32 per-tile partials. No atomics anywhere:
the result is bitwise reproducible run to run (the DETERMINISTIC mode is the only mode).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ..gemm import addmm_f32_
from ..stats import Stats, StatsSpec
from .backward_kernels import dlogits_kernel
from .configs import choose_config, device_arch, kernel_variant
from .forward import DIV_CODES, kernel_flags, launch_kwargs

# Upper bound on the dL/dz scratch (bytes); env SDAR_TRITON_SCRATCH_MB overrides.
SCRATCH_BYTES = int(os.environ.get("SDAR_TRITON_SCRATCH_MB", "1024")) * (1 << 20)


def chunk_width(n_tokens: int, vocab: int, elem_bytes: int, block_v: int) -> int:
    """Vocab columns per backward chunk: a multiple of block_v within SCRATCH_BYTES."""
    fit = SCRATCH_BYTES // max(1, n_tokens * elem_bytes)
    width = max(block_v, fit // block_v * block_v)
    return min(width, triton.cdiv(vocab, block_v) * block_v)


def _scratch(numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A flat dL/dz scratch buffer, viewed per vocab chunk as a *contiguous* [rows, chunk] tensor.

    No GEMM operand is a strided view with padding columns, and on the CPU the buffer starts
    zeroed: the CPU bf16 matmul was seen to read past a view's columns (and a last row may read
    past its end), so stale NaNs in a torch.empty buffer reached dL/dh in ~1 call in 5, depending
    on leftover memory (issue #10). cuBLAS reads only the view, so CUDA skips the memset.
    """
    if device.type == "cuda":
        return torch.empty(numel, device=device, dtype=dtype)
    return torch.zeros(numel, device=device, dtype=dtype)


def stats_backward_triton(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          t_hidden: Optional[Tensor], t_weight: Optional[Tensor],
                          t_bias: Optional[Tensor], spec: StatsSpec, stats: Stats,
                          g_logp: Optional[Tensor], g_entropy: Optional[Tensor],
                          g_div: Optional[Tensor], need_hidden: bool, need_weight: bool,
                          need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dL/dh [N, H] hidden.dtype, dL/dW [V, H] weight.dtype, dL/db [V] bias.dtype)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    div = DIV_CODES[spec.divergence] if g_div is not None else 0
    if div and stats.teacher_lse is None:
        raise ValueError("stats.teacher_lse=None: the divergence gradient needs the teacher LSE "
                         "from stats_forward")
    if g_entropy is not None and stats.entropy is None:
        raise ValueError("stats.entropy=None: g_entropy was given but the forward ran without "
                         "with_entropy")
    th, tw = (t_hidden, t_weight) if div else (hidden, weight)
    variant = kernel_variant(hidden.device)
    cfg = choose_config("bwd", max(h, th.shape[1]), hidden.dtype, has_teacher=bool(div),
                        arch=device_arch(hidden.device), variant=variant)
    width = chunk_width(n, vocab, hidden.element_size(), cfg.block_v)
    n_tok = triton.cdiv(n, cfg.block_n)
    scratch = _scratch(n * width, hidden.device, hidden.dtype)
    dbp = _scratch(n_tok * width, hidden.device, torch.float32) if need_bias else scratch
    single = width >= vocab  # one chunk: dL/dh is one GEMM over all of V, no fp32 buffer
    dh = torch.zeros((n, h), device=hidden.device, dtype=torch.float32) if need_hidden and not single else None
    dw = torch.empty_like(weight) if need_weight else None
    db = torch.empty(vocab, device=hidden.device, dtype=torch.float32) if need_bias else None
    placeholder = stats.lse
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        cw = v1 - v0
        dz = scratch[: n * cw].view(n, cw)
        if variant == "hopper":
            from .hopper import dlogits_hopper  # lazy: hopper.py imports forward.py
            dlogits_hopper(hidden, weight, bias, targets, th, tw, t_bias if div else None, spec,
                           stats, g_logp, g_entropy, g_div if div else None, div, dz,
                           dbp[: n_tok * cw].view(n_tok, cw) if need_bias else None, v0, v1, cfg)
        else:
            dlogits_kernel[(n_tok * triton.cdiv(v1 - v0, cfg.block_v),)](
                hidden, weight, bias if bias is not None else hidden, targets, th, tw,
                t_bias if (t_bias is not None and div) else th, stats.lse,
                _or(stats.entropy, placeholder), _or(stats.teacher_lse, placeholder),
                _or(stats.div_aux, placeholder), _or(g_logp, placeholder),
                _or(g_entropy, placeholder), _or(g_div, placeholder), dz, dbp,
                n, v0, v1, h, th.shape[1], hidden.stride(0), weight.stride(0), th.stride(0),
                tw.stride(0), cw, 1.0 / spec.temperature, float(spec.jsd_beta),
                BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, HAS_GL=g_logp is not None,
                HAS_GE=g_entropy is not None, HAS_GD=bool(div), DIV=div, HAS_BIAS=bias is not None,
                HAS_TBIAS=t_bias is not None and bool(div), WRITE_DB=need_bias,
                **kernel_flags(hidden, th.shape[1], cfg), **launch_kwargs(cfg))
        if need_hidden and single:
            dh = torch.mm(dz, weight)
        elif need_hidden:
            addmm_f32_(dh, dz, weight[v0:v1])
        if need_weight:
            torch.mm(dz.t(), hidden, out=dw[v0:v1])
        if need_bias:
            db[v0:v1] = dbp[: n_tok * cw].view(n_tok, cw).sum(0)
    return (dh.to(hidden.dtype) if need_hidden else None, dw,
            db.to(bias.dtype) if need_bias else None)


def _or(t: Optional[Tensor], default: Tensor) -> Tensor:
    return t if t is not None else default
