"""DTensor (FSDP2 / HSDP) operands of the loss entry points: gathered or localized, differentiably.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a module's parameters are DTensors sharded
on dim 0 whenever the module is outside its forward. A loss computed *after* the model's forward
(the usual place: trunk -> hidden states -> loss) therefore receives the lm_head weight (bias) as
a DTensor while hidden is a plain tensor, and torch refuses the mix ("aten.mm.default got mixed
torch.Tensor and DTensor"). The entry points of loss.py call :func:`localize` first:

- weight, bias (and teacher_weight, teacher_bias, which get no gradient): ``full_tensor()``, an
  all-gather of the shards. Its backward reduce-scatters dL/dW onto the shards as the MEAN over
  the ranks of the mesh (``Partial("avg")`` on every mesh dimension): the convention of FSDP2
  (and DDP), so the lm_head gradient agrees with the gradient FSDP2 gives every other parameter
  of the same step. Data-parallel ranks whose losses each divide by the *global* token count
  sum to the whole-batch loss, so they multiply their loss by the world size before backward
  (as sdar_engine does, ``distributed.grad_scale``) to turn the mean into that sum; ranks that
  hold the same tokens (replicated data) need no factor. Cost: one all-gather of [V, H] per call
  and one reduce-scatter in backward: the same traffic FSDP2 spends to unshard the module.
- hidden, teacher_hidden: a DTensor placed ``Replicate()`` or ``Shard(0)`` (tokens) on every mesh
  dimension is replaced by its local tensor (``to_local()``, gradient back with the same
  placements); the per-token inputs (targets, masks, log-probs) must then be the local rows too.
  Any other placement (e.g. ``Shard(1)`` of a sequence-parallel [B, T, H]) raises ValueError.

Every mesh dimension of the weight is taken as data-parallel: a tensor-parallel (vocabulary-
parallel) lm_head whose ranks hold the same tokens and split the vocabulary is not handled here.

The alternative that avoids the extra all-gather is to call the loss inside the FSDP2 unshard
window: register the method that computes hidden states *and* the loss as an FSDP forward
(``torch.distributed.fsdp.register_fsdp_forward_method``), so FSDP2 has already all-gathered the
weight as a plain tensor and reduce-scatters its gradient itself (docs/fsdp2_and_compile.md).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import Tensor

GATHERED = ("weight", "bias", "teacher_weight", "teacher_bias")  # [V, H] / [V]: all-gathered
LOCALIZED = ("hidden", "teacher_hidden")  # per-token rows: the local rows are used


def is_dtensor(t: Any) -> bool:
    """True for a torch.distributed.tensor.DTensor (checked without importing torch.distributed)."""
    return isinstance(t, Tensor) and hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def gather_full(t: Tensor) -> Tensor:
    """The whole tensor of DTensor ``t`` as a plain tensor, differentiable: the gradient returns as
    the mean over the mesh's ranks, reduce-scattered (all-reduced on replicated dimensions)."""
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def local_rows(name: str, t: Tensor) -> Tensor:
    """The local rows of a token DTensor placed Replicate() or Shard(0) on every mesh dimension."""
    from torch.distributed.tensor import Replicate, Shard

    for p in t.placements:
        if not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0)):
            raise ValueError(f"{name} is a DTensor placed {tuple(t.placements)}; expected Replicate() or "
                             "Shard(0) (tokens) on every mesh dimension, or pass a plain tensor (e.g. "
                             f"{name}.full_tensor(), or {name}.to_local() with the matching local per-token inputs)")
    return t.to_local()


def localize(fn: Callable) -> Callable:
    """Decorator for an entry point fn(hidden, weight, ...): DTensor operands named in GATHERED are
    gathered (:func:`gather_full`), those in LOCALIZED replaced by their local rows
    (:func:`local_rows`). Without a DTensor argument the call goes straight through."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not (any(is_dtensor(a) for a in args) or any(is_dtensor(v) for v in kwargs.values())):
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if not is_dtensor(value):
                continue
            if name in GATHERED:
                bound.arguments[name] = gather_full(value)
            elif name in LOCALIZED:
                bound.arguments[name] = local_rows(name, value)
            else:
                raise ValueError(f"{name} is a DTensor; only {', '.join(GATHERED + LOCALIZED)} may be DTensors "
                                 f"(pass {name}.to_local() for this rank's rows, or {name}.full_tensor())")
        return fn(*bound.args, **bound.kwargs)

    return wrapper
