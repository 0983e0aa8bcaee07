"""Run memory-suite cases, each in its own freshly forked process, and print one JSON line per case.

    python -m sdar_benchmarks.step_memory_worker        # reads one JSON case spec per stdin line

A case is ONE full training step (trunk forward + loss + backward + AdamW step) of the tiny
Qwen2 family on one micro-batch (benchmarks/step_memory.py defines the cases and the paths).
Importing torch + transformers costs 10-15 s on the shared 2-core box, so this process imports
once and then forks a child per case (a fork server): the child builds its model and batch,
runs a small warm-up step (AdamW state, lazy initialisation), resets the RSS high-water mark
(benchmarks/memory.py PeakMeter) and measures the step. The parent never runs a torch op
(forking after the OpenMP pool exists is unsafe) and never touches CUDA (the child does).

The parent watches the child's VmRSS every 20 ms and kills it above ``rss_limit_bytes``, so a
case that outgrows its budget fails alone instead of pushing the shared machine into swap/OOM.
Output per case: ``RESULT {json}`` with status ok | failed, peak_bytes (extra peak of the
measured step), time_s, loss, rows/slots/real tokens, layer0_forwards (forward calls of decoder
layer 0's MLP during the step: 2 when checkpointing recomputes it) and, when asked, largest_numel (the largest
tensor any op produced during the step, counted by a TorchDispatchMode).
"""
from __future__ import annotations

import gc
import json
import os
import random
import signal
import sys
import time
from typing import Any, Optional

from .worker import RESULT_PREFIX

PATHS = ("hf_default", "fused", "fused_ckpt", "fused_ckpt_chunked")
LAYOUTS = ("single", "packed")
PACKED_SAMPLE_TOKENS = (1024, 2048)   # packed layout: samples of about this many tokens
PROMPT_FRAC = 0.25                    # first quarter of each sample is prompt (no loss), the rest response
WARMUP_TOKENS = 64


def build_model(spec: dict) -> Any:
    """Tied-embedding Qwen2 (the tiny preset's architecture) of the case's shape, sdpa, train mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdar_engine.model import attach_head_forward, enable_checkpointing

    cfg = Qwen2Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                      intermediate_size=spec["intermediate"], max_position_embeddings=max(4096, spec["tokens"]),
                      tie_word_embeddings=True, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(spec.get("seed", 0))
    model = Qwen2ForCausalLM(cfg).to(spec["device"])
    if spec["path"] in ("fused_ckpt", "fused_ckpt_chunked"):
        enable_checkpointing(model)  # the engine's own switch (ModelConfig.grad_checkpointing)
    model.train()
    attach_head_forward(model)
    return model


def sample_lengths(tokens: int, layout: str, seed: int = 0) -> list[int]:
    """Sample lengths summing to ``tokens``: one sample (single), or k = ceil(tokens / 1600) samples
    of ~1-2k tokens (packed): base = tokens / k, pairs base + j / base - j with j <= base / 4, so
    the longest is < 2 x the shortest and packing.pack puts exactly one sample in each row. (Two
    samples sharing a row would make HF build a [rows, 1, L, L] block-diagonal sdpa mask for the
    whole micro-batch: a per-token cost of its own, ~5 L bytes, that only some lengths would pay.)"""
    if layout == "single" or tokens < 2 * PACKED_SAMPLE_TOKENS[0]:
        return [tokens]
    k = -(-tokens // 1600)
    base, extra = divmod(tokens, k)
    rng = random.Random(seed)
    out = [base + (i < extra) for i in range(k)]
    for i in range(0, k - 1, 2):
        j = rng.randint(0, base // 4)
        out[i], out[i + 1] = out[i] + j, out[i + 1] - j
    return out


def make_batch(spec: dict, model: Any, tokens: Optional[int] = None) -> tuple[Any, list]:
    """(micro-batch, samples) laid out by sdar_engine.packing.pack: single = one row of one sample,
    packed = the engine's CPU layout (row_tokens from logprobs.default_row_tokens)."""
    import torch

    from sdar_engine.logprobs import default_row_tokens
    from sdar_engine.packing import Sample, pack

    tokens = tokens or spec["tokens"]
    rng = random.Random(spec.get("seed", 0))
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    samples = []
    for i, n in enumerate(sample_lengths(tokens, spec["layout"], spec.get("seed", 0))):
        p = min(n - 1, max(1, int(n * PROMPT_FRAC)))
        ids = torch.randint(1, spec["vocab"], (n,), generator=gen).tolist()
        old = -torch.rand(n - p, generator=gen) * 6
        samples.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], advantage=rng.gauss(0, 1), episode=i,
                              old_logp=old, teacher_logp=old + torch.randn(n - p, generator=gen)))
    row_tokens = default_row_tokens(model) if spec["layout"] == "packed" else None
    micro = pack(samples, max_tokens=tokens, row_tokens=row_tokens)
    assert len(micro) == 1, f"{tokens} tokens must pack into one micro-batch, got {len(micro)}"
    return micro[0].to(spec["device"]), samples


def loss_config(spec: dict) -> Any:
    """SDAR preset on the torch backend (no KL: no reference pass). The chunked path caps the
    loss's row tiles at ``loss_chunk`` tokens (LossConfig.token_chunk)."""
    from sdar_kernels import LossConfig

    extra = {"token_chunk": spec["loss_chunk"]} if spec["path"] == "fused_ckpt_chunked" else {}
    return LossConfig.preset("sdar", kl_coef=0.0, backend="torch", **extra)


def hf_labels(mb: Any) -> Any:
    """Labels for HF's own loss: HF shifts them (logits[:, t] scores labels[:, t+1]), so position
    t+1 holds the target of flat position t where the loss mask is on, -100 elsewhere."""
    import torch

    rows, width = mb.input_ids.shape
    mask = mb.loss_mask.view(rows, width) != 0
    labels = torch.full_like(mb.input_ids, -100)
    labels[:, 1:] = torch.where(mask[:, :-1], mb.input_ids[:, 1:], labels[:, 1:])
    return labels


def step(spec: dict, model: Any, opt: Any, mb: Any, samples: list) -> float:
    """One full training step of the case's path; returns the loss."""
    if spec["path"] == "hf_default":
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, labels=hf_labels(mb))
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())
    from .trainer_cases import train_step

    return train_step(model, opt, [mb], samples, loss_config(spec))


def largest_tensor_mode() -> Any:
    """A TorchDispatchMode whose ``largest`` is the most elements of any tensor an op returned."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    return LargestTensor()


def run_case(spec: dict) -> dict:
    """Build, warm up, measure one step (in the calling process). Returns the result dict."""
    import torch

    from .memory import PeakMeter

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    calls = {"n": 0}
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    warm_mb, warm_samples = make_batch({**spec, "layout": "single"}, model, tokens=WARMUP_TOKENS)
    step(spec, model, opt, warm_mb, warm_samples)  # allocates AdamW state: the measured step is steady-state
    mb, samples = make_batch(spec, model)
    opt.zero_grad(set_to_none=True)
    del warm_mb, warm_samples
    gc.collect()
    calls["n"] = 0
    meter = PeakMeter(spec["device"])
    base_rss = _rss()
    meter.start()
    t0 = time.perf_counter()
    if spec.get("trace_largest"):
        with largest_tensor_mode() as mode:
            loss = step(spec, model, opt, mb, samples)
        largest = mode.largest
    else:
        loss, largest = step(spec, model, opt, mb, samples), None
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = meter.stop()
    return {"status": "ok", "peak_bytes": peak, "mem_method": meter.method, "time_s": elapsed, "loss": loss,
            "base_rss_bytes": base_rss, "rows": int(mb.input_ids.shape[0]), "slots": int(mb.input_ids.numel()),
            "real_tokens": int(mb.num_tokens), "response_tokens": int(mb.num_response_tokens),
            "samples": len(samples), "layer0_forwards": calls["n"], "largest_numel": largest,
            "threads": torch.get_num_threads()}


def _rss(pid: Optional[int] = None) -> int:
    """VmRSS of ``pid`` (default: this process) in bytes; 0 when it is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def run_forked(spec: dict, rss_limit_bytes: Optional[int] = None, timeout_s: float = 900,
               case_fn: Optional[Any] = None) -> dict:
    """``(case_fn or run_case)(spec)`` in a forked child, watched for RSS and time; never raises for the case."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            res = (case_fn or run_case)(spec)
        except BaseException as exc:  # noqa: BLE001 - any failure is this case's result
            res = {"status": "failed", "reason": repr(exc)[:400]}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(res))
        os._exit(0)
    os.close(w)
    t0, peak_seen, why = time.monotonic(), 0, ""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        rss = _rss(pid)
        peak_seen = max(peak_seen, rss)
        if rss_limit_bytes and rss > rss_limit_bytes:
            why = f"killed: RSS {rss / 2**30:.2f} GiB above the limit {rss_limit_bytes / 2**30:.2f} GiB"
        elif time.monotonic() - t0 > timeout_s:
            why = f"killed: timed out after {timeout_s:.0f} s"
        if why:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    with os.fdopen(r) as f:
        text = f.read()
    if why or not text:
        code = os.waitstatus_to_exitcode(status) if not why else -9
        return {"status": "failed", "reason": why or f"child exited rc={code} without a result (out of memory?)",
                "watch_peak_rss_bytes": peak_seen}
    res = json.loads(text)
    res["watch_peak_rss_bytes"] = peak_seen
    return res


def serve(lines, out=sys.stdout, case_fn: Optional[Any] = None) -> None:
    """For each JSON line {"case": spec, "rss_limit_bytes": int|null, "timeout_s": float}: fork, run, print."""
    for line in lines:
        if not line.strip():
            continue
        msg = json.loads(line)
        res = run_forked(msg["case"], msg.get("rss_limit_bytes"), float(msg.get("timeout_s", 900)), case_fn)
        out.write(RESULT_PREFIX + json.dumps(res) + "\n")
        out.flush()


def main() -> int:
    # import once here (the point of the fork server); no torch op runs in this process
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Qwen2ForCausalLM  # noqa: F401

    import sdar_engine.logprobs  # noqa: F401
    import sdar_engine.model  # noqa: F401
    import sdar_engine.packing  # noqa: F401
    import sdar_kernels  # noqa: F401

    from . import trainer_cases  # noqa: F401

    print("READY", flush=True)
    serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
