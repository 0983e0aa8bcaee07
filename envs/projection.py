"""Raw model output -> (action, valid), following verl-agent's projection rules.

Style "action" (ALFWorld, WebShop): the action is the lowercased, stripped text inside the first
``<action>…</action>``. The step is invalid without ``<think>…</think>``, without action tags,
or with CJK text. Without action tags the env gets the last 30 characters of the (lowercased)
text, so it still answers with its genuine "nothing happens" feedback.

Style "search" (Search-QA): the first ``<search>…</search>`` or ``<answer>…</answer>``; invalid
when both kinds, neither, or a repeated tag appear. The game receives ``search[query]``,
``answer[text]`` or ``invalid[tail]``.

Only ``str.find`` is used (no regex backtracking), so 10 KB inputs stay linear-time.
"""
from __future__ import annotations

import re

STYLES = ("action", "search")
FALLBACK_CHARS = 30          # verl-agent sends the tail of a tag-less answer to the env
MAX_ACTION_CHARS = 512       # guards the engines against pathological 10 KB "actions"
_CJK = re.compile(r"[\u4e00-\u9fff]")


def _first_between(text: str, open_tag: str, close_tag: str) -> str | None:
    """Text between the first ``open_tag`` and the next ``close_tag``; None if unbalanced."""
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        return None
    return text[start:end]


def project_action(text: str) -> tuple[str, bool]:
    """ALFWorld / WebShop projection; returns (action for the env, is_valid)."""
    lowered = text.lower()
    inner = _first_between(lowered, "<action>", "</action>")
    if inner is None:
        return lowered[-FALLBACK_CHARS:].strip(), False
    action = inner.strip()[:MAX_ACTION_CHARS]
    has_think = _first_between(lowered, "<think>", "</think>") is not None
    valid = has_think and bool(action) and not _CJK.search(text)
    return action, valid


def project_search(text: str) -> tuple[str, bool]:
    """Search-QA projection; returns ("search[q]" | "answer[a]" | "invalid[tail]", is_valid)."""
    query = _first_between(text, "<search>", "</search>")
    answer = _first_between(text, "<answer>", "</answer>")
    repeated = text.count("<search>") > 1 or text.count("<answer>") > 1
    tail = text[-FALLBACK_CHARS:].replace("[", "(").replace("]", ")")
    if repeated or (query is None) == (answer is None):
        return f"invalid[{tail}]", False
    kind, body = ("search", query) if query is not None else ("answer", answer)
    body = " ".join(body.split())[:MAX_ACTION_CHARS]
    if not body:
        return f"invalid[{tail}]", False
    return f"{kind}[{body}]", True


def project(text: str, style: str = "action") -> tuple[str, bool]:
    """Project one raw model output with the given style ("action" or "search")."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not valid; use one of {STYLES}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return project_action(text) if style == "action" else project_search(text)


def project_batch(texts: list[str], style: str = "action") -> tuple[list[str], list[bool]]:
    """Vectorised ``project``: returns (actions, valids)."""
    pairs = [project(t, style) for t in texts]
    return [a for a, _ in pairs], [v for _, v in pairs]
