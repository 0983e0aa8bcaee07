"""Atomic checkpoints: safetensors weights + optimizer + scheduler + RNG states + step + config.

Layout: ``<run_dir>/checkpoints/step_00000012/`` holding model.safetensors and config.json
(a Hugging Face dir that ``from_pretrained`` reloads; tokenizer files too when given),
optimizer.pt, trainer_state.pt (step, scheduler), rng_rank<R>.pt and meta.json. Everything is
written into ``.tmp-step_...`` first and renamed when complete, so a write that dies midway
leaves the previous checkpoint as the latest loadable one. Works with FSDP2 (full state dicts
gathered on rank 0; each rank keeps its own RNG file). The weights are the float32 master
weights, the optimizer state is keyed by parameter name: a checkpoint written by K ranks loads
on any number of ranks (a missing RNG file only warns; rollouts are seeded per episode anyway).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .distributed import barrier, rank, world_size

log = logging.getLogger("sdar_engine.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{alias: kept} for parameters shared under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_weights(path: str, model: torch.nn.Module, tokenizer: Any) -> None:
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=full)
    if rank() != 0:
        return
    aliases = _tied_names(model)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in aliases}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _write_optimizer(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        torch.save(state, os.path.join(path, "optimizer.pt"))


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def save_checkpoint(run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, config_dict: dict, rng: bool = True,
                    tokenizer: Any = None, keep_last: Optional[int] = None) -> str:
    """Write the checkpoint of ``step`` under ``run_dir/checkpoints`` atomically; return its path.

    Every rank must call it (FSDP gathers). ``keep_last`` prunes older checkpoints after success.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid; expected an integer >= 0")
    final = checkpoint_dir(run_dir, step)
    tmp = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if rng:
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
    _write_weights(tmp, model, tokenizer)
    _write_optimizer(tmp, model, optimizer)
    if rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None},
                   os.path.join(tmp, "trainer_state.pt"))
        _fsync_files(tmp)  # the data is on disk before the marker that says it is complete
        with open(os.path.join(tmp, META), "w") as f:  # written last: marks the dir complete
            json.dump({"step": step, "config": config_dict, "tied": _tied_names(model),
                       "world_size": world_size()}, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)  # the folder's entries, the marker's included
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        _fsync_dir(os.path.dirname(final))  # the rename itself survives a crash
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last:
            _prune(run_dir, keep_last)
        log.info("saved checkpoint step %d -> %s", step, final)
    barrier()
    return final


def _fsync_files(path: str) -> None:
    """fsync every regular file directly in ``path`` (the folder itself: ``_fsync_dir``)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _prune(run_dir: str, keep_last: int) -> None:
    for _, path in _complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint under ``run_dir/checkpoints`` (None if none)."""
    found = _complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _resolve(path: str) -> str:
    if os.path.isfile(os.path.join(path, META)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected a checkpoint dir holding {META}, "
                                "model.safetensors, optimizer.pt, trainer_state.pt, or a run dir with "
                                "checkpoints/step_*/ inside")
    return latest


def _load_optimizer(file: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    osd = torch.load(file, weights_only=False)
    if osd.get("state"):
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
        return
    # stateless optimizers (plain SGD) have no tensors to place: restore hyper-parameters only
    if len(osd.get("param_groups", [])) != len(optimizer.param_groups):
        raise ValueError(f"{file} has {len(osd.get('param_groups', []))} parameter groups; the optimizer "
                         f"has {len(optimizer.param_groups)}")
    for saved, group in zip(osd["param_groups"], optimizer.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Any = None, rng: bool = True) -> tuple[int, dict]:
    """Restore weights, optimizer, scheduler and this rank's RNG state; return (step, config_dict).

    ``path`` is a checkpoint dir or a run dir (its latest checkpoint is taken).
    """
    path = _resolve(path)
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    state = load_file(os.path.join(path, "model.safetensors"))
    for alias, kept in meta.get("tied", {}).items():
        state[alias] = state[kept]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    if optimizer is not None:
        _load_optimizer(os.path.join(path, "optimizer.pt"), model, optimizer)
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if scheduler is not None and trainer_state.get("scheduler") is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
    if rng and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif rng:
        log.warning("no RNG state for rank %d in %s; RNG streams will differ from the saved run", rank(), path)
    log.info("loaded checkpoint step %d from %s", meta["step"], path)
    return int(meta["step"]), meta.get("config", {})
