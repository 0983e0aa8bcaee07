"""Models: tiny preset round trip, loading errors, packed == padded log-probs."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_model_support import build_and_load, corpus, random_samples, one_thread  # noqa: E402,F401

from sdar_engine.logprobs import score_samples  # noqa: E402
from sdar_engine.model import (ModelConfig, check_model_dir, load_policy, lm_head,  # noqa: E402
                               resolve_attn, trunk_hidden)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_and_load(str(tmp_path_factory.mktemp("tiny")))


def test_tiny_dir_reloads_with_from_pretrained(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, path = tiny
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    again = AutoModelForCausalLM.from_pretrained(path)
    tok2 = AutoTokenizer.from_pretrained(path)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert again.config.model_type == "qwen2" and again.config.tie_word_embeddings
    assert tok2.eos_token == "<|im_end|>" and tok2.pad_token == "<|pad|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"):
        assert len(tok2(special, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_and_word_level_tokens(tiny):
    _, tok, _ = tiny
    text = tok.apply_chat_template([{"role": "user", "content": "go to cabinet 3"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\ngo to cabinet 3<|im_end|>\n<|im_start|>assistant\n"
    # environment words are single tokens (with their leading space)
    for word in (" cabinet", " countertop", " spraybottle", " microwave"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    weird = "Ünïcödé ✓ 漢字 {json: [1, 2]}"
    assert tok.decode(tok(weird, add_special_tokens=False)["input_ids"]) == weird


def test_missing_model_dir_names_path_and_files(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        load_policy(ModelConfig(path=missing))
    assert missing in str(err.value) and "config.json" in str(err.value)
    assert "model.safetensors" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        check_model_dir(str(tmp_path))


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="ModelConfig.attn='flashy'.*auto, flash, sdpa, eager"):
        ModelConfig(attn="flashy")
    with pytest.raises(ValueError, match="ModelConfig.dtype"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match="tiny_hidden"):
        ModelConfig(tiny_hidden=30, tiny_heads=4)
    assert resolve_attn("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="flash"):
        resolve_attn("flash", "cpu")


def test_transformers_detects_packing_from_position_ids():
    from transformers.masking_utils import find_packed_sequence_indices

    seg = find_packed_sequence_indices(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert seg is not None and seg.tolist() == [[0, 0, 0, 1, 1, 2]]


def _per_sample_logprobs(model, s, teacher=False):
    """Reference: one sample alone, full logits, log_softmax, the response tokens."""
    ctx = s.teacher_prompt_ids if teacher else s.prompt_ids
    ids = torch.tensor([ctx + s.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
    return logp[len(ctx) - 1:].float()


@pytest.mark.parametrize("row_tokens", [None, 64])
def test_packed_logprobs_equal_padded(tiny, row_tokens):
    """transformers builds the per-sample causal mask from the position resets (no mask passed)."""
    model, _, _ = tiny
    samples = random_samples(12, model.config.vocab_size, seed=1)
    score_samples(model, samples, max_tokens=160, which="old", temperature=1.0, row_tokens=row_tokens)
    score_samples(model, samples, max_tokens=160, which="teacher", temperature=1.0, row_tokens=row_tokens)
    for s in samples:
        torch.testing.assert_close(s.old_logp, _per_sample_logprobs(model, s), atol=1e-5, rtol=0)
        torch.testing.assert_close(s.teacher_logp, _per_sample_logprobs(model, s, True), atol=1e-5, rtol=0)


def test_trunk_and_head_give_the_logits(tiny):
    model, _, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hidden = trunk_hidden(model, ids, torch.arange(4)[None])
        weight, bias = lm_head(model)
        ref = model(input_ids=ids, use_cache=False).logits[0]
    assert hidden.shape == (4, model.config.hidden_size) and bias is None
    torch.testing.assert_close(hidden @ weight.T, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows, length"):
        trunk_hidden(model, ids[0], torch.arange(4))


def test_corpus_helper_has_env_words():
    assert any("countertop" in line for line in corpus(20))


def test_copies_score_with_their_own_weights(tiny):
    import copy

    from sdar_engine.model import head_forward

    model, _, _ = tiny
    ids, pos = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.norm.weight.mul_(2.0)
        a = head_forward(model, ids, pos, lambda h, w, b: h)
        b = head_forward(ref, ids, pos, lambda h, w, b: h)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_architectures_load_and_pack(tiny, arch, tmp_path):
    """Llama and Qwen3 dirs load through load_policy and score packed == per sample."""
    import transformers

    _, tok, _ = tiny
    kind = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[arch]
    config = getattr(transformers, kind[0])(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=128, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    getattr(transformers, kind[1])(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_policy(ModelConfig(path=str(tmp_path)), "cpu")
    assert model.config.model_type == arch and lm_head(model)[0] is not model.get_input_embeddings().weight
    samples = random_samples(6, len(tok), seed=2)
    score_samples(model, samples, max_tokens=120, which="old", temperature=1.0)
    for s in samples:
        torch.testing.assert_close(s.old_logp, _per_sample_logprobs(model, s), atol=1e-5, rtol=0)
