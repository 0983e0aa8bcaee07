"""Host side of the Triton forward: launch the split kernels, reduce the split partials.

Grid: (token tiles, vocab splits). Each program leaves fp32 partials in a [6, N, S]
buffer; `reduce_splits` merges them with plain torch reductions over S (deterministic,
no locks). JSD runs a second pass once both LSEs are known.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..stats import Stats, StatsSpec
from .configs import TileConfig, choose_config, device_arch, interpreting, kernel_variant
from .forward_kernels import (DIV_FORWARD, DIV_NONE, DIV_REVERSE, DIV_TEACHER_LSE, N_STATS,
                              jsd_fwd_kernel, stats_fwd_kernel)

DIV_CODES = {"none": DIV_NONE, "reverse_kl": DIV_REVERSE, "forward_kl": DIV_FORWARD,
             "jsd": DIV_TEACHER_LSE}


def n_programs_target(device: torch.device) -> int:
    """How many programs a grid should have to fill the GPU (a few waves of SMs)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def split_layout(n_tokens: int, vocab: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(vocab_per_split, n_splits): enough splits to fill the GPU, each a multiple of block_v."""
    if cfg.vocab_per_split:
        vps = cfg.vocab_per_split
    else:
        n_tok = triton.cdiv(n_tokens, cfg.block_n)
        want = max(1, min(triton.cdiv(n_programs_target(device), n_tok), triton.cdiv(vocab, cfg.block_v)))
        vps = triton.cdiv(triton.cdiv(vocab, want), cfg.block_v) * cfg.block_v
    return vps, triton.cdiv(vocab, vps)


def _teacher_args(spec: StatsSpec, t_hidden: Optional[Tensor], t_weight: Optional[Tensor],
                  hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, int]:
    if spec.divergence == "none":
        return hidden, weight, hidden.shape[1]  # placeholders, never read (DIV == 0)
    return t_hidden, t_weight, t_hidden.shape[1]


def kernel_flags(hidden: Tensor, h_t: int, cfg: TileConfig) -> dict:
    """Constexpr flags shared by every launch: ragged-K masks and the fp32 dot precision."""
    upcast = interpreting() and hidden.dtype != torch.float32
    return dict(EVEN_K=hidden.shape[1] % cfg.block_k == 0, EVEN_KT=h_t % cfg.block_k == 0,
                IEEE=hidden.dtype == torch.float32 or upcast, UPCAST=upcast, GROUP_N=cfg.group_n)


def launch_kwargs(cfg: TileConfig) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def stats_forward_triton(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                         t_hidden: Optional[Tensor], t_weight: Optional[Tensor],
                         t_bias: Optional[Tensor], spec: StatsSpec) -> Stats:
    """The Triton forward for fp32/bf16/fp16 inputs; all outputs [N] fp32."""
    if kernel_variant(hidden.device) == "hopper":
        from .hopper import stats_forward_hopper  # lazy: hopper.py imports this module
        return stats_forward_hopper(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, spec)
    n, h = hidden.shape
    vocab = weight.shape[0]
    div = DIV_CODES[spec.divergence]
    th, tw, h_t = _teacher_args(spec, t_hidden, t_weight, hidden, weight)
    cfg = choose_config("fwd", max(h, h_t), hidden.dtype, has_teacher=div != DIV_NONE,
                        arch=device_arch(hidden.device))
    vps, n_splits = split_layout(n, vocab, cfg, hidden.device)
    part = torch.empty((N_STATS, n, n_splits), device=hidden.device, dtype=torch.float32)
    # NaN until the split holding y writes it: a target outside [0, V) that slipped past the
    # input checks shows as a NaN log-prob, never as leftover memory.
    z_y = torch.full((n,), float("nan"), device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n) * n_splits,)
    stats_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        th, tw, t_bias if t_bias is not None else th, part, z_y,
        n, vocab, h, h_t, n * n_splits, n_splits, hidden.stride(0), weight.stride(0), th.stride(0),
        tw.stride(0), vps, 1.0 / spec.temperature,
        BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, HAS_BIAS=bias is not None,
        HAS_TBIAS=t_bias is not None, WITH_ENT=spec.with_entropy, DIV=div,
        **kernel_flags(hidden, h_t, cfg), **launch_kwargs(cfg))
    stats = reduce_splits(part, z_y, spec)
    if spec.divergence == "jsd":
        _jsd_pass(hidden, weight, bias, th, tw, t_bias, spec, stats)
    return stats


def reduce_splits(part: Tensor, z_y: Tensor, spec: StatsSpec) -> Stats:
    """Merge [6, N, S] split partials (max, rescaled sums) into per-token Stats."""
    m, s = part[0], part[1]
    big_m = m.amax(dim=1, keepdim=True)
    w = torch.exp(m - big_m)
    total = (s * w).sum(1)
    log_total = torch.log(total)
    lse = big_m.squeeze(1) + log_total
    stats = Stats(logp=z_y - lse, lse=lse)
    shift = m - big_m
    if spec.with_entropy:
        a = (w * (part[2] + shift * s)).sum(1)
        stats.entropy = log_total - a / total
    if spec.divergence == "none":
        return stats
    mt, st = part[3], part[4]
    big_mt = mt.amax(dim=1, keepdim=True)
    wt = torch.exp(mt - big_mt)
    total_t = (st * wt).sum(1)
    log_total_t = torch.log(total_t)
    stats.teacher_lse = big_mt.squeeze(1) + log_total_t
    shift_t = mt - big_mt
    if spec.divergence == "reverse_kl":
        acc = (w * (part[5] + (shift - shift_t) * s)).sum(1)
        stats.div = acc / total - log_total + log_total_t
        stats.div_aux = stats.div
    elif spec.divergence == "forward_kl":
        acc = (wt * (part[5] + (shift_t - shift) * st)).sum(1)
        stats.div = acc / total_t - log_total_t + log_total
    return stats


def _jsd_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], th: Tensor, tw: Tensor,
              t_bias: Optional[Tensor], spec: StatsSpec, stats: Stats) -> None:
    """Second pass: KL(p||M) and KL(q||M) from the known LSEs; fills div and div_aux."""
    n, h = hidden.shape
    vocab, h_t = weight.shape[0], th.shape[1]
    cfg = choose_config("jsd", max(h, h_t), hidden.dtype, arch=device_arch(hidden.device))
    vps, n_splits = split_layout(n, vocab, cfg, hidden.device)
    part = torch.empty((2, n, n_splits), device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n) * n_splits,)
    jsd_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, th, tw,
        t_bias if t_bias is not None else th, stats.lse, stats.teacher_lse, part,
        n, vocab, h, h_t, n * n_splits, n_splits, hidden.stride(0), weight.stride(0), th.stride(0),
        tw.stride(0), vps, 1.0 / spec.temperature, float(spec.jsd_beta),
        BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, HAS_BIAS=bias is not None,
        HAS_TBIAS=t_bias is not None, **kernel_flags(hidden, h_t, cfg), **launch_kwargs(cfg))
    kl_pm, kl_qm = part[0].sum(1), part[1].sum(1)
    stats.div = spec.jsd_beta * kl_qm + (1.0 - spec.jsd_beta) * kl_pm
    stats.div_aux = kl_pm
