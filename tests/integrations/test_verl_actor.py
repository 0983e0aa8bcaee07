"""The fused actor forward (what verl's use_fused_kernels expects) on a tiny random HF model.

Peers: verl's own fused torch forward (``verl.models.transformers.dense_common.forward_with_torch_backend``)
and verl's unfused path (``logprobs_from_logits`` / ``entropy_from_logits`` on the model's logits).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported: Triton kernels on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (pinned in requirements/) is not installed")
transformers = pytest.importorskip("transformers")

from sdar_kernels.integrations import verl as adapter  # noqa: E402
from verl.models.transformers.dense_common import forward_with_torch_backend  # noqa: E402
from verl.models.transformers.monkey_patch import patch_forward_with_backends  # noqa: E402
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits  # noqa: E402

from .verl_problem import assert_close  # noqa: E402

TEMPERATURE = 0.7


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=123, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).double().eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 123, (2, 11), generator=g)
    return input_ids, torch.roll(input_ids, shifts=-1, dims=-1)


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, forward, input_ids, shift_labels):
    model.zero_grad()
    out = forward(model, input_ids=input_ids, temperature=TEMPERATURE, return_dict=True, shift_labels=shift_labels)
    # a per-token upstream gradient on both outputs, so every path of the backward is checked
    g = torch.Generator().manual_seed(7)
    c1, c2 = (torch.randn(out.log_probs.shape, generator=g, dtype=torch.float64) for _ in range(2))
    ((out.log_probs * c1.to(out.log_probs.dtype)).sum() + (out.entropy * c2.to(out.entropy.dtype)).sum()).backward()
    return out.log_probs.detach(), out.entropy.detach(), grads(model)


def test_fused_forward_equals_verl_fused_and_unfused():
    model = tiny_model()
    input_ids, labels = inputs()
    logp, ent, g_ours = run(model, adapter.fused_causal_lm_forward, input_ids, labels)
    logp_v, ent_v, g_verl = run(model, forward_with_torch_backend, input_ids, labels)
    assert logp.shape == ent.shape == input_ids.shape
    # verl's FusedLinearForPPO returns fp32 whatever the model dtype; ours keeps fp64 for an fp64 model
    assert logp.dtype == torch.float64 and logp_v.dtype == torch.float32
    assert_close("log_probs vs verl fused", logp, logp_v.double(), 1e-6)
    assert_close("entropy vs verl fused", ent, ent_v.double(), 1e-6)
    assert g_ours.keys() == g_verl.keys() and "lm_head.weight" in g_ours and "model.embed_tokens.weight" in g_ours
    for name in g_verl:
        assert_close(f"d/d{name}", g_ours[name], g_verl[name], 1e-6)
    # verl's unfused path (materialized logits / temperature) in fp64, gradients by plain autograd
    logp_u, ent_u, g_plain = run(model, unfused_forward, input_ids, labels)
    assert_close("log_probs vs logprobs_from_logits", logp, logp_u, 1e-10)
    assert_close("entropy vs entropy_from_logits", ent, ent_u, 1e-10)
    for name in g_plain:
        assert_close(f"d/d{name} vs unfused", g_ours[name], g_plain[name], 1e-10)


def unfused_forward(model, input_ids, temperature, return_dict, shift_labels):
    logits = transformers.Qwen2ForCausalLM.forward(model, input_ids=input_ids).logits / temperature
    return adapter.FusedCausalLMOutput(log_probs=logprobs_from_logits(logits, shift_labels),
                                       entropy=entropy_from_logits(logits))


def test_packed_stream_like_verl_rmpad():
    """verl's remove-padding path: one row [1, nnz] with per-sequence position ids."""
    model = tiny_model(3)
    input_ids, _ = inputs(4)
    packed = input_ids.reshape(1, -1)
    position_ids = torch.arange(11).repeat(2)[None]
    labels = torch.roll(packed, shifts=-1, dims=-1)
    out = adapter.fused_causal_lm_forward(model, input_ids=packed, position_ids=position_ids,
                                          temperature=TEMPERATURE, shift_labels=labels)
    ref = forward_with_torch_backend(model, input_ids=packed, position_ids=position_ids, temperature=TEMPERATURE,
                                     return_dict=True, shift_labels=labels)
    assert out.log_probs.shape == (1, 22)
    assert_close("log_probs", out.log_probs, ref.log_probs.double(), 1e-6)
    assert_close("entropy", out.entropy, ref.entropy.double(), 1e-6)


def test_install_survives_verl_patch_with_sdar_backend():
    """With fused_kernel_options.impl_backend=sdar verl skips its own patch: the model keeps ours."""
    model = tiny_model(5)
    adapter.install_fused_forward(model)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="sdar")
    input_ids, labels = inputs(6)
    out = model(input_ids=input_ids, temperature=TEMPERATURE, return_dict=True, shift_labels=labels)
    assert isinstance(out, adapter.FusedCausalLMOutput)
    ref = forward_with_torch_backend(model, input_ids=input_ids, temperature=TEMPERATURE, return_dict=True,
                                     shift_labels=labels)
    assert_close("log_probs", out.log_probs, ref.log_probs.double(), 1e-6)


def test_install_on_class_and_errors(monkeypatch):
    class Patched(transformers.Qwen2ForCausalLM):
        pass

    adapter.install_fused_forward(Patched)
    model = Patched(tiny_model(8).config).double()
    input_ids, _ = inputs(9)
    out = model(input_ids=input_ids, temperature=1.0)  # labels default: input_ids rolled left
    with torch.no_grad():
        logits = transformers.Qwen2ForCausalLM.forward(model, input_ids=input_ids).logits
    assert_close("log_probs", out.log_probs, logprobs_from_logits(logits, torch.roll(input_ids, -1, -1)), 1e-10)
    with pytest.raises(ValueError, match="temperature"):
        model(input_ids=input_ids, temperature=torch.ones(2))
    monkeypatch.setattr(transformers, "NoSuchForCausalLM", None, raising=False)
    with pytest.raises(ValueError, match="NoSuchForCausalLM"):
        adapter.install_for_architectures(["NoSuchForCausalLM"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_model_on_both_backends(backend):
    """An fp32 model: log-probs, entropy and gradients of the fused forward on the torch and Triton
    backends vs the fp64 unfused path on the same weights (2e-5 relative)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = tiny_model(10)
    input_ids, labels = inputs(11)
    logp_u, ent_u, g_plain = run(model, unfused_forward, input_ids, labels)
    model = model.float()
    adapter.install_fused_forward(model, backend=backend)
    out = run(model, lambda m, **kw: m(**kw), input_ids, labels)
    assert out[0].dtype == torch.float32
    assert_close("log_probs", out[0].double(), logp_u, 2e-5)
    assert_close("entropy", out[1].double(), ent_u, 2e-5)
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert_close(f"d/d{name}", out[2][name].double(), g_plain[name], 2e-5)
