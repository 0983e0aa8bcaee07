"""Value checks of one loss call's inputs: finite numbers and target ids in range, where they count.

Shapes and dtypes are checked without touching the data (linear_stats._validate); this module
reads the data. A NaN in an advantage or a teacher log-prob, an inf in a hidden state, or a target
id outside [0, V) on a token the loss reads would otherwise come back as ``loss=nan`` and NaN
gradients (or, on CUDA, as a log-prob read from leftover memory) with no error. Only tokens the
loss reads are checked (``keep``: the loss mask, or every token without one), so padding may hold
anything, e.g. the -100 targets of TRL and verl.

Cost: O(N) for the per-token inputs, two row reductions over hidden [N, H] and two over the
weight [V, H], and ONE host sync for the whole call (the flags are combined on the device).
The message, built only on failure, names the input, the first offending token and its value.
``LossConfig(check_inputs=False)`` / ``check_inputs=False`` skip it (CUDA graphs, torch.compile).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_HINT = "every value the loss reads must be finite: fix it upstream, or set loss_mask=0 on that token"


def _bad_rows(x: Tensor) -> Tensor:
    """[N] bool: rows of x [N, ...] holding a NaN or an inf (max/min propagate NaN; no [N, H] temp)."""
    if x.dim() == 1:
        return ~torch.isfinite(x)
    flat = x.reshape(x.shape[0], -1)
    return ~(torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1)))


def _plain(t: Tensor) -> bool:
    """A local tensor (a DTensor shard is checked by its owner's call, not here)."""
    return not hasattr(t, "device_mesh")


def check_values(keep: Optional[Tensor], vocab: int, targets: Tensor, rows: dict[str, Optional[Tensor]],
                 whole: dict[str, object]) -> None:
    """Raise ValueError if an input the loss reads is non-finite or a target id is out of range.

    keep: [N] bool (or 0/1) tokens the loss reads; None = all. targets: [N] int ids, must lie in
    [0, vocab) where kept. rows: per-token inputs ([N] or [N, H]) that must be finite where kept.
    whole: tensors that must be finite everywhere (the lm_head weight, a normalizer).
    """
    n = targets.shape[0]
    if keep is None:
        keep = torch.ones(n, dtype=torch.bool, device=targets.device)
    keep = keep != 0
    checks: list[tuple[str, str, Tensor, Tensor]] = []  # (kind, name, tensor, bad mask)
    checks.append(("target", "targets", targets, ((targets < 0) | (targets >= vocab)) & keep))
    for name, t in rows.items():
        if t is not None and t.numel() and _plain(t):
            checks.append(("row", name, t.detach(), _bad_rows(t.detach()) & keep))
    for name, t in whole.items():
        if isinstance(t, (int, float)) and not math.isfinite(t):
            raise ValueError(f"{name}={t} is not finite; it must be a finite number (or a tensor)")
        if isinstance(t, Tensor) and t.numel() and _plain(t):
            d = t.detach()
            checks.append(("whole", name, d, ~(torch.isfinite(d.amax()) & torch.isfinite(d.amin()))))
    flags = torch.stack([bad.any() for _, _, _, bad in checks])
    if not bool(flags.any()):  # the one host sync
        return
    for kind, name, t, bad in checks:
        if bool(bad.any()):
            raise ValueError(_message(kind, name, t, bad, vocab))


def _message(kind: str, name: str, t: Tensor, bad: Tensor, vocab: int) -> str:
    if kind == "whole":
        count = int((~torch.isfinite(t)).sum())
        return f"{name} holds {count} non-finite value(s) of {t.numel()}; it must be finite everywhere"
    i = int(bad.nonzero()[0, 0])
    count = int(bad.sum())
    if kind == "target":
        return (f"targets[{i}]={int(t[i])} is outside [0, V={vocab}) on a token the loss reads ({count} "
                "such token(s)); map it into the vocabulary or set loss_mask=0 there")
    row = t[i]
    value = row.item() if row.dim() == 0 else row[~torch.isfinite(row)][0].item()
    where = "" if row.dim() == 0 else f" (a value in row {i} of {row.numel()})"
    return f"{name}[{i}]={value} is not finite on a token the loss reads{where}, {count} such token(s); {_HINT}"
