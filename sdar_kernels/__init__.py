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
from .topk import fused_linear_topk_kl

__all__ = [
    "LossConfig", "PRESETS", "SDAROutput", "Stats", "StatsSpec", "TokenStats",
    "fused_linear_logprobs", "fused_linear_sdar_loss", "fused_linear_topk_kl", "linear_stats",
    "resolve_backend",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # sdar_kernels.ops (the torch.library op for torch.compile) imports torch._dynamo: loaded on first use
    if name == "fused_linear_sdar_loss_op":
        from .ops import fused_linear_sdar_loss_op

        return fused_linear_sdar_loss_op
    raise AttributeError(f"module 'sdar_kernels' has no attribute {name!r}")
