"""Top-k distillation (divergence "topk_forward_kl", sdar_kernels/topk.py) against the float64 oracle.

The oracle (reference.reference_topk_divergence) gathers from full [N, V] float64 log-probs; the
fused backends never build them (k gather-dots per token + the LSE from the statistics pass).
torch in fp64 must match to 1e-10, fp32 (torch and Triton under TRITON_INTERPRET=1) to 1e-5,
bf16 on Triton to the plain-bf16 slack of test_triton_rows.py. k = V must equal the full-vocabulary
forward KL. Odd shapes (V=123, H=31), masked and empty rows, extreme logits, fixed seeds.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported: kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from sdar_kernels import LossConfig, fused_linear_sdar_loss, fused_linear_topk_kl  # noqa: E402
from sdar_kernels import topk as topk_mod  # noqa: E402

from .problems import Problem, fresh_seed, make_problem, rel_err  # noqa: E402

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
TAILS = ("renorm", "tail", "truncated")


def _triton_ready() -> None:
    pytest.importorskip("triton")
    from .test_triton_stats import _backend
    _backend()  # interpreted kernels, re-imported if something imported them compiled


def teacher_topk(p: Problem, k: int, tau: float = 1.0, shuffle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids [N, k] and full-vocabulary log-probs there, from its hidden states."""
    lq = torch.log_softmax((p.teacher_hidden @ p.teacher_weight.T) / tau, -1)
    vals, ids = lq.topk(k, -1)
    if shuffle:  # order of the k ids must not matter
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(p.seed))
        vals, ids = vals[:, perm], ids[:, perm]
    return ids, vals


def run_topk(p: Problem, cfg: LossConfig, dtype: torch.dtype, ids, lq, teacher_full: bool = False):
    """(loss, [dh, dW, db], output) of cfg with the teacher's top-k (or full distribution)."""
    h = p.hidden.to(dtype).requires_grad_(True)
    w = p.weight.to(dtype).requires_grad_(True)
    b = p.bias.to(dtype).requires_grad_(True)
    extra = (dict(teacher_hidden=p.teacher_hidden.to(dtype), teacher_weight=p.teacher_weight.to(dtype))
             if teacher_full else dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq))
    out = fused_linear_sdar_loss(h, w, p.targets, p.advantages, p.old, p.mask, teacher_logprobs=p.teacher,
                                 ref_logprobs=p.ref, segment_ids=p.segments, bias=b, config=cfg, **extra)
    grads = torch.autograd.grad(out.loss, (h, w, b), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip((h, w, b), grads)]
    return out.loss.detach(), grads, out


def cfg_for(tail: str, **kw) -> LossConfig:
    return LossConfig.preset("sdar", sd_coef=0.5, divergence="topk_forward_kl", topk_tail=tail,
                             entropy_coef=0.01, **kw)


def assert_close(a, b, tol: float, tag: str) -> None:
    la, ga, _ = a
    lb, gb, _ = b
    assert rel_err(la, lb) <= tol, f"loss {la.item()} vs {lb.item()} {tag}"
    for name, x, y in zip(("dh", "dW", "db"), ga, gb):
        assert torch.isfinite(x).all(), f"{name} not finite {tag}"
        assert rel_err(x, y) <= tol, f"{name} rel err {rel_err(x, y):.3g} > {tol} {tag}"


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 5, 123])
def test_torch_matches_oracle_fp64_and_fp32(tail: str, k: int) -> None:
    seed = fresh_seed()
    p = make_problem(37, 31, 123, seed, temperature=0.7)
    ids, lq = teacher_topk(p, k, tau=0.7, shuffle=True)
    cfg = cfg_for(tail, temperature=0.7, token_chunk=8)
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    assert_close(run_topk(p, cfg.replace(backend="torch"), F64, ids, lq), ref, 1e-10, f"fp64 seed={seed}")
    q = p.rounded(F32)
    ref32 = run_topk(q, cfg.replace(backend="reference"), F64, ids, lq)
    assert_close(run_topk(q, cfg.replace(backend="torch"), F32, ids, lq), ref32, 1e-5, f"fp32 seed={seed}")


@pytest.mark.parametrize("tail", ["renorm", "tail"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_k_equals_v_is_the_full_forward_kl(tail: str, backend: str) -> None:
    """k = V (ids in shuffled order): renorm and tail are exactly KL(q || p) over the vocabulary."""
    seed = fresh_seed()
    p = make_problem(29, 31, 123, seed)
    ids, lq = teacher_topk(p, 123, shuffle=True)
    cfg = cfg_for(tail, backend=backend)
    full = run_topk(p, cfg.replace(divergence="forward_kl"), F64, None, None, teacher_full=True)
    oracle = run_topk(p, cfg.replace(divergence="forward_kl", backend="reference"), F64, None, None,
                      teacher_full=True)
    got = run_topk(p, cfg, F64, ids, lq)
    assert_close(got, full, 1e-10, f"vs forward_kl on {backend}, seed={seed}")
    assert_close(got, oracle, 1e-10, f"vs oracle forward_kl, seed={seed}")
    if backend == "torch":  # the oracle logs only the token count
        assert abs(got[2].metrics["topk_student_mass"].item() - 1) < 1e-12
        assert abs(got[2].metrics["topk_teacher_mass"].item() - 1) < 1e-12


def test_variants_differ_below_v() -> None:
    """The three tails are different losses for k < V (the comparisons above can tell them apart)."""
    p = make_problem(20, 31, 123, fresh_seed())
    ids, lq = teacher_topk(p, 5)
    losses = [run_topk(p, cfg_for(t, backend="torch", policy_coef=0.0), F64, ids, lq)[0].item() for t in TAILS]
    assert min(abs(losses[0] - losses[1]), abs(losses[1] - losses[2]), abs(losses[0] - losses[2])) > 1e-4, losses


@pytest.mark.parametrize("gate", ["gap", "none", "soft_or"])
def test_gate_and_aggregation_as_the_sd_term(gate: str) -> None:
    """Gated by the sampled-token gap like the SDAR term, aggregated by agg; the oracle agrees."""
    seed = fresh_seed()
    p = make_problem(33, 31, 123, seed, n_seq=4)
    ids, lq = teacher_topk(p, 7)
    cfg = cfg_for("tail", gate=gate, agg="seq-mean-token-mean")
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    assert_close(run_topk(p, cfg.replace(backend="torch"), F64, ids, lq), ref, 1e-10, f"seed={seed}")
    if gate == "gap":  # a different sampled-token teacher log-prob changes the gated loss
        p2 = Problem(**{**p.__dict__, "teacher": p.teacher - 1.0})
        assert abs(run_topk(p2, cfg.replace(backend="torch"), F64, ids, lq)[0] - ref[0]) > 1e-6


def test_masked_and_empty_rows_ignore_padding_garbage() -> None:
    """Masked rows may hold any ids / log-probs (-1, NaN); a fully masked or empty batch is finite."""
    seed = fresh_seed()
    p = make_problem(24, 31, 123, seed, mask_frac=0.5)
    ids, lq = teacher_topk(p, 6)
    off = p.mask == 0
    ids_bad, lq_bad = ids.clone(), lq.clone()
    ids_bad[off], lq_bad[off] = -1, float("nan")
    cfg = cfg_for("tail")
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    for backend in ("reference", "torch"):
        assert_close(run_topk(p, cfg.replace(backend=backend), F64, ids_bad, lq_bad), ref, 1e-10, f"seed={seed}")
    none = Problem(**{**p.__dict__, "mask": torch.zeros_like(p.mask)})
    for backend in ("reference", "torch"):
        loss, grads, _ = run_topk(none, cfg.replace(backend=backend), F64, ids_bad, lq_bad)
        assert loss.item() == 0 and all(float(g.abs().max()) == 0 for g in grads)
    empty = make_problem(0, 31, 123, seed)
    e_ids, e_lq = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=F64)
    loss, grads, _ = run_topk(empty, cfg.replace(backend="torch"), F64, e_ids, e_lq)
    assert loss.item() == 0 and grads[1].abs().max().item() == 0


@pytest.mark.parametrize("tail", TAILS)
def test_extreme_logits(tail: str) -> None:
    """Logits ~1e3 (student top-k probabilities far below the float range of p): log space stays exact."""
    seed = fresh_seed()
    p = make_problem(21, 31, 123, seed, scale=1000.0)
    ids, lq = teacher_topk(p, 5)
    cfg = cfg_for(tail)
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    got = run_topk(p, cfg.replace(backend="torch"), F64, ids, lq)
    assert torch.isfinite(ref[0]) and ref[0].abs().item() > 1.0
    assert_close(got, ref, 1e-9, f"seed={seed}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # NumPy in the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tail", TAILS)
def test_fp32_large_logits_within_plain_fp32_error(tail: str, backend: str) -> None:
    """Logits ~300 in fp32, the top-k term alone: no worse than plain fp32 PyTorch's error x2 + 1e-5
    + 1.2e-7 max|z| (an fp32 logit of size |z| is off by ~6e-8 |z|, moving p by that relative
    amount; the bound of test_triton_stats.py), times 1 + q_T / max(p_T, floor) for the tail
    variant, whose gradient is amplified by that ratio (docs/topk_distillation.md). Targets are
    sampled from the student, as in RL: the LSE is rebuilt as z_y - log p(y)."""
    if backend == "triton":
        _triton_ready()
    seed = fresh_seed()
    p = make_problem(13, 31, 123, seed, scale=300.0).rounded(F32)
    z = p.hidden @ p.weight.T + p.bias
    p.targets = torch.multinomial(torch.softmax(z, -1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    ids, lq = teacher_topk(p, 5)
    cfg = cfg_for(tail).replace(policy_coef=0.0, entropy_coef=0.0, kl_coef=0.0, gate="none")
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    plain = run_topk(p, cfg.replace(backend="reference", reference_dtype="float32"), F32, ids, lq)
    got = run_topk(p, cfg.replace(backend=backend), F32, ids, lq)
    amp = 1.0
    if tail == "tail":
        p_tail = (1 - torch.log_softmax(z, -1).gather(1, ids).exp().sum(-1)).clamp_min(topk_mod.TAIL_FLOOR)
        amp += ((1 - lq.exp().sum(-1)).clamp_min(0) / p_tail)[p.mask != 0].max().item()
    slack = 1e-5 + 1.2e-7 * z.abs().max().item()
    assert rel_err(got[0], ref[0]) <= 2 * rel_err(plain[0], ref[0]) + slack, f"loss seed={seed}"
    for name, x, y, w in zip(("dh", "dW", "db"), got[1], ref[1], plain[1]):
        bound = (2 * rel_err(w, y) + slack) * amp
        assert rel_err(x, y) <= bound, f"{name} {rel_err(x, y):.3g} > {bound:.3g} seed={seed}"


def test_teacher_log_probs_slightly_over_one_are_accepted() -> None:
    """Rounding in the teacher stack (sum up to 1 + SUM_TOLERANCE) is fine; the tail mass clamps at 0."""
    p = make_problem(10, 31, 123, fresh_seed())
    ids, lq = teacher_topk(p, 123)
    lq = lq + 5e-4
    cfg = cfg_for("tail", backend="torch")
    assert torch.isfinite(run_topk(p, cfg, F64, ids, lq)[0])


@pytest.mark.parametrize("case, match", [
    ("missing", "needs teacher_topk_ids"),
    ("shape", "must both be"),
    ("rows", r"\[N=12, k\]"),
    ("k0", "k >= 1"),
    ("range", "outside"),
    ("duplicate", "repeats an id"),
    ("nan", "NaN"),
    ("over_one", "sum to probability"),
    ("all_inf", "every id"),
    ("float_ids", "int64"),
])
def test_bad_inputs_raise(case: str, match: str) -> None:
    p = make_problem(12, 31, 123, fresh_seed(), mask_frac=1.0)
    ids, lq = teacher_topk(p, 4)
    i = 3
    if case == "missing":
        ids = None
    elif case == "shape":
        lq = lq[:, :3]
    elif case == "rows":
        ids, lq = ids[:-1], lq[:-1]
    elif case == "k0":
        ids, lq = ids[:, :0], lq[:, :0]
    elif case == "range":
        ids[i, 1] = 123
    elif case == "duplicate":
        ids[i, 2] = ids[i, 0]
    elif case == "nan":
        lq[i, 0] = float("nan")
    elif case == "over_one":
        lq[i] = torch.log(torch.tensor([0.6, 0.5, 0.01, 0.01], dtype=F64))
    elif case == "all_inf":
        lq[i] = float("-inf")
    elif case == "float_ids":
        ids = ids.double()
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=match):
            run_topk(p, cfg_for("tail", backend=backend), F64, ids, lq)
    with pytest.raises(ValueError, match="topk_tail"):
        LossConfig(topk_tail="bucket")
    with pytest.raises(ValueError, match="topk_logprob_min"):
        LossConfig(topk_tail="tail", topk_logprob_min=-10.0)
    with pytest.raises(ValueError, match="tail="):
        fused_linear_topk_kl(p.hidden, p.weight, ids, lq, tail="bucket")


def test_batched_inputs_equal_the_packed_stream() -> None:
    """[B, T, k] top-k inputs next to [B, T, H] hidden states = the flattened packed stream."""
    seed = fresh_seed()
    b_, t_ = 3, 7
    p = make_problem(b_ * t_, 31, 123, seed)
    ids, lq = teacher_topk(p, 5)
    cfg = cfg_for("tail", backend="torch", kl_coef=0.0, agg="seq-mean-token-mean")
    adv = torch.randn(b_, generator=torch.Generator().manual_seed(seed), dtype=F64)
    outs = []
    for batched in (True, False):
        h = p.hidden.clone().requires_grad_(True)
        shape = (b_, t_) if batched else (b_ * t_,)
        out = fused_linear_sdar_loss(
            h.reshape(*shape, -1), p.weight, p.targets.reshape(shape), adv if batched else adv.repeat_interleave(t_),
            p.old.reshape(shape), p.mask.reshape(shape), teacher_logprobs=p.teacher.reshape(shape),
            segment_ids=None if batched else torch.arange(b_).repeat_interleave(t_),
            teacher_topk_ids=ids.reshape(*shape, -1), teacher_topk_logprobs=lq.reshape(*shape, -1), config=cfg)
        outs.append((out.loss.detach(), torch.autograd.grad(out.loss, h)[0]))
    assert rel_err(outs[0][0], outs[1][0]) <= 1e-12 and rel_err(outs[0][1], outs[1][1]) <= 1e-12


def test_minus_inf_teacher_entries_are_probability_zero() -> None:
    """-inf teacher log-probs mean q = 0 at that id: no term of its own; the id stays in the student's
    k-point support (renorm normalizes over it, tail keeps it out of the bucket); truncated = dropped."""
    seed = fresh_seed()
    p = make_problem(15, 31, 123, seed)
    ids, lq = teacher_topk(p, 5)
    pad_lq = lq.clone()
    pad_lq[:, -1] = float("-inf")
    for tail in TAILS:
        cfg = cfg_for(tail, backend="torch")
        got = run_topk(p, cfg, F64, ids, pad_lq)
        assert_close(got, run_topk(p, cfg.replace(backend="reference"), F64, ids, pad_lq), 1e-10, f"{tail} {seed}")
        if tail == "truncated":
            assert_close(got, run_topk(p, cfg, F64, ids[:, :-1], lq[:, :-1]), 1e-12, f"dropped {seed}")


def test_gather_chunks_never_hold_all_tokens(monkeypatch) -> None:
    """The [chunk, k, H] block follows GATHER_ELEMENTS; any chunking gives the same numbers."""
    p = make_problem(26, 31, 123, fresh_seed())
    ids, lq = teacher_topk(p, 5)
    cfg = cfg_for("tail", backend="torch")
    whole = run_topk(p, cfg, F64, ids, lq)
    seen = []
    real = topk_mod._chunks

    def spy(n, m, h, token_chunk):
        for a, b in real(n, m, h, token_chunk):
            seen.append((b - a) * m * h)
            yield a, b

    monkeypatch.setattr(topk_mod, "GATHER_ELEMENTS", 2 * 6 * 31)
    monkeypatch.setattr(topk_mod, "_chunks", spy)
    assert_close(run_topk(p, cfg, F64, ids, lq), whole, 1e-12, "chunked")
    assert seen and max(seen) <= 2 * 6 * 31


@pytest.mark.parametrize("tail", TAILS)
def test_standalone_per_token_kl(tail: str) -> None:
    """fused_linear_topk_kl: per-token [N] KL with a per-token upstream gradient, torch vs oracle."""
    seed = fresh_seed()
    p = make_problem(19, 31, 123, seed, mask_frac=0.6)
    ids, lq = teacher_topk(p, 4)
    up = torch.randn(19, generator=torch.Generator().manual_seed(seed), dtype=F64)
    res = {}
    for backend in ("reference", "torch"):
        h, w, b = (x.clone().requires_grad_(True) for x in (p.hidden, p.weight, p.bias))
        d = fused_linear_topk_kl(h, w, ids, lq, tail=tail, bias=b, mask=p.mask, temperature=1.3,
                                 backend=backend, token_chunk=5)
        res[backend] = (d.detach(), torch.autograd.grad((d * up).sum(), (h, w, b)))
    (dr, gr), (dt, gt) = res["reference"], res["torch"]
    assert (dt[p.mask == 0] == 0).all()
    assert rel_err(dt, dr) <= 1e-10, f"seed={seed}"
    for x, y in zip(gt, gr):
        assert rel_err(x, y) <= 1e-10, f"seed={seed}"


@pytest.mark.parametrize("clamp", ["none", "verl_default"])
def test_verl_forward_kl_topk_equals_truncated(clamp: str) -> None:
    """verl 0.9.1's own top-k forward KL (fsdp distillation loss, on full logits) = tail "truncated",
    without and with its log_prob_min_clamp (the default read from verl's DistillationLossConfig)."""
    verl_losses = pytest.importorskip("verl.trainer.distillation.fsdp.losses")
    import dataclasses
    from types import SimpleNamespace

    from verl.workers.config import DistillationLossConfig

    floor = None
    if clamp == "verl_default":
        floor = {f.name: f.default for f in dataclasses.fields(DistillationLossConfig)}["log_prob_min_clamp"]
        assert floor is not None
    seed = fresh_seed()
    p = make_problem(17, 31, 123, seed, mask_frac=1.0, scale=20.0)  # student log-probs well below -10
    ids, lq = teacher_topk(p, 6)
    h, w = (x.clone().requires_grad_(True) for x in (p.hidden, p.weight))
    logits = (h @ w.T)[None]
    cfg = SimpleNamespace(distillation_loss=SimpleNamespace(use_chunked_topk=False, log_prob_min_clamp=floor))
    nested = lambda t: torch.nested.nested_tensor([t], layout=torch.jagged)  # noqa: E731
    out = verl_losses.compute_forward_kl_topk(logits, nested(lq), nested(ids), cfg, "thd")
    theirs = out["distillation_losses"][0].clamp_min(0.0)  # verl's forward_kl_topk clamps at 0 after
    g_theirs = torch.autograd.grad(theirs.sum(), (h, w))
    h2, w2 = (x.clone().requires_grad_(True) for x in (p.hidden, p.weight))
    ours = fused_linear_topk_kl(h2, w2, ids, lq, tail="truncated", backend="torch", logprob_min=floor)
    g_ours = torch.autograd.grad(ours.sum(), (h2, w2))
    if floor is not None:  # the clamp is active on this problem (else the case proves nothing)
        ls = torch.log_softmax(p.hidden @ p.weight.T, -1).gather(1, ids)
        assert (ls < floor).any() and (ls > floor).any()
    assert rel_err(ours, theirs) <= 1e-6, f"seed={seed}"  # verl computes the KL in fp32
    for x, y in zip(g_ours, g_theirs):
        assert rel_err(x, y) <= 1e-6, f"seed={seed}"
    cfg_ours = cfg_for("truncated", topk_logprob_min=floor, backend="torch")
    cfg_ref = cfg_ours.replace(backend="reference")
    assert_close(run_topk(p, cfg_ours, F64, ids, lq), run_topk(p, cfg_ref, F64, ids, lq), 1e-10, f"seed={seed}")


# -- Triton backend (TRITON_INTERPRET=1 on the CPU: tiny shapes) ---------------------------------

@pytest.mark.parametrize("tail", TAILS)
def test_triton_fp32_matches_oracle(tail: str) -> None:
    _triton_ready()
    seed = fresh_seed()
    p = make_problem(13, 31, 123, seed).rounded(F32)
    ids, lq = teacher_topk(p, 5)
    cfg = cfg_for(tail)
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    assert_close(run_topk(p, cfg.replace(backend="triton"), F32, ids, lq), ref, 1e-5, f"seed={seed}")


def test_triton_k_equals_v_is_the_full_forward_kl() -> None:
    _triton_ready()
    seed = fresh_seed()
    p = make_problem(11, 31, 123, seed).rounded(F32)
    ids, lq = teacher_topk(p, 123, shuffle=True)
    cfg = cfg_for("renorm", backend="triton")
    full = run_topk(p, cfg.replace(divergence="forward_kl"), F32, None, None, teacher_full=True)
    assert_close(run_topk(p, cfg, F32, ids, lq), full, 1e-5, f"seed={seed}")
    assert_close(run_topk(p, cfg.replace(topk_tail="tail"), F32, ids, lq), full, 1e-5, f"tail seed={seed}")


@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_triton_bf16_within_plain_bf16_slack(tail: str) -> None:
    """bf16 hidden / lm_head on Triton vs the oracle on the same rounded inputs: <= 2e-2 relative."""
    _triton_ready()
    seed = fresh_seed()
    p = make_problem(12, 31, 123, seed).rounded(BF16)
    ids, lq = teacher_topk(p, 4)
    cfg = cfg_for(tail)
    ref = run_topk(p, cfg.replace(backend="reference"), F64, ids, lq)
    got = run_topk(p, cfg.replace(backend="triton"), BF16, ids, lq)
    assert all(g.dtype == BF16 for g in got[1])
    assert_close(got, ref, 2e-2, f"seed={seed}")


def test_triton_standalone_matches_torch() -> None:
    _triton_ready()
    p = make_problem(9, 31, 123, fresh_seed()).rounded(F32)
    ids, lq = teacher_topk(p, 3)
    res = []
    for backend in ("torch", "triton"):
        h, w = (x.to(F32).requires_grad_(True) for x in (p.hidden, p.weight))
        d = fused_linear_topk_kl(h, w, ids, lq, tail="tail", backend=backend)
        res.append((d.detach(), torch.autograd.grad(d.sum(), (h, w))))
    assert rel_err(res[1][0], res[0][0]) <= 1e-5
    for x, y in zip(res[1][1], res[0][1]):
        assert rel_err(x, y) <= 1e-5
