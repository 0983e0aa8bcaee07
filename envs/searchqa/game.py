"""One Search-QA episode in Search-R1's loop: search turns, then an answer, 4 turns at most."""
from __future__ import annotations

import re
import string

from .questions import Question
from .retriever import BM25Retriever, render_information

INVALID_MESSAGE = ("\nMy previous action is invalid. If I want to search, I should put the query "
                   "between <search> and </search>. If I want to give the final answer, I should "
                   "put the answer between <answer> and </answer>. Let me try again.\n")
MAX_TURNS = 4
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, squash whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers: tuple[str, ...] | list[str]) -> bool:
    """True iff the normalized prediction equals any normalized golden answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in golden_answers)


def _parse(action: str) -> tuple[str, str]:
    """Projected action -> (kind, body); kind in search | answer | invalid."""
    for kind in ("search", "answer"):
        if action.startswith(kind + "[") and action.endswith("]"):
            return kind, action[len(kind) + 1:-1]
    return "invalid", action


class SearchGame:
    """A question, the shared retriever and the episode state. Reward 1.0 on exact match."""

    def __init__(self, task_id: str, question: Question, retriever: BM25Retriever,
                 max_steps: int = MAX_TURNS) -> None:
        self.task_id, self.task_type = task_id, question.task_type
        self.task_text, self.max_steps = question.question, max_steps
        self.question, self.retriever = question, retriever
        self._turns, self._done = 0, False
        self._seen_titles: set[str] = set()
        self._queries: set[str] = set()

    def _info(self, won: bool) -> dict:
        return {"won": won, "score": 1.0 if won else 0.0, "admissible_actions": [],
                "data_source": self.question.data_source, "turn": self._turns}

    def reset(self) -> tuple[str, dict]:
        self._turns, self._done = 0, False
        self._seen_titles, self._queries = set(), set()
        return self.task_text, self._info(False)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """``search[q]`` -> information block; ``answer[a]`` -> done, EM reward; else invalid."""
        if self._done:
            return "", 0.0, True, self._info(False)
        self._turns += 1
        kind, body = _parse(action if isinstance(action, str) else str(action))
        if kind == "answer":
            self._done = True
            won = exact_match(body, self.question.golden_answers)
            return "", 1.0 if won else 0.0, True, self._info(won)
        if kind == "search":
            docs = self.retriever.search(body)
            self._queries.add(body)
            self._seen_titles.update(d["contents"].partition("\n")[0].strip('"') for d in docs)
            obs = render_information(docs)
        else:
            obs = INVALID_MESSAGE
        self._done = self._turns >= self.max_steps
        return obs, 0.0, self._done, self._info(False)

    def expert_action(self) -> str:
        """Planner: search each hop until its supporting passage shows up, then answer.

        A hop whose support did not appear is retried once with the bare entity name; the
        last turn is always an answer. Loaded questions (no plan) search the question once.
        """
        remaining = self.max_steps - self._turns
        plan = self.question.plan or ((self.task_text, ""),)
        for query, title in plan:
            if title and title in self._seen_titles:
                continue
            if remaining <= 1:
                break
            if not title:  # loaded data: a single search with the question
                if self._turns == 0:
                    return f"search[{query}]"
                break
            return f"search[{title if query in self._queries else query}]"
        return f"answer[{self.question.golden_answers[0]}]"
