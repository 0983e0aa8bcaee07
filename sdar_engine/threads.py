"""CPU intra-op threads for small work.

Token-by-token generation runs many tiny ops (a few rows x a few hundred columns). Splitting
each over several OpenMP threads buys nothing on them, and on a machine whose cores are busy
with other processes every op waits for descheduled threads: on this project's 2-core box,
loaded by other jobs, one tiny-model generate call of 8 prompts x 32 tokens took 20.6 s with 2
threads and 2.2 s with 1, with bitwise-equal tokens and logits (the tokens are checked by
tests/engine/test_step_timing.py). Gradients are another matter: they sum over tokens, and the
threads split those sums differently, so the update keeps torch's thread count.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

GENERATION_THREADS = 1  # intra-op threads while generating on the CPU; 0 = leave torch's setting


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (restored after); ``n <= 0`` changes nothing.

    Only CPU ops use these threads: CUDA work is unaffected."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
