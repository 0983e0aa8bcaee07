"""Liger-Kernel's chunked GRPO loss equals ours on matched settings (benchmarks/liger_grpo.py),
and the loss suite's liger backend builds and runs that comparison."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("liger_kernel.chunked_loss")

from sdar_benchmarks import liger_grpo  # noqa: E402
from sdar_benchmarks.grids import ACCEPTANCE, cases  # noqa: E402
from sdar_benchmarks.loss_cases import Case, make_inputs, naive_loss, loss_config, prepare, skip_reason  # noqa: E402

SEEDS = [0, 1, 2]
B, T, H, V = 4, 9, 31, 123  # odd shapes; sequence 1 fully masked
TOL = 1e-5  # fp32: measured 3e-7 .. 2e-6 relative (Liger's log-probs are fp32 whatever the input)


def _problem(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = B * T
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).float()
    mask[T:2 * T] = 0
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    old = (logp + 1.5 * torch.randn(n, generator=g, dtype=torch.float64)).float()  # every clip branch fires
    adv = liger_grpo.per_sequence_advantages(B, T, g)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, old=old, adv=adv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ours(p: dict, cfg, loss_type: str):
    from sdar_kernels import fused_linear_sdar_loss

    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    n = h.shape[0]
    loss = fused_linear_sdar_loss(h, w, p["targets"], p["adv"], p["old"], p["mask"],
                                  segment_ids=liger_grpo.segment_ids(n, T),
                                  normalizer=liger_grpo.matched_normalizer(loss_type, n, T), config=cfg).loss
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _liger(p: dict, cfg, loss_type: str):
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    fn = liger_grpo.liger_module(cfg, loss_type)
    loss = liger_grpo.liger_loss(fn, h, w, p["targets"], p["mask"], p["adv"], p["old"], seq_len=T)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_liger_equals_ours_on_matched_settings(seed, loss_type, dual_clip):
    p = _problem(seed)
    cfg = liger_grpo.matched_config(loss_type, backend="torch", dual_clip=dual_clip)
    ours, theirs = _ours(p, cfg, loss_type), _liger(p, cfg, loss_type)
    for name, a, b in zip(("loss", "dL/dh", "dL/dW"), theirs, ours):
        assert _rel(a, b) <= TOL, (name, _rel(a, b))


def test_the_dual_clip_cap_fires_and_matters():
    """Seeds 1 and 2 hold tokens with A < 0 and ratio > 3; without Liger's delta the losses differ."""
    p = _problem(1)
    ratio = torch.exp(torch.log_softmax(p["hidden"] @ p["weight"].T, -1).gather(1, p["targets"][:, None])[:, 0]
                      - p["old"])
    assert bool(((ratio > 3) & (p["adv"] < 0) & (p["mask"] > 0)).any())
    ours = _ours(p, liger_grpo.matched_config("grpo", backend="torch"), "grpo")
    uncapped = _liger(p, liger_grpo.matched_config("grpo", backend="torch", dual_clip=None), "grpo")
    assert _rel(uncapped[1], ours[1]) > 1e-3


def test_liger_module_rejects_a_kl_term():
    with pytest.raises(ValueError, match="kl_coef"):
        liger_grpo.liger_module(liger_grpo.matched_config("grpo", kl_coef=0.01))


def test_sequence_layout():
    assert liger_grpo.sequence_layout(4096) == (4, 1024)
    assert liger_grpo.sequence_layout(64) == (1, 64)
    assert liger_grpo.sequence_layout(1500) == (1, 1500)  # 1024 does not divide 1500: one sequence
    with pytest.raises(ValueError, match="sequence_layout"):
        liger_grpo.sequence_layout(0)
    with pytest.raises(ValueError, match="constant within each"):
        liger_grpo.check_per_sequence(torch.arange(2048.0))


def test_liger_case_builder_runs_and_matches_naive():
    case = Case("loss", "liger", 256, 300, 16, preset="liger-grpo")
    assert skip_reason(case) is None
    x = make_inputs(case)
    loss = prepare(case, x)()
    gh, gw = x.hidden.grad.clone(), x.weight.grad.clone()
    naive = Case("loss", "naive", 256, 300, 16, preset="liger-grpo")
    y = make_inputs(naive)
    ref = naive_loss(y, loss_config(naive, "torch"))
    ref.backward()
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= TOL * max(1.0, abs(float(ref)))
    assert _rel(gh, y.hidden.grad) <= TOL and _rel(gw, y.weight.grad) <= TOL


def test_liger_case_validation_and_grids():
    with pytest.raises(ValueError, match="Case.preset="):
        Case("loss", "liger", 8, 16, 4)  # Liger cannot compute the SDAR preset
    with pytest.raises(ValueError, match="Case.preset="):
        Case("loss", "torch", 8, 16, 4, preset="nope")
    assert "log-prob" in skip_reason(Case("logprobs", "liger", 8, 16, 4, preset="liger-grpo"))
    got = [(c.backend, c.preset) for c in cases("loss", "acceptance")]
    assert got == [("naive", "sdar"), ("torch", "sdar"), ("torch", "liger-grpo"), ("liger", "liger-grpo")]
    assert all((c.n, c.v, c.h) == ACCEPTANCE for c in cases("loss", "acceptance"))
    assert all(c.backend != "liger" for c in cases("logprobs", "smoke"))


def _result(backend, preset, time_s, peak):
    return {"suite": "loss", "backend": backend, "preset": preset, "n": 4096, "v": 151936, "h": 896,
            "dtype": "float32", "device": "cpu", "status": "ok", "reason": "", "time_s": time_s, "peak_mib": peak,
            "value": 0.5, "mem_method": "rss-hwm-reset", "repeats": 1}


def test_ratios_use_the_sdar_naive_and_lines_compare_liger():
    from sdar_benchmarks.report import acceptance_lines, kernel_table
    from sdar_benchmarks.runner import add_ratios

    rows = add_ratios([_result("naive", "liger-grpo", 5.0, 100.0), _result("naive", "sdar", 10.0, 8000.0),
                       _result("torch", "sdar", 8.0, 700.0), _result("torch", "liger-grpo", 8.0, 700.0),
                       _result("liger", "liger-grpo", 16.0, 1400.0)])
    assert rows[4]["time_vs_naive"] == pytest.approx(1.6) and rows[4]["mem_vs_naive"] == pytest.approx(0.175)
    lines = acceptance_lines(rows)
    assert "time ratio 0.80" in lines[0] and "Liger chunked GRPO vs naive (same run): time ratio 1.60" in lines[1]
    assert "ours (torch, sdar) / Liger: time 0.50, peak memory 0.50" in lines[1]
    assert "same work): time 0.50" in lines[2]
    assert "| torch (liger-grpo) |" in kernel_table(rows) and "| liger (chunked GRPO) |" in kernel_table(rows)
