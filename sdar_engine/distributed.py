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


def init_distributed(device: str = "auto", cpu_offload: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world, device) for ``train.device`` (auto / cpu / cuda).

    Under torchrun (WORLD_SIZE > 1) join the process group once: nccl with
    ``set_device(LOCAL_RANK)`` on GPUs, gloo on CPUs. Without torchrun: (0, 1, cuda or cpu) and
    no process group. Idempotent. ``cpu_offload`` (``model.fsdp_cpu_offload``) on GPUs adds a
    gloo backend for host tensors ("cuda:nccl,cpu:gloo"): gradient clipping and full state dicts
    reduce the offloaded shards where they live.
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
        dist.init_process_group(backend=("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if cuda else "gloo")
        log.info("rank %d/%d on %s (%s)", dist.get_rank(), world, dev, dist.get_backend())
    return dist.get_rank(), world, dev


def offload_policy(device_type: str) -> Any:
    """FSDP2's CPUOffloadPolicy: pinned host memory on CUDA (pinning needs an accelerator)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=device_type == "cuda")


def wrap_fsdp(model: Any, cpu_offload: bool | None = None) -> Any:
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

    ``cpu_offload`` (default: the ``model.fsdp_cpu_offload`` that ``load_policy`` recorded)
    passes FSDP2's ``CPUOffloadPolicy`` to every ``fully_shard``: sharded parameters, their
    gradients and so the optimizer state live on the host, copied to the GPU per layer for
    forward / backward, and the optimizer steps on the CPU. Raises ValueError without a process
    group (FSDP2 needs one), or on GPUs without the host backend (``init_distributed(...,
    cpu_offload=True)``). Activation checkpointing is applied before this call (``load_policy``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from .model import attach_head_forward, compute_dtype, decoder_layers

    attach_head_forward(model)
    offload = bool(getattr(model, "sdar_fsdp_cpu_offload", False) if cpu_offload is None else cpu_offload)
    if not is_distributed():
        if offload:
            raise ValueError("config model.fsdp_cpu_offload=true needs FSDP2, i.e. torchrun with more than one "
                             f"rank (WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')}); set model.fsdp_cpu_offload=false "
                             "or launch with torchrun --nproc_per_node=N (N >= 2)")
        return model
    dtype = compute_dtype(model)
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    device = next(model.parameters()).device
    device_type = device.type
    kwargs: dict[str, Any] = {"mp_policy": mp}
    if offload:
        if device_type == "cuda" and "gloo" not in str(dist.get_backend()):
            raise ValueError("config model.fsdp_cpu_offload=true needs a host backend in the process group; "
                             "initialize it with init_distributed(train.device, cpu_offload=True) "
                             f"(backend now: {dist.get_backend()})")
        kwargs["offload_policy"] = offload_policy(device_type)
        model.sdar_compute_device = device  # shards move to the host; forward still runs here
    mesh = init_device_mesh(device_type, (world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    register_fsdp_forward_method(model, "sdar_head_forward")
    log.info("FSDP2 fully_shard over %d ranks (%s, float32 parameters, %s compute, float32 reduction, "
             "cpu_offload=%s)", world_size(), device_type, str(dtype).replace("torch.", ""), offload)
    if offload and device_type != "cuda":
        log.info("model.fsdp_cpu_offload on a CPU mesh: parameters already live in host memory (no saving)")
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
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
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
