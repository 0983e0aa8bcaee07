"""Shared helpers for the engine-core tests (no tests here): a synthetic ALFWorld-like corpus,
a tiny model built from it, and random step samples."""
from __future__ import annotations

import random
from typing import Optional

import pytest
import torch

from sdar_engine.model import ModelConfig, build_tiny, load_policy
from sdar_engine.packing import Sample

OBJECTS = "mug apple cd book plate tomato spraybottle pencil key watch".split()
RECEPTACLES = "cabinet countertop fridge microwave sinkbasin toilet desk safe drawer shelf".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while a module runs (restored after): the 2 shared cores are
    oversubscribed by parallel test runs, where two spinning OpenMP threads made a tiny
    forward ~20x slower (measured 2.3 s vs 0.12 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Environment-like lines: observations, tasks and <think>/<action> responses."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        o, r = rng.choice(OBJECTS), rng.choice(RECEPTACLES)
        k = rng.randint(1, 6)
        lines.append(f"You arrive at {r} {k}. On the {r} {k}, you see a {o} {rng.randint(1, 3)}. "
                     f"Your task is to: put some {o} on {r}.")
        lines.append(f"<think>I need the {o}; go to {r} {k}.</think><action>go to {r} {k}</action>")
    return lines


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(tiny_hidden=64, tiny_layers=2, tiny_heads=4, tiny_kv_heads=2, tiny_vocab=512)
    base.update(overrides)
    return ModelConfig(**base)


def build_and_load(tmp_dir: str, seed: int = 0, **overrides):
    """(model, tokenizer, model_dir) of a freshly built tiny model."""
    cfg = tiny_cfg(**overrides)
    path = build_tiny(tmp_dir, corpus(), cfg, seed=seed)
    cfg.path = path
    model, tok = load_policy(cfg, "cpu")
    return model, tok, path


def random_samples(n: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (5, 40),
                   response: tuple[int, int] = (2, 20), teacher: bool = True,
                   scored: Optional[float] = None) -> list[Sample]:
    """Step samples with random ids; optional teacher prompts; old/teacher log-probs set to
    ``scored`` + noise when given (else left for score_samples)."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, vocab, (rnd.randint(*prompt),), generator=g).tolist()
        r = torch.randint(4, vocab, (rnd.randint(*response),), generator=g).tolist()
        s = Sample(prompt_ids=p, response_ids=r, advantage=rnd.uniform(-1, 1), group=i % 3,
                   episode=i, step=i % 4)
        if teacher:
            s.teacher_prompt_ids = torch.randint(4, vocab, (rnd.randint(3, 10),), generator=g).tolist() + p
        if scored is not None:
            s.old_logp = scored + 0.1 * torch.randn(len(r), generator=g)
            s.teacher_logp = scored + 0.5 * torch.randn(len(r), generator=g)
        out.append(s)
    return out
