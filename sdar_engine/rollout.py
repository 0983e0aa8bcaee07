"""Multi-turn rollouts: a pluggable generation backend and the step-wise sample collector.

Each env step of each of the B x G envs becomes one ``Sample``: the student prompt (task,
recent history, observation, admissible actions, rendered with the chat template), the
sampled response ids (ending with the end-of-turn token when the model stopped by itself) and
the teacher prompt (same prompt behind the privileged skills). Steps after ``done`` are dropped.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from sdar_engine.packing import Sample

log = logging.getLogger("sdar.rollout")


class GenerationBackend(Protocol):
    """Turns prompt token ids into sampled continuation ids (eos kept, padding removed)."""

    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, stop: Sequence[str] | None = None) -> list[list[int]]:
        ...


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


class HFBackend:
    """HF ``generate``: left-padded batches, KV cache, temperature / top-p sampling.

    ``temperature == 0`` means greedy decoding. ``gen_batch`` caps prompts per call (0 = all).
    """

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str = "cpu",
                 gen_batch: int = 0) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.gen_batch = gen_batch
        self.eos_ids = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    @torch.no_grad()
    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, stop: Sequence[str] | None = None) -> list[list[int]]:
        chunk = self.gen_batch or max(1, len(prompts_ids))
        out: list[list[int]] = []
        for start in range(0, len(prompts_ids), chunk):
            out.extend(self._generate_chunk(prompts_ids[start:start + chunk], max_new_tokens,
                                            temperature, top_p, stop))
        return out

    def _generate_chunk(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                        top_p: float, stop: Sequence[str] | None) -> list[list[int]]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: the last prompt token is aligned
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, use_cache=True,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
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


class VLLMBackend:
    """vLLM serving of the same weights; only constructed when ``vllm`` is importable.

    The caller must re-sync weights after each update (``sync_weights``); kept minimal because
    CPU runs never use it.
    """

    def __init__(self, model_path: str, tokenizer: Any, **engine_kwargs: Any) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("rollout.backend='vllm' needs `pip install vllm`; use backend 'hf'")
        from vllm import LLM  # noqa: PLC0415  (optional dependency)
        self.llm = LLM(model=model_path, **engine_kwargs)
        self.eos_ids = stop_token_ids(tokenizer)

    def sync_weights(self, model: Any) -> None:
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(model.state_dict().items())

    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, stop: Sequence[str] | None = None) -> list[list[int]]:
        from vllm import SamplingParams  # noqa: PLC0415
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop or []), stop_token_ids=self.eos_ids)
        outs = self.llm.generate(prompt_token_ids=prompts_ids, sampling_params=params)
        return [list(o.outputs[0].token_ids) for o in outs]


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
    """Step samples of one batch with the per-sample arrays the advantage estimators need."""

    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)       # episode reward - step penalty
    step_rewards: list[float] = field(default_factory=list)  # this step's reward - penalty
    anchors: list[str] = field(default_factory=list)         # observation the action answered
    won: list[bool] = field(default_factory=list)            # per episode
    task_types: list[str] = field(default_factory=list)      # per episode
    episode_rewards: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    invalid_steps: int = 0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    env_seconds: float = 0.0

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Success overall and per task type, reward, episode length, invalid-action rate."""
        n = max(1, len(self.won))
        out = {f"{prefix}success": sum(self.won) / n,
               f"{prefix}reward": sum(self.episode_rewards) / n,
               f"{prefix}episode_len": sum(self.episode_lengths) / n,
               f"{prefix}invalid_rate": self.invalid_steps / max(1, len(self.samples) or sum(self.episode_lengths)),
               f"{prefix}gen_tokens_per_s": self.gen_tokens / max(self.gen_seconds, 1e-9)}
        by_type: dict[str, list[bool]] = defaultdict(list)
        for t, w in zip(self.task_types, self.won):
            by_type[t].append(w)
        for t, ws in sorted(by_type.items()):
            out[f"{prefix}success/{t}"] = sum(ws) / len(ws)
        return out


def run_episodes(env: Any, backend: GenerationBackend, tokenizer: Any, *, task_ids: list[str],
                 group_size: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 max_prompt_tokens: int = 0, max_turns: int = 0, retrieval: str | None = None,
                 keep_samples: bool = True, stop: Sequence[str] | None = None,
                 desc: str = "rollout") -> Rollout:
    """Play ``len(task_ids) x group_size`` episodes to the end; one Sample per live env step.

    ``retrieval`` set: each sample also gets ``teacher_prompt_ids``. ``max_turns`` > 0 cuts
    episodes early (an unfinished episode counts as not won).
    """
    obs, infos = env.reset(batch_size=len(task_ids), group_size=group_size, task_ids=list(task_ids))
    n = len(obs)
    done = [False] * n
    ep_reward, ep_len = [0.0] * n, [0] * n
    per_env: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # (sample idx, penalty)
    ro = Rollout()
    turn = 0
    bar = tqdm(desc=desc, unit="turn", leave=False, total=max_turns or None)
    while not all(done) and (max_turns <= 0 or turn < max_turns):
        live = [i for i in range(n) if not done[i]]
        bar.update(1)
        bar.set_postfix(live=len(live), won=sum(bool(x.get("won")) for x in infos))
        from sdar_engine.teacher import teacher_prompt_ids  # noqa: PLC0415 (teacher imports us)

        prompts = [render_prompt_ids(tokenizer, env.prompt(i), max_prompt_tokens) for i in live]
        teachers = (teacher_prompt_ids(env, tokenizer, live, retrieval, max_prompt_tokens)
                    if retrieval and keep_samples else [None] * len(live))
        t0 = time.perf_counter()
        responses = backend.generate(prompts, max_new_tokens, temperature, top_p, stop)
        ro.gen_seconds += time.perf_counter() - t0
        ro.gen_tokens += sum(len(r) for r in responses)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        actions = [""] * n
        for i, text in zip(live, texts):
            actions[i] = text
        t0 = time.perf_counter()
        new_obs, rewards, dones, new_infos = env.step(actions)
        ro.env_seconds += time.perf_counter() - t0
        for k, i in enumerate(live):
            penalty = float(new_infos[i].get("penalty", 0.0))
            ro.invalid_steps += int(not new_infos[i].get("is_action_valid", True))
            ep_reward[i] += float(rewards[i])
            ep_len[i] += 1
            if keep_samples:
                ro.samples.append(Sample(prompt_ids=prompts[k], response_ids=list(responses[k]),
                                         teacher_prompt_ids=teachers[k], group=i // group_size,
                                         episode=i, step=ep_len[i] - 1))
                ro.step_rewards.append(float(rewards[i]) - penalty)
                ro.anchors.append(obs[i])
                per_env[i].append((len(ro.samples) - 1, penalty))
            if dones[i]:
                done[i] = True
        obs, infos = new_obs, new_infos
        turn += 1
    bar.close()
    _finish(ro, infos, done, ep_reward, ep_len, per_env)
    if retrieval == "ucb":
        env.report_outcomes(ro.won)
    return ro


def _finish(ro: Rollout, infos: list[dict], done: list[bool], ep_reward: list[float], ep_len: list[int],
            per_env: list[list[tuple[int, float]]]) -> None:
    """Episode outcomes, and each step sample's reward = its episode's reward - its own penalty."""
    n = len(done)
    ro.won = [bool(infos[i].get("won", False)) and done[i] for i in range(n)]
    ro.task_types = [str(infos[i].get("task_type", "all")) for i in range(n)]
    ro.episode_rewards, ro.episode_lengths = ep_reward, ep_len
    ro.rewards = [0.0] * len(ro.samples)
    for i in range(n):
        for idx, penalty in per_env[i]:
            ro.rewards[idx] = ep_reward[i] - penalty
