"""Shared pieces of the TRL adapter tests: a local word-level tokenizer (no hub), a tiny random
Llama, trainers built on them, and a prepared inputs dict shaped like the one TRL's
_generate_and_score_completions returns."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

WORDS = [f"w{i}" for i in range(92)]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}  # V = 96
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, hidden: int = 24):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # a visible lm_head scale so that log-probs are not all ~ -log V
        model.lm_head.weight.mul_(8.0)
    return model


def grpo_args(output_dir: str, **overrides: Any):
    from trl import GRPOConfig

    base = dict(output_dir=output_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", beta=0.0,
                temperature=0.7, seed=0, max_grad_norm=0.0, disable_tqdm=True)
    base.update(overrides)
    return GRPOConfig(**base)


def length_reward(completions, **kwargs):
    """Toy reward: more distinct words is better (varies across a group, so advantages are not 0)."""
    return [float(len(set(c.split()))) for c in completions]


def prompt_dataset(n: int = 8, teacher: bool = False):
    from datasets import Dataset

    prompts = [" ".join(f"w{(3 * i + j) % 90 + 1}" for j in range(2 + i % 3)) for i in range(n)]
    cols = {"prompt": prompts}
    if teacher:
        cols["teacher_prompt"] = [f"w91 w90 {p}" for p in prompts]  # the privileged prefix
    return Dataset.from_dict(cols)


def make_trainer(cls, model, tmp_path, train_dataset=None, **kwargs: Any):
    args = grpo_args(str(tmp_path), **kwargs.pop("args", {}))
    return cls(model=model, reward_funcs=length_reward, args=args, processing_class=tokenizer(),
               train_dataset=train_dataset if train_dataset is not None else prompt_dataset(), **kwargs)


def loss_inputs(trainer, seed: int, b: int = 5, p: int = 4, c: int = 6, old: bool = True, ref: bool = True,
                is_ratio: bool = False, tool_mask: bool = False,
                scale: float = 0.5) -> dict[str, Optional[torch.Tensor]]:
    """A prepared micro-batch: left-padded prompts, right-padded completions (row 1 fully masked),
    old / ref log-probs = the model's own + noise (so both clip sides fire)."""
    g = torch.Generator().manual_seed(seed)
    v = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, v, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(4, v, (b, c), generator=g)
    lengths = torch.tensor([c, 0, 3, c - 1, 2][:b] + [c] * max(0, b - 5))
    completion_mask = (torch.arange(c)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    inputs: dict[str, Any] = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        # both signs present, so both clip sides can fire
        "advantages": torch.randn(b, generator=g, dtype=torch.float64).abs() * (1 - 2 * (torch.arange(b) % 2)),
        "num_items_in_batch": completion_mask.sum() * 2,
    }
    if tool_mask:
        tm = torch.ones(b, c, dtype=torch.long)
        tm[0, 1] = 0
        tm[3, 2:4] = 0
        inputs["tool_mask"] = tm
    with torch.no_grad():
        truth, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            c)
    noise = lambda: scale * torch.randn(b, c, generator=g, dtype=truth.dtype)  # noqa: E731
    if old:
        inputs["old_per_token_logps"] = truth + noise()
    if ref:
        inputs["ref_per_token_logps"] = truth + noise()
    if is_ratio:
        inputs["importance_sampling_ratio"] = (0.5 + torch.rand(b, c, generator=g, dtype=truth.dtype))
    return inputs


def clone_model(model):
    return copy.deepcopy(model)


def use_float64_logprobs(trainer) -> None:
    """Give a TRL trainer instance a log-prob pass in the model's own dtype (materialized logits).

    TRL 1.16's fused lm_head (trl/kernels/chunked_logprob.py) keeps its statistics in fp32 even
    for fp64 inputs, i.e. ~1e-7 relative per log-prob: too coarse for a 1e-6 comparison of the
    loss algebra. Everything else in _compute_loss stays TRL's."""

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                            compute_entropy=False, compute_aux_loss=False, **unused):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, -logits_to_keep - 1:-1] / trainer.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, -logits_to_keep:]
        keep = attention_mask[:, -logits_to_keep:] != 0
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~keep, 0.0)
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~keep, 0.0) if compute_entropy else None
        return logp, entropy, None

    trainer._get_per_token_logps_and_entropies = logps_and_entropies
