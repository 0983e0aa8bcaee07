"""GEMMs with fp32 output and fp32 accumulation for any input dtype (torch only).

On CUDA, 16-bit operands run on tensor cores with an fp32 result (``out_dtype``): logits are never
rounded to 16 bits and dL/dW accumulates in fp32 across chunks without an fp32 copy of W. Elsewhere
(CPU, or a torch without ``out_dtype``) the operands are upcast: 16-bit products are exact in fp32,
so the result matches the GPU's up to the order of the fp32 sums.
"""
from __future__ import annotations

import torch
from torch import Tensor


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N] as an fp32 [M, N] tensor."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without fp32-output GEMMs: upcast instead
            pass
    return torch.mm(a.float(), b.float())


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32 [M, N]) += a @ b, in one fp32-output GEMM for 16-bit CUDA operands."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.float(), b.float())
