"""Shape grids of the kernel benchmarks.

    gpu         N {1k, 4k, 16k} x V {32k, 152k} x H {896, 4096}, every backend (bf16 by default)
    cpu         the acceptance case (N=4096, V=151936, H=896 fp32) first, with naive, torch,
                torch on the Liger-matched GRPO config and Liger's chunked GRPO loss; then
                N {1k, 4k} x V {32k, 152k} x H=896 for naive and torch; torch.compile only at the
                smallest shape (it compiles ~1 min per shape on 2 cores); N=16k and H=4096 are
                left out (naive logits at N=16k, V=152k are 9.3 GiB per copy)
    acceptance  the acceptance case alone, with the backends the cpu grid runs there
    quick       N {512, 2048} x V {8k, 32k} x H=256, naive, torch and Liger (a few minutes on 2 cores)
    smoke       N {64, 256} x V=1024 x H=32, naive, torch and Liger (CI: seconds)

Cases of one shape are adjacent so that the ratios vs naive are measured back to back. A grid
entry is a backend name, or "backend:preset" for a preset other than "sdar" (loss_cases.PRESETS);
the liger backend always runs the "liger-grpo" preset.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .loss_cases import PRESET, Case

ACCEPTANCE = (4096, 151936, 896)
GRIDS = ("smoke", "quick", "cpu", "acceptance", "gpu")
LIGER = "liger:liger-grpo"
ACCEPTANCE_BACKENDS = ["naive", "torch", "torch:liger-grpo", LIGER]


def _shapes(grid: str) -> list[tuple[int, int, int]]:
    if grid == "gpu":
        return [(n, v, h) for h in (896, 4096) for v in (32768, 151936) for n in (1024, 4096, 16384)]
    if grid == "cpu":
        rest = [(n, v, 896) for v in (32768, 151936) for n in (1024, 4096)]
        return [ACCEPTANCE] + [s for s in rest if s != ACCEPTANCE]
    if grid == "acceptance":
        return [ACCEPTANCE]
    if grid == "quick":
        return [(n, v, 256) for v in (8192, 32768) for n in (512, 2048)]
    if grid == "smoke":
        return [(n, 1024, 32) for n in (64, 256)]
    raise ValueError(f"grid={grid!r} is invalid; valid choices: {', '.join(GRIDS)}")


def _backends(grid: str, shape: tuple[int, int, int], smallest: tuple[int, int, int]) -> list[str]:
    if grid == "gpu":
        return ["naive", "compiled", "torch", "triton", LIGER]
    if grid in ("cpu", "acceptance") and shape == ACCEPTANCE:
        return list(ACCEPTANCE_BACKENDS)
    if grid == "cpu" and shape == smallest:
        return ["naive", "compiled", "torch"]
    if grid in ("quick", "smoke"):
        return ["naive", "torch", LIGER]
    return ["naive", "torch"]


def cases(suite: str, grid: str, device: str = "cpu", dtype: Optional[str] = None,
          backends: Optional[Sequence[str]] = None, token_chunk: int = 1024, vocab_chunk: int = 2048) -> list[Case]:
    """The cases of ``suite`` ("loss" or "logprobs") on ``grid``; ``backends`` filters them by
    backend name. The log-prob suite has no presets (and Liger no log-prob pass): the
    "backend:preset" entries are dropped there."""
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    shapes = _shapes(grid)
    smallest = min(shapes, key=lambda s: s[0] * s[1] * s[2])
    out = []
    for shape in shapes:
        for entry in _backends(grid, shape, smallest):
            backend, _, preset = entry.partition(":")
            preset = preset or PRESET
            if suite != "loss" and preset != PRESET:
                continue
            if backends is None or backend in backends:
                out.append(Case(suite, backend, *shape, dtype=dtype, device=device, token_chunk=token_chunk,
                                vocab_chunk=vocab_chunk, preset=preset))
    return out
