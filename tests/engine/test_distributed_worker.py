"""Worker for test_distributed.py (no tests here): run under torchrun, or alone for the full batch.

Usage: python test_distributed_worker.py MODEL_DIR OUT_DIR [--full]
Each rank takes an uneven share of the same 13 samples (rank 0 gets 11, rank 1 gets 2, so the
micro-batch counts differ and must be agreed), runs one policy_update under FSDP2 with SGD
(weight deltas are gradients), saves a checkpoint, reloads it into a fresh sharded model and
checks the round trip. ``--full`` runs one process on all 13 samples, without FSDP.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_model_support import random_samples  # noqa: E402

from sdar_kernels import LossConfig  # noqa: E402
from sdar_engine import checkpoint as ckpt  # noqa: E402
from sdar_engine.distributed import cleanup, init_distributed, wrap_fsdp  # noqa: E402
from sdar_engine.model import ModelConfig, load_policy  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402

LOSS = LossConfig.preset("sdar", kl_coef=0.0, entropy_coef=0.001)
SHARES = (slice(0, 11), slice(11, 13))


def _model(model_dir: str, device):
    model, _ = load_policy(ModelConfig(path=model_dir), device)
    return wrap_fsdp(model)


def main(model_dir: str, out_dir: str, full: bool) -> None:
    torch.manual_seed(0)
    rank, world, device = init_distributed()
    model = _model(model_dir, device)
    samples = random_samples(13, model.config.vocab_size, seed=11)
    for s in samples:  # teacher log-probs come from the rollout; old ones are scored here
        s.teacher_logp = -5.0 + 0.3 * torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(s.episode))
    mine = samples if full else samples[SHARES[rank]]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # step 1: delta = lr * grad
    metrics = policy_update(model, opt, mine, LOSS, max_tokens=100, grad_clip=0.0)
    path = ckpt.save_checkpoint(out_dir, model, opt, None, 1, {"world": world})
    again = _model(model_dir, device)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.5, momentum=0.9)
    ckpt.load_checkpoint(path, again, opt2, None)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        a = a.full_tensor() if hasattr(a, "full_tensor") else a
        b = b.full_tensor() if hasattr(b, "full_tensor") else b
        assert torch.equal(a, b), f"reloaded {n} differs"
    buffers = [opt2.state[p]["momentum_buffer"] for p in again.parameters()]
    for p, buf in zip(model.parameters(), buffers):  # optimizer state came back too
        assert torch.equal(opt.state[p]["momentum_buffer"].full_tensor() if world > 1 else
                           opt.state[p]["momentum_buffer"], buf.full_tensor() if world > 1 else buf)
    if rank == 0:
        print(f"WORKER_OK world={world} loss={metrics['loss']:.8f} tokens={metrics['tokens']:.0f} "
              f"micro_batches={metrics['micro_batches']:.0f}", flush=True)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--full" in sys.argv[3:])
