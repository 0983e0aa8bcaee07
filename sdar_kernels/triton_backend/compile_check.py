"""Ahead-of-time compilation of the dispatcher's kernel specializations (no GPU needed).

`launch_variants(H)` lists every (kernel, constexpr flags, tile config) the dispatcher can
launch for 16-bit inputs at hidden size H; `compile_variant` compiles one of them for a
CUDA target with Triton's own ptxas and returns registers, spills, shared memory and
whether the PTX uses Hopper `wgmma` and TMA (`cp.async.bulk.tensor`). On sm_90 the list
also holds the Hopper variant's kernels (families "*_hopper", hopper_kernels.py), compiled with
TMA descriptors; they are Hopper-only, so they are not compiled for sm_80.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward_kernels import dlogits_kernel
from .configs import TileConfig, choose_config
from .forward_kernels import jsd_fwd_kernel, stats_fwd_kernel
from .hopper_kernels import JSD_PASS2, dlogits_hopper_kernel, stats_fwd_hopper_kernel
from .row_kernels import row_dlogits_kernel, row_stats_kernel
from .rows import RowConfig, row_config

SM90 = GPUTarget("cuda", 90, 32)
SM80 = GPUTarget("cuda", 80, 32)
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Launch arguments a real call passes as multiples of 16 (Triton's "D" specialization):
# every pointer (torch allocations are 256-byte aligned), H, strides, split/chunk offsets.
_DIVISIBLE = {"H", "HT", "stride_h", "stride_w", "stride_th", "stride_tw", "vocab_per_split",
              "ld_dz", "v_lo"}
_FP32_PTRS = {"part_ptr", "zy_ptr", "lse_ptr", "ent_ptr", "tlse_ptr", "aux_ptr", "gl_ptr",
              "ge_ptr", "gd_ptr", "dbp_ptr", "z_ptr", "zt_ptr", "out_ptr", "st_ptr",
              "zmax_ptr"}
# Vocabulary the row kernels are compiled for (their block depends on V, not H; any V >= 4096
# gives the same block).
ROW_VOCAB = 151936


@dataclass(frozen=True)
class Variant:
    """One specialization: kernel family, its constexpr flags and the tile config."""

    family: str
    kernel: Callable
    flags: tuple[tuple[str, object], ...]
    config: TileConfig | RowConfig
    has_dot: bool = True  # the row kernels have none: no wgmma to look for

    def flag_label(self) -> str:
        on = [k for k, v in self.flags if v is True]
        div = dict(self.flags).get("DIV")
        return ",".join(on + ([f"DIV={div}"] if div is not None else []))


@dataclass(frozen=True)
class CompileResult:
    regs: int
    spills: int
    smem: int
    wgmma: bool | None  # None: a kernel without tl.dot
    tma: bool = False  # cp.async.bulk.tensor in the PTX


def launch_variants(hidden_size: int, arch: int, full: bool = True,
                    dtype: torch.dtype = torch.bfloat16) -> list[Variant]:
    """Specializations the dispatcher launches at H (teacher H_T = H). full=False keeps, per
    divergence, only the variant with every optional feature on (the most registers)."""
    out = []
    even = {"EVEN_K": True, "EVEN_KT": True, "IEEE": dtype == torch.float32, "UPCAST": False}
    for div, ent, bias in itertools.product((0, 1, 2, 3), (False, True), (False, True)):
        if not full and not (ent and bias):
            continue
        cfg = choose_config("fwd", hidden_size, dtype, has_teacher=div > 0, arch=arch)
        flags = dict(HAS_BIAS=bias, HAS_TBIAS=bias and div > 0, WITH_ENT=ent, DIV=div, **even)
        out.append(Variant("fwd", stats_fwd_kernel, _freeze(flags, cfg), cfg))
    for bias in ((False, True) if full else (True,)):
        cfg = choose_config("jsd", hidden_size, dtype, arch=arch)
        flags = dict(HAS_BIAS=bias, HAS_TBIAS=bias, **even)
        out.append(Variant("jsd", jsd_fwd_kernel, _freeze(flags, cfg), cfg))
    for div, gl, ge, bias in itertools.product((0, 1, 2, 3), (False, True), (False, True),
                                               (False, True)):
        if not (gl or ge or div) or (not full and not (gl and ge and bias)):
            continue
        cfg = choose_config("bwd", hidden_size, dtype, has_teacher=div > 0, arch=arch)
        flags = dict(HAS_GL=gl, HAS_GE=ge, HAS_GD=div > 0, DIV=div, HAS_BIAS=bias,
                     HAS_TBIAS=bias and div > 0, WRITE_DB=bias, **even)
        out.append(Variant("bwd", dlogits_kernel, _freeze(flags, cfg), cfg))
    if arch == 90:
        out += hopper_variants(hidden_size, full, dtype)
    out += _row_variants(full)
    return out


def hopper_variants(hidden_size: int, full: bool = True,
                    dtype: torch.dtype = torch.bfloat16) -> list[Variant]:
    """The Hopper variant's specializations at H (TMA on, teacher H_T = H). full=False keeps
    the register-heaviest ones: forward without teacher (with zmax) and reverse_kl, the JSD
    second pass, backward without teacher and with the JSD gradient."""
    out = []
    even = {"EVEN_K": True, "EVEN_KT": True, "IEEE": dtype == torch.float32, "UPCAST": False,
            "USE_TMA": True, "USE_TMA_T": True}
    for div, ent, bias, zmax in itertools.product((0, 1, 2, 3), (False, True), (False, True),
                                                  (False, True)):
        if (zmax and div) or (not full and not (ent and bias and div in (0, 1) and zmax == (div == 0))):
            continue
        cfg = choose_config("fwd", hidden_size, dtype, has_teacher=div > 0, variant="hopper")
        flags = dict(HAS_BIAS=bias, HAS_TBIAS=bias and div > 0, WITH_ENT=ent, DIV=div,
                     SAVE_ZMAX=zmax, **even)
        out.append(Variant("fwd_hopper", stats_fwd_hopper_kernel, _freeze(flags, cfg), cfg))
    for bias in ((False, True) if full else (True,)):
        cfg = choose_config("jsd", hidden_size, dtype, variant="hopper")
        flags = dict(HAS_BIAS=bias, HAS_TBIAS=bias, WITH_ENT=False, DIV=JSD_PASS2,
                     SAVE_ZMAX=False, **even)
        out.append(Variant("jsd_hopper", stats_fwd_hopper_kernel, _freeze(flags, cfg), cfg))
    for div, gl, ge, bias in itertools.product((0, 1, 2, 3), (False, True), (False, True),
                                               (False, True)):
        if not (gl or ge or div) or (not full and not (gl and ge and bias and div in (0, 3))):
            continue
        cfg = choose_config("bwd", hidden_size, dtype, has_teacher=div > 0, variant="hopper")
        flags = dict(HAS_GL=gl, HAS_GE=ge, HAS_GD=div > 0, DIV=div, HAS_BIAS=bias,
                     HAS_TBIAS=bias and div > 0, WRITE_DB=bias, **even)
        out.append(Variant("bwd_hopper", dlogits_hopper_kernel, _freeze(flags, cfg, grouped=False),
                           cfg))
    return out


def _row_variants(full: bool) -> list[Variant]:
    """The 3-pass path's row kernels (rows.py launches them with ALIASED=True, 16-bit dz)."""
    out = []
    for div, bias in itertools.product((0, 1, 2, 3), (False, True)):
        if full or bias:
            cfg = row_config(ROW_VOCAB, div > 0)
            flags = dict(BV=cfg.block_v, HAS_BIAS=bias, HAS_TBIAS=bias and div > 0, DIV=div)
            out.append(Variant("row_stats", row_stats_kernel, tuple(sorted(flags.items())), cfg, has_dot=False))
    for div, gl, ge, bias in itertools.product((0, 1, 2, 3), (False, True), (False, True), (False, True)):
        if not (gl or ge or div) or (not full and not (gl and ge and bias)):
            continue
        cfg = row_config(ROW_VOCAB, div > 0)
        flags = dict(BV=cfg.block_v, HAS_BIAS=bias, HAS_TBIAS=bias and div > 0, HAS_GL=gl, HAS_GE=ge,
                     HAS_GD=div > 0, DIV=div, ALIASED=True, INTERPRETED=False)
        out.append(Variant("row_dz", row_dlogits_kernel, tuple(sorted(flags.items())), cfg, has_dot=False))
    return out


def _freeze(flags: dict, cfg: TileConfig, grouped: bool = True) -> tuple[tuple[str, object], ...]:
    flags = dict(BN=cfg.block_n, BV=cfg.block_v, BK=cfg.block_k, **flags)
    if grouped:
        flags["GROUP_N"] = cfg.group_n
    return tuple(sorted(flags.items()))


def _signature(kernel: Callable, constexprs: dict, elem: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        tma = constexprs.get("USE_TMA_T" if name in ("th_src", "tw_src") else "USE_TMA")
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_src") and tma:  # Hopper operand: a host-side TMA descriptor
            rows = constexprs["BN"] if name in ("h_src", "th_src") else constexprs["BV"]
            sig[name] = f"tensordesc<{elem}[{rows}, {constexprs['BK']}]>"
        elif name.endswith("_ptr") or name.endswith("_src"):
            sig[name] = ("*fp32" if name in _FP32_PTRS else "*i64" if name == "y_ptr"
                         else "*i32" if name == "work_ptr" else f"*{elem}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("inv_tau", "beta"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in _DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(variant: Variant, target: GPUTarget, elem: str = "bf16") -> CompileResult:
    """Compile for `target`; registers and spills come from ptxas -v, smem from Triton."""
    constexprs = dict(variant.flags)
    sig, attrs = _signature(variant.kernel, constexprs, elem)
    src = ASTSource(fn=variant.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": variant.config.num_warps, "num_stages": variant.config.num_stages}
    nv, comp = triton.knobs.nvidia, triton.knobs.compilation
    old = nv.dump_ptxas_log, comp.always_compile
    log = io.StringIO()
    try:
        # A cache hit would skip ptxas and its -v log: always compile.
        nv.dump_ptxas_log, comp.always_compile = True, True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=opts)
    finally:
        nv.dump_ptxas_log, comp.always_compile = old
    text = log.getvalue()
    regs = _PTXAS.search(text)
    spills = _SPILL.findall(text)
    if regs is None:
        raise RuntimeError(f"no ptxas -v report for {variant.family} {variant.flag_label()}: {text[-500:]}")
    return CompileResult(regs=int(regs.group(1)),
                         spills=sum(int(a) + int(b) for a, b in spills),
                         smem=int(compiled.metadata.shared),
                         wgmma=("wgmma" in compiled.asm["ptx"]) if variant.has_dot else None,
                         tma="cp.async.bulk.tensor" in compiled.asm["ptx"])

