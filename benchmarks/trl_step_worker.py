"""Run trl-suite cases, each in its own freshly forked process, and print one JSON line per case.

    python -m sdar_benchmarks.trl_step_worker        # reads one JSON case spec per stdin line

A case is ONE TRL GRPO training step on a tiny random Llama (fp32): ``trainer.compute_loss(model,
inputs)`` + backward + AdamW step, on one prepared inputs dict of the kind TRL's
``_generate_and_score_completions`` returns (prompt_ids/mask [B, P], completion_ids/mask [B, T],
advantages [B], old_per_token_logps [B, T], num_items_in_batch). Paths (PATHS):

  trl       ``trl.GRPOTrainer``: its ``_compute_loss`` scores the completion through TRL's own
            fused lm_head (``add_fused_lm_head``: tiled log-probs + entropy, no [B, T, V] logits).
  adapter   ``sdar_kernels.integrations.trl.SDARGRPOTrainer`` (same constructor arguments): its
            ``_compute_loss`` runs our fused loss on the trunk's hidden states.
  trl_tiled trl with TRL's token tile cut from 4096 to ``TRL_TILE_TOKENS`` rows
            (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, a module constant GRPOConfig does not
            expose; its vocabulary tile stays 32768): at N = 4096, V = 32768 TRL's default tile is
            the whole [N, V] logits, and on a device without Triton its per-tile math runs as torch
            ops with several [tile, V] fp32 temporaries. 512 rows x 32768 = 64 MiB, the size of our
            loss's own row tile at this shape. Not TRL's default: a diagnostic of where the gap is.
  direct    the TRL trainer's model, but the loss written by hand: trunk hidden states shifted
            and sliced to the completion, flattened to [B T, H], into ``fused_linear_sdar_loss``
            with the LossConfig that equals TRL's loss type (benchmarks/PEER_SEMANTICS mapping).
            No adapter glue: the bare kernel cost, and a stand-in while the adapter is absent.

The fork-server plumbing (one import, one fork per case, RSS watchdog) is
benchmarks/step_memory_worker.py's ``serve``; peak memory is benchmarks/memory.py's PeakMeter
(CPU: RSS high-water mark of the measured step minus the RSS before it). Per case, after building
the trainer and the inputs, ``warmup`` full steps run first (AdamW state, lazy initialisation,
allocator), then the measured step. The first step's loss and total gradient norm are returned
too, taken on the seed's initial weights, so paths can be compared value for value.
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from typing import Any

PATHS = ("trl", "adapter", "direct", "trl_tiled")
TRL_TILE_TOKENS = 512
LOSS_TYPES = ("grpo", "bnpo", "dapo")
TOKENIZER_WORDS = 16  # the tokenizer is only consulted for pad/eos ids: no generation runs


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer built locally (no hub): ids 0 (<pad>) .. TOKENIZER_WORDS - 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, TOKENIZER_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="w1")


def build_model(spec: dict) -> Any:
    """Random LlamaForCausalLM of the case's shape (untied lm_head, sdpa, fp32, train mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv_heads"], max_position_embeddings=max(
                          2048, spec["prompt_len"] + spec["completion_len"]), use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(spec["seed"])
    return LlamaForCausalLM(cfg).to(spec["device"]).train()


def build_trainer(spec: dict, model: Any) -> Any:
    """TRL's GRPOTrainer (path trl, direct) or our SDARGRPOTrainer (path adapter) with the same
    GRPOConfig; generation never runs, so the dataset and reward are placeholders."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cls = GRPOTrainer
    if spec["path"] == "adapter":
        from sdar_kernels.integrations.trl import SDARGRPOTrainer as cls  # noqa: N813
    b = spec["batch"]
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_step_"), per_device_train_batch_size=b,
                      num_generations=b, max_completion_length=spec["completion_len"], loss_type=spec["loss_type"],
                      beta=0.0, report_to="none", use_cpu=spec["device"] == "cpu", bf16=False, save_strategy="no",
                      logging_steps=1)
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * b}), processing_class=tiny_tokenizer())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, read by _compute_loss
    return trainer


def make_inputs(spec: dict, trainer: Any) -> dict:
    """The prepared batch: random prompts [B, P] and completions [B, T] (with ``ragged``, row i keeps
    a random length in [T/2, T] and pads the rest, as after EOS), advantages ~ N(0, 1) [B], and
    old_per_token_logps = the model's own log-probs (TRL's scoring, no grad) + N(0, old_noise^2)
    so that both clip sides fire; with ``on_policy`` None instead (TRL's num_iterations = 1 case: the
    loss uses the current log-probs, detached)."""
    import torch

    b, p, t, dev = spec["batch"], spec["prompt_len"], spec["completion_len"], spec["device"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    completion_mask = torch.ones(b, t, dtype=torch.long)
    if spec.get("ragged"):
        keep = torch.randint(max(1, t // 2), t + 1, (b,), generator=gen)
        completion_mask = (torch.arange(t)[None] < keep[:, None]).long()
    completion_ids = torch.randint(TOKENIZER_WORDS, spec["vocab"], (b, t), generator=gen) * completion_mask
    inputs = {"prompt_ids": torch.randint(TOKENIZER_WORDS, spec["vocab"], (b, p), generator=gen),
              "prompt_mask": torch.ones(b, p, dtype=torch.long), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(b, generator=gen),
              "num_items_in_batch": completion_mask.sum()}
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    with torch.no_grad():
        from trl import GRPOTrainer

        ids = torch.cat([inputs["prompt_ids"], completion_ids.to(dev)], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, t)
    noise = torch.randn(b, t, generator=gen).to(dev) * spec["old_noise"]
    inputs["old_per_token_logps"] = None if spec.get("on_policy") else (logps + noise) * inputs["completion_mask"]
    inputs["ref_per_token_logps"] = None
    return inputs


def direct_config(loss_type: str) -> Any:
    """The LossConfig equal to TRL's loss type (beta 0, no entropy bonus, epsilon 0.2 both sides)."""
    from sdar_kernels import LossConfig

    agg = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean"}
    if loss_type not in agg:
        raise ValueError(f"loss_type={loss_type!r} is invalid; valid choices: {', '.join(agg)}")
    return LossConfig.preset("grpo", dual_clip=None, kl_coef=0.0, clip_low=0.2, clip_high=0.2, agg=agg[loss_type])


def direct_loss(spec: dict, trainer: Any, inputs: dict) -> Any:
    """Path ``direct``: trunk -> shift -> completion slice -> fused_linear_sdar_loss (flat [B T])."""
    import torch

    from sdar_kernels import fused_linear_sdar_loss

    model, b, t = trainer.model, spec["batch"], spec["completion_len"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    # the positions that predict each completion token: [B, T, H]
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, -t - 1:-1]
    mask = inputs["completion_mask"].reshape(-1)
    old = inputs["old_per_token_logps"]
    normalizer = {"grpo": float(b), "bnpo": None, "dapo": inputs["num_items_in_batch"]}[spec["loss_type"]]
    out = fused_linear_sdar_loss(
        hidden.reshape(b * t, -1), model.lm_head.weight, inputs["completion_ids"].reshape(-1),
        inputs["advantages"].repeat_interleave(t), None if old is None else old.reshape(-1), mask,
        segment_ids=torch.arange(b, device=ids.device).repeat_interleave(t), normalizer=normalizer,
        config=direct_config(spec["loss_type"]))
    return out.loss


def step(spec: dict, trainer: Any, opt: Any, inputs: dict) -> tuple[float, float]:
    """One training step of the case's path; returns (loss, total gradient L2 norm before the update)."""
    import torch

    opt.zero_grad(set_to_none=True)
    if spec["path"] == "direct":
        loss = direct_loss(spec, trainer, inputs)
    else:
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    gnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    opt.step()
    return float(loss.detach()), gnorm


def run_case(spec: dict) -> dict:
    """Build, warm up, measure one step (in the calling process). Returns the result dict."""
    import torch

    from .memory import PeakMeter
    from .step_memory_worker import _rss

    if spec["path"] not in PATHS or spec["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"path={spec['path']!r} / loss_type={spec['loss_type']!r} is invalid; valid: "
                         f"{', '.join(PATHS)} / {', '.join(LOSS_TYPES)}")
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    trainer = build_trainer(spec, build_model(spec))
    inputs = make_inputs(spec, trainer)
    if spec["path"] == "trl_tiled":  # after make_inputs: old log-probs bit-identical to the trl path's
        import trl.kernels.chunked_logprob as tiles

        tiles.TOKEN_CHUNK_SIZE = spec.get("trl_tile_tokens", TRL_TILE_TOKENS)
    opt = torch.optim.AdamW(trainer.model.parameters(), lr=1e-6)
    first = None
    for _ in range(max(0, spec.get("warmup", 1))):
        res = step(spec, trainer, opt, inputs)
        first = first or res
    opt.zero_grad(set_to_none=True)
    gc.collect()
    meter = PeakMeter(spec["device"])
    base_rss = _rss()
    meter.start()
    t0 = time.perf_counter()
    loss, gnorm = step(spec, trainer, opt, inputs)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = meter.stop()
    first = first or (loss, gnorm)
    return {"status": "ok", "peak_bytes": peak, "mem_method": meter.method, "time_s": elapsed,
            "loss": loss, "first_loss": first[0], "first_grad_norm": first[1], "base_rss_bytes": base_rss,
            "completion_tokens": int(inputs["completion_mask"].sum()),
            "fused_loss_calls": getattr(trainer, "fused_loss_calls", None), "threads": torch.get_num_threads()}


def main() -> int:
    # import once here (the point of the fork server); no torch op runs in this process
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import sdar_kernels  # noqa: F401

    from .step_memory_worker import serve

    try:
        import sdar_kernels.integrations.trl  # noqa: F401
    except ImportError:
        pass  # the adapter's cases then fail with the import error, one by one
    print("READY", flush=True)
    serve(sys.stdin, case_fn=run_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
