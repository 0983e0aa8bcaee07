"""DTensor (FSDP2) lm_head operands: the loss gathers them differentiably (sdar_kernels/dtensor.py).

One torchrun launch of dtensor_worker.py (2 gloo ranks, CPU, float64) shards a tiny model with
``fully_shard``; every check compares with an unsharded copy run in the same process (see the
worker's docstring for the cases). Relative errors in float64 must stay at rounding level.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-12  # float64; measured <= 4e-16
CONFIGS = ("rowwise", "stats", "teacher_div")
PARAMS = {"trunk.weight", "trunk.bias", "lm_head.weight", "lm_head.bias"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dtensor")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for _ in range(2):  # one retry: on a loaded 2-core box a gloo rank rarely aborts at start-up
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               f"--master_port={_free_port()}", os.path.join(HERE, "dtensor_worker.py"), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    log = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0 and proc.stdout.count("DTENSOR_WORKER_OK") == 2, log
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_weight_is_a_dtensor_and_torch_refuses_the_mix(ranks):
    for res in ranks:
        assert res["weight_is_dtensor"]
        assert "mixed torch.Tensor and DTensor" in res["mixed_mm_error"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", ["dp", "rep", "window"])
def test_sharded_loss_and_gradients_equal_one_process(ranks, mode, name):
    """dp: half the tokens per rank (loss x world size); rep: the whole batch on both ranks;
    window: the loss inside an FSDP2 forward, where the weight is already unsharded."""
    for res in ranks:
        assert res[f"{mode}_{name}_loss"] <= TOL
        grads = res[f"{mode}_{name}_grads"]
        assert set(grads) == PARAMS  # the lm_head weight and bias got their gradient
        assert max(grads.values()) <= TOL, grads
        if mode == "window":
            assert res[f"window_{name}_weight_plain"]


def test_the_custom_op_with_a_dtensor_weight(ranks):
    for res in ranks:
        assert res["dp_op_loss"] <= TOL
        assert set(res["dp_op_grads"]) == PARAMS and max(res["dp_op_grads"].values()) <= TOL


def test_fused_linear_logprobs_with_a_dtensor_weight(ranks):
    for res in ranks:
        assert res["logprobs_values"] <= TOL
        assert set(res["logprobs_grads"]) == PARAMS and max(res["logprobs_grads"].values()) <= TOL


def test_dtensor_hidden(ranks):
    for res in ranks:
        assert res["hidden_replicate_loss"] <= TOL
        assert max(res["hidden_replicate_grads"].values()) <= TOL
        assert "Shard(dim=1)" in res["hidden_shard1_error"] and "Replicate()" in res["hidden_shard1_error"]


def test_plain_tensors_take_the_direct_path():
    """Without a DTensor argument the decorator calls straight through (same objects)."""
    from sdar_kernels.dtensor import is_dtensor, localize

    seen = {}

    @localize
    def entry(hidden, weight, bias=None):
        seen.update(hidden=hidden, weight=weight, bias=bias)

    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    entry(h, w, bias=None)
    assert seen["hidden"] is h and seen["weight"] is w and not is_dtensor(h)
