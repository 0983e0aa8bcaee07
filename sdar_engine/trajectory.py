"""Full-trajectory samples (``algo.sample_mode: trajectory``): one Sample per episode.

The policy plays each episode as ONE growing chat conversation and is trained on exactly the
token ids it read and wrote:

    first prompt | response 1 | observation turn 2 | response 2 | ... | response T

- first prompt: the env's turn-0 student prompt as one chat-templated user turn + generation
  prompt (the same ids a step sample of turn 0 has);
- observation turn t >= 2: the end of the previous assistant turn as the chat template writes it
  (its end-of-turn token is dropped when the response already ends with it), then the env's
  prompt of turn t WITHOUT history records (``prompt_candidates(i)[-1]``: the conversation itself
  is the history) as a user turn, then the generation prompt (``observation_turn_ids``);
- response t: the sampled ids, unchanged.

Turn t's generation reads the concatenation of everything before response t, so the log-probs
of the packed sequence are those of what was sampled (no re-rendering: the ids are appended,
never re-tokenized as one text). ``Sample.response_ids`` is everything after the first prompt
and ``Sample.response_mask`` is 1 on response tokens, 0 on observation turns. The teacher
sequence is the turn-0 TEACHER prompt (skills + the same first prompt) followed by the same
``response_ids``. ``rollout.max_prompt_tokens`` caps the conversation the policy reads (the
teacher's too): an episode whose next observation turn would cross it ends there, counted in
``Rollout.context_cut`` and not won, and its trajectory ends with its last response.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from sdar_engine.packing import Sample
from sdar_engine.progress import progress
from sdar_engine.rollout import GenerationBackend, Rollout, play_turn, sampling_seed

log = logging.getLogger("sdar.trajectory")

# Stand-ins used to cut the template's text between an assistant reply and the next generation
# prompt out of a rendered 3-message conversation (they never reach a sample).
_PROBE_USER = "sdar-probe-user-turn"
_PROBE_REPLY = "sdar-probe-assistant-reply"


def observation_turn_ids(tokenizer: Any, text: str, conversation: Sequence[int]) -> list[int]:
    """Ids that close the last assistant turn of ``conversation`` and open the next one with the
    user turn ``text``: [end of assistant turn] + user turn + generation prompt.

    Rendered by the tokenizer's chat template (extra arguments from ``tokenizer.sdar_chat_kwargs``)
    as the text after a probe reply in [user, assistant, user=text] + generation prompt; its
    first id is dropped when it equals the conversation's last id (the response already ended
    with the end-of-turn token the template writes). Raises ValueError when the template does
    not write the reply verbatim.
    """
    extra = dict(getattr(tokenizer, "sdar_chat_kwargs", None) or {})
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY},
                {"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    at = rendered.find(_PROBE_REPLY)
    if at < 0:
        raise ValueError("the chat template does not write an assistant reply verbatim; "
                         "algo.sample_mode='trajectory' needs one (use algo.sample_mode step)")
    ids = tokenizer(rendered[at + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
    if conversation and ids and ids[0] == conversation[-1]:
        ids = ids[1:]
    return list(ids)


def _turn_text(env: Any, i: int) -> str:
    """Env ``i``'s prompt without history records (the conversation carries the history)."""
    from sdar_engine.prompt_fit import candidates_of

    return candidates_of(env, i)[-1]


def run_trajectories(env: Any, backend: GenerationBackend, tokenizer: Any, *, task_ids: list[str],
                     group_size: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                     max_prompt_tokens: int = 0, max_turns: int = 0, retrieval: str | None = None,
                     keep_samples: bool = True, stop: Sequence[str] | None = None,
                     desc: str = "rollout", episodes: Sequence[int] | None = None,
                     seed: int | None = None) -> Rollout:
    """``run_episodes`` with one trajectory Sample per episode (same arguments and seeds).

    Rollout arrays are per sample = per episode: rewards and step_rewards are the episode's
    env reward minus every invalid-action penalty of the episode; anchors its first observation;
    Sample.step is 0 and ``meta`` holds the episode's actions and turn count.
    ``max_prompt_tokens`` > 0 caps the conversation read at any turn (see the module docstring).
    """
    from sdar_engine.prompt_fit import student_prompt_ids  # noqa: PLC0415 (it imports rollout)
    from sdar_engine.teacher import teacher_prompt_ids  # noqa: PLC0415

    eps = sorted(range(len(task_ids) * group_size) if episodes is None else episodes)
    if eps and not 0 <= eps[0] <= eps[-1] < len(task_ids) * group_size:
        raise ValueError(f"episodes {eps[0]}..{eps[-1]} are out of range for {len(task_ids)} tasks x "
                         f"{group_size} copies")
    obs, infos = env.reset(batch_size=len(eps), group_size=1, task_ids=[task_ids[e // group_size] for e in eps])
    n = len(obs)
    done, cut = [False] * n, [False] * n
    ep_reward, ep_len, penalties = [0.0] * n, [0] * n, [0.0] * n
    final_infos = [dict(x) for x in infos]  # frozen when an episode ends (a cut env is still stepped)
    conv: list[list[int]] = [[] for _ in range(n)]       # every id the policy read or wrote
    mask: list[list[int]] = [[] for _ in range(n)]       # over conv[first_len[i]:]
    first_len = [0] * n
    teacher_first: list[Optional[list[int]]] = [None] * n
    actions_of: list[list[str]] = [[] for _ in range(n)]
    first_obs = list(obs)
    ro = Rollout()
    turn = 0
    bar = progress(desc=desc, unit="turn", nested=True, total=max_turns or None)
    while not all(done) and (max_turns <= 0 or turn < max_turns):
        live = [i for i in range(n) if not done[i]]
        t0 = time.perf_counter()
        if turn == 0:
            firsts = student_prompt_ids(env, tokenizer, live, max_prompt_tokens)
            t1 = time.perf_counter()
            teachers = (teacher_prompt_ids(env, tokenizer, live, retrieval, max_prompt_tokens)
                        if retrieval and keep_samples else [None] * len(live))
            ro.teacher_prompt_seconds += time.perf_counter() - t1
            t0 += time.perf_counter() - t1  # not counted twice
            for k, i in enumerate(live):
                conv[i], first_len[i], teacher_first[i] = list(firsts[k]), len(firsts[k]), teachers[k]
        else:
            for i in live:
                piece = observation_turn_ids(tokenizer, _turn_text(env, i), conv[i])
                longer = len(teacher_first[i]) - first_len[i] if teacher_first[i] is not None else 0
                if max_prompt_tokens and len(conv[i]) + len(piece) + max(longer, 0) > max_prompt_tokens:
                    cut[i] = done[i] = True
                    continue
                conv[i] += piece
                mask[i] += [0] * len(piece)
            live = [i for i in live if not cut[i]]
        ro.prompt_seconds += time.perf_counter() - t0
        if not live:
            break
        bar.update(1)
        bar.set_postfix(live=len(live), cut=sum(cut))
        responses, texts, (new_obs, rewards, dones, new_infos) = play_turn(
            env, backend, tokenizer, ro, [list(conv[i]) for i in live], live, n, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, stop=stop,
            seeds=None if seed is None else [sampling_seed(seed, eps[i], turn) for i in live])
        for k, i in enumerate(live):
            penalties[i] += float(new_infos[i].get("penalty", 0.0))
            ro.invalid_steps += int(not new_infos[i].get("is_action_valid", True))
            ep_reward[i] += float(rewards[i])
            ep_len[i] += 1
            conv[i] += list(responses[k])
            mask[i] += [1] * len(responses[k])
            actions_of[i].append(texts[k])
            final_infos[i] = dict(new_infos[i])
            done[i] = bool(dones[i])
        turn += 1
    bar.close()
    ro.episode_ids = eps
    ro.context_cut = sum(cut)
    if ro.context_cut:
        log.info("%d of %d episodes ended at rollout.max_prompt_tokens=%d (conversation cap)",
                 ro.context_cut, n, max_prompt_tokens)
    ro.won = [bool(final_infos[i].get("won", False)) and done[i] and not cut[i] for i in range(n)]
    ro.task_types = [str(final_infos[i].get("task_type", "all")) for i in range(n)]
    ro.episode_rewards, ro.episode_lengths = ep_reward, ep_len
    if keep_samples:
        for i in range(n):
            if not ep_len[i]:
                continue
            ro.samples.append(Sample(prompt_ids=conv[i][:first_len[i]], response_ids=conv[i][first_len[i]:],
                                     response_mask=list(mask[i]), teacher_prompt_ids=teacher_first[i],
                                     group=eps[i] // group_size, episode=eps[i], step=0,
                                     meta={"action": actions_of[i], "turns": ep_len[i],
                                           "task": task_ids[eps[i] // group_size]}))
            ro.rewards.append(ep_reward[i] - penalties[i])
            ro.step_rewards.append(ep_reward[i] - penalties[i])
            ro.anchors.append(first_obs[i])
    if retrieval == "ucb":
        env.report_outcomes(ro.won)
    return ro
