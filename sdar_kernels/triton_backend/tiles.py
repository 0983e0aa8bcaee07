"""Triton device helpers shared by the forward and backward kernels: one logit tile.

A logit tile is z[BN, BV] = (h[rows] @ W[cols]^T + b[cols]) * inv_tau, accumulated in fp32
over a K-loop on H; it never leaves registers. Out-of-range rows load zeros; out-of-range
columns are set to -inf so that they vanish from every softmax sum.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Finite "minus infinity" for running maxima: exp(NEG_BIG - m) == 0 and
# (NEG_BIG - m) * 0 == 0, so the first rescale of an empty state cannot make a NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_tau,
               BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
               HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
    """fp32 logits [BN, BV] for token rows `rows` and vocab columns `cols` (-inf outside V)."""
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    row_ok = rows < N
    col_ok = cols < V
    ks = tl.arange(0, BK)
    h_base = h_ptr + rows[:, None].to(tl.int64) * stride_h
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_w
    for k0 in range(0, H, BK):
        k = k0 + ks
        if EVEN_K:
            a = tl.load(h_base + k[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(w_base + k[None, :], mask=col_ok[:, None], other=0.0)
        else:
            a = tl.load(h_base + k[None, :], mask=row_ok[:, None] & (k[None, :] < H), other=0.0)
            b = tl.load(w_base + k[None, :], mask=col_ok[:, None] & (k[None, :] < H), other=0.0)
        if UPCAST:
            # Interpreter only: its NumPy dot mishandles bf16 (and would accumulate fp16 in
            # fp16). 16-bit products are exact in fp32, so this matches the GPU's fp32-accumulated MMA.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    z = acc * inv_tau
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def grouped_tile(n_rows_tiles, n_cols, GROUP_N: tl.constexpr):
    """Map the 1-D program id to (token tile, column index) in groups of GROUP_N token tiles.

    Programs that run at the same time then share GROUP_N hidden tiles and a few weight
    tiles, so both stay in L2 (the usual grouped GEMM order); a plain token-major order
    would stream every program's hidden tile from HBM once per vocab tile.
    """
    return grouped_coords(tl.program_id(0), n_rows_tiles, n_cols, GROUP_N)


@triton.jit
def grouped_coords(tile_id, n_rows_tiles, n_cols, GROUP_N: tl.constexpr):
    """(token tile, column index) of linear tile `tile_id` in the grouped order of `grouped_tile`
    (persistent kernels walk tile ids themselves instead of reading the program id)."""
    per_group = GROUP_N * n_cols
    first = (tile_id // per_group) * GROUP_N
    size = tl.minimum(n_rows_tiles - first, GROUP_N)
    local = tile_id % per_group
    return first + local % size, local // size


@triton.jit
def to_store_dtype(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x cast to `dtype` with round-to-nearest-even, as a GPU's cast does.

    INTERPRETED (set only under TRITON_INTERPRET=1): Triton's interpreter casts fp32 -> bf16 by
    truncation, so tests would see other dL/dz bits than a GPU; bf16 is then rounded by hand
    (add 0x7FFF plus the lowest kept bit, drop the low half: round half to even).
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
