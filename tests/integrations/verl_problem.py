"""A float64 verl micro-batch (B sequences, padded response length T) and both sides of the comparison.

The peer side is verl's own code: ``verl.workers.utils.losses.ppo_loss`` (the actor loss, which
combines ``get_policy_loss_fn(loss_mode)`` + ``agg_loss`` + ``kl_penalty`` + the entropy term),
fed a micro-batch in verl's layout (prompts, responses, attention mask; model log-probs over the
whole packed sequence, sliced by verl's ``no_padding_2_padding``). The log-probs it reads come
from a plain log_softmax of the same hidden states, so dL/dh and dL/dW compare directly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from tensordict import TensorDict

from sdar_kernels import LossConfig, fused_linear_sdar_loss
from verl.utils import tensordict_utils as tu

PROMPT = 2  # prompt tokens per sequence (verl's slicing assumes at least one)


@dataclass
class VerlProblem:
    hidden: torch.Tensor        # [B, T, H]
    weight: torch.Tensor        # [V, H]
    targets: torch.Tensor       # [B, T] sampled response tokens
    lengths: torch.Tensor       # [B] response lengths (positions >= length are padding)
    mask: torch.Tensor          # [B, T] response mask (zeros inside a response too)
    advantages: torch.Tensor    # [B, T]
    old: torch.Tensor
    ref: torch.Tensor
    teacher: torch.Tensor
    is_weights: torch.Tensor    # [B, T] rollout_is_weights (truncated at 2, some masked to 0)
    temperature: float


def make_problem(seed: int, lengths=(7, 12, 5, 10, 3), H: int = 31, V: int = 123,
                 temperature: float = 0.7, empty_row: bool = True) -> VerlProblem:
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    f64 = dict(dtype=torch.float64, generator=g)
    hidden = torch.randn(B, T, H, **f64)
    weight = torch.randn(V, H, **f64) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths_t = torch.tensor(lengths)
    inside = torch.arange(T)[None, :] < lengths_t[:, None]
    mask = inside & (torch.rand(B, T, generator=g) > 0.2)
    if empty_row:
        mask[-1] = False  # a fully masked sequence: verl and sdar_kernels both leave it out of B
    truth = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(-1, targets[..., None])[..., 0]
    noise = lambda scale: scale * torch.randn(B, T, **f64)  # noqa: E731
    adv = torch.randn(B, 1, **f64).expand(B, T).clone()
    adv[0] = adv[0].abs() + 0.5   # one sequence with A > 0, one with A < 0 so both clip sides fire
    adv[1] = -adv[1].abs() - 0.5
    is_w = torch.clamp(torch.exp(noise(0.5)), max=2.0) * (torch.rand(B, T, generator=g) > 0.1)
    old = truth + noise(0.4)
    old[1, ::3] -= 1.5  # ratios > 3 where A < 0: the dual clip fires
    return VerlProblem(hidden=hidden, weight=weight, targets=targets, lengths=lengths_t, mask=mask,
                       advantages=adv * inside, old=old, ref=truth + noise(0.3),
                       teacher=truth + noise(0.8), is_weights=is_w, temperature=temperature)


def leaves(p: VerlProblem) -> tuple[torch.Tensor, torch.Tensor]:
    return p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)


def plain_logprobs(hidden: torch.Tensor, weight: torch.Tensor, p: VerlProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] log p(target) and entropy from materialized logits (what verl's unfused path computes)."""
    logits = hidden @ weight.T / p.temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, p.targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def full_layout(x: torch.Tensor, p: VerlProblem) -> torch.Tensor:
    """[B, T] response-aligned values -> verl's packed model-output layout [sum(PROMPT + len)]:
    the value predicting response token j sits at prompt position PROMPT - 1 + j."""
    parts = []
    for b, n in enumerate(p.lengths.tolist()):
        parts += [x.new_zeros(PROMPT - 1), x[b, :n], x.new_zeros(1)]
    return torch.cat(parts)


def verl_batch(p: VerlProblem, dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
               with_ref: bool = False, with_is: bool = False, teacher_keys: tuple = ()) -> TensorDict:
    """The micro-batch TensorDict verl's actor loss reads (padded prompts/responses form)."""
    B, T = p.targets.shape
    resp_attn = (torch.arange(T)[None, :] < p.lengths[:, None]).long()
    fields = {"prompts": torch.ones(B, PROMPT, dtype=torch.long), "responses": p.targets,
              "attention_mask": torch.cat([torch.ones(B, PROMPT, dtype=torch.long), resp_attn], 1),
              "response_mask": p.mask.long(), "old_log_probs": p.old, "advantages": p.advantages}
    if with_ref:
        fields["ref_log_prob"] = p.ref
    if with_is:
        fields["rollout_is_weights"] = p.is_weights
    if "teacher_log_probs" in teacher_keys:
        fields["teacher_log_probs"] = p.teacher
    if "teacher_logprobs" in teacher_keys:  # verl's distillation layout: nested [B, j, 1] over whole sequences
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(p.lengths + PROMPT, 0)])
        fields["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(full_layout(p.teacher, p)[:, None],
                                                                            offsets)
    data = TensorDict(fields, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                         global_batch_size=global_batch_size)
    return data


def ours(p: VerlProblem, cfg: LossConfig, normalizer: Optional[float], importance: bool = False,
         teacher: bool = False, ref: bool = False, backend: str = "torch", batched: bool = False):
    """fused_linear_sdar_loss on the flattened [B*T] stream (segment ids = sequence index), or on
    [B, T, H] / [B, T] inputs as they are (batched); returns (loss, dL/dh [B, T, H], dL/dW)."""
    h, w = leaves(p)
    if backend == "triton":  # the Triton kernels take 32/16-bit inputs (float64 runs the torch row ops)
        h, w = (x.detach().float().requires_grad_(True) for x in (h, w))
    B, T, H = h.shape
    cfg = cfg.replace(backend=backend, temperature=p.temperature)
    if batched:
        out = fused_linear_sdar_loss(
            h, w, p.targets, p.advantages, p.old, p.mask.double(), teacher_logprobs=p.teacher if teacher else None,
            ref_logprobs=p.ref if ref else None, normalizer=normalizer, config=cfg,
            importance_weights=p.is_weights if importance else None)
        out.loss.backward()
        return out.loss.detach().double(), h.grad.double(), w.grad.double()
    kwargs = {}
    if importance:
        kwargs["importance_weights"] = p.is_weights.reshape(-1)
    out = fused_linear_sdar_loss(
        h.reshape(B * T, H), w, p.targets.reshape(-1), p.advantages.reshape(-1), p.old.reshape(-1),
        p.mask.reshape(-1).double(), teacher_logprobs=p.teacher.reshape(-1) if teacher else None,
        ref_logprobs=p.ref.reshape(-1) if ref else None, segment_ids=torch.arange(B).repeat_interleave(T),
        normalizer=normalizer, config=cfg, **kwargs)
    out.loss.backward()
    return out.loss.detach().double(), h.grad.double(), w.grad.double()


def fp32_rounded(p: VerlProblem) -> VerlProblem:
    """The problem with hidden states and weight rounded to float32 (kept float64): what a float32
    kernel reads, so the float64 peer and the float32 kernel see the same numbers."""
    return dataclasses.replace(p, hidden=p.hidden.float().double(), weight=p.weight.float().double())


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol} ({got.flatten()[:3]} vs {want.flatten()[:3]})"
