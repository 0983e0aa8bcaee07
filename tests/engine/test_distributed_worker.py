"""Worker for test_distributed.py (no tests here): run under torchrun, or alone for the full batch.

Usage: python test_distributed_worker.py MODEL_DIR OUT_DIR [--full] [--train TINY_DIR RUN_DIR]

Phase 1 (policy_update): each rank takes an uneven share of the same 13 samples (rank 0 gets
11, rank 1 gets 2, so the micro-batch counts differ and must be agreed), runs one
policy_update under FSDP2 with SGD (weight deltas are gradients), saves a checkpoint, reloads it
into a fresh sharded model and checks the round trip. ``--full`` runs one process on all 13
samples, without FSDP.
Phase 2 (``--train``): ``sdar train`` (cli.main) on the fake env for ``train_args()``: the same
CLI under torchrun, rank 0 writing metrics / episodes / checkpoints.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loop_fakes import FakeEnv  # noqa: E402
from test_model_support import random_samples  # noqa: E402

from sdar_kernels import LossConfig  # noqa: E402
from sdar_engine import checkpoint as ckpt  # noqa: E402
from sdar_engine.distributed import cleanup, init_distributed, wrap_fsdp  # noqa: E402
from sdar_engine.model import ModelConfig, load_policy  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402

LOSS = LossConfig.preset("sdar", kl_coef=0.0, entropy_coef=0.001)
SHARES = (slice(0, 11), slice(11, 13))


def train_args(tiny_dir: str, run_dir: str, steps: int = 3) -> list[str]:
    """``sdar train`` arguments: fake env (3 tasks x 2 copies), SDAR + KL (a sharded reference),
    2 PPO epochs of mini-batches of 8 step samples, episodes logged."""
    sets = [f"model.path={tiny_dir}", "model.attn=sdpa", "env.tasks_per_step=3", "env.group_size=2",
            "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=256", "rollout.eval_temperature=0",
            "algo.max_tokens=512", "algo.ppo_mini_batch_size=8", "algo.ppo_epochs=2", "algo.loss={kl_coef: 0.01}",
            "optim.lr=0.001", f"train.steps={steps}", "train.save_every=3", "train.keep_checkpoints=4",
            "train.tensorboard=false", "train.plot=false", "train.device=cpu", "train.log_episodes=true",
            "env.eval_tasks=2"]
    return ["train", "--config", "defaults", "--output", run_dir] + [x for s in sets for x in ("--set", s)]


def fake_make_env(cfg, split):
    return FakeEnv(split, n_tasks=8)


def _model(model_dir: str, device):
    model, _ = load_policy(ModelConfig(path=model_dir), device)
    return wrap_fsdp(model)


def update_phase(model_dir: str, out_dir: str, full: bool, keep_group: bool = False) -> None:
    """Phase 1; ``keep_group`` leaves the process group up for phase 2 (gloo groups do not
    re-initialize reliably in one process after destroy_process_group)."""
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
    if not keep_group:
        cleanup()


def train_phase(tiny_dir: str, run_dir: str) -> None:
    import sdar_engine.trainer as trainer_mod
    from sdar_engine.cli import main

    trainer_mod.make_env = fake_make_env
    code = main(train_args(tiny_dir, run_dir))
    if os.environ.get("RANK", "0") == "0":
        print(f"TRAIN_OK code={code}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    update_phase(args[0], args[1], "--full" in args[2:], keep_group="--train" in args)
    if "--train" in args:
        k = args.index("--train")
        train_phase(args[k + 1], args[k + 2])
