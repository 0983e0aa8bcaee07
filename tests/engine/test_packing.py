"""Packing: alignment of targets and loss mask, position restarts, budgets, balance, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdar_engine.packing import Sample, describe, karmarkar_karp, pack


def _samples(lengths: list[tuple[int, int]]) -> list[Sample]:
    out, tok = [], 10
    for i, (p, r) in enumerate(lengths):
        prompt = list(range(tok, tok + p))
        response = list(range(tok + p, tok + p + r))
        tok += p + r
        out.append(Sample(prompt_ids=prompt, response_ids=response, advantage=float(i),
                          teacher_prompt_ids=[1, 2] + prompt))
    return out


lengths_st = st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=25)
# the longest sample: 2 teacher-prefix tokens + 30 prompt + 12 response = 44 tokens


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, max_tokens=st.integers(44, 200), row=st.sampled_from([None, 0, 8, 30, 64]),
       teacher=st.booleans())
def test_targets_mask_positions_align(lengths, max_tokens, row, teacher):
    samples = _samples(lengths)
    micro = pack(samples, max_tokens, use_teacher_prompt=teacher, row_tokens=row)
    seen = []
    for mb in micro:
        assert mb.num_tokens <= max_tokens
        ids, pos = mb.input_ids.reshape(-1), mb.position_ids.reshape(-1)
        assert mb.loss_mask.sum().item() == mb.num_response_tokens
        for k, i in enumerate(mb.sample_index):
            s, sl = samples[i], mb.response_slices[k]
            # the hidden state at position j predicts token j+1: targets are the response
            assert mb.targets[sl].tolist() == s.response_ids
            assert mb.loss_mask[sl].eq(1).all()
            # the input one position later is the target (same sample, same row)
            assert ids[sl.start + 1: sl.stop + 1].tolist() == s.response_ids
            ctx = s.context(teacher)
            start = sl.start - len(ctx) + 1
            assert ids[start: start + len(ctx)].tolist() == ctx
            assert pos[start: sl.stop + 1].tolist() == list(range(len(ctx) + len(s.response_ids)))
            assert mb.segment_ids[start: sl.stop + 1].eq(k).all()
        seen += mb.sample_index
        if row:
            longest = max(samples[i].length(teacher) for i in mb.sample_index)
            assert mb.input_ids.shape[1] <= max(row, longest)
    assert sorted(seen) == list(range(len(samples)))


def test_response_only_mask_and_advantage_broadcast():
    samples = _samples([(3, 2), (4, 1)])
    (mb,) = pack(samples, 100)
    assert mb.loss_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 0]
    assert mb.per_token(samples, "advantage").tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]


def test_karmarkar_karp_balances_better_than_round_robin():
    weights = [97, 90, 88, 60, 55, 41, 40, 33, 30, 12, 10, 7, 5]
    parts = karmarkar_karp(weights, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(weights)))
    loads = [sum(weights[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 5, loads
    rr = [sum(weights[i::3]) for i in range(3)]
    assert max(loads) - min(loads) < max(rr) - min(rr)


def test_forced_micro_batch_count_gives_empty_ones():
    samples = _samples([(5, 5)])
    micro = pack(samples, 100, num_micro_batches=3)
    assert len(micro) == 3
    assert [m.sample_index for m in micro] == [[0], [], []]
    assert micro[1].loss_mask.sum() == 0 and micro[1].input_ids.shape == (1, 1)


def test_rows_cap_stream_length():
    samples = _samples([(20, 5)] * 8)
    (mb,) = pack(samples, 1000, row_tokens=50)
    assert mb.input_ids.shape == (4, 50)
    info = describe([mb])
    assert info["rows"] == 4 and info["pad_frac"] == 0.0
    (mb,) = pack(_samples([(20, 5), (3, 2), (4, 1)]), 1000, row_tokens=0)  # one sample per row
    assert mb.input_ids.shape == (3, 25) and mb.sample_index == [0, 1, 2]
    assert mb.position_ids[1].tolist() == list(range(25))  # pads continue: no packed-mask needed


def test_errors_name_the_problem():
    # a sample over max_tokens trains alone with a warning: tests/engine/test_memory_levers.py
    with pytest.raises(ValueError, match="empty response_ids"):
        pack([Sample(prompt_ids=[1], response_ids=[])], 10)
    with pytest.raises(ValueError, match="teacher_prompt_ids is None"):
        pack([Sample(prompt_ids=[1], response_ids=[2])], 10, use_teacher_prompt=True)
    with pytest.raises(ValueError, match="row_tokens"):
        pack(_samples([(3, 3)]), 10, row_tokens=1)
    (mb,) = pack([Sample(prompt_ids=[1, 2], response_ids=[3, 4])], 10)
    with pytest.raises(ValueError, match="old_logp is None"):
        mb.per_token([Sample(prompt_ids=[1, 2], response_ids=[3, 4])], "old_logp")


def test_scatter_roundtrip():
    samples = _samples([(3, 4), (2, 2), (6, 3)])
    micro = pack(samples, 12, row_tokens=8)
    for mb in micro:
        values = torch.arange(mb.targets.shape[0], dtype=torch.float32)
        mb.scatter(values, samples, "old_logp")
        assert torch.equal(mb.per_token(samples, "old_logp"), values * mb.loss_mask)
