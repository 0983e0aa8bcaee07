"""A study's table (markdown, CSV, JSON) and learning-curve plot from its finished runs.

Input: ``runs[method][seed]`` = the run record ``sdar_engine.study`` writes in each run's
``done.json``: ``final`` and ``best`` map a metric ("success" or "success/<task type>") to a
held-out success fraction; ``curve`` is a list of ``{"step": int, "<metric>": float}`` (step 0 is
the warm-start's eval). FINAL = the eval after the last RL step; BEST-SO-FAR = the max over the
evals at steps >= 1 (the warm-start eval excluded), each metric maximised on its own.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sdar_engine.study_stats import bootstrap_ci, mean, paired_diff, summary

KINDS = {"final": "FINAL (eval after the last RL step)",
         "best": "BEST-SO-FAR (max over evals at steps >= 1; warm-start eval excluded)"}


def metric_names(runs: dict[str, dict[int, dict]]) -> list[str]:
    """"success" first, then the per-type keys any run reported, sorted."""
    keys = {k for by_seed in runs.values() for r in by_seed.values() for k in r["final"]}
    return ["success"] + sorted(k for k in keys if k != "success")


def reference_method(methods: list[str]) -> str:
    """The baseline the paired differences are taken against: grpo if studied, else the first."""
    return "grpo" if "grpo" in methods else methods[0]


def build_table(runs: dict[str, dict[int, dict]], methods: list[str], resamples: int,
                seed: int) -> dict[str, Any]:
    """Per method x kind (final / best) x metric: mean, 95 % bootstrap interval over seeds, per-seed
    values, and the seed-paired difference vs the reference method (None for the reference)."""
    ref = reference_method(methods)
    metrics = metric_names(runs)
    table: dict[str, Any] = {"reference": ref, "level": 0.95, "resamples": resamples, "bootstrap_seed": seed,
                             "kinds": KINDS, "metrics": metrics, "methods": {}}
    for method in methods:
        by_seed = runs.get(method, {})
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for kind in KINDS:
            row[kind] = {}
            for metric in metrics:
                vals = {s: r[kind][metric] for s, r in sorted(by_seed.items()) if metric in r[kind]}
                cell = summary(list(vals.values()), resamples, seed)
                ref_vals = {s: r[kind][metric] for s, r in runs.get(ref, {}).items() if metric in r[kind]}
                cell["diff_vs_ref"] = None if method == ref else paired_diff(vals, ref_vals, resamples, seed)
                row[kind][metric] = cell
        table["methods"][method] = row
    return table


def _ci(cell: dict | None) -> str:
    if not cell or not cell.get("n"):
        return "–"
    return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def _diff(cell: dict | None) -> str:
    if not cell or not cell.get("n"):
        return "–"
    return f"{cell['mean']:+.3f} [{cell['lo']:+.3f}, {cell['hi']:+.3f}]"


def to_markdown(table: dict[str, Any], header: list[str]) -> str:
    """The overall table, then one per-task-type table; ``header`` lines go first."""
    ref, methods = table["reference"], list(table["methods"])
    lines = list(header) + [""]
    lines += [f"Held-out success, mean over seeds [95 % percentile-bootstrap interval, {table['resamples']} "
              f"resamples]; Δ = seed-paired difference vs {ref}.",
              f"FINAL = {KINDS['final'].split('(', 1)[1].rstrip(')')}; "
              f"BEST-SO-FAR = {KINDS['best'].split('(', 1)[1].rstrip(')')}.", "",
              f"| method | seeds | FINAL success | FINAL Δ vs {ref} | BEST-SO-FAR success | BEST-SO-FAR Δ vs {ref} |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        row = table["methods"][m]
        f, b = row["final"]["success"], row["best"]["success"]
        lines.append(f"| {m} | {len(row['seeds'])} | {_ci(f)} | {_diff(f['diff_vs_ref'])} | {_ci(b)} | "
                     f"{_diff(b['diff_vs_ref'])} |")
    types = [k for k in table["metrics"] if k != "success"]
    if types:
        lines += ["", "Per task type (each column maximised on its own for BEST-SO-FAR):", "",
                  f"| task type | method | FINAL success | FINAL Δ vs {ref} | BEST-SO-FAR success |",
                  "|---|---|---|---|---|"]
        for t in types:
            for m in methods:
                f = table["methods"][m]["final"].get(t)
                b = table["methods"][m]["best"].get(t)
                lines.append(f"| {t.split('/', 1)[1]} | {m} | {_ci(f)} | {_diff(f and f['diff_vs_ref'])} | {_ci(b)} |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    """Long format: one row per method x kind x metric."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "kind", "metric", "n_seeds", "mean", "ci_lo", "ci_hi", "per_seed",
                f"diff_vs_{table['reference']}", "diff_ci_lo", "diff_ci_hi"])
    for m, row in table["methods"].items():
        for kind in KINDS:
            for metric, cell in row[kind].items():
                d = cell["diff_vs_ref"] or {}
                w.writerow([m, kind, metric, cell["n"], _num(cell["mean"]), _num(cell["lo"]), _num(cell["hi"]),
                            " ".join(f"{v:.4f}" for v in cell["values"]), _num(d.get("mean")),
                            _num(d.get("lo")), _num(d.get("hi"))])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def write_tables(out: Path, table: dict[str, Any], header: list[str]) -> list[Path]:
    """table.md / table.csv / table.json under ``out``; returns the paths."""
    paths = [out / "table.md", out / "table.csv", out / "table.json"]
    paths[0].write_text(to_markdown(table, header))
    paths[1].write_text(to_csv(table))
    paths[2].write_text(json.dumps({"header": header, **table}, indent=2))
    return paths


def curve_bands(runs: dict[str, dict[int, dict]], metric: str, resamples: int,
                seed: int) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per method: (step, mean, lo, hi) over the seeds that evaluated at that step."""
    out = {}
    for method, by_seed in runs.items():
        steps = sorted({p["step"] for r in by_seed.values() for p in r["curve"] if metric in p})
        pts = []
        for step in steps:
            vals = [p[metric] for r in by_seed.values() for p in r["curve"] if p["step"] == step and metric in p]
            lo, hi = bootstrap_ci(vals, resamples, seed)
            pts.append((step, mean(vals), lo, hi))
        out[method] = pts
    return out


def plot_curves(runs: dict[str, dict[int, dict]], methods: list[str], path: Path, title: str,
                resamples: int, seed: int) -> Path:
    """Held-out success vs RL step per method (mean over seeds, 95 % bootstrap band); one panel
    overall plus one per task type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = metric_names(runs)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        bands = curve_bands({m: runs[m] for m in methods if m in runs}, metric, resamples, seed)
        for i, method in enumerate(methods):
            pts = bands.get(method, [])
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts)
            n = len(runs[method])
            ax.plot(xs, ys, marker="osD^vP"[i % 6], color=colors[i % len(colors)], label=f"{method} ({n} seeds)")
            ax.fill_between(xs, lo, hi, color=colors[i % len(colors)], alpha=0.2)
        ax.set_title("held-out success" if metric == "success" else metric.split("/", 1)[1], fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylim(bottom=-0.02)  # the top autoscales: tiny-model successes are a few percent
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, title="mean, 95 % bootstrap band", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
