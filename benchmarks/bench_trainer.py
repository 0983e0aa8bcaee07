"""pytest-benchmark suite: one trainer step on the tiny model, packed vs padded.

    pytest benchmarks/bench_trainer.py --benchmark-disable   # smoke: 6 short samples, one step each
    pytest benchmarks/bench_trainer.py                        # timed

extra_info carries tokens/s (real prompt+response tokens) and the padding fraction of the
layout. Skips with the reason while sdar_engine.packing / sdar_engine.model are missing.
"""
from __future__ import annotations

import pytest
import torch

from sdar_benchmarks.trainer_cases import LAYOUTS, layout, make_samples, missing_piece, pad_fraction, tiny_model, train_step

_MISSING = missing_piece()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"trainer pieces missing: {_MISSING}")
VOCAB = 512


@pytest.fixture(scope="module")
def samples():
    return make_samples(6, VOCAB, prompt_len=(8, 48), response_len=(4, 24), seed=1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_trainer_step(benchmark, samples, name):
    from sdar_kernels import LossConfig

    model = tiny_model(hidden=64, layers=1, vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = LossConfig.preset("sdar", kl_coef=0.0)
    micro = layout(samples, name, max_tokens=256, per_batch=3, row_tokens=64)
    before = model.model.embed_tokens.weight.detach().clone()
    loss = benchmark.pedantic(train_step, args=(model, opt, micro, samples, cfg), rounds=1, iterations=1)
    real = sum(s.length() for s in samples)
    benchmark.extra_info.update(layout=name, real_tokens=real, pad_frac=pad_fraction(micro),
                                micro_batches=len(micro))
    assert torch.isfinite(torch.tensor(loss)), f"{name}: loss {loss}"
    assert not torch.equal(before, model.model.embed_tokens.weight.detach()), f"{name}: step changed nothing"
    assert sum(m.num_tokens for m in micro) == real, f"{name}: layout lost tokens"
    assert sum(int(m.loss_mask.sum()) for m in micro) == sum(len(s.response_ids) for s in samples)


def test_layouts_compute_the_same_loss(samples):
    """Same weights, same samples: the padded and packed layouts give the same loss."""
    from sdar_kernels import LossConfig

    cfg = LossConfig.preset("sdar", kl_coef=0.0)
    losses = {}
    for name in LAYOUTS:
        model = tiny_model(hidden=64, layers=1, vocab=VOCAB, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses[name] = train_step(model, opt, layout(samples, name, 256, 3, 64), samples, cfg)
    assert losses["padded"] == pytest.approx(losses["packed-stream"], rel=1e-4, abs=1e-5), losses
    assert losses["packed-rows"] == pytest.approx(losses["packed-stream"], rel=1e-4, abs=1e-5), losses


def test_padding_fraction_orders_layouts(samples):
    padded = pad_fraction(layout(samples, "padded", 256, 3, 64))
    stream = pad_fraction(layout(samples, "packed-stream", 256, 3, 64))
    assert stream == 0.0 and padded > 0.0, (padded, stream)
