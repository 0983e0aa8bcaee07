"""Random SDAR-loss problems and comparison helpers for the kernel tests."""
from __future__ import annotations

import dataclasses
import os
import random
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from sdar_kernels import LossConfig, fused_linear_sdar_loss
from sdar_kernels.reference import reference_stats
from sdar_kernels.stats import StatsSpec


def fresh_seed() -> int:
    """The random seed of the running test: FIXED by default, a different one per test and case.

    Default: a stable hash of the pytest node id (the test and its parameters), so `make test`
    checks the same broad set of seeds on every run and machine. SDAR_TEST_SEED=random explores
    (a fresh seed per call, printed in every assertion); SDAR_TEST_SEED=<n> replays one seed. A
    seed that exploration finds failing becomes a fixed case in the test that found it.
    """
    env = os.environ.get("SDAR_TEST_SEED", "")
    if env == "random":
        return random.SystemRandom().randrange(2**31)
    if env:
        return int(env)
    node = os.environ.get("PYTEST_CURRENT_TEST", "outside-pytest").rsplit(" (", 1)[0]
    return zlib.crc32(node.encode()) & 0x7FFFFFFF


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor
    mask: torch.Tensor
    teacher: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    ref: torch.Tensor
    segments: torch.Tensor
    seed: int

    def rounded(self, dtype: torch.dtype) -> "Problem":
        """The same problem with its float inputs rounded through ``dtype`` (kept in float64), so
        that a float64 oracle sees exactly the values a ``dtype`` kernel sees."""
        r = lambda t: None if t is None else t.to(dtype).to(torch.float64)  # noqa: E731
        return dataclasses.replace(self, hidden=r(self.hidden), weight=r(self.weight), bias=r(self.bias),
                                   teacher_hidden=r(self.teacher_hidden), teacher_weight=r(self.teacher_weight))

    def leaves(self, dtype: torch.dtype, with_bias: bool = True) -> dict:
        """Fresh leaf tensors in ``dtype`` that require grad (hidden, weight, bias)."""
        out = {"hidden": self.hidden.to(dtype).requires_grad_(True),
               "weight": self.weight.to(dtype).requires_grad_(True)}
        out["bias"] = self.bias.to(dtype).requires_grad_(True) if (with_bias and self.bias is not None) else None
        return out


def make_problem(n: int, h: int, v: int, seed: int, scale: float = 1.0, n_seq: int = 3,
                 mask_frac: float = 0.7, bias: bool = True, temperature: float = 1.0) -> Problem:
    """Logits of size ~``scale``; old/teacher/ref log-probs near the policy's so ratios vary."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    hidden = torch.randn(n, h, generator=g, dtype=f64)
    weight = torch.randn(v, h, generator=g, dtype=f64) * (scale / max(h, 1) ** 0.5)
    b = torch.randn(v, generator=g, dtype=f64) * 0.1 * scale if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    th = hidden + 0.5 * torch.randn(n, h, generator=g, dtype=f64)
    tw = weight + 0.3 * torch.randn(v, h, generator=g, dtype=f64) * (scale / max(h, 1) ** 0.5)
    with torch.no_grad():
        s = reference_stats(hidden, weight, b, targets, None, None, None, StatsSpec(temperature=temperature)).logp
        t = reference_stats(th, tw, None, targets, None, None, None, StatsSpec(temperature=temperature)).logp
    noise = lambda: 0.3 * torch.randn(n, generator=g, dtype=f64)  # noqa: E731
    mask = (torch.rand(n, generator=g) < mask_frac).to(f64)
    segments = torch.sort(torch.randint(0, max(n_seq, 1), (n,), generator=g)).values
    adv = torch.randn(n_seq if n_seq > 0 else 1, generator=g, dtype=f64)[segments] if n else torch.zeros(0, dtype=f64)
    return Problem(hidden, weight, b, targets, adv, s + noise(), mask, t, th, tw, s + noise(), segments, seed)


def run_loss(p: Problem, cfg: LossConfig, dtype: torch.dtype, normalizer=None, with_bias: bool = True,
             sl: slice = slice(None)) -> tuple[torch.Tensor, list, object]:
    """Loss value and grads (hidden, weight, bias) of ``cfg`` on problem ``p`` (rows ``sl``)."""
    leaves = p.leaves(dtype, with_bias)
    full_div = cfg.full_vocab_divergence
    out = fused_linear_sdar_loss(
        leaves["hidden"][sl], leaves["weight"], p.targets[sl], p.advantages[sl], p.old[sl], p.mask[sl],
        teacher_logprobs=p.teacher[sl],
        teacher_hidden=p.teacher_hidden[sl].to(dtype) if full_div else None,
        teacher_weight=p.teacher_weight.to(dtype) if full_div else None,
        ref_logprobs=p.ref[sl], segment_ids=p.segments[sl], normalizer=normalizer,
        bias=leaves["bias"], config=cfg,
    )
    wanted = [t for t in (leaves["hidden"], leaves["weight"], leaves["bias"]) if t is not None]
    grads = torch.autograd.grad(out.loss, wanted, allow_unused=True)
    grads = [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wanted, grads)]
    return out.loss.detach(), [gr.detach() for gr in grads], out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (absolute when b is ~0), in float64."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 1e-12 else 1.0)
