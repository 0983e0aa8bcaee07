"""Supervised warm-start on expert trajectories (behaviour cloning before RL).

The env's oracle (``env.expert_actions()``, raw ``<think>..</think><action>..</action>``
strings) plays episodes of the train split; each step becomes a Sample whose response is the
expert's text + the end-of-turn token. Training minimises the mean negative log-likelihood of
response tokens, computed by ``sdar_kernels.fused_linear_logprobs`` on packed streams, so no
[N, V] logits exist here either.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from sdar_engine.progress import progress

from sdar_engine.packing import Sample, pack
from sdar_engine.rollout import render_prompt_ids, stop_token_ids
from sdar_envs.prompts import to_raw_action

log = logging.getLogger("sdar.warmstart")


@dataclass
class ExpertStep:
    """One expert step as text: the student prompt, the teacher prompt and the raw action.

    ``role``: which prompts the step labels in a warm-start with teacher prompts: "both", or only
    the "student" / "teacher" prompt (warmstart.student_expert_search: two experts, one per prompt).
    """

    prompt: str
    teacher: str
    action: str
    episode: int
    step: int
    role: str = "both"


def play_expert(env: Any, task_ids: Sequence[str], max_turns: int = 0, batch: int = 16,
                retrieval: str = "full", noise: float = 0.0, seed: int = 0,
                ) -> tuple[list[ExpertStep], float]:
    """Play the oracle on ``task_ids`` (``batch`` tasks at a time); returns (steps, success rate).

    ``noise`` > 0 perturbs the played trajectory (DART, Laskey et al. 2017): at each step, with
    probability ``noise``, the env executes a random admissible action, or (one time in four)
    repeats the previous one, instead of the expert's. Every visited state is still labelled
    with the expert's action, so the data holds recoveries from off-expert states ("Nothing
    happens.", a wrong object in hand) that a pure expert never visits but a learner does.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"warmstart.noise={noise!r} is invalid; expected a probability in [0, 1)")
    rng = random.Random(f"sdar-expert/{seed}")
    steps: list[ExpertStep] = []
    wins = 0
    for start in progress(range(0, len(task_ids), batch), desc="expert episodes", unit="batch"):
        chunk = list(task_ids[start:start + batch])
        _, infos = env.reset(batch_size=len(chunk), group_size=1, task_ids=chunk)
        done, turn = [False] * len(chunk), 0
        played = [""] * len(chunk)
        while not all(done) and (max_turns <= 0 or turn < max_turns):
            actions = env.expert_actions()
            executed = list(actions)
            for i, d in enumerate(done):
                if d:
                    continue
                steps.append(ExpertStep(env.prompt(i), env.teacher_prompt(i, retrieval),
                                        actions[i], start + i, turn))
                if noise and rng.random() < noise:
                    executed[i] = _perturbed(rng, actions[i], played[i], infos[i].get("admissible_actions", []),
                                             getattr(env, "style", "action"))
            _, _, dones, infos = env.step(executed)
            played = executed
            done = [d or dn for d, dn in zip(done, dones)]
            turn += 1
        wins += sum(bool(info.get("won", False)) and d for info, d in zip(infos, done))
    return steps, wins / max(1, len(task_ids))


def _perturbed(rng: random.Random, expert: str, previous: str, admissible: Sequence[str],
               style: str = "action") -> str:
    """A random admissible action (the expert's own when drawn), or (1 in 4) the previous one again."""
    if previous and rng.random() < 0.25:
        return previous
    options = [a for a in admissible if a not in ("help", "inventory")]
    if not options:
        return expert
    choice = rng.choice(options)
    return expert if expert.endswith(f"<action>{choice}</action>") else to_raw_action(choice, style, think="empty")


def expert_corpus(steps: Sequence[ExpertStep]) -> list[str]:
    """Texts a tokenizer for this env should cover: prompts, teacher prompts, actions."""
    return [t for s in steps for t in (s.prompt, s.teacher, s.action)]


def expert_samples(steps: Sequence[ExpertStep], tokenizer: Any, max_prompt_tokens: int = 0,
                   teacher_prompts: bool = False) -> list[Sample]:
    """Tokenize expert steps: chat-rendered prompt -> action text + end-of-turn token.

    ``teacher_prompts``: each step gives a second sample, its skill-prefixed teacher prompt with
    the same expert action (the student samples, then the teacher ones), so the warm-started
    weights learn to read the skills the SDAR teacher is shown; a step whose ``role`` is
    "student" / "teacher" gives only that sample. Without ``teacher_prompts`` every step but the
    teacher-only ones gives its student sample.
    """
    eot = stop_token_ids(tokenizer)[0]
    student = [s for s in steps if s.role != "teacher"]
    teacher = [s for s in steps if s.role != "student"] if teacher_prompts else []
    prompts = [s.prompt for s in student] + [s.teacher for s in teacher]
    chosen = student + teacher
    return [Sample(prompt_ids=render_prompt_ids(tokenizer, text, max_prompt_tokens),
                   response_ids=tokenizer(s.action, add_special_tokens=False)["input_ids"] + [eot],
                   group=s.episode, episode=s.episode, step=s.step) for text, s in zip(prompts, chosen)]


def nll_loss(model: Any, micro: Any, normalizer: float) -> torch.Tensor:
    """Sum of -log p(response tokens) of one packed micro-batch / ``normalizer`` (a 0-d tensor)."""
    from sdar_kernels import fused_linear_logprobs

    from sdar_engine.model import head_forward

    device = next(model.parameters()).device
    mb = micro.to(device)

    def fn(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logp, _ = fused_linear_logprobs(hidden, weight, mb.targets, bias=bias, mask=mb.loss_mask)
        return -(logp * mb.loss_mask).sum() / normalizer

    return head_forward(model, mb.input_ids, mb.position_ids, fn)


def supervised_warmstart(model: Any, samples: list[Sample], *, epochs: int, lr: float, max_tokens: int,
                         batch_samples: int, seed: int = 0, grad_clip: float = 1.0,
                         row_tokens: int | None = None, desc: str = "warm-start") -> list[float]:
    """AdamW on the response NLL over ``epochs`` shuffled passes; returns the loss per optimizer step.

    ``batch_samples`` step samples per optimizer step, packed into micro-batches of at most
    ``max_tokens`` tokens; the loss is normalised by the response-token count of the whole
    optimizer batch so micro-batching changes nothing.
    """
    if not samples:
        raise ValueError("supervised_warmstart got no samples; collect expert trajectories first")
    for name, v in (("epochs", epochs), ("max_tokens", max_tokens), ("batch_samples", batch_samples)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"warmstart.{name}={v!r} is invalid; expected an integer >= 1")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(samples) / batch_samples)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.1, 1.0 - k / max(1, total)))
    from sdar_engine.logprobs import default_row_tokens

    rows = default_row_tokens(model) if row_tokens is None else row_tokens
    model.train()
    losses: list[float] = []
    t0, tokens = time.perf_counter(), 0
    bar = progress(total=total, desc=desc, unit="step")
    for epoch in range(epochs):
        order = torch.randperm(len(samples), generator=gen).tolist()
        for b in range(steps_per_epoch):
            batch = [samples[i] for i in order[b * batch_samples:(b + 1) * batch_samples]]
            n_resp = sum(len(s.response_ids) for s in batch)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in pack(batch, max_tokens, row_tokens=rows):
                if not micro.sample_index:
                    continue
                loss = nll_loss(model, micro, float(n_resp))
                loss.backward()
                loss_sum += loss.detach()
                tokens += micro.num_tokens
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss_sum))
            bar.update(1)
            bar.set_postfix(epoch=epoch, nll=f"{losses[-1]:.3f}")
    bar.close()
    dt = time.perf_counter() - t0
    log.info("warm-start: %d steps, %d samples x %d epochs, nll %.3f -> %.3f, %.0f tok/s",
             total, len(samples), epochs, losses[0], losses[-1], tokens / max(dt, 1e-9))
    return losses
