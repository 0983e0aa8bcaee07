"""The training loop: rollout -> teacher / ref log-probs -> advantages -> PPO update -> log.

One step (``Trainer.train_step``), the same under ``python`` and ``torchrun --nproc_per_node=K``:
1. draw B tasks (seeded by run seed and step, so a resumed run draws the same); this rank plays
   its share of the B x G episodes (``batch.py``), each sampled with its own seed, with the
   current weights; one Sample per env step;
2. gather every rank's rewards and outcomes: group-normalised advantages and the metrics are
   computed on the whole batch;
3. no-grad passes over packed streams: teacher log-probs (same weights, skill-prefixed prompt;
   only when the method uses the teacher), reference log-probs (initial weights, sharded like
   the policy; only when kl_coef > 0);
4. ``ppo_update``: old log-probs of the rollout weights, then ``algo.ppo_epochs`` passes of
   mini-batches of ``algo.ppo_mini_batch_size`` step samples, one optimizer step each (fused
   SDAR loss, global normaliser);
5. rank 0 writes metrics JSONL / TensorBoard; every ``save_every`` steps all ranks write one
   checkpoint together; a PNG at the end.
Under torchrun the policy is FSDP2-sharded (float32 parameters, ``model.dtype`` compute) and the
HF backend generates from a full replica per rank, refreshed after each update and checked
bitwise equal across ranks.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sdar_engine.advantages import AdvantageInput, compute_advantages
from sdar_engine.batch import StepBatch, gather_outcomes, gather_step
from sdar_engine.config import TrainConfig
from sdar_engine.distributed import (barrier, broadcast_object, full_state_dict, gather_objects,
                                     init_distributed, is_distributed, params_fingerprint, shard)
from sdar_engine.metrics import (MetricsLogger, format_metrics, format_phases, peak_memory_mb, plot_metrics,
                                 step_phase_seconds)
from sdar_engine.progress import progress, quiet_library_bars
from sdar_engine.rollout import HFBackend, Rollout, run_episodes, sampling_seed

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
    """The device of this process for ``train.device`` (cuda:LOCAL_RANK under torchrun)."""
    return init_distributed(name)[2]


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
        from sdar_engine.distributed import world_size
        from sdar_engine.vllm_backend import VLLMBackend

        return VLLMBackend.from_config(cfg, tokenizer, policy=model, world_size=world_size())
    return HFBackend(model, tokenizer, device, cfg.rollout.gen_batch)


class Trainer:
    """Owns the policy, optional reference model, optimizer, envs and the run directory."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
                 env: Any = None, eval_env: Any = None) -> None:
        from sdar_engine.optim import build_optimizer

        if cfg.model.path is None:
            raise ValueError("config model.path is None: build the tiny model first "
                             "(sdar demo does) or point model.path at a local HF directory")
        self.cfg = cfg
        quiet_library_bars()  # transformers' "Loading weights" bar, off a terminal
        self.rank, self.world, self.device = init_distributed(cfg.train.device, cpu_offload=cfg.model.fsdp_cpu_offload)
        episodes = cfg.env.tasks_per_step * cfg.env.group_size
        if episodes < self.world:
            raise ValueError(f"config env.tasks_per_step x env.group_size = {episodes} episodes per step, fewer "
                             f"than the {self.world} ranks: every rank needs one; raise env.tasks_per_step")
        self.run_dir = Path(broadcast_object(str(run_dir or cfg.train.output_dir or default_run_dir())))
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.env = env if env is not None else make_env(cfg, "train")
        self._eval_env = eval_env
        self.model, self.tokenizer, self.replica = self._policy()
        self.tokenizer.sdar_chat_kwargs = dict(cfg.rollout.chat_template_kwargs)
        self.ref_model = self._reference() if cfg.loss_config(0).kl_coef > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim)
        from sdar_engine.memory_levers import token_budget  # algo.max_tokens, or the memory guard's pick

        self.max_tokens = token_budget(self.model, self.optimizer, cfg)
        self.backend = make_backend(cfg, self.replica if self.replica is not None else self.model,
                                    self.tokenizer, self.device)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard, enabled=self.rank == 0)
        self.step = 0
        if resume:
            self._resume()
            self._sync_rollout_weights()  # a replica or serving engine loaded model.path

    def _policy(self) -> tuple[Any, Any, Any]:
        """(policy, tokenizer, replica): the policy FSDP2-sharded under a process group, where the
        HF backend generates from a full frozen replica in the compute dtype (generation must not
        wait on other ranks, as FSDP's per-layer all-gathers would make it)."""
        from sdar_engine.distributed import wrap_fsdp
        from sdar_engine.model import compute_dtype, load_policy

        model, tokenizer = load_policy(self.cfg.model, self.device)
        replica = None
        if is_distributed() and self.cfg.rollout.backend == "hf":
            replica = copy.deepcopy(model).requires_grad_(False)
            for p in replica.parameters():  # the dtype FSDP gathers for compute (buffers stay)
                p.data = p.data.to(compute_dtype(model))
        return wrap_fsdp(model), tokenizer, replica

    def _reference(self) -> Any:
        """The frozen initial weights for the KL term, sharded like the policy."""
        from sdar_engine.distributed import wrap_fsdp
        from sdar_engine.model import load_policy

        ref, _ = load_policy(self.cfg.model, self.device)
        ref.eval()
        return wrap_fsdp(ref.requires_grad_(False))

    def _resume(self) -> None:
        from sdar_engine.checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(str(self.run_dir))
        if path is None:
            raise ValueError(f"--resume: no checkpoint under {str(self.run_dir)!r}; "
                             "start without --resume or pass the run directory that has one")
        self.step, _ = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.logger.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _sync_rollout_weights(self) -> dict[str, float]:
        """Push the policy's weights to whatever generates (the replica, or a serving engine)."""
        if self.replica is None:
            if hasattr(self.backend, "sync_weights"):  # vLLM serves a copy
                self.backend.sync_weights(self.model)
            return {}
        self.replica.load_state_dict(full_state_dict(self.model))
        prints = gather_objects(params_fingerprint(self.replica))
        if len(set(prints)) != 1:
            raise RuntimeError(f"rollout replicas differ across ranks after the weight sync: {prints}")
        log.info("replica weights bitwise equal on %d ranks (checksum %016x)", len(prints), prints[0])
        return {"rank_params_equal": 1.0}

    @property
    def eval_env(self) -> Any:
        if self._eval_env is None:
            self._eval_env = make_env(self.cfg, "test")
        return self._eval_env

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int, uses_teacher: bool) -> Rollout:
        """This rank's share of the step's B x G episodes (the whole batch on one process)."""
        cfg, r = self.cfg, self.cfg.rollout
        tasks = draw_tasks(self.env.task_ids, cfg.env.tasks_per_step, cfg.train.seed, step)
        mine = shard(len(tasks) * cfg.env.group_size)
        log.info("rank %d/%d step %d plays episodes %d..%d of %d", self.rank, self.world, step + 1,
                 mine.start, mine.stop - 1, len(tasks) * cfg.env.group_size)
        return run_episodes(self.env, self.backend, self.tokenizer, task_ids=tasks,
                            group_size=cfg.env.group_size, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_p=r.top_p,
                            max_prompt_tokens=r.max_prompt_tokens, max_turns=r.max_turns,
                            retrieval=cfg.env.retrieval if uses_teacher else None, episodes=mine,
                            seed=sampling_seed("rollout", cfg.train.seed, step), desc=f"rollout r{self.rank}",
                            sample_mode=cfg.algo.sample_mode)

    def advantages(self, inp: AdvantageInput) -> list[float]:
        """Advantages of every sample of the step (all ranks), in global order."""
        a = self.cfg.algo
        return compute_advantages(a.advantage, inp, eps=a.adv_eps, step_advantage_w=a.step_advantage_w,
                                  gamma=a.gamma)

    def score(self, samples: list, loss_cfg: Any) -> dict[str, float]:
        """teacher (rollout weights, skill prompt) and ref (frozen) log-probs, no grad; returns the
        seconds of each pass. The old log-probs come in ``update``, packed like the mini-batches
        they serve."""
        t0 = time.perf_counter()
        from sdar_engine.logprobs import score_samples
        from sdar_engine.teacher import score_teacher

        max_tokens, temp = self.max_tokens, loss_cfg.temperature
        if loss_cfg.uses_teacher:
            score_teacher(self.model, samples, max_tokens, temp)
        t1 = time.perf_counter()
        if self.ref_model is not None:
            score_samples(self.ref_model, samples, max_tokens, which="ref", temperature=temp)
        return {"time/score_teacher": t1 - t0, "time/score_ref": time.perf_counter() - t1}

    def update(self, samples: list, batch: StepBatch, loss_cfg: Any, step: int) -> dict[str, float]:
        """``algo.ppo_epochs`` x ceil(N / ``algo.ppo_mini_batch_size``) optimizer steps, the
        mini-batches drawn over the whole batch (all ranks) by a seeded plan."""
        from sdar_engine.update import local_plan, mini_batch_plan, ppo_update

        a = self.cfg.algo
        plan = mini_batch_plan(batch.num_samples, a.ppo_mini_batch_size, a.ppo_epochs,
                               seed=sampling_seed("ppo", self.cfg.train.seed, step))
        return ppo_update(self.model, self.optimizer, samples, loss_cfg, local_plan(plan, batch.mine()),
                          self.max_tokens, self.cfg.optim.grad_clip, ref_model=self.ref_model,
                          scheduler=self.scheduler)

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout + update at 0-based ``step``; returns its (global) metrics."""
        loss_cfg = self.cfg.loss_config(step)
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.train.seed * 100_003 + step)  # any other RNG user, per step
        ro = self.rollout(step, loss_cfg.uses_teacher)
        if hasattr(self.backend, "sleep"):  # vLLM: free its GPU memory for the scoring and update passes
            self.backend.sleep()
        t1 = time.perf_counter()
        batch = gather_step(ro, with_records=self.cfg.train.log_episodes)
        metrics: dict[str, float] = batch.outcomes.metrics()
        metrics.update(samples=batch.num_samples, episodes=len(batch.outcomes.won),
                       episode_overlap=batch.episode_overlap(), rollout_seconds=t1 - t0,
                       env_seconds=batch.outcomes.env_seconds)
        self._write_episodes(step, batch)
        if not batch.num_samples:
            log.warning("step %d produced no samples; skipping the update", step)
            return metrics
        advantages = self.advantages(batch.adv)
        for s, i in zip(ro.samples, batch.mine()):
            s.advantage = advantages[i]
        t_score = time.perf_counter()
        phases = self.score(ro.samples, loss_cfg)
        t2 = time.perf_counter()
        metrics.update(self.update(ro.samples, batch, loss_cfg, step))
        t_sync = time.perf_counter()
        metrics.update(self._sync_rollout_weights())
        t3 = time.perf_counter()
        phases.update({"time/gather": t_score - t1, "time/sync": t3 - t_sync, "time/step": t3 - t0,
                       "time/update": t_sync - t2 - metrics.get("time/old_logp", 0.0)})
        metrics.update(step_phase_seconds(ro, t1 - t0), **phases)
        metrics.update(score_seconds=t2 - t1, update_seconds=t3 - t2, step_seconds=t3 - t0,
                       rollout_tokens=batch.tokens, tokens_per_s=batch.tokens / max(t3 - t0, 1e-9),
                       adv_abs_mean=sum(abs(a) for a in advantages) / len(advantages),
                       peak_mem_mb=peak_memory_mb(self.device))
        if loss_cfg.teacher_use == "rlsd":
            metrics["rlsd_weight"] = loss_cfg.rlsd_weight
        return metrics

    def _write_episodes(self, step: int, batch: StepBatch) -> None:
        """Rank 0 appends the step's samples (episode, turn, task, action, reward, rank) to
        ``episodes.jsonl`` when ``train.log_episodes`` is on."""
        if batch.records is None or self.rank != 0:
            return
        with open(self.run_dir / "episodes.jsonl", "a", encoding="utf-8") as fh:
            for rec in batch.records:
                fh.write(json.dumps({"train_step": step + 1, **rec}) + "\n")

    # ------------------------------------------------------------------ eval / loop
    def evaluate(self, n_tasks: int | None = None, prefix: str = "eval/") -> dict[str, float]:
        """Held-out success at ``rollout.eval_temperature`` (ranks split the tasks); each episode
        is seeded, so the training RNG is not disturbed and any split gives the same games."""
        cfg = self.cfg
        tasks = eval_tasks(self.eval_env.task_ids, cfg.env.eval_tasks if n_tasks is None else n_tasks)
        mine = shard(len(tasks))
        ro = Rollout()
        if len(mine):
            ro = run_episodes(self.eval_env, self.backend, self.tokenizer, task_ids=tasks, group_size=1,
                              max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                              top_p=1.0, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                              max_turns=cfg.rollout.max_turns, keep_samples=False, desc="eval",
                              episodes=mine, seed=sampling_seed("eval", cfg.train.seed),
                              sample_mode=cfg.algo.sample_mode)  # the policy plays as it was trained
        return gather_outcomes(ro).metrics(prefix)

    def save(self) -> str:
        """Every rank calls it (FSDP gathers the full state); rank 0 writes one checkpoint."""
        from sdar_engine.checkpoint import save_checkpoint

        return str(save_checkpoint(str(self.run_dir), self.model, self.optimizer, self.scheduler,
                                   self.step, self.cfg.to_dict(), tokenizer=self.tokenizer,
                                   keep_last=self.cfg.train.keep_checkpoints))

    def fit(self, final_eval: bool = True) -> dict[str, float]:
        """Train to ``train.steps``; checkpoints, evals, plot. Returns the last record (+ eval)."""
        cfg = self.cfg.train
        last: dict[str, float] = {}
        bar = progress(range(self.step, cfg.steps), desc=f"{self.cfg.algo.method} RL", unit="step",
                   initial=self.step, total=cfg.steps, disable=self.rank != 0)
        for step in bar:
            metrics = self.train_step(step)
            self.step = step + 1
            last = self.logger.log(self.step, metrics)
            log.info("step %d %s", self.step, format_metrics(last, [k for k in SUMMARY_KEYS if k in last]))
            log.info("step %d seconds %s", self.step, format_phases(last))
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
        if cfg.plot and self.rank == 0:
            plot_metrics(self.logger.path, self.run_dir / "curves.png",
                         title=f"{self.cfg.algo.method} on {self.cfg.env.name}")
        self.logger.close()
        return last
