"""Host side of the 3-pass path: the Triton row ops that plug into rowwise.py's chunk loop.

Per chunk of C token rows (whole vocabulary rows):
  1. raw = h W^T on cuBLAS into an fp32 [C, V] buffer (bf16 x bf16 -> fp32 output, never a
     16-bit logit; fp32 inputs: a plain fp32 GEMM); the teacher's the same way.
  2. `row_stats_kernel`: logp, entropy, divergence (+ shifts) per row; bias and 1/tau are
     applied inside the kernels, so the GEMM output is used as it is.
  3. (rowwise) per-row coefficients from the O(N) epilogue.
  4. `row_dlogits_kernel`: dL/dz / tau written over the logits buffer: fp32 in place, or for
     16-bit inputs into the first half of each row's own bytes (the fp32 [C, V] buffer viewed
     as 16-bit [C, 2V]); the GEMMs get the strided [C, V] 16-bit view (row stride 2V).
  5. dh = dz W and dW += dz^T h with fp32 accumulation; db += fp32 column sums of dz.
On CPU tensors (TRITON_INTERPRET=1 tests) the 16-bit GEMMs run in fp32 on upcast operands:
16-bit products are exact in fp32, which is what an fp32-accumulating GPU GEMM computes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from ..config import LossConfig
from ..stats import StatsSpec
from .checks import check_inputs, rowmajor
from ..gemm import addmm_f32_, mm_f32
from .configs import interpreting
from .forward import DIV_CODES
from .row_kernels import R_DIV, R_ENT, R_LOGP, ROW_STATS, row_dlogits_kernel, row_stats_kernel

# Upper bound on the fp32 logit buffers of one chunk (bytes; x2 with a teacher);
# env SDAR_TRITON_ROW_MB overrides.
ROW_SCRATCH_BYTES = int(os.environ.get("SDAR_TRITON_ROW_MB", "1024")) * (1 << 20)


def chunk_rows(n_tokens: int, vocab: int, with_teacher: bool,
               budget_bytes: Optional[int] = None) -> int:
    """Token rows per chunk: fp32 [C, V] buffers (two with a teacher) within the byte budget,
    fewer than N / 8 rows (no tensor of N * V / 8 elements), a power of two once >= 16."""
    budget = ROW_SCRATCH_BYTES if budget_bytes is None else budget_bytes
    per_row = 4 * max(vocab, 1) * (2 if with_teacher else 1)
    rows = max(1, min(budget // per_row, (n_tokens - 1) // 8))
    return 1 << (rows.bit_length() - 1) if rows >= 16 else rows


@dataclass(frozen=True)
class RowConfig:
    """Launch configuration of the row kernels: one program per token row, walking it in
    block_v-column steps. No tl.dot and a streaming loop: no software pipeline (num_stages 1);
    several programs per SM hide the load latency."""

    block_v: int
    num_warps: int = 8
    num_stages: int = 1

    def label(self) -> str:
        return f"1x{self.block_v} w{self.num_warps} s{self.num_stages}"

    def launch(self) -> dict:
        return {} if interpreting() else dict(num_warps=self.num_warps, num_stages=self.num_stages)


def row_config(vocab: int, with_teacher: bool) -> RowConfig:
    """GPU: up to 4096 columns per step (2048 with a teacher: two logit blocks live at once).
    Interpreter: about 4 steps per row, >= 64 columns (its cost is per step; V=123 still gets
    2 ragged steps)."""
    if interpreting():
        return RowConfig(max(64, triton.next_power_of_2(triton.cdiv(vocab, 4))))
    cap = 2048 if with_teacher else 4096
    return RowConfig(max(16, min(cap, triton.next_power_of_2(vocab))))


class TritonRows:
    """rowwise.RowOps with cuBLAS GEMMs and the Triton row kernels (fp32/bf16/fp16 inputs).

    hidden [N, H], weight [V, H], bias [V]; teacher_weight [V, H_T] and teacher_bias when a
    full-vocabulary divergence is on (cfg.divergence), else None.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                 teacher_bias: Optional[Tensor], cfg: LossConfig):
        div = cfg.divergence if teacher_hidden is not None else "none"
        # GEMM operands in hidden's dtype (an lm_head of another dtype is cast once per call; its
        # gradient still accumulates in fp32 and returns in its own dtype)
        weight = weight.detach().to(hidden.dtype)
        if teacher_hidden is not None:
            teacher_hidden, teacher_weight = teacher_hidden.to(hidden.dtype), teacher_weight.to(hidden.dtype)
        check_inputs(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias,
                     StatsSpec(temperature=cfg.temperature, divergence=div, jsd_beta=cfg.jsd_beta))
        self.dtype = hidden.dtype
        self.weight, self.bias = rowmajor(weight.detach()), rowmajor(None if bias is None else bias.detach())
        self.t_weight, self.t_bias = rowmajor(teacher_weight), rowmajor(teacher_bias)
        self.div = DIV_CODES[div]
        self.inv_tau, self.beta = 1.0 / cfg.temperature, float(cfg.jsd_beta)
        self.config = row_config(weight.shape[0], self.div != 0)

    def rows_per_chunk(self, n: int, v: int) -> int:
        return chunk_rows(n, v, self.div != 0)

    def operand(self, rows: Tensor) -> Tensor:
        return rows.to(self.dtype)  # the GEMMs take hidden's dtype (a no-op for it); mm_f32 accumulates in fp32

    def logits(self, h: Tensor, teacher: bool) -> Tensor:
        """fp32 [C, V] h W^T (no bias, no temperature: the row kernels apply them)."""
        return mm_f32(h, (self.t_weight if teacher else self.weight).T)

    def stats(self, z: Tensor, y: Tensor, zt: Optional[Tensor]):
        """(logp, entropy, div or None, state) of the rows; state = (z, zt, per-row stats)."""
        c, v = z.shape
        out = torch.empty((ROW_STATS, c), device=z.device, dtype=torch.float32)
        with _on_device(z):
            row_stats_kernel[(c,)](
                z, zt if zt is not None else z, _or(self.bias, z), _or(self.t_bias, z), y, out,
                v, z.stride(0), c, self.inv_tau, self.beta,
                BV=self.config.block_v, HAS_BIAS=self.bias is not None, HAS_TBIAS=self.t_bias is not None,
                DIV=self.div, **self.config.launch())
        div = out[R_DIV.value] if self.div else None
        return out[R_LOGP.value], out[R_ENT.value], div, (z, zt, out)

    def dlogits(self, state, y: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
                ent: Tensor, g_div: Optional[Tensor]) -> Tensor:
        """dL/dz / tau [C, V] in the GEMM dtype, written over the logits buffer z."""
        z, zt, st = state
        c, v = z.shape
        dz = z.view(self.dtype) if self.dtype != torch.float32 else z  # [C, 2V] 16-bit or [C, V]
        launch_dlogits(z, zt, self.bias, self.t_bias, y, st, g_logp, g_ent, g_div, dz,
                       self.div, self.inv_tau, self.beta, self.config, aliased=True)
        return dz[:, :v]

    def grad_hidden(self, dz: Tensor) -> Tensor:
        return mm_f32(dz, self.weight)

    def add_grad_weight(self, d_w: Tensor, dz: Tensor, h: Tensor) -> None:
        addmm_f32_(d_w, dz.T, h)

    def add_grad_bias(self, d_b: Tensor, dz: Tensor) -> None:
        d_b += dz.sum(0, dtype=torch.float32).to(d_b.dtype)


def launch_dlogits(z: Tensor, zt: Optional[Tensor], bias: Optional[Tensor], t_bias: Optional[Tensor],
                   y: Tensor, st: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
                   g_div: Optional[Tensor], dz: Tensor, div: int, inv_tau: float, beta: float,
                   config: RowConfig, aliased: bool) -> None:
    """One `row_dlogits_kernel` launch over the C rows of z (fp32 [C, V], row stride z.stride(0))
    into dz (row stride dz.stride(0), any float dtype); aliased: dz shares z's memory."""
    c, v = z.shape
    grads = [None if g is None else g.float().contiguous() for g in (g_logp, g_ent, g_div)]
    with _on_device(z):
        row_dlogits_kernel[(c,)](
            z, zt if zt is not None else z, _or(bias, z), _or(t_bias, z), y, st,
            _or(grads[0], st), _or(grads[1], st), _or(grads[2], st), dz,
            v, z.stride(0), dz.stride(0), c, inv_tau, beta,
            BV=config.block_v, HAS_BIAS=bias is not None, HAS_TBIAS=t_bias is not None,
            HAS_GL=grads[0] is not None, HAS_GE=grads[1] is not None,
            HAS_GD=grads[2] is not None and div != 0, DIV=div, ALIASED=aliased,
            INTERPRETED=interpreting(), **config.launch())


def _or(t: Optional[Tensor], default: Tensor) -> Tensor:
    return t if t is not None else default


def _on_device(t: Tensor):
    """Launch on the tensors' GPU, not on whatever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
