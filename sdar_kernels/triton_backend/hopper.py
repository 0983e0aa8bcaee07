"""Host side of the Hopper kernel variant (hopper_kernels.py): descriptors, grids, work lists.

Selected by `configs.kernel_variant` (env SDAR_TRITON_VARIANT=hopper). Outputs and split
partials have exactly the layout of the portable kernels, so `forward.reduce_splits` and the
backward's GEMMs are shared.

TMA: operands go to the kernels as host-side `TensorDescriptor`s when every operand has a
16-byte aligned base and row stride (always so for real models: H a multiple of 8 in 16-bit);
otherwise as plain tensors with USE_TMA=False (masked pointer loads, same kernels).

Block skipping (optional, env SDAR_TRITON_SKIP_EPS = eps > 0; default 0 = off, exact):
the forward then also stores zmax[i, j] = max of row i's logits over vocab tile j (fp32,
[N, cdiv(V, BV)], 4 N V / BV bytes), attached to the returned Stats. In the backward, for
rows without a divergence gradient, p_ij <= pb_ij = exp(zmax - lse + margin) on the tile, and

    |dL/dz_ij| <= (|g_logp_i| p_ij + |g_ent_i| p_ij (|log p_ij| + |H_i|)) / tau
               <= max(|g_logp_i|, |g_ent_i|) pb (1 + [g_ent_i != 0] (|log pb| + |H_i|)) / tau

(p |log p| is increasing for p < 1/e, and eps <= 1/4 keeps pb below that), unless the
target y_i lies in the tile (the -g_logp e_y term). A tile whose every row satisfies
pb (1 + ...) <= eps is dropped: no recompute, dL/dz stored as 0. Trade-off: every dropped
entry is at most eps * max(|g_logp_i|, |g_ent_i|) / tau in absolute value, i.e. eps relative
to the row's gradient scale (for eps <= 2^-9 below the bf16 rounding of the row's largest
entries, but the dropped entries are many: their sum in dL/dh and dL/dW is not bounded by
eps alone). The margin 2^-10 (1 + |zmax|) covers the recompute's rounding differences
(different tile shapes or K order than the forward). Off (eps = 0), and in any call with a
divergence gradient, with no zmax in the Stats (`linear_stats` carries it from its forward to
its backward), or zmax of another shape, nothing is dropped beyond the exact rule
below, and the result is the same mathematics as the portable kernels.

Work list (always): the backward kernel walks tile ids in grouped (L2-friendly) order, the
computed tiles first. Tiles of token blocks whose upstream gradients are all zero (prompt
tokens, masked rows) are exactly zero and are only stored, like the portable kernel's
inactive-tile shortcut but outside the pipelined loop.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ..stats import Stats, StatsSpec
from .configs import INTERPRET_PROGRAMS, TileConfig, choose_config, device_arch, skip_eps
from .forward import DIV_CODES, kernel_flags, launch_kwargs, reduce_splits, split_layout
from .forward_kernels import DIV_NONE, N_STATS
from .hopper_kernels import JSD_PASS2, dlogits_hopper_kernel, stats_fwd_hopper_kernel

# Stats attribute holding (zmax [N, cdiv(V, block)] fp32, block) when block skipping is on.
BLOCK_MAX_ATTR = "hopper_block_max"
# Relative slack on zmax for the recompute's rounding (logit units).
SKIP_MARGIN = 2.0 ** -10


def n_persistent_programs(device: torch.device, n_tiles: int) -> int:
    """Programs of a persistent launch: one per SM (GPU) or INTERPRET_PROGRAMS, at most n_tiles."""
    if device.type == "cuda":
        want = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        want = INTERPRET_PROGRAMS
    return max(1, min(want, n_tiles))


def tma_ok(tensors: Sequence[Tensor]) -> bool:
    """TMA needs 16-byte aligned bases and row strides and unit stride on the last dim."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def operands(hidden: Tensor, weight: Tensor, cfg: TileConfig) -> tuple[tuple, bool]:
    """((h_src, w_src), use_tma): TensorDescriptors of blocks [BN, BK] and [BV, BK], or the
    tensors themselves when one of them cannot be read by TMA."""
    if not tma_ok((hidden, weight)):
        return (hidden, weight), False
    return (TensorDescriptor.from_tensor(hidden, [cfg.block_n, cfg.block_k]),
            TensorDescriptor.from_tensor(weight, [cfg.block_v, cfg.block_k])), True


def _sources(hidden: Tensor, weight: Tensor, th: Tensor, tw: Tensor, cfg: TileConfig,
             grouped: bool) -> tuple[tuple, dict]:
    """(h_src, w_src, th_src, tw_src) and the constexpr flags of one launch."""
    (h_src, w_src), use_tma = operands(hidden, weight, cfg)
    if th is hidden and tw is weight:
        (th_src, tw_src), use_tma_t = (h_src, w_src), use_tma
    else:
        (th_src, tw_src), use_tma_t = operands(th, tw, cfg)
    flags = dict(kernel_flags(hidden, th.shape[1], cfg), USE_TMA=use_tma, USE_TMA_T=use_tma_t)
    if not grouped:
        flags.pop("GROUP_N")
    return (h_src, w_src, th_src, tw_src), flags


def stats_forward_hopper(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                         t_hidden: Optional[Tensor], t_weight: Optional[Tensor],
                         t_bias: Optional[Tensor], spec: StatsSpec) -> Stats:
    """The forward of `forward.stats_forward_triton` on the persistent kernel; outputs [N] fp32."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    div = DIV_CODES[spec.divergence]
    teacher = div != DIV_NONE
    th, tw = (t_hidden, t_weight) if teacher else (hidden, weight)
    h_t = th.shape[1]
    cfg = choose_config("fwd", max(h, h_t), hidden.dtype, has_teacher=teacher,
                        arch=device_arch(hidden.device), variant="hopper")
    save_zmax = skip_eps() > 0.0
    ld_zmax = triton.cdiv(vocab, cfg.block_v)
    zmax = (torch.empty((n, ld_zmax), device=hidden.device, dtype=torch.float32)
            if save_zmax else targets)
    part, z_y = _launch_forward(hidden, weight, bias, targets, th, tw, t_bias if teacher else None,
                                None, None, spec, div, cfg, zmax, ld_zmax, save_zmax)
    stats = reduce_splits(part, z_y, spec)
    if save_zmax:
        setattr(stats, BLOCK_MAX_ATTR, (zmax, cfg.block_v))
    if spec.divergence == "jsd":
        cfg2 = choose_config("jsd", max(h, h_t), hidden.dtype, arch=device_arch(hidden.device),
                             variant="hopper")
        part2, _ = _launch_forward(hidden, weight, bias, targets, th, tw, t_bias, stats.lse,
                                   stats.teacher_lse, spec, JSD_PASS2, cfg2, targets, 0, False)
        kl_pm, kl_qm = part2[0].sum(1), part2[1].sum(1)
        stats.div = spec.jsd_beta * kl_qm + (1.0 - spec.jsd_beta) * kl_pm
        stats.div_aux = kl_pm
    return stats


def _launch_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    th: Tensor, tw: Tensor, t_bias: Optional[Tensor], lse: Optional[Tensor],
                    t_lse: Optional[Tensor], spec: StatsSpec, div: int, cfg: TileConfig,
                    zmax: Tensor, ld_zmax: int, save_zmax: bool) -> tuple[Tensor, Tensor]:
    """One persistent forward launch; returns (part [6 or 2, N, S], z_y [N])."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    vps, n_splits = split_layout(n, vocab, cfg, hidden.device)
    n_planes = 2 if div == JSD_PASS2 else N_STATS
    part = torch.empty((n_planes, n, n_splits), device=hidden.device, dtype=torch.float32)
    # NaN until the split holding y writes it (an out-of-range target: NaN, never leftover memory)
    z_y = torch.full((n,), float("nan"), device=hidden.device, dtype=torch.float32)
    (h_src, w_src, th_src, tw_src), flags = _sources(hidden, weight, th, tw, cfg, grouped=True)
    n_progs = n_persistent_programs(hidden.device, triton.cdiv(n, cfg.block_n) * n_splits)
    stats_fwd_hopper_kernel[(n_progs,)](
        h_src, w_src, th_src, tw_src, bias if bias is not None else hidden,
        t_bias if t_bias is not None else th, targets, lse if lse is not None else z_y,
        t_lse if t_lse is not None else z_y, part, z_y, zmax,
        n, vocab, h, th.shape[1], n * n_splits, n_splits, hidden.stride(0), weight.stride(0),
        th.stride(0), tw.stride(0), vps, ld_zmax, n_progs, 1.0 / spec.temperature,
        float(spec.jsd_beta),
        BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, HAS_BIAS=bias is not None,
        HAS_TBIAS=t_bias is not None, WITH_ENT=spec.with_entropy and div != JSD_PASS2, DIV=div,
        SAVE_ZMAX=save_zmax, **flags, **launch_kwargs(cfg))
    return part, z_y


def grouped_order(n_tok: int, n_vt: int, group_n: int, device: torch.device) -> Tensor:
    """Tile ids (token tile * n_vt + vocab tile) in the grouped order of tiles.grouped_coords."""
    q = torch.arange(n_tok * n_vt, device=device)
    per_group = group_n * n_vt
    first = (q // per_group) * group_n
    size = torch.clamp(n_tok - first, max=group_n)
    local = q % per_group
    return (first + local % size) * n_vt + local // size


def _active_rows(n: int, grads: Sequence[Optional[Tensor]], device: torch.device) -> Tensor:
    """[N] bool: rows with a non-zero upstream gradient."""
    active = torch.zeros(n, dtype=torch.bool, device=device)
    for g in grads:
        if g is not None:
            active |= g != 0
    return active


def _pad_rows(x: Tensor, rows: int, value: bool) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = torch.full((rows - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def skippable_tiles(stats: Stats, targets: Tensor, g_logp: Optional[Tensor],
                    g_entropy: Optional[Tensor], v0: int, v1: int, cfg: TileConfig,
                    eps: float) -> Optional[Tensor]:
    """[cdiv(N, BN), cdiv(v1 - v0, BV)] bool: tiles the bound proves below eps (module doc),
    or None when no usable zmax is attached to `stats`."""
    saved = getattr(stats, BLOCK_MAX_ATTR, None)
    n = stats.lse.shape[0]
    bn, bv = cfg.block_n, cfg.block_v
    if saved is None:
        return None
    zmax, zb = saved
    if zmax.shape[0] != n or triton.cdiv(v1, zb) > zmax.shape[1]:
        return None
    z_lo, z_hi = v0 // zb, triton.cdiv(v1, zb)
    block = zmax[:, z_lo:z_hi]
    log_pb = block - stats.lse[:, None] + SKIP_MARGIN * (1.0 + block.abs())
    factor = torch.ones_like(log_pb)
    if g_entropy is not None and stats.entropy is not None:
        ent_on = (g_entropy != 0)[:, None]
        factor = factor + ent_on * (log_pb.abs() + stats.entropy.abs()[:, None])
    ok = log_pb.exp() * factor <= eps
    ok |= ~_active_rows(n, (g_logp, g_entropy), ok.device)[:, None]
    n_vt = triton.cdiv(v1 - v0, bv)
    if zb >= bv:  # each backward tile lies in one zmax block
        idx = (v0 + torch.arange(n_vt, device=ok.device) * bv) // zb - z_lo
        ok = ok[:, idx]
    else:  # each backward tile spans bv // zb zmax blocks (v0 is a multiple of bv)
        r = bv // zb
        pad = n_vt * r - ok.shape[1]
        if pad:
            ok = torch.cat([ok, ok.new_ones((n, pad))], 1)
        ok = ok.view(n, n_vt, r).all(2)
    n_tok = triton.cdiv(n, bn)
    skip = _pad_rows(ok, n_tok * bn, True).view(n_tok, bn, n_vt).all(1)
    if g_logp is not None:  # a tile holding an active row's target keeps its -g e_y term
        rows = torch.arange(n, device=ok.device)
        hit = (g_logp != 0) & (targets >= v0) & (targets < v1)
        tile = torch.where(hit, (rows // bn) * n_vt + (targets - v0) // bv, n_tok * n_vt)
        holds = torch.zeros(n_tok * n_vt + 1, dtype=torch.bool, device=ok.device)
        holds.scatter_(0, tile, True)  # no boolean indexing: no host synchronisation
        skip &= ~holds[:-1].view(n_tok, n_vt)
    return skip


def work_list(n: int, v0: int, v1: int, cfg: TileConfig, active_rows: Tensor,
              skip: Optional[Tensor]) -> Tensor:
    """int32 [1 + T]: [n_active, tile ids...], the tiles to compute first (grouped order),
    then the dropped ones. No host synchronisation."""
    n_tok = triton.cdiv(n, cfg.block_n)
    n_vt = triton.cdiv(v1 - v0, cfg.block_v)
    tok_active = _pad_rows(active_rows, n_tok * cfg.block_n, False).view(n_tok, cfg.block_n).any(1)
    keep = tok_active[:, None].expand(n_tok, n_vt)
    if skip is not None:
        keep = keep & ~skip
    order = grouped_order(n_tok, n_vt, cfg.group_n, active_rows.device)
    keep_o = keep.reshape(-1)[order]
    ranked = order[torch.argsort((~keep_o).to(torch.int8), stable=True)]
    work = torch.empty(1 + n_tok * n_vt, dtype=torch.int32, device=active_rows.device)
    work[0] = keep_o.sum()
    work[1:] = ranked
    return work


def dlogits_hopper(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   th: Tensor, tw: Tensor, t_bias: Optional[Tensor], spec: StatsSpec,
                   stats: Stats, g_logp: Optional[Tensor], g_entropy: Optional[Tensor],
                   g_div: Optional[Tensor], div: int, dz: Tensor, dbp: Optional[Tensor],
                   v0: int, v1: int, cfg: TileConfig) -> None:
    """Fill dz [N, v1 - v0] (and dbp [cdiv(N, BN), v1 - v0] fp32 when given) for one chunk,
    as `backward_kernels.dlogits_kernel` does. div: divergence code, 0 without g_div."""
    n, h = hidden.shape
    active = _active_rows(n, (g_logp, g_entropy, g_div if div else None), hidden.device)
    eps = skip_eps()
    skip = None
    if eps > 0.0 and not div:
        skip = skippable_tiles(stats, targets, g_logp, g_entropy, v0, v1, cfg, eps)
    work = work_list(n, v0, v1, cfg, active, skip)
    (h_src, w_src, th_src, tw_src), flags = _sources(hidden, weight, th, tw, cfg, grouped=False)
    n_tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(v1 - v0, cfg.block_v)
    n_progs = n_persistent_programs(hidden.device, n_tiles)
    ph = stats.lse
    or_ph = lambda t: t if t is not None else ph  # noqa: E731
    dlogits_hopper_kernel[(n_progs,)](
        h_src, w_src, th_src, tw_src, bias if bias is not None else hidden,
        t_bias if t_bias is not None else th, targets, stats.lse, or_ph(stats.entropy),
        or_ph(stats.teacher_lse), or_ph(stats.div_aux), or_ph(g_logp), or_ph(g_entropy),
        or_ph(g_div), dz, dbp if dbp is not None else ph, work,
        n, weight.shape[0], v0, v1, h, th.shape[1], hidden.stride(0), weight.stride(0),
        th.stride(0), tw.stride(0), v1 - v0, n_progs, 1.0 / spec.temperature,
        float(spec.jsd_beta),
        BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, HAS_GL=g_logp is not None,
        HAS_GE=g_entropy is not None, HAS_GD=bool(div), DIV=div, HAS_BIAS=bias is not None,
        HAS_TBIAS=t_bias is not None and bool(div), WRITE_DB=dbp is not None,
        **flags, **launch_kwargs(cfg))
