"""Gradients-in-forward for a scalar loss: 3 lm_head GEMM passes instead of 4.

``fused_linear_sdar_loss`` returns a scalar, and the SDAR loss is a sum of per-token terms with
logit-independent weights (terms.token_weights), so each token's coefficients dL/ds_i, dL/dH_i,
dL/dD_i are known as soon as that token's statistics are. This path therefore takes a chunk of
tokens with *whole vocabulary rows* (the chunk is sized so that no tensor reaches N*V/8 elements
or the row budget), computes the statistics, the coefficients and dL/dz from the same logits,
and accumulates dL/dh and dL/dW right away; the backward only scales them by the scalar upstream
gradient (exact for any use of a scalar loss). Liger's FLCE does the same for cross-entropy.

One chunk loop (`_RowLossFn`), two sets of row ops (`RowOps`): `TorchRows` (torch ops in the
accumulation dtype, any device) and `triton_backend.rows.TritonRows` (cuBLAS GEMMs with fp32
output and Triton row kernels, the GPU "3-pass path").
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from . import terms
from .chunked import _jsd_tile, _logits, div_grad
from .config import LossConfig
from .gemm import addmm_f32_, mm_f32
from .linear_stats import resolve_backend
from .stats import accum_dtype

ROW_BUDGET = 1 << 25  # elements of one [rows, V] fp32 tile (128 MiB)


def row_chunk(n: int, v: int, cfg: LossConfig) -> int:
    """Rows per chunk: at most token_chunk and ROW_BUDGET / V, and fewer than N / 8 rows, so that no
    tile reaches N * V / 8 elements. Wide chunks matter: on 2 CPU cores 255-row chunks ran 1.17x
    naive PyTorch where 64-row chunks ran 1.76x (N=2048, H=896, V=32768, fp32)."""
    return max(1, min(cfg.token_chunk, ROW_BUDGET // max(v, 1), (n - 1) // 8))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[i, v] b[i, v] as a batched GEMV: no [rows, V] temporary (vecdot makes one on CPU)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _row_stats(z: Tensor, y: Tensor, zt: Optional[Tensor], cfg: LossConfig):
    """logp, entropy, divergence and the log-probabilities of whole rows.

    Two [rows, V] buffers: z becomes log p in place, p is the other."""
    d = z.sub_(z.amax(1)[:, None])  # z - max: exact 0 at the max, no rounding of a large lse
    p = d.exp()
    lp = d.sub_(p.sum(1).log_()[:, None])
    torch.exp(lp, out=p)  # p = exp(log p): consistent with lp to the last bit
    logp = lp.gather(1, y[:, None])[:, 0]
    entropy = -_rowdot(p, lp)
    if zt is None:
        return logp, entropy, None, lp, p, None, None
    lq = zt.sub_(torch.logsumexp(zt, 1)[:, None])
    if cfg.divergence == "reverse_kl":
        div = _rowdot(p, lp - lq)
        return logp, entropy, div, lp, p, lq, div
    if cfg.divergence == "forward_kl":
        return logp, entropy, _rowdot(lq.exp(), lq - lp), lp, p, lq, None
    lm, lp_m = _jsd_tile(lp, lq, cfg.jsd_beta)
    kl_pm = _rowdot(p, lp_m)
    div = cfg.jsd_beta * _rowdot(lq.exp(), lq - lm) + (1 - cfg.jsd_beta) * kl_pm
    return logp, entropy, div, lp, p, lq, kl_pm


def _coefficients(logp, entropy, div, rows: dict, cfg: LossConfig):
    """Weighted chunk loss and its per-token gradients w.r.t. (logp, entropy, div)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) if x is not None else None for x in (logp, entropy, div)]
        tt = terms.token_terms(leaves[0], leaves[1], leaves[2], rows["adv"], rows["old"], rows["teacher"],
                               rows["ref"], cfg, importance_weights=rows["iw"])
        loss = terms.token_loss(tt, leaves[1], cfg, rows["w"], rows["w_ent"]).sum()
        if not loss.requires_grad:  # every coefficient is zero: nothing depends on the logits
            return loss.detach(), [None, None, None]
        wanted = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return loss.detach(), [next(grads) if x is not None else None for x in leaves]


def _dlogits(p, lp, y, g_logp, g_ent, entropy, g_div, lq, aux, cfg: LossConfig) -> Tensor:
    """dL/dz of whole rows; overwrites p (no third [rows, V] buffer in the common case)."""
    only_logp = g_ent is None and g_div is None  # then p is not needed again: reuse its buffer
    if g_logp is None:
        dz = torch.zeros_like(p)
    else:
        dz = p.mul_(-g_logp[:, None]) if only_logp else p * (-g_logp[:, None])
        dz.scatter_add_(1, y[:, None], g_logp[:, None])
    if g_ent is not None:
        dz -= g_ent[:, None] * p * (lp + entropy[:, None])
    if g_div is not None:
        dz += div_grad(p, lp, lq, aux, g_div, cfg.divergence, cfg.jsd_beta)
    return dz


class RowOps(Protocol):
    """The per-chunk steps of the row loop that touch [C, V] data: the logits GEMM, the row
    statistics, dL/dz, and the gradient GEMMs. `TorchRows` (below) runs them as torch ops in the
    accumulation dtype; `triton_backend.rows.TritonRows` as cuBLAS GEMMs + Triton row kernels."""

    def rows_per_chunk(self, n: int, v: int) -> int:
        """Token rows C per chunk for n active tokens and vocabulary v."""

    def operand(self, rows: Tensor) -> Tensor:
        """Hidden rows [C, H] (student or teacher) as the GEMM operand."""

    def logits(self, h: Tensor, teacher: bool) -> Tensor:
        """[C, V] logits of the student (teacher=False) or the teacher."""

    def stats(self, z: Tensor, y: Tensor, zt: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Any]:
        """(logp [C], entropy [C], div [C] or None, state for dlogits); may overwrite z, zt."""

    def dlogits(self, state: Any, y: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
                ent: Tensor, g_div: Optional[Tensor]) -> Tensor:
        """dL/dz / tau [C, V] from the per-row coefficients (None = 0); may reuse the state's buffers."""

    def grad_hidden(self, dz: Tensor) -> Tensor:
        """dz W: [C, H] in the accumulation dtype."""

    def add_grad_weight(self, d_w: Tensor, dz: Tensor, h: Tensor) -> None:
        """d_w += dz^T h (d_w [V, H] in the accumulation dtype)."""

    def add_grad_bias(self, d_b: Tensor, dz: Tensor) -> None:
        """d_b += column sums of dz."""


class TorchRows:
    """RowOps of the PyTorch backend: row statistics and dL/dz in the accumulation dtype (fp32,
    fp64 for fp64). GEMMs: 16-bit inputs on a GPU run on tensor cores with fp32 output and fp32
    accumulation (sdar_kernels/gemm.py; no fp32 copy of W, dL/dz rounded to the input dtype for the
    gradient GEMMs, as the Triton paths do); elsewhere in the accumulation dtype on upcast operands."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], data: dict, cfg: LossConfig):
        self.acc = accum_dtype(hidden.dtype)
        self.gemm16 = hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)
        self.dtype = hidden.dtype
        # once, not per chunk (a no-op for fp32 weights; none for 16-bit GPU GEMMs)
        self.w = weight.detach().to(self.dtype) if self.gemm16 else weight.to(self.acc)
        self.bias, self.cfg = bias, cfg
        self.t_weight, self.t_bias = data["teacher_weight"], data["teacher_bias"]
        if self.gemm16 and self.t_weight is not None:
            self.t_weight = self.t_weight.to(self.dtype)

    def rows_per_chunk(self, n: int, v: int) -> int:
        return row_chunk(n, v, self.cfg)

    def operand(self, rows: Tensor) -> Tensor:
        return rows.to(self.dtype) if self.gemm16 else rows.to(self.acc)

    def logits(self, h: Tensor, teacher: bool) -> Tensor:
        w, b = (self.t_weight, self.t_bias) if teacher else (self.w, self.bias)
        if not self.gemm16:
            return _logits(h, w, b, 0, w.shape[0], self.cfg.temperature)
        z = mm_f32(h, w.T)
        if b is not None:
            z += b.float()
        return z.div_(self.cfg.temperature) if self.cfg.temperature != 1.0 else z

    def stats(self, z, y, zt):
        logp, ent, div, lp, p, lq, aux = _row_stats(z, y, zt, self.cfg)
        return logp, ent, div, (lp, p, lq, aux)

    def dlogits(self, state, y, g_logp, g_ent, ent, g_div) -> Tensor:
        lp, p, lq, aux = state
        dz = _dlogits(p, lp, y, g_logp, g_ent, ent, g_div, lq, aux, self.cfg)
        dz = dz.div_(self.cfg.temperature) if self.cfg.temperature != 1.0 else dz
        return dz.to(self.dtype) if self.gemm16 else dz

    def grad_hidden(self, dz: Tensor) -> Tensor:
        return mm_f32(dz, self.w) if self.gemm16 else dz @ self.w

    def add_grad_weight(self, d_w: Tensor, dz: Tensor, h: Tensor) -> None:
        if self.gemm16:
            addmm_f32_(d_w, dz.T, h)
        else:
            d_w.addmm_(dz.T.to(d_w.dtype), h.to(d_w.dtype))

    def add_grad_bias(self, d_b: Tensor, dz: Tensor) -> None:
        d_b += dz.sum(0, dtype=d_b.dtype)


class _RowLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, data: dict, cfg: LossConfig, out: dict, ops: RowOps):
        n, v = hidden.shape[0], weight.shape[0]
        acc = accum_dtype(hidden.dtype)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        d_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device) if need_w else None
        d_b = torch.zeros(v, dtype=accum_dtype(bias.dtype), device=bias.device) if need_b else None
        stats = {k: hidden.new_zeros(n, dtype=acc) for k in ("logp", "entropy", "div")}
        loss = hidden.new_zeros((), dtype=acc)
        index = data["index"]
        step = ops.rows_per_chunk(index.numel(), v)
        for c0 in range(0, index.numel(), step):
            r = index[c0:c0 + step]
            h = ops.operand(hidden[r])
            y = data["targets"][r]
            zt = None
            if data["teacher_hidden"] is not None:
                zt = ops.logits(ops.operand(data["teacher_hidden"][r]), teacher=True)
            logp, ent, div, state = ops.stats(ops.logits(h, teacher=False), y, zt)
            rows = {k: (data[k][r] if data[k] is not None else None)
                    for k in ("adv", "old", "teacher", "ref", "w", "w_ent", "iw")}
            chunk_loss, (g_logp, g_ent, g_div) = _coefficients(logp, ent, div, rows, cfg)
            loss += chunk_loss
            for k, x in (("logp", logp), ("entropy", ent), ("div", div)):
                if x is not None:
                    stats[k][r] = x
            if g_logp is not None or g_ent is not None or g_div is not None:
                dz = ops.dlogits(state, y, g_logp, g_ent, ent, g_div)
                if d_h is not None:
                    d_h[r] = ops.grad_hidden(dz)
                if d_w is not None:
                    ops.add_grad_weight(d_w, dz, h)
                if d_b is not None:
                    ops.add_grad_bias(d_b, dz)
                del dz
            del state, zt  # free this chunk's [rows, V] tiles before the next one is made
        out.update(stats)
        # Held on ctx (not save_for_backward) so that backward can hand them over without a
        # second reference: AccumulateGrad then adopts the buffer instead of copying [V, H].
        ctx.grads = [d_h, d_w, d_b]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("the grad-in-forward SDAR loss supports a single backward; use "
                               "LossConfig(grad_in_forward=False) for retain_graph / double backward")
        held, ctx.grads = ctx.grads, None
        # scaled in place and handed over: no second [V, H] buffer
        grads = [None if g is None else g.mul_(grad).to(dt) for g, dt in zip(held, ctx.dtypes)]
        del held
        return grads[0], grads[1], grads[2], None, None, None, None


def _row_ops(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], data: dict, cfg: LossConfig) -> RowOps:
    """Triton row ops for backend "triton" (explicit, or "auto" on CUDA) and 32/16-bit inputs; torch
    ops otherwise (fp64 keeps fp64 accumulation, as the Triton statistics backend does)."""
    if resolve_backend(cfg.backend, hidden.device) == "triton" and hidden.dtype != torch.float64:
        from .triton_backend.rows import TritonRows

        return TritonRows(hidden, weight, bias, data["targets"], data["teacher_hidden"], data["teacher_weight"],
                          data["teacher_bias"], cfg)
    return TorchRows(hidden, weight, bias, data, cfg)


def rowwise_sdar_loss(hidden, weight, bias, targets, mask, weights, advantages, old, teacher, ref,
                      teacher_hidden, teacher_weight, teacher_bias, cfg: LossConfig, *, entropy_weights=None,
                      importance_weights=None):
    """(loss, per-token logp, entropy, div) with gradients computed in the forward; see module doc.

    Per-token terms only (LossConfig.ratio_level "token"): a token's coefficients are known from its
    own statistics. old None = on-policy; entropy_weights (default weights) and importance_weights
    [N] as in terms.token_loss / token_terms."""
    if cfg.ratio_level != "token":
        raise ValueError(f"LossConfig.ratio_level={cfg.ratio_level!r} couples a sequence's tokens; the row path "
                         "needs per-token terms (fused_linear_sdar_loss routes it to linear_stats + epilogue)")
    data = {
        "index": (mask != 0).nonzero().squeeze(1), "targets": targets.long(), "adv": advantages,
        "old": old, "teacher": teacher, "ref": ref, "w": weights, "w_ent": entropy_weights,
        "iw": importance_weights,
        "teacher_hidden": teacher_hidden.detach() if teacher_hidden is not None else None,
        "teacher_weight": teacher_weight.detach() if teacher_weight is not None else None,
        "teacher_bias": teacher_bias.detach() if teacher_bias is not None else None,
    }
    out: dict = {}
    loss = _RowLossFn.apply(hidden, weight, bias, data, cfg, out, _row_ops(hidden, weight, bias, data, cfg))
    return loss, out["logp"], out["entropy"], (out["div"] if teacher_hidden is not None else None)

