"""``sdar bench --suite trl``: one TRL GRPO training step, our adapter vs TRL's own fused lm_head.

A step = ``trainer.compute_loss(model, inputs)`` + backward + AdamW step on one prepared batch of
B x T completion tokens (full shape: B = 8, T = 512, N = 4096; V = 32768) behind short prompts, on a
random Llama (H = 256, 2 layers, fp32). Paths, losses and the worker: benchmarks/trl_step_worker.py.
Each (loss type, repeat, path) case runs in its own forked process (the fork server of
step_memory_worker.py); the paths of one repeat run back to back, their order alternating between
repeats. Per case: ``warmup`` full steps, then the measured step: its time and its peak memory
(CPU: peak RSS of the step minus the RSS before it, benchmarks/memory.py PeakMeter).

Reported per loss type and path: median step time and median peak over the repeats, the ratios
path / trl of both (time also as the median of the per-repeat ratios, each against the trl case
that ran next to it: on a loaded machine this cancels drift in the load), and the relative
difference of the first step's loss and total gradient norm against trl's (same seed, same inputs:
the comparison is apples to apples only when these are at fp32 rounding level).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from .step_memory import DEFAULT_MMAP_THRESHOLD, ForkServer, mem_available
from .trl_step_worker import LOSS_TYPES, PATHS

log = logging.getLogger("sdar_bench")
BASELINE = "trl"
CASE_COLUMNS = ("loss_type", "repeat", "path", "status", "time_s", "peak_mib", "base_rss_mib", "first_loss",
                "first_grad_norm", "loss", "completion_tokens", "fused_loss_calls", "mem_method", "reason")
SUMMARY_COLUMNS = ("loss_type", "path", "runs", "time_s", "time_min_s", "peak_mib", "peak_min_mib", "time_vs_trl",
                   "time_vs_trl_paired", "peak_vs_trl", "loss_rel_diff", "grad_norm_rel_diff")


@dataclass(frozen=True)
class StepShape:
    """Model and batch of the suite: Llama, untied lm_head; completion tokens N = batch x completion_len."""

    vocab: int = 32768
    hidden: int = 256
    intermediate: int = 1024
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    batch: int = 8
    prompt_len: int = 16
    completion_len: int = 512

    @property
    def tokens(self) -> int:
        return self.batch * self.completion_len


FULL_SHAPE = StepShape()
QUICK_SHAPE = StepShape(vocab=2048, hidden=64, intermediate=128, batch=4, prompt_len=8, completion_len=64)


def default_paths() -> list[str]:
    """trl and the adapter when sdar_kernels.integrations.trl exists, else trl and direct."""
    try:
        found = importlib.util.find_spec("sdar_kernels.integrations.trl") is not None
    except ImportError:
        found = False
    return ["trl", "adapter" if found else "direct"]


def plan_cases(shape: StepShape, paths: Sequence[str], loss_types: Sequence[str], repeats: int, warmup: int,
               device: str, old_noise: float = 0.05, ragged: bool = False) -> list[dict]:
    """Case specs ordered (loss type, repeat, path); the path order is reversed on odd repeats."""
    out = []
    for loss_type in loss_types:
        for r in range(repeats):
            for path in (paths if r % 2 == 0 else list(reversed(paths))):
                out.append({**asdict(shape), "path": path, "loss_type": loss_type, "repeat": r, "warmup": warmup,
                            "device": device, "seed": 0, "old_noise": old_noise, "ragged": ragged})
    return out


def _row(spec: dict, res: dict) -> dict:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    return {"loss_type": spec["loss_type"], "repeat": spec["repeat"], "path": spec["path"],
            "status": res.get("status", "failed"), "reason": res.get("reason", ""), "time_s": res.get("time_s"),
            "peak_bytes": res.get("peak_bytes"), "peak_mib": mib(res.get("peak_bytes")),
            "base_rss_mib": mib(res.get("base_rss_bytes")), "first_loss": res.get("first_loss"),
            "first_grad_norm": res.get("first_grad_norm"), "loss": res.get("loss"),
            "completion_tokens": res.get("completion_tokens"), "fused_loss_calls": res.get("fused_loss_calls"),
            "mem_method": res.get("mem_method", "")}


def run_cases(cases: Sequence[dict], max_bytes: int, mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
              timeout_s: float = 1800, progress: bool = True) -> list[dict]:
    """Every case through one fork server (benchmarks.trl_step_worker); one row per case."""
    from sdar_engine.progress import progress as progress_bar

    rows = []
    server = ForkServer(mmap_threshold, module=f"{__package__}.trl_step_worker")  # benchmarks or sdar_benchmarks
    try:
        bar = progress_bar(cases, desc="trl", unit="case", disable=not progress)
        for spec in bar:
            bar.set_postfix_str(f"{spec['loss_type']} {spec['path']} #{spec['repeat']}")
            budget = min(max_bytes, int(0.9 * (mem_available() or max_bytes)))
            row = _row(spec, server.run(spec, budget, timeout_s))
            if row["status"] == "ok":
                log.info("trl %-4s %-7s #%d: step %.2f s, peak %.1f MiB, loss %.6g", spec["loss_type"], spec["path"],
                         spec["repeat"], row["time_s"], row["peak_mib"], row["first_loss"])
            else:
                log.warning("trl %-4s %-7s #%d failed: %s", spec["loss_type"], spec["path"], spec["repeat"],
                            row["reason"])
            rows.append(row)
    finally:
        server.close()
    return rows


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (loss type, path): medians over the ok repeats and the ratios to trl (module docstring)."""
    out = []
    for loss_type in dict.fromkeys(r["loss_type"] for r in rows):
        mine = [r for r in rows if r["loss_type"] == loss_type]
        base = None
        for path in dict.fromkeys(r["path"] for r in mine):
            ok = [r for r in mine if r["path"] == path and r["status"] == "ok"]
            s = {"loss_type": loss_type, "path": path, "runs": len(ok), "time_s": None, "time_min_s": None,
                 "peak_mib": None, "peak_min_mib": None, "first_loss": None, "first_grad_norm": None}
            if ok:
                s.update(time_s=statistics.median(r["time_s"] for r in ok), time_min_s=min(r["time_s"] for r in ok),
                         peak_mib=statistics.median(r["peak_mib"] for r in ok),
                         peak_min_mib=min(r["peak_mib"] for r in ok), first_loss=ok[0]["first_loss"],
                         first_grad_norm=ok[0]["first_grad_norm"])
            out.append(s)
            if path == BASELINE:
                base = s
        for s in out:
            if s["loss_type"] != loss_type:
                continue
            ok = base is not None and base["runs"] and s["runs"]
            s["time_vs_trl"] = s["time_s"] / base["time_s"] if ok else None
            pairs = {(r["repeat"], r["path"]): r["time_s"] for r in mine if r["status"] == "ok"}
            paired = [t / pairs[(rep, BASELINE)] for (rep, path), t in pairs.items()
                      if path == s["path"] and pairs.get((rep, BASELINE))]
            s["time_vs_trl_paired"] = statistics.median(paired) if paired else None
            s["peak_vs_trl"] = s["peak_mib"] / base["peak_mib"] if ok and base["peak_mib"] else None
            s["loss_rel_diff"] = _rel(s["first_loss"], base["first_loss"]) if ok else None
            s["grad_norm_rel_diff"] = _rel(s["first_grad_norm"], base["first_grad_norm"]) if ok else None
    return out


def acceptance_lines(summary: Sequence[dict]) -> list[str]:
    """Issue #13's goal per loss type: no more memory and less time than TRL's fused lm_head."""
    lines = []
    for s in summary:
        if s["path"] == BASELINE or s["time_vs_trl"] is None:
            continue
        verdict = "MET" if s["time_vs_trl"] < 1 and (s["peak_vs_trl"] or 0) <= 1 else "MISSED"
        lines.append(f"{s['loss_type']}: {s['path']} / trl: time {s['time_vs_trl']:.2f}x "
                     f"({s['time_s']:.2f} s vs {s['time_s'] / s['time_vs_trl']:.2f} s; per-repeat pairs "
                     f"{s['time_vs_trl_paired']:.2f}x), peak "
                     + (f"{s['peak_vs_trl']:.2f}x ({s['peak_mib']:.0f} MiB vs {s['peak_mib'] / s['peak_vs_trl']:.0f} "
                        "MiB)" if s["peak_vs_trl"] else "n/a")
                     + f"; first-step loss rel. diff {s['loss_rel_diff']:.1e}, grad-norm rel. diff "
                     f"{s['grad_norm_rel_diff']:.1e} (goal: less time, no more memory: {verdict})")
    return lines


def markdown(meta: dict, shape: StepShape, rows: Sequence[dict], summary: Sequence[dict]) -> str:
    """trl_step.md of one run: setup, acceptance lines, summary table, per-case table."""
    from .report import _table, run_lines

    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    out = [f"# TRL GRPO training step: adapter vs TRL's fused lm_head ({meta['machine']['date_utc']} UTC)", "",
           *run_lines(meta),
           f"- model: random Llama, V={shape.vocab}, H={shape.hidden}, L={shape.layers}, MLP {shape.intermediate}, "
           f"heads {shape.heads} (kv {shape.kv_heads}), untied lm_head, sdpa, fp32; AdamW",
           f"- batch: B={shape.batch} x T={shape.completion_len} completion tokens (N={shape.tokens}) after "
           f"{shape.prompt_len}-token prompts; step = compute_loss + backward + AdamW step; "
           f"{meta.get('warmup', 1)} warm-up step(s) per process, then one measured step",
           "", *[f"- {line}" for line in acceptance_lines(summary)], "",
           _table(("loss type", "path", "runs", "step time (s, median)", "peak (MiB, median)", "time / trl",
                   "time / trl (pairs)", "peak / trl", "loss rel. diff", "grad-norm rel. diff"),
                  [(s["loss_type"], s["path"], str(s["runs"]), f(s["time_s"], ".2f"), f(s["peak_mib"], ".1f"),
                    f(s["time_vs_trl"], ".2f"), f(s["time_vs_trl_paired"], ".2f"), f(s["peak_vs_trl"], ".2f"),
                    f(s["loss_rel_diff"], ".1e"),
                    f(s["grad_norm_rel_diff"], ".1e")) for s in summary]),
           "", "Per case (each in a fresh forked process):", "",
           _table(("loss type", "repeat", "path", "time (s)", "peak (MiB)", "first loss", "status"),
                  [(r["loss_type"], str(r["repeat"]), r["path"], f(r["time_s"], ".2f"), f(r["peak_mib"], ".1f"),
                    f(r["first_loss"], ".7g"), r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
                   for r in rows])]
    return "\n".join(out) + "\n"


def run_suite(out: str, meta: dict, quick: bool = False, device: str = "cpu", paths: Optional[Iterable[str]] = None,
              loss_types: Iterable[str] = ("grpo",), repeats: int = 3, warmup: int = 1, max_gb: float = 8.0,
              mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, timeout_s: float = 1800, progress: bool = True,
              shape: Optional[StepShape] = None) -> tuple[list[dict], list[dict]]:
    """Run the suite and write trl_step.csv, trl_step_summary.csv, trl_step.md and meta.json into
    ``out``. Returns (case rows, summary rows)."""
    from .report import write_csv

    paths = list(paths) if paths else default_paths()
    loss_types = list(loss_types)
    for name, got, valid in (("paths", paths, PATHS), ("loss_types", loss_types, LOSS_TYPES)):
        bad = [x for x in got if x not in valid]
        if bad or not got:
            raise ValueError(f"{name}={got!r} is invalid; valid choices: {', '.join(valid)}")
    if BASELINE not in paths:
        paths = [BASELINE, *paths]  # every ratio is against trl measured in the same run
    if repeats < 1 or warmup < 0 or not max_gb > 0:
        raise ValueError(f"repeats={repeats} / warmup={warmup} / max_gb={max_gb} is invalid; "
                         "expected >= 1 / >= 0 / > 0")
    shape = shape or (QUICK_SHAPE if quick else FULL_SHAPE)
    cases = plan_cases(shape, paths, loss_types, repeats, warmup, device)
    log.info("trl suite: %d cases, paths %s, loss types %s, V=%d H=%d N=%d, device %s", len(cases), paths, loss_types,
             shape.vocab, shape.hidden, shape.tokens, device)
    t0 = time.perf_counter()
    rows = run_cases(cases, int(max_gb * 2**30), mmap_threshold, timeout_s, progress)
    summary = summarize(rows)
    try:  # a shared machine: the load at the end says how noisy the step times are
        meta["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except (OSError, KeyError, TypeError):
        pass
    meta = {**meta, "suite": "trl", "shape": asdict(shape), "paths": paths, "loss_types": loss_types,
            "repeats": repeats, "warmup": warmup, "max_gb": max_gb, "mmap_threshold": mmap_threshold,
            "wall_s": time.perf_counter() - t0}
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "trl_step.csv"), CASE_COLUMNS)
    write_csv(summary, os.path.join(out, "trl_step_summary.csv"), SUMMARY_COLUMNS)
    with open(os.path.join(out, "trl_step.md"), "w") as fh:
        fh.write(markdown(meta, shape, rows, summary))
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    for line in acceptance_lines(summary):
        log.info(line)
    return rows, summary
