"""Value checks of the public API (issue #10): non-finite inputs and out-of-range targets on the
tokens the loss reads raise a ValueError naming the input and the token; padding may hold anything.
Both backends (Triton under TRITON_INTERPRET=1), and a bf16 trunk next to an fp32 lm_head."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from sdar_kernels import LossConfig, fused_linear_logprobs, fused_linear_sdar_loss  # noqa: E402

from .problems import make_problem, rel_err  # noqa: E402

pytest.importorskip("triton")
BACKENDS = ["torch", "triton"]


def _args(seed: int = 3, n: int = 24, h: int = 16, v: int = 40) -> dict:
    p = make_problem(n, h, v, seed, n_seq=2)
    f32 = lambda t: t.float()  # noqa: E731
    return dict(hidden=f32(p.hidden).requires_grad_(True), weight=f32(p.weight), targets=p.targets.clone(),
                advantages=f32(p.advantages), old_logprobs=f32(p.old), loss_mask=p.mask.float(),
                teacher_logprobs=f32(p.teacher), ref_logprobs=f32(p.ref))


def _first(mask: torch.Tensor, on: bool) -> int:
    return int(((mask != 0) == on).nonzero()[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["advantages", "old_logprobs", "teacher_logprobs", "ref_logprobs", "hidden"])
def test_non_finite_input_on_a_read_token_names_input_and_token(backend: str, name: str) -> None:
    a = _args()
    cfg = LossConfig.preset("sdar", backend=backend)
    i = _first(a["loss_mask"], True)
    bad = float("inf") if name == "hidden" else float("nan")
    with torch.no_grad():
        (a[name][i, 3] if name == "hidden" else a[name][i]).fill_(bad)
    with pytest.raises(ValueError, match=rf"{name}\[{i}\]=(nan|inf) is not finite on a token the loss reads"):
        fused_linear_sdar_loss(**a, config=cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_may_hold_anything(backend: str) -> None:
    """NaN advantages / teacher log-probs, inf hidden and -100 targets on masked tokens: same loss
    and gradients as clean values there."""
    clean, dirty = _args(), _args()
    cfg = LossConfig.preset("sdar", backend=backend)
    off = (dirty["loss_mask"] == 0).nonzero()[:, 0]
    assert off.numel() >= 2
    with torch.no_grad():
        for k in ("advantages", "old_logprobs", "teacher_logprobs", "ref_logprobs"):
            dirty[k][off] = float("nan")
        dirty["hidden"][off] = float("inf")
    dirty["targets"][off] = -100
    out_c, out_d = fused_linear_sdar_loss(**clean, config=cfg), fused_linear_sdar_loss(**dirty, config=cfg)
    out_c.loss.backward()
    out_d.loss.backward()
    assert torch.isfinite(out_d.loss) and rel_err(out_d.loss, out_c.loss) <= 1e-6
    on = dirty["loss_mask"] != 0
    assert torch.isfinite(dirty["hidden"].grad[on]).all()
    assert rel_err(dirty["hidden"].grad[on], clean["hidden"].grad[on]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range_on_a_read_token(backend: str) -> None:
    a = _args()
    i = _first(a["loss_mask"], True)
    a["targets"][i] = 40  # == V
    with pytest.raises(ValueError, match=rf"targets\[{i}\]=40 is outside \[0, V=40\)"):
        fused_linear_sdar_loss(**a, config=LossConfig.preset("sdar", backend=backend))
    with pytest.raises(ValueError, match=rf"targets\[{i}\]=40 is outside"):
        fused_linear_logprobs(a["hidden"], a["weight"], a["targets"], backend=backend)
    # masked there: fine
    logp, _ = fused_linear_logprobs(a["hidden"], a["weight"], a["targets"], mask=(a["targets"] < 40),
                                    backend=backend)
    assert torch.isfinite(logp).all() and logp[i] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weight_or_normalizer(backend: str) -> None:
    a = _args()
    cfg = LossConfig.preset("sdar", backend=backend)
    w = a["weight"].clone()
    w[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight holds 1 non-finite value\(s\) of 640"):
        fused_linear_sdar_loss(**{**a, "weight": w}, config=cfg)
    with pytest.raises(ValueError, match=r"normalizer holds 1 non-finite"):
        fused_linear_sdar_loss(**a, normalizer=torch.tensor(float("inf")), config=cfg)
    with pytest.raises(ValueError, match=r"hidden\[0\]=nan"):
        fused_linear_logprobs(torch.full((3, 16), float("nan")), a["weight"], a["targets"][:3], backend=backend)


def test_inputs_the_config_does_not_read_are_not_checked() -> None:
    """NaN teacher log-probs under GRPO (no teacher term) and NaN ref log-probs with kl_coef=0."""
    a = _args()
    with torch.no_grad():
        a["teacher_logprobs"].fill_(float("nan"))
        a["ref_logprobs"].fill_(float("nan"))
    out = fused_linear_sdar_loss(**a, config=LossConfig.preset("grpo", backend="torch", kl_coef=0.0))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"normalizer=inf is not finite"):
        fused_linear_sdar_loss(**a, normalizer=float("inf"), config=LossConfig.preset("grpo", kl_coef=0.0))


@pytest.mark.parametrize("path", ["torch-rows", "torch-tiles", "triton-recompute", "triton-3pass", "triton-hopper"])
def test_out_of_range_target_without_checks_gives_nan_not_garbage(monkeypatch, path: str) -> None:
    """check_inputs=False and a target id outside [0, V): that token's log-prob is NaN (never a
    number read from leftover memory or a wrong column); the torch row path's gather raises."""
    a = _args(n=40, h=32, v=123)
    i = _first(a["loss_mask"], True)
    a["targets"][i] = 123
    if path == "triton-hopper":
        monkeypatch.setenv("SDAR_TRITON_VARIANT", "hopper")
    backend = path.split("-")[0]
    cfg = LossConfig.preset("sdar", backend=backend, check_inputs=False,
                            grad_in_forward=path in ("torch-rows", "triton-3pass"))
    if path == "torch-rows":
        with pytest.raises(RuntimeError, match="index"):
            fused_linear_sdar_loss(**a, config=cfg)
        return
    out = fused_linear_sdar_loss(**a, config=cfg)
    assert torch.isnan(out.logprobs[i])
    assert torch.isfinite(out.logprobs[torch.arange(40) != i]).all()


def test_check_inputs_false_skips_the_checks() -> None:
    a = _args()
    with torch.no_grad():
        a["advantages"][_first(a["loss_mask"], True)] = float("nan")
    out = fused_linear_sdar_loss(**a, config=LossConfig.preset("sdar", backend="torch", check_inputs=False))
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_bf16_hidden_with_fp32_lm_head_outside_autocast_on_triton(grad_in_forward: bool) -> None:
    """The Triton paths run an fp32 lm_head next to bf16 hidden states: the same loss and dL/dh
    as a hand cast of the weight, and an fp32 gradient for it. The 3-pass path (grad in forward)
    returns the fp32-accumulated dL/dW unrounded; the per-token op rounds it through bf16, as
    autocast would."""
    a = _args(n=40, h=32, v=123)
    hidden = a.pop("hidden").detach().bfloat16()
    w32 = a.pop("weight").clone().requires_grad_(True)
    cfg = LossConfig.preset("sdar", backend="triton", grad_in_forward=grad_in_forward)
    h1 = hidden.clone().requires_grad_(True)
    out = fused_linear_sdar_loss(h1, w32, **a, config=cfg)
    out.loss.backward()
    assert w32.grad is not None and w32.grad.dtype == torch.float32
    h2 = hidden.clone().requires_grad_(True)
    w16 = w32.detach().bfloat16().requires_grad_(True)
    ref = fused_linear_sdar_loss(h2, w16, **a, config=cfg)
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(h1.grad, h2.grad)
    if grad_in_forward:
        assert not torch.equal(w32.grad, w32.grad.bfloat16().float()), "dL/dW was rounded to bf16"
        assert torch.equal(w32.grad.bfloat16(), w16.grad)
    else:
        assert torch.equal(w32.grad, w16.grad.float())
