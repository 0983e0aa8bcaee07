"""``sdar bench --suite memory``: peak memory of ONE training step against tokens, per memory path.

A step = trunk forward + loss + backward + AdamW step on one micro-batch of the tiny Qwen2
family (tied embedding, sdpa attention, fp32 parameters and compute) scaled to V = 32768.
Every case runs in its own forked process (benchmarks/step_memory_worker.py); on CPU its peak
is the RSS high-water mark of the measured step minus the RSS before it (PeakMeter
"rss-hwm-reset"), on CUDA torch.cuda.max_memory_allocated minus the memory allocated before.

Paths (PATHS):
  hf_default          ``model(input_ids, position_ids, labels=...)``: HF computes logits [N, V]
                      (fp32) and its cross-entropy (log-softmax over [N, V]); no checkpointing.
  fused               sdar_engine.model.trunk_hidden -> sdar_kernels.fused_linear_sdar_loss
                      (SDAR preset, torch backend, grad-in-forward row path); no checkpointing.
  fused_ckpt          fused + activation checkpointing per decoder layer
                      (sdar_engine.model.enable_checkpointing, as ModelConfig.grad_checkpointing).
  fused_ckpt_chunked  fused_ckpt + the loss computed in sequence chunks of C = ``loss_chunk``
                      tokens: LossConfig.token_chunk = C, so the row loop walks the stream C
                      tokens at a time and every [rows, V] tile has at most C rows. Bounded loss
                      scratch, precisely: the loss's transient memory is at most
                      2 * C * V * 4 bytes (the logits/log-prob tile and the prob/dL/dz tile,
                      fp32), independent of N. The default (fused_ckpt) sizes tiles at
                      min(token_chunk=1024, 2**25 / V, (n - 1) // 8) rows for n loss tokens,
                      which grows with N (as n / 8) until it reaches 1024 rows at V = 32768.
  Every fused path also holds dL/dh [N, H] fp32 from the loss forward to its backward.

Layouts (LAYOUTS): ``single`` = one sample of N tokens in one row; ``packed`` = samples of
1-2k tokens laid out by sdar_engine.packing.pack as the engine does on CPU (rows from
logprobs.default_row_tokens: one row per sample here, rows padded to the longest). Each
sample's first quarter is prompt (no loss), the rest response. Memory is fitted against
*slots* (rows x row length: the tokens the trunk actually runs, padding included).

Analytic trunk-only minimum (``trunk_min_bytes_per_token``), per token, s = bytes per element
of the compute dtype (4), H hidden, L layers, H_kv = kv_heads * d_head, I = MLP width:

  A_layer = 5 H + 2 H_kv + 4 I + n_heads     activations autograd keeps inside one Qwen2 decoder
            layer: input-norm output, q (after RoPE), attention output, residual sum and
            post-attention-norm output (H each), k and v (H_kv each), gate, up, silu(gate) and
            silu(gate) * up (I each), the attention's log-sum-exp (one per head)
  checkpointed:  m_ckpt = s [ L H + 2 H + 2 d_head + A_layer ]
            each layer's input (kept by its checkpoint), the final RMSNorm's input and output,
            RoPE cos/sin (shared by all layers), plus ONE layer's activations while it is
            recomputed during backward
  no checkpointing:  m_full = s [ L (H + A_layer) + 2 H + 2 d_head ]

Nothing of the loss (logits, dL/dh, tiles) is in it: it is what the trunk alone must keep.
Reported per path: slope (least squares of peak bytes over slots), the minimum of that path's
checkpointing setting, their ratio, the slope ratio hf_default / fused_ckpt (same run), and
step time as a ratio to fused_ckpt at the same (layout, tokens) (same run).

A case whose predicted peak (a linear fit over the smaller lengths of its path and layout,
plus the process's RSS) exceeds ``max_gb`` (or 90 % of MemAvailable when that is lower) is not
run: its row is "extrapolated" with the predicted bytes. Cases also run under an RSS watchdog
at that budget. On CPU the worker pins glibc's mmap threshold (``mmap_threshold`` bytes,
MALLOC_MMAP_THRESHOLD_) so activation-sized buffers are returned to the OS when freed and RSS
follows the live tensors; with glibc's dynamic threshold (up to 32 MiB) freed buffers stay
in the heap and the high-water mark measures fragmentation too (``--mmap-threshold 0``).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from .step_memory_worker import LAYOUTS, PATHS
from .worker import RESULT_PREFIX

log = logging.getLogger("sdar_bench")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_PATHS = ("fused_ckpt", "fused_ckpt_chunked")
BASELINE_PATH = "fused_ckpt"
CASE_COLUMNS = ("layout", "path", "tokens", "slots", "rows", "samples", "status", "peak_mib", "predicted_mib",
                "base_rss_mib", "time_s", "time_vs_ckpt", "layer0_forwards", "largest_numel", "mem_method",
                "loss", "reason")
SUMMARY_COLUMNS = ("layout", "path", "points", "slope_kib_per_token", "intercept_mib", "min_kib_per_token",
                   "slope_vs_min", "slope_vs_ckpt", "time_vs_ckpt", "max_tokens_measured", "peak_at_max_gib",
                   "max_status")
DEFAULT_MMAP_THRESHOLD = 256 * 1024


@dataclass(frozen=True)
class MemShape:
    """Model shape of the suite: Qwen2 with tied embedding; intermediate 0 = 4 x hidden."""

    vocab: int = 32768
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0

    @property
    def mlp(self) -> int:
        return self.intermediate or 4 * self.hidden

    @property
    def d_head(self) -> int:
        return self.hidden // self.heads

    def to_spec(self) -> dict:
        return {**asdict(self), "intermediate": self.mlp}


FULL_SHAPE = MemShape()
QUICK_SHAPE = MemShape(vocab=2048, hidden=64, layers=2)
FULL_TOKENS = {"single": (1024, 2048, 4096, 8192, 16384, 32768), "packed": (2048, 4096, 8192, 16384, 32768)}
QUICK_TOKENS = {"single": (256, 512, 1024), "packed": (1024, 2048, 3072)}
FULL_LOSS_CHUNK, QUICK_LOSS_CHUNK = 256, 32
# Run caps of the full grid (tokens): longer cases of these (layout, path) pairs are not run but
# extrapolated from the shorter ones, to keep the suite near 10 min on 2 cores: single-sequence
# attention costs N^2, and only the checkpointed paths need the 32k single step (acceptance).
# (hf_default needs no cap: its [N, V] logits put it over --max-gb first)
FULL_RUN_CAP = {("single", "fused"): 16384, ("packed", "fused"): 16384, ("packed", "fused_ckpt"): 16384,
                ("packed", "fused_ckpt_chunked"): 16384}


def layer_activations(shape: MemShape) -> int:
    """A_layer: elements per token autograd keeps inside one decoder layer (module docstring)."""
    h_kv = shape.kv_heads * shape.d_head
    return 5 * shape.hidden + 2 * h_kv + 4 * shape.mlp + shape.heads


def trunk_min_bytes_per_token(shape: MemShape, checkpointing: bool, elem_bytes: int = 4) -> int:
    """Analytic trunk-only minimum of a training step's activations, bytes per token:
    s [L H + 2 H + 2 d_head + A_layer] with checkpointing, s [L (H + A_layer) + 2 H + 2 d_head]
    without (module docstring). ``elem_bytes`` = s, the compute dtype's size."""
    h, a = shape.hidden, layer_activations(shape)
    shared = 2 * h + 2 * shape.d_head
    per_token = shape.layers * h + shared + a if checkpointing else shape.layers * (h + a) + shared
    return elem_bytes * per_token


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs; needs >= 2 distinct xs."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_line needs >= 2 distinct x values; got xs={list(xs)}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def predict_peak(rows: Sequence[dict], slots: int) -> Optional[float]:
    """Predicted extra peak bytes at ``slots`` from measured rows of one (path, layout): a line
    through >= 2 points, through the origin with one point, None with none."""
    pts = [(r["slots"], r["peak_bytes"]) for r in rows if r.get("status") == "ok"]
    if not pts:
        return None
    if len({x for x, _ in pts}) < 2:
        x, y = pts[-1]
        return y * slots / x
    slope, intercept = fit_line([x for x, _ in pts], [y for _, y in pts])
    return max(intercept + slope * slots, max(y for _, y in pts))


def mem_available() -> Optional[int]:
    """MemAvailable in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_cases(quick: bool, paths: Sequence[str], layouts: Sequence[str], device: str, tokens=None,
               shape: Optional[MemShape] = None, loss_chunk: Optional[int] = None) -> list[dict]:
    """Case specs, ordered (layout, tokens, path) so that the paths of one length run back to back."""
    shape = shape or (QUICK_SHAPE if quick else FULL_SHAPE)
    grid = tokens or (QUICK_TOKENS if quick else FULL_TOKENS)
    chunk = loss_chunk or (QUICK_LOSS_CHUNK if quick else FULL_LOSS_CHUNK)
    out = []
    for layout in layouts:
        for n in grid[layout]:
            for path in paths:
                cap = None if quick or tokens else FULL_RUN_CAP.get((layout, path))
                out.append({**shape.to_spec(), "path": path, "layout": layout, "tokens": int(n),
                            "loss_chunk": chunk, "device": device, "seed": 0, "run_cap": cap})
    return out


class ForkServer:
    """The ``python -m sdar_benchmarks.step_memory_worker`` process: imports once, forks per case."""

    def __init__(self, mmap_threshold: int, module: str = "sdar_benchmarks.step_memory_worker") -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        if mmap_threshold > 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
        self.proc = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first = self.proc.stdout.readline()
        if first.strip() != "READY":
            self.close()
            raise RuntimeError(f"step_memory_worker did not start (got {first!r})")

    def run(self, spec: dict, rss_limit: Optional[int], timeout_s: float) -> dict:
        self.proc.stdin.write(json.dumps({"case": spec, "rss_limit_bytes": rss_limit, "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        raise RuntimeError(f"step_memory_worker exited (rc={self.proc.poll()}) without a result")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _row(spec: dict, res: dict) -> dict:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    row = {"layout": spec["layout"], "path": spec["path"], "tokens": spec["tokens"], "vocab": spec["vocab"],
           "hidden": spec["hidden"], "layers": spec["layers"], "device": spec["device"],
           "loss_chunk": spec["loss_chunk"], "status": res.get("status", "failed"), "reason": res.get("reason", ""),
           "slots": res.get("slots"), "rows": res.get("rows"), "samples": res.get("samples"),
           "peak_bytes": res.get("peak_bytes"), "peak_mib": mib(res.get("peak_bytes")),
           "predicted_bytes": res.get("predicted_bytes"), "predicted_mib": mib(res.get("predicted_bytes")),
           "base_rss_mib": mib(res.get("base_rss_bytes")), "time_s": res.get("time_s"),
           "layer0_forwards": res.get("layer0_forwards"), "largest_numel": res.get("largest_numel"),
           "mem_method": res.get("mem_method", ""), "loss": res.get("loss"), "time_vs_ckpt": None}
    return row


def run_cases(cases: Sequence[dict], max_bytes: int, mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
              timeout_s: float = 1800, progress: bool = True) -> list[dict]:
    """Run (or extrapolate) every case through one fork server; returns one row per case."""
    from sdar_engine.progress import progress as progress_bar

    rows: list[dict] = []
    server = ForkServer(mmap_threshold)
    base_rss = 0
    try:
        bar = progress_bar(cases, desc="memory", unit="case", disable=not progress)
        for spec in bar:
            bar.set_postfix_str(f"{spec['layout']} {spec['path']} {spec['tokens']}")
            mine = [r for r in rows if (r["path"], r["layout"]) == (spec["path"], spec["layout"])]
            budget = min(max_bytes, int(0.9 * (mem_available() or max_bytes)))
            ratio = next((r["slots"] / r["tokens"] for r in reversed(mine) if r.get("slots")), 1.0)
            pred = predict_peak(mine, int(spec["tokens"] * ratio))
            dead = [r for r in mine if r["status"] in ("failed", "extrapolated")]
            capped = spec.get("run_cap") is not None and spec["tokens"] > spec["run_cap"]
            if dead or capped or (pred is not None and pred + base_rss > budget):
                if dead:
                    why = f"a shorter case was {dead[-1]['status']}"
                elif capped:
                    why = f"above this path's run cap of {spec['run_cap']} tokens (time; see FULL_RUN_CAP)"
                else:
                    why = (f"predicted {pred / 2**30:.2f} GiB + {base_rss / 2**30:.2f} GiB process RSS > budget "
                           f"{budget / 2**30:.2f} GiB")
                row = _row(spec, {"status": "extrapolated", "reason": why, "predicted_bytes": pred,
                                  "slots": int(spec["tokens"] * ratio)})
                log.info("memory %-6s %-18s %6d tokens: not run (%s)", spec["layout"], spec["path"],
                         spec["tokens"], why)
            else:
                res = server.run(spec, budget, timeout_s)
                row = _row(spec, res)
                if row["status"] == "ok":
                    base_rss = max(base_rss, res.get("base_rss_bytes") or 0)
                    log.info("memory %-6s %-18s %6d tokens (%d slots): peak %.1f MiB, step %.2f s", spec["layout"],
                             spec["path"], spec["tokens"], row["slots"], row["peak_mib"], row["time_s"])
                else:
                    log.warning("memory %-6s %-18s %6d tokens failed: %s", spec["layout"], spec["path"],
                                spec["tokens"], row["reason"])
            rows.append(row)
    finally:
        server.close()
    return add_time_ratios(rows)


def add_time_ratios(rows: list[dict]) -> list[dict]:
    """time_vs_ckpt = step time / fused_ckpt's step time at the same (layout, tokens), same run."""
    base = {(r["layout"], r["tokens"]): r["time_s"] for r in rows if r["path"] == BASELINE_PATH and r["time_s"]}
    for r in rows:
        b = base.get((r["layout"], r["tokens"]))
        r["time_vs_ckpt"] = r["time_s"] / b if b and r["time_s"] else None
    return rows


def summarize(rows: Sequence[dict], shape: MemShape, elem_bytes: int = 4) -> list[dict]:
    """Per (layout, path): least-squares slope over slots and the ratios the suite reports."""
    out = []
    for layout in LAYOUTS:
        for path in PATHS:
            mine = [r for r in rows if (r["layout"], r["path"]) == (layout, path)]
            ok = [r for r in mine if r["status"] == "ok"]
            if not mine:
                continue
            s = {"layout": layout, "path": path, "points": len(ok), "slope_kib_per_token": None,
                 "intercept_mib": None, "slope_vs_ckpt": None}
            if len({r["slots"] for r in ok}) >= 2:
                slope, icpt = fit_line([r["slots"] for r in ok], [r["peak_bytes"] for r in ok])
                s.update(slope_bytes=slope, slope_kib_per_token=slope / 1024, intercept_mib=icpt / 2**20)
            minimum = trunk_min_bytes_per_token(shape, path in CKPT_PATHS, elem_bytes)
            s["min_kib_per_token"] = minimum / 1024
            s["slope_vs_min"] = s["slope_bytes"] / minimum if s.get("slope_bytes") else None
            ratios = [r["time_vs_ckpt"] for r in mine if r.get("time_vs_ckpt")]
            s["time_vs_ckpt"] = statistics.median(ratios) if ratios else None
            top = max(mine, key=lambda r: r["tokens"])
            s["max_tokens_measured"] = max((r["tokens"] for r in ok), default=None)
            s["max_tokens"] = top["tokens"]
            peak = top["peak_bytes"] if top["status"] == "ok" else top.get("predicted_bytes")
            s["peak_at_max_gib"] = None if peak is None else peak / 2**30
            s["max_status"] = top["status"]
            out.append(s)
    for layout in LAYOUTS:
        ref = next((s for s in out if (s["layout"], s["path"]) == (layout, BASELINE_PATH)), None)
        for s in out:
            if s["layout"] == layout and ref and ref.get("slope_bytes") and s.get("slope_bytes"):
                s["slope_vs_ckpt"] = s["slope_bytes"] / ref["slope_bytes"]
    return out


def acceptance_lines(summary: Sequence[dict], rows: Sequence[dict], goal: float = 1.5,
                     vocab: Optional[int] = None) -> list[str]:
    """The issue's checks in words: ckpt slope vs the minimum, hf / ckpt slope, the longest single
    step; with ``vocab``, how many fp32 [N, V] buffers HF's slope over the fused one amounts to."""
    lines = []
    for s in summary:
        if s["path"] in CKPT_PATHS and s.get("slope_vs_min") is not None:
            ok = "MET" if s["slope_vs_min"] <= goal else "MISSED"
            lines.append(f"{s['layout']}: {s['path']} slope {s['slope_kib_per_token']:.2f} KiB/token = "
                         f"{s['slope_vs_min']:.2f} x the trunk-only minimum {s['min_kib_per_token']:.2f} KiB/token "
                         f"(goal <= {goal}: {ok})")
        if s["path"] == "hf_default" and s.get("slope_vs_ckpt") is not None:
            lines.append(f"{s['layout']}: hf_default slope / fused_ckpt slope = {s['slope_vs_ckpt']:.1f} (same run)")
            fused = next((f for f in summary if (f["layout"], f["path"]) == (s["layout"], "fused")), None)
            if vocab and fused is not None and fused.get("slope_bytes"):
                extra = s["slope_bytes"] - fused["slope_bytes"]
                lines.append(f"{s['layout']}: hf_default - fused slope = {extra / 1024:.1f} KiB/token = "
                             f"{extra / (4 * vocab):.2f} x V x 4 bytes: the fp32 [N, V] buffers HF holds at its peak")
    singles = [r for r in rows if r["layout"] == "single"]
    if singles:
        n = max(r["tokens"] for r in singles)
        for path in PATHS:
            r = next((r for r in singles if r["tokens"] == n and r["path"] == path), None)
            if r is None:
                continue
            if r["status"] == "ok":
                lines.append(f"single {n} tokens, {path}: step completed, peak +{r['peak_bytes'] / 2**30:.2f} GiB "
                             f"over a {r['base_rss_mib'] / 1024:.2f} GiB process ({r['time_s']:.0f} s)")
            elif r.get("predicted_bytes"):
                lines.append(f"single {n} tokens, {path}: not run, needs about +{r['predicted_bytes'] / 2**30:.1f} "
                             f"GiB by the linear fit of its shorter cases ({r['reason']})")
            else:
                lines.append(f"single {n} tokens, {path}: {r['status']} ({r['reason']})")
    return lines


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(meta: dict, shape: MemShape, rows: Sequence[dict], summary: Sequence[dict], plots: Sequence[str],
             loss_chunk: int) -> str:
    """memory.md of one run: setup, acceptance lines, summary table, per-case table, plots."""
    from .report import _table, run_lines

    out = [f"# Memory suite: one training step, peak memory vs tokens ({meta['machine']['date_utc']} UTC)", "",
           *run_lines(meta),
           f"- model: Qwen2, V={shape.vocab}, H={shape.hidden}, L={shape.layers}, heads {shape.heads} "
           f"(kv {shape.kv_heads}), MLP {shape.mlp}, tied embedding, sdpa, fp32; AdamW; chunked loss C={loss_chunk}",
           f"- trunk-only minimum (bytes/token, s=4): checkpointed 4[L H + 2H + 2 d_head + A_layer] = "
           f"{trunk_min_bytes_per_token(shape, True)}, without 4[L (H + A_layer) + 2H + 2 d_head] = "
           f"{trunk_min_bytes_per_token(shape, False)}, A_layer = 5H + 2H_kv + 4I + heads = {layer_activations(shape)}",
           "", *[f"- {line}" for line in acceptance_lines(summary, rows, vocab=shape.vocab)], "",
           _table(("layout", "path", "slope (KiB/token)", "trunk min (KiB/token)", "slope / min",
                   "slope / fused_ckpt", "time / fused_ckpt", "longest case (tokens)", "peak at longest (GiB)"),
                  [(s["layout"], s["path"], _fmt(s["slope_kib_per_token"], ".2f"), _fmt(s["min_kib_per_token"], ".2f"),
                    _fmt(s["slope_vs_min"], ".2f"), _fmt(s["slope_vs_ckpt"], ".2f"), _fmt(s["time_vs_ckpt"], ".2f"),
                    str(s["max_tokens"]), _fmt(s["peak_at_max_gib"], ".2f") +
                    ("" if s["max_status"] == "ok" else f" ({s['max_status']})")) for s in summary]),
           "", "Per case (peak = extra peak of the step over the process before it; slots = rows x row length):", "",
           _table(("layout", "tokens", "slots", "path", "peak (MiB)", "time (s)", "time / fused_ckpt", "status"),
                  [(r["layout"], str(r["tokens"]), str(r["slots"] or "–"), r["path"], _fmt(r["peak_mib"], ".1f")
                    if r["status"] == "ok" else f"~{_fmt(r['predicted_mib'], '.0f')} predicted",
                    _fmt(r["time_s"], ".2f"), _fmt(r["time_vs_ckpt"], ".2f"),
                    r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}") for r in rows]), ""]
    out += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(out) + "\n"


def run_suite(out: str, meta: dict, quick: bool = False, device: str = "cpu", max_gb: float = 8.0,
              paths: Iterable[str] = PATHS, layouts: Iterable[str] = LAYOUTS,
              mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, timeout_s: float = 1800, progress: bool = True,
              tokens: Optional[dict] = None, shape: Optional[MemShape] = None,
              loss_chunk: Optional[int] = None) -> tuple[list[dict], list[dict]]:
    """Run the suite and write memory.csv, memory_summary.csv, memory.md, memory_vs_tokens.png and
    meta.json into ``out``. Returns (case rows, summary rows)."""
    from .plots import memory_figure
    from .report import write_csv

    paths, layouts = list(paths), list(layouts)
    for name, got, valid in (("paths", paths, PATHS), ("layouts", layouts, LAYOUTS)):
        bad = [x for x in got if x not in valid]
        if bad or not got:
            raise ValueError(f"{name}={got!r} is invalid; valid choices: {', '.join(valid)}")
    if not max_gb > 0:
        raise ValueError(f"max_gb={max_gb!r} is invalid; expected a number of GiB > 0")
    shape = shape or (QUICK_SHAPE if quick else FULL_SHAPE)
    chunk = loss_chunk or (QUICK_LOSS_CHUNK if quick else FULL_LOSS_CHUNK)
    cases = plan_cases(quick, paths, layouts, device, tokens, shape, chunk)
    log.info("memory suite: %d cases, V=%d H=%d L=%d, budget %.1f GiB, device %s", len(cases), shape.vocab,
             shape.hidden, shape.layers, max_gb, device)
    t0 = time.perf_counter()
    rows = run_cases(cases, int(max_gb * 2**30), mmap_threshold, timeout_s, progress)
    summary = summarize(rows, shape)
    try:  # a shared machine: the load at the end says how noisy the step times are
        meta["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except (OSError, KeyError, TypeError):
        pass
    meta = {**meta, "suite": "memory", "shape": asdict(shape), "loss_chunk": chunk, "max_gb": max_gb,
            "mmap_threshold": mmap_threshold, "wall_s": meta.get("wall_s", time.perf_counter() - t0)}
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "memory.csv"), CASE_COLUMNS)
    write_csv(summary, os.path.join(out, "memory_summary.csv"), SUMMARY_COLUMNS)
    plot = os.path.join(out, "memory_vs_tokens.png")
    plots = [plot] if memory_figure(rows, summary, shape, plot) else []
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(markdown(meta, shape, rows, summary, plots, chunk))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for line in acceptance_lines(summary, rows, vocab=shape.vocab):
        log.info(line)
    return rows, summary
