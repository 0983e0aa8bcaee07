"""LossConfig: every option of the SDAR loss (SDAR_MATH.md), validated, with the paper's presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

BACKENDS = ("auto", "triton", "torch", "reference")
KL_TYPES = ("k1", "k2", "k3")
GATES = ("gap", "entropy", "soft_or", "none")
DIVERGENCES = ("sampled", "reverse_kl", "forward_kl", "jsd")
TEACHER_USES = ("none", "sdar", "skill_sd", "rlsd")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REFERENCE_DTYPES = ("input", "float32", "float64")

_CHOICES = {
    "backend": BACKENDS,
    "kl_type": KL_TYPES,
    "gate": GATES,
    "divergence": DIVERGENCES,
    "teacher_use": TEACHER_USES,
    "agg": AGGREGATIONS,
    "reference_dtype": REFERENCE_DTYPES,
}


@dataclass(frozen=True)
class LossConfig:
    """All knobs of L = c_pg Agg(L_pg) + c_kl Agg(k) - c_H Agg(H) + lambda Agg(L_sd).

    Coefficients are dimensionless; chunk sizes are counts of tokens / vocabulary entries.
    ``grad_in_forward`` (torch and triton backends, when a gradient is wanted): compute dL/dh and
    dL/dW during the forward from whole vocabulary rows of a token chunk (3 lm_head GEMM passes
    instead of 4; exact, as the loss is a scalar). On the triton backend ("auto" on CUDA) the
    logits and gradient GEMMs run on cuBLAS with fp32 output and Triton row kernels do the
    vocabulary work (kernels/triton_backend/rows.py). Off, the per-token statistics op
    (linear_stats) runs and its backward recomputes the logit tiles.
    ``teacher_use`` picks how teacher log-probs enter: "sdar" (gated auxiliary, sd_coef = lambda),
    "skill_sd" (Skill-SD's weighted exp-divergence, sd_coef its coefficient), "rlsd" (teacher
    reweights the advantage; no auxiliary term), "none" (plain GRPO).
    """

    backend: str = "auto"
    temperature: float = 1.0
    # policy (PPO clip)
    policy_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = 3.0
    # KL to the reference policy
    kl_coef: float = 0.0
    kl_type: str = "k3"
    # entropy bonus
    entropy_coef: float = 0.0
    # teacher / self-distillation
    teacher_use: str = "sdar"
    sd_coef: float = 0.01
    gate: str = "gap"
    gate_beta: float = 5.0
    divergence: str = "sampled"
    jsd_beta: float = 0.5
    rlsd_weight: float = 0.5
    rlsd_clip: float = 0.2
    # aggregation
    agg: str = "token-mean"
    loss_scale_factor: Optional[float] = None
    # execution
    token_chunk: int = 1024
    vocab_chunk: int = 2048
    grad_in_forward: bool = True
    reference_dtype: str = "float64"
    # value checks (kernels/input_checks.py): finite inputs and in-range targets on the tokens
    # the loss reads, one host sync per call; off for CUDA graphs / torch.compile
    check_inputs: bool = True

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"LossConfig.{name}={value!r} is invalid; valid choices: {', '.join(choices)}")
        _check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        _check(0 <= self.clip_low < 1, "clip_low", self.clip_low, "a number in [0, 1)")
        _check(self.clip_high >= 0, "clip_high", self.clip_high, "a number >= 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", self.dual_clip, "None or a number > 1")
        _check(0 <= self.jsd_beta <= 1, "jsd_beta", self.jsd_beta, "a number in [0, 1]")
        _check(0 <= self.rlsd_weight <= 1, "rlsd_weight", self.rlsd_weight, "a number in [0, 1]")
        _check(0 <= self.rlsd_clip < 1, "rlsd_clip", self.rlsd_clip, "a number in [0, 1)")
        _check(self.gate_beta >= 0, "gate_beta", self.gate_beta, "a number >= 0")
        _check(
            self.loss_scale_factor is None or self.loss_scale_factor > 0,
            "loss_scale_factor", self.loss_scale_factor, "None or a number > 0",
        )
        for name in ("policy_coef", "kl_coef", "entropy_coef", "sd_coef", "temperature", "gate_beta"):
            _check(math.isfinite(getattr(self, name)), name, getattr(self, name), "a finite number")
        for name in ("token_chunk", "vocab_chunk"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")

    # -- derived switches -------------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        """Teacher log-probs are needed by the loss."""
        return self.teacher_use == "rlsd" or (self.teacher_use in ("sdar", "skill_sd") and self.sd_coef != 0)

    @property
    def full_vocab_divergence(self) -> bool:
        """The SDAR term needs the teacher's full distribution (teacher hidden states)."""
        return self.teacher_use == "sdar" and self.sd_coef != 0 and self.divergence != "sampled"

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0 or (self.uses_teacher and self.teacher_use == "sdar"
                                          and self.gate in ("entropy", "soft_or"))

    def replace(self, **changes: Any) -> "LossConfig":
        """A copy with ``changes`` applied (validated); unknown names raise ValueError."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LossConfig":
        """The paper's methods: grpo, sdar, grpo_opsd, opsd, skill_sd, rlsd (+ overrides)."""
        if name not in PRESETS:
            raise ValueError(f"LossConfig.preset name={name!r} is invalid; valid choices: {', '.join(PRESETS)}")
        _check_names(overrides)
        return cls(**{**PRESETS[name], **overrides})


def _check(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"LossConfig.{field}={value!r} is invalid; expected {valid}")


def _check_names(changes: dict) -> None:
    names = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"LossConfig has no field(s) {unknown}; valid fields: {', '.join(sorted(names))}")


# Paper defaults (PAPER_FACTS.md): clip 0.2, dual clip 3, k3 KL 0.01, lambda 0.01, beta 5, token-mean.
_PAPER = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.01, kl_type="k3", agg="token-mean")
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {**_PAPER, "teacher_use": "none", "sd_coef": 0.0},
    "sdar": {**_PAPER, "teacher_use": "sdar", "sd_coef": 0.01, "gate": "gap", "gate_beta": 5.0},
    # GRPO+OPSD: the ungated baseline, sigma(0 * gap) = 0.5 everywhere.
    "grpo_opsd": {**_PAPER, "teacher_use": "sdar", "sd_coef": 0.01, "gate": "gap", "gate_beta": 0.0},
    # OPSD alone: no RL term, ungated distillation at unit weight.
    "opsd": {**_PAPER, "policy_coef": 0.0, "teacher_use": "sdar", "sd_coef": 1.0, "gate": "none"},
    "skill_sd": {**_PAPER, "teacher_use": "skill_sd", "sd_coef": 0.001},
    "rlsd": {**_PAPER, "teacher_use": "rlsd", "sd_coef": 0.0, "rlsd_weight": 0.5, "rlsd_clip": 0.2},
}
