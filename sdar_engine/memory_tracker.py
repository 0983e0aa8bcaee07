"""Allocation tracker: a TorchDispatchMode that records the largest tensor any op creates.

Used to prove that a training step never materializes [N, V] logits: run the step inside
``LargestTensorTracker()`` and compare ``largest`` against N * V / 8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Allocation:
    """One op output: number of elements, shape, and the aten op that created it."""

    numel: int = 0
    shape: tuple = ()
    op: str = ""


@dataclass
class LargestTensorTracker(TorchDispatchMode):
    """Context manager; after exit, ``largest`` is the biggest op output seen (by element count)
    and ``top`` the ``keep`` biggest distinct (op, shape) pairs, largest first."""

    keep: int = 5
    largest: Allocation = field(default_factory=Allocation)
    top: list = field(default_factory=list)
    ops: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self._floor():
                self._record(Allocation(t.numel(), tuple(t.shape), str(func)))
        return out

    def _floor(self) -> int:
        return self.top[-1].numel if len(self.top) >= self.keep else -1

    def _record(self, a: Allocation) -> None:
        if any(b.op == a.op and b.shape == a.shape for b in self.top):
            return
        self.top = sorted(self.top + [a], key=lambda b: -b.numel)[: self.keep]
        self.largest = self.top[0]
