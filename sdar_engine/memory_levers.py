"""Memory levers of the update that are not a model or FSDP setting: activation offload and the
max-memory guard (docs/memory_levers.md has every lever, its key, cost and measured time).

``activation_offload(model)`` is the context the update's trunk forward runs in: with
``model.activation_offload`` on a CUDA model it is ``torch.autograd.graph.save_on_cpu`` (every
tensor autograd saves for backward goes to pinned host memory and comes back in backward);
otherwise a no-op (on a CPU device with one logged line: activations already live there).

``token_budget(model, optimizer, cfg)`` is the micro-batch token budget of a run: ``algo.max_tokens``,
or with ``algo.max_memory_gb`` > 0 what fits that cap by a MEASURED per-token cost: two probe
micro-batches of synthetic tokens (the real loss, forward + backward) at start-up, each one's
peak read with ``torch.cuda.max_memory_allocated`` (CUDA) or the process's RSS high-water mark
(CPU, /proc/self/clear_refs resets it); a line fit gives bytes per token and the fixed part;
the optimizer state that the first step will allocate is added from the parameter sizes.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .model import compute_device
from .process_memory import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

log = logging.getLogger("sdar_engine.memory")

GIB = 1 << 30
PROBE_TOKENS = 2048       # the larger probe (capped by algo.max_tokens); the smaller is half
PROBE_SAMPLE_TOKENS = 256  # synthetic sample length: half prompt, half response
_logged: set[str] = set()


def _log_once(msg: str, *args: Any) -> None:
    key = msg % args
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def offload_supported(device: torch.device) -> bool:
    """Activation offload moves saved tensors from an accelerator to host memory: CUDA only."""
    return device.type == "cuda"


def activation_offload(model: Any) -> Any:
    """The context of the update's trunk + loss forward: ``save_on_cpu`` when
    ``model.sdar_activation_offload`` (``load_policy`` records ``model.activation_offload``) and
    the model computes on CUDA; else ``contextlib.nullcontext()``."""
    if not getattr(model, "sdar_activation_offload", False):
        return contextlib.nullcontext()
    device = compute_device(model)
    if not offload_supported(device):
        _log_once("model.activation_offload=true on device %s: no-op (activations already live in host memory)",
                  device)
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------------- the guard
@dataclass
class MemoryBudget:
    """The guard's measurement and choice. Bytes; ``per_token_bytes`` is the slope of one
    micro-batch's peak against its tokens; ``fixed_bytes`` the peak at 0 tokens (parameters,
    gradients, workspaces; on CPU the whole process); ``budget_tokens`` the largest micro-batch
    whose predicted peak (+ ``optimizer_state_bytes`` still to come) fits ``max_memory_bytes``,
    capped at ``algo.max_tokens`` (may be <= 0 before ``check_budget``)."""

    budget_tokens: int
    per_token_bytes: float
    fixed_bytes: float
    static_bytes: int
    optimizer_state_bytes: int
    max_memory_bytes: int
    max_tokens: int
    method: str
    probe: tuple

    def log_line(self) -> str:
        """One greppable line: ``memory_guard per_token_bytes=... budget_tokens=...``."""
        return (f"memory_guard per_token_bytes={self.per_token_bytes:.0f} fixed_bytes={self.fixed_bytes:.0f} "
                f"static_bytes={self.static_bytes} optimizer_state_bytes={self.optimizer_state_bytes} "
                f"max_memory_bytes={self.max_memory_bytes} budget_tokens={self.budget_tokens} "
                f"max_tokens={self.max_tokens} method={self.method} "
                f"probe={','.join(f'{t}:{p}' for t, p in self.probe)}")


def fit_budget(peaks: Sequence[tuple[int, int]], static_bytes: int, optimizer_state_bytes: int,
               max_memory_bytes: int, max_tokens: int, method: str) -> MemoryBudget:
    """Budget from two probes ``[(tokens, peak bytes), ...]`` (absolute peaks).

    Slope = secant of the two probes. A non-positive slope (allocator reuse hid the smaller
    probe's growth) falls back to the larger probe's growth over ``static_bytes`` per token,
    which over-estimates the cost: the budget errs small."""
    (t1, p1), (t2, p2) = sorted(peaks)[:1] + sorted(peaks)[-1:]
    slope = (p2 - p1) / (t2 - t1) if t2 > t1 else 0.0
    if slope <= 0:
        slope = max(p2 - static_bytes, 0) / t2
    if slope <= 0:
        raise RuntimeError(f"memory guard: the probes ({list(peaks)}, method {method}) show no memory growing "
                           "with tokens; cannot pick a budget (set algo.max_memory_gb=0 to turn the guard off)")
    fixed = max(p2 - slope * t2, float(static_bytes))
    room = max_memory_bytes - fixed - optimizer_state_bytes
    budget = min(max_tokens, math.floor(room / slope)) if room > 0 else 0
    return MemoryBudget(int(budget), slope, fixed, int(static_bytes), int(optimizer_state_bytes),
                        int(max_memory_bytes), max_tokens, method, tuple(peaks))


def check_budget(b: MemoryBudget, min_tokens: int, max_memory_gb: float) -> None:
    """ValueError naming ``algo.max_memory_gb`` when the cap holds no micro-batch of ``min_tokens``
    (the longest step sample: rollout.max_prompt_tokens + rollout.max_new_tokens)."""
    need = b.fixed_bytes + b.optimizer_state_bytes + b.per_token_bytes * min_tokens
    measured = (f"measured: fixed {b.fixed_bytes / GIB:.3f} GiB + optimizer state {b.optimizer_state_bytes / GIB:.3f} "
                f"GiB + {b.per_token_bytes / 1024:.1f} KiB per token ({b.method})")
    if b.budget_tokens <= 0:
        raise ValueError(f"config algo.max_memory_gb={max_memory_gb:g} is below the static footprint of the update "
                         f"({measured}); raise algo.max_memory_gb above "
                         f"{(b.fixed_bytes + b.optimizer_state_bytes) / GIB:.3f}, or turn on model.fsdp_cpu_offload")
    if b.budget_tokens < min_tokens:
        raise ValueError(f"config algo.max_memory_gb={max_memory_gb:g} fits micro-batches of {b.budget_tokens} tokens, "
                         f"fewer than one longest sample (rollout.max_prompt_tokens + rollout.max_new_tokens = "
                         f"{min_tokens}) needs: {need / GIB:.3f} GiB ({measured}); raise algo.max_memory_gb, "
                         "lower those lengths, or turn on model.grad_checkpointing / model.activation_offload")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes on ``device`` of optimizer state not allocated yet (it appears at the first step):
    Adam / AdamW 2 buffers per parameter, SGD with momentum 1, any other optimizer assumed 2."""
    name = type(optimizer).__name__
    total = 0
    for group in optimizer.param_groups:
        buffers = (1 if group.get("momentum", 0) else 0) if name == "SGD" else 2
        for p in group["params"]:
            if not p.requires_grad or optimizer.state.get(p):
                continue
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type == device.type:
                total += buffers * local.numel() * local.element_size()
    return total


class PeakMeter:
    """Absolute peak memory of the code between ``reset()`` and ``peak()``, in bytes: CUDA
    allocator (``max_memory_allocated``) or process RSS high-water mark (Linux VmHWM)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda-max-allocated" if device.type == "cuda" else "rss-hwm"
        if self.method == "rss-hwm" and not reset_peak_rss():
            raise RuntimeError("memory guard on CPU needs /proc/self/clear_refs to reset the RSS high-water mark "
                               "(Linux); set algo.max_memory_gb=0 here")

    def current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        gc.collect()
        trim_heap()
        return rss_bytes()

    def reset(self) -> None:
        gc.collect()
        trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def probe_samples(tokens: int, vocab: int, seed: int = 0) -> list:
    """Synthetic step samples of ``tokens`` tokens in total (samples of PROBE_SAMPLE_TOKENS,
    half prompt, half response) with every per-token input the loss may read."""
    from .packing import Sample

    rng = random.Random(seed)
    length = max(2, min(PROBE_SAMPLE_TOKENS, tokens))
    out = []
    for k in range(max(1, tokens // length)):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        p = length // 2
        r = length - p
        s = Sample(prompt_ids=ids[:p], response_ids=ids[p:], advantage=1.0 if k % 2 else -1.0,
                   teacher_prompt_ids=ids[:p], episode=k)
        s.old_logp = s.teacher_logp = s.ref_logp = torch.full((r,), -1.0)
        out.append(s)
    return out


def probe_peaks(model: Any, optimizer: torch.optim.Optimizer, loss_config: Any,
                tokens: Sequence[int]) -> tuple[int, list[tuple[int, int]], str]:
    """(static bytes, [(tokens, absolute peak bytes)], method): one forward + backward of the
    update's micro-step (the real loss, checkpointing and offload as configured) per entry of
    ``tokens``, largest first; gradients are dropped after each. Collective under FSDP."""
    from .logprobs import default_row_tokens
    from .packing import pack
    from .update import _micro_step

    device = compute_device(model)
    meter = PeakMeter(device)
    vocab = int(model.config.vocab_size)
    rows = default_row_tokens(model)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    static = meter.current()
    peaks = []
    for t in sorted(tokens, reverse=True):  # largest first: allocator reuse can only over-estimate the slope
        samples = probe_samples(t, vocab)
        (mb,) = pack(samples, sum(s.length() for s in samples), row_tokens=rows)
        z = torch.tensor(float(sum(len(s.response_ids) for s in samples)), device=device)
        meter.reset()
        _micro_step(model, mb, samples, loss_config, z, loss_config.kl_coef != 0, rows, device)
        peaks.append((mb.num_tokens, meter.peak()))
        optimizer.zero_grad(set_to_none=True)
    return static, peaks, meter.method


def measure_budget(model: Any, optimizer: torch.optim.Optimizer, loss_config: Any, max_memory_gb: float,
                   max_tokens: int, min_tokens: int, probe_tokens: Optional[int] = None) -> MemoryBudget:
    """Probe, fit, agree (the smallest budget over ranks) and check; logs ``MemoryBudget.log_line``."""
    from .distributed import all_reduce_max

    big = min(max_tokens, probe_tokens or PROBE_TOKENS)
    if big < 4:
        raise ValueError(f"config algo.max_tokens={max_tokens} is too small for the memory guard's probes (>= 4)")
    static, peaks, method = probe_peaks(model, optimizer, loss_config, (big, big // 2))
    device = compute_device(model)
    b = fit_budget(peaks, static, optimizer_state_bytes(optimizer, device), int(max_memory_gb * GIB),
                   max_tokens, method)
    b.budget_tokens = -all_reduce_max(-b.budget_tokens)  # every rank packs with the same budget
    log.info(b.log_line())
    check_budget(b, min(min_tokens, max_tokens), max_memory_gb)
    return b


def token_budget(model: Any, optimizer: torch.optim.Optimizer, cfg: Any) -> int:
    """The micro-batch token budget of a run (``TrainConfig``): ``algo.max_tokens``, lowered by the
    guard when ``algo.max_memory_gb`` > 0. Call once, after ``wrap_fsdp`` and the optimizer."""
    a, r = cfg.algo, cfg.rollout
    if not a.max_memory_gb:
        return a.max_tokens
    b = measure_budget(model, optimizer, cfg.loss_config(0), a.max_memory_gb, a.max_tokens,
                       r.max_prompt_tokens + r.max_new_tokens)
    return b.budget_tokens
