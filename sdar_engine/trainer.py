"""The training loop: rollout -> old / teacher / ref log-probs -> advantages -> update -> log.

One step (``Trainer.train_step``):
1. draw B tasks (seeded by run seed and step, so a resumed run draws the same), play G copies
   of each with the current (rollout-time) weights; one Sample per env step;
2. no-grad passes over packed streams: old log-probs (student prompt), teacher log-probs (same
   weights, skill-prefixed prompt; only when the method uses the teacher), reference
   log-probs (frozen initial weights; only when kl_coef > 0);
3. group-normalised advantages; 4. ``policy_update`` (fused SDAR loss, global normaliser);
5. metrics JSONL / TensorBoard, checkpoint every ``save_every`` steps, a PNG at the end.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdar_engine.advantages import AdvantageInput, compute_advantages
from sdar_engine.config import TrainConfig
from sdar_engine.metrics import MetricsLogger, format_metrics, peak_memory_mb, plot_metrics, to_float
from sdar_engine.rollout import HFBackend, Rollout, run_episodes

log = logging.getLogger("sdar.trainer")
SUMMARY_KEYS = ("reward", "success", "gate_mean", "gap_mean", "clip_frac", "ref_kl", "tokens_per_s")


def default_run_dir(root: str = "runs", tag: str = "run") -> Path:
    """A fresh ``runs/<tag>-YYYYmmdd-HHMMSS[-k]`` directory path (not created)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, k = Path(root) / f"{tag}-{stamp}", 1
    while path.exists():
        path, k = Path(root) / f"{tag}-{stamp}-{k}", k + 1
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config train.device='cuda' but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def make_env(cfg: TrainConfig, split: str) -> Any:
    """``sdar_envs.make`` with the env section's options (None = the suite's default)."""
    import sdar_envs

    opts = dict(cfg.env.options)
    opts.update(prompt_style=cfg.env.prompt_style, expert_think=cfg.env.expert_think)
    for key in ("history_length", "invalid_penalty", "num_workers", "skill_top_k"):
        value = getattr(cfg.env, key)
        if value is not None:
            opts[key] = value
    return sdar_envs.make(cfg.env.name, split=split, seed=cfg.env.seed, **opts)


def draw_tasks(pool: list[str], k: int, seed: int, step: int) -> list[str]:
    """``k`` task ids for ``step``: a pure function of (pool, seed, step), for exact resume."""
    rng = random.Random(f"sdar/{seed}/{step}")
    return rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]


def eval_tasks(pool: list[str], n: int) -> list[str]:
    """``n`` test tasks (all when n == 0 or n >= the pool), the same set for every eval.

    A fixed-seed sample of the sorted pool, so every task type is represented (ids sort by type).
    """
    ordered = sorted(pool)
    if not n or n >= len(ordered):
        return ordered
    return sorted(random.Random(f"sdar-eval/{n}").sample(ordered, n))


def make_backend(cfg: TrainConfig, model: Any, tokenizer: Any, device: torch.device) -> Any:
    """The rollout generation backend: HF generate (default) or vLLM (weights synced per step)."""
    if cfg.rollout.backend == "vllm":
        from sdar_engine.rollout import VLLMBackend

        return VLLMBackend(str(cfg.model.path), tokenizer, dtype=cfg.model.dtype)
    return HFBackend(model, tokenizer, device, cfg.rollout.gen_batch)


class Trainer:
    """Owns the policy, optional reference model, optimizer, envs and the run directory."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
                 env: Any = None, eval_env: Any = None) -> None:
        from sdar_engine.model import load_policy
        from sdar_engine.optim import build_optimizer

        if cfg.model.path is None:
            raise ValueError("config model.path is None: build the tiny model first "
                             "(sdar demo does) or point model.path at a local HF directory")
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.train.output_dir or default_run_dir())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.env = env if env is not None else make_env(cfg, "train")
        self._eval_env = eval_env
        self.model, self.tokenizer = load_policy(cfg.model, self.device)
        self.tokenizer.sdar_chat_kwargs = dict(cfg.rollout.chat_template_kwargs)
        loss0 = cfg.loss_config(0)
        self.ref_model = self._frozen_copy() if loss0.kl_coef > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim)
        self.backend = make_backend(cfg, self.model, self.tokenizer, self.device)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard)
        self.step = 0
        if resume:
            self._resume()
            if hasattr(self.backend, "sync_weights"):  # a separate serving engine loaded model.path
                self.backend.sync_weights(self.model)

    def _frozen_copy(self) -> Any:
        ref = copy.deepcopy(self.model)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _resume(self) -> None:
        from sdar_engine.checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(str(self.run_dir))
        if path is None:
            raise ValueError(f"--resume: no checkpoint under {str(self.run_dir)!r}; "
                             "start without --resume or pass the run directory that has one")
        self.step, _ = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.logger.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    @property
    def eval_env(self) -> Any:
        if self._eval_env is None:
            self._eval_env = make_env(self.cfg, "test")
        return self._eval_env

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int, uses_teacher: bool) -> Rollout:
        cfg, r = self.cfg, self.cfg.rollout
        tasks = draw_tasks(self.env.task_ids, cfg.env.tasks_per_step, cfg.train.seed, step)
        return run_episodes(self.env, self.backend, self.tokenizer, task_ids=tasks,
                            group_size=cfg.env.group_size, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_p=r.top_p,
                            max_prompt_tokens=r.max_prompt_tokens, max_turns=r.max_turns,
                            retrieval=cfg.env.retrieval if uses_teacher else None)

    def advantages(self, ro: Rollout) -> list[float]:
        a = self.cfg.algo
        inp = AdvantageInput(rewards=ro.rewards, groups=[s.group for s in ro.samples],
                             episodes=[s.episode for s in ro.samples], steps=[s.step for s in ro.samples],
                             anchors=ro.anchors, step_rewards=ro.step_rewards)
        return compute_advantages(a.advantage, inp, eps=a.adv_eps, step_advantage_w=a.step_advantage_w,
                                  gamma=a.gamma)

    def score(self, samples: list, loss_cfg: Any) -> None:
        """old (rollout weights, no grad), teacher (same weights, skill prompt), ref (frozen)."""
        from sdar_engine.logprobs import score_samples
        from sdar_engine.teacher import score_teacher

        max_tokens, temp = self.cfg.algo.max_tokens, loss_cfg.temperature
        score_samples(self.model, samples, max_tokens, which="old", temperature=temp)
        if loss_cfg.uses_teacher:
            score_teacher(self.model, samples, max_tokens, temp)
        if self.ref_model is not None:
            score_samples(self.ref_model, samples, max_tokens, which="ref", temperature=temp)

    def update(self, samples: list, loss_cfg: Any, step: int) -> dict[str, float]:
        """``algo.mini_batches`` optimizer steps over a seeded split of the samples."""
        from sdar_engine.update import policy_update

        k = min(self.cfg.algo.mini_batches, len(samples))
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(step)).tolist()
        chunks = [[samples[i] for i in order[j::k]] for j in range(k)] if k > 1 else [samples]
        sums: dict[str, float] = {}
        for chunk in chunks:
            out = policy_update(self.model, self.optimizer, chunk, loss_cfg, self.cfg.algo.max_tokens,
                                self.cfg.optim.grad_clip, ref_model=self.ref_model,
                                scheduler=self.scheduler)
            for key, v in out.items():
                sums[key] = sums.get(key, 0.0) + to_float(v) / len(chunks)
        return sums

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout + update at 0-based ``step``; returns its metrics."""
        loss_cfg = self.cfg.loss_config(step)
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.train.seed * 100_003 + step)  # generation RNG per step
        ro = self.rollout(step, loss_cfg.uses_teacher)
        t1 = time.perf_counter()
        metrics: dict[str, float] = ro.metrics()
        metrics.update(samples=len(ro.samples), rollout_seconds=t1 - t0, env_seconds=ro.env_seconds)
        if not ro.samples:
            log.warning("step %d produced no samples; skipping the update", step)
            return metrics
        for s, adv in zip(ro.samples, self.advantages(ro)):
            s.advantage = adv
        self.score(ro.samples, loss_cfg)
        t2 = time.perf_counter()
        metrics.update(self.update(ro.samples, loss_cfg, step))
        if hasattr(self.backend, "sync_weights"):  # vLLM serves a copy: push the new weights
            self.backend.sync_weights(self.model)
        t3 = time.perf_counter()
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in ro.samples)
        metrics.update(score_seconds=t2 - t1, update_seconds=t3 - t2, step_seconds=t3 - t0,
                       rollout_tokens=tokens, tokens_per_s=tokens / max(t3 - t0, 1e-9),
                       adv_abs_mean=sum(abs(s.advantage) for s in ro.samples) / len(ro.samples),
                       peak_mem_mb=peak_memory_mb(self.device))
        if loss_cfg.teacher_use == "rlsd":
            metrics["rlsd_weight"] = loss_cfg.rlsd_weight
        return metrics

    # ------------------------------------------------------------------ eval / loop
    def evaluate(self, n_tasks: int | None = None, prefix: str = "eval/") -> dict[str, float]:
        """Held-out success at ``rollout.eval_temperature``; does not disturb the training RNG."""
        cfg = self.cfg
        tasks = eval_tasks(self.eval_env.task_ids, cfg.env.eval_tasks if n_tasks is None else n_tasks)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.train.seed + 7_777)
            temp = cfg.rollout.eval_temperature
            ro = run_episodes(self.eval_env, self.backend, self.tokenizer, task_ids=tasks, group_size=1,
                              max_new_tokens=cfg.rollout.max_new_tokens, temperature=temp,
                              top_p=1.0, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                              max_turns=cfg.rollout.max_turns, keep_samples=False, desc="eval")
        return ro.metrics(prefix)

    def save(self) -> str:
        from sdar_engine.checkpoint import save_checkpoint

        return str(save_checkpoint(str(self.run_dir), self.model, self.optimizer, self.scheduler,
                                   self.step, self.cfg.to_dict(), tokenizer=self.tokenizer,
                                   keep_last=self.cfg.train.keep_checkpoints))

    def fit(self, final_eval: bool = True) -> dict[str, float]:
        """Train to ``train.steps``; checkpoints, evals, plot. Returns the last record (+ eval)."""
        cfg = self.cfg.train
        last: dict[str, float] = {}
        bar = tqdm(range(self.step, cfg.steps), desc=f"{self.cfg.algo.method} RL", unit="step",
                   initial=self.step, total=cfg.steps)
        for step in bar:
            metrics = self.train_step(step)
            self.step = step + 1
            last = self.logger.log(self.step, metrics)
            log.info("step %d %s", self.step, format_metrics(last, [k for k in SUMMARY_KEYS if k in last]))
            bar.set_postfix(success=f"{last.get('success', 0):.2f}", reward=f"{last.get('reward', 0):.2f}")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                log.info("checkpoint %s", self.save())
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.logger.log(self.step, self.evaluate())
        bar.close()
        if final_eval:
            ev = self.evaluate()
            self.logger.log(self.step, ev)
            log.info("eval step %d %s", self.step, format_metrics(ev))
            last = {**last, **ev}
        if cfg.plot:
            plot_metrics(self.logger.path, self.run_dir / "curves.png",
                         title=f"{self.cfg.algo.method} on {self.cfg.env.name}")
        self.logger.close()
        return last
