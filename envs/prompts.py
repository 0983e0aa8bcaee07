"""Student and teacher prompt templates, one per env, in the verl-agent manner.

Prompts are deliberately short: the trainer's tiny CPU model pays for every token.
Student prompt, style "verl-agent" (default) = task + last k (observation, action) pairs +
current observation + admissible actions + format instruction, as verl-agent writes it.
Style "compact" = task + last k actions + current observation + admissible actions, no
boilerplate: about half the tokens, for small models trained from scratch on a CPU budget.
Teacher prompt = "## Privileged skills (teacher only)" header with retrieved skills + student prompt.
Under a token cap nothing here is cut: ``BatchEnv.prompt_candidates`` renders the prompt with
fewer and fewer history records and the engine takes the longest that fits, so the skills, the
task and the current observation always survive (``sdar_engine/prompt_fit.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .memory import Memory

if TYPE_CHECKING:  # pragma: no cover
    from .skills import Skill

TEACHER_HEADER = "## Privileged skills (teacher only)"
PROMPT_STYLES = ("verl-agent", "compact")
THINK_STYLES = ("plan", "empty")  # the expert's <think> text: a one-line plan, or nothing
_WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
_NOT_LISTED = ("help", "inventory", "look")  # always admissible in ALFWorld; "compact" hides them

_ACTION_FORMAT = ("First reason briefly inside <think> </think>. Then give exactly one "
                  "admissible action inside <action> </action>.")

_INTRO = {
    "alfworld": "You are a household robot in a text world. Your task is to: {task}",
    "webshop": "You are shopping on a web store. Your task is to: {task}",
}

_SEARCH_TEMPLATE = (
    "Answer the question. Reason inside <think> </think> first. To look facts up, write "
    "<search> query </search>; the top results come back inside <information> </information>. "
    "Search as often as you need. When you know the answer, write only it inside "
    "<answer> </answer>, for example <answer> Paris </answer>.\n"
    "Question: {question}\n"
)


def _admissible_text(name: str, admissible: Sequence[str]) -> str:
    acts = [a for a in admissible if not (name == "alfworld" and a.strip() == "help")]
    return ", ".join(f"'{a}'" for a in acts)


def check_style(field: str, value: str, valid: Sequence[str]) -> str:
    """``value`` if it is one of ``valid``; else ValueError naming ``field`` and the choices."""
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; use one of {tuple(valid)}")
    return value


def render_prompt(name: str, task_text: str, memory: Memory, observation: str,
                  admissible: Sequence[str], history_length: int, style: str = "verl-agent") -> str:
    """The student prompt for one env at its current step (a plain string, no chat markup).

    Search-QA has one template (Search-R1's) whatever ``style`` says.
    """
    check_style("prompt_style", style, PROMPT_STYLES)
    if name == "searchqa":
        return _render_search(task_text, memory, history_length)
    if style == "compact":
        return _render_compact(name, task_text, memory, observation, admissible, history_length)
    intro = _INTRO.get(name, "Your task is to: {task}").format(task=task_text)
    parts = [intro]
    step = len(memory)
    if step and history_length:
        shown = min(step, history_length)
        parts.append(f"You have taken {step} step(s). Your last {shown} observation(s) "
                     f"and action(s):\n{memory.render(history_length)}")
    parts.append(f"Current observation (step {step + 1}): {observation}")
    acts = _admissible_text(name, admissible)
    if acts:
        parts.append(f"Admissible actions: [{acts}]")
    parts.append(_ACTION_FORMAT)
    return "\n".join(parts)


def _render_compact(name: str, task_text: str, memory: Memory, observation: str,
                    admissible: Sequence[str], history_length: int) -> str:
    """Task / Done (last k actions) / Now (observation) / Actions, one line each.

    ALFWorld's welcome banner and repeated task line are cut from the observation, and the
    always-admissible help / inventory / look are not listed (they stay admissible).
    """
    lines = [f"Task: {task_text}"]
    recent = memory.recent(history_length)
    if recent:
        lines.append("Done: " + "; ".join(r.action for _, r in recent))
    obs = observation
    if name == "alfworld":
        obs = obs.replace(_WELCOME, "").split("\n\nYour task is to:")[0]
    lines.append("Now: " + " ".join(obs.split()))
    acts = [a for a in admissible if not (name == "alfworld" and a.strip() in _NOT_LISTED)]
    if acts:
        lines.append("Actions: " + " | ".join(acts))
    return "\n".join(lines)


def _render_search(question: str, memory: Memory, history_length: int) -> str:
    text = _SEARCH_TEMPLATE.format(question=question)
    if len(memory) and history_length:
        text += f"Your previous steps:\n{memory.render(history_length, style='search')}\n"
    return text


def render_teacher_prompt(skills: Sequence["Skill"], student_prompt: str) -> str:
    """Skills header (one bullet per skill) placed before the unchanged student prompt."""
    lines = [TEACHER_HEADER]
    lines += [f"- {s.title}: {s.text}" for s in skills] or ["- (no skill retrieved)"]
    return "\n".join(lines) + "\n\n" + student_prompt


def to_raw_action(projected: str, style: str, task_type: str = "", think: str = "plan") -> str:
    """Projected action -> raw model format with a short reason; "" stays "" (env done).

    ``think="empty"`` writes ``<think></think>`` (still a valid step) for models too small to
    profit from a reason.
    """
    check_style("expert_think", think, THINK_STYLES)
    if not projected:
        return ""
    plan = think == "plan"
    if style == "search":
        for kind, reason in (("search", "I need to look this up."),
                             ("answer", "The results give me the answer.")):
            if projected.startswith(kind + "[") and projected.endswith("]"):
                body = projected[len(kind) + 1:-1]
                return f"<think>{reason if plan else ''}</think>\n<{kind}> {body} </{kind}>"
        return f"<think>{'I am not sure.' if plan else ''}</think>\n{projected}"
    reason = f"Next step of my plan for this {task_type} task." if task_type else "Next step."
    return f"<think>{reason if plan else ''}</think>\n<action>{projected}</action>"
