"""The issue #13 loss options on the triton backend (TRITON_INTERPRET=1 on the CPU) against the
float64 oracle: the 3-pass row path (grad_in_forward) and the statistics op + epilogue path.
Tiny [B, T] problems with odd shapes (V=123, H=31), prompt tokens and a fully masked row."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the backend is imported: kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from .loss_option_cases import check_against_oracle, make_batch  # noqa: E402
from .problems import fresh_seed  # noqa: E402
from .test_triton_stats import _backend  # noqa: E402

# every new option once; the presets ride on the torch tests (same epilogue, different statistics)
NAMES = ["on_policy", "importance_weights", "ratio_sequence", "ratio_sequence_token", "clip_ratio_max",
         "entropy_agg", "kl_k3_plus", "kl_k3_unclamped", "sum_norm_horizon", "trl_grpo", "verl_gspo",
         "kl_ratio_weighted", "kl_ratio_weighted_sequence"]


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["rows", "tiles"])
@pytest.mark.parametrize("name", NAMES)
def test_option_matches_the_oracle_on_triton(name, grad_in_forward):
    _backend()
    if grad_in_forward:
        import importlib

        importlib.import_module("sdar_kernels.triton_backend.rows")
    p = make_batch(fresh_seed(), b=3, t=5)
    check_against_oracle(p, name, "triton", grad_in_forward, 1e-5, dtype=torch.float32)
