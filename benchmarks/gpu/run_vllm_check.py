"""One prepared GPU check of the vLLM rollout backend (issue #11): the real engine, then training.

    python benchmarks/gpu/run_vllm_check.py                 # CUDA + the [vllm] extra; <= 8 minutes
    python benchmarks/gpu/run_vllm_check.py --budget-s 300  # tighter

Nothing is downloaded: a small Qwen2 (4 layers, hidden 256, head_dim 64) and its ChatML
tokenizer are built from the fake env's text (tests/engine/loop_fakes.py) in seconds on the CPU.
Each part runs in its own process (so the GPU memory of one is gone before the next):

1. ``engine`` (one process, one GPU): ``VLLMBackend`` up with sleep mode, then
   a. seeded sampling: the same per-prompt seeds give the same tokens, in a batch of 32 and for
      each prompt alone (split invariance); other seeds give other tokens;
   b. the first greedy token's log-prob, vLLM vs HF (bf16 both), on 32 prompts;
   c. ``sleep()`` frees GPU memory (``torch.cuda.mem_get_info``), ``wake_up()`` serves again;
   d. the weight push: the HF weights are perturbed; before ``sync_weights`` vLLM still scores
      with the old weights (large log-prob gap to HF), after it with the new ones (small gap).
2. ``train``: ``torchrun --nproc_per_node=<GPUs>`` of this file's worker: ``Trainer`` with
   ``rollout.backend=vllm`` on the fake env, 2 steps; the per-step rows of metrics.jsonl.

A failing part is a row with its error, never a crash. Prints a markdown table; writes
``$OUT/vllm_check.md`` and ``$OUT/vllm_check.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
N_PROMPTS = 32


def log(msg: str) -> None:
    print(f"[vllm_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------- shared pieces
def build_small_model(out: Path) -> str:
    """A small Qwen2 + tokenizer from the fake env's text (CPU, seconds); its HF directory."""
    from sdar_engine.model import ModelConfig, build_tiny
    from tests.engine.loop_fakes import corpus

    if (out / "config.json").is_file():
        return str(out)
    cfg = ModelConfig(tiny_hidden=256, tiny_layers=4, tiny_heads=4, tiny_kv_heads=2, tiny_vocab=1024)
    return build_tiny(str(out), corpus(), cfg, seed=0)


def fake_prompts(tokenizer) -> list[list[int]]:
    from sdar_engine.rollout import render_prompt_ids
    from tests.engine.loop_fakes import FakeEnv

    env = FakeEnv(n_tasks=8)
    env.reset(batch_size=8, group_size=1)
    texts = [env.prompt(i) for i in range(8)] + [env.teacher_prompt(i) for i in range(8)]
    return [render_prompt_ids(tokenizer, texts[k % len(texts)] + f" ({k})") for k in range(N_PROMPTS)]


# ---------------------------------------------------------------------- part 1: the engine
def first_token_logps(llm, prompts: list[list[int]]) -> tuple[list[int], list[float]]:
    """vLLM's greedy first token per prompt and its log-prob."""
    from vllm import SamplingParams

    from sdar_engine.vllm_backend import token_prompts

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)
    outs = llm.generate(token_prompts(prompts), sampling_params=params, use_tqdm=False)
    toks = [int(o.outputs[0].token_ids[0]) for o in outs]
    return toks, [float(o.outputs[0].logprobs[0][t].logprob) for o, t in zip(outs, toks)]


def hf_logps(model, prompts: list[list[int]], toks: list[int]) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for ids, t in zip(prompts, toks):
            logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float()
            out.append(float(torch.log_softmax(logits, -1)[t]))
    return out


def part_engine(model_dir: str) -> list[dict]:
    import torch

    from sdar_engine.model import ModelConfig, load_policy
    from sdar_engine.vllm_backend import VLLMBackend

    rows: list[dict] = []
    policy, tok = load_policy(ModelConfig(path=model_dir, attn="sdpa"), "cuda")
    hf = policy.to(torch.bfloat16).eval()
    t0 = time.perf_counter()
    backend = VLLMBackend(model_dir, tok, policy=hf, dtype="bfloat16", gpu_memory_utilization=0.3,
                          sleep_level=1, max_model_len=1024, enforce_eager=True)
    rows.append(dict(check="engine up (sleep mode, in-process)", value=f"{time.perf_counter() - t0:.1f} s", ok=True))
    prompts = fake_prompts(tok)
    seeds = list(range(1000, 1000 + N_PROMPTS))

    a = backend.generate(prompts, 24, 1.0, 1.0, seeds=seeds)
    b = backend.generate(prompts, 24, 1.0, 1.0, seeds=seeds)
    alone = [backend.generate([p], 24, 1.0, 1.0, seeds=[s])[0] for p, s in zip(prompts[:8], seeds[:8])]
    other = backend.generate(prompts, 24, 1.0, 1.0, seeds=[s + 7 for s in seeds])
    same = sum(x == y for x, y in zip(a, b))
    split = sum(x == y for x, y in zip(a[:8], alone))
    diff = sum(x != y for x, y in zip(a, other))
    rows.append(dict(check="same seeds, same batch: identical responses", value=f"{same}/{N_PROMPTS}",
                     ok=same == N_PROMPTS))
    rows.append(dict(check="same seeds, each prompt alone: identical", value=f"{split}/8", ok=split == 8))
    rows.append(dict(check="other seeds: different responses", value=f"{diff}/{N_PROMPTS}", ok=diff >= N_PROMPTS // 2))

    toks, v = first_token_logps(backend.llm, prompts)
    h = hf_logps(hf, prompts, toks)
    gap = max(abs(x - y) for x, y in zip(v, h))
    rows.append(dict(check="first greedy token log-prob |vLLM - HF| (bf16)", value=f"max {gap:.4f}", ok=gap < 0.1))

    free0 = torch.cuda.mem_get_info()[0]
    backend.sleep()
    freed = (torch.cuda.mem_get_info()[0] - free0) / 2**30
    rows.append(dict(check="sleep(level=1) frees GPU memory", value=f"{freed:.2f} GiB", ok=freed > 0.1))

    with torch.no_grad():  # new weights: vLLM must not see them until sync_weights
        gen = torch.Generator(device="cuda").manual_seed(0)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype) * p.float().std())
    backend.wake_up()
    toks, v = first_token_logps(backend.llm, prompts)
    stale = max(abs(x - y) for x, y in zip(v, hf_logps(hf, prompts, toks)))
    backend.sleep()
    sent = backend.sync_weights(hf)
    toks, v = first_token_logps(backend.llm, prompts)
    fresh = max(abs(x - y) for x, y in zip(v, hf_logps(hf, prompts, toks)))
    rows.append(dict(check="weights perturbed, before sync: log-prob gap", value=f"max {stale:.3f}", ok=stale > 0.5))
    rows.append(dict(check=f"after sync_weights ({sent} tensors): log-prob gap", value=f"max {fresh:.4f}",
                     ok=fresh < 0.1))
    return rows


# ---------------------------------------------------------------------- part 2: training
def worker(model_dir: str, run_dir: str) -> None:
    """One torchrun rank: 2 steps of Trainer with the vLLM backend on the fake env."""
    from sdar_engine.config import from_dict
    from sdar_engine.distributed import init_distributed
    from sdar_engine.trainer import Trainer
    from tests.engine.loop_fakes import FakeEnv

    init_distributed()
    cfg = from_dict({}, [f"model.path={model_dir}", "model.attn=sdpa", "rollout.backend=vllm",
                         "rollout.vllm_gpu_memory_utilization=0.3", "rollout.vllm_enforce_eager=true",
                         "rollout.max_new_tokens=16", "rollout.max_prompt_tokens=256", "env.tasks_per_step=8",
                         "env.group_size=4", "algo.max_tokens=4096", "optim.lr=1e-5", "train.steps=2",
                         "train.save_every=2", "train.tensorboard=false", "train.plot=false", "train.device=cuda",
                         f"train.output_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir, env=FakeEnv(n_tasks=16, max_steps=3), eval_env=FakeEnv("test", n_tasks=4))
    trainer.fit(final_eval=False)


def part_train(model_dir: str, budget_s: float) -> list[dict]:
    import torch

    gpus = torch.cuda.device_count()
    run_dir = Path(tempfile.mkdtemp(prefix="sdar-vllm-train-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", __file__,
           "--worker", model_dir, str(run_dir)]
    log(f"part train: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, budget_s))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return [dict(check=f"torchrun x{gpus}: 2 steps", value=f"rc {proc.returncode}", ok=False, error=tail)]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "samples" in r]
    rows = [dict(check=f"torchrun x{gpus}: 2 steps, metrics records", value=f"{len(steps)} in {wall:.0f} s",
                 ok=len(steps) == 2)]
    for r in steps:
        rows.append(dict(check=f"step {r.get('step')}: samples / rollout s / update s / tokens/s",
                         value=f"{r.get('samples'):.0f} / {r.get('rollout_seconds', 0):.1f} / "
                               f"{r.get('update_seconds', 0):.1f} / {r.get('tokens_per_s', 0):.0f}",
                         ok=r.get("samples", 0) > 0))
    return rows


# ---------------------------------------------------------------------- orchestration
def run_part(name: str, model_dir: str, budget_s: float) -> list[dict]:
    """Part ``name`` in a fresh process (its GPU memory goes with it); rows or an error row."""
    out = Path(tempfile.mkdtemp(prefix="sdar-vllm-part-")) / "rows.json"
    cmd = [sys.executable, __file__, "--part", name, model_dir, str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, budget_s))
    except subprocess.TimeoutExpired:
        return [dict(check=f"part {name}", value=f"timed out after {budget_s:.0f} s", ok=False)]
    if out.is_file():
        return json.loads(out.read_text())
    return [dict(check=f"part {name}", value=f"rc {proc.returncode}", ok=False,
                 error=(proc.stdout + proc.stderr)[-1500:])]


def table(rows: list[dict]) -> str:
    lines = ["| check | value | ok |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['value']} | {'yes' if r['ok'] else 'NO'} |")
    errors = [f"\n{r['check']}:\n```\n{r['error']}\n```" for r in rows if r.get("error")]
    return "\n".join(lines + errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=450.0, help="whole check, seconds (default 450)")
    ap.add_argument("--part", nargs=3, metavar=("NAME", "MODEL_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if args.part:
        name, model_dir, out = args.part
        try:
            rows = part_engine(model_dir) if name == "engine" else []
        except Exception as err:  # an API drift or OOM is a row, not a crash
            rows = [dict(check=f"part {name}", value=type(err).__name__, ok=False, error=traceback.format_exc()[-1500:])]
        Path(out).write_text(json.dumps(rows))
        return 0

    t0 = time.perf_counter()
    rows: list[dict] = []
    import torch

    from sdar_engine.vllm_backend import VLLM_PIN, vllm_installed

    version = "missing"
    if vllm_installed():
        import importlib.metadata as md
        version = md.version("vllm")
    gpus = torch.cuda.device_count()
    rows.append(dict(check="torch / vllm / GPUs", value=f"{torch.__version__} / {version} (pin {VLLM_PIN}) / "
                     f"{gpus} x {torch.cuda.get_device_name(0) if gpus else '-'}", ok=gpus > 0 and version != "missing"))
    if rows[0]["ok"]:
        model_dir = build_small_model(Path(tempfile.mkdtemp(prefix="sdar-vllm-model-")) / "model")
        rows.append(dict(check="small Qwen2 built (CPU)", value=model_dir, ok=True))
        log("part engine")
        rows += run_part("engine", model_dir, 0.45 * args.budget_s)
        left = args.budget_s - (time.perf_counter() - t0)
        log(f"part train ({left:.0f} s left)")
        try:
            rows += part_train(model_dir, left)
        except subprocess.TimeoutExpired:
            rows.append(dict(check="torchrun: 2 steps", value=f"timed out after {left:.0f} s", ok=False))
    md_text = f"## vLLM backend check ({time.perf_counter() - t0:.0f} s)\n\n{table(rows)}\n"
    print(md_text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "vllm_check.md").write_text(md_text)
        (Path(out) / "vllm_check.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
