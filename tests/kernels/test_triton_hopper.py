"""The Hopper kernel variant (SDAR_TRITON_VARIANT=hopper) vs the float64 oracle, TRITON_INTERPRET=1.

The interpreter runs the persistent, flattened-loop kernels of hopper_kernels.py with both
operand paths: TMA tensor descriptors (the interpreter implements descriptor loads) when the
row strides are 16-byte aligned (H = 64, 128, teacher H_T = 64) and masked pointer loads
otherwise (H = 31, 59, 36, 69). A spy on `hopper.operands` asserts which path each case took.
Same tolerances as test_triton_stats.check_case; seeds are FIXED (SEEDS).
Block skipping (SDAR_TRITON_SKIP_EPS) is checked against the bound it promises.
"""
from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from sdar_kernels.stats import StatsSpec  # noqa: E402

from .test_triton_stats import (BF16, F16, F32, Case, _backend, check_case,  # noqa: E402
                                make_inputs, oracle, rel_err)

pytest.importorskip("triton")
SEEDS = (1234, 98765)

# (case, student on TMA, teacher on TMA); teacher H_T = H + 5 (make_inputs).
CASES = [
    (Case(F32, 77, 123, 64, "none", True, True, 1.0), True, True),
    (Case(F32, 77, 1001, 31, "none", False, False, 0.5), False, False),
    (Case(F32, 77, 1001, 64, "reverse_kl", True, False, 0.5), True, False),
    (Case(BF16, 77, 1001, 59, "forward_kl", False, True, 1.0), False, True),
    (Case(F32, 77, 123, 128, "jsd", True, True, 1.0, beta=0.3), True, False),
    (Case(BF16, 77, 1001, 64, "none", True, True, 1.0), True, True),
    (Case(BF16, 77, 123, 31, "reverse_kl", True, False, 0.5), False, False),
    (Case(BF16, 77, 1001, 59, "jsd", True, True, 2.0, beta=0.3), False, True),
    (Case(F32, 1, 4096, 64, "reverse_kl", True, True, 2.0), True, False),
    (Case(F16, 77, 123, 64, "reverse_kl", True, True, 1.0), True, False),
    # Extreme logits (|z| ~ 1e4)
    (Case(F32, 77, 1001, 64, "reverse_kl", True, True, 1.0, scale=4e3), True, False),
    (Case(F32, 77, 123, 59, "forward_kl", True, False, 0.5, scale=4e3), False, True),
    (Case(BF16, 77, 123, 64, "none", True, True, 1.0, scale=4e3), True, True),
]


def _hopper(monkeypatch, eps: str = "0"):
    """The interpreted backend with the Hopper variant selected; returns (backend, hopper)."""
    monkeypatch.setenv("SDAR_TRITON_VARIANT", "hopper")
    monkeypatch.setenv("SDAR_TRITON_SKIP_EPS", eps)
    tb = _backend()
    return tb, importlib.import_module("sdar_kernels.triton_backend.hopper")


def _case_id(item) -> str:
    c, tma, tma_t = item
    return (f"{str(c.dtype)[6:]}-N{c.n}-V{c.v}-H{c.h}-{c.div}-ent{int(c.ent)}-b{int(c.bias)}"
            f"-t{c.tau}" + ("-extreme" if c.scale > 100 else "") + f"-tma{int(tma)}{int(tma_t)}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("item", CASES, ids=_case_id)
def test_hopper_values_and_grads_match_fp64_oracle(monkeypatch, item, seed: int) -> None:
    case, tma, tma_t = item
    _, hopper = _hopper(monkeypatch)
    paths = []
    real = hopper.operands

    def spy(hidden, weight, cfg):
        out = real(hidden, weight, cfg)
        paths.append((hidden.shape[1], out[1]))
        return out

    monkeypatch.setattr(hopper, "operands", spy)
    check_case(case, seed)
    want = {(case.h, tma)} | ({(case.h + 5, tma_t)} if case.div != "none" else set())
    assert set(paths) == want, f"operand paths {sorted(set(paths))}, expected {sorted(want)}"


@pytest.mark.parametrize("dtype,div", [(F32, "none"), (BF16, "jsd")])
def test_hopper_backward_over_many_vocab_chunks(monkeypatch, dtype: torch.dtype, div: str) -> None:
    """A small scratch budget forces 8 vocab chunks (v_lo > 0 in the work lists)."""
    tb, _ = _hopper(monkeypatch)
    monkeypatch.setattr(tb.backward, "SCRATCH_BYTES", 77 * 4 * 128)
    check_case(Case(dtype, 77, 1001, 64, div, True, True, 0.8, beta=0.3), SEEDS[0])


def test_hopper_int32_targets_and_zero_rows(monkeypatch) -> None:
    """int32 targets give the int64 result; all-zero upstream rows get exactly zero dL/dh."""
    tb, _ = _hopper(monkeypatch)
    x = make_inputs(Case(F32, 77, 1001, 64, "none", True, True, 1.0), SEEDS[0])
    spec = StatsSpec(with_entropy=True)
    a = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec)
    b = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets.int(), None, None, None, spec)
    assert torch.equal(a.logp, b.logp) and torch.equal(a.entropy, b.entropy)
    zeros = torch.zeros(77)
    dh, dw, db = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec, a,
                                   zeros, zeros, None, True, True, True)
    assert not dh.any() and not dw.any() and not db.any()


def test_hopper_grouped_order_is_a_permutation(monkeypatch) -> None:
    _, hopper = _hopper(monkeypatch)
    for n_tok, n_vt, g in ((3, 16, 2), (7, 5, 8), (1, 1, 8), (9, 4, 4)):
        order = hopper.grouped_order(n_tok, n_vt, g, torch.device("cpu"))
        assert torch.equal(order.sort().values, torch.arange(n_tok * n_vt)), (n_tok, n_vt, g)


def test_variant_and_skip_env_are_validated(monkeypatch) -> None:
    cfgs = _backend().configs
    monkeypatch.delenv("SDAR_TRITON_VARIANT", raising=False)
    assert cfgs.kernel_variant(torch.device("cpu")) == "portable"
    monkeypatch.setenv("SDAR_TRITON_VARIANT", "hopper")
    assert cfgs.kernel_variant(torch.device("cpu")) == "hopper"
    monkeypatch.setenv("SDAR_TRITON_VARIANT", "blackwell")
    with pytest.raises(ValueError, match="SDAR_TRITON_VARIANT"):
        cfgs.kernel_variant(torch.device("cpu"))
    for bad in ("0.5", "-1", "x"):
        monkeypatch.setenv("SDAR_TRITON_SKIP_EPS", bad)
        with pytest.raises(ValueError, match="SDAR_TRITON_SKIP_EPS"):
            cfgs.skip_eps()
    with pytest.raises(ValueError, match="variant"):
        cfgs.choose_config("fwd", 64, torch.bfloat16, variant="ampere")


def _dlogits_fp64(x, spec: StatsSpec) -> torch.Tensor:
    """dL/dz [N, V] in float64 for g_logp, g_entropy (no divergence)."""
    z = (x.hidden.double() @ x.weight.double().T + x.bias.double()) / spec.temperature
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    ent = -(p * lp).sum(-1, keepdim=True)
    g_l, g_e = x.grads[0].double()[:, None], x.grads[1].double()[:, None]
    onehot = torch.nn.functional.one_hot(x.targets, z.shape[1]).double()
    return (g_l * (onehot - p) - g_e * p * (lp + ent)) / spec.temperature


@pytest.mark.parametrize("eps", [1e-3, 2.0 ** -12])
def test_block_skipping_keeps_its_bound(monkeypatch, eps: float) -> None:
    """Peaked logits: some tiles are dropped; every dropped entry obeys the promised bound
    |dL/dz_ij| <= eps max(|g_logp_i|, |g_ent_i|) / tau, and the gradients stay within the
    oracle tolerance plus what the dropped entries can contribute."""
    tb, hopper = _hopper(monkeypatch, eps=str(eps))
    case = Case(F32, 77, 1001, 64, "none", True, True, 0.7, scale=40.0)
    x = make_inputs(case, SEEDS[0])
    spec = StatsSpec(temperature=case.tau, with_entropy=True)
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec)
    zmax, zb = getattr(st, hopper.BLOCK_MAX_ATTR)
    z = (x.hidden.double() @ x.weight.double().T + x.bias.double()) / case.tau
    pad = zmax.shape[1] * zb - z.shape[1]
    ref_max = torch.cat([z, z.new_full((77, pad), float("-inf"))], 1).view(77, -1, zb).amax(2)
    assert (zmax.double() - ref_max).abs().max() <= 1e-4 * (1 + ref_max.abs().max())

    cfg = tb.configs.choose_config("bwd", 64, F32, variant="hopper")
    skip = hopper.skippable_tiles(st, x.targets, x.grads[0], x.grads[1], 0, 1001, cfg, eps)
    assert skip is not None and skip.any() and not skip.all(), skip.float().mean()
    dz = _dlogits_fp64(x, spec)
    n_tok, n_vt = skip.shape
    mask = skip.repeat_interleave(cfg.block_n, 0).repeat_interleave(cfg.block_v, 1)[:77, :1001]
    scale = torch.maximum(x.grads[0].abs(), x.grads[1].abs()).double()[:, None] / case.tau
    assert (dz.abs() <= eps * scale + 1e-12)[mask].all(), "a dropped entry exceeds the bound"

    dh, dw, db = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec, st,
                                   x.grads[0], x.grads[1], None, True, True, True)
    kept = dz.masked_fill(mask, 0.0)
    bound = 1e-5 + 2.4e-7 * z.abs().max().item()  # fp32 LSE ulp at |z| (see test_triton_stats)
    for name, got, want in (("dh", dh, kept @ x.weight.double()), ("dw", dw, kept.T @ x.hidden.double()),
                            ("db", db, kept.sum(0))):
        err = rel_err(got, want, True)
        assert err <= bound, f"{name}: skipped result vs kept-tile gradient {err:.3g} > {bound:.3g}"
    ref = oracle(x, spec)
    slack = eps * scale.max().item() * x.weight.abs().sum(0).max().item() * 1.01
    assert (dh.double() - ref["dh"]).abs().max() <= bound * ref["dh"].abs().max() + slack


def test_block_skipping_off_saves_nothing_and_needs_zmax(monkeypatch) -> None:
    """eps = 0: no zmax is stored; eps > 0 with Stats lacking zmax (the autograd path) drops
    only exactly-zero tiles."""
    tb, hopper = _hopper(monkeypatch)
    x = make_inputs(Case(F32, 40, 123, 64, "none", True, True, 1.0), SEEDS[1])
    spec = StatsSpec(with_entropy=True)
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec)
    assert getattr(st, hopper.BLOCK_MAX_ATTR, None) is None
    cfg = tb.configs.choose_config("bwd", 64, F32, variant="hopper")
    assert hopper.skippable_tiles(st, x.targets, x.grads[0], x.grads[1], 0, 123, cfg, 0.01) is None


def test_block_skipping_reaches_the_autograd_path(monkeypatch) -> None:
    """Through linear_stats (the public per-token op) the forward's tile maxima reach the
    backward: tiles are dropped there too, and the result matches the direct backend call."""
    from sdar_kernels import linear_stats
    tb, hopper = _hopper(monkeypatch, eps="0.001")
    case = Case(F32, 77, 1001, 64, "none", True, True, 0.7, scale=40.0)
    x = make_inputs(case, SEEDS[0])
    spec = StatsSpec(temperature=case.tau, with_entropy=True)
    dropped = []
    real = hopper.skippable_tiles
    monkeypatch.setattr(hopper, "skippable_tiles", lambda *a: dropped.append(real(*a)) or dropped[-1])
    h = x.hidden.clone().requires_grad_(True)
    out = linear_stats(h, x.weight, x.targets, spec, bias=x.bias, backend="triton")
    (out.logp * x.grads[0]).sum().add((out.entropy * x.grads[1]).sum()).backward()
    assert dropped and dropped[0] is not None and dropped[0].any(), "no tile was dropped via linear_stats"
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec)
    dh, _, _ = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, None, None, None, spec, st,
                                 x.grads[0], x.grads[1], None, True, False, False)
    assert torch.equal(h.grad, dh)
