"""PNG plots of kernel results: time vs N and peak memory vs N per backend (log-log),
one panel per (V, H), one figure per suite and metric; at the acceptance shape, time and peak
memory ratios vs naive per backend (bars). Trainer: tokens/s per layout."""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

STYLE = {"naive": ("tab:red", "o", "naive (materialized logits)"),
         "compiled": ("tab:orange", "s", "torch.compile(naive)"),
         "torch": ("tab:blue", "D", "sdar_kernels torch backend (SDAR preset)"),
         "torch:liger-grpo": ("tab:cyan", "P", "sdar_kernels torch, Liger-matched GRPO config"),
         "triton": ("tab:green", "^", "sdar_kernels triton"),
         "liger": ("tab:purple", "v", "Liger-Kernel chunked GRPO")}
METRICS = {"time_s": ("time per call (s)", "time"), "peak_mib": ("peak extra memory (MiB)", "memory")}
RATIO = {"time_s": "time_vs_naive", "peak_mib": "mem_vs_naive"}


def style_key(r: dict) -> str:
    """STYLE key of a row: the backend, or "backend:preset" for a non-default preset (not liger)."""
    preset = r.get("preset") or "sdar"
    return r["backend"] if preset == "sdar" or r["backend"] == "liger" else f"{r['backend']}:{preset}"


def _panels(rows: Sequence[dict]) -> list[tuple[int, int, str]]:
    return sorted({(r["v"], r["h"], r["dtype"]) for r in rows})


def _annotate_ratios(ax, rows: Sequence[dict], metric: str, color: str, backend: str) -> None:
    """Write '×ratio vs naive' next to each non-naive point (the number the comparison is about)."""
    if backend == "naive":
        return
    for r in rows:
        ratio = r.get(RATIO[metric])
        if ratio is not None:
            ax.annotate(f"×{ratio:.2f}", (r["n"], r[metric]), textcoords="offset points", xytext=(8, -4),
                        color=color, fontsize=9,
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))


def kernel_figure(rows: Sequence[dict], suite: str, metric: str, path: str) -> bool:
    """One figure: ``metric`` vs N per backend, log-log, a panel per (V, H, dtype). False if no data."""
    ok = [r for r in rows if r["suite"] == suite and r["status"] == "ok" and r.get(metric)]
    if not ok:
        return False
    panels = _panels(ok)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    ylabel, word = METRICS[metric]
    for ax, (v, h, dtype) in zip(axes[0], panels):
        for backend, (color, marker, label) in STYLE.items():
            mine = sorted((r for r in ok if style_key(r) == backend and (r["v"], r["h"], r["dtype"]) == (v, h, dtype)),
                          key=lambda r: r["n"])
            if mine:
                ax.plot([r["n"] for r in mine], [r[metric] for r in mine], color=color, marker=marker, label=label,
                        linewidth=1.8, markersize=7)
                _annotate_ratios(ax, mine, metric, color, backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.2, y=0.15)
        ax.set_title(f"V={v:,}  H={h}  {dtype}", fontsize=11)
        ax.set_xlabel("tokens N")
        ax.grid(True, which="both", alpha=0.3)
        ns = sorted({r["n"] for r in ok})
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.minorticks_off() if len(ns) < 3 else None
    axes[0][0].set_ylabel(ylabel)
    handles, labels = [], []
    for ax in axes[0]:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(hnd)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    device = ok[0]["device"]
    fig.suptitle(f"{'SDAR loss fwd+bwd' if suite == 'loss' else 'log-prob pass (no grad)'}: {word} vs N "
                 f"({device}; ×r = ratio to naive, same run)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ratio_figure(rows: Sequence[dict], shape: tuple[int, int, int], path: str) -> bool:
    """Bars of time / naive and peak memory / naive per backend at one (N, V, H) loss shape
    (same run). False when fewer than two backends have ratios there."""
    n, v, h = shape
    ok = [r for r in rows if r["suite"] == "loss" and (r["n"], r["v"], r["h"]) == shape
          and r.get("time_vs_naive") is not None and r.get("mem_vs_naive") is not None]
    if len(ok) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    names = [STYLE.get(style_key(r), ("gray", "", style_key(r)))[2] for r in ok]
    colors = [STYLE.get(style_key(r), ("gray",))[0] for r in ok]
    panels = ((axes[0], "time_vs_naive", "time / naive"), (axes[1], "mem_vs_naive", "peak memory / naive"))
    for ax, key, title in panels:
        vals = [r[key] for r in ok]
        bars = ax.barh(range(len(ok)), vals, color=colors)
        for bar, val in zip(bars, vals):
            ax.annotate(f"×{val:.3g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=9)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(ok)), names if ax is axes[0] else [""] * len(ok), fontsize=9)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.margins(x=0.25)
    fig.suptitle(f"SDAR/GRPO loss fwd+bwd at N={n:,} V={v:,} H={h} {ok[0]['dtype']} ({ok[0]['device']}; "
                 "ratios to naive, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def trainer_figure(rows: Sequence[dict], path: str) -> bool:
    """Bar chart of tokens/s per layout, with each bar's padding fraction written on it."""
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["layout"] for r in rows]
    bars = ax.bar(names, [r["tokens_per_s"] for r in rows], color=["tab:red", "tab:blue", "tab:green"][:len(rows)])
    for bar, r in zip(bars, rows):
        ax.annotate(f"pad {r['pad_frac']:.0%}\n×{r['speedup_vs_padded']:.2f}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=9)
    pad = next((r for r in rows if r["layout"] == "padded"), None)
    if pad is not None and pad["pad_frac"] < 1:
        ideal = pad["tokens_per_s"] / (1 - pad["pad_frac"])
        ax.axhline(ideal, color="gray", linestyle="--", linewidth=1.2, label="padded / (1 - pad frac): ideal")
        ax.axhline(0.9 * ideal, color="gray", linestyle=":", linewidth=1.2, label="0.9 x ideal (goal)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_ylabel("real tokens / s (one optimizer step)")
    ax.set_title("trainer step, tiny model: packed vs padded")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(kernel_rows: Sequence[dict], trainer_rows: Sequence[dict], out_dir: str) -> list[str]:
    """Every plot that has data; returns their paths."""
    paths = []
    for suite in ("loss", "logprobs"):
        for metric, (_, word) in METRICS.items():
            path = os.path.join(out_dir, f"{suite}_{word}_vs_n.png")
            if kernel_figure(kernel_rows, suite, metric, path):
                paths.append(path)
    shapes = sorted({(r["n"], r["v"], r["h"]) for r in kernel_rows
                     if r["suite"] == "loss" and r["backend"] == "liger" and r.get("time_vs_naive") is not None})
    for shape in shapes:
        path = os.path.join(out_dir, "loss_ratios_N{}_V{}_H{}.png".format(*shape))
        if ratio_figure(kernel_rows, shape, path):
            paths.append(path)
    path = os.path.join(out_dir, "trainer_tokens_per_s.png")
    if trainer_figure(trainer_rows, path):
        paths.append(path)
    return paths


MEMORY_STYLE = {"hf_default": ("tab:red", "o", "HF default (logits [N,V] + CE)"),
                "fused": ("tab:orange", "s", "fused loss"),
                "fused_ckpt": ("tab:blue", "D", "fused + checkpointing"),
                "fused_ckpt_chunked": ("tab:green", "^", "fused + ckpt + chunked loss")}


def memory_figure(rows: Sequence[dict], summary: Sequence[dict], shape, path: str) -> bool:
    """Memory suite: extra peak of one step (GiB) vs slots per path, a panel per layout (log-log).
    Filled markers were measured, hollow ones extrapolated (not run: above the budget or run cap).
    Gray lines: the analytic trunk-only minimum per token (checkpointed: dashed, anchored at the
    fitted intercept of fused_ckpt; without: dotted, anchored at fused's), so a measured curve
    parallel to its gray line grows at exactly the minimum rate. False when nothing was measured."""
    from .step_memory import trunk_min_bytes_per_token

    shown = [r for r in rows if r.get("slots") and (r["status"] == "ok" or r.get("predicted_bytes"))]
    if not any(r["status"] == "ok" for r in shown):
        return False
    layouts = [lay for lay in ("single", "packed") if any(r["layout"] == lay for r in shown)]
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.4 * len(layouts), 4.8), squeeze=False)
    slope = {(s["layout"], s["path"]): s.get("slope_kib_per_token") for s in summary}
    for ax, layout in zip(axes[0], layouts):
        mine = [r for r in shown if r["layout"] == layout]
        xs = sorted({r["slots"] for r in mine})
        for ckpt, anchor, style in ((True, "fused_ckpt", "--"), (False, "fused", ":")):
            m = trunk_min_bytes_per_token(shape, ckpt)
            icpt = next((s.get("intercept_mib") for s in summary if (s["layout"], s["path"]) == (layout, anchor)), None)
            base = max(icpt or 0.0, 0.0) * 2**20
            ax.plot(xs, [(base + m * x) / 2**30 for x in xs], color="gray", linestyle=style, linewidth=1.4,
                    label=f"trunk-only minimum, {'checkpointed' if ckpt else 'no checkpointing'} "
                          f"({m / 1024:.1f} KiB/token){f' + {anchor} intercept' if base else ''}")
        for name, (color, marker, label) in MEMORY_STYLE.items():
            pts = sorted((r for r in mine if r["path"] == name), key=lambda r: r["slots"])
            if not pts:
                continue
            ys = [(r["peak_bytes"] if r["status"] == "ok" else r["predicted_bytes"]) / 2**30 for r in pts]
            k = slope.get((layout, name))
            ax.plot([r["slots"] for r in pts], ys, color=color, linewidth=1.6,
                    label=label + (f" ({k:.1f} KiB/token)" if k else ""))
            for r, y in zip(pts, ys):
                ax.plot([r["slots"]], [y], marker=marker, color=color, markersize=7,
                        markerfacecolor=color if r["status"] == "ok" else "white")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = [x for i, x in enumerate(xs) if i == 0 or x > 1.08 * xs[i - 1]]  # hf's slots differ by a few %
        ax.set_xticks(ticks, [f"{x / 1024:.3g}k" for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens per step (slots: rows x row length)")
        ax.set_ylabel("extra peak memory of one step (GiB)")
        ax.set_title(f"{layout}: V={shape.vocab:,} H={shape.hidden} L={shape.layers}", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    fig.suptitle(f"one training step (fwd + loss + bwd + AdamW), {device}; hollow = extrapolated, not run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
