"""torchrun --nproc_per_node=2 (gloo, FSDP2 fully_shard) on half batches == one process on the full batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_model_support import build_and_load, one_thread  # noqa: E402,F401

import test_distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_half_batches_equal_one_rank_full_batch(tmp_path):
    model_dir = build_and_load(str(tmp_path / "tiny"))[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for _ in range(2):  # one retry: on a loaded 2-core box a gloo rank rarely aborts at start-up
        # (seen once in ~20 runs, SIGABRT); a real defect is deterministic and fails both tries
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               f"--master_port={_free_port()}", os.path.join(HERE, "test_distributed_worker.py"),
               model_dir, str(tmp_path / "ddp")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and "WORKER_OK world=2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

    worker.main(model_dir, str(tmp_path / "single"), full=True)
    ddp = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_00000001" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "checkpoints" / "step_00000001" / "model.safetensors"))
    init = load_file(os.path.join(model_dir, "model.safetensors"))
    assert ddp.keys() == single.keys()
    # Relative to the size of the update the step made, over all weights together: a per-tensor
    # ratio is dominated by fp32 summation order on tensors whose gradient is a cancelling sum
    # over all tokens (the final norm weight: ~1.6e-5 there while the whole step agrees to ~1e-6).
    diff = sum(((ddp[k] - single[k]).double().norm() ** 2).item() for k in single) ** 0.5
    update = sum(((single[k] - init[k]).double().norm() ** 2).item() for k in single) ** 0.5
    per_tensor = {k: (ddp[k] - single[k]).norm().item() / max((single[k] - init[k]).norm().item(), 1e-6)
                  for k in single}
    assert diff / update <= 1e-5, (diff / update, per_tensor)
    assert max(per_tensor.values()) <= 1e-4, per_tensor
    assert all((single[k] - init[k]).norm() > 1e-5 for k in single)  # every tensor moved
