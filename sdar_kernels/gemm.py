"""GEMMs with fp32 output and fp32 accumulation for any input dtype (torch only).

On CUDA, 16-bit operands run on tensor cores with an fp32 result (``out_dtype``, torch >= 2.8):
logits are never rounded to 16 bits and dL/dW accumulates in fp32 across chunks without an fp32
copy of W. Elsewhere (CPU) the operands are upcast: 16-bit products are exact in fp32, so the
result matches the GPU's up to the order of the fp32 sums. A CUDA torch without ``out_dtype``
falls back to the upcast too, with a one-time warning: it costs an fp32 copy of the operands per
call (for the lm_head, 4 V H bytes), so upgrade torch rather than live with it.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def fp32_output_gemm(device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take ``out_dtype=torch.float32`` for 16-bit inputs here."""
    if device.type != "cuda":
        return False
    a = torch.zeros((16, 16), device=device, dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(torch.zeros((16, 16), device=device), a, a, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):  # probe only: a 16 x 16 GEMM cannot OOM
        warnings.warn(f"torch {torch.__version__} has no fp32-output 16-bit GEMMs (torch.mm(..., "
                      "out_dtype=torch.float32), torch >= 2.8): sdar_kernels upcasts the operands instead, "
                      "an fp32 copy of each per call", RuntimeWarning, stacklevel=3)
        return False
    return True


def _native(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and fp32_output_gemm(a.device)


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N] as an fp32 [M, N] tensor."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)
    if _native(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32 [M, N]) += a @ b, in one fp32-output GEMM for 16-bit CUDA operands."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _native(a, b):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
