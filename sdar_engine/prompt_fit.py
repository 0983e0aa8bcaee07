"""Prompt token ids under ``rollout.max_prompt_tokens``: history goes first, never the head.

An env renders each prompt at several history lengths (``BatchEnv.prompt_candidates`` /
``teacher_prompt_candidates``, longest first). The first candidate whose chat-templated ids fit
the cap is used, so a capped prompt keeps the chat header, the task, the teacher's privileged
skills, the current observation and the admissible actions, and loses the oldest history
records. Cutting tokens from the left instead would drop the skills and the chat header first.
"""
from __future__ import annotations

from typing import Any, Sequence

from sdar_engine.rollout import render_prompt_ids


def fit_prompt_ids(tokenizer: Any, candidates: Sequence[str], max_tokens: int, what: str = "prompt") -> list[int]:
    """Ids of the first candidate (chat template applied) with at most ``max_tokens`` ids.

    ``max_tokens == 0`` means no cap (the first candidate). Raises ValueError naming the cap
    when even the last (shortest) candidate is longer: its head and current step must not be cut.
    """
    if not candidates:
        raise ValueError(f"no {what} candidates to render")
    ids: list[int] = []
    for text in candidates:
        ids = render_prompt_ids(tokenizer, text)
        if not max_tokens or len(ids) <= max_tokens:
            return ids
    raise ValueError(f"config rollout.max_prompt_tokens={max_tokens} is too small for this {what}: "
                     f"without any history it still needs {len(ids)} tokens (chat header, task"
                     f"{', skills' if what == 'teacher prompt' else ''}, current observation, "
                     f"actions); raise rollout.max_prompt_tokens")


def candidates_of(env: Any, i: int, retrieval: str | None = None) -> list[str]:
    """Env ``i``'s prompt candidates, longest first: the teacher's when ``retrieval`` is set.

    Envs without the candidates API (test doubles) give their one prompt.
    """
    if retrieval is None:
        fn = getattr(env, "prompt_candidates", None)
        return list(fn(i)) if fn is not None else [env.prompt(i)]
    fn = getattr(env, "teacher_prompt_candidates", None)
    return list(fn(i, retrieval)) if fn is not None else [env.teacher_prompt(i, retrieval)]


def student_prompt_ids(env: Any, tokenizer: Any, indices: Sequence[int], max_prompt_tokens: int = 0) -> list[list[int]]:
    """Token ids of the student prompts of envs ``indices`` (call before ``env.step``)."""
    return [fit_prompt_ids(tokenizer, candidates_of(env, i), max_prompt_tokens, "student prompt")
            for i in indices]
