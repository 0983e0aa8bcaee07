"""Hopper-native Triton kernels: persistent grid, one flattened loop, TMA operand loads.

Same mathematics and the same outputs as `forward_kernels` / `backward_kernels` (the portable
default); what changes is how the work is scheduled:

* Persistent grid: `n_progs` programs (one per SM on a GPU) walk the work tiles
  tile_id = pid, pid + n_progs, ... instead of one program per tile.
* One flattened loop per program over (work tile x vocab tile x K step) (the loop structure of
  Triton's persistent-matmul tutorial): the softmax epilogue of a vocab tile runs under
  `if ki == last`, inside the same software-pipelined loop, so the TMA loads of the next vocab
  tile (and of the next work tile) are already in flight while the epilogue runs; the pipeline
  is never drained and refilled per tile. (Overlapping the next tile's *MMA* with the softmax
  needs warp specialization, which Triton 3.7 only does on Blackwell.) Kernels with a teacher
  flatten (work tile x vocab tile) only and run a student and a teacher K loop inside, each
  pipelined on its own: a single K loop whose step picks student or teacher operands by a
  branch compiled to unpipelined, synchronous TMA loads (checked on the sm_90a TTGIR).
* Operands come through host-side TMA descriptors (`triton.tools.tensor_descriptor.
  TensorDescriptor`, lowered to `cp.async.bulk.tensor` on sm_90a) when USE_TMA (student) /
  USE_TMA_T (teacher); TMA zero-fills rows past N / V and columns past H, so no masks are
  needed in the K loop. TMA needs 16-byte aligned bases and row strides: otherwise the host
  passes plain tensors and the flag off selects masked pointer loads (same loop, same
  results). Both paths run under TRITON_INTERPRET=1 (the interpreter implements descriptor
  loads with bounds masks).

Every work tile of the forward takes the same number of steps (vocab_per_split / BV vocab
tiles); tiles past the end of the last split are fully masked (-inf) and change nothing (their
MMA work, S * vocab_per_split - V columns per token tile, is wasted).

Forward modes (DIV): 0 none, 1 reverse_kl, 2 forward_kl, 3 teacher LSE only (JSD pass 1),
JSD_PASS2 = 4: the second JSD pass (KL(p||M), KL(q||M) per split into planes 0, 1 of part),
which the portable backend runs as `jsd_fwd_kernel`.

The backward kernel walks a *work list* (int32: [n_active, tile ids...]) built by the host:
tiles whose upstream gradients are all zero, or that the optional block-skipping bound drops
(see `hopper.py`), come after n_active and are only stored as zeros, outside the pipelined
loop. With block skipping off the list drops only tiles whose dL/dz is exactly zero, so dL/dz
is the portable kernel's (same formulas; not bitwise, the tile shapes differ).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .backward_kernels import tile_dlogits
from .forward_kernels import fold_tile, fresh_state, jsd_terms
from .tiles import NEG_BIG, grouped_coords, to_store_dtype

JSD_PASS2 = 4  # forward mode code of the second JSD pass


@triton.jit
def _k_slice(src, r0, k0, n_rows, K, stride, BR: tl.constexpr, BK: tl.constexpr,
             USE_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """Operand slice [BR, BK]: rows r0.., hidden columns k0..; zeros past n_rows and K."""
    if USE_TMA:
        return src.load([r0, k0])
    else:
        rows = r0 + tl.arange(0, BR)
        ks = k0 + tl.arange(0, BK)
        ptrs = src + rows[:, None].to(tl.int64) * stride + ks[None, :]
        if EVEN_K:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (ks[None, :] < K), other=0.0)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b^T in fp32 (UPCAST: interpreter only, see tiles.logit_tile)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _k_step(h_src, w_src, r0, c0, k0, N, V, H, stride_h, stride_w, acc,
            BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
            EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One K step of a logit tile: acc[BN, BV] += h[r0:, k0:k0+BK] @ W[c0:, k0:k0+BK]^T."""
    a = _k_slice(h_src, r0, k0, N, H, stride_h, BN, BK, USE_TMA, EVEN_K)
    b = _k_slice(w_src, c0, k0, V, H, stride_w, BV, BK, USE_TMA, EVEN_K)
    return _mma(a, b, acc, IEEE, UPCAST)


@triton.jit
def _logits(acc, b_ptr, cols, v_hi, inv_tau, HAS_BIAS: tl.constexpr):
    """Finished logit tile: (acc + b[cols]) * inv_tau, -inf at columns >= v_hi."""
    col_ok = cols < v_hi
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))


@triton.jit
def _fwd_update(z, zt, cols, v_hi, y, lse_s, lse_t, beta, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
                WITH_ENT: tl.constexpr, DIV: tl.constexpr):
    """Fold one vocab tile into the per-row running statistics (see forward_kernels).

    JSD_PASS2 reuses a_s for KL(p||M) and acc_d for KL(q||M) (no running maxima there).
    """
    if DIV == 4:
        col_ok = cols < v_hi
        z = tl.where(col_ok[None, :], z, NEG_BIG)  # finite outside V: p = q = 0, no NaNs
        zt = tl.where(col_ok[None, :], zt, NEG_BIG)
        lp, lq, log_m, p, q = jsd_terms(z, zt, lse_s, lse_t, beta)
        a_s += tl.sum(tl.where(p > 0.0, p * (lp - log_m), 0.0), 1)
        acc_d += tl.sum(tl.where(q > 0.0, q * (lq - log_m), 0.0), 1)
    else:
        m_s, s_s, a_s, m_t, s_t, acc_d, z_y = fold_tile(z, zt, cols, y, m_s, s_s, a_s, m_t, s_t, acc_d,
                                                        z_y, WITH_ENT, DIV)
    return m_s, s_s, a_s, m_t, s_t, acc_d, z_y


@triton.jit
def _fwd_store(part_ptr, zy_ptr, rows, row_ok, split, n_splits, plane, y, v_lo, v_hi,
               m_s, s_s, a_s, m_t, s_t, acc_d, z_y, WITH_ENT: tl.constexpr, DIV: tl.constexpr):
    """Write one work tile's split partials (layout of forward_kernels.stats_fwd_kernel)."""
    base = rows * n_splits + split
    if DIV == 4:
        tl.store(part_ptr + base, a_s, mask=row_ok)
        tl.store(part_ptr + plane + base, acc_d, mask=row_ok)
    else:
        tl.store(part_ptr + base, m_s, mask=row_ok)
        tl.store(part_ptr + plane + base, s_s, mask=row_ok)
        if WITH_ENT:
            tl.store(part_ptr + 2 * plane + base, a_s, mask=row_ok)
        if DIV != 0:
            tl.store(part_ptr + 3 * plane + base, m_t, mask=row_ok)
            tl.store(part_ptr + 4 * plane + base, s_t, mask=row_ok)
        if DIV == 1 or DIV == 2:
            tl.store(part_ptr + 5 * plane + base, acc_d, mask=row_ok)
        tl.store(zy_ptr + rows, z_y, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.jit
def _k_loop(h_src, w_src, r0, c0, N, V, H, stride_h, stride_w,
            BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
            EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """A whole logit tile's K loop (its own software pipeline), fp32 [BN, BV] without bias."""
    acc = tl.zeros((BN, BV), tl.float32)
    for k0 in range(0, H, BK):
        acc = _k_step(h_src, w_src, r0, c0, k0, N, V, H, stride_h, stride_w, acc,
                      BN, BV, BK, USE_TMA, EVEN_K, IEEE, UPCAST)
    return acc


@triton.jit
def _fwd_tile_start(tile_id, n_tok, n_splits, N, y_ptr, lse_ptr, tlse_ptr, y, lse_s, lse_t,
                    BN: tl.constexpr, GROUP_N: tl.constexpr, DIV: tl.constexpr):
    """Coordinates and per-row inputs of forward work tile `tile_id`."""
    pid_n, split = grouped_coords(tile_id, n_tok, n_splits, GROUP_N)
    rows = pid_n * BN + tl.arange(0, BN)
    if DIV == 4:
        lse_s = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
        lse_t = tl.load(tlse_ptr + rows, mask=rows < N, other=0.0)
    else:
        y = tl.load(y_ptr + rows, mask=rows < N, other=-1).to(tl.int64)
    return pid_n, split, rows, y, lse_s, lse_t


@triton.jit
def _fwd_epilogue(acc, acc_t, b_ptr, tb_ptr, part_ptr, zy_ptr, zmax_ptr, rows, split, vi, n_vt,
                  c0, V, N, n_splits, plane, vocab_per_split, ld_zmax, inv_tau, beta, y, lse_s,
                  lse_t, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
                  BN: tl.constexpr, BV: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_TBIAS: tl.constexpr, WITH_ENT: tl.constexpr, DIV: tl.constexpr,
                  SAVE_ZMAX: tl.constexpr):
    """Fold finished vocab tile `vi` into the row statistics; store and reset after the last."""
    v_lo = split * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    cols = c0 + tl.arange(0, BV)
    z = _logits(acc, b_ptr, cols, v_hi, inv_tau, HAS_BIAS)
    zt = z
    if DIV != 0:
        zt = _logits(acc_t, tb_ptr, cols, v_hi, inv_tau, HAS_TBIAS)
    if SAVE_ZMAX:
        tl.store(zmax_ptr + rows.to(tl.int64) * ld_zmax + c0 // BV, tl.max(z, 1),
                 mask=(rows < N) & (c0 < v_hi))
    m_s, s_s, a_s, m_t, s_t, acc_d, z_y = _fwd_update(
        z, zt, cols, v_hi, y, lse_s, lse_t, beta, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
        WITH_ENT, DIV)
    if vi == n_vt - 1:
        _fwd_store(part_ptr, zy_ptr, rows, rows < N, split, n_splits, plane, y, v_lo, v_hi,
                   m_s, s_s, a_s, m_t, s_t, acc_d, z_y, WITH_ENT, DIV)
        m_s, s_s, a_s, m_t, s_t, acc_d, z_y = fresh_state(BN)
    return m_s, s_s, a_s, m_t, s_t, acc_d, z_y


@triton.jit
def stats_fwd_hopper_kernel(h_src, w_src, th_src, tw_src, b_ptr, tb_ptr, y_ptr, lse_ptr, tlse_ptr,
                            part_ptr, zy_ptr, zmax_ptr,
                            N, V, H, HT, plane, n_splits, stride_h, stride_w, stride_th, stride_tw,
                            vocab_per_split, ld_zmax, n_progs, inv_tau, beta,
                            BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                            DIV: tl.constexpr, USE_TMA: tl.constexpr, USE_TMA_T: tl.constexpr,
                            EVEN_K: tl.constexpr, EVEN_KT: tl.constexpr, IEEE: tl.constexpr,
                            UPCAST: tl.constexpr, GROUP_N: tl.constexpr, SAVE_ZMAX: tl.constexpr):
    """Persistent forward: per (token tile x vocab split) work tile, the split partials.

    part: [6, N, S] fp32 (DIV 4: [2, N, S]); zy: [N] fp32; zmax (SAVE_ZMAX): [N, ld_zmax] fp32,
    the max logit of every (row, BV-wide vocab tile), the block-skipping bound of the backward.
    Student only (DIV 0): one loop over (work tile x vocab tile x K step). With a teacher: one
    loop over (work tile x vocab tile) with a student and a teacher K loop inside (a K step
    that picks student or teacher operands by a branch defeats Triton's pipeliner).
    """
    pid = tl.program_id(0)
    n_tok = tl.cdiv(N, BN)
    my_tiles = tl.cdiv(n_tok * n_splits - pid, n_progs)
    n_vt = vocab_per_split // BV
    tile_id = pid - n_progs
    pid_n = 0
    split = 0
    rows = tl.arange(0, BN)
    y = tl.zeros((BN,), tl.int64) - 1
    lse_s = tl.zeros((BN,), tl.float32)
    lse_t = tl.zeros((BN,), tl.float32)
    m_s, s_s, a_s, m_t, s_t, acc_d, z_y = fresh_state(BN)
    if DIV == 0:
        ks = tl.cdiv(H, BK)
        steps = n_vt * ks
        step = steps - 1
        acc = tl.zeros((BN, BV), tl.float32)
        for _ in range(0, my_tiles * steps):
            step = tl.where(step == steps - 1, 0, step + 1)
            if step == 0:
                tile_id += n_progs
                pid_n, split, rows, y, lse_s, lse_t = _fwd_tile_start(
                    tile_id, n_tok, n_splits, N, y_ptr, lse_ptr, tlse_ptr, y, lse_s, lse_t,
                    BN, GROUP_N, DIV)
            vi = step // ks
            ki = step - vi * ks
            c0 = split * vocab_per_split + vi * BV
            acc = _k_step(h_src, w_src, pid_n * BN, c0, ki * BK, N, V, H, stride_h, stride_w,
                          acc, BN, BV, BK, USE_TMA, EVEN_K, IEEE, UPCAST)
            if ki == ks - 1:
                m_s, s_s, a_s, m_t, s_t, acc_d, z_y = _fwd_epilogue(
                    acc, acc, b_ptr, tb_ptr, part_ptr, zy_ptr, zmax_ptr, rows, split, vi, n_vt,
                    c0, V, N, n_splits, plane, vocab_per_split, ld_zmax, inv_tau, beta, y, lse_s,
                    lse_t, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
                    BN, BV, HAS_BIAS, HAS_TBIAS, WITH_ENT, DIV, SAVE_ZMAX)
                acc = tl.zeros((BN, BV), tl.float32)
    else:
        vi = n_vt - 1
        for _ in range(0, my_tiles * n_vt):
            vi = tl.where(vi == n_vt - 1, 0, vi + 1)
            if vi == 0:
                tile_id += n_progs
                pid_n, split, rows, y, lse_s, lse_t = _fwd_tile_start(
                    tile_id, n_tok, n_splits, N, y_ptr, lse_ptr, tlse_ptr, y, lse_s, lse_t,
                    BN, GROUP_N, DIV)
            c0 = split * vocab_per_split + vi * BV
            acc = _k_loop(h_src, w_src, pid_n * BN, c0, N, V, H, stride_h, stride_w,
                          BN, BV, BK, USE_TMA, EVEN_K, IEEE, UPCAST)
            acc_t = _k_loop(th_src, tw_src, pid_n * BN, c0, N, V, HT, stride_th, stride_tw,
                            BN, BV, BK, USE_TMA_T, EVEN_KT, IEEE, UPCAST)
            m_s, s_s, a_s, m_t, s_t, acc_d, z_y = _fwd_epilogue(
                acc, acc_t, b_ptr, tb_ptr, part_ptr, zy_ptr, zmax_ptr, rows, split, vi, n_vt,
                c0, V, N, n_splits, plane, vocab_per_split, ld_zmax, inv_tau, beta, y, lse_s,
                lse_t, m_s, s_s, a_s, m_t, s_t, acc_d, z_y,
                BN, BV, HAS_BIAS, HAS_TBIAS, WITH_ENT, DIV, SAVE_ZMAX)


@triton.jit
def _store_dz(dz_ptr, dbp_ptr, dz, rows, row_ok, cols, col_ok, pid_n, v_lo, ld_dz,
              WRITE_DB: tl.constexpr, UPCAST: tl.constexpr):
    local = cols - v_lo
    ptrs = dz_ptr + rows[:, None].to(tl.int64) * ld_dz + local[None, :]
    tl.store(ptrs, to_store_dtype(dz, dz_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])
    if WRITE_DB:
        tl.store(dbp_ptr + pid_n * ld_dz + local, tl.sum(dz, 0), mask=col_ok)


@triton.jit
def _bwd_epilogue(acc, acc_t, b_ptr, tb_ptr, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr, gl_ptr,
                  ge_ptr, gd_ptr, dz_ptr, dbp_ptr, pid_n, c0, N, v_lo, v_hi, ld_dz, inv_tau, beta,
                  BN: tl.constexpr, BV: tl.constexpr, HAS_GL: tl.constexpr, HAS_GE: tl.constexpr,
                  HAS_GD: tl.constexpr, DIV: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_TBIAS: tl.constexpr, WRITE_DB: tl.constexpr, TEACHER: tl.constexpr,
                  UPCAST: tl.constexpr):
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = c0 + tl.arange(0, BV)
    col_ok = cols < v_hi
    z = _logits(acc, b_ptr, cols, v_hi, inv_tau, HAS_BIAS)
    zt = z
    if TEACHER:
        zt = _logits(acc_t, tb_ptr, cols, v_hi, inv_tau, HAS_TBIAS)
    dz = tile_dlogits(z, zt, cols, col_ok, rows, row_ok, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr,
                  gl_ptr, ge_ptr, gd_ptr, inv_tau, beta, HAS_GL, HAS_GE, HAS_GD, DIV)
    _store_dz(dz_ptr, dbp_ptr, dz, rows, row_ok, cols, col_ok, pid_n, v_lo, ld_dz, WRITE_DB, UPCAST)


@triton.jit
def _work_tile(work_ptr, idx, n_vt, v_lo, BV: tl.constexpr):
    """(token tile, first column) of work-list entry idx."""
    t = tl.load(work_ptr + 1 + idx)
    pid_n = t // n_vt
    return pid_n, v_lo + (t - pid_n * n_vt) * BV


@triton.jit
def dlogits_hopper_kernel(h_src, w_src, th_src, tw_src, b_ptr, tb_ptr, y_ptr,
                          lse_ptr, ent_ptr, tlse_ptr, aux_ptr, gl_ptr, ge_ptr, gd_ptr,
                          dz_ptr, dbp_ptr, work_ptr,
                          N, V, v_lo, v_hi, H, HT, stride_h, stride_w, stride_th, stride_tw,
                          ld_dz, n_progs, inv_tau, beta,
                          BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                          HAS_GL: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
                          DIV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                          WRITE_DB: tl.constexpr, USE_TMA: tl.constexpr, USE_TMA_T: tl.constexpr,
                          EVEN_K: tl.constexpr,
                          EVEN_KT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Persistent backward over the work list of one vocab chunk [v_lo, v_hi).

    work: int32 [1 + T], T = cdiv(N, BN) * cdiv(v_hi - v_lo, BV); work[0] = n_active, then tile
    ids (token tile * n_vt + vocab tile), the computed ones first. dz: [N, ld_dz] (16-bit or
    fp32), dbp: [cdiv(N, BN), ld_dz] fp32 per-token-tile column sums of dL/dz.
    Student only: one loop over (tile x K step); with a teacher: a loop over tiles with a
    student and a teacher K loop inside (as in the forward).
    """
    pid = tl.program_id(0)
    n_vt = tl.cdiv(v_hi - v_lo, BV)
    n_tiles = tl.cdiv(N, BN) * n_vt
    n_active = tl.load(work_ptr)
    my_tiles = tl.cdiv(n_active - pid, n_progs)
    TEACHER: tl.constexpr = HAS_GD and DIV != 0
    idx = pid - n_progs
    pid_n = 0
    c0 = 0
    if TEACHER:
        for _ in range(0, my_tiles):
            idx += n_progs
            pid_n, c0 = _work_tile(work_ptr, idx, n_vt, v_lo, BV)
            acc = _k_loop(h_src, w_src, pid_n * BN, c0, N, V, H, stride_h, stride_w,
                          BN, BV, BK, USE_TMA, EVEN_K, IEEE, UPCAST)
            acc_t = _k_loop(th_src, tw_src, pid_n * BN, c0, N, V, HT, stride_th, stride_tw,
                            BN, BV, BK, USE_TMA_T, EVEN_KT, IEEE, UPCAST)
            _bwd_epilogue(acc, acc_t, b_ptr, tb_ptr, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr,
                          gl_ptr, ge_ptr, gd_ptr, dz_ptr, dbp_ptr, pid_n, c0, N, v_lo, v_hi, ld_dz,
                          inv_tau, beta, BN, BV, HAS_GL, HAS_GE, HAS_GD, DIV, HAS_BIAS, HAS_TBIAS,
                          WRITE_DB, TEACHER, UPCAST)
    else:
        ks = tl.cdiv(H, BK)
        step = ks - 1
        acc = tl.zeros((BN, BV), tl.float32)
        for _ in range(0, my_tiles * ks):
            step = tl.where(step == ks - 1, 0, step + 1)
            if step == 0:
                idx += n_progs
                pid_n, c0 = _work_tile(work_ptr, idx, n_vt, v_lo, BV)
            acc = _k_step(h_src, w_src, pid_n * BN, c0, step * BK, N, V, H, stride_h, stride_w,
                          acc, BN, BV, BK, USE_TMA, EVEN_K, IEEE, UPCAST)
            if step == ks - 1:
                _bwd_epilogue(acc, acc, b_ptr, tb_ptr, y_ptr, lse_ptr, ent_ptr, tlse_ptr, aux_ptr,
                              gl_ptr, ge_ptr, gd_ptr, dz_ptr, dbp_ptr, pid_n, c0, N, v_lo, v_hi,
                              ld_dz, inv_tau, beta, BN, BV, HAS_GL, HAS_GE, HAS_GD, DIV, HAS_BIAS,
                              HAS_TBIAS, WRITE_DB, TEACHER, UPCAST)
                acc = tl.zeros((BN, BV), tl.float32)
    # Dropped tiles: dL/dz is zero (or, with block skipping, below the bound): store zeros.
    for i in range(n_active + pid, n_tiles, n_progs):
        pid_n, c0 = _work_tile(work_ptr, i, n_vt, v_lo, BV)
        rows = pid_n * BN + tl.arange(0, BN)
        cols = c0 + tl.arange(0, BV)
        _store_dz(dz_ptr, dbp_ptr, tl.zeros((BN, BV), tl.float32), rows, rows < N, cols,
                  cols < v_hi, pid_n, v_lo, ld_dz, WRITE_DB, UPCAST)
