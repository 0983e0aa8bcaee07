"""The loss options the TRL / verl adapters need (issue #13): the float64 oracle on the torch backend
(both paths), and each option's meaning checked by hand (formulas of SDAR_MATH.md, TRL's
_compute_loss and verl's core_algos, written out here; the peers' own code runs in
tests/integrations). Odd shapes (V=123, H=31), prompt tokens and a fully masked row, fixed seeds."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from sdar_kernels import PRESETS, LossConfig, fused_linear_logprobs, fused_linear_sdar_loss

from .loss_option_cases import CASES, check_against_oracle, fused_run, make_batch, rel_err
from .problems import fresh_seed


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["rows", "tiles"])
@pytest.mark.parametrize("name", list(CASES))
def test_option_matches_the_oracle(name, grad_in_forward):
    check_against_oracle(make_batch(fresh_seed()), name, "torch", grad_in_forward, 1e-9)


@pytest.mark.parametrize("name", ["importance_weights", "ratio_sequence", "entropy_agg", "kl_k3_plus",
                                  "kl_ratio_weighted"])
def test_option_matches_the_oracle_in_fp32(name):
    check_against_oracle(make_batch(fresh_seed()), name, "torch", True, 1e-5, dtype=torch.float32)


def _plain(p, **cfg):
    """Policy-only trl-style config on the torch backend (no KL, entropy, teacher)."""
    base = dict(backend="torch", dual_clip=None, kl_coef=0.0, teacher_use="none", sd_coef=0.0)
    return LossConfig(**{**base, **cfg})


def _logp(p):
    b, t, h = p.hidden.shape
    s, ent = fused_linear_logprobs(p.hidden.reshape(b * t, h), p.weight, p.targets.reshape(-1), bias=p.bias,
                                   with_entropy=True, backend="reference")
    return s.reshape(b, t), ent.reshape(b, t)


def test_on_policy_is_old_equal_to_the_detached_logprobs():
    p = make_batch(fresh_seed())
    s, _ = _logp(p)
    cfg = LossConfig.preset("sdar", backend="torch", kl_coef=0.05)
    l_none, g_none, out = fused_run(p, cfg, {"old": None})
    p.old = s.detach()
    l_given, g_given, _ = fused_run(p, cfg, {})
    assert abs(l_none.item() - l_given.item()) <= 1e-12 * max(1.0, abs(l_given.item()))
    assert all(rel_err(a, b) <= 1e-10 for a, b in zip(g_none, g_given))
    assert abs(out.metrics["ratio_mean"].item() - 1.0) <= 1e-12


def _seq_ratio(p, s):
    """TRL's sequence-level ratio per row: exp(sum m (s - o) / max(sum m, 1))."""
    m = p.mask
    return torch.exp((m * (s - p.old)).sum(-1) / m.sum(-1).clamp(min=1))


def test_sequence_ratio_is_trls_gspo_by_hand():
    """trl_grpo at importance_sampling_level="sequence": mean over rows of -min(r A, clip(r) A) with
    the row's ratio r; TRL divides by B (all rows) and the oracle by non-empty rows: normalizer=B."""
    p = make_batch(fresh_seed())
    h = p.hidden.clone().requires_grad_(True)
    b, t, hd = h.shape
    out = fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages, p.old, p.mask, bias=p.bias, normalizer=b,
                                 config=LossConfig.preset("trl_grpo", backend="torch", ratio_level="sequence"))
    (dh,) = torch.autograd.grad(out.loss, [h])
    h2 = p.hidden.clone().requires_grad_(True)
    s = torch.log_softmax(h2 @ p.weight.T + p.bias, -1).gather(-1, p.targets[..., None])[..., 0]
    r = _seq_ratio(p, s)
    A = p.advantages
    per_row = -torch.minimum(r * A, torch.clamp(r, 0.8, 1.2) * A)
    want = (per_row * (p.mask.sum(-1) > 0)).sum() / b  # a fully masked row: (x * mask).sum / clamp(count) = 0
    (dh_want,) = torch.autograd.grad(want, [h2])
    assert abs(out.loss.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert rel_err(dh, dh_want) <= 1e-10


def test_sequence_and_sequence_token_agree_without_per_token_weights_and_differ_with_them():
    """TRL's GSPO (gradient through the mean) and verl's GSPO-token (straight-through) have the same
    value, and the same gradient while the token weights are constant within a sequence; per-token
    importance weights tell them apart."""
    p = make_batch(fresh_seed())
    seq, tok = (_plain(p, ratio_level=level, agg="token-mean") for level in ("sequence", "sequence_token"))
    (la, ga, _), (lb, gb, _) = fused_run(p, seq, {}), fused_run(p, tok, {})
    assert abs(la.item() - lb.item()) <= 1e-12 and rel_err(ga[0], gb[0]) <= 1e-10
    (la, ga, _), (lb, gb, _) = fused_run(p, seq, {"iw": "token"}), fused_run(p, tok, {"iw": "token"})
    assert abs(la.item() - lb.item()) <= 1e-12 and rel_err(ga[0], gb[0]) > 1e-3
    token = _plain(p, agg="token-mean")
    lt, gt, _ = fused_run(p, token, {})
    assert abs(lt.item() - la.item()) > 1e-6  # the sequence ratio is not the token ratio


def test_clip_ratio_max_is_trls_delta():
    """TRL: -min(min(r, delta) A, clip(r) A). Changes the loss where A < 0 and r > delta, equals the
    dual clip at c = delta (which is what it computes), and is validated against 1 + clip_high."""
    p = make_batch(fresh_seed())
    p.old = p.old - 0.6  # many ratios above delta
    delta = 1.4
    l_d, g_d, _ = fused_run(p, _plain(p, clip_ratio_max=delta), {})
    l_0, g_0, _ = fused_run(p, _plain(p), {})
    l_c, g_c, _ = fused_run(p, _plain(p, dual_clip=delta), {})
    s, _ = _logp(p)
    r, A, m = torch.exp(s - p.old), p.advantages[:, None], p.mask
    want = (m * -torch.minimum(torch.clamp(r, max=delta) * A, torch.clamp(r, 0.8, 1.2) * A)).sum() / m.sum()
    assert abs(l_d.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert abs(l_d.item() - l_0.item()) > 1e-4 and rel_err(g_d[0], g_0[0]) > 1e-3
    assert abs(l_d.item() - l_c.item()) <= 1e-12 and rel_err(g_d[0], g_c[0]) <= 1e-12
    with pytest.raises(ValueError, match="clip_ratio_max"):
        LossConfig(clip_high=0.28, clip_ratio_max=1.2)


def test_importance_weights_scale_the_policy_term_only():
    p = make_batch(fresh_seed())
    c = 0.37
    pol = _plain(p, agg="seq-mean-token-mean")
    l1, _, _ = fused_run(p, pol, {})
    p.iw = torch.full_like(p.iw, c)
    lc, _, _ = fused_run(p, pol, {"iw": "token"})
    assert abs(lc.item() - c * l1.item()) <= 1e-12 * max(1.0, abs(l1.item()))
    # KL and entropy are not weighted: with zero weights only they remain
    p.iw = torch.zeros_like(p.iw)
    rest = _plain(p, kl_coef=0.1, kl_type="k3", entropy_coef=0.05)
    l0, g0, _ = fused_run(p, rest, {"iw": "token"})
    lk, gk, _ = fused_run(p, rest.replace(policy_coef=0.0), {})
    assert abs(l0.item() - lk.item()) <= 1e-12 and rel_err(g0[0], gk[0]) <= 1e-12


def test_entropy_agg_token_means_the_bonus_apart_from_the_policy_aggregation():
    p = make_batch(fresh_seed())
    _, ent = _logp(p)
    m = p.mask
    cfg = _plain(p, policy_coef=0.0, entropy_coef=1.0, agg="seq-mean-token-sum", entropy_agg="token-mean")
    loss, _, _ = fused_run(p, cfg, {"normalizer": 3.0})
    assert abs(loss.item() + ((m * ent).sum() / m.sum()).item()) <= 1e-12
    loss, _, _ = fused_run(p, cfg, {"normalizer": 3.0, "entropy_normalizer": 50.0})
    assert abs(loss.item() + ((m * ent).sum() / 50.0).item()) <= 1e-12
    same, _, _ = fused_run(p, cfg.replace(entropy_agg=None), {"normalizer": 3.0})
    assert abs(same.item() + ((m * ent).sum() / 3.0).item()) <= 1e-12


@pytest.mark.parametrize("plus,base", [("k1+", "k1"), ("k3+", "k3")])
def test_straight_through_kl_has_the_value_of_its_base_and_the_gradient_of_k2(plus, base):
    p = make_batch(fresh_seed())
    kl = lambda kind: _plain(p, policy_coef=0.0, kl_coef=1.0, kl_type=kind)  # noqa: E731
    (lp, gp, _), (lb, gb, _), (l2, g2, _) = (fused_run(p, kl(k), {}) for k in (plus, base, "k2"))
    assert abs(lp.item() - lb.item()) <= 1e-12 * max(1.0, abs(lb.item()))
    assert all(rel_err(a, b) <= 1e-10 for a, b in zip(gp, g2))
    assert rel_err(gp[0], gb[0]) > 1e-3


def test_k3_unclamped_is_trls_kl_and_differs_from_verls_clamped_k3_past_the_clamp():
    p = make_batch(fresh_seed())  # r - s = 3.5 on two tokens of row 0: exp(3.5) - 4.5 = 28.6 > 10
    s, _ = _logp(p)
    kl = lambda kind: _plain(p, policy_coef=0.0, kl_coef=1.0, kl_type=kind, agg="token-mean")  # noqa: E731
    lu, gu, _ = fused_run(p, kl("k3_unclamped"), {})
    lc, gc, _ = fused_run(p, kl("k3"), {})
    d, m = p.ref - s, p.mask
    assert abs(lu.item() - ((m * (torch.exp(d) - d - 1)).sum() / m.sum()).item()) <= 1e-12
    assert abs(lu.item() - lc.item()) > 1e-2 and rel_err(gu[0], gc[0]) > 1e-3
    p.ref[0, 1:3] = s[0, 1:3] + 0.3  # inside the clamp the two agree
    (lu, gu, _), (lc, gc, _) = fused_run(p, kl("k3_unclamped"), {}), fused_run(p, kl("k3"), {})
    assert abs(lu.item() - lc.item()) <= 1e-12 and rel_err(gu[0], gc[0]) <= 1e-12


def test_sum_norm_constant_is_T_for_batches_and_required_for_packed_streams():
    p = make_batch(fresh_seed())
    b, t, h = p.hidden.shape
    cfg = _plain(p, agg="seq-mean-token-sum-norm")
    batched, _, _ = fused_run(p, cfg, {})
    s, _ = _logp(p)
    r, A, m = torch.exp(s - p.old), p.advantages[:, None], p.mask
    pg = -torch.minimum(r * A, torch.clamp(r, 0.8, 1.2) * A)
    assert abs(batched.item() - ((m * pg).sum() / t).item()) <= 1e-12
    flat = lambda z: z.reshape(b * t)  # noqa: E731
    packed = lambda c, **kw: fused_linear_sdar_loss(  # noqa: E731
        p.hidden.reshape(b * t, h), p.weight, flat(p.targets), flat(p.advantages[:, None].expand(b, t)),
        flat(p.old), flat(p.mask), bias=p.bias, segment_ids=torch.arange(b).repeat_interleave(t), config=c, **kw)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        packed(cfg)
    assert abs(packed(cfg.replace(loss_scale_factor=float(t))).loss.item() - batched.item()) <= 1e-12
    assert abs(packed(cfg, normalizer=float(t)).loss.item() - batched.item()) <= 1e-12
    assert abs(fused_run(p, cfg.replace(loss_scale_factor=64.0), {})[0].item() * 64 - batched.item() * t) <= 1e-10


def test_batched_inputs_equal_the_packed_stream_and_come_back_batched():
    p = make_batch(fresh_seed())
    b, t, h = p.hidden.shape
    cfg = LossConfig.preset("sdar", backend="torch", agg="seq-mean-token-mean", ratio_level="sequence",
                            entropy_coef=0.01)
    lb, gb, out = fused_run(p, cfg, {"iw": "row"})
    hp = p.hidden.reshape(b * t, h).clone().requires_grad_(True)
    flat = lambda z: z.reshape(b * t)  # noqa: E731
    outp = fused_linear_sdar_loss(hp, p.weight, flat(p.targets), flat(p.advantages[:, None].expand(b, t)),
                                  flat(p.old), flat(p.mask), teacher_logprobs=flat(p.teacher), ref_logprobs=flat(p.ref),
                                  segment_ids=torch.arange(b).repeat_interleave(t), bias=p.bias, config=cfg,
                                  importance_weights=flat(p.iw[:, 1:2].expand(b, t)))
    (gp,) = torch.autograd.grad(outp.loss, [hp])
    assert abs(lb.item() - outp.loss.item()) <= 1e-14 * max(1.0, abs(lb.item()))
    assert rel_err(gb[0].reshape(b * t, h), gp) <= 1e-14
    assert out.logprobs.shape == (b, t) and torch.equal(out.logprobs.reshape(-1), outp.logprobs)
    assert (out.logprobs[p.mask == 0] == 0).all() and (gb[0][b - 1] == 0).all()  # the fully masked row


def test_shapes_and_missing_sequences_raise_value_errors_naming_the_input():
    p = make_batch(fresh_seed())
    b, t, h = p.hidden.shape
    cfg = LossConfig.preset("grpo", backend="torch", kl_coef=0.0)
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages[:2], p.old, p.mask, config=cfg)
    with pytest.raises(ValueError, match="loss_mask"):
        fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages, p.old, p.mask.reshape(-1), config=cfg)
    with pytest.raises(ValueError, match="importance_weights"):
        fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages, p.old, p.mask, config=cfg,
                               importance_weights=p.iw[:, :3])
    flat = lambda z: z.reshape(b * t)  # noqa: E731
    with pytest.raises(ValueError, match="segment_ids"):
        fused_linear_sdar_loss(p.hidden.reshape(b * t, h), p.weight, flat(p.targets),
                               flat(p.advantages[:, None].expand(b, t)), flat(p.old), flat(p.mask),
                               config=cfg.replace(ratio_level="sequence"))
    with pytest.raises(ValueError, match="entropy_agg"):
        LossConfig(entropy_agg="token-sum")
    with pytest.raises(ValueError, match="ratio_level"):
        LossConfig(ratio_level="seq")


def test_a_non_finite_importance_weight_on_a_loss_token_raises():
    p = make_batch(fresh_seed())
    iw = p.iw.clone()
    i = int(p.mask[0].nonzero()[0, 0])
    iw[0, i] = float("nan")
    with pytest.raises(ValueError, match="importance_weights"):
        fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages, p.old, p.mask,
                               config=LossConfig.preset("grpo", backend="torch", kl_coef=0.0), importance_weights=iw)
    iw = p.iw.clone()
    iw[p.mask == 0] = float("nan")  # padding may hold anything
    fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages, p.old, p.mask,
                           config=LossConfig.preset("grpo", backend="torch", kl_coef=0.0), importance_weights=iw)


def test_all_masked_gives_zero_loss_and_zero_gradients():
    p = make_batch(fresh_seed())
    p.mask = torch.zeros_like(p.mask)
    for name in ("ratio_sequence", "trl_grpo", "verl_gspo", "sum_norm_horizon"):
        preset, overrides, _ = CASES[name]
        for rows in (True, False):
            loss, grads, _ = fused_run(p, LossConfig.preset(preset, backend="torch", grad_in_forward=rows,
                                                            **overrides), {"iw": "token"})
            assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads), name


def test_peer_presets_follow_the_peers_defaults():
    """Read from the peers' own config classes when installed (TRL's GRPOConfig)."""
    names = ("trl_grpo", "trl_bnpo", "trl_dr_grpo", "trl_dapo", "verl_grpo", "verl_gspo")
    assert all(n in PRESETS for n in names)
    assert LossConfig.preset("verl_grpo").dual_clip == 3.0 and LossConfig.preset("verl_gspo").dual_clip is None
    assert LossConfig.preset("verl_gspo").ratio_level == "sequence_token"
    trl = pytest.importorskip("trl")
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    args = types.SimpleNamespace(**defaults)  # the class defaults as TRL declares them (no __post_init__)
    for name, loss_type in (("trl_grpo", "grpo"), ("trl_bnpo", "bnpo"), ("trl_dr_grpo", "dr_grpo"),
                            ("trl_dapo", "dapo")):
        cfg = LossConfig.preset(name)
        assert cfg.dual_clip is None and cfg.entropy_agg == "token-mean", name
        assert cfg.clip_low == args.epsilon and cfg.clip_high == (args.epsilon_high or args.epsilon), name
        assert cfg.kl_coef == args.beta and cfg.clip_ratio_max == args.delta, name
        assert cfg.entropy_coef == args.entropy_coef and cfg.temperature == args.temperature, name
    assert args.loss_type == "dapo" and LossConfig.preset("trl_dapo").agg == "token-mean"


@pytest.mark.parametrize("level,rows", [("token", True), ("token", False), ("sequence", False)])
def test_kl_ratio_weighted_is_trls_bias_corrected_kl_by_hand(level, rows):
    """trl_bnpo with beta, delta and use_bias_correction_kl as TRL 1.16's _compute_loss orders them:
    coef_1 = exp(log-ratio) (token, or the row's mean); kl = k3_unclamped * coef_1 (before the delta cap);
    loss = token mean of -min(min(coef_1, delta) A, clip(coef_1) A) + beta kl. Off, the loss differs."""
    p = make_batch(fresh_seed())
    p.old[1] -= 0.6  # row 1's ratio above delta at both levels
    beta, delta = 0.3, 1.3
    cfg = LossConfig.preset("trl_bnpo", backend="torch", grad_in_forward=rows, ratio_level=level, kl_coef=beta,
                            clip_ratio_max=delta, kl_ratio_weighted=True)
    h = p.hidden.clone().requires_grad_(True)
    out = fused_linear_sdar_loss(h, p.weight, p.targets, p.advantages, p.old, p.mask, ref_logprobs=p.ref,
                                 bias=p.bias, config=cfg)
    (dh,) = torch.autograd.grad(out.loss, [h])
    h2 = p.hidden.clone().requires_grad_(True)
    s = torch.log_softmax(h2 @ p.weight.T + p.bias, -1).gather(-1, p.targets[..., None])[..., 0]
    m = p.mask
    log_ratio = s - p.old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    kl = (torch.exp(p.ref - s) - (p.ref - s) - 1) * coef_1
    A = p.advantages[:, None]
    pg = -torch.minimum(torch.clamp(coef_1, max=delta) * A, torch.clamp(coef_1, 0.8, 1.2) * A)
    want = ((pg + beta * kl) * m).sum() / m.sum()
    (dh_want,) = torch.autograd.grad(want, [h2])
    assert ((coef_1 > delta) & (m > 0)).any()  # the cap binds, so a capped KL weight would show
    assert abs(out.loss.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert rel_err(dh, dh_want) <= 1e-10
    off = fused_linear_sdar_loss(p.hidden, p.weight, p.targets, p.advantages, p.old, p.mask, ref_logprobs=p.ref,
                                 bias=p.bias, config=cfg.replace(kl_ratio_weighted=False)).loss
    assert abs(off.item() - want.item()) > 1e-3 * max(1.0, abs(want.item()))


def test_kl_ratio_weighted_must_be_a_bool():
    with pytest.raises(ValueError, match="kl_ratio_weighted"):
        LossConfig(kl_ratio_weighted=1)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_linear_logprobs_takes_batched_hidden(backend):
    """[B, T, H] hidden with [B, T] targets / mask: the same numbers as the flattened call, shaped [B, T]."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(3, 5, 31, generator=g, dtype=torch.float64)
    w = torch.randn(123, 31, generator=g, dtype=torch.float64)
    y = torch.randint(0, 123, (3, 5), generator=g)
    m = (torch.rand(3, 5, generator=g) > 0.3).double()
    logp, ent = fused_linear_logprobs(h, w, y, 0.7, True, mask=m, backend=backend)
    flat_logp, flat_ent = fused_linear_logprobs(h.reshape(15, 31), w, y.reshape(-1), 0.7, True, mask=m.reshape(-1),
                                                backend=backend)
    assert logp.shape == ent.shape == (3, 5)
    assert torch.equal(logp.reshape(-1), flat_logp) and torch.equal(ent.reshape(-1), flat_ent)
    assert float(logp.abs().sum()) > 0
    with pytest.raises(ValueError, match="targets must be"):
        fused_linear_logprobs(h, w, y.reshape(-1), backend=backend)
