"""Results files: CSV, markdown tables (ratios vs naive first), machine description."""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import subprocess
from typing import Iterable, Optional, Sequence

KERNEL_COLUMNS = ("suite", "backend", "preset", "n", "v", "h", "dtype", "device", "status", "time_s", "time_vs_naive",
                  "peak_mib", "mem_vs_naive", "mem_method", "repeats", "warmup_s", "value", "value_diff",
                  "token_chunk", "vocab_chunk", "reason")
TRAINER_COLUMNS = ("layout", "samples", "real_tokens", "micro_batches", "rows", "slots", "pad_frac", "time_s",
                   "tokens_per_s", "speedup_vs_padded", "ideal_speedup", "goal_met")
ENV_COLUMNS = ("env", "policy", "batch", "env_steps", "steps_per_s", "reset_s", "win_rate", "mean_score",
               "status", "reason")


def machine_info() -> dict:
    """CPU model and cores (lscpu), GPU name when CUDA is up, torch version, date (UTC)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def code_version() -> str:
    """git commit of the checkout (+ "-dirty" when tracked files differ), or "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def _seconds(value) -> str:
    if not isinstance(value, float):
        return _fmt(value)
    return f"{value:.0f}" if value >= 100 else (f"{value:.2f}" if value >= 1 else f"{value:.3g}")


def write_csv(rows: Sequence[dict], path: str, columns: Optional[Sequence[str]] = None) -> None:
    """All rows, union of keys (``columns`` first, in order)."""
    keys = list(columns or [])
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def backend_label(r: dict) -> str:
    """The backend name, with the preset when it is not the default "sdar" (e.g. "torch (liger-grpo)")."""
    preset = r.get("preset") or "sdar"
    if r["backend"] == "liger":
        return "liger (chunked GRPO)"
    return r["backend"] if preset == "sdar" else f"{r['backend']} ({preset})"


def kernel_table(rows: Sequence[dict]) -> str:
    """One line per case: ratios vs naive (same run), then absolute time and peak memory."""
    header = ("suite", "N", "V", "H", "dtype", "backend", "time / naive", "peak mem / naive",
              "time (s)", "peak (MiB)", "mem method", "calls", "status")
    body = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        body.append((r["suite"], str(r["n"]), str(r["v"]), str(r["h"]), r["dtype"], backend_label(r),
                     _fmt(r.get("time_vs_naive"), ".2f"), _fmt(r.get("mem_vs_naive"), ".3f"),
                     _seconds(r.get("time_s")), _fmt(r.get("peak_mib"), ".1f"), r.get("mem_method") or "–",
                     str(r.get("repeats", 0)), status))
    return _table(header, body)


def trainer_table(rows: Sequence[dict]) -> str:
    header = ("layout", "real tokens", "slots", "pad frac", "tokens/s", "speed-up vs padded",
              "1/(1-pad frac of padded)", "≥ 0.9 × ideal")
    body = [(r["layout"], str(r["real_tokens"]), str(r["slots"]), _fmt(r["pad_frac"], ".3f"),
             _fmt(r["tokens_per_s"], ".1f"), _fmt(r["speedup_vs_padded"], ".2f"), _fmt(r["ideal_speedup"], ".2f"),
             _fmt(r["goal_met"])) for r in rows]
    return _table(header, body)


def env_table(rows: Sequence[dict]) -> str:
    header = ("env", "policy", "batch", "env steps", "steps/s", "reset (s)", "win rate", "status")
    body = [(r["env"], r.get("policy", "–"), _fmt(r.get("batch")), _fmt(r.get("env_steps")),
             _fmt(r.get("steps_per_s"), ".1f"), _fmt(r.get("reset_s"), ".2f"), _fmt(r.get("win_rate"), ".2f"),
             r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}") for r in rows]
    return _table(header, body)


def _at(rows: Sequence[dict], backend: str, n: int, v: int, h: int, preset: str = "sdar") -> Optional[dict]:
    for r in rows:
        if (r["suite"] == "loss" and r["backend"] == backend and (r["n"], r["v"], r["h"]) == (n, v, h)
                and r["dtype"] == "float32" and (r.get("preset") or "sdar") == preset
                and r.get("time_vs_naive") is not None):
            return r
    return None


def acceptance_lines(rows: Sequence[dict], n: int = 4096, v: int = 151936, h: int = 896) -> list[str]:
    """The issue's goal at (n, v, h) fp32: torch peak <= naive / 8 and time <= 1.3 x naive; plus
    Liger's chunked GRPO loss against naive and against ours when it ran in the same run."""
    r = _at(rows, "torch", n, v, h)
    if r is None:
        return [f"acceptance case N={n} V={v} H={h} fp32: not measured in this run"]
    mem_ok, time_ok = r["mem_vs_naive"] <= 1 / 8, r["time_vs_naive"] <= 1.3
    lines = [f"acceptance N={n} V={v} H={h} fp32 (torch vs naive, same run): "
             f"peak memory ratio {r['mem_vs_naive']:.3f} (goal <= 0.125: {'MET' if mem_ok else 'MISSED'}), "
             f"time ratio {r['time_vs_naive']:.2f} (goal <= 1.30: {'MET' if time_ok else 'MISSED'})"]
    liger = _at(rows, "liger", n, v, h, "liger-grpo")
    if liger is not None and liger["time_s"] and liger["peak_mib"]:
        lines.append(f"Liger chunked GRPO vs naive (same run): time ratio {liger['time_vs_naive']:.2f}, "
                     f"peak memory ratio {liger['mem_vs_naive']:.3f}; ours (torch, sdar) / Liger: time "
                     f"{r['time_s'] / liger['time_s']:.2f}, peak memory {r['peak_mib'] / liger['peak_mib']:.2f}")
        same = _at(rows, "torch", n, v, h, "liger-grpo")
        if same is not None and same["time_s"]:
            t, m = same["time_s"] / liger["time_s"], same["peak_mib"] / liger["peak_mib"]
            lines.append(f"ours on Liger's GRPO config / Liger (same work): time {t:.2f}, peak memory {m:.2f}")
    return lines


def run_lines(meta: dict) -> list[str]:
    """The command, code revision, machine (load average at start and end) and wall time of a run."""
    m = meta["machine"]
    return [f"- command: `{meta['command']}` (code {meta.get('code', 'unknown')})",
            f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), GPU: {m['gpu']}, "
            f"torch {m['torch']}, 1-min load average at start {m.get('load_avg_1m', '?')}, at the end "
            f"{m.get('load_avg_1m_end', '?')}",
            f"- wall time of the run: {meta.get('wall_s', 0):.0f} s"]


def markdown_report(meta: dict, kernel_rows: Sequence[dict], trainer_rows: Sequence[dict],
                    env_rows: Sequence[dict], plots: Sequence[str]) -> str:
    """The results.md of one run: machine, command, acceptance line, tables, plot links."""
    out = [f"# sdar-engine benchmark results ({meta['machine']['date_utc']} UTC)", "", *run_lines(meta), ""]
    if kernel_rows:
        out += ["## Kernels", "", *acceptance_lines(kernel_rows), "",
                "Ratios are measured back to back in this run (each case in a fresh subprocess). Peak memory: "
                "`rss-hwm-reset` = peak RSS of the case's process during the measured call (VmHWM reset after "
                "warm-up) minus RSS before it; `cuda-max-allocated` = torch.cuda.max_memory_allocated delta.",
                "", kernel_table(kernel_rows), ""]
    if trainer_rows:
        out += ["## Trainer step (tiny model): packed vs padded", "", trainer_table(trainer_rows), ""]
    if env_rows:
        out += ["## Environments", "", env_table(env_rows), ""]
    out += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(out) + "\n"
