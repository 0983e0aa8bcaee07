"""Per-token vocabulary statistics: the contract every fused-linear backend implements.

A backend turns hidden states and an lm_head into O(N) numbers without an [N, V] tensor:

    z_i = (W h_i + b) / tau                       student logits, never materialized
    logp_i = z_i[y_i] - LSE(z_i)                  target log-prob
    entropy_i = LSE(z_i) - sum_v p_i(v) z_i(v)    (when ``with_entropy``)
    div_i = D(p_i, q_i)                           (when ``divergence != "none"``)

with q_i = softmax((W_T h_T_i + b_T) / tau) the teacher's distribution. The backward takes a
per-token upstream gradient for each output and forms, tile by tile,

    dL/dz_i = g_logp_i (e_{y_i} - p_i) - g_ent_i p_i (log p_i + H_i) + g_div_i dD_i/dz_i

    reverse_kl  D = KL(p||q)            dD/dz = p (log p - log q - D)
    forward_kl  D = KL(q||p)            dD/dz = p - q
    jsd         D = b KL(q||M) + (1-b) KL(p||M),  M = b q + (1-b) p
                                        dD/dz = (1-b) p (log p - log M - KL(p||M))

then dL/dh = (dL/dz) W / tau, dL/dW = (dL/dz)^T h / tau, dL/db = sum_i dL/dz_i / tau.
The teacher never receives a gradient.

Backends (``chunked.py`` for PyTorch, ``triton_backend`` for GPUs) expose two functions with
the signatures of :func:`stats_forward` and :func:`stats_backward` below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

DIVERGENCES = ("none", "reverse_kl", "forward_kl", "jsd")


@dataclass(frozen=True)
class StatsSpec:
    """Static options of one statistics pass.

    temperature: logits are divided by it (> 0).
    with_entropy: also return the entropy of p_i.
    divergence: one of DIVERGENCES; anything but "none" needs teacher inputs.
    jsd_beta: weight b of the teacher in the JSD mixture, in [0, 1].
    token_chunk, vocab_chunk: tile sizes of the PyTorch backend (other backends pick their own).
    """

    temperature: float = 1.0
    with_entropy: bool = False
    divergence: str = "none"
    jsd_beta: float = 0.5
    token_chunk: int = 1024
    vocab_chunk: int = 2048


@dataclass
class Stats:
    """Per-token statistics, all [N] in the accumulation dtype (fp32, or fp64 for fp64 input).

    logp: log p_i(y_i). lse: LSE(z_i), saved for the backward.
    entropy: H_i or None. div: D_i or None. teacher_lse: LSE of teacher logits or None.
    div_aux: what the divergence gradient needs besides the LSEs: KL(p||q) for reverse_kl
    (equal to div), KL(p||M) for jsd, None otherwise.
    """

    logp: Tensor
    lse: Tensor
    entropy: Optional[Tensor] = None
    div: Optional[Tensor] = None
    teacher_lse: Optional[Tensor] = None
    div_aux: Optional[Tensor] = None


class StatsBackend(Protocol):
    def stats_forward(
        self,
        hidden: Tensor,  # [N, H], any float dtype
        weight: Tensor,  # [V, H]
        bias: Optional[Tensor],  # [V] or None
        targets: Tensor,  # [N] int64 in [0, V)
        teacher_hidden: Optional[Tensor],  # [N, H_T] or None
        teacher_weight: Optional[Tensor],  # [V, H_T] or None
        teacher_bias: Optional[Tensor],  # [V] or None
        spec: StatsSpec,
    ) -> Stats: ...

    def stats_backward(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        targets: Tensor,
        teacher_hidden: Optional[Tensor],
        teacher_weight: Optional[Tensor],
        teacher_bias: Optional[Tensor],
        spec: StatsSpec,
        stats: Stats,
        g_logp: Optional[Tensor],  # [N] accumulation dtype or None (= zero)
        g_entropy: Optional[Tensor],
        g_div: Optional[Tensor],
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Returns (dL/dh [N, H] in hidden.dtype, dL/dW [V, H] in weight.dtype,
        dL/db [V] in bias.dtype); an entry is None when not requested. dW and db are
        accumulated in fp32 (fp64 for fp64 inputs) before the cast."""
        ...


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
