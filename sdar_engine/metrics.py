"""Run observability: JSONL metrics per step, optional TensorBoard, a PNG of the curves.

One JSON object per line: ``{"step": int, "time": unix seconds, "<name>": float, ...}``.
Grep-able log lines go through the ``sdar`` logger.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger("sdar.metrics")

# Curves drawn by default (those present in the file); one panel each.
PLOT_KEYS = ("reward", "success", "eval/success", "gate_mean", "gate_active", "gap_mean",
             "ref_kl", "entropy_mean", "clip_frac", "loss", "tokens_per_s")
# Where an RL step's wall time goes, seconds of this process (rank 0 under torchrun), in step
# order: rollout = prompt + teacher_prompt + gen + env + rollout_other (resets, decoding, sample
# bookkeeping); then gather (all-gather + advantages), score_teacher, score_ref, old_logp (the
# rollout weights' log-probs), update (the PPO optimizer passes), sync (weights to the
# generator). time/step is the whole step.
PHASE_KEYS = ("time/prompt", "time/teacher_prompt", "time/gen", "time/env", "time/rollout_other",
              "time/gather", "time/score_teacher", "time/score_ref", "time/old_logp", "time/update",
              "time/sync", "time/step")
# Keys that measure the machine, not the run: excluded from exactness comparisons.
TIMING_KEYS = ("time", "step_seconds", "tokens_per_s", "gen_tokens_per_s", "peak_mem_mb",
               "rollout_seconds", "update_seconds", "score_seconds", "env_seconds",
               "eval/gen_tokens_per_s") + PHASE_KEYS


def step_phase_seconds(ro: Any, rollout_seconds: float) -> dict[str, float]:
    """The rollout's part of PHASE_KEYS from this process's ``Rollout`` (seconds)."""
    parts = {"time/prompt": ro.prompt_seconds, "time/teacher_prompt": ro.teacher_prompt_seconds,
             "time/gen": ro.gen_seconds, "time/env": ro.env_seconds}
    parts["time/rollout_other"] = max(0.0, rollout_seconds - sum(parts.values()))
    return parts


def format_phases(rec: dict[str, Any]) -> str:
    """``gen=1.23 env=0.40 ... step=3.10`` for the PHASE_KEYS present (seconds, 3 significant
    digits), each with its share of the step, e.g. ``gen=1.23(40%)``."""
    total = rec.get("time/step") or 0.0
    parts = []
    for key in PHASE_KEYS:
        v = rec.get(key)
        if v is None:
            continue
        share = f"({100 * v / total:.0f}%)" if total > 0 and key != "time/step" else ""
        parts.append(f"{key[len('time/'):]}={v:.3g}{share}")
    return " ".join(parts)


def to_float(value: Any) -> float:
    """0-d tensors / numbers -> float (one host sync per tensor)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak accelerator memory (CUDA) or the process's peak resident set size (CPU), MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class MetricsLogger:
    """Appends per-step metrics to ``<run_dir>/metrics.jsonl`` (and TensorBoard if installed).

    ``enabled=False`` (every rank but 0 under torchrun) writes nothing: the metrics a step
    returns are already reduced over ranks, so one writer records each step once.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True,
                 filename: str = "metrics.jsonl", enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                log.info("tensorboard not installed: metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records with step > ``step`` (a resumed run rewrites what follows its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as fh:
            for rec in keep:
                fh.write(json.dumps(rec) + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Write one record; returns the float-converted metrics."""
        rec: dict[str, Any] = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            f = to_float(v)
            rec[k] = f if math.isfinite(f) else None
        if not self.enabled:
            return rec
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def format_metrics(rec: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    """``k=v`` pairs for a log line (4 significant digits)."""
    keys = list(keys) if keys is not None else [k for k in rec if k not in ("time",)]
    parts = []
    for k in keys:
        v = rec.get(k)
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif v is not None:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def plot_metrics(jsonl: str | os.PathLike, png: str | os.PathLike,
                 keys: Iterable[str] = PLOT_KEYS, title: str = "") -> str | None:
    """Draw one panel per present key (x = step); returns the PNG path or None if no data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl) if Path(jsonl).exists() else []
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not present:
        log.warning("no metrics to plot in %s", jsonl)
        return None
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)
