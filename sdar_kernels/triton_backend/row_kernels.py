"""Row kernels of the 3-pass (gradient-in-forward) path: statistics and dL/dz of whole logit rows.

The logits of a token chunk are already materialized by cuBLAS as an fp32 [C, V] buffer `raw`
(h W^T, no bias, no temperature); every program owns one row and walks it in BV-wide blocks.
Both kernels form the logits the same way, z = (raw + b) * inv_tau, so they see bitwise equal
values.

`row_stats_kernel` (one read of the row; a second one for the JSD) writes, per row, into a
[ROW_STATS, C] fp32 buffer: logp = (z_y - m) - log s, entropy, the divergence and its aux
(KL(p||q) for reverse_kl, KL(p||M) for jsd, as in sdar_kernels/stats.py), and the shifts m, log s
(m, log s of the teacher too) that `row_dlogits_kernel` uses to rebuild log p = (z - m) - log s.
Accumulators are relative to the running max (no cancellation at |z| ~ 1e4).

`row_dlogits_kernel` writes dL/dz / tau = (g_logp (e_y - p) - g_ent p (log p + H)
+ g_div dD/dz) / tau. ALIASED: the output overwrites the logits, fp32 in place or, 16-bit, in
the first half of the row's own bytes (the fp32 row viewed as 2V 16-bit elements). Block j then
writes bytes that hold fp32 elements [v0/2, (v0+BV)/2), all read by blocks <= j, and a barrier
between the loads and the store of each block orders those reads of *every* warp before any
warp's write (warps are not in lock step, and a 16-bit element's bytes were read by another warp).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .forward_kernels import _rescaled_update, jsd_terms
from .tiles import NEG_BIG, to_store_dtype

# Rows of the per-row statistics buffer [ROW_STATS, C] (constexpr: read inside the kernels).
R_LOGP, R_ENT, R_DIV, R_AUX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
R_M, R_LOGS, R_MT, R_LOGST = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
ROW_STATS = 8


@triton.jit
def _row_block(row_ptr, b_ptr, cols, ok, inv_tau, HAS_BIAS: tl.constexpr):
    """Logits z [1, BV] of one block: (raw + b) * inv_tau, NEG_BIG (finite) outside V."""
    z = tl.load(row_ptr + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, z * inv_tau, NEG_BIG)


@triton.jit
def _row_scalar(ptr, idx, PRESENT: tl.constexpr):
    """One fp32 value per row as a [1] tensor (0 when the input is absent)."""
    if PRESENT:
        return tl.load(ptr + idx).to(tl.float32)
    else:
        return tl.zeros(idx.shape, tl.float32)


@triton.jit
def row_stats_kernel(z_ptr, zt_ptr, b_ptr, tb_ptr, y_ptr, out_ptr,
                     V, ld_z, n_rows, inv_tau, beta,
                     BV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                     DIV: tl.constexpr):
    row = tl.program_id(0) + tl.arange(0, 1)  # [1]: per-row state keeps a dim for jsd_terms
    z_row = z_ptr + row[:, None].to(tl.int64) * ld_z
    zt_row = zt_ptr + row[:, None].to(tl.int64) * ld_z
    m = tl.full((1,), NEG_BIG, tl.float32)
    s = tl.zeros((1,), tl.float32)
    a = tl.zeros((1,), tl.float32)
    mt = tl.full((1,), NEG_BIG, tl.float32)
    st = tl.zeros((1,), tl.float32)
    acc = tl.zeros((1,), tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)[None, :]
        ok = cols < V
        z = _row_block(z_row, b_ptr, cols, ok, inv_tau, HAS_BIAS)
        m_old, s_old = m, s
        m, s, c, e, d = _rescaled_update(m_old, s_old, z)
        a = c * (a + (m_old - m) * s_old) + tl.sum(e * d, 1)
        if DIV != 0:
            zt = _row_block(zt_row, tb_ptr, cols, ok, inv_tau, HAS_TBIAS)
            mt_old, st_old = mt, st
            mt, st, ct, et, dt = _rescaled_update(mt_old, st_old, zt)
            if DIV == 1:  # sum e^(z-m) ((z-m) - (zt-mt)), shifted when either max moves
                acc = c * (acc + ((m_old - m) - (mt_old - mt)) * s_old) + tl.sum(e * (d - dt), 1)
            if DIV == 2:  # sum e^(zt-mt) ((zt-mt) - (z-m))
                acc = ct * (acc + ((mt_old - mt) - (m_old - m)) * st_old) + tl.sum(et * (dt - d), 1)
    log_s = tl.log(s)
    y = tl.load(y_ptr + row)
    # never read outside the row; a target outside [0, V) (only possible with the host checks
    # off) gives a NaN log-prob, not a plausible number
    y_ok = (y >= 0) & (y < V)
    z_y = tl.load(z_ptr + row.to(tl.int64) * ld_z + y, mask=y_ok, other=float("nan"))
    if HAS_BIAS:
        z_y = z_y + tl.load(b_ptr + y, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + R_LOGP * n_rows + row, (z_y * inv_tau - m) - log_s)
    tl.store(out_ptr + R_ENT * n_rows + row, log_s - a / s)
    tl.store(out_ptr + R_M * n_rows + row, m)
    tl.store(out_ptr + R_LOGS * n_rows + row, log_s)
    if DIV != 0:
        log_st = tl.log(st)
        tl.store(out_ptr + R_MT * n_rows + row, mt)
        tl.store(out_ptr + R_LOGST * n_rows + row, log_st)
        if DIV == 1:
            div = acc / s - log_s + log_st
            tl.store(out_ptr + R_DIV * n_rows + row, div)
            tl.store(out_ptr + R_AUX * n_rows + row, div)
        if DIV == 2:
            tl.store(out_ptr + R_DIV * n_rows + row, acc / st - log_st + log_s)
        if DIV == 3:  # second read: the mixture M needs both LSEs
            kl_pm = tl.zeros((1,), tl.float32)
            kl_qm = tl.zeros((1,), tl.float32)
            for v0 in range(0, V, BV):
                cols = v0 + tl.arange(0, BV)[None, :]
                ok = cols < V
                z = _row_block(z_row, b_ptr, cols, ok, inv_tau, HAS_BIAS)
                zt = _row_block(zt_row, tb_ptr, cols, ok, inv_tau, HAS_TBIAS)
                lp, lq, log_m, p, q = jsd_terms(z - m[:, None], zt - mt[:, None], log_s, log_st, beta)
                kl_pm += tl.sum(tl.where(p > 0.0, p * (lp - log_m), 0.0), 1)
                kl_qm += tl.sum(tl.where(q > 0.0, q * (lq - log_m), 0.0), 1)
            tl.store(out_ptr + R_DIV * n_rows + row, beta * kl_qm + (1.0 - beta) * kl_pm)
            tl.store(out_ptr + R_AUX * n_rows + row, kl_pm)


@triton.jit
def row_dlogits_kernel(z_ptr, zt_ptr, b_ptr, tb_ptr, y_ptr, st_ptr, gl_ptr, ge_ptr, gd_ptr, dz_ptr,
                       V, ld_z, ld_dz, n_rows, inv_tau, beta,
                       BV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                       HAS_GL: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
                       DIV: tl.constexpr, ALIASED: tl.constexpr, INTERPRETED: tl.constexpr = False):
    row = tl.program_id(0) + tl.arange(0, 1)
    z_row = z_ptr + row[:, None].to(tl.int64) * ld_z
    zt_row = zt_ptr + row[:, None].to(tl.int64) * ld_z
    dz_row = dz_ptr + row[:, None].to(tl.int64) * ld_dz
    g_l = _row_scalar(gl_ptr, row, HAS_GL)
    g_e = _row_scalar(ge_ptr, row, HAS_GE)
    g_d = _row_scalar(gd_ptr, row, HAS_GD and DIV != 0)
    active = (g_l != 0.0) | (g_e != 0.0) | (g_d != 0.0)
    if tl.max(active.to(tl.int32), 0) > 0:
        m = tl.load(st_ptr + R_M * n_rows + row)
        log_s = tl.load(st_ptr + R_LOGS * n_rows + row)
        ent = tl.load(st_ptr + R_ENT * n_rows + row)
        y = tl.load(y_ptr + row)
        if HAS_GD and DIV != 0:
            mt = tl.load(st_ptr + R_MT * n_rows + row)
            log_st = tl.load(st_ptr + R_LOGST * n_rows + row)
            aux = tl.load(st_ptr + R_AUX * n_rows + row)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)[None, :]
            ok = cols < V
            z = _row_block(z_row, b_ptr, cols, ok, inv_tau, HAS_BIAS)
            lp = (z - m[:, None]) - log_s[:, None]
            p = tl.exp(lp)
            dz = tl.where(cols == y[:, None], g_l[:, None], 0.0) - p * g_l[:, None]
            if HAS_GE:
                dz -= g_e[:, None] * p * (lp + ent[:, None])
            if HAS_GD and DIV != 0:
                zt = _row_block(zt_row, tb_ptr, cols, ok, inv_tau, HAS_TBIAS)
                lq = (zt - mt[:, None]) - log_st[:, None]
                if DIV == 1:  # reverse KL(p||q), aux = KL(p||q)
                    dz += g_d[:, None] * p * (lp - lq - aux[:, None])
                if DIV == 2:  # forward KL(q||p)
                    dz += g_d[:, None] * (p - tl.exp(lq))
                if DIV == 3:  # jsd, aux = KL(p||M)
                    _, _, log_m, _, _ = jsd_terms(z - m[:, None], zt - mt[:, None], log_s, log_st, beta)
                    dz += (g_d * (1.0 - beta))[:, None] * p * (lp - log_m - aux[:, None])
            if ALIASED:
                tl.debug_barrier()  # every warp has read this block before any warp overwrites it
            tl.store(dz_row + cols, to_store_dtype(dz * inv_tau, dz_ptr.dtype.element_ty, INTERPRETED),
                     mask=ok)
    else:  # no gradient reaches this row: zeros, without reading the logits
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)[None, :]
            tl.store(dz_row + cols, tl.zeros((1, BV), dz_ptr.dtype.element_ty), mask=cols < V)
