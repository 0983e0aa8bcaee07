"""sdar_kernels.ops: the loss as the torch.library custom op sdar::fused_linear_sdar_loss.

Eager: equals fused_linear_sdar_loss (loss, per-token outputs, metrics, every gradient).
Compiled: a tiny model step under torch.compile(fullgraph=True) equals eager with 0 graph breaks,
while the plain entry point cannot be compiled with fullgraph=True (the reason the op exists).
Backend "aot_eager" runs Dynamo + AOTAutograd (the fake and the backward formula); one test runs
inductor end to end (it builds C++ kernels: ~20 s on the 2-core box).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the triton-backend test runs on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402

from sdar_kernels import LossConfig, fused_linear_sdar_loss  # noqa: E402
from sdar_kernels.ops import METRIC_NAMES, OP_NAME, fused_linear_sdar_loss_op  # noqa: E402

B, T, H, V = 3, 5, 7, 23  # odd shapes
CONFIGS = {
    "sdar_kl": dict(preset="sdar", kl_coef=0.05),
    "grpo_seq": dict(preset="grpo", agg="seq-mean-token-mean", kl_coef=0.0, entropy_coef=0.01),
    "stats_path": dict(preset="sdar", kl_coef=0.05, grad_in_forward=False, temperature=0.7),
}


class Tiny(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(H, H).to(dtype)
        self.lm_head = torch.nn.Linear(H, V).to(dtype)


def _batch(seed: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = B * T
    mask = (torch.rand(n, generator=g) > 0.3).to(dtype)
    mask[T:2 * T] = 0  # a fully masked sequence
    return {"x": torch.randn(n, H, generator=g, dtype=dtype), "y": torch.randint(0, V, (n,), generator=g),
            "mask": mask, "adv": torch.randn(n, generator=g, dtype=dtype),
            "old": -3 + torch.randn(n, generator=g, dtype=dtype),
            "teacher": -3 + torch.randn(n, generator=g, dtype=dtype),
            "ref": -3 + torch.randn(n, generator=g, dtype=dtype), "seg": torch.arange(n) // T}


def _step(model: Tiny, b: dict, cfg: LossConfig, fn):
    h = torch.tanh(model.trunk(b["x"]))
    out = fn(h, model.lm_head.weight, b["y"], b["adv"], b["old"], b["mask"], teacher_logprobs=b["teacher"],
             ref_logprobs=b["ref"], segment_ids=b["seg"], bias=model.lm_head.bias, normalizer=9.0, config=cfg)
    return out.loss * 3.0, out.logprobs, out.entropy, out.metrics


def _run(model: Tiny, step) -> list:
    model.zero_grad(set_to_none=True)
    loss, logp, ent, metrics = step()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return [loss.detach(), logp, ent, metrics] + grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _cfg(name: str) -> LossConfig:
    spec = dict(CONFIGS[name])
    return LossConfig.preset(spec.pop("preset"), backend="torch", **spec)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eager_op_equals_the_plain_loss(name):
    cfg, b, model = _cfg(name), _batch(1, torch.float64), Tiny(torch.float64)
    plain = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss))
    op = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss_op))
    for i in (0, 1, 2, *range(4, len(plain))):
        assert _rel(op[i], plain[i]) <= 1e-14, i
    assert op[0].dtype == plain[0].dtype == torch.float64
    for key, value in plain[3].items():  # every metric the plain loss reports, nothing else
        assert key in METRIC_NAMES and torch.allclose(op[3][key], value, rtol=1e-14, atol=0), key
    assert all(bool(torch.isnan(v)) for k, v in op[3].items() if k not in plain[3])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_step_equals_eager_with_no_graph_break(name):
    cfg, b, model = _cfg(name), _batch(2), Tiny()
    eager = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda: _step(model, b, cfg, fused_linear_sdar_loss_op), fullgraph=True, backend=counter)
    got = _run(model, compiled)
    assert counter.frame_count == 1  # one graph: the whole step
    for i in (0, 1, 2, *range(4, len(eager))):
        assert _rel(got[i], eager[i]) <= 1e-6, i
    assert torch.allclose(got[3]["gate_mean"], eager[3]["gate_mean"]) if "gate_mean" in eager[3] else True
    explained = torch._dynamo.explain(lambda: _step(model, b, cfg, fused_linear_sdar_loss_op))()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graph = "".join(g.code for g in explained.graphs)
    assert "sdar.fused_linear_sdar_loss" in graph  # the loss is one opaque node


def test_the_plain_entry_point_breaks_a_fullgraph_compile():
    """Why the op exists: host syncs (input checks, masked-token compaction) end the graph."""
    cfg, b, model = _cfg("sdar_kl"), _batch(3), Tiny()
    for c in (cfg, cfg.replace(check_inputs=False)):
        with pytest.raises(Exception, match="data-dependent|nonzero|item|Unsupported|graph break"):
            torch.compile(lambda: _step(model, b, c, fused_linear_sdar_loss), fullgraph=True, backend="aot_eager")()


def test_inductor_compiled_step_equals_eager():
    cfg, b, model = _cfg("sdar_kl"), _batch(4), Tiny()
    eager = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss))
    got = _run(model, torch.compile(lambda: _step(model, b, cfg, fused_linear_sdar_loss_op), fullgraph=True))
    for i in (0, 1, *range(4, len(eager))):
        assert _rel(got[i], eager[i]) <= 1e-6, i


def test_no_grad_frozen_weight_and_batched_hidden():
    """No gradient wanted (old / teacher passes); a frozen lm_head; [B, T, H] hidden -> [B, T] outputs."""
    cfg, b, model = _cfg("sdar_kl"), _batch(5), Tiny()
    with torch.no_grad():
        plain = _step(model, b, cfg, fused_linear_sdar_loss)
        op = _step(model, b, cfg, fused_linear_sdar_loss_op)
    assert _rel(op[0], plain[0]) <= 1e-6 and not op[0].requires_grad
    model.lm_head.requires_grad_(False)
    got = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss_op))
    want = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss))
    assert model.lm_head.weight.grad is None and len(got) == len(want) == 6
    assert _rel(got[4], want[4]) <= 1e-6 and _rel(got[5], want[5]) <= 1e-6
    h3 = torch.randn(B, T, H, generator=torch.Generator().manual_seed(6), requires_grad=True)
    shaped = {k: b[k].view(B, T) for k in ("y", "mask", "old", "teacher", "ref")}
    outs = []
    for fn in (fused_linear_sdar_loss, fused_linear_sdar_loss_op):
        h3.grad = None
        out = fn(h3, model.lm_head.weight, shaped["y"], b["adv"].view(B, T)[:, 0], shaped["old"], shaped["mask"],
                 teacher_logprobs=shaped["teacher"], ref_logprobs=shaped["ref"], config=cfg)
        out.loss.backward()
        outs.append((out.loss.detach(), out.logprobs, h3.grad.clone()))
    assert outs[1][1].shape == (B, T)
    for a, w in zip(outs[1], outs[0]):
        assert _rel(a, w) <= 1e-6


def test_op_errors_and_registration():
    cfg, b, model = _cfg("sdar_kl"), _batch(7), Tiny()
    h = torch.tanh(model.trunk(b["x"]))
    with pytest.raises(ValueError, match="teacher_logprobs"):  # raised inside the op, as by the plain loss
        fused_linear_sdar_loss_op(h, model.lm_head.weight, b["y"], b["adv"], b["old"], b["mask"], config=cfg)
    bad = b["adv"].clone()
    bad[0] = float("nan")
    b["mask"][0] = 1
    with pytest.raises(ValueError, match=r"advantages\[0\]"):
        fused_linear_sdar_loss_op(h, model.lm_head.weight, b["y"], bad, b["old"], b["mask"],
                                  teacher_logprobs=b["teacher"], ref_logprobs=b["ref"], config=cfg)
    assert hasattr(torch.ops.sdar, OP_NAME.split("::")[1])


def test_retain_graph_backward_repeats_the_gradient():
    """Gradients are computed in the op's forward and only scaled by backward (not consumed)."""
    cfg, b, model = _cfg("sdar_kl"), _batch(8), Tiny()
    loss = _step(model, b, cfg, fused_linear_sdar_loss_op)[0]
    loss.backward(retain_graph=True)
    first = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert torch.equal(model.lm_head.weight.grad, first)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_eager_op_on_the_triton_backend(grad_in_forward):
    """The op runs whichever backend the config names: Triton (interpreted on the CPU) here."""
    pytest.importorskip("triton")
    from .test_triton_stats import _backend

    _backend()
    cfg = LossConfig.preset("sdar", kl_coef=0.05, backend="triton", grad_in_forward=grad_in_forward)
    b, model = _batch(9), Tiny()
    plain = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss))
    op = _run(model, lambda: _step(model, b, cfg, fused_linear_sdar_loss_op))
    for i in (0, 1, 2, *range(4, len(plain))):
        assert _rel(op[i], plain[i]) <= 1e-6, i
