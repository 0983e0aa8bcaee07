"""Can the SDAR teacher use its skills? One measurement on held-out games, before (or after) RL.

``probe_teacher(cfg, model, env, eval_env)`` compares, with the same weights:

- student_success: greedy held-out success reading the student prompt (what ``sdar eval`` gives);
- teacher_success: the same episodes (same tasks, seeds, ``rollout.eval_temperature``) with the
  skill-prefixed teacher prompt as the policy prompt (``TeacherPromptEnv``);
- gap_mean_expert: mean over response tokens of log p_teacher - log p_student (nats/token) of
  the expert's actions on the same held-out games, i.e. the gap the SDAR gate reads;
  > 0 means the skills make the expert's choices likelier;
- gate_mean_expert: mean sigmoid(gate_beta * gap) over those tokens, gate_beta as SDAR trains
  with (the SDAR gate; 0.5 = indifferent).

SDAR can only help when the teacher is better than the student; this is the check.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger("sdar.teacher_probe")


class TeacherPromptEnv:
    """A view of ``env`` whose student prompt IS the teacher prompt (skills + student prompt).

    Everything else (reset, step, infos, task ids) is the wrapped env's, so any rollout that
    reads ``prompt_candidates`` / ``prompt`` plays the teacher as the policy.
    """

    def __init__(self, env: Any, retrieval: str = "keyword") -> None:
        self._env, self.retrieval = env, retrieval

    def prompt_candidates(self, i: int) -> list[str]:
        fn = getattr(self._env, "teacher_prompt_candidates", None)
        return list(fn(i, self.retrieval)) if fn is not None else [self._env.teacher_prompt(i, self.retrieval)]

    def prompt(self, i: int) -> str:
        return self.prompt_candidates(i)[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def expert_gap(cfg: Any, model: Any, tokenizer: Any, eval_env: Any, tasks: list[str]) -> dict[str, float]:
    """Teacher-minus-student log-prob of the expert's actions on ``tasks`` of ``eval_env``.

    Returns gap_mean_expert (nats/token), gate_mean_expert, gap_step_mean_expert (gap summed
    over a step's tokens, mean over steps) and expert_steps.
    """
    from sdar_engine.logprobs import score_samples
    from sdar_engine.packing import Sample
    from sdar_engine.prompt_fit import fit_prompt_ids
    from sdar_engine.rollout import stop_token_ids
    from sdar_engine.warmstart import play_expert

    steps, _ = play_expert(eval_env, tasks, max_turns=cfg.rollout.max_turns, retrieval=cfg.env.retrieval)
    if not steps:
        raise ValueError("probe_teacher: the expert played no step on the held-out tasks")
    cap, eot = cfg.rollout.max_prompt_tokens, stop_token_ids(tokenizer)[0]
    samples = [Sample(prompt_ids=fit_prompt_ids(tokenizer, [s.prompt], cap, "student prompt"),
                      teacher_prompt_ids=fit_prompt_ids(tokenizer, [s.teacher], cap, "teacher prompt"),
                      response_ids=tokenizer(s.action, add_special_tokens=False)["input_ids"] + [eot],
                      episode=s.episode, step=s.step) for s in steps]
    temp = cfg.rollout.temperature
    score_samples(model, samples, cfg.algo.max_tokens, which="old", temperature=temp)
    score_samples(model, samples, cfg.algo.max_tokens, which="teacher", temperature=temp)
    gaps = [s.teacher_logp.float() - s.old_logp.float() for s in samples]
    flat = torch.cat(gaps)
    beta = _sdar_gate_beta(cfg)
    return {"gap_mean_expert": float(flat.mean()),
            "gate_mean_expert": float(torch.sigmoid(beta * flat).mean()),
            "gap_step_mean_expert": float(torch.stack([g.sum() for g in gaps]).mean()),
            "expert_steps": float(len(samples))}


def _sdar_gate_beta(cfg: Any) -> float:
    """The gate_beta SDAR trains with: the preset's unless ``algo.loss`` overrides it."""
    from sdar_kernels import LossConfig

    override = {"gate_beta": cfg.algo.loss["gate_beta"]} if "gate_beta" in (cfg.algo.loss or {}) else {}
    return float(LossConfig.preset("sdar", **override).gate_beta)


def probe_teacher(cfg: Any, model: Any, env: Any, eval_env: Any, *, tokenizer: Any = None,
                  backend: Any = None, student_success: float | None = None) -> dict[str, float]:
    """Student vs teacher on the held-out tasks of ``cfg.env.eval_tasks`` (the eval set).

    cfg: the run's TrainConfig (rollout / env / algo sections are read; ``model.path`` gives the
    tokenizer when ``tokenizer`` is None). model: the policy (nn.Module); None loads ``model.path``.
    env: the train env (not read; callers pass the (env, eval_env) pair they hold).
    eval_env: the held-out env. backend: a generation backend to reuse (default: a new one for
    ``model``). student_success: a greedy eval already measured with these weights, to skip the
    student rollout. One process; returns
    {student_success, teacher_success, gap_mean_expert, gate_mean_expert, gap_step_mean_expert,
    expert_steps, probe_seconds}.
    """
    from sdar_engine.logprobs import model_device
    from sdar_engine.rollout import run_episodes, sampling_seed
    from sdar_engine.trainer import eval_tasks, make_backend

    del env
    t0 = time.perf_counter()
    if model is None or tokenizer is None:
        from sdar_engine.model import load_policy
        from sdar_engine.trainer import resolve_device

        loaded, tok = load_policy(cfg.model, resolve_device(cfg.train.device))
        model, tokenizer = model if model is not None else loaded, tok
    device = model_device(model)
    backend = backend if backend is not None else make_backend(cfg, model, tokenizer, device)
    tasks = eval_tasks(eval_env.task_ids, cfg.env.eval_tasks)

    def success(view: Any, desc: str) -> float:
        ro = run_episodes(view, backend, tokenizer, task_ids=tasks, group_size=1,
                          max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                          top_p=1.0, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                          max_turns=cfg.rollout.max_turns, keep_samples=False, desc=desc,
                          seed=sampling_seed("eval", cfg.train.seed))
        return sum(ro.won) / max(1, len(ro.won))

    was_training = model.training
    model.eval()
    out = {"student_success": success(eval_env, "probe student") if student_success is None
           else float(student_success),
           "teacher_success": success(TeacherPromptEnv(eval_env, cfg.env.retrieval), "probe teacher")}
    out.update(expert_gap(cfg, model, tokenizer, eval_env, tasks))
    model.train(was_training)
    out["probe_seconds"] = time.perf_counter() - t0
    log.info("teacher probe on %d held-out tasks: student %.3f teacher %.3f gap_mean_expert %+.4f "
             "gate_mean_expert %.3f (%d expert steps, %.0fs)", len(tasks), out["student_success"],
             out["teacher_success"], out["gap_mean_expert"], out["gate_mean_expert"],
             out["expert_steps"], out["probe_seconds"])
    return out
