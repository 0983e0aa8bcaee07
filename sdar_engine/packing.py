"""Packing samples into token-budget micro-batches of flat streams (no padding per sample).

A sample is prompt + response. Its tokens are laid end to end in a row, positions restart at
0 for every sample, and the target of position j is token j+1 of the same sample, so the
hidden state at position j predicts token j+1 and the loss mask is 1 exactly where the target
is a response token the policy sampled (a trajectory sample's "response" is everything after
its first prompt; its ``response_mask`` zeroes the observation turns in it). Samples are
partitioned over micro-batches with Karmarkar-Karp (largest differencing) on token counts;
inside a micro-batch they fill rows of at most ``row_tokens`` tokens first-fit-decreasing (on
CPU, sdpa pays for a row squared, so several short rows beat one long stream; with flash-attn
varlen one row per micro-batch is best: ``row_tokens=None``).
"""
from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("sdar_engine.packing")
PER_TOKEN_FIELDS = ("old_logp", "teacher_logp", "ref_logp", "entropy")


@dataclass
class Sample:
    """One environment step (prompt the policy read + the response it sampled), or one whole
    episode (``algo.sample_mode: trajectory``): first prompt + response 1 + observation turn 2 +
    response 2 + ... as one conversation, ``response_ids`` holding everything after the first
    prompt and ``response_mask`` [len(response_ids)] 1 on the policy's tokens, 0 on observations.

    Per-token tensors (old_logp, teacher_logp, ref_logp, entropy) are [len(response_ids)]
    float32 on CPU once ``logprobs.score_samples`` filled them (0 where the mask is 0).
    ``response_mask`` None means every response token is the policy's. ``meta`` is free-form.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    teacher_prompt_ids: Optional[list[int]] = None
    group: int = 0
    episode: int = 0
    step: int = 0
    old_logp: Optional[Tensor] = None
    teacher_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)
    response_mask: Optional[list[int]] = None

    @property
    def num_loss_tokens(self) -> int:
        """Response tokens the loss reads (the policy's; observation tokens excluded)."""
        return len(self.response_ids) if self.response_mask is None else int(sum(self.response_mask))

    def context(self, use_teacher_prompt: bool) -> list[int]:
        """The prompt the stream starts with (teacher prompt when asked)."""
        if not use_teacher_prompt:
            return self.prompt_ids
        if self.teacher_prompt_ids is None:
            raise ValueError(f"Sample(group={self.group}, episode={self.episode}, step={self.step})."
                             "teacher_prompt_ids is None; the teacher pass needs it set")
        return self.teacher_prompt_ids

    def length(self, use_teacher_prompt: bool = False) -> int:
        return len(self.context(use_teacher_prompt)) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Packed rows: input_ids / position_ids [R, L]; targets, loss_mask (float), segment_ids [N=R*L].

    ``sample_index[k]`` is the position in the packed list of the k-th sample here;
    ``response_slices[k]`` selects its response tokens in the flat [N] stream (positions
    whose targets are its response tokens). ``num_tokens`` counts real (non-pad) tokens.
    """

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    segment_ids: Tensor
    sample_index: list[int]
    response_slices: list[slice]
    num_tokens: int

    @property
    def num_response_tokens(self) -> int:
        return sum(s.stop - s.start for s in self.response_slices)

    def to(self, device: torch.device | str) -> "MicroBatch":
        """A copy with every tensor on ``device``."""
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
                 for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    def per_token(self, samples: Sequence[Sample], name: str, dtype=torch.float32) -> Tensor:
        """A [N] tensor holding ``samples[i].<name>`` on response positions, 0 elsewhere.

        ``name`` is a per-token field (old_logp, ...) or "advantage" (broadcast per sample).
        """
        out = torch.zeros(self.targets.shape[0], dtype=dtype)
        for k, i in enumerate(self.sample_index):
            sl, s = self.response_slices[k], samples[i]
            if name == "advantage":
                out[sl] = float(s.advantage)
                continue
            value = getattr(s, name)
            if value is None:
                raise ValueError(f"samples[{i}].{name} is None; fill it with logprobs.score_samples first")
            value = torch.as_tensor(value, dtype=dtype).reshape(-1)
            if value.numel() != sl.stop - sl.start:
                raise ValueError(f"samples[{i}].{name} has {value.numel()} values; its response has "
                                 f"{sl.stop - sl.start} tokens")
            out[sl] = value
        return out

    def scatter(self, values: Tensor, samples: Sequence[Sample], name: str) -> None:
        """Store ``values[response_slices[k]]`` ([N] tensor) as ``samples[i].<name>`` (CPU fp32)."""
        if name not in PER_TOKEN_FIELDS:
            raise ValueError(f"name={name!r} is invalid; valid per-token fields: {', '.join(PER_TOKEN_FIELDS)}")
        flat = values.detach().float().cpu()
        for k, i in enumerate(self.sample_index):
            setattr(samples[i], name, flat[self.response_slices[k]].clone())


def _check_sample(i: int, s: Sample, use_teacher_prompt: bool) -> None:
    if len(s.context(use_teacher_prompt)) < 1:
        raise ValueError(f"samples[{i}] has an empty prompt; a response token needs a token before it")
    if len(s.response_ids) < 1:
        raise ValueError(f"samples[{i}] has an empty response_ids; drop it before packing")
    if s.response_mask is not None:
        if len(s.response_mask) != len(s.response_ids):
            raise ValueError(f"samples[{i}].response_mask has {len(s.response_mask)} entries; its "
                             f"response_ids has {len(s.response_ids)} (one 0/1 flag per token)")
        if any(m not in (0, 1) for m in s.response_mask):
            raise ValueError(f"samples[{i}].response_mask holds values other than 0 and 1")


def karmarkar_karp(weights: Sequence[int], k: int) -> list[list[int]]:
    """Partition item indices into ``k`` sets of balanced weight (largest differencing method).

    Each heap entry is a k-tuple of partial sets sorted by weight; the two entries with the
    largest spread are merged heaviest-with-lightest until one remains. Sets may be empty.
    """
    if k < 1:
        raise ValueError(f"k={k!r} is invalid; expected an integer >= 1")
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for idx, w in enumerate(weights):
        sets = [(w, [idx])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-w, idx, sets))  # spread of a fresh entry is w
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, tie, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(wa + wb, ia + ib) for (wa, ia), (wb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda t: t[0], reverse=True)
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
    return [sorted(ids) for _, ids in heap[0][2]]


def _rows(lengths: dict[int, int], row_tokens: Optional[int]) -> list[list[int]]:
    """First-fit-decreasing of sample indices into rows of at most max(row_tokens, longest);
    row_tokens 0: one sample per row (a plain padded batch), None: one row for all."""
    if row_tokens is None:
        return [sorted(lengths)]
    if row_tokens == 0:
        return [[i] for i in sorted(lengths, key=lambda j: (-lengths[j], j))]
    cap = max([row_tokens] + list(lengths.values()))
    rows: list[tuple[int, list[int]]] = []
    for i in sorted(lengths, key=lambda j: (-lengths[j], j)):
        for r, (used, members) in enumerate(rows):
            if used + lengths[i] <= cap:
                rows[r] = (used + lengths[i], members + [i])
                break
        else:
            rows.append((lengths[i], [i]))
    return [sorted(members) for _, members in rows]


def _build(samples: Sequence[Sample], index: list[int], use_teacher_prompt: bool,
           row_tokens: Optional[int], pad_id: int) -> MicroBatch:
    """Lay out one micro-batch; pad tokens continue the last sample's positions (causal: unseen)."""
    if not index:  # an empty micro-batch keeps ranks in lock-step; it carries no loss
        one = torch.full((1, 1), pad_id, dtype=torch.long)
        z = torch.zeros(1, dtype=torch.long)
        return MicroBatch(one, torch.zeros_like(one), z, z.float(), z, [], [], 0)
    lengths = {i: samples[i].length(use_teacher_prompt) for i in index}
    rows = _rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.zeros(len(rows) * width, dtype=torch.long)
    seg = torch.zeros(len(rows) * width, dtype=torch.long)
    order, slices, masks = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            s = samples[i]
            stream = s.context(use_teacher_prompt) + s.response_ids
            n, p = len(stream), len(stream) - len(s.response_ids)
            ids[r, col:col + n] = torch.tensor(stream, dtype=torch.long)
            pos[r, col:col + n] = torch.arange(n)
            flat = r * width + col
            targets[flat:flat + n - 1] = torch.tensor(stream[1:], dtype=torch.long)
            seg[flat:flat + n] = len(order)
            slices.append(slice(flat + p - 1, flat + n - 1))
            masks.append(s.response_mask)
            order.append(i)
            col += n
        if col < width:
            pos[r, col:] = torch.arange(pos[r, col - 1] + 1, pos[r, col - 1] + 1 + width - col)
    mask = torch.zeros(len(rows) * width)
    for sl, m in zip(slices, masks):
        mask[sl] = 1.0 if m is None else torch.tensor(m, dtype=mask.dtype)
    return MicroBatch(ids, pos, targets, mask, seg, order, slices, sum(lengths.values()))


def pack(samples: Sequence[Sample], max_tokens: int, use_teacher_prompt: bool = False,
         row_tokens: Optional[int] = None, num_micro_batches: Optional[int] = None,
         pad_id: int = 0, budget_key: str = "algo.max_tokens") -> list[MicroBatch]:
    """Partition ``samples`` into micro-batches of at most ``max_tokens`` real tokens each.

    ``use_teacher_prompt`` packs teacher_prompt_ids + response instead of prompt + response.
    ``num_micro_batches`` forces at least that many (data-parallel ranks must agree; extra
    ones may be empty). A sample longer than ``max_tokens`` (it cannot be split) trains alone in
    its own micro-batch, and a warning naming ``budget_key`` and its length says so: no
    micro-batch of two or more samples ever exceeds the budget.
    """
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 2")
    if row_tokens is not None and (not isinstance(row_tokens, int) or row_tokens < 0 or row_tokens == 1):
        raise ValueError(f"row_tokens={row_tokens!r} is invalid; expected None (one stream), 0 (one "
                         "sample per row) or an integer >= 2 (row length cap)")
    for i, s in enumerate(samples):
        _check_sample(i, s, use_teacher_prompt)
    lengths = [s.length(use_teacher_prompt) for s in samples]
    over = [i for i, n in enumerate(lengths) if n > max_tokens]
    if over:
        log.warning("%s=%d: %d sample(s) longer than the micro-batch budget (samples[%d] has %d tokens); "
                    "each trains alone in its own over-budget micro-batch", budget_key, max_tokens, len(over),
                    max(over, key=lengths.__getitem__), max(lengths[i] for i in over))
    fit = [i for i, n in enumerate(lengths) if n <= max_tokens]
    fit_len = [lengths[i] for i in fit]
    k = max(1 if fit or not over else 0, math.ceil(sum(fit_len) / max_tokens), (num_micro_batches or 1) - len(over))
    while k:
        parts = [[fit[j] for j in part] for part in karmarkar_karp(fit_len, k)]
        if all(sum(lengths[i] for i in part) <= max_tokens for part in parts):
            break
        k += 1
    parts = (parts if k else []) + [[i] for i in over]
    parts.sort(key=lambda part: (part[0] if part else len(samples)))  # deterministic, empties last
    return [_build(samples, part, use_teacher_prompt, row_tokens, pad_id) for part in parts]


def pack_like(samples: Sequence[Sample], mb: MicroBatch, use_teacher_prompt: bool,
              row_tokens: Optional[int] = None, pad_id: int = 0) -> MicroBatch:
    """A micro-batch of the same samples as ``mb`` (e.g. their teacher streams). Rows may be
    laid out differently: match samples through ``sample_index``, not positions."""
    return _build(samples, list(mb.sample_index), use_teacher_prompt, row_tokens, pad_id)


def describe(micro: Sequence[MicroBatch]) -> dict[str, Any]:
    """Shape summary for logs: micro-batches, rows, real (prompt+response) and padded tokens."""
    padded = sum(int(m.input_ids.numel()) for m in micro)
    real = sum(m.num_tokens for m in micro)
    return {"micro_batches": len(micro), "rows": sum(int(m.input_ids.shape[0]) for m in micro),
            "stream_tokens": real, "padded_tokens": padded, "pad_frac": 1 - real / max(padded, 1)}
