"""verl 0.9.1's own actor loss vs fused_linear_sdar_loss on the same float64 inputs (1e-6 relative in
loss, dL/dh, dL/dW), and the adapter's "sdar" losses (policy-loss registry, actor loss function,
distillation registry) vs the fused SDAR loss.

Peer code run here: ``verl.workers.utils.losses.ppo_loss`` (compute_policy_loss_vanilla / _gspo +
agg_loss + kl_penalty + entropy, combined as verl's actor does), ``get_policy_loss_fn("sdar")``,
``verl.trainer.distillation.losses.distillation_ppo_loss``.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported: Triton kernels on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (pinned in requirements/) is not installed")

from sdar_kernels.integrations import verl as adapter  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import (DistillationConfig, DistillationLossConfig, FSDPActorConfig,  # noqa: E402
                                 PolicyLossConfig)
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from .verl_problem import (assert_close, fp32_rounded, full_layout, leaves, make_problem, ours,  # noqa: E402
                           plain_logprobs, verl_batch)

AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEED = 20261201


def actor_config(**kw) -> FSDPActorConfig:
    loss_mode = kw.pop("loss_mode", "vanilla")
    return FSDPActorConfig(rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kw)


def verl_side(p, cfg, loss_fn=ppo_loss, **batch):
    """verl's actor loss on the problem: (loss, dL/dh, dL/dW, metrics)."""
    h, w = leaves(p)
    logp, ent = plain_logprobs(h, w, p)
    data = verl_batch(p, **batch)
    loss, metrics = loss_fn(cfg, {"log_probs": full_layout(logp, p), "entropy": full_layout(ent, p)}, data)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


def rtol(backend):
    """float64 everywhere: 1e-6 (issue #13); Triton runs float32 on fp32-rounded inputs: 2e-5."""
    return 2e-5 if backend == "triton" else 1e-6


def assert_same_as_verl(p, cfg, verl_out, backend="torch", dp_size=1, batch_num_tokens=None, global_batch_size=None,
                        **ours_kw):
    """Asserts our fused loss, dL/dh and dL/dW equal verl's (``verl_out``) to ``rtol(backend)``."""
    agg, norm = adapter.verl_aggregation(cfg.loss_agg_mode, p.mask, dp_size, batch_num_tokens, global_batch_size,
                                         cfg.loss_scale_factor)
    lc = adapter.loss_config_from_verl(cfg)
    assert lc.agg == agg
    got = ours(p, lc, norm, backend=backend, **ours_kw)
    for name, g, want in zip(("loss", "dL/dh", "dL/dW"), got, verl_out[:3]):
        assert_close(name, g, want, rtol(backend))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", [None, "kl", "mse", "low_var_kl"])
def test_vanilla_agg_kl_entropy(agg, kl, backend):
    p = make_problem(SEED)
    kw = dict(use_kl_loss=True, kl_loss_type=kl, kl_loss_coef=0.05) if kl else {}
    cfg = actor_config(loss_agg_mode=agg, entropy_coeff=0.01, clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_ref=kl is not None), backend=backend, ref=kl is not None)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_batched_inputs(agg, backend):
    """[B, T, H] hidden states and [B, T] inputs (no flattening, no segment ids); Triton too."""
    if backend == "triton":
        pytest.importorskip("triton")
    p = fp32_rounded(make_problem(SEED + 9))
    cfg = actor_config(loss_agg_mode=agg, entropy_coeff=0.02, use_kl_loss=True, kl_loss_type="k3+", kl_loss_coef=0.1)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_ref=True, with_is=True), backend=backend, ref=True, importance=True,
            batched=True)


@pytest.mark.parametrize("kl", ["k1+", "k3+", "low_var_kl+"])
def test_straight_through_kl(kl):
    p = make_problem(SEED + 1)
    cfg = actor_config(loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_type=kl, kl_loss_coef=0.1)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_ref=True), ref=True)


@pytest.mark.parametrize("agg", AGGS)
def test_dp_normalizer(agg):
    """dp_size = 4 with global token / sequence counts: verl divides by global / dp_size."""
    p = make_problem(SEED + 2)
    batch = dict(dp_size=4, batch_num_tokens=int(p.mask.sum()) * 4 + 3, global_batch_size=4 * 4 + 1)
    cfg = actor_config(loss_agg_mode=agg, entropy_coeff=0.003, use_kl_loss=True, kl_loss_type="mse",
                       kl_loss_coef=0.02, loss_scale_factor=40 if agg == "seq-mean-token-sum-norm" else None)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_ref=True, **batch), ref=True, **batch)


@pytest.mark.parametrize("clip_c", [1.5, 3.0, 10.0])
def test_dual_clip(clip_c):
    p = make_problem(SEED + 3)
    cfg = actor_config(loss_agg_mode="seq-mean-token-mean", clip_ratio=0.1, clip_ratio_low=None,
                       clip_ratio_high=None, clip_ratio_c=clip_c)
    assert_same_as_verl(p, cfg, verl_side(p, cfg))


def test_problem_fires_every_clip():
    """The inputs exercise both clip sides and the dual clip (else the tests above could not fail there)."""
    p = make_problem(SEED)
    ratio = torch.exp(plain_logprobs(p.hidden, p.weight, p)[0] - p.old)
    m = p.mask
    assert ((ratio > 1.2) & m & (p.advantages > 0)).any() and ((ratio < 0.8) & m & (p.advantages > 0)).any()
    assert ((ratio > 3.0) & m & (p.advantages < 0)).any() and ((ratio < 0.8) & m & (p.advantages < 0)).any()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_rollout_is_weights(agg):
    p = make_problem(SEED + 4)
    cfg = actor_config(loss_agg_mode=agg, entropy_coeff=0.01)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_is=True), importance=True)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo(agg):
    p = make_problem(SEED + 5)
    cfg = actor_config(loss_mode="gspo", loss_agg_mode=agg, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert_same_as_verl(p, cfg, verl_side(p, cfg, with_is=True), importance=True)


# -- the adapter's SDAR losses -----------------------------------------------------------------
OPTS = adapter.SDAROptions(sd_coef=0.3, gate_beta=5.0)


def sdar_config(cfg, opts=OPTS):
    return adapter.loss_config_from_verl(cfg, options=opts, with_sdar=True)


@pytest.mark.parametrize("base", ["vanilla", "gspo"])
@pytest.mark.parametrize("agg", AGGS)
def test_sdar_policy_loss_registry(agg, base):
    """get_policy_loss_fn("sdar") = base loss + lambda Agg(sigmoid(beta gap) (t - s)) = the fused SDAR loss."""
    p = make_problem(SEED + 6)
    opts = adapter.SDAROptions(sd_coef=OPTS.sd_coef, gate_beta=OPTS.gate_beta, base_loss_mode=base)
    cfg = actor_config(loss_mode="sdar", loss_agg_mode=agg)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    h, w = leaves(p)
    logp, _ = plain_logprobs(h, w, p)
    loss, metrics = get_policy_loss_fn("sdar")(old_log_prob=p.old, log_prob=logp, advantages=p.advantages,
                                               response_mask=p.mask, loss_agg_mode=agg, config=cfg,
                                               rollout_is_weights=p.is_weights, teacher_log_prob=p.teacher,
                                               options=opts)
    loss.backward()
    assert 0 < metrics["sdar/gate_mean"] < 1
    _, norm = adapter.verl_aggregation(agg, p.mask)
    lc = adapter.loss_config_from_verl(cfg, options=opts)
    assert lc.teacher_use == "sdar" and lc.ratio_level == ("token" if base == "vanilla" else "sequence_token")
    got = ours(p, lc, norm, teacher=True, importance=True)
    for name, g, want in zip(("loss", "dL/dh", "dL/dW"), got, (loss.detach(), h.grad, w.grad)):
        assert_close(name, g, want)


def test_sdar_policy_loss_needs_teacher():
    p = make_problem(SEED)
    with pytest.raises(ValueError, match="teacher_log_prob"):
        get_policy_loss_fn("sdar")(old_log_prob=p.old, log_prob=p.old, advantages=p.advantages,
                                   response_mask=p.mask, config=actor_config())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_sdar_ppo_loss(agg, backend):
    """The drop-in actor loss: verl's ppo_loss (entropy, KL, dp normalizer) + the SDAR term."""
    if backend == "triton":
        pytest.importorskip("triton")
    p = fp32_rounded(make_problem(SEED + 7))
    batch = dict(dp_size=2, batch_num_tokens=int(p.mask.sum()) * 2, global_batch_size=2 * 5)
    cfg = actor_config(loss_agg_mode=agg, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05)
    fn = lambda c, mo, d: adapter.sdar_ppo_loss(c, mo, d, options=OPTS)  # noqa: E731
    out = verl_side(p, cfg, loss_fn=fn, with_ref=True, teacher_keys=("teacher_log_probs",), **batch)
    _, norm = adapter.verl_aggregation(agg, p.mask, **batch)
    got = ours(p, sdar_config(cfg), norm, teacher=True, ref=True, backend=backend)
    for name, g, want in zip(("loss", "dL/dh", "dL/dW"), got, out[:3]):
        assert_close(name, g, want, rtol(backend))


def test_sdar_distillation_registry(monkeypatch):
    """verl's own distillation_ppo_loss with distillation_loss.loss_mode="sdar": ppo_loss + coef Agg(g (t - s))."""
    from verl.trainer.distillation.losses import distillation_ppo_loss

    p = make_problem(SEED + 8)
    cfg = actor_config(loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01)
    # enabled=False only skips the teacher-server checks (no teacher_models here); the loss reads distillation_loss
    dcfg = DistillationConfig(enabled=False, distillation_loss=DistillationLossConfig(
        loss_mode="sdar", use_task_rewards=True, use_policy_gradient=False, distillation_loss_coef=OPTS.sd_coef,
        loss_max_clamp=None))
    monkeypatch.setattr(adapter, "_OPTIONS", OPTS)  # the registry signature has no options slot
    fn = lambda c, mo, d: distillation_ppo_loss(c, dcfg, mo, d)  # noqa: E731
    out = verl_side(p, cfg, loss_fn=fn, teacher_keys=("teacher_logprobs",))
    _, norm = adapter.verl_aggregation(cfg.loss_agg_mode, p.mask)
    got = ours(p, sdar_config(cfg), norm, teacher=True)
    for name, g, want in zip(("loss", "dL/dh", "dL/dW"), got, out[:3]):
        assert_close(name, g, want)


def test_mapping_rejects_what_loss_config_lacks():
    with pytest.raises(ValueError, match="kl_loss_type"):
        adapter.loss_config_from_verl(actor_config(use_kl_loss=True, kl_loss_type="abs"))
    with pytest.raises(ValueError, match="loss_mode"):
        adapter.loss_config_from_verl(actor_config(loss_mode="cispo"))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        adapter.verl_aggregation("token-mean", torch.ones(2, 3), dp_size=2)
    with pytest.raises(ValueError, match="base_loss_mode"):
        adapter.SDAROptions(base_loss_mode="sapo")


def test_verl_plugin_hook_registers_everything():
    """VERL_USE_EXTERNAL_MODULES (verl's own hook, run at `import verl` in every process) is enough:
    the 'sdar' policy and distillation losses exist and verl's config accepts loss_mode='sdar'."""
    import os
    import subprocess
    import sys

    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "from verl.workers.config import DistillationLossConfig\n"
            "import transformers\n"
            "assert get_policy_loss_fn('sdar').__name__ == 'compute_policy_loss_sdar'\n"
            "assert DistillationLossConfig(loss_mode='sdar').loss_settings.use_estimator\n"
            "assert transformers.Qwen2ForCausalLM.forward.__name__ == 'fused_causal_lm_forward'\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "sdar_kernels.integrations.verl",
           "SDAR_VERL_FUSED_ARCHS": "Qwen2ForCausalLM"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_doc_snippet_runs():
    """docs/integrations/verl.md's runnable snippet (it asserts verl's loss = the fused loss)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations" / "verl.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "assert torch.allclose(verl_loss, ours.loss" in code  # the snippet checks itself: keep it so
    torch.manual_seed(0)
    exec(compile(code, "verl.md", "exec"), {})


def test_example_config_keys_exist_in_verl():
    """Every key of docs/integrations/verl_sdar_example.yaml is one of verl 0.9.1's ppo_trainer keys,
    and its distillation_loss section builds verl's DistillationLossConfig with loss_mode sdar."""
    from pathlib import Path

    import verl
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2]
    example = OmegaConf.to_container(OmegaConf.load(root / "docs" / "integrations" / "verl_sdar_example.yaml"))
    verl_cfg = OmegaConf.to_container(OmegaConf.load(
        Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"), resolve=False)

    def walk(ours_node, theirs, path):
        for key, value in ours_node.items():
            assert key in theirs, f"{path}{key} is not a verl 0.9.1 config key"
            if isinstance(value, dict) and isinstance(theirs[key], dict):
                walk(value, theirs[key], f"{path}{key}.")

    walk(example, verl_cfg, "")
    loss = DistillationLossConfig(**example["distillation"]["distillation_loss"])
    assert loss.loss_settings.use_estimator and loss.loss_max_clamp is None
