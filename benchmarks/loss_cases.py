"""Benchmark cases of the fused SDAR loss and the fused log-prob pass, one callable per backend.

A case is (suite, backend, N tokens, V vocabulary, H hidden, dtype, device). ``prepare`` builds
the inputs and returns a zero-argument callable that runs the measured work once:

    suite "loss":      SDAR loss (paper preset "sdar") forward + backward (dL/dh and dL/dW)
    suite "logprobs":  per-token log-probs + entropies, forward only under no_grad (scoring)

Backends: "torch" (sdar_kernels chunked), "triton" (CUDA), "naive" (materialized [N, V]
logits -> log_softmax -> the same loss), "compiled" (torch.compile of naive), "liger"
(Liger-Kernel's chunked GRPO loss, plain torch, CPU or CUDA, when importable). ``skip_reason``
says why a backend cannot run here, or None.

Presets (the loss every backend of a case computes): "sdar" (the paper's SDAR preset) or
"liger-grpo" (GRPO with the settings Liger can express, benchmarks/liger_grpo.py: no KL, no
SDAR term, dual clip as Liger's delta, seq-mean-token-mean over sequences of
liger_grpo.SEQ_LEN tokens). The liger backend computes only "liger-grpo". Advantages are one
per sequence of SEQ_LEN tokens (GRPO), for every backend and preset.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import liger_grpo

SUITES = ("loss", "logprobs")
BACKENDS = ("naive", "torch", "compiled", "triton", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRESETS = ("sdar", "liger-grpo")
PRESET = "sdar"


@dataclass(frozen=True)
class Case:
    """One measurement: ``suite`` on ``backend`` at n tokens, v vocab, h hidden, in ``dtype``."""

    suite: str
    backend: str
    n: int
    v: int
    h: int
    dtype: str = "float32"
    device: str = "cpu"
    token_chunk: int = 1024
    vocab_chunk: int = 2048
    grad_in_forward: bool = True  # torch backend: whole-row path with dL/dW in the forward
    preset: str = PRESET

    def __post_init__(self) -> None:
        _check(self.suite in SUITES, "suite", self.suite, f"one of {SUITES}")
        _check(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {tuple(DTYPES)}")
        _check(self.preset in PRESETS, "preset", self.preset, f"one of {PRESETS}")
        if self.backend == "liger":
            _check(self.preset == "liger-grpo", "preset", self.preset,
                   "'liger-grpo' with backend='liger' (Liger has no SDAR term)")
        for name in ("n", "v", "h", "token_chunk", "vocab_chunk"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        extra = "" if self.grad_in_forward else "-4pass"
        if self.preset != PRESET and self.backend != "liger":
            extra += f"-{self.preset}"
        return f"{self.suite}-{self.backend}{extra}-N{self.n}-V{self.v}-H{self.h}-{self.dtype}"


def _check(ok: bool, field: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"Case.{field}={value!r} is invalid; expected {valid}")


def naive_bytes(case: Case) -> int:
    """Rough peak bytes of the naive backend: ~4 live [N, V] fp32 tensors (logits, log-softmax,
    its gradient, the entropy temporaries) plus dW (measured: 9.3 GiB at N=4096, V=151936)."""
    return 4 * case.n * case.v * 4 + case.v * case.h * 4


def skip_reason(case: Case, memory_budget: Optional[int] = None) -> Optional[str]:
    """Why ``case`` cannot run on this machine (None when it can)."""
    cuda = case.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return "device=cuda but torch.cuda.is_available() is False"
    if case.backend == "triton":
        if not cuda:
            return "triton backend needs CUDA tensors"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    if case.backend == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (pip install -r requirements/bench.txt)"
        if case.suite != "loss":
            return "Liger-Kernel has no standalone fused log-prob pass"
    if case.backend in ("naive", "compiled") and memory_budget is not None:
        need = naive_bytes(case)
        if need > memory_budget:
            return (f"materialized logits need ~{need / 2**30:.1f} GiB, over the "
                    f"{memory_budget / 2**30:.1f} GiB budget of this machine")
    return None


@dataclass
class Inputs:
    """Tensors of one case: hidden [N, H] and weight [V, H] (leafs requiring grad), targets and
    the per-token loss inputs [N] (advantages, old/teacher/ref log-probs, mask); for the
    "liger-grpo" preset also segment_ids [N] and the normalizer (number of sequences)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    advantages: Tensor
    old_logprobs: Tensor
    teacher_logprobs: Tensor
    ref_logprobs: Tensor
    loss_mask: Tensor
    segment_ids: Optional[Tensor] = None
    normalizer: Optional[float] = None


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Seeded inputs of realistic scale: logits with std ~2 (hidden ~N(0,1), weight ~N(0, 4/H)),
    one advantage per sequence of liger_grpo.SEQ_LEN tokens, ~10 % of tokens masked."""
    g = torch.Generator().manual_seed(seed)
    dt, dev = DTYPES[case.dtype], torch.device(case.device)
    n = case.n
    hidden = torch.randn(n, case.h, generator=g).to(dev, dt).requires_grad_(case.suite == "loss")
    weight = torch.randn(case.v, case.h, generator=g).mul_(2.0 / case.h ** 0.5)
    weight = weight.to(dev, dt).requires_grad_(case.suite == "loss")
    targets = torch.randint(0, case.v, (n,), generator=g).to(dev)
    base = -torch.rand(n, generator=g) * 8  # plausible log-probs
    advantages = liger_grpo.per_sequence_advantages(*liger_grpo.sequence_layout(n), g).to(dev)
    grpo = case.preset == "liger-grpo"
    return Inputs(hidden, weight, targets, advantages,
                  old_logprobs=(base + 0.05 * torch.randn(n, generator=g)).to(dev),
                  teacher_logprobs=(base + torch.randn(n, generator=g)).to(dev),
                  ref_logprobs=(base + 0.1 * torch.randn(n, generator=g)).to(dev),
                  loss_mask=(torch.rand(n, generator=g) > 0.1).float().to(dev),
                  segment_ids=liger_grpo.segment_ids(n, device=dev) if grpo else None,
                  normalizer=liger_grpo.matched_normalizer("grpo", n) if grpo else None)


def loss_config(case: Case, backend: Optional[str] = None):
    """The case's preset (paper SDAR, or GRPO matched to Liger) with its backend and chunk sizes."""
    import dataclasses

    from sdar_kernels import LossConfig

    extra = {}
    if "grad_in_forward" in {f.name for f in dataclasses.fields(LossConfig)}:
        extra["grad_in_forward"] = case.grad_in_forward
    elif not case.grad_in_forward:
        raise ValueError("Case.grad_in_forward=False needs a LossConfig with the grad_in_forward field")
    common = dict(backend=backend or case.backend, token_chunk=case.token_chunk, vocab_chunk=case.vocab_chunk,
                  **extra)
    if case.preset == "liger-grpo":
        return liger_grpo.matched_config("grpo", **common)
    return LossConfig.preset(PRESET, **common)


def naive_loss(x: Inputs, cfg) -> Tensor:
    """Materialized baseline: logits [N, V] -> log_softmax -> gather, entropy, same epilogue."""
    from sdar_kernels.loss import sdar_epilogue

    logits = (x.hidden @ x.weight.T).float()
    lp = torch.log_softmax(logits, dim=-1)
    logp = lp.gather(1, x.targets[:, None])[:, 0]
    with torch.no_grad():  # the fused kernels report the entropy as a metric too
        entropy = -(lp.exp() * lp).sum(-1)
    loss, _ = sdar_epilogue(logp, entropy, None, x.advantages, x.old_logprobs, x.loss_mask,
                            x.teacher_logprobs, x.ref_logprobs, x.segment_ids, x.normalizer, cfg)
    return loss


@torch.no_grad()
def naive_logprobs(x: Inputs) -> tuple[Tensor, Tensor]:
    """Materialized baseline of the scoring pass: (logp [N], entropy [N])."""
    lp = torch.log_softmax((x.hidden @ x.weight.T).float(), dim=-1)
    return lp.gather(1, x.targets[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def _fused_loss(x: Inputs, cfg) -> Tensor:
    from sdar_kernels import fused_linear_sdar_loss

    return fused_linear_sdar_loss(x.hidden, x.weight, x.targets, x.advantages, x.old_logprobs,
                                  x.loss_mask, teacher_logprobs=x.teacher_logprobs,
                                  ref_logprobs=x.ref_logprobs, segment_ids=x.segment_ids,
                                  normalizer=x.normalizer, config=cfg).loss


def _liger_body(x: Inputs, cfg) -> Callable[[], Tensor]:
    """Liger's chunked GRPO loss on the same inputs, settings matched to ``cfg`` (liger_grpo.py)."""
    liger_grpo.check_per_sequence(x.advantages)
    fn = liger_grpo.liger_module(cfg, "grpo")
    return lambda: liger_grpo.liger_loss(fn, x.hidden, x.weight, x.targets, x.loss_mask, x.advantages,
                                         x.old_logprobs)


def prepare(case: Case, x: Inputs) -> Callable[[], object]:
    """The zero-argument callable that runs ``case`` once on ``x`` (backward included for loss)."""
    if case.suite == "logprobs":
        return _prepare_logprobs(case, x)
    if case.backend == "naive":
        cfg = loss_config(case, "torch")
        body = lambda: naive_loss(x, cfg)  # noqa: E731
    elif case.backend == "compiled":
        cfg = loss_config(case, "torch")
        compiled = torch.compile(naive_loss, dynamic=False)
        body = lambda: compiled(x, cfg)  # noqa: E731
    elif case.backend == "liger":
        body = _liger_body(x, loss_config(case, "torch"))
    else:
        cfg = loss_config(case)
        body = lambda: _fused_loss(x, cfg)  # noqa: E731

    def step() -> Tensor:
        x.hidden.grad = x.weight.grad = None
        loss = body()
        loss.backward()
        return loss.detach()
    return step


def _prepare_logprobs(case: Case, x: Inputs) -> Callable[[], object]:
    from sdar_kernels import fused_linear_logprobs

    if case.backend == "naive":
        return lambda: naive_logprobs(x)
    if case.backend == "compiled":
        return torch.compile(lambda: naive_logprobs(x), dynamic=False)

    def fused():
        with torch.no_grad():
            return fused_linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True,
                                         backend=case.backend, token_chunk=case.token_chunk,
                                         vocab_chunk=case.vocab_chunk)
    return fused
