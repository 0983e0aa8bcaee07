"""No-grad scoring passes: old, teacher and reference log-probs of the sampled response tokens.

Each pass packs the samples (the teacher pass packs teacher_prompt_ids + the same response),
runs the trunk and the fused log-prob kernel (hidden states in, one number per token out) and
stores per-sample [len(response)] tensors on the samples. The kernel reads the packed loss mask:
tokens with mask 0 (a trajectory sample's observation turns) cost no FLOPs and store 0.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from .distributed import all_reduce_max
from .model import head_forward
from .packing import MicroBatch, Sample, pack

log = logging.getLogger("sdar_engine.logprobs")

WHICH = {"old": "old_logp", "teacher": "teacher_logp", "ref": "ref_logp"}


def default_row_tokens(model: Any) -> Optional[int]:
    """Row length for packing: one stream per micro-batch with flash-attn varlen (it skips
    cross-sample blocks), else rows of 256 tokens (a longer sample gets its own row).

    sdpa on a packed row builds a block-diagonal mask and pays for the row squared. Measured
    fwd+bwd on the shared 2-core CPU (1 thread, h64-h256 Qwen2, ~8.5k tokens, 100-300-token
    samples): 256-token rows ran 10-40% faster than one padded row per sample; with
    60-140-token samples, rows of 256 / 512 / 1024 / one 8k stream gave about 10.2k / 7.5k /
    5.0k / 0.5k tok/s (h64)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return None if impl == "flash_attention_2" else 256


def model_device(model: Any) -> torch.device:
    """Where the model computes (``model.compute_device``: its GPU even with host-offloaded shards)."""
    from .model import compute_device

    return compute_device(model)


def pack_for_ranks(model: Any, samples: Sequence[Sample], max_tokens: int, use_teacher_prompt: bool,
                   row_tokens: Optional[int]) -> list[MicroBatch]:
    """pack() with the micro-batch count agreed (max) across data-parallel ranks."""
    rows = default_row_tokens(model) if row_tokens is None else row_tokens
    micro = pack(samples, max_tokens, use_teacher_prompt=use_teacher_prompt, row_tokens=rows)
    agreed = all_reduce_max(len(micro))
    if agreed != len(micro):
        micro = pack(samples, max_tokens, use_teacher_prompt=use_teacher_prompt, row_tokens=rows,
                     num_micro_batches=agreed)
    return micro


@torch.no_grad()
def score_samples(model: Any, samples: Sequence[Sample], max_tokens: int, which: str,
                  temperature: float, with_entropy: bool = False,
                  row_tokens: Optional[int] = None) -> None:
    """Fill ``sample.old_logp`` / ``teacher_logp`` / ``ref_logp`` ([len(response)] fp32, CPU).

    which: "old" (prompt, the rollout policy), "teacher" (teacher_prompt_ids + the same
    response; pass the rollout-time policy) or "ref" (prompt, the reference model).
    ``with_entropy`` also stores ``sample.entropy`` (nats) from this pass.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r} is invalid; valid choices: {', '.join(WHICH)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid; expected a number > 0")
    from sdar_kernels import fused_linear_logprobs

    was_training = model.training
    model.eval()
    device = model_device(model)
    micro = pack_for_ranks(model, samples, max_tokens, which == "teacher", row_tokens)
    for mb in micro:
        mb_dev = mb.to(device)

        def head(hidden, weight, bias, mb_dev=mb_dev):
            logp, ent = fused_linear_logprobs(hidden, weight, mb_dev.targets, temperature=temperature,
                                              with_entropy=with_entropy, bias=bias, mask=mb_dev.loss_mask)
            return (logp, ent) if with_entropy else (logp,)

        out = head_forward(model, mb_dev.input_ids, mb_dev.position_ids, head)
        mb.scatter(out[0], samples, WHICH[which])
        if with_entropy:
            mb.scatter(out[1], samples, "entropy")
    model.train(was_training)
