"""Backward Triton kernel: recompute logit tiles and write dL/dz (already divided by tau).

For one vocab chunk [v_lo, v_hi) a program per (token tile x vocab tile) recomputes the
student tile (and the teacher tile when the divergence gradient needs q), forms in fp32

    dL/dz = g_logp (e_y - p) - g_ent p (log p + H) + g_div dD/dz        (sdar_kernels/stats.py)

and stores it, cast to the GEMM dtype, into a bounded [N, chunk] scratch that cuBLAS turns
into dL/dh and dL/dW. Per token-tile column sums of dL/dz (fp32) feed dL/db. Nothing is
accumulated with atomics, so the result is bitwise reproducible. Token tiles whose upstream
gradients are all zero skip the recompute and store zeros.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .forward_kernels import jsd_terms
from .tiles import NEG_BIG, grouped_tile, logit_tile, to_store_dtype


@triton.jit
def _load_row(ptr, rows, row_ok, PRESENT: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        return tl.zeros(rows.shape, tl.float32)


@triton.jit
def tile_dlogits(z, zt, cols, col_ok, rows, row_ok, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr,
                 gl_ptr, ge_ptr, gd_ptr, inv_tau, beta, HAS_GL: tl.constexpr, HAS_GE: tl.constexpr,
                 HAS_GD: tl.constexpr, DIV: tl.constexpr):
    """dL/dz / tau [BN, BV] fp32 of one recomputed tile, 0 outside the rows and columns (the
    formula of the module doc). Shared by the portable and Hopper backward kernels."""
    g_l = _load_row(gl_ptr, rows, row_ok, HAS_GL)
    # Finite stand-in for -inf outside V: p = 0 there and no inf - inf NaNs.
    z = tl.where(col_ok[None, :], z, NEG_BIG)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    dz = tl.where(cols[None, :] == y[:, None], g_l[:, None], 0.0) - p * g_l[:, None]
    if HAS_GE:
        g_e = _load_row(ge_ptr, rows, row_ok, HAS_GE)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_e[:, None] * p * (logp + ent[:, None])
    if HAS_GD and DIV != 0:
        g_d = _load_row(gd_ptr, rows, row_ok, HAS_GD)
        zt = tl.where(col_ok[None, :], zt, NEG_BIG)
        tlse = tl.load(tlse_ptr + rows, mask=row_ok, other=0.0)
        if DIV == 1:  # reverse KL(p||q): aux = KL(p||q)
            aux = tl.load(aux_ptr + rows, mask=row_ok, other=0.0)
            dz += g_d[:, None] * p * (logp - (zt - tlse[:, None]) - aux[:, None])
        if DIV == 2:  # forward KL(q||p)
            dz += g_d[:, None] * (p - tl.exp(zt - tlse[:, None]))
        if DIV == 3:  # jsd: aux = KL(p||M)
            aux = tl.load(aux_ptr + rows, mask=row_ok, other=0.0)
            lp, lq, log_m, p2, q = jsd_terms(z, zt, lse, tlse, beta)
            dz += (g_d * (1.0 - beta))[:, None] * p * (lp - log_m - aux[:, None])
    return tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_tau, 0.0)


@triton.jit
def dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, th_ptr, tw_ptr, tb_ptr,
                   lse_ptr, ent_ptr, tlse_ptr, aux_ptr, gl_ptr, ge_ptr, gd_ptr,
                   dz_ptr, dbp_ptr,
                   N, v_lo, v_hi, H, HT, stride_h, stride_w, stride_th, stride_tw, ld_dz,
                   inv_tau, beta,
                   BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                   HAS_GL: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
                   DIV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                   WRITE_DB: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KT: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr):
    pid_n, pid_v = grouped_tile(tl.cdiv(N, BN), tl.cdiv(v_hi - v_lo, BV), GROUP_N)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = v_lo + pid_v * BV + tl.arange(0, BV)
    col_ok = cols < v_hi
    g_l = _load_row(gl_ptr, rows, row_ok, HAS_GL)
    g_e = _load_row(ge_ptr, rows, row_ok, HAS_GE)
    g_d = _load_row(gd_ptr, rows, row_ok, HAS_GD)
    active = ((g_l != 0.0) | (g_e != 0.0) | (g_d != 0.0)) & row_ok
    dz = tl.zeros((BN, BV), tl.float32)
    if tl.max(active.to(tl.int32), 0) > 0:
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, v_hi, H, stride_h, stride_w, inv_tau,
                       BN, BV, BK, HAS_BIAS, EVEN_K, IEEE, UPCAST)
        zt = z
        if HAS_GD and DIV != 0:
            zt = logit_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, N, v_hi, HT, stride_th,
                            stride_tw, inv_tau, BN, BV, BK, HAS_TBIAS, EVEN_KT, IEEE, UPCAST)
        dz = tile_dlogits(z, zt, cols, col_ok, rows, row_ok, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr,
                          gl_ptr, ge_ptr, gd_ptr, inv_tau, beta, HAS_GL, HAS_GE, HAS_GD, DIV)
    local = cols - v_lo
    ptrs = dz_ptr + rows[:, None].to(tl.int64) * ld_dz + local[None, :]
    tl.store(ptrs, to_store_dtype(dz, dz_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])
    if WRITE_DB:
        tl.store(dbp_ptr + pid_n * ld_dz + local, tl.sum(dz, 0), mask=col_ok)
