"""Time and peak memory of one update step under each memory lever, side by side (one process).

    python -m sdar_benchmarks.lever_timing [--hidden 256 --layers 4 --tokens 4096 --repeats 3]

Builds a small Qwen2 (the tiny preset, sized by the flags) in a temporary directory, one model per
row, then runs ``--repeats`` interleaved rounds of one ``policy_update`` step per row (after one
warm-up each) on the same synthetic step samples, GRPO loss, AdamW: median CPU and wall seconds
per step and the step's extra peak memory (RSS high-water above the RSS before it on CPU,
allocator peak on CUDA), each also as a ratio to the all-off row. Prints a markdown table
(docs/memory_levers.md holds a measured one).
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from typing import Any, Callable

import torch

log = logging.getLogger("sdar_benchmarks.lever_timing")


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(n)]


def _samples(n: int, length: int, vocab: int, seed: int = 0) -> list:
    from sdar_engine.packing import Sample

    rng = random.Random(seed)
    out = []
    for k in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        s = Sample(prompt_ids=ids[: length // 2], response_ids=ids[length // 2:], advantage=rng.uniform(-1, 1),
                   episode=k)
        s.old_logp = torch.full((length - length // 2,), -6.0)
        out.append(s)
    return out


def _step_runner(model: Any, samples: list, max_tokens: int) -> Callable[[], None]:
    from sdar_kernels import LossConfig

    from sdar_engine.update import policy_update

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = LossConfig.preset("grpo", kl_coef=0.0)
    return lambda: policy_update(model, opt, samples, cfg, max_tokens=max_tokens, grad_clip=1.0)


def measure(runs: list[Callable[[], None]], device: torch.device, repeats: int) -> list[tuple[float, float, int]]:
    """Per runner: (median wall s, median CPU s of this process, largest extra peak bytes) over
    ``repeats`` rounds after one warm-up each. Rounds interleave the runners, so load from other
    processes spreads over all of them; CPU seconds (``time.process_time``) are what it barely
    touches, on a shared machine the ratio to trust."""
    from sdar_engine.memory_levers import PeakMeter

    meter = PeakMeter(device)
    for run in runs:
        run()
    wall: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    peaks: list[list[int]] = [[] for _ in runs]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            base = meter.current()
            meter.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            peaks[k].append(meter.peak() - base)
    return [(statistics.median(w), statistics.median(c), max(p)) for w, c, p in zip(wall, cpu, peaks)]


def main(argv: list[str] | None = None) -> int:
    from sdar_kernels import LossConfig

    from sdar_engine import memory_levers as ml
    from sdar_engine.model import ModelConfig, build_tiny, load_policy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (samples of 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_cfg = dict(tiny_hidden=args.hidden, tiny_layers=args.layers, tiny_heads=4, tiny_kv_heads=2,
                    tiny_vocab=args.vocab, tiny_max_positions=4096)
    forced = device.type == "cpu"  # on a CPU activation offload is a logged no-op: time its hooks alone
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(tmp, _corpus(2000), ModelConfig(**base_cfg))

        def load(**levers):
            model, _ = load_policy(ModelConfig(path=path, attn="sdpa", **base_cfg, **levers), device)
            return model

        vocab = int(load().config.vocab_size)
        samples = _samples(args.tokens // 256, 256, vocab)
        cases: list[tuple[str, dict, int]] = [
            ("all off", {}, args.tokens),
            ("model.grad_checkpointing", {"grad_checkpointing": True}, args.tokens),
            ("model.activation_offload" + (" (CPU: hooks forced on, copies are no-ops)" if forced else ""),
             {"activation_offload": True}, args.tokens),
            (f"algo.max_tokens={args.tokens // 4}", {}, args.tokens // 4),
            (f"algo.max_tokens={args.tokens // 16}", {}, args.tokens // 16),
        ]
        runs = [_step_runner(load(**levers), samples, budget) for _, levers, budget in cases]
        if forced:
            ml.offload_supported = lambda d: True  # only the activation_offload model has the flag set
        (_, _, base_peak), = measure(runs[:1], device, 1)
        # the guard: probe once; its cap = static + optimizer state + half the all-off step's peak
        model = load()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        cap = (ml.PeakMeter(device).current() + ml.optimizer_state_bytes(opt, device) + base_peak / 2) / ml.GIB
        t0 = time.perf_counter()
        b = ml.measure_budget(model, opt, LossConfig.preset("grpo", kl_coef=0.0), cap, args.tokens, 256)
        probe_s = time.perf_counter() - t0
        cases.append((f"algo.max_memory_gb={cap:.3f} (static + half the all-off peak) -> budget {b.budget_tokens}",
                      {}, b.budget_tokens))
        runs.append(_step_runner(model, samples, b.budget_tokens))
        results = measure(runs, device, args.repeats)
    notes = [""] * (len(cases) - 1) + [f"probe {probe_s:.1f} s once; {b.per_token_bytes / 1024:.1f} KiB/token"]
    w0, c0, p0 = results[0]
    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {vocab}; {args.tokens} tokens per step "
          f"(samples of 256), GRPO loss, AdamW, {args.threads} thread(s), device {device}, "
          f"median of {args.repeats} interleaved rounds")
    print("| lever | CPU s / step | x all-off | wall s / step | x all-off | step peak MiB | x all-off | note |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, _, _), (w, c, pk), note in zip(cases, results, notes):
        print(f"| {name} | {c:.2f} | {c / c0:.2f} | {w:.2f} | {w / w0:.2f} | {pk / 2**20:.1f} | "
              f"{pk / max(p0, 1):.2f} | {note} |")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    raise SystemExit(main())
