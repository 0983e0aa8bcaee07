"""Triton backend edge cases under TRITON_INTERPRET=1: empty input, masked rows, optional
gradients, fp64 fallback, input validation, and the public loss API end to end.

Bitwise run-to-run determinism is a GPU property (the interpreter runs programs one after
another, so it cannot fail here): benchmarks/gpu/run_gpu_check.py checks it on a GPU."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from sdar_kernels.stats import StatsSpec  # noqa: E402

from .test_triton_stats import (DIVS, Case, _backend, make_inputs, oracle, rel_err,  # noqa: E402
                                run_triton, seed_now)

pytest.importorskip("triton")


@pytest.mark.parametrize("div", DIVS)
def test_empty_batch_gives_empty_stats_and_zero_grads(div: str) -> None:
    tb = _backend()
    x = make_inputs(Case(torch.float32, 0, 123, 31, div, True, True, 1.0), seed=0)
    spec = StatsSpec(with_entropy=True, divergence=div)
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight, x.t_bias, spec)
    assert st.logp.shape == (0,) and st.lse.shape == (0,) and st.entropy.shape == (0,)
    assert (st.div is None) == (div == "none") and (st.teacher_lse is None) == (div == "none")
    dh, dw, db = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight,
                                   x.t_bias, spec, st, *x.grads, True, True, True)
    assert dh.shape == (0, 31) and dw.shape == (123, 31) and db.shape == (123,)
    assert not dw.any() and not db.any()


def test_all_zero_upstream_grads_give_exact_zeros() -> None:
    seed = seed_now()
    tb = _backend()
    x = make_inputs(Case(torch.float32, 77, 123, 31, "reverse_kl", True, True, 1.0), seed)
    spec = StatsSpec(with_entropy=True, divergence="reverse_kl")
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight, x.t_bias, spec)
    zeros = torch.zeros(77)
    dh, dw, db = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight,
                                   x.t_bias, spec, st, zeros, zeros, zeros, True, True, True)
    assert not dh.any() and not dw.any() and not db.any(), f"seed={seed}"


def test_optional_grads_none_and_partial_requests() -> None:
    """g_* = None means zero; only the requested gradients come back, in the input dtypes."""
    seed = seed_now()
    tb = _backend()
    x = make_inputs(Case(torch.bfloat16, 77, 1001, 31, "forward_kl", True, True, 1.0), seed)
    spec = StatsSpec(with_entropy=True, divergence="forward_kl")
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight, x.t_bias, spec)
    dh, dw, db = tb.stats_backward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight,
                                   x.t_bias, spec, st, None, None, x.grads[2], False, True, False)
    assert dh is None and db is None and dw.dtype == torch.bfloat16
    ref = oracle(x._replace(grads=(None, None, x.grads[2])), spec)
    plain = oracle(x._replace(grads=(None, None, x.grads[2])), spec, dtype=torch.bfloat16)
    err, bound = rel_err(dw, ref["dw"], True), rel_err(plain["dw"], ref["dw"], True) + 1e-2
    assert err <= bound, f"dw error {err:.3g} > {bound:.3g}, seed={seed}"


@pytest.mark.parametrize("dtype,div", [(torch.float32, "reverse_kl"), (torch.bfloat16, "jsd")])
def test_backward_over_many_vocab_chunks(monkeypatch, dtype: torch.dtype, div: str) -> None:
    """A small scratch budget forces 8 vocab chunks: dh accumulates across chunks, dW/db by slice."""
    from .test_triton_stats import check_case
    tb = _backend()
    monkeypatch.setattr(tb.backward, "SCRATCH_BYTES", 77 * 4 * 128)
    assert tb.backward.chunk_width(77, 1001, 4, 64) == 128
    check_case(Case(dtype, 77, 1001, 64, div, True, True, 0.8, beta=0.3), seed_now())


def test_float64_falls_back_to_torch_backend() -> None:
    seed = seed_now()
    tb = _backend()
    x = make_inputs(Case(torch.float64, 9, 123, 31, "reverse_kl", True, True, 2.0), seed)
    spec = StatsSpec(temperature=2.0, with_entropy=True, divergence="reverse_kl")
    st = tb.stats_forward(x.hidden, x.weight, x.bias, x.targets, x.t_hidden, x.t_weight, x.t_bias, spec)
    ref = oracle(x, spec)
    assert st.logp.dtype == torch.float64
    assert rel_err(st.div, ref["div"], False) < 1e-10, f"seed={seed}"


def test_non_contiguous_inputs_are_accepted() -> None:
    seed = seed_now()
    c = Case(torch.float32, 77, 123, 31, "none", True, True, 1.0)
    x = make_inputs(c, seed)
    spec = StatsSpec(with_entropy=True)
    wt = x.weight.t().contiguous().t()  # same values, column-major
    got = run_triton(x._replace(weight=wt), spec)
    ref = oracle(x, spec)
    for k in ("logp", "entropy", "dh", "dw"):
        assert rel_err(got[k], ref[k], k in ("dh", "dw")) <= 1e-5, f"{k} seed={seed}"


@pytest.mark.parametrize("field,change,match", [
    ("spec", StatsSpec(temperature=0.0), "spec.temperature"),
    ("spec", StatsSpec(divergence="kl"), "spec.divergence"),
    ("spec", StatsSpec(divergence="jsd", jsd_beta=1.5), "spec.jsd_beta"),
    ("spec", StatsSpec(divergence="reverse_kl"), "teacher_hidden/teacher_weight"),
    ("weight", torch.zeros(123, 30), "weight.shape"),
    ("targets", torch.zeros(5, dtype=torch.int64), "targets"),
    ("bias", torch.zeros(7), "bias.shape"),
])
def test_bad_input_raises_value_error_naming_the_field(field: str, change, match: str) -> None:
    tb = _backend()
    x = make_inputs(Case(torch.float32, 8, 123, 31, "none", False, True, 1.0), seed=1)
    args = dict(hidden=x.hidden, weight=x.weight, bias=x.bias, targets=x.targets, teacher_hidden=None,
                teacher_weight=None, teacher_bias=None, spec=StatsSpec())
    args[field] = change
    with pytest.raises(ValueError, match=match):
        tb.stats_forward(**args)


@pytest.mark.parametrize("divergence", ["sampled", "reverse_kl"])
def test_public_loss_api_triton_matches_torch_backend(divergence: str) -> None:
    """fused_linear_sdar_loss with backend='triton' equals backend='torch' (loss and grads)."""
    problems = pytest.importorskip("tests.kernels.problems")
    from sdar_kernels import LossConfig
    seed = seed_now()
    p = problems.make_problem(40, 31, 123, seed)
    out = {}
    for backend in ("torch", "triton"):
        cfg = LossConfig.preset("sdar", backend=backend, divergence=divergence, entropy_coef=0.01)
        out[backend] = problems.run_loss(p, cfg, torch.float32)
    (lt, gt, _), (lr, gr, _) = out["triton"], out["torch"]
    assert rel_err(lt, lr, False) <= 1e-5, f"loss {lt} vs {lr}, seed={seed}"
    for name, a, b in zip(("dh", "dw", "db"), gt, gr):
        assert rel_err(a, b.double(), True) <= 1e-5, f"{name} seed={seed}"


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(n=st.integers(1, 40), v=st.integers(2, 300), h=st.integers(1, 70),
                  div=st.sampled_from(DIVS), tau=st.floats(0.3, 3.0), beta=st.floats(0.0, 1.0),
                  dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
                  ent=st.booleans(), bias=st.booleans())
def test_random_ragged_shapes(n: int, v: int, h: int, div: str, tau: float, beta: float,
                              dtype: torch.dtype, ent: bool, bias: bool) -> None:
    """Random ragged N/V/H (H=1 and V=2 included), every divergence, jsd beta at its ends."""
    from .test_triton_stats import check_case
    check_case(Case(dtype, n, v, h, div, ent, bias, tau, beta=beta), seed_now())


def test_gpu_dispatch_tables_and_split_layout(monkeypatch) -> None:
    """Host-side GPU choices, checked on the CPU: tile tables per arch/H and the split grid."""
    tb = _backend()
    cfgs = tb.configs
    monkeypatch.setattr(cfgs, "interpreting", lambda: False)
    for arch in (90, 80):
        for h in (896, 4096, 8192):
            for kernel, teacher in (("fwd", False), ("fwd", True), ("jsd", False), ("bwd", True)):
                c = cfgs.choose_config(kernel, h, torch.bfloat16, teacher, arch)
                assert c.block_n >= 64 and c.block_v >= 32 and c.block_k >= 32, (arch, h, kernel, c)
    assert cfgs.choose_config("fwd", 4096, torch.float32).label() == "64x64x32 w4 s2"
    with pytest.raises(ValueError, match="dtype"):
        cfgs.choose_config("fwd", 4096, torch.int8)
    with pytest.raises(ValueError, match="arch"):
        cfgs.choose_config("fwd", 4096, torch.bfloat16, arch=70)
    with pytest.raises(ValueError, match="block_k"):
        cfgs.TileConfig(128, 128, 24, 8, 3)
    cfg = cfgs.choose_config("fwd", 4096, torch.bfloat16)
    monkeypatch.setattr(tb.forward, "n_programs_target", lambda device: 4 * 132)
    for n, vocab in ((16384, 151936), (77, 151936), (4096, 123)):
        vps, splits = tb.forward.split_layout(n, vocab, cfg, torch.device("cpu"))
        assert vps % cfg.block_v == 0 and (splits - 1) * vps < vocab <= splits * vps, (n, vocab, vps)
        # at least half the wanted programs (rounding splits to block_v costs the rest)
        assert 2 * splits * -(-n // cfg.block_n) >= min(4 * 132, -(-vocab // cfg.block_v)), (n, vocab, splits)
