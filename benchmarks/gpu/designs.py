"""The designs the GPU check times: each builds a zero-argument fwd+bwd step on one problem.

A problem is N tokens of hidden [N, H] and lm_head [V, H] in bf16 (teacher [N, H] and a
teacher lm_head when a full-vocabulary divergence is timed), targets, one advantage per
sequence of liger_grpo.SEQ_LEN tokens, old/teacher/ref log-probs and an all-ones mask (every
design does the full N x V work, so GEMM passes x 2NHV is the work of each).

Our rows and the path each really runs (checked on the first call, an error row otherwise):
  triton recompute  LossConfig(backend="triton", grad_in_forward=False): Triton statistics
                    forward + Triton recompute backward (calls triton_backend.stats_backward)
  triton 3-pass     LossConfig(backend="triton", grad_in_forward=True): cuBLAS GEMMs + Triton
                    row kernels, gradients in the forward (must NOT call stats_backward)
  hopper variant    the recompute path with env SDAR_TRITON_VARIANT=hopper
                    (configs.kernel_variant must answer "hopper" for the device)
  torch-chunked     the torch row path (grad in forward) with its row ops' GEMMs switched to
                    16-bit cuBLAS GEMMs with fp32 output (`torch_rows16_class`): the stock torch row
                    ops upcast the operands and run fp32 GEMMs, which a GPU runs without
                    tensor cores
Baselines: naive PyTorch (bf16 mm -> .float() logits [N, V] -> log_softmax, autograd: 3 bf16
tensor-core GEMM passes, bf16 dW), Liger's chunked GRPO loss on matched settings
(benchmarks/liger_grpo.py), Liger's fused-linear JSD, and a bare bf16 GEMM (the rate).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sdar_benchmarks import liger_grpo

GIB = float(1 << 30)
Step = Callable[[], object]


@dataclass(frozen=True)
class Design:
    """One timed row: ``build(problem) -> step``; ``passes`` GEMM passes of 2NHV FLOPs each
    (fwd+bwd); ``teacher``: needs the teacher tensors; ``ours``: one of our fused paths, judged
    by the issue's targets; ``chunk``: "recompute", "rows" or "" (the working chunk of the
    memory target, see ``chunk_bytes``); ``headline``: timed first."""

    name: str
    build: Callable[[dict], Step]
    passes: int
    teacher: bool = False
    ours: bool = False
    chunk: str = ""
    headline: bool = False


# ----------------------------------------------------------------------------- inputs
def make_problem(n: int, h: int, v: int, device: str, teacher: bool, seed: int = 0) -> dict:
    """Seeded bf16 problem (logits of std ~2); teacher tensors only when ``teacher``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bf = torch.bfloat16
    b, t = liger_grpo.sequence_layout(n)
    base = -torch.rand(n, generator=g) * 3
    p = dict(hidden=torch.randn(n, h, generator=g).to(device, bf),
             weight=(torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device, bf),
             targets=torch.randint(0, v, (n,), generator=g).to(device),
             advantages=liger_grpo.per_sequence_advantages(b, t, g).to(device),
             old=(base + 0.05 * torch.randn(n, generator=g)).to(device),
             teacher=(base + torch.randn(n, generator=g)).to(device),
             ref=(base + 0.1 * torch.randn(n, generator=g)).to(device),
             mask=torch.ones(n, device=device))
    if teacher:
        p["teacher_hidden"] = torch.randn(n, h, generator=g).to(device, bf)
        p["teacher_weight"] = p["weight"].detach().clone()
    return p


def input_bytes(p: dict, teacher: bool) -> int:
    names = ["hidden", "weight"] + (["teacher_hidden", "teacher_weight"] if teacher else [])
    return sum(p[k].numel() * p[k].element_size() for k in names)


def chunk_bytes(kind: str, teacher: bool) -> int:
    """Bytes of one working chunk: the recompute backward's dL/dz scratch budget
    (SDAR_TRITON_SCRATCH_MB) or the 3-pass path's fp32 [C, V] logits budget (SDAR_TRITON_ROW_MB,
    one buffer per model); 1 GiB (both defaults) for other designs."""
    try:
        if kind == "recompute":
            from sdar_kernels.triton_backend.backward import SCRATCH_BYTES
            return SCRATCH_BYTES
        if kind == "rows":
            from sdar_kernels.triton_backend.rows import ROW_SCRATCH_BYTES
            return ROW_SCRATCH_BYTES * (2 if teacher else 1)
    except ImportError:
        pass
    return 1 << 30


def memory_target_gib(n: int, h: int, v: int, teacher: bool, chunk: int) -> float:
    """inputs (bf16 h, W[, teacher h, W]) + bf16 dL/dh + fp32 dL/dW + one chunk, in GiB."""
    inputs = 2 * (n * h + v * h) * (2 if teacher else 1)
    return (inputs + 2 * n * h + 4 * v * h + chunk) / GIB


# ----------------------------------------------------------------------------- path checks
@contextlib.contextmanager
def counting(module, name: str, counter: dict):
    """Count calls of ``module.name`` (looked up at call time by its callers) while inside."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        counter[name] = counter.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, wrapped)
    try:
        yield counter
    finally:
        setattr(module, name, original)


def recompute_calls(step: Step) -> int:
    """Calls of the Triton recompute backward (triton_backend.stats_backward) during one step."""
    from sdar_kernels import triton_backend

    counter: dict = {}
    with counting(triton_backend, "stats_backward", counter):
        step()
    return counter.get("stats_backward", 0)


def verified(step: Step, three_pass: bool) -> Step:
    """``step`` after one call proving which path it runs (RuntimeError when it is the other)."""
    calls = recompute_calls(step)
    if three_pass and calls:
        raise RuntimeError("3-pass path not in this checkout: LossConfig(backend='triton', grad_in_forward="
                           f"True) ran the Triton recompute backward ({calls} stats_backward call(s))")
    if not three_pass and not calls:
        raise RuntimeError("LossConfig(backend='triton', grad_in_forward=False) did not run the Triton "
                           "recompute backward (triton_backend.stats_backward)")
    return step


@contextlib.contextmanager
def variant(name: Optional[str], device: str):
    """Env SDAR_TRITON_VARIANT=name while inside (None: leave it); RuntimeError when the
    checkout has no switch or the switch does not answer ``name`` for this device."""
    if name is None:
        yield
        return
    from sdar_kernels.triton_backend import configs

    if not hasattr(configs, "kernel_variant"):
        raise RuntimeError("sdar_kernels/triton_backend/configs.py has no kernel_variant switch: "
                           f"the {name} variant is not in this checkout")
    old = os.environ.get("SDAR_TRITON_VARIANT")
    os.environ["SDAR_TRITON_VARIANT"] = name
    try:
        got = configs.kernel_variant(torch.device(device))
        if got != name:
            raise RuntimeError(f"SDAR_TRITON_VARIANT={name} but kernel_variant() answers {got!r} on {device}")
        yield
    finally:
        if old is None:
            os.environ.pop("SDAR_TRITON_VARIANT", None)
        else:
            os.environ["SDAR_TRITON_VARIANT"] = old


# ----------------------------------------------------------------------------- our steps
def sdar_config(backend: str, grad_in_forward: bool, divergence: str = "sampled"):
    from sdar_kernels import LossConfig

    return LossConfig.preset("sdar", backend=backend, grad_in_forward=grad_in_forward, divergence=divergence)


def sdar_step(p: dict, cfg, variant_name: Optional[str] = None, device: str = "cuda") -> Step:
    """fwd+bwd of fused_linear_sdar_loss on fresh leaves; returns (loss, dL/dh, dL/dW)."""
    from sdar_kernels import fused_linear_sdar_loss

    full = cfg.full_vocab_divergence

    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        with variant(variant_name, device):
            out = fused_linear_sdar_loss(hid, w, p["targets"], p["advantages"], p["old"], p["mask"],
                                         teacher_logprobs=p["teacher"], ref_logprobs=p["ref"],
                                         teacher_hidden=p.get("teacher_hidden") if full else None,
                                         teacher_weight=p.get("teacher_weight") if full else None,
                                         config=cfg)
            out.loss.backward()
        return out.loss.detach(), hid.grad, w.grad
    return step


def triton_step(p: dict, three_pass: bool, divergence: str = "sampled", variant_name: Optional[str] = None,
                device: str = "cuda") -> Step:
    """One of our Triton paths, verified on its first call (see module doc)."""
    cfg = sdar_config("triton", three_pass, divergence)
    return verified(sdar_step(p, cfg, variant_name, device), three_pass)


def torch16_step(p: dict, divergence: str = "sampled") -> Step:
    """The torch row path (grad in forward): on a GPU with 16-bit inputs its GEMMs run on tensor
    cores with fp32 output (rowwise.TorchRows.gemm16); RuntimeError if that is not the path."""
    from sdar_kernels import rowwise

    cfg = sdar_config("torch", True, divergence)
    h = p["hidden"]
    probe = rowwise.TorchRows(h, p["weight"], None, {"teacher_weight": None, "teacher_bias": None}, cfg)
    if h.is_cuda and not probe.gemm16:
        raise RuntimeError("the torch row path would not use 16-bit GEMMs for these inputs (TorchRows.gemm16)")
    return sdar_step(p, cfg)


# ----------------------------------------------------------------------------- baselines
def naive_step(p: dict) -> Step:
    """Naive PyTorch: bf16 mm -> .float() logits [N, V], log_softmax, the SDAR epilogue; autograd
    runs dL/dh and dL/dW as bf16 tensor-core GEMMs (3 passes; dW in bf16)."""
    from sdar_kernels.loss import sdar_epilogue

    cfg = sdar_config("torch", True)

    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        lp = torch.log_softmax((hid @ w.T).float(), dim=-1)
        logp = lp.gather(1, p["targets"][:, None])[:, 0]
        with torch.no_grad():
            entropy = -(lp.exp() * lp).sum(-1)
        loss, _ = sdar_epilogue(logp, entropy, None, p["advantages"], p["old"], p["mask"], p["teacher"],
                                p["ref"], None, None, cfg)
        del lp
        loss.backward()
        return loss.detach(), hid.grad, w.grad
    return step


def gemm_step(p: dict) -> Step:
    """A bare bf16 GEMM [N, H] x [H, V] (bf16 output): the rate the passes are compared with."""
    w_t = p["weight"].t()
    return lambda: torch.mm(p["hidden"], w_t)


def liger_grpo_step(p: dict) -> Step:
    """Liger's chunked GRPO loss, settings matched to our grpo config (liger_grpo.py): sequences of
    SEQ_LEN tokens, no KL, clip 0.2/0.2, delta = dual clip 3, temperature 1, same mask."""
    fn = liger_grpo.liger_module(liger_grpo.matched_config("grpo"))

    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        loss = liger_grpo.liger_loss(fn, hid, w, p["targets"], p["mask"], p["advantages"], p["old"])
        loss.backward()
        return loss.detach(), hid.grad, w.grad
    return step


def liger_jsd_step(p: dict) -> Step:
    """Liger's fused-linear JSD (student vs teacher, beta 0.5, every token a label, fp32 dW
    accumulation like ours): a distillation-only reference."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    fn = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0, accum_dtype=torch.float32)

    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        loss = fn(hid, w, p["teacher_hidden"], p["teacher_weight"], p["targets"])
        loss.backward()
        return loss.detach(), hid.grad, w.grad
    return step


def designs(device: str) -> list[Design]:
    """Every timed design, headline rows first (in the order the issue lists them).

    GEMM passes (fwd+bwd): recompute 4 (forward, recompute, dh, dW; a full-vocabulary teacher
    +2: its tile in the forward and again in the recompute); 3-pass and torch rows 3 (teacher
    +1); naive 3; Liger chunked GRPO 4 (forward, then recompute, dh, dW inside its forward);
    Liger fused-linear JSD 4 (student, teacher, dh, dW)."""
    return [
        Design("ours triton recompute (sampled)", lambda p: triton_step(p, False, device=device), 4,
               ours=True, chunk="recompute", headline=True),
        Design("ours triton 3-pass (sampled)", lambda p: triton_step(p, True, device=device), 3,
               ours=True, chunk="rows", headline=True),
        Design("ours triton recompute, hopper variant (sampled)",
               lambda p: triton_step(p, False, variant_name="hopper", device=device), 4,
               ours=True, chunk="recompute", headline=True),
        Design("liger chunked GRPO (matched)", liger_grpo_step, 4, headline=True),
        Design("naive bf16 GEMMs, fp32 logits (sampled)", naive_step, 3),
        Design("torch-chunked rows, bf16 GEMMs (sampled)", torch16_step, 3),
        Design("ours triton 3-pass reverse_kl", lambda p: triton_step(p, True, "reverse_kl", device=device), 4,
               teacher=True, ours=True, chunk="rows"),
        Design("ours triton recompute reverse_kl", lambda p: triton_step(p, False, "reverse_kl", device=device),
               6, teacher=True, ours=True, chunk="recompute"),
        Design("torch-chunked rows, bf16 GEMMs reverse_kl", lambda p: torch16_step(p, "reverse_kl"), 4,
               teacher=True),
        Design("liger fused-linear JSD", liger_jsd_step, 4, teacher=True),
    ]
