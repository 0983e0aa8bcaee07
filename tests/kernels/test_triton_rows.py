"""The 3-pass path (grad_in_forward on the triton backend: cuBLAS GEMMs + Triton row kernels)
against the float64 oracle, under TRITON_INTERPRET=1.

Bounds as in test_torch_vs_reference.py: fp32 <= 1e-5 relative (max(1e-5, 2x plain fp32
PyTorch's error) where the problem itself is ill-conditioned in fp32, logits ~300); bf16 no
worse than plain bf16 PyTorch + 1e-2, both judged against the oracle on the same bf16-rounded
inputs. Fixed seeds.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported: kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sdar_kernels import LossConfig  # noqa: E402

from .problems import make_problem, rel_err, run_loss  # noqa: E402
from .test_triton_stats import _backend  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


def _rows_module():
    _backend()  # interpreted kernels, re-imported if something imported them compiled
    return importlib.import_module("sdar_kernels.triton_backend.rows")


def _run(p, cfg: LossConfig, dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy log(0) at jsd_beta in {0, 1}
        return run_loss(p, cfg, dtype)


def _check(p, cfg: LossConfig, dtype: torch.dtype, tol: float = 1e-5) -> None:
    """Loss and (dh, dW, db) of the triton 3-pass path vs the float64 oracle on p rounded to dtype."""
    p = p.rounded(dtype)
    _rows_module()
    ref_loss, ref_grads, _ = _run(p, cfg.replace(backend="reference", reference_dtype="float64"), torch.float64)
    plain_loss, plain_grads, _ = _run(p, cfg.replace(backend="reference", reference_dtype="input"), dtype)
    loss, grads, out = _run(p, cfg.replace(backend="triton", grad_in_forward=True), dtype)
    tag = f"seed={p.seed} dtype={dtype} cfg={cfg}"
    # the loss is a signed sum: its error is measured against the size of its terms
    m = p.mask
    scale = max(abs(ref_loss.item()), ((m * p.advantages.abs()).sum() / m.sum().clamp_min(1)).item())
    slack = 1e-2 if dtype != F32 else 0.0
    bound = max(tol, 2 * abs(plain_loss.item() - ref_loss.item()) / scale) + slack
    assert abs(loss.item() - ref_loss.item()) <= bound * scale, f"loss {loss} vs {ref_loss} {tag}"
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all(), tag
    for name, g, rg, pg in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"d{name} {g.dtype} {tag}"
        plain = rel_err(pg, rg)
        bound = (plain + slack) if dtype != F32 else max(tol, 2 * plain)
        assert rel_err(g, rg) <= bound, f"d{name} rel err {rel_err(g, rg):.2e} > {bound:.2e} {tag}"


# (options on the sdar preset, dtype, N, H, V, bias, temperature, seed)
CASES = [
    (dict(entropy_coef=0.01), F32, 77, 31, 123, True, 1.0, 101),
    (dict(), F32, 77, 64, 1001, False, 0.5, 102),
    (dict(divergence="reverse_kl", entropy_coef=0.01), F32, 77, 31, 123, True, 2.0, 103),
    (dict(divergence="forward_kl"), F32, 40, 31, 1001, False, 1.0, 104),
    (dict(divergence="jsd", jsd_beta=0.3, entropy_coef=0.01), F32, 40, 64, 123, True, 0.5, 105),
    (dict(divergence="jsd", jsd_beta=0.0), F32, 40, 31, 123, True, 1.0, 106),
    (dict(divergence="jsd", jsd_beta=1.0), F32, 40, 31, 123, False, 2.0, 107),
    (dict(gate="entropy", agg="seq-mean-token-mean"), F32, 77, 31, 123, True, 1.0, 108),
    (dict(entropy_coef=0.01), BF16, 64, 64, 1001, True, 1.0, 109),
    (dict(divergence="reverse_kl"), BF16, 40, 31, 123, True, 0.5, 110),
    (dict(divergence="forward_kl", entropy_coef=0.01), BF16, 40, 64, 1001, False, 1.0, 111),
    (dict(divergence="jsd", jsd_beta=0.5), BF16, 40, 31, 123, True, 2.0, 112),
]


@pytest.mark.parametrize("opts,dtype,n,h,v,bias,tau,seed", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_three_pass_path_matches_fp64_oracle(opts, dtype, n, h, v, bias, tau, seed) -> None:
    cfg = LossConfig.preset("sdar", temperature=tau, **opts)
    _check(make_problem(n, h, v, seed, scale=3.0, bias=bias, temperature=tau), cfg, dtype)


def test_extreme_logits_fp32_stay_exact() -> None:
    """|z| ~ 1e4 with a bias: log p = (z - m) - log s keeps the fp32 path at ~1e-7."""
    cfg = LossConfig.preset("opsd", divergence="reverse_kl", kl_type="k1", dual_clip=None, temperature=0.5)
    p = make_problem(77, 64, 123, 222, scale=1e4, n_seq=1, mask_frac=0.6, bias=True, temperature=0.5)
    _check(p, cfg, F32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_far_apart_distributions_stay_finite(beta: float) -> None:
    """Student and teacher logits ~300 nats apart: log M must not underflow at beta in {0, 1}."""
    p = make_problem(40, 31, 123, 300, scale=100.0)
    p = dataclasses.replace(p, teacher_weight=-p.weight)
    _check(p, LossConfig.preset("sdar", divergence="jsd", jsd_beta=beta, sd_coef=1.0), F32)


def test_masked_rows_and_fully_masked_inputs() -> None:
    """A fully masked sequence among others; then nothing on the mask: zero loss and grads."""
    p = make_problem(60, 31, 123, 7, scale=3.0, n_seq=4, mask_frac=0.8)
    p.mask[p.segments == p.segments[0]] = 0.0
    cfg = LossConfig.preset("sdar", divergence="reverse_kl", agg="seq-mean-token-mean", entropy_coef=0.01)
    _check(p, cfg, F32)
    p = dataclasses.replace(p, mask=torch.zeros_like(p.mask))
    _rows_module()
    loss, grads, out = _run(p.rounded(F32), cfg.replace(backend="triton"), F32)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)
    assert torch.count_nonzero(out.logprobs) == 0


class _Count:
    """A kernel stand-in that counts launches and forwards them to the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("grad_in_forward,with_grad", [(True, True), (False, True), (True, False)])
def test_dispatch_runs_the_row_kernels_only_for_a_scalar_loss_with_grad(monkeypatch, grad_in_forward,
                                                                      with_grad) -> None:
    rows = _rows_module()
    forward = importlib.import_module("sdar_kernels.triton_backend.forward")
    counts = {name: _Count(getattr(rows, name)) for name in ("row_stats_kernel", "row_dlogits_kernel")}
    for name, c in counts.items():
        monkeypatch.setattr(rows, name, c)
    tiles = _Count(forward.stats_fwd_kernel)
    monkeypatch.setattr(forward, "stats_fwd_kernel", tiles)
    p = make_problem(40, 31, 123, 5).rounded(F32)
    cfg = LossConfig.preset("sdar", backend="triton", divergence="reverse_kl", grad_in_forward=grad_in_forward)
    if with_grad:
        _run(p, cfg, F32)
    else:
        with torch.no_grad():
            _run_no_grad(p, cfg)
    chunks = -(-int((p.mask != 0).sum()) // rows.chunk_rows(int((p.mask != 0).sum()), 123, True))
    row_path = grad_in_forward and with_grad
    assert counts["row_stats_kernel"].launches == (chunks if row_path else 0)
    assert counts["row_dlogits_kernel"].launches == (chunks if row_path else 0)
    assert tiles.launches == (0 if row_path else 1)


def _run_no_grad(p, cfg: LossConfig) -> None:
    from sdar_kernels import fused_linear_sdar_loss
    fused_linear_sdar_loss(p.hidden.float(), p.weight.float(), p.targets, p.advantages, p.old, p.mask,
                           teacher_logprobs=p.teacher, teacher_hidden=p.teacher_hidden.float(),
                           teacher_weight=p.teacher_weight.float(), ref_logprobs=p.ref, bias=p.bias.float(),
                           config=cfg)


@pytest.mark.parametrize("dtype", [BF16, torch.float16, F32])
@pytest.mark.parametrize("div", [0, 1, 2, 3])
def test_in_place_dz_equals_separately_written_dz(dtype: torch.dtype, div: int) -> None:
    """dz written over its own logits buffer (16-bit: the first half of each row's bytes) equals
    dz written to a fresh buffer, and the fp64 formula to the output dtype's rounding."""
    rows = _rows_module()
    from sdar_kernels.triton_backend.row_kernels import R_AUX, R_ENT, R_LOGS, R_LOGST, R_M, R_MT
    g = torch.Generator().manual_seed(17 + div)
    c, v, tau, beta = 9, 123, 0.5, 0.3
    z = torch.randn(c, v, generator=g) * 4
    zt = torch.randn(c, v, generator=g) * 4 if div else None
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (c,), generator=g)
    grads = [torch.randn(c, generator=g) for _ in range(3)]
    grads[0][0] = grads[1][0] = grads[2][0] = 0.0  # a row without gradient: zeros
    config = rows.row_config(v, bool(div))
    st = torch.empty((8, c))
    rows.row_stats_kernel[(c,)](z, zt if div else z, bias, bias, y, st, v, v, c, 1 / tau, beta,
                                BV=config.block_v, HAS_BIAS=True, HAS_TBIAS=False, DIV=div)

    def dlogits(src: torch.Tensor, out: torch.Tensor, aliased: bool) -> None:
        rows.launch_dlogits(src, zt, bias, None, y, st, grads[0], grads[1], grads[2] if div else None, out,
                            div, 1 / tau, beta, config, aliased=aliased)

    separate = torch.full((c, v), float("nan"), dtype=dtype)
    dlogits(z, separate, aliased=False)
    buf = z.clone()
    inplace = buf.view(dtype) if dtype != F32 else buf  # [C, 2V] 16-bit over the fp32 rows
    dlogits(buf, inplace, aliased=True)
    assert torch.equal(inplace[:, :v], separate), f"in-place dz differs ({dtype}, div={div})"
    # fp64 formula from the kernel's own per-row shifts
    f = lambda t: t.double()  # noqa: E731
    lp = (f(z) + f(bias)) / tau - f(st[R_M.value])[:, None] - f(st[R_LOGS.value])[:, None]
    p = lp.exp()
    gl, ge, gd = (f(t)[:, None] for t in grads)
    ent, aux = f(st[R_ENT.value])[:, None], f(st[R_AUX.value])[:, None]
    dz = -gl * p - ge * p * (lp + ent)
    dz[torch.arange(c), y] += gl[:, 0]
    scale = gl.abs() * p + ge.abs() * p * (lp.abs() + ent.abs())  # size of the terms summed
    scale[torch.arange(c), y] += gl[:, 0].abs()
    if div:
        lq = f(zt) / tau - f(st[R_MT.value])[:, None] - f(st[R_LOGST.value])[:, None]
        if div == 1:
            dz += gd * p * (lp - lq - aux)
            scale += gd.abs() * p * (lp.abs() + lq.abs() + aux.abs())
        elif div == 2:
            dz += gd * (p - lq.exp())
            scale += gd.abs() * (p + lq.exp())
        else:
            lm = torch.logaddexp(lq + torch.tensor(beta).log(), lp + torch.tensor(1 - beta).log())
            dz += gd * (1 - beta) * p * (lp - lm - aux)
            scale += gd.abs() * (1 - beta) * p * (lp.abs() + lm.abs() + aux.abs())
    dz /= tau
    scale /= tau
    # Round to nearest (even), as a GPU's cast: within one unit roundoff (half an ulp) of the
    # exact value, plus the fp32 arithmetic before the rounding. Truncation (the interpreter's
    # own fp32 -> bf16 cast) would be off by up to twice that.
    eps = {F32: 1e-6, BF16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    err = (separate.double() - dz).abs() - eps * dz.abs()
    # plus fp32 noise relative to the size of the terms (forward KL's p - q cancels, for one)
    # and the spacing of the 16-bit subnormals (fp16: 6e-8) where dz underflows
    info = torch.finfo(dtype)
    assert (err <= 4e-6 * scale + info.smallest_normal * info.eps).all(), (
        f"dz vs fp64 formula ({dtype}, div={div}): {err.max():.3g}")
    if dtype != F32:
        exact = dz.to(dtype)  # torch rounds to nearest even
        assert (separate != exact).double().mean() <= 0.02, "16-bit dz is not rounded to nearest"
    assert torch.count_nonzero(separate[0]) == 0


def test_chunk_rows_rule() -> None:
    rows = _rows_module()
    for n, v, teacher in ((16384, 151936, False), (16384, 151936, True), (4096, 32768, False), (77, 123, True),
                          (9, 50, False), (1, 50, False), (100_000, 1000, False)):
        c = rows.chunk_rows(n, v, teacher)
        assert c >= 1 and (c == 1 or c * 8 < n), (n, v, c)
        assert c * v * 4 * (2 if teacher else 1) <= max(rows.ROW_SCRATCH_BYTES, v * 8), (n, v, c)
        assert c < 16 or c & (c - 1) == 0, (n, v, c)
    assert rows.chunk_rows(16384, 151936, False, budget_bytes=1 << 30) == 1024
    assert rows.chunk_rows(16384, 151936, True, budget_bytes=1 << 30) == 512
