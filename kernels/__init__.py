"""sdar_kernels: fused lm_head + log-softmax + SDAR loss, without [tokens x vocab] logits.

Depends on torch only (Triton is used when installed and the tensors are on CUDA).

    from sdar_kernels import LossConfig, fused_linear_sdar_loss, fused_linear_logprobs
    out = fused_linear_sdar_loss(hidden, lm_head.weight, targets, advantages, old_logprobs,
                                 loss_mask, teacher_logprobs=teacher, config=LossConfig.preset("sdar"))
    out.loss.backward()
"""
from .config import PRESETS, LossConfig
from .linear_stats import TokenStats, linear_stats, resolve_backend
from .loss import SDAROutput, fused_linear_logprobs, fused_linear_sdar_loss
from .stats import Stats, StatsSpec

__all__ = [
    "LossConfig", "PRESETS", "SDAROutput", "Stats", "StatsSpec", "TokenStats",
    "fused_linear_logprobs", "fused_linear_sdar_loss", "linear_stats", "resolve_backend",
]
__version__ = "0.1.0"
