"""Tile configurations the Triton dispatcher launches, chosen from small static tables.

A config fixes the tile shape (tokens x vocab x hidden-K), the warps and the software
pipeline depth. Every block size is a power of two and every ``tl.dot`` operand dimension
is >= 16, so the same configs are legal on a GPU and under ``TRITON_INTERPRET=1``.
Shared-memory use of the K-loop is ``num_stages * (block_n + block_v) * block_k * elem``
bytes per accumulated operand pair; the compile gate (``compile_report.py``) checks the
real numbers for sm_90a and sm_80.

Two kernel variants exist (`kernel_variant`): "portable" (forward_kernels / backward_kernels,
one program per tile, every NVIDIA GPU) and "hopper" (hopper_kernels: persistent grid, one
flattened loop, TMA descriptors; sm_90+). The Hopper variant is chosen with the environment
variable SDAR_TRITON_VARIANT=hopper; the default stays "portable" until a GPU run has measured
the Hopper variant (it has only been compiled and run in the interpreter so far).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Kernel families the dispatcher launches.
KERNELS = ("fwd", "jsd", "bwd")


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration.

    block_n: tokens per program. block_v: vocab columns per inner tile.
    block_k: hidden-dim slice of the K-loop. vocab_per_split: vocab columns one forward
    program walks (a multiple of block_v; 0 = decided from the grid size at launch).
    group_n: token tiles per program group of the grouped (L2-friendly) launch order.
    """

    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    vocab_per_split: int = 0
    group_n: int = 8

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name}={value}: must be a power of two >= 16")
        if self.vocab_per_split % self.block_v:
            raise ValueError(
                f"TileConfig.vocab_per_split={self.vocab_per_split}: must be a multiple of "
                f"block_v={self.block_v}")

    def label(self) -> str:
        return (f"{self.block_n}x{self.block_v}x{self.block_k} "
                f"w{self.num_warps} s{self.num_stages}")


def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Interpreter: small legal tiles (NumPy cost is per op, so not the smallest), many
# splits to exercise the split-reduction epilogue and ragged tiles.
_INTERPRET = TileConfig(block_n=32, block_v=64, block_k=32, num_warps=1, num_stages=1,
                        vocab_per_split=256, group_n=2)

# GPU tables for 16-bit inputs, per architecture family (90 = Hopper and newer, 80 =
# Ampere/Ada), keyed by the upper bound of H each row serves. Register use does not depend
# on H (a runtime K-loop bound); a deeper pipeline pays off once the K-loop is long.
# "_teacher" rows serve kernels that hold a student and a teacher tile at once; they use
# narrower tiles to stay spill-free (checked by tests/kernels/test_triton_compile.py).
_BIG_H = 1 << 30
_GPU_16BIT = {
    90: {
        "fwd": ((2048, TileConfig(128, 128, 64, 8, 3)), (_BIG_H, TileConfig(128, 128, 64, 8, 4))),
        "fwd_teacher": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
        "jsd": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
        "bwd": ((2048, TileConfig(128, 128, 64, 8, 3)), (_BIG_H, TileConfig(128, 128, 64, 8, 4))),
        "bwd_teacher": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
    },
    80: {
        "fwd": ((_BIG_H, TileConfig(128, 128, 64, 8, 3)),),
        "fwd_teacher": ((_BIG_H, TileConfig(128, 64, 32, 8, 3)),),
        "jsd": ((_BIG_H, TileConfig(128, 64, 32, 8, 3)),),
        "bwd": ((_BIG_H, TileConfig(128, 128, 64, 8, 3)),),
        "bwd_teacher": ((_BIG_H, TileConfig(128, 64, 64, 8, 3)),),
    },
}
# fp32 inputs run the dot in IEEE fp32 (no TF32) for accuracy: small tiles.
_GPU_FP32 = TileConfig(64, 64, 32, 4, 2)

# Hopper variant (16-bit, sm_90+). Register use of the persistent kernels at 8 warps (ptxas,
# bf16, every flag on; tests/kernels/test_triton_compile.py re-checks): 128x128 is the largest
# spill-free tile (128x256 and 256x128 spill); the teacher kernels hold two accumulators and
# keep 128x64. The deeper pipeline pays off once the K loop is long, as in _GPU_16BIT.
_HOPPER_16BIT = {
    "fwd": ((2048, TileConfig(128, 128, 64, 8, 3)), (_BIG_H, TileConfig(128, 128, 64, 8, 4))),
    "fwd_teacher": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
    "jsd": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
    "bwd": ((2048, TileConfig(128, 128, 64, 8, 3)), (_BIG_H, TileConfig(128, 128, 64, 8, 4))),
    "bwd_teacher": ((2048, TileConfig(128, 64, 64, 8, 3)), (_BIG_H, TileConfig(128, 64, 64, 8, 4))),
}
VARIANTS = ("portable", "hopper")
# Programs of a persistent launch under the interpreter: few, so each walks several tiles.
INTERPRET_PROGRAMS = 3


def kernel_variant(device: "torch.device | None" = None) -> str:
    """"portable" or "hopper", from env SDAR_TRITON_VARIANT (default "portable").

    "hopper" needs sm_90+ (TMA); on an older GPU it falls back to "portable". Under
    TRITON_INTERPRET=1 (CPU tensors) "hopper" runs the Hopper kernels in the interpreter.
    """
    want = os.environ.get("SDAR_TRITON_VARIANT", "portable").strip().lower() or "portable"
    if want not in VARIANTS:
        raise ValueError(f"SDAR_TRITON_VARIANT={want!r}: must be one of {VARIANTS}")
    if want == "hopper" and device is not None and device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 9:
            return "portable"
    return want


def skip_eps() -> float:
    """Block-skipping threshold of the Hopper backward, env SDAR_TRITON_SKIP_EPS (0 = off).

    A (token x vocab) tile is dropped (its dL/dz stored as zeros) when a bound proves every
    entry satisfies |dL/dz_ij| <= eps * max(|g_logp_i|, |g_entropy_i|) / tau; see hopper.py.
    """
    raw = os.environ.get("SDAR_TRITON_SKIP_EPS", "0").strip() or "0"
    try:
        eps = float(raw)
    except ValueError:
        raise ValueError(f"SDAR_TRITON_SKIP_EPS={raw!r}: must be a float in [0, 0.25]") from None
    if not 0.0 <= eps <= 0.25:
        raise ValueError(f"SDAR_TRITON_SKIP_EPS={eps}: must be in [0, 0.25] (0 = off)")
    return eps


def device_arch(device: "torch.device | None" = None) -> int:
    """Table family for a device: 90 for sm_90+ (Hopper, Blackwell), else 80."""
    if device is None or device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def table_key(kernel: str, has_teacher: bool) -> str:
    """Name of the table row family a launch uses."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: must be one of {KERNELS}")
    if kernel == "jsd":
        return "jsd"
    return f"{kernel}_teacher" if has_teacher else kernel


def choose_config(kernel: str, hidden_size: int, dtype: torch.dtype,
                  has_teacher: bool = False, arch: int = 90,
                  variant: str = "portable") -> TileConfig:
    """The config the dispatcher launches for one kernel family.

    kernel: "fwd" (stats pass), "jsd" (second JSD pass) or "bwd" (dlogits recompute).
    hidden_size: H (the K-loop length; the larger of student/teacher H when both run).
    arch: table family from `device_arch` (90 or 80). variant: from `kernel_variant`.
    """
    key = table_key(kernel, has_teacher)
    if hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size}: must be >= 1")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {VARIANTS}")
    if interpreting():
        return _INTERPRET
    if dtype == torch.float32:
        return _GPU_FP32
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: triton backend takes float32, bfloat16 or float16")
    if arch not in _GPU_16BIT:
        raise ValueError(f"arch={arch}: must be one of {sorted(_GPU_16BIT)}")
    table = _HOPPER_16BIT if variant == "hopper" else _GPU_16BIT[arch]
    for bound, cfg in table[key]:
        if hidden_size <= bound:
            return cfg
    raise AssertionError("unreachable: last table bound is unbounded")


def gpu_table(arch: int, variant: str = "portable") -> dict[str, tuple[tuple[int, TileConfig], ...]]:
    """The 16-bit GPU table of one architecture family (for the compile report)."""
    return dict(_HOPPER_16BIT if variant == "hopper" else _GPU_16BIT[arch])
