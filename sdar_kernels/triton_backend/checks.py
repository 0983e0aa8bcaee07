"""Input validation for the Triton statistics backend: clear ValueErrors naming the field."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..stats import DIVERGENCES, StatsSpec
from .configs import interpreting

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bad(field: str, value: object, valid: str) -> ValueError:
    return ValueError(f"{field}={value}: {valid}")


def check_spec(spec: StatsSpec) -> None:
    """Static options: temperature > 0, known divergence, jsd_beta in [0, 1]."""
    if not spec.temperature > 0:
        raise _bad("spec.temperature", spec.temperature, "must be > 0")
    if spec.divergence not in DIVERGENCES:
        raise _bad("spec.divergence", repr(spec.divergence), f"must be one of {DIVERGENCES}")
    if not 0.0 <= spec.jsd_beta <= 1.0:
        raise _bad("spec.jsd_beta", spec.jsd_beta, "must be in [0, 1]")


def check_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                 teacher_bias: Optional[Tensor], spec: StatsSpec) -> None:
    """Shapes, dtypes and devices of one call (shapes: hidden [N, H], weight [V, H], ...)."""
    check_spec(spec)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise _bad("hidden/weight shapes", (tuple(hidden.shape), tuple(weight.shape)),
                   "need hidden [N, H] and weight [V, H]")
    if hidden.shape[1] != weight.shape[1]:
        raise _bad("weight.shape", tuple(weight.shape), f"needs H={hidden.shape[1]} columns")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise _bad("targets", f"{tuple(targets.shape)} {targets.dtype}",
                   f"must be int64/int32 of shape ({hidden.shape[0]},)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise _bad("bias.shape", tuple(bias.shape), f"must be ({weight.shape[0]},)")
    if hidden.dtype != weight.dtype:
        raise _bad("weight.dtype", weight.dtype, f"must equal hidden.dtype={hidden.dtype}")
    if spec.divergence != "none":
        _check_teacher(hidden, weight, teacher_hidden, teacher_weight, teacher_bias, spec)
    if hidden.device.type == "cpu" and not interpreting() and hidden.dtype != torch.float64:
        raise _bad("hidden.device", hidden.device,
                   "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                   "use backend='torch' on the CPU")


def _check_teacher(hidden: Tensor, weight: Tensor, teacher_hidden: Optional[Tensor],
                   teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                   spec: StatsSpec) -> None:
    if teacher_hidden is None or teacher_weight is None:
        raise _bad("teacher_hidden/teacher_weight", None,
                   f"divergence={spec.divergence!r} needs both teacher tensors")
    if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != hidden.shape[0]:
        raise _bad("teacher_hidden.shape", tuple(teacher_hidden.shape),
                   f"must be [N={hidden.shape[0]}, H_T]")
    if teacher_weight.shape != (weight.shape[0], teacher_hidden.shape[1]):
        raise _bad("teacher_weight.shape", tuple(teacher_weight.shape),
                   f"must be (V={weight.shape[0]}, H_T={teacher_hidden.shape[1]})")
    if teacher_bias is not None and teacher_bias.shape != (weight.shape[0],):
        raise _bad("teacher_bias.shape", tuple(teacher_bias.shape), f"must be ({weight.shape[0]},)")
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype != hidden.dtype:
            raise _bad(f"{name}.dtype", t.dtype, f"must equal hidden.dtype={hidden.dtype}")


def rowmajor(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels need unit stride on the last dim; copy only when that is not so."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()
