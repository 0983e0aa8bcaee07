"""The vLLM backend's contract without vLLM: a fake ``vllm`` module records what the backend asks.

Checked here: the missing-extra error (config and constructor), the token-id prompts and the
per-prompt seeded sampling parameters it builds, response trimming, the sleep / wake / push
order that shares the GPU with training, and the weight names and values it pushes (the HF
checkpoint's names, what vLLM's ``load_weights`` reads). The real engine runs in
benchmarks/gpu/run_vllm_check.py.
"""
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

try:
    from tests.engine.loop_fakes import tiny_model_dir
except ImportError:  # rootdir without package layout
    from loop_fakes import tiny_model_dir

from sdar_engine.config import from_dict
from sdar_engine.model import ModelConfig, load_policy
from sdar_engine.rollout import stop_token_ids
from sdar_engine.vllm_backend import MISSING_VLLM, VLLMBackend, engine_kwargs, hf_weight_name, weight_stream


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class FakeModel:
    """Stands for the vLLM model inside the worker: records what load_weights received."""

    loaded: list = field(default_factory=list)

    def load_weights(self, weights):
        names = set()
        for name, tensor in weights:
            self.loaded.append((name, tensor.clone()))
            names.add(name)
        return names


class FakeLLM:
    """Records every call in order; generate answers each prompt with ``reply(prompt ids)``."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.model = kwargs, [], FakeModel()
        self.reply = lambda ids: [ids[-1] + 1, 7, ids[0]]

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(self.reply(p["prompt_token_ids"])))])
                for p in prompts]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def apply_model(self, func):
        self.calls.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # a TypedDict in vLLM
    vllm.LLM, vllm.SamplingParams, vllm.inputs = FakeLLM, FakeSamplingParams, inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return vllm


@pytest.fixture(scope="module")
def policy():
    return load_policy(ModelConfig(path=tiny_model_dir(), attn="sdpa"), "cpu")


def test_missing_vllm_names_the_extra_before_any_work(monkeypatch, policy):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when not installed
    with pytest.raises(ValueError, match=r"\[vllm\] extra .*pip install -e '\.\[vllm\]'.*vllm==0\.32\.0"):
        from_dict({}, ["rollout.backend=vllm"], check_paths=False)  # at config validation, before anything
    with pytest.raises(ImportError, match=r"\[vllm\] extra"):
        VLLMBackend(tiny_model_dir(), policy[1])
    assert "rollout.backend=hf" in MISSING_VLLM


def test_bad_vllm_keys_name_the_key(fake_vllm, policy):
    for item, match in (("rollout.vllm_sleep_level=3", "vllm_sleep_level=3.*0, 1, 2"),
                        ("rollout.vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_utilization=1.5"),
                        ("rollout.vllm_dtype=int8", "vllm_dtype='int8'.*auto, bfloat16"),
                        ("train.device=cpu", "rollout.backend='vllm' is invalid; valid: hf with train.device=cpu")):
        with pytest.raises(ValueError, match=match):
            from_dict({}, ["rollout.backend=vllm", item], check_paths=False)
    cfg = from_dict({}, ["rollout.backend=vllm", "rollout.max_prompt_tokens=300", "rollout.max_new_tokens=20",
                         f"model.path={tiny_model_dir()}", "train.seed=5"])
    backend = VLLMBackend.from_config(cfg, policy[1])
    kw = backend.llm.kwargs
    assert kw["model"] == kw["tokenizer"] == tiny_model_dir() and kw["max_model_len"] == 320 and kw["seed"] == 5
    assert kw["enable_sleep_mode"] and kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in kw
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process engine: weights pass by reference


def test_engine_kwargs_under_torchrun_and_without_sleep():
    kw = engine_kwargs("m", world_size=4, sleep_level=0)
    assert kw["distributed_executor_backend"] == "external_launcher" and not kw["enable_sleep_mode"]
    with pytest.raises(ValueError, match="vllm_sleep_level=5"):
        engine_kwargs("m", sleep_level=5)


def test_generate_sends_token_prompts_with_per_prompt_seeds(fake_vllm, policy):
    tok = policy[1]
    eos = stop_token_ids(tok)
    backend = VLLMBackend(tiny_model_dir(), tok)
    backend.llm.reply = lambda ids: [ids[-1], eos[0], 99] if ids[0] == 5 else []
    out = backend.generate([[5, 6, 7], [8, 9]], max_new_tokens=12, temperature=0.7, top_p=0.9,
                           stop=["</action>"], seeds=[11, 12])
    _, prompts, params, use_tqdm = backend.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}] and use_tqdm is False
    assert [p.kwargs["seed"] for p in params] == [11, 12]
    assert params[0].kwargs == dict(n=1, max_tokens=12, temperature=0.7, top_p=0.9, stop_token_ids=eos,
                                    stop=["</action>"], seed=11)
    assert out == [[7, eos[0]], [eos[0]]]  # cut after the end-of-turn token; never empty
    backend.generate([[5, 1]], max_new_tokens=3, temperature=0.0, top_p=0.5)
    greedy = backend.llm.calls[-1][2][0].kwargs
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and greedy["seed"] is None
    with pytest.raises(ValueError, match="seeds has 1 entries; expected one per prompt"):
        backend.generate([[5], [6]], 3, 1.0, seeds=[1])


def test_sleep_then_sync_pushes_hf_checkpoint_names_and_values(fake_vllm, policy):
    model, tok = policy
    backend = VLLMBackend(tiny_model_dir(), tok, policy=model, dtype="bfloat16")
    backend.sleep()
    assert backend.llm.calls == [("sleep", 1)]
    sent = backend.sync_weights(model)
    assert [c[0] for c in backend.llm.calls[1:]] == ["wake_up", "apply_model", "wake_up", "reset_prefix_cache"]
    assert backend.llm.calls[1] == ("wake_up", ["weights"]) and backend.llm.calls[3] == ("wake_up", ["kv_cache"])
    loaded = backend.llm.model.loaded
    with safe_open(str(Path(tiny_model_dir()) / "model.safetensors"), "pt") as f:
        checkpoint = set(f.keys())
    names = [n for n, _ in loaded]
    assert sent == len(names) == len(set(names)) and set(names) <= checkpoint
    assert checkpoint - set(names) <= {"lm_head.weight"}  # tied to the embedding: vLLM ties it back
    params = dict(model.named_parameters())
    for name, tensor in loaded:
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, params[name].detach().to(torch.bfloat16))
    # awake: a second push goes straight in; a generate after a level-1 sleep wakes everything
    backend.sync_weights(model)
    assert [c[0] for c in backend.llm.calls[5:]] == ["apply_model", "reset_prefix_cache"]
    backend.sleep()
    backend.generate([[5]], 2, 1.0)
    assert [c[0] for c in backend.llm.calls[7:]] == ["sleep", "wake_up", "generate"] and backend.llm.calls[8][1] is None


def test_level_two_sleep_repushes_before_generating(fake_vllm, policy):
    model, tok = policy
    backend = VLLMBackend(tiny_model_dir(), tok, policy=model, sleep_level=2)
    backend.sleep()
    backend.generate([[5]], 2, 1.0)  # weights were dropped: pushed again from the policy first
    assert [c[0] for c in backend.llm.calls] == ["sleep", "wake_up", "apply_model", "wake_up",
                                                 "reset_prefix_cache", "generate"]
    orphan = VLLMBackend(tiny_model_dir(), tok, sleep_level=2)
    orphan.sleep()
    with pytest.raises(RuntimeError, match="level 2"):
        orphan.generate([[5]], 2, 1.0)


def test_weight_names_lose_wrapper_segments():
    assert hf_weight_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert hf_weight_name("module.lm_head.weight") == "lm_head.weight"
    lin = torch.nn.Linear(2, 3)
    assert [n for n, _ in weight_stream(lin)] == ["weight", "bias"]
    assert all(t.dtype == torch.float16 for _, t in weight_stream(lin, torch.float16))
