"""Data parallelism through torch.distributed: torchrun init, FSDP2 ``fully_shard``, reductions.

Everything degrades to single-process no-ops when torch.distributed is not initialized, so the
same trainer code runs with ``python`` and with ``torchrun --nproc_per_node=N``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("sdar_engine.distributed")


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun (WORLD_SIZE set) join the group: nccl on GPU, gloo on CPU.

    Without torchrun: (0, 1, cuda:0 if available else cpu) and no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return 0, 1, torch.device("cuda:0" if cuda else "cpu")
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("rank %d/%d on %s (%s)", dist.get_rank(), world, device, dist.get_backend())
    return dist.get_rank(), world, device


def _decoder_layers(model: Any) -> list:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no base_model.layers to shard; "
                         "expected a Llama/Qwen-style decoder")
    return list(layers)


def wrap_fsdp(model: Any) -> Any:
    """Shard ``model`` with FSDP2: ``fully_shard`` each decoder layer, then the root.

    FSDP averages gradients over ranks while the loss already divides by the global token
    count, so the update multiplies its loss by ``grad_scale()`` (= world size) before backward
    (gloo has no PREMUL_SUM, which ``set_gradient_divide_factor(1.0)`` would need). ``sdar_head_forward`` is registered as a forward so the root's
    parameters (embedding, norm, lm_head) are gathered for the fused loss. Build the
    optimizer after this call. A no-op returning ``model`` without a process group.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.device_mesh import init_device_mesh

    from .model import attach_head_forward

    attach_head_forward(model)
    if not is_distributed():
        return model
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "sdar_head_forward")
    log.info("FSDP2 fully_shard over %d ranks (%s)", world_size(), device_type)
    return model


def grad_scale() -> float:
    """Factor on the loss before backward that turns FSDP's gradient mean over ranks into a sum."""
    return float(world_size()) if is_distributed() else 1.0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (unchanged without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int) -> int:
    """Max of an integer over ranks (the value itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
