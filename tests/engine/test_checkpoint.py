"""Checkpoints: full round trip (weights, optimizer, scheduler, RNG), exact resume, atomicity."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_model_support import build_and_load, random_samples, one_thread  # noqa: E402,F401

from sdar_kernels import LossConfig  # noqa: E402
from sdar_engine import checkpoint as ckpt  # noqa: E402
from sdar_engine.model import ModelConfig, load_policy  # noqa: E402
from sdar_engine.optim import OptimConfig, build_optimizer  # noqa: E402
from sdar_engine.update import policy_update  # noqa: E402

LOSS = LossConfig.preset("sdar", kl_coef=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_and_load(str(tmp_path_factory.mktemp("tiny")))[2]


def _setup(model_dir):
    model, tok = load_policy(ModelConfig(path=model_dir), "cpu")
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=3))
    return model, tok, opt, sched


def _step(model, opt, sched, step):
    """One update on samples drawn from the global RNG (so RNG restore matters)."""
    seed = random.randrange(10**6) + int(torch.randint(0, 10**6, ()).item())
    samples = random_samples(5, model.config.vocab_size, seed=seed, scored=-6.0)
    return policy_update(model, opt, samples, LOSS, 256, 1.0, scheduler=sched)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(model_dir, tmp_path):
    random.seed(0), torch.manual_seed(0)
    model, _, opt, sched = _setup(model_dir)
    straight = [_step(model, opt, sched, i) for i in range(4)]
    final = _weights(model)

    random.seed(0), torch.manual_seed(0)
    model, tok, opt, sched = _setup(model_dir)
    first = [_step(model, opt, sched, i) for i in range(2)]
    path = ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 2, {"algo": {"method": "sdar"}},
                                tokenizer=tok)
    random.seed(123), torch.manual_seed(123)  # scrambled: the checkpoint must restore them
    model, _, opt, sched = _setup(model_dir)
    step, config = ckpt.load_checkpoint(str(tmp_path), model, opt, sched)
    assert (step, config, path) == (2, {"algo": {"method": "sdar"}}, ckpt.latest_checkpoint(str(tmp_path)))
    resumed = first + [_step(model, opt, sched, i) for i in range(2, 4)]
    assert resumed == straight
    for k, v in _weights(model).items():
        assert torch.equal(v, final[k]), k


def test_checkpoint_is_a_loadable_hf_dir(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, opt, sched = _setup(model_dir)
    _step(model, opt, sched, 0)
    path = ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 1, {}, tokenizer=tok)
    again = AutoModelForCausalLM.from_pretrained(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert {"optimizer.pt", "trainer_state.pt", "rng_rank0.pt", "meta.json", "tokenizer.json"} <= set(
        os.listdir(path))


def test_write_killed_midway_leaves_previous_loadable(model_dir, tmp_path, monkeypatch):
    model, _, opt, sched = _setup(model_dir)
    _step(model, opt, sched, 0)
    good = ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 1, {"ok": 1})
    saved = _weights(model)
    _step(model, opt, sched, 1)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the optimizer")

    monkeypatch.setattr(ckpt, "_write_optimizer", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 2, {"ok": 2})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", ".tmp-step_00000002"))  # the debris
    model2, _, opt2, sched2 = _setup(model_dir)
    assert ckpt.load_checkpoint(str(tmp_path), model2, opt2, sched2)[0] == 1
    for k, v in _weights(model2).items():
        assert torch.equal(v, saved[k]), k
    # the next save of that step cleans the debris and succeeds
    ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 2, {"ok": 2}, keep_last=1)
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["step_00000002"]


def test_missing_checkpoint_error(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ckpt.load_checkpoint(str(tmp_path), torch.nn.Linear(2, 2), None)


def test_data_is_fsynced_before_the_completion_marker_and_the_rename(model_dir, tmp_path, monkeypatch):
    model, _, opt, sched = _setup(model_dir)
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.basename(dst)))
        return real_rename(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    ckpt.save_checkpoint(str(tmp_path), model, opt, sched, 3, {})
    synced = [name for kind, name in events if kind == "fsync"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.pt", "meta.json"} <= set(synced)
    assert synced.index("model.safetensors") < synced.index("meta.json")
    # the checkpoints folder is synced after the directory was renamed into place
    assert events.index(("rename", "step_00000003")) < events.index(("fsync", "checkpoints"))
