"""Prepared GPU check of context (sequence) parallelism (issue #12 part 4): PyTorch's ring attention
(``torch.distributed.tensor.experimental.context_parallel``) composed with FSDP2 ``fully_shard`` and
the fused SDAR loss on sequence shards, against one rank on the whole sequence.

    python benchmarks/gpu/run_cp_check.py             # CUDA, 2 ranks; ~1-2 min on one H200 (not yet run)
    python benchmarks/gpu/run_cp_check.py --dry-run   # CPU + gloo, N=256: all but the ring attention

Ranks: nccl when at least 2 GPUs are visible; on one GPU both ranks share cuda:0 over gloo (NCCL
refuses two ranks on one device), so a gloo collective without CUDA support shows up as an error
row. Nothing is downloaded: a seeded Qwen2 (attn_implementation="sdpa") is built from a config.

Rows, each a forward + backward of one sequence of N tokens split over the 2 ranks:
  cp fp32 contiguous / head-tail   fp32 SDPA (memory-efficient kernel), FSDP2: tight comparison
  cp bf16 head-tail                autocast bf16 (flash kernel), FSDP2
  cp bf16 head-tail, no FSDP       replicated weights, gradients summed by hand (isolates CP)
  memory N=16384 bf16              peak allocated per rank, CP=2 vs one rank on the whole sequence
Per row: the shard layout torch gave equals ``sdar_engine.context_parallel.shard_tokens``; the
ranks' losses summed vs the one-rank loss, dL/dW (all parameters, relative norm), dL/dh per rank.
The model call passes an all-ones attention_mask: with head-tail shards the position ids jump,
and transformers would otherwise read them as packed samples and build a block mask (CP needs
``is_causal`` SDPA without a mask). A failing row is an error row, never a crash. Prints a markdown
table; writes $OUT/cp_check.{md,json} when $OUT is set.

--dry-run (CPU): PyTorch CP cannot run attention there (``cp_blocker``), so each rank enters
``context_parallel`` only to shard the buffers (layout check), then takes its rows of the unsharded
forward in place of the ring attention: the loss, FSDP2 backward and comparisons run as on the GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def ensure_importable() -> None:
    """sdar_engine, sdar_kernels and sdar_envs from this checkout on a bare machine (nothing
    installed): the checkout on sys.path, envs/ linked as sdar_envs. Spawned ranks inherit sys.path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import sdar_envs  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="sdar_shim_"))
        (shim / "sdar_envs").symlink_to(ROOT / "envs")
        sys.path.insert(0, str(shim))


def cp_internals():
    """torch's CP options object and set_rotate_method (the module moved in torch 2.10-2.13)."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    except ImportError:
        from torch.distributed.tensor.experimental import _attention as cp
    return cp._cp_options, cp.set_rotate_method
WORLD = 2
# name, compute dtype, head-tail load balance, FSDP2, tokens, (loss, dW, dh) relative tolerances
ROWS = [
    ("cp fp32 contiguous", "float32", False, True, 2048, (1e-5, 1e-4, 1e-4)),
    ("cp fp32 head-tail", "float32", True, True, 2048, (1e-5, 1e-4, 1e-4)),
    ("cp bf16 head-tail", "bfloat16", True, True, 2048, (1e-2, 5e-2, 5e-2)),
    ("cp bf16 head-tail, no FSDP", "bfloat16", True, False, 2048, (1e-2, 5e-2, 5e-2)),
    ("memory N=16384 bf16", "bfloat16", True, True, 16384, (1e-2, 5e-2, 5e-2)),
]


def log(msg: str) -> None:
    print(f"[cp_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(device: torch.device, vocab: int, seed: int = 0):
    """A seeded Qwen2 (hidden 256, 4 layers, 4 heads / 2 kv heads: GQA), SDPA attention, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=32768,
                      tie_word_embeddings=False, rope_theta=10000.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device).train()


def problem(n: int, vocab: int, device: torch.device) -> dict:
    """One sequence [1, N]: ids, positions, targets, loss mask (64 prompt tokens), advantage, old/teacher."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    mask = (torch.rand(1, n, generator=g) < 0.8).float()
    mask[:, :64] = 0
    return {k: v.to(device) for k, v in {
        "input_ids": ids, "position_ids": torch.arange(n).view(1, n),
        "targets": torch.roll(ids, -1, dims=1), "loss_mask": mask,
        "advantages": torch.full((1, n), 0.7), "noise_old": torch.randn(1, n, generator=g) * 0.05,
        "noise_teacher": torch.randn(1, n, generator=g) * 0.5}.items()}


def attach_cp_forward(model) -> None:
    """``model.cp_forward(ids, pos, head)``: trunk then ``head(hidden [N_r, H], lm_head weight)`` in one
    forward, so that FSDP2 gathers the root's parameters (registered below when sharded)."""

    def cp_forward(self, ids, pos, head, rows=None):
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False)
        hidden = out.last_hidden_state if rows is None else out.last_hidden_state.index_select(1, rows)
        hidden.retain_grad()
        loss, res = head(hidden[0], self.lm_head.weight)
        return hidden, loss, res

    model.cp_forward = types.MethodType(cp_forward, model)


def loss_fn(p: dict, cfg, normalizer, dtype: torch.dtype):
    from sdar_kernels import fused_linear_sdar_loss

    def head(hidden, weight):
        out = fused_linear_sdar_loss(hidden, weight, p["targets"][0], p["advantages"][0], p["old"][0],
                                     p["loss_mask"][0], teacher_logprobs=p["teacher"][0],
                                     normalizer=normalizer, config=cfg)
        return out.loss, out
    return head


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def run_row(row: tuple, rank: int, device: torch.device, mesh, opts, res: dict) -> dict:
    """Fill ``res`` (kept as far as it got when a step raises) with the row's comparison."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor.experimental import context_parallel

    from sdar_engine.context_parallel import shard_positions, shard_tokens, sharded_loss_args
    from sdar_kernels import LossConfig, fused_linear_logprobs

    name, dtype_name, lb, fsdp, n, tol = row
    n = min(n, opts.max_tokens)
    dtype = getattr(torch, dtype_name)
    cfg = LossConfig.preset("sdar", kl_coef=0.0, backend=opts.loss_backend)
    res.update(N=n, dtype=dtype_name, load_balance=lb, fsdp=fsdp)
    ref = build_model(device, opts.vocab)
    cp_model = copy.deepcopy(ref)
    p = problem(n, opts.vocab, device)
    with torch.no_grad(), autocast(device, dtype):  # old / teacher log-probs near the policy's
        h0 = ref.model(input_ids=p["input_ids"], position_ids=p["position_ids"], use_cache=False).last_hidden_state
        logp, _ = fused_linear_logprobs(h0[0], ref.lm_head.weight, p["targets"][0])
    p["old"] = (logp + p.pop("noise_old")[0]).view(1, n).float()
    p["teacher"] = (logp + p.pop("noise_teacher")[0]).view(1, n).float()

    # one rank, whole sequence
    attach_cp_forward(ref)
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with autocast(device, dtype):
        h_ref, loss_ref, _ = ref.cp_forward(p["input_ids"], p["position_ids"], loss_fn(p, cfg, None, dtype))
    loss_ref.backward()
    if device.type == "cuda":
        res["peak_gib_one_rank"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    grads_ref = {k: v.grad.detach().float() for k, v in ref.named_parameters()}

    # CP over the 2 ranks
    attach_cp_forward(cp_model)
    if fsdp:
        for layer in cp_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(cp_model, mesh=mesh)
        register_fsdp_forward_method(cp_model, "cp_forward")
    keys = ["input_ids", "position_ids", "targets", "loss_mask", "advantages", "old", "teacher"]
    bufs = [p[k].clone() for k in keys]
    cp_options = cp_internals()[0]
    cp_options.enable_load_balance = lb
    res["rotate_method"] = str(cp_options.rotate_method)
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[1] * len(bufs), no_restore_buffers=set(bufs)):
        mine = dict(zip(keys, bufs))
        want = shard_tokens({k: p[k] for k in keys}, rank, WORLD, load_balance=lb, dim=1)
        res["layout_matches_shard_tokens"] = all(torch.equal(mine[k], want[k]) for k in keys)
        cfg_r, z = sharded_loss_args(mine["loss_mask"][0], cfg, group=mesh.get_group())
        scale = float(WORLD) if fsdp else 1.0  # FSDP averages gradients over ranks; the loss is global
        if not opts.dry_run:
            with autocast(device, dtype):
                h_cp, loss_cp, _ = cp_model.cp_forward(mine["input_ids"], mine["position_ids"],
                                                       loss_fn(mine, cfg_r, z, dtype))
            (loss_cp * scale).backward()
    idx = shard_positions(n, rank, WORLD, load_balance=lb).to(device)
    if opts.dry_run:  # no ring attention on the CPU (cp_blocker): this rank's rows of the unsharded
        # forward stand in for it, so that everything after the attention runs as on the GPU
        res["attention"] = "emulated (dry run)"
        with autocast(device, dtype):
            h_cp, loss_cp, _ = cp_model.cp_forward(p["input_ids"], p["position_ids"],
                                                   loss_fn(mine, cfg_r, z, dtype), rows=idx)
        (loss_cp * scale).backward()
    if device.type == "cuda":
        res["peak_gib_cp_rank"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    total = loss_cp.detach().clone()
    dist.all_reduce(total)
    res["loss_one_rank"], res["loss_cp_sum"] = float(loss_ref), float(total)
    res["err_loss"] = abs(float(total) - float(loss_ref)) / max(abs(float(loss_ref)), 1e-12)
    num = den = 0.0
    for k, v in cp_model.named_parameters():
        g = v.grad.full_tensor() if hasattr(v.grad, "full_tensor") else v.grad
        if not fsdp:
            dist.all_reduce(g)
        num += float((g.float() - grads_ref[k]).norm() ** 2)
        den += float(grads_ref[k].norm() ** 2)
    res["err_dW"] = (num / max(den, 1e-30)) ** 0.5
    dh_ref = h_ref.grad[0].float().index_select(0, idx)
    res["err_dh"] = float((h_cp.grad[0].float() / scale - dh_ref).norm() / dh_ref.norm().clamp_min(1e-30))
    res["ok"] = (res["layout_matches_shard_tokens"] and res["err_loss"] <= tol[0] and res["err_dW"] <= tol[1]
                 and res["err_dh"] <= tol[2])
    return res


def rank_main(rank: int, port: int, opts, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from sdar_engine.context_parallel import cp_blocker

    cuda = not opts.dry_run and torch.cuda.is_available()
    backend = "nccl" if cuda and torch.cuda.device_count() >= WORLD else "gloo"
    device = torch.device(f"cuda:{rank if backend == 'nccl' else 0}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh(device.type, (WORLD,))
    if opts.rotate:
        cp_internals()[1](opts.rotate)
    rows = []
    head = {"torch": torch.__version__, "backend": backend, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None, "cp_blocker": cp_blocker(device.type)}
    for row in ROWS:
        if opts.only and not any(s in row[0] for s in opts.only):
            continue
        if row[0].startswith("memory") and not cuda:
            continue
        t0, res = time.time(), {"row": row[0]}
        try:
            run_row(row, rank, device, mesh, opts, res)
        except Exception as exc:  # noqa: BLE001 - an error row, never a crash
            res.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:600],
                       where=traceback.format_exc().strip().splitlines()[-3:])
        res["seconds"] = round(time.time() - t0, 1)
        rows.append(res)
        if rank == 0:
            log(f"{row[0]}: {'ok' if res.get('ok') else 'FAILED'} {res.get('error', '')[:200]}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump({"head": head, "rows": rows}, fh)
    dist.destroy_process_group()


def markdown(head: dict, ranks: list[dict]) -> str:
    lines = [f"torch {head['torch']}, {head['backend']} on {head['device']} ({head['gpu'] or 'no GPU'}); "
             f"cp_blocker: {head['cp_blocker'] or 'none'}", "",
             "| row | N | attention | layout | loss rel err | dW rel err | dh rel err (max rank) "
             "| peak GiB 1 rank / CP rank | ok | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ranks[0]["rows"]):
        if "error" in r:
            layout = {True: "=", False: "DIFFERS"}.get(r.get("layout_matches_shard_tokens"), "")
            lines.append(f"| {r['row']} | {r.get('N', '')} | {r.get('attention', 'ring')} | {layout} | "
                         f"error: {r['error'][:160]} | | | | no | "
                         f"{r['seconds']} |")
            continue
        dh = max(rk["rows"][i].get("err_dh", float("nan")) for rk in ranks)
        peak = (f"{r['peak_gib_one_rank']:.2f} / {max(rk['rows'][i]['peak_gib_cp_rank'] for rk in ranks):.2f}"
                if "peak_gib_cp_rank" in r else "")
        ok = all(rk["rows"][i].get("ok") for rk in ranks)
        lines.append(f"| {r['row']} | {r['N']} | {r.get('attention', 'ring')} | "
                     f"{'=' if r['layout_matches_shard_tokens'] else 'DIFFERS'} | "
                     f"{r['err_loss']:.1e} | {r['err_dW']:.1e} | {dh:.1e} | {peak} | {'yes' if ok else 'NO'} | "
                     f"{r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU + gloo, small N, attention emulated (see above)")
    ap.add_argument("--only", nargs="*", help="rows whose name contains any of these")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap every row's N (default: 256 dry, else none)")
    ap.add_argument("--loss-backend", default="torch", choices=("torch", "auto", "triton"))
    ap.add_argument("--rotate", default=None, choices=("allgather", "alltoall"),
                    help="CP's K/V rotation (torch's set_rotate_method; default: torch's own)")
    opts = ap.parse_args()
    ensure_importable()
    if opts.max_tokens is None:
        opts.max_tokens = 256 if opts.dry_run else 1 << 30
    if opts.dry_run:
        opts.vocab = min(opts.vocab, 2048)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(port, opts, tmp), nprocs=WORLD, join=True, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    md = markdown(ranks[0]["head"], ranks)
    print(md)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cp_check.md").write_text(md + "\n")
        Path(os.environ["OUT"], "cp_check.json").write_text(json.dumps(ranks, indent=1))
    ok = all(r.get("ok") for rk in ranks for r in rk["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
