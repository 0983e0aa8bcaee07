"""The self-distillation teacher: the rollout policy reading the skill-prefixed prompt.

The teacher is not a second model. Its prompt is ``env.teacher_prompt(i, retrieval)`` (the
student prompt behind privileged skills from the env's skill bank, rendered with the same chat
template); its log-probs of the student's sampled response tokens come from the same weights
that generated them, under no_grad, through the fused log-prob kernel (ENGINE-CORE's
``score_samples(which="teacher")``). Under ``rollout.max_prompt_tokens`` the teacher prompt
loses history records, never its skills or the current observation (``prompt_fit``).

Trajectory samples (``algo.sample_mode: trajectory``) carry the teacher prompt of turn 0 only:
the teacher sequence is that skill-prefixed first prompt + the student's whole ``response_ids``
(every later turn, observations included, identical), scored by the same fused kernel; the
observation tokens are masked there as in the student pass.
"""
from __future__ import annotations

from typing import Any, Sequence

from sdar_envs.skills import RETRIEVALS

from sdar_engine.packing import Sample
from sdar_engine.prompt_fit import candidates_of, fit_prompt_ids


def teacher_prompt_ids(env: Any, tokenizer: Any, indices: Sequence[int], retrieval: str = "keyword",
                       max_prompt_tokens: int = 0) -> list[list[int]]:
    """Token ids of the teacher prompts of envs ``indices`` (call before ``env.step``).

    Each keeps its chat header, every retrieved skill line and the current observation; a
    prompt over ``max_prompt_tokens`` drops its oldest history records first.
    """
    if retrieval not in RETRIEVALS:
        raise ValueError(f"retrieval={retrieval!r} is invalid; valid choices: {', '.join(RETRIEVALS)}")
    return [fit_prompt_ids(tokenizer, candidates_of(env, i, retrieval), max_prompt_tokens, "teacher prompt")
            for i in indices]


def score_teacher(model: Any, samples: list[Sample], max_tokens: int, temperature: float) -> None:
    """Fill ``sample.teacher_logp`` [len(response)] for every sample (no grad, packed streams)."""
    from sdar_engine.logprobs import score_samples

    missing = [k for k, s in enumerate(samples) if s.teacher_prompt_ids is None]
    if missing:
        raise ValueError(f"samples {missing[:5]} have teacher_prompt_ids=None; the rollout must "
                         "render teacher prompts when the loss uses the teacher (retrieval set)")
    if samples:
        score_samples(model, samples, max_tokens, which="teacher", temperature=temperature)
