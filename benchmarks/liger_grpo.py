"""Liger-Kernel's chunked GRPO loss (liger-kernel 0.8.5) with settings matched to sdar_kernels.

``LigerFusedLinearGRPOLoss`` is plain PyTorch (token chunks x 4096-column vocabulary chunks,
recompute backward), so it runs on the CPU as well as on CUDA. Settings that give the same loss
and gradients as ``fused_linear_sdar_loss(config=matched_config(loss_type))`` (checked to ~1e-6
relative in fp32 by tests/benchmarks/test_liger_grpo.py):

    Liger                                     sdar_kernels LossConfig
    loss_type="grpo" (seq mean, / B)          preset "grpo", agg="seq-mean-token-mean",
                                              segment_ids = sequence of each token, normalizer = B
    loss_type="bnpo" (/ loss tokens)          preset "grpo", agg="token-mean"
    epsilon_low / epsilon_high = 0.2 / 0.2    clip_low / clip_high = 0.2 / 0.2
    delta = 3.0 (ratio capped at delta)       dual_clip = 3.0 (for A < 0 the loss is capped at 3|A|;
                                              for A > 0 the cap never binds because 1+eps < delta)
    beta = 0, use_ref_model = False           kl_coef = 0
    temperature = 1                           temperature = 1
    advantages [B] (one per sequence)         advantages [N] = the sequence's advantage per token

Remaining differences: Liger computes log-probs in fp32 whatever the input dtype (ours keep fp64
for fp64 inputs), and exponentiates logp - old unclamped (ours clamp it to [-20, 20]).
Liger takes hidden states as [B, T, H]: a packed stream of N tokens is fed as B = N / T
sequences of T tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SEQ_LEN = 1024  # tokens per sequence when an [N] stream is fed to Liger as [N / T, T]
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean"}


def sequence_layout(n: int, seq_len: int = SEQ_LEN) -> tuple[int, int]:
    """(B sequences, T tokens each) for N tokens: T = min(seq_len, N), or T = N when seq_len
    does not divide N (one sequence)."""
    if n < 1 or seq_len < 1:
        raise ValueError(f"sequence_layout(n={n}, seq_len={seq_len}) is invalid; expected integers >= 1")
    t = min(seq_len, n)
    if n % t:
        t = n
    return n // t, t


def segment_ids(n: int, seq_len: int = SEQ_LEN, device: Optional[torch.device] = None) -> Tensor:
    """[N] int64: the sequence index of each token in the ``sequence_layout`` of N tokens."""
    _, t = sequence_layout(n, seq_len)
    return torch.arange(n, device=device) // t


def per_sequence_advantages(b: int, t: int, generator: torch.Generator) -> Tensor:
    """[B * T] fp32: one N(0, 1) advantage per sequence, repeated over its T tokens (GRPO)."""
    return torch.randn(b, generator=generator).repeat_interleave(t)


def matched_config(loss_type: str = "grpo", **overrides):
    """The sdar_kernels LossConfig equal to Liger's ``loss_type`` with ``liger_module`` settings."""
    from sdar_kernels import LossConfig

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is invalid; expected one of {tuple(LOSS_TYPES)}")
    return LossConfig.preset("grpo", **{"kl_coef": 0.0, "agg": LOSS_TYPES[loss_type], **overrides})


def matched_normalizer(loss_type: str, n: int, seq_len: int = SEQ_LEN) -> Optional[float]:
    """Liger "grpo" divides by B, fully masked sequences included; ours would skip those."""
    return float(sequence_layout(n, seq_len)[0]) if loss_type == "grpo" else None


def liger_module(cfg, loss_type: str = "grpo", compiled: bool = False):
    """LigerFusedLinearGRPOLoss with the clip, dual clip (as ``delta``), temperature of ``cfg``
    and no KL. ``compiled=False``: Liger's torch.compile covers only its O(N) loss math."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if cfg.kl_coef != 0:
        raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} is invalid here; expected 0 (the matched "
                         "Liger module runs with beta=0 and no reference model)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is invalid; expected one of {tuple(LOSS_TYPES)}")
    return LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False, loss_type=loss_type,
                                    epsilon_low=cfg.clip_low, epsilon_high=cfg.clip_high,
                                    delta=cfg.dual_clip, temperature=cfg.temperature)


def check_per_sequence(advantages: Tensor, seq_len: int = SEQ_LEN) -> None:
    """Raise ValueError unless ``advantages`` [N] is constant within each sequence (host sync)."""
    b, t = sequence_layout(advantages.shape[0], seq_len)
    a = advantages.view(b, t)
    if not torch.equal(a, a[:, :1].expand(b, t)):
        raise ValueError(f"advantages must be constant within each of the {b} sequences of {t} tokens: "
                         "Liger 0.8.5 takes one advantage per sequence")


def liger_loss(fn, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor,
               old_logprobs: Tensor, seq_len: int = SEQ_LEN) -> Tensor:
    """Liger's loss (0-d) on a packed stream: hidden [N, H], weight [V, H], targets, mask,
    advantages (constant per sequence, see ``check_per_sequence``), old_logprobs [N]."""
    n, h = hidden.shape
    b, t = sequence_layout(n, seq_len)
    loss, _ = fn(hidden.view(b, t, h), weight, targets.view(b, t), mask.view(b, t).to(torch.float32),
                 advantages.view(b, t)[:, 0].contiguous(), old_per_token_logps=old_logprobs.view(b, t))
    return loss
