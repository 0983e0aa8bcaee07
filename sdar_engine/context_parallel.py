"""Context (sequence) parallelism: one sequence's tokens split over ranks, and the fused loss on the shards.

Two halves, docs/context_parallel.md has the details and the measurements:

- **Attention.** PyTorch's ring attention (``torch.distributed.tensor.experimental.context_parallel``)
  handles only ``aten._scaled_dot_product_{flash,efficient,cudnn}_attention``, none of which has a
  CPU kernel; on the CPU, SDPA picks ``_scaled_dot_product_flash_attention_for_cpu``, which DTensor
  has no sharding strategy for. ``cp_blocker`` answers that question at run time from the dispatcher
  (no hard-coded device list); ``benchmarks/gpu/run_cp_check.py`` is the prepared GPU check.
- **The fused loss** composes with sequence-sharded hidden states on any device. Each rank passes
  its tokens' hidden states [N_r, H] and the per-token inputs of the same tokens (``shard_tokens``),
  with the config and normalizer from ``sharded_loss_args``. Then the losses summed over ranks
  equal the one-process loss over all N tokens, dL/dW summed over ranks equals the one-process
  dL/dW, and each rank's dL/dh is its rows of the one-process dL/dh.

Aggregation modes under sharding (``sharded_loss_args``): token-mean, seq-mean-token-sum and
seq-mean-token-sum-norm compose (their per-token weights are the mask over one global constant);
seq-mean-token-mean weighs a token by 1 / (its sequence's loss tokens), so it composes only when
each rank's loss tokens lie in one sequence, or when no sequence's loss tokens span two ranks;
otherwise it raises a ValueError on every rank (never a hang).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from sdar_kernels import LossConfig

SUM_METRICS = ("pg_loss", "sd_loss", "tokens")   # already globally weighted sums, or counts
MAX_METRICS = ("ratio_max", "ratio_min")          # update.ratio_stats: ratio_min is stored negated


RING_SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention")  # torch 2.13's list, when its module moves


def _ring_sdpa_ops() -> tuple[str, ...]:
    """The aten SDPA ops that context_parallel's dispatcher turns into ring attention."""
    import importlib

    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            ops = getattr(importlib.import_module(name), "custom_ops")
        except (ImportError, AttributeError):
            continue
        return tuple(sorted({str(op).split(".")[1] for op in ops if "backward" not in str(op)}))
    return RING_SDPA_OPS


def cp_blocker(device_type: str) -> Optional[str]:
    """Why PyTorch's context parallelism cannot run attention on ``device_type`` ("cpu", "cuda"), or None.

    Asks the dispatcher whether any SDPA op that CP's ring attention handles has a kernel for the
    device's dispatch key (``torch._C._dispatch_has_kernel_for_dispatch_key``): no device list here.
    """
    try:
        import torch.distributed.tensor.experimental as experimental
        experimental.context_parallel  # noqa: B018 - AttributeError on a torch without it
    except (ImportError, AttributeError) as exc:  # older torch, or a build without torch.distributed
        return f"torch {torch.__version__} has no torch.distributed.tensor.experimental.context_parallel ({exc})"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    handled = _ring_sdpa_ops()
    if key is not None and any(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)
                               for op in handled):
        return None
    why = (f"torch {torch.__version__}: context_parallel's ring attention handles only aten.{', aten.'.join(handled)} "
           f"(torch/distributed/tensor/experimental/_context_parallel/_attention.py, _sdpa_handler), none of "
           f"which has a {key or device_type} kernel in this build")
    if device_type == "cpu":
        why += ("; SDPA on the CPU calls aten._scaled_dot_product_flash_attention_for_cpu, which DTensor has no "
                "sharding strategy for (NotImplementedError)")
    return why


def shard_positions(n: int, rank: int, world: int, load_balance: bool = False) -> Tensor:
    """Token positions [N_r] (int64, ascending within each block) that ``rank`` of ``world`` holds.

    load_balance=False: the contiguous block [n*r/w, n*(r+1)/w). load_balance=True: PyTorch CP's
    head-tail layout for causal attention (its ``_HeadTailLoadBalancer``): the sequence in 2w equal
    chunks, rank r holding chunks r and 2w-1-r (needs n % (2w) == 0).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} world={world} is invalid; expected world >= 1 and 0 <= rank < world")
    if not load_balance:
        return torch.arange(n * rank // world, n * (rank + 1) // world)
    if n % (2 * world):
        raise ValueError(f"load_balance=True needs the sequence length ({n}) divisible by 2 x world "
                         f"({2 * world}); pad the sequence or use load_balance=False")
    c = n // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def shard_tokens(tensors: Mapping[str, Optional[Tensor]], rank: int, world: int, load_balance: bool = False,
                 dim: int = 0) -> dict[str, Optional[Tensor]]:
    """This rank's tokens of every tensor: ``t.index_select(dim, shard_positions(...))`` (None stays None).

    All tensors share the token length N along ``dim``: per-token loss inputs [N] (targets, mask,
    advantages, old / teacher / ref log-probs, segment ids), hidden states [N, H] (dim=0), or model
    inputs [1, N] (dim=1). Every per-token tensor of one loss call must be sharded with the same
    rank, world and load_balance.
    """
    lengths = {k: t.shape[dim] for k, t in tensors.items() if t is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"shard_tokens needs one token length along dim {dim}; got {lengths}")
    if not lengths:
        return dict(tensors)
    idx = shard_positions(next(iter(lengths.values())), rank, world, load_balance)
    return {k: (None if t is None else t.index_select(dim, idx.to(t.device))) for k, t in tensors.items()}


def _collective_device(group: Any, device: torch.device) -> torch.device:
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _all_reduce(t: Tensor, op: Any, group: Any) -> Tensor:
    """``t`` reduced over ``group`` (a copy, on t's device); t itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    buf = t.to(_collective_device(group, t.device)).clone()
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def _sequence_counts(mask: Tensor, segment_ids: Optional[Tensor], group: Any) -> tuple[Tensor, Tensor]:
    """(global loss tokens per sequence [S], ranks holding loss tokens of each sequence [S]), float64."""
    m = (mask != 0).to(torch.float64)
    seg = torch.zeros_like(m, dtype=torch.long) if segment_ids is None else segment_ids.long()
    if seg.numel() and int(seg.min()) < 0:
        raise ValueError("segment_ids must be non-negative sequence labels shared by all ranks")
    local_s = torch.tensor([int(seg.max()) + 1 if seg.numel() else 1], dtype=torch.long, device=m.device)
    s = int(_all_reduce(local_s, dist.ReduceOp.MAX, group)[0])
    local = m.new_zeros(s).index_add_(0, seg, m)
    return _all_reduce(local, dist.ReduceOp.SUM, group), _all_reduce((local > 0).double(), dist.ReduceOp.SUM, group)


def _runs_are_sequences(segment_ids: Optional[Tensor]) -> bool:
    """Every label forms one contiguous run here (the kernels count tokens per run, not per label)."""
    if segment_ids is None or segment_ids.numel() < 2:
        return True
    runs = int((segment_ids[1:] != segment_ids[:-1]).sum()) + 1
    return runs == int(torch.unique(segment_ids).numel())


def sharded_loss_args(loss_mask: Tensor, config: LossConfig, segment_ids: Optional[Tensor] = None,
                      batch_normalizer: Optional[float] = None, group: Any = None) -> tuple[LossConfig, Tensor]:
    """(config, normalizer) to pass to ``fused_linear_sdar_loss`` with this rank's shard of the tokens.

    A collective over ``group`` (default: the world); every rank of it must call it with its own shard.
    loss_mask [N_r] (0/1) and segment_ids [N_r] (int, optional) are this rank's tokens; segment ids
    are GLOBAL sequence labels (the unsharded stream's ids sharded like every other per-token tensor),
    so a sequence split across ranks is one sequence. batch_normalizer: the count that the batch's
    other micro-batches and data-parallel ranks divide by too (tokens for token-mean, sequences for
    the seq-mean modes, the longest response for seq-mean-token-sum-norm), e.g.
    ``update.global_normalizer``; None = this group's tokens only, exactly what one process would use
    for the whole unsharded stream.

    Returns a float64 0-d normalizer and the config with ``agg`` rewritten to token-mean wherever the
    mode's per-token weights on this rank are the mask over one constant; seq-mean-token-mean with
    loss tokens of one sequence on several ranks and of several sequences on one rank raises
    ValueError (on every rank alike: the decision reads only all-reduced numbers).
    """
    counts, holders = _sequence_counts(loss_mask, segment_ids, group)
    agg = config.agg
    if agg == "token-mean":
        z = counts.sum() if batch_normalizer is None else torch.tensor(float(batch_normalizer), dtype=torch.float64)
        return config, z.to(loss_mask.device)
    as_token_mean = config.replace(agg="token-mean", loss_scale_factor=None)
    if agg == "seq-mean-token-sum-norm":
        if config.loss_scale_factor is not None:
            z = torch.tensor(config.loss_scale_factor, dtype=torch.float64)
        elif batch_normalizer is not None:
            z = torch.tensor(float(batch_normalizer), dtype=torch.float64)
        else:
            z = counts.max()
        return as_token_mean, z.to(loss_mask.device)
    n_seq = (torch.tensor(float(batch_normalizer), dtype=torch.float64) if batch_normalizer is not None
             else (counts > 0).sum().double())
    if agg == "seq-mean-token-sum":
        return as_token_mean, n_seq.to(loss_mask.device)
    return _seq_mean_token_mean(loss_mask, segment_ids, config, as_token_mean, counts, holders, n_seq, group)


def _seq_mean_token_mean(loss_mask: Tensor, segment_ids: Optional[Tensor], config: LossConfig,
                         as_token_mean: LossConfig, counts: Tensor, holders: Tensor, n_seq: Tensor,
                         group: Any) -> tuple[LossConfig, Tensor]:
    m = loss_mask != 0
    seg = torch.zeros_like(loss_mask, dtype=torch.long) if segment_ids is None else segment_ids.long()
    mine = torch.unique(seg[m])
    flags = torch.tensor([float(mine.numel() <= 1), float(_runs_are_sequences(segment_ids))], dtype=torch.float64)
    one_seq_each, runs_ok = (bool(f) for f in _all_reduce(flags, dist.ReduceOp.MIN, group))
    if one_seq_each:  # weights m / (count_s * n_seq) with one s on this rank: token-mean over that constant
        count = counts[mine[0]] if mine.numel() else torch.ones((), dtype=torch.float64)
        return as_token_mean, (count * n_seq).to(loss_mask.device)
    if bool((holders <= 1).all()) and runs_ok:  # every sequence's loss tokens on one rank: local counts are global
        return config, n_seq.to(loss_mask.device)
    raise ValueError(
        "LossConfig.agg='seq-mean-token-mean' does not compose with this sequence sharding: a sequence's loss "
        "tokens lie on several ranks while a rank holds loss tokens of several sequences, so the per-sequence "
        "token counts differ per rank. Use agg token-mean, seq-mean-token-sum or seq-mean-token-sum-norm, or "
        "shard one sequence per context-parallel group (a micro-batch of one sequence)")


def reduce_loss_metrics(metrics: Mapping[str, Tensor], group: Any = None) -> dict[str, Tensor]:
    """The metrics of the whole sharded stream from each rank's ``SDAROutput.metrics`` (a collective).

    pg_loss, sd_loss, tokens: summed; ratio_max / ratio_min: max; every other metric is a mean over
    the rank's loss tokens, so it is averaged weighted by ``tokens`` (0-d tensors in, 0-d out).
    """
    tokens = metrics["tokens"].detach().double()
    total = _all_reduce(tokens, dist.ReduceOp.SUM, group)
    out: dict[str, Tensor] = {}
    for name in sorted(metrics):
        v = metrics[name].detach().double()
        if name in SUM_METRICS:
            r = _all_reduce(v, dist.ReduceOp.SUM, group)
        elif name in MAX_METRICS:
            r = _all_reduce(v, dist.ReduceOp.MAX, group)
        else:
            r = _all_reduce(v * tokens, dist.ReduceOp.SUM, group) / torch.clamp(total, min=1.0)
        out[name] = r.to(metrics[name].dtype)
    return out
