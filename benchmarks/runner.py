"""Run kernel cases, each in a fresh subprocess, and collect one result row per case.

A row is a flat dict (CSV-ready): the Case fields, status ("ok", "skipped", "failed"), reason,
time_s (median of the timed calls), time_min_s, peak_mib, mem_method, warmup_s, value, plus the
ratios filled in by ``add_ratios`` (vs the naive backend of the same shape, same run).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from typing import Iterable, Optional

from .loss_cases import PRESET, Case, skip_reason
from .worker import RESULT_PREFIX

log = logging.getLogger("sdar_bench")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory_budget() -> int:
    """Bytes a naive case may use: 90% of MemAvailable now (CPU), 80% of free GPU memory."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.9 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 * 2**30


def _row(case: Case, status: str, reason: str = "", **extra) -> dict:
    row = {**case.to_dict(), "status": status, "reason": reason, "time_s": None, "time_min_s": None,
           "peak_mib": None, "mem_method": "", "warmup_s": None, "value": None, "repeats": 0}
    row.update(extra)
    return row


def run_case(case: Case, warmup: int = 1, repeats: int = 3, timeout_s: float = 900,
             budget: Optional[int] = None) -> dict:
    """One case in a fresh ``python -m sdar_benchmarks.worker`` process; never raises for a failed case."""
    reason = skip_reason(case, budget)
    if reason:
        log.info("skip %s: %s", case.label, reason)
        return _row(case, "skipped", reason)
    spec = json.dumps({"case": case.to_dict(), "warmup": warmup, "repeats": repeats})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "sdar_benchmarks.worker", spec], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("fail %s: timed out after %.0f s", case.label, timeout_s)
        return _row(case, "failed", f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1][:300]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail
        log.warning("fail %s: rc=%s %s", case.label, proc.returncode, why)
        return _row(case, "failed", f"rc={proc.returncode}: {why}")
    res = json.loads(lines[-1][len(RESULT_PREFIX):])
    times = res["times_s"]
    row = _row(case, "ok", time_s=statistics.median(times), time_min_s=min(times),
               peak_mib=res["peak_bytes"] / 2**20, mem_method=res["mem_method"],
               warmup_s=res["warmup_s"], value=res["value"], repeats=len(times))
    log.info("ok   %s: time %.3f s (min %.3f, %d calls) peak %.1f MiB [%s]", case.label, row["time_s"],
             row["time_min_s"], row["repeats"], row["peak_mib"], row["mem_method"])
    return row


def add_ratios(rows: list[dict], baseline: str = "naive") -> list[dict]:
    """Fill time_vs_naive / mem_vs_naive / value_diff on every ok row whose shape has an ok
    ``baseline`` row measured in the same run (None elsewhere). The baseline of a shape is its
    naive row of the default preset ("sdar") when there is one; value_diff compares losses of
    different presets too (it is only meaningful within one preset)."""
    key = lambda r: (r["suite"], r["n"], r["v"], r["h"], r["dtype"], r["device"])  # noqa: E731
    base: dict = {}
    for r in rows:
        if r["backend"] == baseline and r["status"] == "ok":
            if key(r) not in base or r.get("preset", PRESET) == PRESET:
                base[key(r)] = r
    for r in rows:
        b = base.get(key(r))
        ok = b is not None and r["status"] == "ok"
        r["time_vs_naive"] = r["time_s"] / b["time_s"] if ok and b["time_s"] else None
        r["mem_vs_naive"] = r["peak_mib"] / b["peak_mib"] if ok and b["peak_mib"] else None
        r["value_diff"] = abs(r["value"] - b["value"]) if ok else None
    return rows


def run_cases(cases: Iterable[Case], warmup: int, repeats: int, progress: bool = True,
              timeout_s: float = 900) -> list[dict]:
    """Every case in order (cases of one shape should be adjacent: back-to-back ratios)."""
    from sdar_engine.progress import progress as progress_bar

    cases = list(cases)
    budget = memory_budget()
    rows = []
    bar = progress_bar(cases, desc="bench", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.label)
        w = warmup if case.n * case.v < 2**28 or case.device != "cpu" else 0  # huge CPU cases: 1 cold call
        rows.append(run_case(case, w, repeats if w else 1, timeout_s, budget))
    return add_ratios(rows)
