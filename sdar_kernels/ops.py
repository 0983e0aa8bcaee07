"""The SDAR loss as one ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees one node.

``fused_linear_sdar_loss`` itself breaks a compiled graph: it compacts masked tokens with
``nonzero`` (a data-dependent shape), its input checks read a flag on the host, and its
gradients-in-forward path calls ``torch.autograd.grad`` inside an ``autograd.Function``. As the
custom op ``sdar::fused_linear_sdar_loss`` all of that runs inside one opaque node: Dynamo and
AOTAutograd see only its fake (shapes and dtypes, :func:`_fake`) and its backward formula
(:func:`_backward`), and the eager kernels run when the compiled graph executes.

    from sdar_kernels.ops import fused_linear_sdar_loss_op      # same arguments as fused_linear_sdar_loss
    out = fused_linear_sdar_loss_op(hidden, weight, targets, advantages, old, mask, config=cfg)

The op computes dL/dhidden, dL/dweight, dL/dbias in its forward (the loss is a scalar: exact for
any use of it) and returns them as extra outputs; its backward scales them by the upstream
gradient (retain_graph works; a double backward does not), and ``logprobs``,
``entropy`` and the metrics are detached, as in ``SDAROutput``. Teacher tensors never get a
gradient. ``metrics`` holds every name of :data:`METRIC_NAMES` as a 0-d tensor, NaN where the
config does not produce it (a compiled graph cannot have a config-dependent dict of outputs
without a host sync). DTensor (FSDP2) weights are gathered before the op, eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from .config import LossConfig
from .dtensor import localize
from .loss import SDAROutput, fused_linear_sdar_loss
from .stats import accum_dtype

OP_NAME = "sdar::fused_linear_sdar_loss"
# every metric fused_linear_sdar_loss can report, in the order of the op's metrics output
METRIC_NAMES = ("pg_loss", "ratio_mean", "clip_frac", "entropy_mean", "tokens", "ref_kl", "gap_mean",
                "gate_mean", "gate_active", "div_mean", "sd_loss", "topk_student_mass", "topk_teacher_mass")
_warned: set = set()


@torch.compiler.assume_constant_result
def _config_json(config: LossConfig) -> str:
    """The config as a JSON string (a constant of the traced graph)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _config(text: str) -> LossConfig:
    return LossConfig(**json.loads(text))


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """A custom op's kernel runs below the Autograd dispatch keys; the loss needs autograd inside
    (its per-token coefficients come from torch.autograd.grad), so the kernel lifts that
    exclusion for its own body, and only the Autograd keys."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


@torch.library.custom_op(OP_NAME, mutates_args=())
def _loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
             loss_mask: Tensor, inputs: list[Optional[Tensor]], names: str, config: str,
             grad_hidden: bool, grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                Tensor, Tensor, Tensor]:
    """(loss 0-d, logprobs, entropy [hidden.shape[:-1]], metrics [len(METRIC_NAMES)], dL/dhidden,
    dL/dweight, dL/dbias (each empty when not requested)). ``inputs`` are the other tensor
    arguments of fused_linear_sdar_loss, named by the comma-separated ``names``."""
    cfg = _config(config)
    kwargs = dict(zip(names.split(","), inputs))
    wanted = (grad_hidden, grad_weight, grad_bias and bias is not None)
    leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip((hidden, weight, bias), wanted)]
    with _autograd_inside_op(), torch.set_grad_enabled(any(wanted)):
        out = fused_linear_sdar_loss(leaves[0], leaves[1], targets, kwargs.pop("advantages"),
                                     kwargs.pop("old_logprobs"), loss_mask, bias=leaves[2], config=cfg, **kwargs)
        need = [x for x, w in zip(leaves, wanted) if w]
        got = iter(torch.autograd.grad(out.loss, need, allow_unused=True) if need and out.loss.requires_grad
                   else [None] * len(need))
    grads = []
    for x, w in zip((hidden, weight, bias), wanted):
        g = next(got) if w else None
        grads.append(hidden.new_empty(0) if not w else (torch.zeros_like(x) if g is None else g))
    acc = accum_dtype(hidden.dtype)
    metrics = torch.full((len(METRIC_NAMES),), float("nan"), dtype=acc, device=hidden.device)
    for name, value in out.metrics.items():
        if name in METRIC_NAMES:
            metrics[METRIC_NAMES.index(name)] = value.detach().to(acc)
        elif name not in _warned:
            _warned.add(name)
            warnings.warn(f"metric {name!r} is not in sdar_kernels.ops.METRIC_NAMES: the op drops it", RuntimeWarning)
    logp = out.logprobs.detach().to(acc)
    entropy = out.entropy.detach().to(acc) if out.entropy is not None else torch.zeros_like(logp)
    return (out.loss.detach().to(acc), logp, entropy, metrics, *grads)


@_loss_op.register_fake
def _fake(hidden, weight, bias, targets, loss_mask, inputs, names, config, grad_hidden, grad_weight, grad_bias):
    acc = accum_dtype(hidden.dtype)
    per_token = hidden.new_empty(hidden.shape[:-1], dtype=acc)
    return (hidden.new_empty((), dtype=acc), per_token, torch.empty_like(per_token),
            hidden.new_empty((len(METRIC_NAMES),), dtype=acc),
            torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if (grad_bias and bias is not None) else hidden.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[4:])
    ctx.n_inputs = len(inputs[5])


def _backward(ctx, g_loss, g_logp, g_entropy, g_metrics, g_dh, g_dw, g_db):
    def scaled(d: Tensor) -> Optional[Tensor]:
        return None if d.numel() == 0 else (d * g_loss).to(d.dtype)

    d_h, d_w, d_b = ctx.saved_tensors
    return scaled(d_h), scaled(d_w), scaled(d_b), None, None, [None] * ctx.n_inputs, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)

_NUMBERS = ("normalizer", "entropy_normalizer")  # a Python number becomes a 0-d float64 tensor


@localize
def fused_linear_sdar_loss_op(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                              old_logprobs: Optional[Tensor], loss_mask: Tensor,
                              teacher_logprobs: Optional[Tensor] = None,
                              teacher_hidden: Optional[Tensor] = None,
                              teacher_weight: Optional[Tensor] = None,
                              ref_logprobs: Optional[Tensor] = None,
                              segment_ids: Optional[Tensor] = None,
                              normalizer: Optional[Tensor | float] = None,
                              bias: Optional[Tensor] = None,
                              teacher_bias: Optional[Tensor] = None,
                              config: LossConfig = LossConfig(), *,
                              importance_weights: Optional[Tensor] = None,
                              entropy_normalizer: Optional[Tensor | float] = None,
                              teacher_topk_ids: Optional[Tensor] = None,
                              teacher_topk_logprobs: Optional[Tensor] = None) -> SDAROutput:
    """``fused_linear_sdar_loss`` (same arguments, shapes and units) through the custom op
    ``sdar::fused_linear_sdar_loss``: safe inside ``torch.compile(fullgraph=True)``.

    Differences from the plain entry point: metrics carry every name of METRIC_NAMES (NaN where
    the config has none); one backward per call; gradients flow to hidden, weight and bias only.
    """
    given = {"advantages": advantages, "old_logprobs": old_logprobs, "teacher_logprobs": teacher_logprobs,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "ref_logprobs": ref_logprobs,
             "segment_ids": segment_ids, "normalizer": normalizer, "teacher_bias": teacher_bias,
             "importance_weights": importance_weights, "entropy_normalizer": entropy_normalizer,
             "teacher_topk_ids": teacher_topk_ids, "teacher_topk_logprobs": teacher_topk_logprobs}
    for name in _NUMBERS:
        if given[name] is not None and not isinstance(given[name], Tensor):
            given[name] = torch.tensor(float(given[name]), dtype=torch.float64, device=hidden.device)
    keys = [k for k in sorted(given) if given[k] is not None or k == "old_logprobs"]
    grad = torch.is_grad_enabled()
    loss, logp, entropy, metrics, _, _, _ = _loss_op(
        hidden, weight, bias, targets, loss_mask, [given[k] for k in keys], ",".join(keys), _config_json(config),
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad)
    return SDAROutput(loss=loss, metrics={name: metrics[i] for i, name in enumerate(METRIC_NAMES)},
                      logprobs=logp, entropy=entropy)
