"""The PyTorch backend of the statistics contract (sdar_kernels/stats.py), chunked over tokens and vocab.

Logit tiles of at most ``token_chunk x vocab_chunk`` elements exist at any time; per-token state
is merged tile by tile with an online log-sum-exp. Every accumulator is kept *relative to the
running max* (sum e^(z-m) and sum e^(z-m) (z-m)), so the entropy and the KL terms never subtract two
numbers of the size of the logits (no cancellation at |z| ~ 1e4). The backward recomputes the
tiles; dW and db are accumulated in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from .stats import Stats, StatsSpec, accum_dtype


def _tiles(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], v0: int, v1: int, tau: float) -> Tensor:
    """(h W[v0:v1]^T + b[v0:v1]) / tau in h's (accumulation) dtype; h is already upcast."""
    wt = w[v0:v1].to(h.dtype).T
    z = torch.addmm(b[v0:v1].to(h.dtype), h, wt) if b is not None else h @ wt
    return z.div_(tau) if tau != 1.0 else z


@dataclass
class _Online:
    """Per-token running state of one tile sequence, all relative to the running max ``m``."""

    m: Tensor  # running max of student logits
    s: Tensor  # sum e^(z - m)
    e: Tensor  # sum e^(z - m) (z - m)   (entropy)
    mt: Optional[Tensor] = None  # teacher running max
    st: Optional[Tensor] = None  # teacher sum e^(zt - mt)
    a: Optional[Tensor] = None  # KL accumulator (see _tile_state)


def _tile_state(z: Tensor, zt: Optional[Tensor], divergence: str, with_entropy: bool) -> _Online:
    """State of one tile; overwrites z (and zt) with z - max in place to save a pass.
    The entropy accumulator is skipped (zeros) unless the entropy or reverse KL needs it."""
    m = z.amax(dim=1)
    d = z.sub_(m[:, None])
    ez = d.exp()
    need_e = with_entropy or divergence == "reverse_kl"
    st = _Online(m=m, s=ez.sum(1), e=torch.linalg.vecdot(ez, d) if need_e else torch.zeros_like(m))
    if zt is not None:
        st.mt = zt.amax(dim=1)
        dt = zt.sub_(st.mt[:, None])
        ezt = dt.exp()
        st.st = ezt.sum(1)
        if divergence == "reverse_kl":  # sum e^(z-m) ((z-m) - (zt-mt))
            st.a = st.e - torch.linalg.vecdot(ez, dt)
        elif divergence == "forward_kl":  # sum e^(zt-mt) ((zt-mt) - (z-m))
            st.a = torch.linalg.vecdot(ezt, dt) - torch.linalg.vecdot(ezt, d)
    return st


def _merge(x: _Online, y: _Online, divergence: str) -> _Online:
    m = torch.maximum(x.m, y.m)
    dx, dy = x.m - m, y.m - m  # <= 0
    fx, fy = dx.exp(), dy.exp()
    out = _Online(m=m, s=fx * x.s + fy * y.s, e=fx * (x.e + dx * x.s) + fy * (y.e + dy * y.s))
    if x.mt is not None:
        mt = torch.maximum(x.mt, y.mt)
        dtx, dty = x.mt - mt, y.mt - mt
        gx, gy = dtx.exp(), dty.exp()
        out.mt, out.st = mt, gx * x.st + gy * y.st
        if divergence == "reverse_kl":
            out.a = fx * (x.a + x.s * (dx - dtx)) + fy * (y.a + y.s * (dy - dty))
        elif divergence == "forward_kl":
            out.a = gx * (x.a + x.st * (dtx - dx)) + gy * (y.a + y.st * (dty - dy))
    return out


def _jsd_tile(lp: Tensor, lq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """log M and the per-element log p - log M for the JSD mixture M = beta q + (1-beta) p."""
    if beta == 0.0:
        lm = lp
    elif beta == 1.0:
        lm = lq
    else:
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
    return lm, lp - lm


@torch.no_grad()
def stats_forward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias,
                  spec: StatsSpec) -> Stats:
    """Per-token statistics (see sdar_kernels/stats.py); hidden [N, H], weight [V, H], targets [N]."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = accum_dtype(hidden.dtype)
    tau, div = spec.temperature, spec.divergence
    out = {k: hidden.new_empty(n, dtype=acc) for k in ("logp", "lse", "entropy", "div", "tlse", "aux")}
    with_teacher = div != "none"
    for t0, t1 in _tiles(n, spec.token_chunk):
        h = hidden[t0:t1].to(acc)
        ht = teacher_hidden[t0:t1].to(acc) if with_teacher else None
        y = targets[t0:t1]
        # NaN unless a tile holds y: a target outside [0, V) (host checks off) gives a NaN log-prob
        zy = torch.where((y >= 0) & (y < v), 0.0, float("nan")).to(h.dtype)
        state = None
        for v0, v1 in _tiles(v, spec.vocab_chunk):
            z = _logits(h, weight, bias, v0, v1, tau)
            zt = _logits(ht, teacher_weight, teacher_bias, v0, v1, tau) if with_teacher else None
            inside = (y >= v0) & (y < v1)
            zy += torch.where(inside, z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            tile = _tile_state(z, zt, div, spec.with_entropy)
            state = tile if state is None else _merge(state, tile, div)
        log_s = state.s.log()
        lse = state.m + log_s
        out["lse"][t0:t1] = lse
        out["logp"][t0:t1] = zy - lse
        out["entropy"][t0:t1] = log_s - state.e / state.s
        if with_teacher:
            log_st = state.st.log()
            out["tlse"][t0:t1] = state.mt + log_st
            if div == "reverse_kl":
                out["div"][t0:t1] = state.a / state.s - log_s + log_st
            elif div == "forward_kl":
                out["div"][t0:t1] = state.a / state.st - log_st + log_s
    if div == "jsd":
        _jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, spec, out)
    return Stats(
        logp=out["logp"], lse=out["lse"],
        entropy=out["entropy"] if spec.with_entropy else None,
        div=out["div"] if with_teacher else None,
        teacher_lse=out["tlse"] if with_teacher else None,
        div_aux=out["div"] if div == "reverse_kl" else (out["aux"] if div == "jsd" else None),
    )


def _jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, spec, out) -> None:
    """Second pass for the JSD: it needs both LSEs before it can form the mixture M."""
    acc = out["lse"].dtype
    beta = spec.jsd_beta
    for t0, t1 in _tiles(hidden.shape[0], spec.token_chunk):
        h, ht = hidden[t0:t1].to(acc), teacher_hidden[t0:t1].to(acc)
        lse, tlse = out["lse"][t0:t1, None], out["tlse"][t0:t1, None]
        kl_pm = h.new_zeros(t1 - t0)
        kl_qm = h.new_zeros(t1 - t0)
        for v0, v1 in _tiles(weight.shape[0], spec.vocab_chunk):
            lp = _logits(h, weight, bias, v0, v1, spec.temperature) - lse
            lq = _logits(ht, teacher_weight, teacher_bias, v0, v1, spec.temperature) - tlse
            lm, lp_m = _jsd_tile(lp, lq, beta)
            kl_pm += (lp.exp() * lp_m).sum(1)
            kl_qm += (lq.exp() * (lq - lm)).sum(1)
        out["aux"][t0:t1] = kl_pm
        out["div"][t0:t1] = beta * kl_qm + (1.0 - beta) * kl_pm


def div_grad(p: Tensor, lp: Tensor, lq: Tensor, aux: Optional[Tensor], g_div: Tensor, divergence: str,
             beta: float) -> Tensor:
    """g_div * dD/dz for one tile (sdar_kernels/stats.py): p, log p, log q [n, v]; aux = KL(p||q) for
    reverse_kl, KL(p||M) for jsd."""
    if divergence == "reverse_kl":
        return g_div[:, None] * p * (lp - lq - aux[:, None])
    if divergence == "forward_kl":
        return g_div[:, None] * (p - lq.exp())
    _, lp_m = _jsd_tile(lp, lq, beta)
    return ((1.0 - beta) * g_div)[:, None] * p * (lp_m - aux[:, None])


def _dlogits(z, lse, y_local, inside, g_logp, g_entropy, entropy, g_div, zt, tlse, div_aux, spec):
    """dL/dz for one tile (fp32/fp64), the per-token linear combination of sdar_kernels/stats.py.

    Overwrites z; the common case (log-prob gradient only) runs three in-place passes."""
    lp = z.sub_(lse[:, None])
    only_logp = g_entropy is None and g_div is None
    p = lp.exp_() if only_logp else lp.exp()
    if only_logp:
        dz = p.mul_(-g_logp[:, None])
    else:
        dz = p * (-g_logp[:, None]) if g_logp is not None else torch.zeros_like(p)
        if g_entropy is not None:
            dz -= g_entropy[:, None] * p * (lp + entropy[:, None])
        if g_div is not None:
            dz += div_grad(p, lp, zt.sub_(tlse[:, None]), div_aux, g_div, spec.divergence, spec.jsd_beta)
    if g_logp is not None:
        cols = y_local.clamp(0, z.shape[1] - 1)[:, None]
        dz.scatter_add_(1, cols, torch.where(inside, g_logp, 0.0)[:, None])
    return dz


@torch.no_grad()
def stats_backward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias,
                   spec: StatsSpec, stats: Stats, g_logp, g_entropy, g_div,
                   need_hidden: bool, need_weight: bool, need_bias: bool):
    """Gradients (dL/dh, dL/dW, dL/db) from per-token upstream gradients; see sdar_kernels/stats.py."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = accum_dtype(hidden.dtype)
    tau = spec.temperature
    if g_div is not None and spec.divergence == "none":
        g_div = None
    d_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    d_w = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device) if need_weight else None
    d_b = torch.zeros(v, dtype=accum_dtype(bias.dtype), device=bias.device) if need_bias else None
    if g_logp is None and g_entropy is None and g_div is None:
        return _cast(d_h, hidden), _cast(d_w, weight), _cast(d_b, bias)
    for t0, t1 in _tiles(n, spec.token_chunk):
        sl = slice(t0, t1)
        h = hidden[sl].to(acc)
        ht = teacher_hidden[sl].to(acc) if g_div is not None else None
        y = targets[sl]
        gl = g_logp[sl].to(acc) if g_logp is not None else None
        ge = g_entropy[sl].to(acc) if g_entropy is not None else None
        gd = g_div[sl].to(acc) if g_div is not None else None
        for v0, v1 in _tiles(v, spec.vocab_chunk):
            z = _logits(h, weight, bias, v0, v1, tau)
            zt = _logits(ht, teacher_weight, teacher_bias, v0, v1, tau) if gd is not None else None
            inside = (y >= v0) & (y < v1)
            dz = _dlogits(
                z, stats.lse[sl], y - v0, inside, gl, ge,
                stats.entropy[sl] if ge is not None else None, gd, zt,
                stats.teacher_lse[sl] if gd is not None else None,
                stats.div_aux[sl] if (gd is not None and stats.div_aux is not None) else None, spec,
            )
            if tau != 1.0:
                dz.div_(tau)
            if d_h is not None:
                d_h[sl].addmm_(dz, weight[v0:v1].to(acc))
            if d_w is not None:
                d_w[v0:v1].addmm_(dz.T.to(d_w.dtype), h.to(d_w.dtype))
            if d_b is not None:
                d_b[v0:v1] += dz.sum(0).to(d_b.dtype)
    return _cast(d_h, hidden), _cast(d_w, weight), _cast(d_b, bias)


def _cast(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)
