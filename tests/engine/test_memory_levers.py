"""Each memory lever (docs/memory_levers.md) is really on when asked, off otherwise, and its
impossible combinations are config errors naming the keys.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node=2 THIS MODEL_DIR
OUT.json``) this file is the worker of the 2-rank gloo test: FSDP2 with checkpointing and with
CPUOffloadPolicy.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_model_support import build_and_load, one_thread, random_samples  # noqa: E402,F401

from sdar_kernels import LossConfig  # noqa: E402
from sdar_engine import distributed as dist_mod  # noqa: E402
from sdar_engine import memory_levers as ml  # noqa: E402
from sdar_engine.config import from_dict  # noqa: E402
from sdar_engine.model import ModelConfig, decoder_layers, load_policy  # noqa: E402
from sdar_engine.packing import Sample, pack  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402

LOSS = LossConfig.preset("grpo", kl_coef=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_and_load(str(tmp_path_factory.mktemp("tiny")))[2]


def count_layer_forwards(model) -> list[int]:
    """Forward calls of each decoder layer's body, counted when its MLP starts (a submodule runs
    inside the checkpointed region, so a recompute in backward counts again; a forward hook
    would miss it: the recompute stops early, inside the MLP, once its saved tensors are back).
    Returns the live list."""
    counts = [0] * len(decoder_layers(model))
    for k, layer in enumerate(decoder_layers(model)):
        def hook(module, args, k=k):
            counts[k] += 1
        layer.mlp.register_forward_pre_hook(hook)
    return counts


def one_step(model, samples, opt=None) -> dict:
    """One policy_update on one micro-batch (samples already scored: no scoring forward)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    return policy_update(model, opt, samples, LOSS, max_tokens=4096, grad_clip=0.0)


# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("fallback", [False, True])
def test_checkpointing_recomputes_each_decoder_layer_once_in_backward(tiny, monkeypatch, fallback):
    """2 forward calls of every decoder layer per training micro-step with checkpointing, 1
    without; ``fallback`` forces the per-layer wrapper used when transformers has no switch."""
    import transformers

    if fallback:
        def unsupported(self, *a, **k):
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
            if hasattr(transformers.PreTrainedModel, name):
                monkeypatch.setattr(transformers.PreTrainedModel, name, unsupported)
    seen, weights = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, _ = load_policy(ModelConfig(path=tiny, grad_checkpointing=ckpt), "cpu")
        assert all(getattr(l, "sdar_checkpointed", False) for l in decoder_layers(model)) == (fallback and ckpt)
        counts = count_layer_forwards(model)
        m = one_step(model, random_samples(5, model.config.vocab_size, seed=3, scored=-6.0))
        assert m["micro_batches"] == 1
        seen[ckpt] = counts
        weights[ckpt] = [p.detach().clone() for p in model.parameters()]
    assert seen == {False: [1, 1], True: [2, 2]}
    for a, b in zip(weights[False], weights[True]):  # recomputation changes nothing
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ activation offload
class _CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu with its pack hook counted (``calls``: class-wide)."""

    calls = 0

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
        super().__init__(pin_memory=pin_memory, device_type=device_type)
        pack_hook = self.pack_hook

        def counted(t):
            type(self).calls += 1
            return pack_hook(t)
        self.pack_hook = counted


def test_activation_offload_hook_packs_the_updates_saved_tensors(tiny, monkeypatch, caplog):
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", _CountingSaveOnCpu)
    grads = {}
    for offload, device_ok in ((False, True), (True, False), (True, True)):
        monkeypatch.setattr(ml, "offload_supported", lambda device, ok=device_ok: ok)
        _CountingSaveOnCpu.calls = 0
        model, _ = load_policy(ModelConfig(path=tiny, activation_offload=offload), "cpu")
        with caplog.at_level(logging.INFO, logger="sdar_engine.memory"):
            one_step(model, random_samples(4, model.config.vocab_size, seed=5, scored=-6.0))
        packed = _CountingSaveOnCpu.calls
        if offload and device_ok:  # every decoder layer saves several tensors for backward
            assert packed >= 5 * len(decoder_layers(model)), packed
        else:
            assert packed == 0
        grads[(offload, device_ok)] = [p.detach().clone() for p in model.parameters()]
    assert "model.activation_offload=true on device cpu: no-op" in caplog.text
    for a, b in zip(grads[(False, True)], grads[(True, True)]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ FSDP2 CPU offload
def test_offload_keys_are_config_errors_on_cpu_and_without_ranks(tiny):
    for key in ("activation_offload", "fsdp_cpu_offload"):
        with pytest.raises(ValueError, match=f"model.{key}=true is invalid with train.device='cpu'"):
            from_dict({"model": {key: True}, "train": {"device": "cpu"}}, check_paths=False)
        assert getattr(from_dict({"model": {key: True}}, check_paths=False).model, key) is True
    with pytest.raises(ValueError, match="algo.max_memory_gb=-1"):
        from_dict({"algo": {"max_memory_gb": -1}}, check_paths=False)
    model, _ = load_policy(ModelConfig(path=tiny, fsdp_cpu_offload=True), "cpu")
    with pytest.raises(ValueError, match="model.fsdp_cpu_offload=true needs FSDP2"):
        dist_mod.wrap_fsdp(model)  # no process group here
    assert dist_mod.wrap_fsdp(model, cpu_offload=False) is model


def test_wrap_fsdp_passes_the_offload_policy_to_every_fully_shard(tiny, monkeypatch):
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    calls = []
    monkeypatch.setattr(dist_mod, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_mod, "world_size", lambda: 2)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **k: "mesh")
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw)))
    monkeypatch.setattr(fsdp, "register_fsdp_forward_method", lambda *a: None)
    for offload in (True, False):
        calls.clear()
        model, _ = load_policy(ModelConfig(path=tiny, fsdp_cpu_offload=offload), "cpu")
        dist_mod.wrap_fsdp(model)
        assert [m for m, _ in calls] == decoder_layers(model) + [model]
        policies = [kw.get("offload_policy") for _, kw in calls]
        if offload:
            assert all(isinstance(p, fsdp.CPUOffloadPolicy) and p.pin_memory is False for p in policies)
        else:
            assert policies == [None] * len(calls)
    assert dist_mod.offload_policy("cuda").pin_memory is True


def test_init_distributed_adds_a_host_backend_for_cpu_offload_on_gpus(monkeypatch):
    import torch.distributed as dist

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_backend", lambda: backends[-1])
    dist_mod.init_distributed("cuda")
    dist_mod.init_distributed("cuda", cpu_offload=True)
    assert backends == ["nccl", "cuda:nccl,cpu:gloo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available in this build")
def test_two_gloo_ranks_checkpoint_each_layer_and_offload_shards(tiny, tmp_path):
    """FSDP2 on 2 gloo ranks: checkpointing (applied before fully_shard) recomputes each layer,
    CPUOffloadPolicy reaches every FSDP parameter, and all three runs end on the same weights."""
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for _ in range(2):  # one retry: a gloo rank rarely aborts at start-up on the loaded 2-core box
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               f"--master_port={_free_port()}", os.path.abspath(__file__), tiny, str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = json.loads(out.read_text())
    assert runs["plain"]["counts"] == [1, 1] and runs["ckpt"]["counts"] == [2, 2]
    assert runs["offload"]["counts"] == [2, 2]
    assert not any(runs["plain"]["offload_to_cpu"]) and not any(runs["ckpt"]["offload_to_cpu"])
    assert runs["offload"]["offload_to_cpu"] and all(runs["offload"]["offload_to_cpu"])
    for name in ("ckpt", "offload"):
        assert runs[name]["loss"] == pytest.approx(runs["plain"]["loss"], rel=1e-6)
        assert runs[name]["weights"] == pytest.approx(runs["plain"]["weights"], rel=1e-6, abs=1e-8)


def _rank_worker(model_dir: str, out: str) -> None:
    """Each configuration: load, (checkpoint,) fully_shard (with CPUOffloadPolicy), one update of
    the rank's half of the samples; rank 0 writes counts, offload flags, loss and weight sums."""
    from sdar_engine.distributed import cleanup, full_state_dict, init_distributed, rank, wrap_fsdp

    torch.set_num_threads(1)
    r, world, device = init_distributed("cpu")
    results = {}
    for name, ckpt, offload in (("plain", False, False), ("ckpt", True, False), ("offload", True, True)):
        torch.manual_seed(0)
        model, _ = load_policy(ModelConfig(path=model_dir, grad_checkpointing=ckpt, fsdp_cpu_offload=offload), device)
        counts = count_layer_forwards(model)  # hooks set before sharding stay on the layers
        model = wrap_fsdp(model)
        flags = [fp.offload_to_cpu for layer in decoder_layers(model)
                 for fp in layer._get_fsdp_state()._fsdp_param_group.fsdp_params]
        samples = random_samples(6, model.config.vocab_size, seed=3, scored=-6.0)[r::world]
        m = one_step(model, samples)
        state = full_state_dict(model)
        results[name] = {"counts": counts, "offload_to_cpu": flags, "loss": m["loss"],
                         "weights": [float(t.double().abs().sum()) for _, t in sorted(state.items())]}
    if rank() == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    cleanup()


# ------------------------------------------------------------------ token budget in the packer
def _samples(lengths: list[int]) -> list[Sample]:
    return [Sample(prompt_ids=[5] * (n - 2), response_ids=[6, 7], episode=i) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("num_micro_batches", [None, 2, 6])
def test_a_sample_over_the_budget_trains_alone_with_a_warning(caplog, num_micro_batches):
    lengths = [30, 500, 40, 90, 20, 300, 60]
    with caplog.at_level(logging.WARNING, logger="sdar_engine.packing"):
        micro = pack(_samples(lengths), 100, row_tokens=64, num_micro_batches=num_micro_batches)
    assert "algo.max_tokens=100: 2 sample(s) longer than the micro-batch budget (samples[1] has 500 tokens)" \
        in caplog.text
    assert sorted(i for mb in micro for i in mb.sample_index) == list(range(len(lengths)))
    assert len(micro) >= (num_micro_batches or 1)
    for mb in micro:
        if mb.num_tokens > 100:  # over budget only alone
            assert len(mb.sample_index) == 1 and lengths[mb.sample_index[0]] in (500, 300)
    assert sum(mb.num_tokens > 100 for mb in micro) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdar_engine.packing"):
        assert all(mb.num_tokens <= 100 for mb in pack(_samples([30, 40, 90]), 100))
    assert "longer than the micro-batch budget" not in caplog.text


# ------------------------------------------------------------------ max-memory guard
def test_fit_budget_picks_what_fits_and_names_the_key_when_nothing_does():
    mib = 1 << 20
    static, fixed, per_token = 1000 * mib, 1200 * mib, 0.5 * mib
    peaks = [(1024, int(fixed + 1024 * per_token)), (512, int(fixed + 512 * per_token))]
    b = ml.fit_budget(peaks, static, 300 * mib, 2000 * mib, max_tokens=8192, method="fake")
    assert b.per_token_bytes == per_token and b.fixed_bytes == fixed
    assert b.budget_tokens == (2000 - 1200 - 300) * 2  # 500 MiB of room at 0.5 MiB per token
    assert "memory_guard per_token_bytes=524288 " in b.log_line() and " budget_tokens=1000 " in b.log_line()
    ml.check_budget(b, 1000, 2000 / 1024)
    with pytest.raises(ValueError, match=r"algo.max_memory_gb=1.95312 fits micro-batches of 1000 tokens, fewer "
                                         r"than one longest sample \(rollout.max_prompt_tokens"):
        ml.check_budget(b, 1001, 2000 / 1024)
    assert ml.fit_budget(peaks, static, 0, 10 ** 6 * mib, 8192, "fake").budget_tokens == 8192  # the ceiling
    low = ml.fit_budget(peaks, static, 300 * mib, 1400 * mib, 8192, "fake")
    with pytest.raises(ValueError, match="algo.max_memory_gb=1.36719 is below the static footprint"):
        ml.check_budget(low, 1, 1400 / 1024)
    # allocator reuse hid the smaller probe's growth: the fallback over-estimates the cost per token
    flat = ml.fit_budget([(1024, 1500 * mib), (512, 1500 * mib)], static, 0, 2000 * mib, 8192, "fake")
    assert flat.per_token_bytes == 500 * mib / 1024 and flat.budget_tokens == 2048  # 1000 MiB of room


def test_guard_measures_the_update_on_cpu_and_lowers_the_budget(tiny, caplog):
    model, _ = load_policy(ModelConfig(path=tiny), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert ml.optimizer_state_bytes(opt, torch.device("cpu")) == 2 * params
    with caplog.at_level(logging.INFO, logger="sdar_engine.memory"):
        b = ml.measure_budget(model, opt, LOSS, max_memory_gb=64, max_tokens=1024, min_tokens=64)
    assert "memory_guard per_token_bytes=" in caplog.text and b.method == "rss-hwm"
    assert [t for t, _ in b.probe] == [1024, 512] and b.per_token_bytes > 0
    assert b.budget_tokens == 1024  # 64 GiB holds the ceiling
    assert all(p.grad is None for p in model.parameters())  # the probes leave no gradient behind
    # a cap between the fixed part and the ceiling's need: the guard lowers the budget
    cap = (b.fixed_bytes + b.optimizer_state_bytes + b.per_token_bytes * 1024 * 50) / ml.GIB
    from sdar_engine.config import TrainConfig

    cfg = TrainConfig()
    cfg.algo.max_memory_gb, cfg.algo.max_tokens, cfg.algo.loss = cap, 1 << 20, {"kl_coef": 0.0}
    cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens = 32, 32
    assert 1024 < ml.token_budget(model, opt, cfg) < 1 << 20
    cfg.algo.max_memory_gb = 0.0
    assert ml.token_budget(model, opt, cfg) == 1 << 20
    with pytest.raises(ValueError, match="algo.max_memory_gb=0.01 is below the static footprint"):
        ml.measure_budget(model, opt, LOSS, max_memory_gb=0.01, max_tokens=1024, min_tokens=64)


def test_trainer_trains_at_the_guards_budget_and_refuses_a_cap_below_its_footprint(tmp_path, caplog):
    from loop_fakes import FakeEnv, tiny_config

    from sdar_engine.trainer import Trainer

    def trainer(*sets):
        cfg = tiny_config(tmp_path, "algo.max_tokens=1024", "train.steps=1", "algo.loss={kl_coef: 0.0}", *sets)
        return Trainer(cfg, tmp_path, env=FakeEnv(n_tasks=8), eval_env=FakeEnv("test", n_tasks=2))

    with caplog.at_level(logging.INFO, logger="sdar_engine.memory"):
        t = trainer("algo.max_memory_gb=64", "model.grad_checkpointing=true")
    assert "memory_guard per_token_bytes=" in caplog.text and t.max_tokens == 1024
    t.max_tokens = 300  # as if the guard had picked it: every pass of the step packs with it
    packed = []
    real_pack = pack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sdar_engine.logprobs.pack", lambda samples, max_tokens, **kw: packed.append(max_tokens) or
                   real_pack(samples, max_tokens, **kw))
        assert t.train_step(0)["micro_batches"] >= 1
    assert len(packed) >= 3 and set(packed) == {300}  # teacher, old log-probs and update passes
    with pytest.raises(ValueError, match="algo.max_memory_gb=0.01 is below the static footprint"):
        trainer("algo.max_memory_gb=0.01")


if __name__ == "__main__":
    _rank_worker(sys.argv[1], sys.argv[2])
