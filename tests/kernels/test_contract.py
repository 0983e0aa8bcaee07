"""The loss contract: micro-batch invariance, the paper's formula, memory bound, config, imports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sdar_kernels import LossConfig, fused_linear_sdar_loss

from .problems import fresh_seed, make_problem, rel_err, run_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_with_global_normalizer_give_the_full_batch_gradient(agg):
    seed = fresh_seed()
    p = make_problem(90, 16, 77, seed, n_seq=6, scale=2.0)
    cfg = LossConfig.preset("sdar", backend="torch", agg=agg, entropy_coef=0.01)
    seg, m = p.segments, p.mask
    if agg == "token-mean":
        normalizer = m.sum()
    elif agg == "seq-mean-token-sum-norm":
        normalizer = torch.tensor(40.0)
    else:  # sequences with at least one loss token
        normalizer = torch.tensor(float(sum(m[seg == k].sum() > 0 for k in seg.unique())))
    full_loss, full_grads, _ = run_loss(p, cfg, torch.float64, normalizer=normalizer)
    # cut at sequence boundaries into 3 micro-batches
    bounds = [0] + [int((seg < k).sum()) for k in (2, 4)] + [90]
    total_loss, total_grads = 0.0, None
    for a, b in zip(bounds[:-1], bounds[1:]):
        loss, grads, _ = run_loss(p, cfg, torch.float64, normalizer=normalizer, sl=slice(a, b))
        total_loss += loss
        total_grads = grads if total_grads is None else [x + y for x, y in zip(total_grads, grads)]
    assert rel_err(torch.as_tensor(total_loss), full_loss) <= 1e-6, f"seed={seed}"
    for g, fg in zip(total_grads, full_grads):
        assert rel_err(g, fg) <= 1e-6, f"seed={seed}"


def test_sdar_preset_equals_the_papers_formula():
    """PPO-clip token-mean + 0.01 k3 + 0.01 mean(g (t - s)), g = sigmoid(5 (t - s)) detached."""
    seed = fresh_seed()
    p = make_problem(120, 24, 301, seed, scale=3.0)
    loss, grads, _ = run_loss(p, LossConfig.preset("sdar", backend="torch"), torch.float64)

    h = p.hidden.clone().requires_grad_(True)
    w = p.weight.clone().requires_grad_(True)
    b = p.bias.clone().requires_grad_(True)
    s = torch.log_softmax(F.linear(h, w, b), -1).gather(1, p.targets[:, None])[:, 0]
    m, A = p.mask, p.advantages
    ratio = torch.exp(s - p.old)
    pg = torch.max(-A * ratio, -A * torch.clamp(ratio, 0.8, 1.2))
    pg = torch.where(A < 0, torch.min(pg, -3.0 * A), pg)
    k3 = torch.exp(p.ref - s) - (p.ref - s) - 1
    g = torch.sigmoid(5 * (p.teacher - s)).detach()
    mean = lambda x: (m * x).sum() / m.sum()  # noqa: E731
    paper = mean(pg) + 0.01 * mean(k3) + 0.01 * mean(g * (p.teacher - s))
    paper_grads = torch.autograd.grad(paper, [h, w, b])
    assert rel_err(loss, paper) <= 1e-10, f"seed={seed}"
    for a, r in zip(grads, paper_grads):
        assert rel_err(a, r) <= 1e-10, f"seed={seed}"


class LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("opts", [dict(), dict(divergence="jsd", entropy_coef=0.01), dict(grad_in_forward=False),
                                  dict(divergence="jsd", entropy_coef=0.01, grad_in_forward=False)])
def test_torch_backend_never_allocates_an_n_by_v_over_8_tensor(opts):
    n, h, v = 512, 32, 32768
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_(True)
    teacher_h = torch.randn(n, h, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    zeros, ones = torch.zeros(n), torch.ones(n)
    cfg = LossConfig.preset("sdar", backend="torch", **opts)
    with LargestAllocation() as tracker:
        out = fused_linear_sdar_loss(hidden, weight, y, torch.randn(n, generator=g), zeros - 5, ones,
                                     teacher_logprobs=zeros - 5, teacher_hidden=teacher_h,
                                     teacher_weight=weight.detach(), ref_logprobs=zeros - 5, config=cfg)
        out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert tracker.largest < n * v // 8, f"{tracker.op} made a tensor of {tracker.largest} elements"
    assert tracker.largest >= v * h  # the tracker saw dW: it is actually recording


def test_invalid_config_values_name_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"LossConfig.gate='sigmoid'.*gap, entropy, soft_or, none"):
        LossConfig(gate="sigmoid")
    with pytest.raises(ValueError, match=r"agg='mean'.*token-mean"):
        LossConfig.preset("sdar", agg="mean")
    with pytest.raises(ValueError, match=r"preset name='ppo'.*grpo, sdar"):
        LossConfig.preset("ppo")
    with pytest.raises(ValueError, match=r"no field\(s\) \['lambda_'\]"):
        LossConfig.preset("sdar", lambda_=0.1)
    with pytest.raises(ValueError, match=r"temperature=0.*> 0"):
        LossConfig(temperature=0)
    with pytest.raises(ValueError, match=r"dual_clip=0.5"):
        LossConfig(dual_clip=0.5)


def test_paper_defaults_in_presets():
    sdar = LossConfig.preset("sdar")
    assert (sdar.sd_coef, sdar.gate_beta, sdar.kl_coef, sdar.kl_type, sdar.clip_low, sdar.agg) == (
        0.01, 5.0, 0.01, "k3", 0.2, "token-mean")
    assert LossConfig.preset("grpo").sd_coef == 0 and LossConfig.preset("grpo_opsd").gate_beta == 0
    assert LossConfig.preset("opsd").policy_coef == 0


def test_bad_inputs_raise_clear_errors():
    p = make_problem(10, 8, 20, 0)
    h = p.hidden.requires_grad_(True)
    cfg = LossConfig.preset("sdar", backend="torch")
    with pytest.raises(ValueError, match="teacher_logprobs"):
        fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages, p.old, p.mask, ref_logprobs=p.ref, config=cfg)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages, p.old, p.mask, teacher_logprobs=p.teacher,
                               config=cfg)
    with pytest.raises(ValueError, match=r"targets\[0\]=-100 is outside \[0, V=20\)"):
        fused_linear_sdar_loss(h, p.weight, p.targets * 0 - 100, p.advantages, p.old, p.mask,
                               teacher_logprobs=p.teacher, ref_logprobs=p.ref, config=cfg)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H=8"):
        fused_linear_sdar_loss(h, p.weight[:, :4], p.targets, p.advantages, p.old, p.mask,
                               teacher_logprobs=p.teacher, ref_logprobs=p.ref, config=cfg)
    with pytest.raises(ValueError, match=r"advantages must be \[N\]=10"):
        fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages[:3], p.old, p.mask,
                               teacher_logprobs=p.teacher, ref_logprobs=p.ref, config=cfg)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages, p.old, p.mask, teacher_logprobs=p.teacher,
                               ref_logprobs=p.ref, config=cfg.replace(divergence="reverse_kl"))


def test_metrics_are_device_tensors():
    _, _, out = run_loss(make_problem(50, 8, 40, fresh_seed()), LossConfig.preset("sdar", backend="torch"),
                         torch.float32)
    expected = {"gate_mean", "gate_active", "gap_mean", "div_mean", "clip_frac", "ratio_mean", "ref_kl",
                "entropy_mean", "tokens", "pg_loss", "sd_loss"}
    assert expected <= set(out.metrics)
    for name, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
    assert 0 <= out.metrics["gate_active"] <= 1 and 0 < out.metrics["gate_mean"] < 1
    assert out.logprobs.shape == (50,) and not out.logprobs.requires_grad


def test_importing_the_kernels_loads_nothing_else_of_ours():
    code = ("import sdar_kernels, sys; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'sdar_engine', 'sdar_envs')]; print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_autocast_does_not_recast_the_kernels():
    """Inside a bf16 autocast region the statistics stay fp32-accurate (no bf16 GEMM logits)."""
    p = make_problem(64, 32, 500, fresh_seed(), scale=3.0)
    h = p.hidden.float().requires_grad_(True)
    w = p.weight.float().requires_grad_(True)
    cfg = LossConfig.preset("sdar", backend="torch")
    plain = fused_linear_sdar_loss(h, w, p.targets, p.advantages, p.old, p.mask, teacher_logprobs=p.teacher,
                                   ref_logprobs=p.ref, config=cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fused_linear_sdar_loss(h, w, p.targets, p.advantages, p.old, p.mask, teacher_logprobs=p.teacher,
                                      ref_logprobs=p.ref, config=cfg)
    cast.loss.backward()
    assert rel_err(cast.logprobs, plain.logprobs) <= 1e-5
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()


def test_a_loss_with_every_coefficient_zero_is_zero_with_zero_gradients():
    p = make_problem(20, 8, 30, fresh_seed())
    cfg = LossConfig.preset("grpo", backend="torch", policy_coef=0.0, kl_coef=0.0)
    loss, grads, _ = run_loss(p, cfg, torch.float64)
    assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads)
