"""LossConfig: every option of the SDAR loss (SDAR_MATH.md), validated, with the paper's presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

BACKENDS = ("auto", "triton", "torch", "reference")
KL_TYPES = ("k1", "k2", "k3", "k1+", "k3+", "k3_unclamped")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
GATES = ("gap", "entropy", "soft_or", "none")
DIVERGENCES = ("sampled", "reverse_kl", "forward_kl", "jsd", "topk_forward_kl")
TOPK_TAILS = ("renorm", "tail", "truncated")  # sdar_kernels/topk.py, docs/topk_distillation.md
TEACHER_USES = ("none", "sdar", "skill_sd", "rlsd")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REFERENCE_DTYPES = ("input", "float32", "float64")

_CHOICES = {
    "backend": BACKENDS,
    "kl_type": KL_TYPES,
    "gate": GATES,
    "divergence": DIVERGENCES,
    "topk_tail": TOPK_TAILS,
    "teacher_use": TEACHER_USES,
    "agg": AGGREGATIONS,
    "ratio_level": RATIO_LEVELS,
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
    vocabulary work (sdar_kernels/triton_backend/rows.py). Off, the per-token statistics op
    (linear_stats) runs and its backward recomputes the logit tiles. ``ratio_level`` "sequence" and
    "sequence_token" couple the tokens of a sequence (a token's coefficient needs the whole sequence's
    log-ratio), so they always take that linear_stats + epilogue path: ``grad_in_forward`` is ignored.
    ``teacher_use`` picks how teacher log-probs enter: "sdar" (gated auxiliary, sd_coef = lambda),
    "skill_sd" (Skill-SD's weighted exp-divergence, sd_coef its coefficient), "rlsd" (teacher
    reweights the advantage; no auxiliary term), "none" (plain GRPO). ``kl_ratio_weighted`` makes the
    KL term c_kl Agg(rho k) (TRL's use_bias_correction_kl), rho the un-clipped, un-capped ratio.
    """

    backend: str = "auto"
    temperature: float = 1.0
    # policy (PPO clip)
    policy_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = 3.0
    # TRL's `delta`: the unclipped ratio is capped at this value before the PPO min (two-sided clip)
    clip_ratio_max: Optional[float] = None
    # "token" (PPO), "sequence" (GSPO as TRL: one ratio per sequence, exp of the mean log-ratio over its
    # loss tokens, gradient through every token) or "sequence_token" (GSPO-token as verl's "gspo" loss:
    # the same value, straight-through gradient per token, log-ratio clamped at 10); see SDAR_MATH.md
    ratio_level: str = "token"
    # KL to the reference policy
    kl_coef: float = 0.0
    kl_type: str = "k3"
    # TRL's use_bias_correction_kl: the per-token KL times rho_i, the ratio of ratio_level before any
    # clip or clip_ratio_max cap, differentiable through both factors (SDAR_MATH.md)
    kl_ratio_weighted: bool = False
    # entropy bonus
    entropy_coef: float = 0.0
    entropy_agg: Optional[str] = None  # None: aggregated like the other terms (agg); TRL: "token-mean"
    # teacher / self-distillation
    teacher_use: str = "sdar"
    sd_coef: float = 0.01
    gate: str = "gap"
    gate_beta: float = 5.0
    divergence: str = "sampled"
    jsd_beta: float = 0.5
    # divergence "topk_forward_kl": teacher top-k ids/log-probs in, KL over them (sdar_kernels/topk.py)
    topk_tail: str = "renorm"
    # verl's log_prob_min_clamp (its default -10.0): both top-k log-prob sets clamped below; "truncated" only
    topk_logprob_min: Optional[float] = None
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
    # value checks (sdar_kernels/input_checks.py): finite inputs and in-range targets on the tokens
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
        _check(self.clip_ratio_max is None or self.clip_ratio_max > 1 + self.clip_high, "clip_ratio_max",
               self.clip_ratio_max, f"None or a number > 1 + clip_high = {1 + self.clip_high}")
        _check(self.entropy_agg is None or self.entropy_agg in AGGREGATIONS, "entropy_agg", self.entropy_agg,
               f"None (same as agg) or one of {', '.join(AGGREGATIONS)}")
        _check(0 <= self.jsd_beta <= 1, "jsd_beta", self.jsd_beta, "a number in [0, 1]")
        _check(self.topk_logprob_min is None or (self.topk_tail == "truncated" and self.topk_logprob_min < 0),
               "topk_logprob_min", self.topk_logprob_min, "None, or a number < 0 with topk_tail='truncated'")
        _check(0 <= self.rlsd_weight <= 1, "rlsd_weight", self.rlsd_weight, "a number in [0, 1]")
        _check(0 <= self.rlsd_clip < 1, "rlsd_clip", self.rlsd_clip, "a number in [0, 1)")
        _check(self.gate_beta >= 0, "gate_beta", self.gate_beta, "a number >= 0")
        _check(isinstance(self.kl_ratio_weighted, bool), "kl_ratio_weighted", self.kl_ratio_weighted, "True or False")
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
        return (self.teacher_use == "sdar" and self.sd_coef != 0
                and self.divergence not in ("sampled", "topk_forward_kl"))

    @property
    def topk_divergence(self) -> bool:
        """The SDAR term is the top-k forward KL (teacher_topk_ids / teacher_topk_logprobs)."""
        return self.teacher_use == "sdar" and self.sd_coef != 0 and self.divergence == "topk_forward_kl"

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
        """The paper's methods (grpo, sdar, grpo_opsd, opsd, skill_sd, rlsd) and the peers' defaults
        (trl_grpo, trl_bnpo, trl_dr_grpo, trl_dapo, verl_grpo, verl_gspo), plus overrides."""
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

# TRL 1.16.0 GRPOConfig defaults (trl/trainer/grpo_config.py; loss in GRPOTrainer._compute_loss):
# beta=0.0 (its KL, when beta > 0, is exp(r - s) - (r - s) - 1 unclamped), epsilon=0.2, epsilon_high=None
# (= epsilon), delta=None, no dual clip, importance_sampling_level="token", use_bias_correction_kl=True (the
# KL times the un-clipped ratio: kl_ratio_weighted), entropy_coef=0.0 with the bonus
# always a token mean of the micro-batch, temperature=1.0. Per-batch numbers stay with the caller:
# grpo counts fully masked rows in B (normalizer=B), dr_grpo divides by B * max_completion_length
# (loss_scale_factor; default 512), dapo by num_items_in_batch (normalizer), gradient accumulation
# through normalizer / entropy_normalizer.
_TRL = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, clip_ratio_max=None, kl_coef=0.0, kl_type="k3_unclamped",
            kl_ratio_weighted=True, entropy_coef=0.0, entropy_agg="token-mean", teacher_use="none", sd_coef=0.0)
# verl 0.9.1 actor defaults (verl/workers/config/actor.py, trainer/config/actor/actor.yaml): clip_ratio 0.2
# (low = high = 0.2), clip_ratio_c=3.0 (dual clip), loss_agg_mode="token-mean", loss_scale_factor=None,
# entropy_coeff=0 (aggregated with loss_agg_mode), kl_loss_coef=0.001, kl_loss_type="low_var_kl" (= k3,
# clamped) with use_kl_loss on ("True for GRPO" in actor.yaml; kl_coef=0 is use_kl_loss=False).
_VERL = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.001, kl_type="k3", agg="token-mean",
             entropy_coef=0.0, teacher_use="none", sd_coef=0.0)
PRESETS.update({
    "trl_grpo": {**_TRL, "agg": "seq-mean-token-mean"},  # loss_type="grpo"
    "trl_bnpo": {**_TRL, "agg": "token-mean"},  # loss_type="bnpo"
    "trl_dr_grpo": {**_TRL, "agg": "seq-mean-token-sum-norm"},  # loss_type="dr_grpo"; set loss_scale_factor
    "trl_dapo": {**_TRL, "agg": "token-mean"},  # loss_type="dapo" (TRL's default); normalizer=num_items_in_batch
    "verl_grpo": dict(_VERL),  # policy_loss.loss_mode="vanilla"
    # policy_loss.loss_mode="gspo" (compute_policy_loss_gspo): GSPO-token ratio, no dual clip, the actor's
    # clip_ratio and loss_agg_mode (the GSPO recipe's 3e-4 / 4e-4 clip ranges are overrides, not defaults)
    "verl_gspo": {**_VERL, "dual_clip": None, "ratio_level": "sequence_token"},
})
