"""Sequence-sharded fused loss on 2 gloo ranks == one process on the whole stream (and CP's CPU status).

One spawn of 2 CPU ranks (module fixture) runs every case below in float64 and float32: each rank
holds a shard of the tokens' hidden states [N_r, H] and per-token inputs, calls
``fused_linear_sdar_loss`` with ``context_parallel.sharded_loss_args``; the ranks' losses and dL/dW
summed, and each rank's dL/dh, are compared with one process over all N tokens (computed on every
rank from the same seed). A negative control (each rank its local normalizer) must differ, so
the comparison can fail. The ranks also try PyTorch's context_parallel SDPA on the CPU and record
how it fails: if a future torch runs it, the canary test says to wire it into the trainer.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdar_engine.context_parallel import (cp_blocker, reduce_loss_metrics, shard_positions, shard_tokens,
                                          sharded_loss_args)
from sdar_kernels import LossConfig, fused_linear_logprobs, fused_linear_sdar_loss

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")

WORLD = 2
N, H, V = 48, 16, 80          # N divisible by 2 x WORLD for the head-tail layout
SEGMENTS = {"one": [48], "three_split": [10, 24, 14], "four_unsplit": [12, 12, 12, 12]}
CASES = {
    # name: (preset, overrides, segments, mask pattern, load_balance, normalizer: "helper" =
    # sharded_loss_args, "local" = each rank its own (control), "n_seq" = the global sequence count
    # with the config unchanged (control: what sharded_loss_args refuses for a split sequence))
    "sdar_kl": ("sdar", {}, "one", "random", False, "helper"),
    "sdar_kl_head_tail": ("sdar", {}, "one", "random", True, "helper"),
    "rank1_all_masked": ("sdar", {}, "one", "second_half_masked", False, "helper"),
    "rank0_all_masked_head_tail": ("sdar", {}, "one", "rank0_head_tail_masked", True, "helper"),
    "stats_path": ("sdar", {"grad_in_forward": False}, "one", "random", False, "helper"),
    "rlsd_entropy": ("rlsd", {"entropy_coef": 0.01}, "one", "random", False, "helper"),
    "skill_sd": ("skill_sd", {}, "one", "random", False, "helper"),
    "reverse_kl_entropy_gate": ("sdar", {"divergence": "reverse_kl", "gate": "entropy"}, "one", "random",
                                False, "helper"),
    "seq_sum_split": ("sdar", {"agg": "seq-mean-token-sum"}, "three_split", "random", False, "helper"),
    "seq_sum_norm_split": ("sdar", {"agg": "seq-mean-token-sum-norm"}, "three_split", "random", False, "helper"),
    "seq_sum_norm_factor": ("sdar", {"agg": "seq-mean-token-sum-norm", "loss_scale_factor": 7.0},
                            "three_split", "random", True, "helper"),
    "seq_token_mean_one": ("sdar", {"agg": "seq-mean-token-mean"}, "one", "random", True, "helper"),
    "seq_token_mean_unsplit": ("sdar", {"agg": "seq-mean-token-mean"}, "four_unsplit", "random", False, "helper"),
    "seq_token_mean_split": ("sdar", {"agg": "seq-mean-token-mean"}, "three_split", "random", False, "helper"),
    "control_local_normalizer": ("sdar", {}, "one", "random", False, "local"),
    "control_seq_token_mean_split": ("sdar", {"agg": "seq-mean-token-mean"}, "three_split", "random", False,
                                     "n_seq"),
}
TOL = {"float64": 1e-12, "float32": 1e-5}  # max error relative to the quantity's max magnitude


# ------------------------------------------------------------------------------ the ranks' side
def _problem(segments: str, pattern: str, dtype: torch.dtype) -> dict:
    """One seeded stream of N tokens: hidden [N, H], weight [V, H], per-token inputs [N]."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(SEGMENTS[segments])])
    mask = (torch.rand(N, generator=g) < 0.75).to(dtype)
    starts = torch.cumsum(torch.tensor([0] + SEGMENTS[segments][:-1]), 0)
    for s in starts.tolist():
        mask[s:s + 2] = 0  # each sequence opens with prompt tokens
    if pattern == "second_half_masked":
        mask[N // 2:] = 0
    elif pattern == "rank0_head_tail_masked":
        mask[shard_positions(N, 0, WORLD, load_balance=True)] = 0
    logp, _ = fused_linear_logprobs(hidden, weight, targets, backend="torch")
    noise = lambda scale: (torch.randn(N, generator=g) * scale).to(logp.dtype)  # noqa: E731
    return {"hidden": hidden, "weight": weight, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "advantages": torch.randn(N, generator=g).to(dtype), "old_logprobs": logp + noise(0.3),
            "teacher_logprobs": logp + noise(0.5), "ref_logprobs": logp + noise(0.2),
            "teacher_hidden": (torch.randn(N, H, generator=g) * 0.7).to(dtype)}


def _loss(p: dict, cfg: LossConfig, normalizer, weight: torch.Tensor):
    """(output, hidden leaf) after backward of the fused loss on the tokens of ``p`` (weight gets .grad)."""
    h = p["hidden"].clone().requires_grad_(True)
    out = fused_linear_sdar_loss(h, weight, p["targets"], p["advantages"], p["old_logprobs"], p["loss_mask"],
                                 teacher_logprobs=p["teacher_logprobs"], ref_logprobs=p["ref_logprobs"],
                                 teacher_hidden=p["teacher_hidden"] if cfg.full_vocab_divergence else None,
                                 teacher_weight=weight.detach() if cfg.full_vocab_divergence else None,
                                 segment_ids=p["segment_ids"], normalizer=normalizer, config=cfg)
    out.loss.backward()
    return out, h


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.detach()) / max(float(ref.detach().abs().max()), 1e-30)


def _run_case(name: str, dtype: torch.dtype, rank: int) -> dict:
    preset, overrides, segments, pattern, load_balance, norm = CASES[name]
    cfg = LossConfig.preset(preset, backend="torch", token_chunk=16, vocab_chunk=32, **overrides)
    p = _problem(segments, pattern, dtype)
    w_full = p["weight"].clone().requires_grad_(True)
    full_z = None  # packed seq-mean-token-sum-norm needs its constant: the longest sequence, as the helper's
    if cfg.agg == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None:
        full_z = max(float(p["loss_mask"][p["segment_ids"] == k].sum()) for k in p["segment_ids"].unique())
    full, h_full = _loss(p, cfg, full_z, w_full)

    mine = shard_tokens({k: v for k, v in p.items() if k != "weight"}, rank, WORLD, load_balance)
    if norm == "local":
        cfg_r, z = cfg, None
    elif norm == "n_seq":
        cfg_r, z = cfg, float(len(SEGMENTS[segments]))
    else:
        cfg_r, z = sharded_loss_args(mine["loss_mask"], cfg, segment_ids=mine["segment_ids"])
    w_r = p["weight"].clone().requires_grad_(True)
    out, h_r = _loss(mine, cfg_r, z, w_r)
    idx = shard_positions(N, rank, WORLD, load_balance)
    loss_sum = out.loss.detach().clone()
    dist.all_reduce(loss_sum)
    dw_sum = w_r.grad.clone()
    dist.all_reduce(dw_sum)
    dh_err = (h_r.grad - h_full.grad[idx]).abs().max()
    dist.all_reduce(dh_err, op=dist.ReduceOp.MAX)
    metrics = reduce_loss_metrics(out.metrics)
    metric_err = {k: abs(float(metrics[k]) - float(full.metrics[k])) / max(abs(float(full.metrics[k])), 1e-3)
                  for k in full.metrics}
    return {"loss": _rel((loss_sum - full.loss).abs(), full.loss.detach()),
            "dW": _rel((dw_sum - w_full.grad).abs().max(), w_full.grad),
            "dh": _rel(dh_err, h_full.grad), "metrics": max(metric_err.values()),
            "metric_worst": max(metric_err, key=metric_err.get), "loss_value": float(full.loss.detach()),
            "rank_loss": float(out.loss.detach()), "rank_tokens": float(mine["loss_mask"].sum())}


def _cpu_context_parallel() -> dict:
    """PyTorch's context_parallel around one causal SDPA call on the CPU: how it ends."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (WORLD,))
    q, k, v = (torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()
        return {"ran": True}
    except Exception as exc:  # noqa: BLE001 - recording what blocks it is the point
        return {"ran": False, "error": f"{type(exc).__name__}: {exc}"}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results: dict = {}
    try:
        for dtype in (torch.float64, torch.float32):
            for name in CASES:
                key = f"{name}/{str(dtype).replace('torch.', '')}"
                try:
                    results[key] = _run_case(name, dtype, rank)
                except ValueError as exc:
                    results[key] = {"error": str(exc)}
        results["cpu_context_parallel"] = _cpu_context_parallel()
    except Exception:  # noqa: BLE001 - the test reports it
        results["crash"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the test's side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: str, timeout_s: float = 240.0) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"the {WORLD} gloo ranks did not finish in {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("cp")
    for attempt in range(2):  # one retry: a gloo rank rarely aborts at start-up on the loaded box
        try:
            _launch(str(out))
            break
        except Exception:  # noqa: BLE001
            if attempt:
                raise
    results = [json.load(open(out / f"rank{r}.json", encoding="utf-8")) for r in range(WORLD)]
    for r in results:
        assert "crash" not in r, r["crash"]
    return results


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", [c for c in CASES if c != "seq_token_mean_split" and not c.startswith("control")])
def test_sharded_loss_equals_one_process(ranks, name, dtype):
    res = ranks[0][f"{name}/{dtype}"]
    assert "error" not in res, res["error"]
    for part in ("loss", "dW", "dh", "metrics"):
        assert res[part] <= TOL[dtype], (part, res)


def test_all_masked_shard_contributes_nothing(ranks):
    for key, rank in (("rank1_all_masked/float64", 1), ("rank0_all_masked_head_tail/float64", 0)):
        res = ranks[rank][key]
        assert res["rank_tokens"] == 0 and res["rank_loss"] == 0.0, res
        assert ranks[1 - rank][key]["rank_tokens"] > 0


@pytest.mark.parametrize("control", ["control_local_normalizer", "control_seq_token_mean_split"])
def test_the_comparison_catches_a_wrong_normalizer(ranks, control):
    """Negative controls: each rank normalizing by its own tokens, and seq-mean-token-mean left to
    the kernel with the global sequence count while a sequence is split (what sharded_loss_args refuses)."""
    for dtype in ("float64", "float32"):
        res = ranks[0][f"{control}/{dtype}"]
        assert res["loss"] > 1e-3 and res["dW"] > 1e-3, res


def test_seq_mean_token_mean_with_a_split_sequence_raises_on_every_rank(ranks):
    for r in ranks:
        err = r["seq_token_mean_split/float64"].get("error", "")
        assert "seq-mean-token-mean" in err and "token-mean" in err, r["seq_token_mean_split/float64"]


def test_pytorch_context_parallel_on_cpu_is_blocked_as_documented(ranks):
    """Canary: if this fails because CP ran, torch now runs it on the CPU: wire it into the trainer."""
    for r in ranks:
        got = r["cpu_context_parallel"]
        assert not got["ran"], "torch context_parallel now runs on the CPU: wire train.context_parallel"
        assert "scaled_dot_product" in got["error"], got  # torch 2.13: ..._flash_attention_for_cpu
    reason = cp_blocker("cpu")
    assert reason is not None and "_scaled_dot_product_flash_attention" in reason


# ------------------------------------------------------------------------------ single-process helpers
def test_head_tail_layout_matches_pytorch_load_balancer():
    from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer

    for n, world in ((8, 2), (48, 2), (24, 3)):
        torch_order = _HeadTailLoadBalancer(n, world, "cpu")._generate_indices(restore=False)[0]
        ours = torch.cat([shard_positions(n, r, world, load_balance=True) for r in range(world)])
        assert torch.equal(ours, torch_order.long()), (n, world)


def test_shard_positions_cover_the_sequence_once():
    for n, world, lb in ((10, 3, False), (48, 2, True), (7, 2, False)):
        allpos = torch.cat([shard_positions(n, r, world, lb) for r in range(world)])
        assert torch.equal(allpos.sort().values, torch.arange(n))
    with pytest.raises(ValueError, match="divisible by 2 x world"):
        shard_positions(10, 0, 3, load_balance=True)
    with pytest.raises(ValueError, match="rank=2 world=2"):
        shard_positions(10, 2, 2)


def test_shard_tokens_shards_along_dim_and_rejects_mixed_lengths():
    ids = torch.arange(8).view(1, 8)
    out = shard_tokens({"input_ids": ids, "none": None}, 1, 2, load_balance=True, dim=1)
    assert out["input_ids"].tolist() == [[2, 3, 4, 5]] and out["none"] is None
    with pytest.raises(ValueError, match="one token length"):
        shard_tokens({"a": torch.zeros(4), "b": torch.zeros(6)}, 0, 2)


def test_sharded_loss_args_without_a_process_group_is_the_one_process_normalizer():
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1.0])
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    cfg, z = sharded_loss_args(mask, LossConfig(agg="token-mean"))
    assert cfg.agg == "token-mean" and float(z) == 5
    cfg, z = sharded_loss_args(mask, LossConfig(agg="seq-mean-token-sum"), seg)
    assert cfg.agg == "token-mean" and float(z) == 2
    cfg, z = sharded_loss_args(mask, LossConfig(agg="seq-mean-token-sum-norm"), seg)
    assert float(z) == 3
    cfg, z = sharded_loss_args(mask, LossConfig(agg="seq-mean-token-mean"), seg, batch_normalizer=4)
    assert cfg.agg == "seq-mean-token-mean" and float(z) == 4
