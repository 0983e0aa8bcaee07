"""Top-k distillation: forward KL from a teacher that sends only its top-k log-probs per token.

Inputs per token i: the teacher's top-k ids K_i [k] and log-probs log q_i(K_i) [k] (full-vocabulary
log-probs at those ids, e.g. what a separately served teacher returns). The student's log-probs at
the same ids come without an [N, V] tensor and without an [N, k, H] one:

    z_ij = W[K_ij] . h_i + b[K_ij]       k dot products per token (_GatherDot, token chunks)
    LSE_i = z_iy / tau - log p_i(y_i)     the fused statistics pass returns log p_i(y_i) for one id
                                          y_i differentiably, so its LSE gradient flows through that
                                          pass's own backward (Triton or torch)
    log p_i(K_ij) = z_ij / tau - LSE_i

Variants (``tail``), all KL(teacher || student) over a k- or (k+1)-point distribution:

    renorm     q~ = q / sum_K q, p~ = p / sum_K p:   D = sum_j q~_j (log q~_j - log p~_j)
               (log p~ = log_softmax(z_K / tau): the LSE cancels, only the k dot products matter)
    tail       the k ids plus one tail bucket on each side, q_T = 1 - sum_K q, p_T = 1 - sum_K p:
               D = sum_j q_j (log q_j - log p_j) + q_T (log q_T - log p_T)
    truncated  verl 0.9.1's forward_kl_topk: D = max(sum_j q_j (log q_j - log p_j), 0)

With k = V, renorm and tail are exactly KL(q || p) over the vocabulary. docs/topk_distillation.md
has the gradients, the floor on p_T and how to feed a teacher's top-k output.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dtensor import localize
from .input_checks import check_values
from .linear_stats import _validate, linear_stats
from .loss import _follow_hidden_dtype, _own_precision
from .stats import StatsSpec, accum_dtype

TOPK_TAILS = ("renorm", "tail", "truncated")
# log p_T uses max(p_T, TAIL_FLOOR) with gradient dp_T / max(p_T, TAIL_FLOOR): exact above the
# floor, bounded below it (the tail gradient is a difference of two p-sized terms scaled by
# q_T / p_T; unbounded, fp32 rounding of the logits would dominate it).
TAIL_FLOOR = 1e-6
# Teacher top-k probabilities may sum above 1 by this much (rounding in the teacher's serving
# stack); the tail mass is clamped at 0 there. More raises a ValueError.
SUM_TOLERANCE = 1e-3
# Elements of one gathered [chunk, m, H] weight block (the only O(k H) temporary).
GATHER_ELEMENTS = 1 << 22


def _chunks(n: int, m: int, h: int, token_chunk: int):
    size = max(1, min(token_chunk, GATHER_ELEMENTS // max(1, m * h)))
    for a in range(0, n, size):
        yield a, min(a + size, n)


class _GatherDot(torch.autograd.Function):
    """z[n, j] = W[ids[n, j]] . h[n] + b[ids[n, j]] in the accumulation dtype, chunked over tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, token_chunk):
        n, h = hidden.shape
        acc = accum_dtype(hidden.dtype)
        z = hidden.new_empty((n, ids.shape[1]), dtype=acc)
        for a, b in _chunks(n, ids.shape[1], h, token_chunk):
            w = weight[ids[a:b]].to(acc)  # [c, m, H]
            z[a:b] = torch.bmm(w, hidden[a:b, :, None].to(acc))[:, :, 0]
        if bias is not None:
            z += bias[ids].to(acc)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.token_chunk = token_chunk
        return z

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, ids = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, h = hidden.shape
        acc = g.dtype
        dh = torch.empty((n, h), dtype=acc, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for a, b in _chunks(n, ids.shape[1], h, ctx.token_chunk):
            idx, gc = ids[a:b], g[a:b]
            if need_h:
                dh[a:b] = torch.bmm(gc[:, None, :], weight[idx].to(acc))[:, 0]
            if need_w:
                dw.index_add_(0, idx.reshape(-1), (gc[:, :, None] * hidden[a:b, None, :].to(acc)).reshape(-1, h))
        db = None
        if need_b and bias is not None:
            db = torch.zeros(bias.shape, dtype=acc, device=bias.device).index_add_(0, ids.reshape(-1), g.reshape(-1))
            db = db.to(bias.dtype)
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None, db, None, None)


def gather_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                  token_chunk: int = 1024) -> Tensor:
    """Raw logits W[ids] h + b[ids]: hidden [n, H], weight [V, H], ids [n, m] int64 -> [n, m] in the
    accumulation dtype (fp32; fp64 for fp64 input), differentiable w.r.t. hidden, weight and bias.
    Memory: one [chunk, m, H] gathered block at a time (GATHER_ELEMENTS), never [n, m, H]."""
    return _GatherDot.apply(hidden, weight, bias, ids.long(), token_chunk)


def topk_divergence(z_topk: Tensor, lse: Optional[Tensor], teacher_logprobs: Tensor, temperature: float,
                    tail: str, logprob_min: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token D and the student's top-k mass (detached) from raw student logits at the ids.

    z_topk [n, k] raw logits (before 1/tau); lse [n] the student's LSE of z / tau (None allowed for
    "renorm", which does not need it; the mass is then None); teacher_logprobs [n, k] full-vocabulary
    teacher log-probs at the ids (-inf allowed: probability 0). logprob_min ("truncated" only): both
    log-prob sets clamped below at it first, as verl's log_prob_min_clamp (no gradient below it).
    """
    zs = z_topk / temperature
    lq = teacher_logprobs.to(zs.dtype)
    q = lq.exp()
    lq_safe = torch.where(q > 0, lq, torch.zeros_like(lq))  # 0 * log 0 = 0
    ls = None if lse is None else zs - lse[:, None]
    mass = None if ls is None else torch.logsumexp(ls.detach(), -1).exp()
    if logprob_min is not None:
        ls, lq = ls.clamp_min(logprob_min), lq.clamp_min(logprob_min)
        q, lq_safe = lq.exp(), lq
    if tail == "renorm":
        lq_n = lq - torch.logsumexp(lq, -1, keepdim=True)
        qn = lq_n.exp()
        ls_n = zs - torch.logsumexp(zs, -1, keepdim=True)
        d = (qn * (torch.where(qn > 0, lq_n, torch.zeros_like(lq_n)) - ls_n)).sum(-1)
        return d, mass
    head = (q * (lq_safe - ls)).sum(-1)
    if tail == "truncated":
        return head.clamp_min(0.0), mass
    q_tail = (-torch.expm1(torch.logsumexp(lq, -1))).clamp_min(0.0)
    p_tail = -torch.expm1(torch.logsumexp(ls, -1))
    floor = p_tail.detach().clamp_min(TAIL_FLOOR)
    log_p_tail = floor.log() + (p_tail - p_tail.detach()) / floor
    return head + torch.xlogy(q_tail, q_tail) - q_tail * log_p_tail, mass


def check_topk_inputs(n: int, vocab: int, ids: Tensor, logprobs: Tensor, loss_mask: Optional[Tensor],
                      values: bool) -> tuple[Tensor, Tensor]:
    """Shape checks (always) and value checks on loss tokens (``values``: one host sync).
    Returns ids [N, k] int64 and log-probs [N, k] ([B, T, k] inputs are flattened to N = B T)."""
    if ids is None or logprobs is None:
        raise ValueError("divergence='topk_forward_kl' needs teacher_topk_ids and teacher_topk_logprobs "
                         "[N, k] (the teacher's top-k token ids and their log-probs)")
    if ids.dim() < 2 or tuple(ids.shape) != tuple(logprobs.shape):
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs must both be [N, k]; got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    k = ids.shape[-1]
    if k < 1:
        raise ValueError(f"teacher_topk_ids must have k >= 1 ids per token; got shape {tuple(ids.shape)}")
    if ids.numel() // k != n:
        raise ValueError(f"teacher_topk_ids must be [N={n}, k]; got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32) or not logprobs.is_floating_point():
        raise ValueError(f"teacher_topk_ids must be int64/int32 and teacher_topk_logprobs floating point; "
                         f"got {ids.dtype} and {logprobs.dtype}")
    if k > vocab:
        raise ValueError(f"teacher_topk_ids has k={k} ids per token but the vocabulary has V={vocab}")
    ids, logprobs = ids.reshape(n, k).long(), logprobs.reshape(n, k)
    if values and n:
        rows = torch.ones(n, dtype=torch.bool, device=ids.device) if loss_mask is None else loss_mask.reshape(n) != 0
        _check_values(ids[rows], logprobs[rows], rows.nonzero()[:, 0], vocab)
    return ids, logprobs


def _check_values(ids: Tensor, lq: Tensor, token: Tensor, vocab: int) -> None:
    if ids.shape[0] == 0:
        return
    lq = lq.double()
    srt = ids.sort(-1).values
    bad = {
        "out_of_range": ((ids < 0) | (ids >= vocab)).any(-1),
        "duplicate": (srt[:, 1:] == srt[:, :-1]).any(-1),
        "not_finite": (torch.isnan(lq) | (lq == float("inf"))).any(-1),
        "all_zero": (lq == float("-inf")).all(-1),
        "sum": torch.logsumexp(lq, -1) > torch.log1p(torch.tensor(SUM_TOLERANCE, dtype=lq.dtype)),
    }
    flags = torch.stack([v for v in bad.values()], 0)
    if not bool(flags.any()):  # the one host sync
        return
    kind, row = (int(x) for x in flags.nonzero()[0])
    i = int(token[row])
    name = list(bad)[kind]
    if name == "out_of_range":
        raise ValueError(f"teacher_topk_ids at token {i} holds an id outside [0, V={vocab}): {ids[row].tolist()}")
    if name == "duplicate":
        raise ValueError(f"teacher_topk_ids at token {i} repeats an id ({ids[row].tolist()}); "
                         "top-k ids must be distinct")
    if name == "not_finite":
        raise ValueError(f"teacher_topk_logprobs at token {i} holds NaN or +inf; expected log-probs <= 0 "
                         "(-inf allowed for probability 0)")
    if name == "all_zero":
        raise ValueError(f"teacher_topk_logprobs at token {i} is -inf at every id; at least one must be finite")
    total = float(torch.logsumexp(lq[row], -1).exp())
    raise ValueError(f"teacher_topk_logprobs at token {i} sum to probability {total:.6g} > 1 "
                     f"(tolerance {SUM_TOLERANCE}); expected full-vocabulary log-probs of the teacher "
                     "(log_softmax over V, not raw logits)")


def topk_forward_kl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], lse_ids: Optional[Tensor],
                    lse_logp: Optional[Tensor], topk_ids: Tensor, topk_logprobs: Tensor,
                    loss_mask: Optional[Tensor], temperature: float, tail: str, token_chunk: int = 1024,
                    logprob_min: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token top-k forward KL D [N] (0 off the mask) and the student's top-k mass [N] (detached).

    hidden [N, H], weight [V, H], bias [V] or None; lse_ids [N] int64 and lse_logp [N]: one id per
    token and the student's differentiable log-prob there from the fused pass (it carries the LSE
    and its gradient; unused, may be None, for "renorm"); topk_ids / topk_logprobs [N, k] already
    checked (check_topk_inputs). Differentiable w.r.t. hidden, weight, bias and lse_logp.
    """
    n = hidden.shape[0]
    acc = accum_dtype(hidden.dtype)
    index = None if loss_mask is None else (loss_mask != 0).nonzero()[:, 0]
    if index is not None and index.numel() == n:
        index = None
    pick = (lambda t: t) if index is None else (lambda t: None if t is None else t.index_select(0, index))  # noqa: E731
    h, ids, lq = pick(hidden), pick(topk_ids), pick(topk_logprobs)
    need_lse = tail != "renorm" or lse_ids is not None
    if need_lse and (lse_ids is None or lse_logp is None):
        raise ValueError(f"topk tail={tail!r} needs the student's LSE: pass lse_ids and lse_logp")
    cols = torch.cat([ids, pick(lse_ids).long()[:, None]], 1) if need_lse else ids
    z = gather_logits(h, weight, bias, cols, token_chunk)
    lse = z[:, -1] / temperature - pick(lse_logp).to(acc) if need_lse else None
    d, mass = topk_divergence(z[:, : ids.shape[1]], lse, lq, temperature, tail, logprob_min)
    if index is None:
        return d, mass
    full = lambda x: None if x is None else x.new_zeros(n).index_copy(0, index, x)  # noqa: E731
    return full(d), full(mass)


@localize  # DTensor (FSDP2) weight / bias: gathered differentiably, as for fused_linear_sdar_loss
@_own_precision
def fused_linear_topk_kl(hidden: Tensor, weight: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, *,
                         tail: str = "renorm", temperature: float = 1.0, bias: Optional[Tensor] = None,
                         mask: Optional[Tensor] = None, backend: str = "auto", token_chunk: int = 1024,
                         vocab_chunk: int = 2048, check_inputs: bool = True,
                         logprob_min: Optional[float] = None) -> Tensor:
    """Per-token top-k forward KL(teacher || student) [N] (0 where mask is 0), no [N, V] logits.

    hidden [N, H], weight [V, H] (the lm_head), bias [V] optional; topk_ids [N, k] int64 and
    topk_logprobs [N, k]: the teacher's top-k ids and its full-vocabulary log-probs there; student
    logits are (W h + b) / temperature. tail: "renorm", "tail" or "truncated" (module docstring);
    logprob_min: verl's log_prob_min_clamp, "truncated" only.
    "renorm" costs k dot products per token; "tail" / "truncated" add one fused statistics pass for
    the LSE (read at the first top-k id, so no sampled targets are needed). Returns fp32 (fp64 for
    fp64 input), differentiable w.r.t. hidden, weight and bias: your own aggregation goes on top.
    """
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail={tail!r} is invalid; valid choices: {', '.join(TOPK_TAILS)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid; expected a number > 0")
    if logprob_min is not None and (tail != "truncated" or not logprob_min < 0):
        raise ValueError(f"logprob_min={logprob_min!r} is invalid; expected None, or a number < 0 "
                         "with tail='truncated'")
    if not isinstance(token_chunk, int) or token_chunk < 1:
        raise ValueError(f"token_chunk={token_chunk!r} is invalid; expected an integer >= 1")
    _validate(hidden, weight, bias, hidden.new_zeros(hidden.shape[:1], dtype=torch.long), None, None, None,
              StatsSpec())
    n = hidden.shape[0]
    if mask is not None and tuple(mask.shape) != (n,):
        raise ValueError(f"mask must be [N]={n}; got shape {tuple(mask.shape)}")
    ids, lq = check_topk_inputs(n, weight.shape[0], topk_ids, topk_logprobs, mask, check_inputs)
    first = ids[:, 0]  # any id carries the LSE: log p(first) from the fused pass
    if check_inputs:
        check_values(mask, weight.shape[0], first, {"hidden": hidden}, {"weight": weight})
    if backend == "reference":
        from .reference import _log_softmax, reference_topk_divergence

        lp = _log_softmax(hidden, weight, bias, temperature, torch.float64)
        keep = torch.ones(n, device=hidden.device) if mask is None else mask
        return reference_topk_divergence(lp, ids, lq, keep, tail, logprob_min)
    cast = _follow_hidden_dtype(hidden, backend, weight=weight, bias=bias)
    weight, bias = cast["weight"], cast["bias"]
    logp = None
    if tail != "renorm":
        spec = StatsSpec(temperature=temperature, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        logp = linear_stats(hidden, weight, first, spec, bias=bias, mask=mask, backend=backend,
                            check_inputs=False).logp
    d, _ = topk_forward_kl(hidden, weight, bias, first if logp is not None else None, logp, ids, lq, mask,
                           temperature, tail, token_chunk, logprob_min)
    return d
