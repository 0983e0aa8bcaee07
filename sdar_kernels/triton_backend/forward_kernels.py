"""Forward Triton kernels: per-(token tile x vocab split) online softmax statistics.

`stats_fwd_kernel` walks its vocab split tile by tile, keeping per token (all fp32):
  m_s, s_s = running max and rescaled sum of exp(z - m_s)             -> LSE
  a_s      = sum exp(z - m_s) (z - m_s)   (entropy, shifted: no cancellation at |z|~1e4)
  m_t, s_t = the same for the teacher tile computed in the same program
  acc_d    = reverse_kl: sum e^{z-m_s} ((z-m_s) - (zt-m_t));  forward_kl: sum e^{zt-m_t} ((zt-m_t) - (z-m_s))
and the target logit z[y] of the split holding y. Partials go to part[stat, row, split];
`split_reduce` (torch, deterministic) merges them.

`jsd_fwd_kernel` is the second JSD pass: with both LSEs known it sums, per split,
KL(p||M) and KL(q||M) terms, M = beta q + (1 - beta) p.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import NEG_BIG, grouped_tile, logit_tile

# Rows of the partials buffer written by stats_fwd_kernel (constexpr: read inside kernels).
STAT_M, STAT_S, STAT_A = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
STAT_MT, STAT_ST, STAT_D = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
N_STATS = 6
# Divergence codes (constexpr DIV).
DIV_NONE, DIV_REVERSE, DIV_FORWARD, DIV_TEACHER_LSE = 0, 1, 2, 3


@triton.jit
def _rescaled_update(m_old, s_old, z):
    """Online max/sum step: returns (m_new, s_new, scale = e^{m_old-m_new}, e^{z-m_new}, z-m_new)."""
    m_new = tl.maximum(m_old, tl.max(z, 1))
    scale = tl.exp(m_old - m_new)
    d = z - m_new[:, None]
    e = tl.exp(d)
    d = tl.where(z == float("-inf"), 0.0, d)
    s_new = s_old * scale + tl.sum(e, 1)
    return m_new, s_new, scale, e, d


@triton.jit
def fresh_state(BN: tl.constexpr):
    """The empty per-row running state (m_s, s_s, a_s, m_t, s_t, acc_d, z_y) of BN rows."""
    return (tl.full((BN,), NEG_BIG, tl.float32), tl.zeros((BN,), tl.float32), tl.zeros((BN,), tl.float32),
            tl.full((BN,), NEG_BIG, tl.float32), tl.zeros((BN,), tl.float32), tl.zeros((BN,), tl.float32),
            tl.zeros((BN,), tl.float32))


@triton.jit
def fold_tile(z, zt, cols, y, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
              WITH_ENT: tl.constexpr, DIV: tl.constexpr):
    """Fold one [BN, BV] logit tile (and the teacher's, DIV 1-3) into the per-row running state.

    Accumulators are kept relative to the current (m_s, m_t): when either max moves, every
    earlier term shifts by the change of that max. Shared by the portable and Hopper kernels.
    """
    z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    m_old, s_old = m_s, s_s
    m_s, s_s, c_s, e_s, d_s = _rescaled_update(m_old, s_old, z)
    if WITH_ENT:
        a_s = c_s * (a_s + (m_old - m_s) * s_old) + tl.sum(e_s * d_s, 1)
    if DIV != 0:
        mt_old, st_old = m_t, s_t
        m_t, s_t, c_t, e_t, d_t = _rescaled_update(mt_old, st_old, zt)
        if DIV == 1:
            shift = (m_old - m_s) - (mt_old - m_t)
            acc_d = c_s * (acc_d + shift * s_old) + tl.sum(e_s * (d_s - d_t), 1)
        if DIV == 2:
            shift = (mt_old - m_t) - (m_old - m_s)
            acc_d = c_t * (acc_d + shift * st_old) + tl.sum(e_t * (d_t - d_s), 1)
    return m_s, s_s, a_s, m_t, s_t, acc_d, z_y


@triton.jit
def stats_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, th_ptr, tw_ptr, tb_ptr, part_ptr, zy_ptr,
                     N, V, H, HT, plane, n_splits, stride_h, stride_w, stride_th, stride_tw, vocab_per_split,
                     inv_tau,
                     BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                     DIV: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KT: tl.constexpr,
                     IEEE: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr):
    pid_n, split = grouped_tile(tl.cdiv(N, BN), n_splits, GROUP_N)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_lo = split * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)

    m_s, s_s, a_s, m_t, s_t, acc_d, z_y = fresh_state(BN)
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, v_hi, H, stride_h, stride_w, inv_tau,
                       BN, BV, BK, HAS_BIAS, EVEN_K, IEEE, UPCAST)
        zt = z
        if DIV != 0:
            zt = logit_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, N, v_hi, HT, stride_th, stride_tw,
                            inv_tau, BN, BV, BK, HAS_TBIAS, EVEN_KT, IEEE, UPCAST)
        m_s, s_s, a_s, m_t, s_t, acc_d, z_y = fold_tile(z, zt, cols, y, m_s, s_s, a_s, m_t, s_t, acc_d,
                                                        z_y, WITH_ENT, DIV)

    base = rows * n_splits + split
    tl.store(part_ptr + STAT_M * plane + base, m_s, mask=row_ok)
    tl.store(part_ptr + STAT_S * plane + base, s_s, mask=row_ok)
    if WITH_ENT:
        tl.store(part_ptr + STAT_A * plane + base, a_s, mask=row_ok)
    if DIV != 0:
        tl.store(part_ptr + STAT_MT * plane + base, m_t, mask=row_ok)
        tl.store(part_ptr + STAT_ST * plane + base, s_t, mask=row_ok)
    if DIV == 1 or DIV == 2:
        tl.store(part_ptr + STAT_D * plane + base, acc_d, mask=row_ok)
    # Exactly one split holds y, so each z_y entry has exactly one writer (no atomics).
    tl.store(zy_ptr + rows, z_y, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.jit
def jsd_terms(z, zt, lse_s, lse_t, beta):
    """Per-element (log p, log q, log M, p, q) of the JSD mixture M = beta q + (1 - beta) p.

    log M = logaddexp(log q + log beta, log p + log(1 - beta)) with the max taken over the
    *weighted* terms: at beta = 1 (0) that is exactly log q (log p), finite however far apart p
    and q are. (Taking the max of log p, log q instead underflows beta q + (1 - beta) p to 0 once
    they differ by ~103 nats: log M = -inf, then 0 * inf = NaN in the values and gradients.)
    """
    lp = z - lse_s[:, None]
    lq = zt - lse_t[:, None]
    a = lq + tl.log(beta)  # -inf at beta = 0
    b = lp + tl.log(1.0 - beta)  # -inf at beta = 1
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
    return lp, lq, log_m, tl.exp(lp), tl.exp(lq)


@triton.jit
def jsd_fwd_kernel(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, lse_ptr, tlse_ptr, part_ptr,
                   N, V, H, HT, plane, n_splits, stride_h, stride_w, stride_th, stride_tw, vocab_per_split,
                   inv_tau, beta,
                   BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, EVEN_K: tl.constexpr,
                   EVEN_KT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr):
    pid_n, split = grouped_tile(tl.cdiv(N, BN), n_splits, GROUP_N)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    lse_s = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(tlse_ptr + rows, mask=row_ok, other=0.0)
    v_lo = split * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    kl_pm = tl.zeros((BN,), tl.float32)
    kl_qm = tl.zeros((BN,), tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, v_hi, H, stride_h, stride_w, inv_tau,
                       BN, BV, BK, HAS_BIAS, EVEN_K, IEEE, UPCAST)
        zt = logit_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, N, v_hi, HT, stride_th, stride_tw,
                        inv_tau, BN, BV, BK, HAS_TBIAS, EVEN_KT, IEEE, UPCAST)
        col_ok = cols < v_hi
        z = tl.where(col_ok[None, :], z, NEG_BIG)  # finite outside V: p = q = 0, no NaNs
        zt = tl.where(col_ok[None, :], zt, NEG_BIG)
        lp, lq, log_m, p, q = jsd_terms(z, zt, lse_s, lse_t, beta)
        kl_pm += tl.sum(tl.where(p > 0.0, p * (lp - log_m), 0.0), 1)
        kl_qm += tl.sum(tl.where(q > 0.0, q * (lq - log_m), 0.0), 1)
    base = rows * n_splits + split
    tl.store(part_ptr + base, kl_pm, mask=row_ok)
    tl.store(part_ptr + plane + base, kl_qm, mask=row_ok)
