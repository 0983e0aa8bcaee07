"""One trainer step on the tiny Qwen2 model: packed streams vs per-sample padding.

Both layouts run the same step (trunk -> fused SDAR loss -> backward per micro-batch, then one
AdamW step) on the same samples; only the layout differs:

    padded        one sample per row, rows of a micro-batch padded to its longest sample
    packed-rows   sdar_engine.packing.pack with rows capped at ``row_tokens`` (CPU/sdpa default)
    packed-stream pack with one stream per micro-batch (what flash-attn varlen wants)

tokens/s counts real (prompt + response) tokens; padding fraction = padded slots / all slots.
"""
from __future__ import annotations

import importlib
import random
import time
from typing import Any, Optional, Sequence

import torch

LAYOUTS = ("padded", "packed-rows", "packed-stream")
TRAINER_MODULES = ("sdar_engine.packing", "sdar_engine.model")


def missing_piece() -> Optional[str]:
    """Why the trainer benchmark cannot run yet (a module or function missing), else None."""
    needs = {"sdar_engine.packing": ("pack", "Sample", "MicroBatch", "describe"),
             "sdar_engine.model": ("head_forward",)}
    for mod_name, names in needs.items():
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not landed yet"
            return f"{mod_name} is not importable: {exc!r}"
        absent = [n for n in names if not hasattr(mod, n)]
        if absent:
            return f"{mod_name} lacks {absent}"
    return None


def tiny_model(hidden: int = 128, layers: int = 2, vocab: int = 2048, seed: int = 0) -> Any:
    """The tiny preset's architecture (Qwen2, tied head, sdpa), random weights, train mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdar_engine.model import attach_head_forward

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * hidden,
                      max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.train()
    attach_head_forward(model)
    return model


def make_samples(count: int, vocab: int, prompt_len: tuple[int, int] = (32, 384),
                 response_len: tuple[int, int] = (8, 128), seed: int = 0) -> list:
    """Samples with uniform random prompt/response lengths and filled old/teacher log-probs."""
    from sdar_engine.packing import Sample

    rng = random.Random(seed)
    out = []
    for i in range(count):
        p, r = rng.randint(*prompt_len), rng.randint(*response_len)
        ids = [rng.randrange(1, vocab) for _ in range(p + r)]
        old = -torch.rand(r) * 6
        out.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], advantage=rng.gauss(0, 1),
                          group=i // 8, episode=i, old_logp=old, teacher_logp=old + torch.randn(r)))
    return out


def padded_batches(samples: Sequence, per_batch: int, pad_id: int = 0) -> list:
    """Classic layout: micro-batches of ``per_batch`` samples in arrival order, one per row."""
    from sdar_engine.packing import MicroBatch

    micro = []
    for start in range(0, len(samples), per_batch):
        idx = list(range(start, min(start + per_batch, len(samples))))
        width = max(samples[i].length() for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        pos = torch.arange(width).repeat(len(idx), 1)  # pads continue positions: causal, unseen
        targets = torch.zeros(len(idx) * width, dtype=torch.long)
        seg = torch.zeros(len(idx) * width, dtype=torch.long)
        mask = torch.zeros(len(idx) * width)
        slices = []
        for r, i in enumerate(idx):
            stream = samples[i].prompt_ids + samples[i].response_ids
            n, p = len(stream), len(samples[i].prompt_ids)
            ids[r, :n] = torch.tensor(stream)
            flat = r * width
            targets[flat:flat + n - 1] = torch.tensor(stream[1:])
            seg[flat:flat + width] = r
            slices.append(slice(flat + p - 1, flat + n - 1))
            mask[slices[-1]] = 1.0
        micro.append(MicroBatch(ids, pos, targets, mask, seg, idx, slices,
                                sum(samples[i].length() for i in idx)))
    return micro


def layout(samples: Sequence, name: str, max_tokens: int, per_batch: int, row_tokens: int) -> list:
    """Micro-batches of ``samples`` in layout ``name`` (see LAYOUTS)."""
    from sdar_engine.packing import pack

    if name == "padded":
        return padded_batches(samples, per_batch)
    if name == "packed-rows":
        return pack(samples, max_tokens, row_tokens=row_tokens)
    if name == "packed-stream":
        return pack(samples, max_tokens, row_tokens=None)
    raise ValueError(f"layout={name!r} is invalid; valid choices: {', '.join(LAYOUTS)}")


def train_step(model: Any, optimizer: torch.optim.Optimizer, micro: Sequence, samples: Sequence,
               loss_cfg: Any) -> float:
    """Forward + backward of every micro-batch (global token-mean normalizer), one optimizer step."""
    from sdar_kernels import fused_linear_sdar_loss

    from sdar_engine.model import head_forward

    norm = torch.tensor(float(sum(len(s.response_ids) for s in samples)))
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro:
        extra = {"advantages": mb.per_token(samples, "advantage"),
                 "old_logprobs": mb.per_token(samples, "old_logp"),
                 "teacher_logprobs": mb.per_token(samples, "teacher_logp")}

        def head(hidden, weight, bias, mb=mb, extra=extra):
            return fused_linear_sdar_loss(hidden, weight, mb.targets, loss_mask=mb.loss_mask,
                                          segment_ids=mb.segment_ids, normalizer=norm, bias=bias,
                                          config=loss_cfg, **extra).loss

        loss = head_forward(model, mb.input_ids, mb.position_ids, head)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def pad_fraction(micro: Sequence) -> float:
    """Padded slots / all slots of the micro-batches' rows."""
    slots = sum(int(m.input_ids.numel()) for m in micro)
    return 1.0 - sum(m.num_tokens for m in micro) / max(slots, 1)


def bench_layouts(samples: Sequence, model: Any, max_tokens: int = 4096, per_batch: int = 8,
                  row_tokens: int = 512, repeats: int = 2, layouts: Sequence[str] = LAYOUTS) -> list[dict]:
    """Time one trainer step per layout (after one warm-up step), interleaved round-robin so all
    layouts see the same machine load. Returns one row per layout with tokens_per_s and ratios."""
    from sdar_kernels import LossConfig

    cfg = LossConfig.preset("sdar", kl_coef=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    micro = {name: layout(samples, name, max_tokens, per_batch, row_tokens) for name in layouts}
    real = sum(s.length() for s in samples)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for name in layouts:
        train_step(model, opt, micro[name], samples, cfg)  # warm-up
    for _ in range(repeats):
        for name in layouts:
            t = time.perf_counter()
            train_step(model, opt, micro[name], samples, cfg)
            times[name].append(time.perf_counter() - t)
    rows = []
    for name in layouts:
        best = sorted(times[name])[len(times[name]) // 2]
        rows.append({"suite": "trainer", "layout": name, "samples": len(samples), "real_tokens": real,
                     "micro_batches": len(micro[name]), "rows": sum(int(m.input_ids.shape[0]) for m in micro[name]),
                     "slots": sum(int(m.input_ids.numel()) for m in micro[name]),
                     "pad_frac": pad_fraction(micro[name]), "time_s": best, "tokens_per_s": real / best})
    return _trainer_ratios(rows)


def _trainer_ratios(rows: list[dict]) -> list[dict]:
    pad = next((r for r in rows if r["layout"] == "padded"), None)
    for r in rows:
        r["speedup_vs_padded"] = r["tokens_per_s"] / pad["tokens_per_s"] if pad else None
        # the ideal speed-up if compute were proportional to slots: 1 / (1 - padded pad_frac)
        r["ideal_speedup"] = 1.0 / (1.0 - pad["pad_frac"]) if pad else None
        r["goal_met"] = (r["speedup_vs_padded"] >= 0.9 * r["ideal_speedup"]) if pad and r is not pad else None
    return rows
