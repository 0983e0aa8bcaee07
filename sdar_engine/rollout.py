"""Multi-turn rollouts: a pluggable generation backend and the step-wise sample collector.

Each env step of each of the B x G envs becomes one ``Sample``: the student prompt (task,
recent history, observation, admissible actions, rendered with the chat template), the
sampled response ids (ending with the end-of-turn token when the model stopped by itself) and
the teacher prompt (same prompt behind the privileged skills). Steps after ``done`` are dropped.

Episodes are numbered globally (episode e plays task e // G) and sampled with a seed per
(rollout seed, episode, turn), so an episode's tokens do not depend on which rank or batch
plays it: ranks each run a share of the episodes and together play the same ones.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from sdar_engine.packing import Sample
from sdar_engine.progress import progress
from sdar_engine.threads import GENERATION_THREADS, cpu_threads

log = logging.getLogger("sdar.rollout")


class GenerationBackend(Protocol):
    """Turns prompt token ids into sampled continuation ids (eos kept, padding removed).

    ``seeds`` (one int per prompt, or None): prompt k's sampling draws from its own RNG seeded
    with ``seeds[k]``, so its tokens do not depend on the other prompts of the call.
    """

    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, stop: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        ...


def sampling_seed(*key: Any) -> int:
    """A 63-bit seed from a key of ints / strings, the same in every process and Python run
    (unlike ``hash``, which is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") >> 1


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus ``<|im_end|>`` / ``<|endoftext|>`` if known."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != unk and tid not in ids:
            ids.append(tid)
    return ids


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [B, V] with -inf outside each row's nucleus: the most probable tokens whose mass
    reaches ``top_p`` (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before the token already suffices
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)


class SeededSampling:
    """HF logits processor that samples (temperature, top-p) with one RNG per row.

    Gumbel-max: the token is argmax(logits / T + g) with g = -log(-log u), u ~ U(0, 1) from the
    row's own ``torch.Generator``, exactly a draw from softmax(logits / T) over the nucleus. It
    returns scores that are -inf except at the drawn token, so ``generate`` runs greedy
    (do_sample=False) and picks it. ``seeds`` None draws from the global torch RNG instead.
    """

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int] | None,
                 device: torch.device) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid for sampling; expected > 0 (0 = greedy)")
        self.temperature, self.top_p, self.device = float(temperature), float(top_p), device
        self.gens = None if seeds is None else [
            torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        b, v = logits.shape
        if self.gens is None:
            u = torch.rand(b, v, device=logits.device)
        else:
            if len(self.gens) != b:
                raise ValueError(f"SeededSampling has {len(self.gens)} seeds for a batch of {b} rows")
            u = torch.stack([torch.rand(v, generator=g, device=self.device) for g in self.gens]).to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp(torch.finfo(u.dtype).tiny, 1.0)))
        choice = (logits + gumbel).argmax(-1, keepdim=True)
        return torch.full_like(scores, -torch.inf).scatter(1, choice, 0.0)


@contextlib.contextmanager
def _plain_generation_config(model: Any, eos_ids: list[int], pad_id: int) -> Iterator[None]:
    """generate() fills every unset option from ``model.generation_config`` (a Qwen instruct
    model ships repetition_penalty 1.05, top_k 20, ...): sampling would then no longer be the
    policy whose log-probs are trained. Swap in a bare config for the call."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    try:
        yield
    finally:
        model.generation_config = saved


class HFBackend:
    """HF ``generate``: left-padded batches, KV cache, temperature / top-p sampling.

    ``temperature == 0`` means greedy decoding. ``gen_batch`` caps prompts per call (0 = all).
    Sampling is ``SeededSampling`` (per-prompt RNG when seeds are given); the model's own
    generation_config is ignored; forwards run under the model's ``compute_autocast``.
    """

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str = "cpu",
                 gen_batch: int = 0) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.gen_batch = gen_batch
        self.threads = GENERATION_THREADS if self.device.type == "cpu" else 0  # see sdar_engine/threads.py
        self.eos_ids = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    @torch.no_grad()
    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, stop: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        if seeds is not None and len(seeds) != len(prompts_ids):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts_ids)} prompts; give one per prompt")
        chunk = self.gen_batch or max(1, len(prompts_ids))
        out: list[list[int]] = []
        for start in range(0, len(prompts_ids), chunk):
            part = None if seeds is None else list(seeds[start:start + chunk])
            out.extend(self._generate_chunk(prompts_ids[start:start + chunk], max_new_tokens,
                                            temperature, top_p, stop, part))
        return out

    def _generate_chunk(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                        top_p: float, stop: Sequence[str] | None,
                        seeds: Sequence[int] | None) -> list[list[int]]:
        from transformers import LogitsProcessorList

        from sdar_engine.model import compute_autocast

        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: the last prompt token is aligned
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, use_cache=True, do_sample=False,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededSampling(temperature, top_p, seeds, self.device)])
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        with _plain_generation_config(self.model, self.eos_ids, self.pad_id), compute_autocast(self.model), \
                cpu_threads(self.threads):
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       **kwargs)
        self.model.train(was_training)
        return [self._trim(row[width:].tolist()) for row in seqs.cpu()]

    def _trim(self, tokens: list[int]) -> list[int]:
        """Cut after the first end-of-turn token (kept: the model must learn to stop)."""
        for j, t in enumerate(tokens):
            if t in self.eos_ids:
                return tokens[: j + 1]
        return tokens or [self.eos_ids[0]]  # never an empty response (packing needs >= 1 token)


def render_prompt_ids(tokenizer: Any, text: str, max_tokens: int = 0) -> list[int]:
    """Chat-template ``text`` as one user turn + generation prompt; keep the last max_tokens.

    Extra template arguments (e.g. Qwen3's ``enable_thinking``) are read from
    ``tokenizer.sdar_chat_kwargs`` when the trainer set it.
    """
    extra = dict(getattr(tokenizer, "sdar_chat_kwargs", None) or {})
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False, **extra)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:] if max_tokens and len(ids) > max_tokens else list(ids)


@dataclass
class Rollout:
    """Step samples of one batch with the per-sample arrays the advantage estimators need.

    Samples are in canonical order: by episode number, then env step (whichever rank or turn
    produced them), so the concatenation of the ranks' shares is the single-process batch.
    """

    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)       # episode reward - step penalty
    step_rewards: list[float] = field(default_factory=list)  # this step's reward - penalty
    anchors: list[str] = field(default_factory=list)         # observation the action answered
    won: list[bool] = field(default_factory=list)            # per episode
    task_types: list[str] = field(default_factory=list)      # per episode
    episode_rewards: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    episode_ids: list[int] = field(default_factory=list)     # per episode: its global number
    invalid_steps: int = 0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    env_seconds: float = 0.0
    prompt_seconds: float = 0.0          # rendering + tokenizing the student prompts
    teacher_prompt_seconds: float = 0.0  # the same for the skill-prefixed teacher prompts
    context_cut: int = 0             # trajectory mode: episodes ended by the conversation cap

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Success overall and per task type, reward, episode length, invalid-action rate."""
        n = max(1, len(self.won))
        out = {f"{prefix}success": sum(self.won) / n,
               f"{prefix}reward": sum(self.episode_rewards) / n,
               f"{prefix}episode_len": sum(self.episode_lengths) / n,
               f"{prefix}invalid_rate": self.invalid_steps / max(1, sum(self.episode_lengths) or len(self.samples)),
               f"{prefix}context_cut_rate": self.context_cut / n,
               f"{prefix}gen_tokens_per_s": self.gen_tokens / max(self.gen_seconds, 1e-9)}
        by_type: dict[str, list[bool]] = defaultdict(list)
        for t, w in zip(self.task_types, self.won):
            by_type[t].append(w)
        for t, ws in sorted(by_type.items()):
            out[f"{prefix}success/{t}"] = sum(ws) / len(ws)
        return out


def play_turn(env: Any, backend: GenerationBackend, tokenizer: Any, ro: Rollout, prompts: Sequence[Sequence[int]],
              live: Sequence[int], n: int, *, max_new_tokens: int, temperature: float, top_p: float,
              stop: Sequence[str] | None, seeds: Sequence[int] | None) -> tuple[list, list[str], tuple]:
    """One turn of ``n`` envs: generate for the ``live`` ones (prompts in the same order), decode,
    step every env (finished ones get an empty action). Adds generation and env time and the
    generated token count to ``ro``; returns (response ids and decoded text per live env,
    env.step's 4-tuple)."""
    t0 = time.perf_counter()
    responses = backend.generate(prompts, max_new_tokens, temperature, top_p, stop, seeds=seeds)
    ro.gen_seconds += time.perf_counter() - t0
    ro.gen_tokens += sum(len(r) for r in responses)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    actions = [""] * n
    for i, text in zip(live, texts):
        actions[i] = text
    t0 = time.perf_counter()
    out = env.step(actions)
    ro.env_seconds += time.perf_counter() - t0
    return responses, texts, out


def run_episodes(env: Any, backend: GenerationBackend, tokenizer: Any, *, task_ids: list[str],
                 group_size: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 max_prompt_tokens: int = 0, max_turns: int = 0, retrieval: str | None = None,
                 keep_samples: bool = True, stop: Sequence[str] | None = None,
                 desc: str = "rollout", episodes: Sequence[int] | None = None,
                 seed: int | None = None, sample_mode: str = "step") -> Rollout:
    """Play episodes to the end; one Sample per live env step (``sample_mode`` "step") or one
    per episode, played as one growing conversation (``"trajectory"``: sdar_engine/trajectory.py).

    Episode e (0 <= e < len(task_ids) x group_size) is copy e % group_size of task
    task_ids[e // group_size]; ``episodes`` picks this caller's share (default: all), and the
    samples carry the global numbers (group = e // group_size, episode = e). ``seed`` set: the
    turn-t response of episode e is sampled with ``sampling_seed(seed, e, t)``, independent of
    the share. ``retrieval`` set: each sample also gets ``teacher_prompt_ids``. ``max_turns`` > 0
    cuts episodes early (an unfinished episode counts as not won).
    """
    if sample_mode == "trajectory":
        from sdar_engine.trajectory import run_trajectories  # noqa: PLC0415 (it imports us)

        return run_trajectories(env, backend, tokenizer, task_ids=task_ids, group_size=group_size,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                max_prompt_tokens=max_prompt_tokens, max_turns=max_turns, retrieval=retrieval,
                                keep_samples=keep_samples, stop=stop, desc=desc, episodes=episodes, seed=seed)
    if sample_mode != "step":
        raise ValueError(f"sample_mode={sample_mode!r} is invalid; valid choices: step, trajectory")
    eps = sorted(range(len(task_ids) * group_size) if episodes is None else episodes)
    if eps and not 0 <= eps[0] <= eps[-1] < len(task_ids) * group_size:
        raise ValueError(f"episodes {eps[0]}..{eps[-1]} are out of range for {len(task_ids)} tasks x "
                         f"{group_size} copies")
    t_reset = time.perf_counter()
    obs, infos = env.reset(batch_size=len(eps), group_size=1, task_ids=[task_ids[e // group_size] for e in eps])
    t_reset = time.perf_counter() - t_reset
    n = len(obs)
    done = [False] * n
    ep_reward, ep_len = [0.0] * n, [0] * n
    per_env: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # (sample idx, penalty)
    ro = Rollout(env_seconds=t_reset)
    turn = 0
    bar = progress(desc=desc, unit="turn", nested=True, total=max_turns or None)
    while not all(done) and (max_turns <= 0 or turn < max_turns):
        live = [i for i in range(n) if not done[i]]
        bar.update(1)
        bar.set_postfix(live=len(live), won=sum(bool(x.get("won")) for x in infos))
        from sdar_engine.prompt_fit import student_prompt_ids  # noqa: PLC0415 (both import us)
        from sdar_engine.teacher import teacher_prompt_ids  # noqa: PLC0415

        t0 = time.perf_counter()
        prompts = student_prompt_ids(env, tokenizer, live, max_prompt_tokens)  # history goes first at the cap
        t1 = time.perf_counter()
        teachers = (teacher_prompt_ids(env, tokenizer, live, retrieval, max_prompt_tokens)
                    if retrieval and keep_samples else [None] * len(live))
        ro.prompt_seconds += t1 - t0
        ro.teacher_prompt_seconds += time.perf_counter() - t1
        responses, texts, (new_obs, rewards, dones, new_infos) = play_turn(
            env, backend, tokenizer, ro, prompts, live, n, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, stop=stop, seeds=None if seed is None else [sampling_seed(seed, eps[i], turn) for i in live])
        for k, i in enumerate(live):
            penalty = float(new_infos[i].get("penalty", 0.0))
            ro.invalid_steps += int(not new_infos[i].get("is_action_valid", True))
            ep_reward[i] += float(rewards[i])
            ep_len[i] += 1
            if keep_samples:
                ro.samples.append(Sample(prompt_ids=prompts[k], response_ids=list(responses[k]),
                                         teacher_prompt_ids=teachers[k], group=eps[i] // group_size,
                                         episode=eps[i], step=ep_len[i] - 1,
                                         meta={"action": texts[k], "task": task_ids[eps[i] // group_size]}))
                ro.step_rewards.append(float(rewards[i]) - penalty)
                ro.anchors.append(obs[i])
                per_env[i].append((len(ro.samples) - 1, penalty))
            if dones[i]:
                done[i] = True
        obs, infos = new_obs, new_infos
        turn += 1
    bar.close()
    ro.episode_ids = eps
    _finish(ro, infos, done, ep_reward, ep_len, per_env)
    if retrieval == "ucb":
        env.report_outcomes(ro.won)
    return ro


def _finish(ro: Rollout, infos: list[dict], done: list[bool], ep_reward: list[float], ep_len: list[int],
            per_env: list[list[tuple[int, float]]]) -> None:
    """Episode outcomes; samples put in canonical (episode, step) order; each step sample's
    reward = its episode's reward - its own penalty."""
    n = len(done)
    ro.won = [bool(infos[i].get("won", False)) and done[i] for i in range(n)]
    ro.task_types = [str(infos[i].get("task_type", "all")) for i in range(n)]
    ro.episode_rewards, ro.episode_lengths = ep_reward, ep_len
    order = [idx for i in range(n) for idx, _ in per_env[i]]  # env i < env j <=> episode i < episode j
    ro.samples = [ro.samples[k] for k in order]
    ro.step_rewards = [ro.step_rewards[k] for k in order]
    ro.anchors = [ro.anchors[k] for k in order]
    ro.rewards = [ep_reward[i] - penalty for i in range(n) for _, penalty in per_env[i]]
