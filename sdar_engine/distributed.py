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
DEVICES = ("auto", "cpu", "cuda")  # train.device


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device) for ``train.device`` (auto / cpu / cuda).

    Under torchrun (WORLD_SIZE > 1) join the process group once: nccl with
    ``set_device(LOCAL_RANK)`` on GPUs, gloo on CPUs. Without torchrun: (0, 1, cuda or cpu) and
    no process group. Idempotent.
    """
    if device not in DEVICES:
        raise ValueError(f"config train.device={device!r} is invalid; valid: one of {', '.join(DEVICES)}")
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("config train.device='cuda' but no CUDA device is visible; use auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        log.info("rank %d/%d on %s (%s)", dist.get_rank(), world, dev, dist.get_backend())
    return dist.get_rank(), world, dev


def _decoder_layers(model: Any) -> list:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no base_model.layers to shard; "
                         "expected a Llama/Qwen-style decoder")
    return list(layers)


def wrap_fsdp(model: Any) -> Any:
    """Shard ``model`` with FSDP2: ``fully_shard`` each decoder layer, then the root.

    Mixed precision: parameters (and the optimizer state built on them) stay float32; the
    all-gathered copy used in forward / backward is the model's compute dtype (model.py's
    ``compute_dtype``), gradients are reduced in float32.

    FSDP averages gradients over ranks while the loss already divides by the global token
    count, so the update multiplies its loss by ``grad_scale()`` (= world size) before backward
    (gloo has no PREMUL_SUM, which ``set_gradient_divide_factor(1.0)`` would need).
    ``sdar_head_forward`` is registered as a forward so the root's parameters (embedding, norm,
    lm_head) are gathered for the fused loss. Build the optimizer after this call. A no-op
    returning ``model`` without a process group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from .model import attach_head_forward, compute_dtype

    attach_head_forward(model)
    if not is_distributed():
        return model
    dtype = compute_dtype(model)
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "sdar_head_forward")
    log.info("FSDP2 fully_shard over %d ranks (%s, float32 parameters, %s compute, float32 reduction)",
             world_size(), device_type, str(dtype).replace("torch.", ""))
    return model


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered in full on every rank (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def grad_scale() -> float:
    """Factor on the loss before backward that turns FSDP's gradient mean over ranks into a sum."""
    return float(world_size()) if is_distributed() else 1.0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (unchanged without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def collective_device() -> torch.device:
    """Where reduced tensors must live: the current GPU for nccl, the CPU for gloo (or no group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: int) -> int:
    """Max of an integer over ranks (the value itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``t`` over ranks, in place (unchanged without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of ``range(n)``: near-equal blocks in rank order."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return range(n * r // w, n * (r + 1) // w)


def params_fingerprint(model: Any, chunk: int = 1 << 22) -> int:
    """A 64-bit checksum of the bit patterns of every parameter and buffer, computed on device.

    Position-weighted sums (weights 1..65521) of the same-width integer views: any single-bit change
    changes the sum. For comparing replicas across ranks, not for security.
    """
    total = 0
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        flat = t.contiguous().reshape(-1)
        if flat.is_floating_point():
            flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()])
        flat = flat.long()
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk]
            w = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
            total = (total * 1_000_003 + int((part * w).sum())) % (1 << 64)
        total = (total * 1_000_003 + len(name)) % (1 << 64)
    return total


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
