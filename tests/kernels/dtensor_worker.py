"""One gloo rank of tests/kernels/test_dtensor_weight.py (launched by torchrun, 2 ranks, CPU, fp64).

A tiny model (trunk Linear + tanh, lm_head Linear with bias, frozen teacher head) is sharded with
FSDP2 ``fully_shard``; its forward returns hidden states only, so after it the lm_head weight and
bias are DTensor shards. Each rank compares the sharded run with an unsharded copy of the same
model run in this process on the whole batch, and writes the relative errors to
``<out>/rank<r>.json``:

- ``dp_*``: data parallel, rank r holds half the tokens, normalizer = global loss-token count,
  loss x world size before backward (FSDP2 averages gradients over ranks);
- ``rep_*``: both ranks hold the whole batch (no factor);
- ``logprobs_*``: fused_linear_logprobs with the DTensor weight;
- ``window_*``: the loss computed inside an FSDP2 forward (register_fsdp_forward_method), where the
  weight is already unsharded (no gather by the loss);
- ``hidden_replicate_*``: hidden itself a Replicate() DTensor;
- ``dp_op_*``: as dp_*, through the custom op sdar_kernels.ops.fused_linear_sdar_loss_op.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

N, H, V = 10, 7, 13  # V odd: FSDP2 shards the vocabulary unevenly (7 + 6 rows)
CONFIGS = {
    "rowwise": dict(preset="sdar", kl_coef=0.05, entropy_coef=0.01),  # grad_in_forward (default)
    "stats": dict(preset="sdar", kl_coef=0.05, entropy_coef=0.01, grad_in_forward=False),
    "teacher_div": dict(preset="sdar", divergence="reverse_kl"),  # teacher_weight gathered too
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V)
        self.teacher_head = nn.Linear(H, V).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.trunk(x))

    def loss_forward(self, x: torch.Tensor, batch: dict, cfg) -> torch.Tensor:
        """Hidden states and the loss in one FSDP2 forward: the unshard window."""
        self.window_weight_plain = not hasattr(self.lm_head.weight, "device_mesh")
        return _loss(self, self.forward(x), batch, cfg)


def _loss(model: Tiny, hidden: torch.Tensor, b: dict, cfg, op: bool = False) -> torch.Tensor:
    from sdar_kernels import fused_linear_sdar_loss

    fn = fused_linear_sdar_loss
    if op:
        from sdar_kernels.ops import fused_linear_sdar_loss_op as fn
    teacher = cfg.full_vocab_divergence
    return fn(hidden, model.lm_head.weight, b["targets"], b["adv"], b["old"], b["mask"],
                                  teacher_logprobs=b["teacher"], ref_logprobs=b["ref"], bias=model.lm_head.bias,
                                  teacher_hidden=hidden.detach() if teacher else None,
                                  teacher_weight=model.teacher_head.weight if teacher else None,
                                  normalizer=b["mask"].new_tensor(b["count"]), config=cfg).loss


def _batch(rows: slice | None = None) -> dict:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, generator=g) > 0.25).double()
    mask[:2] = 0  # a fully masked stretch on rank 0
    b = {"x": x, "targets": torch.randint(0, V, (N,), generator=g), "mask": mask,
         "adv": torch.randn(N, generator=g, dtype=torch.float64),
         "old": -2.5 + torch.randn(N, generator=g, dtype=torch.float64),
         "teacher": -2.5 + torch.randn(N, generator=g, dtype=torch.float64),
         "ref": -2.5 + torch.randn(N, generator=g, dtype=torch.float64),
         "count": float(mask.sum())}
    if rows is not None:
        b = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    return b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _grads(model: nn.Module) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def main(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from sdar_kernels import LossConfig, fused_linear_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = Tiny().double()
    res: dict = {}
    half = slice(rank * N // world, (rank + 1) * N // world)

    def sharded() -> Tiny:
        m = copy.deepcopy(base)
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
        return m

    for name, spec in CONFIGS.items():
        spec = dict(spec)
        cfg = LossConfig.preset(spec.pop("preset"), backend="torch", **spec)
        single = copy.deepcopy(base)
        full = _batch()
        ref_loss = _loss(single, single(full["x"]), full, cfg)
        ref_loss.backward()
        ref = _grads(single)

        m = sharded()
        b = _batch(half)
        hidden = m(b["x"])
        w = m.lm_head.weight
        res["weight_is_dtensor"] = hasattr(w, "device_mesh") and not hasattr(hidden, "device_mesh")
        try:  # what the hook is for: torch refuses a plain x DTensor matmul
            torch.mm(hidden.detach(), w.detach().T)
            res["mixed_mm_error"] = ""
        except RuntimeError as exc:
            res["mixed_mm_error"] = str(exc)[:200]
        loss = _loss(m, hidden, b, cfg)
        (loss * world).backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        res[f"dp_{name}_loss"] = _rel(total, ref_loss.detach())
        got = _grads(m)
        res[f"dp_{name}_grads"] = {k: _rel(got[k], ref[k]) for k in ref}
        res[f"dp_{name}_grad_names"] = sorted(got)

        m = sharded()
        b = _batch()
        loss = _loss(m, m(b["x"]), b, cfg)
        loss.backward()
        got = _grads(m)
        res[f"rep_{name}_loss"] = _rel(loss.detach(), ref_loss.detach())
        res[f"rep_{name}_grads"] = {k: _rel(got[k], ref[k]) for k in ref}

        m = sharded()
        register_fsdp_forward_method(m, "loss_forward")
        b = _batch(half)
        loss = m.loss_forward(b["x"], b, cfg)
        (loss * world).backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        got = _grads(m)
        res[f"window_{name}_weight_plain"] = m.window_weight_plain
        res[f"window_{name}_loss"] = _rel(total, ref_loss.detach())
        res[f"window_{name}_grads"] = {k: _rel(got[k], ref[k]) for k in ref}

    # the torch.library op (sdar_kernels/ops.py) gathers a DTensor weight eagerly before the op
    cfg = LossConfig.preset("sdar", backend="torch", kl_coef=0.05)
    single, m = copy.deepcopy(base), sharded()
    full, b = _batch(), _batch(half)
    ref_loss = _loss(single, single(full["x"]), full, cfg)
    ref_loss.backward()
    loss = _loss(m, m(b["x"]), b, cfg, op=True)
    (loss * world).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    res["dp_op_loss"] = _rel(total, ref_loss.detach())
    res["dp_op_grads"] = {k: _rel(v, _grads(single)[k]) for k, v in _grads(m).items()}

    # fused_linear_logprobs: per-token log-probs and entropies with a DTensor weight and bias
    single, m = copy.deepcopy(base), sharded()
    b = _batch(half)
    u = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[half]
    outs = []
    for model in (single, m):
        lp, ent = fused_linear_logprobs(model(b["x"]), model.lm_head.weight, b["targets"], temperature=0.7,
                                        with_entropy=True, bias=model.lm_head.bias, backend="torch")
        ((lp * u).sum() + ent.sum()).backward()
        outs.append((lp.detach(), ent.detach()))
    res["logprobs_values"] = max(_rel(outs[1][0], outs[0][0]), _rel(outs[1][1], outs[0][1]))
    # single saw this rank's half only; the sharded grads are the mean over the two ranks' halves
    ref = {k: v.clone() for k, v in _grads(single).items()}
    for v in ref.values():
        dist.all_reduce(v)
        v /= world
    got = _grads(m)
    res["logprobs_grads"] = {k: _rel(got[k], ref[k]) for k in ref}

    # hidden itself a DTensor: Replicate() is used as its local tensor; Shard(1) is refused
    cfg = LossConfig.preset("sdar", backend="torch", kl_coef=0.05)
    single, m = copy.deepcopy(base), sharded()
    b = _batch()
    ref_loss = _loss(single, single(b["x"]), b, cfg)
    ref_loss.backward()
    h_plain = m(b["x"])
    h_rep = DTensor.from_local(h_plain, mesh, [Replicate()])  # differentiable
    loss = _loss(m, h_rep, b, cfg)
    loss.backward()
    res["hidden_replicate_loss"] = _rel(loss.detach(), ref_loss.detach())
    res["hidden_replicate_grads"] = {k: _rel(v, _grads(single)[k]) for k, v in _grads(m).items()}
    try:
        _loss(m, DTensor.from_local(h_plain.detach(), mesh, [Shard(1)]), b, cfg)
        res["hidden_shard1_error"] = ""
    except ValueError as exc:
        res["hidden_shard1_error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    print(f"DTENSOR_WORKER_OK rank={rank}")


if __name__ == "__main__":
    main(sys.argv[1])
