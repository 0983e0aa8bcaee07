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
from pathlib import Path
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


def expert_gap(cfg: Any, model: Any, tokenizer: Any, eval_env: Any, tasks: list[str],
               steps: list | None = None) -> dict[str, float]:
    """Teacher-minus-student log-prob of the expert's actions on ``tasks`` of ``eval_env``.

    Returns gap_mean_expert (nats/token), gate_mean_expert, gap_step_mean_expert (gap summed
    over a step's tokens, mean over steps) and expert_steps.
    """
    from sdar_engine.logprobs import score_samples
    from sdar_engine.packing import Sample
    from sdar_engine.prompt_fit import fit_prompt_ids
    from sdar_engine.rollout import stop_token_ids
    from sdar_engine.warmstart import play_expert

    if steps is None:
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


def expert_agreement(cfg: Any, tokenizer: Any, backend: Any, steps: list, marker: str) -> dict[str, float]:
    """How often greedy decoding reproduces the expert's action, student prompt vs teacher prompt,
    on the expert steps whose raw action contains ``marker`` (e.g. "<action>go to": ALFWorld's
    moves), over all of them and over each episode's first one (where a search starts, so where
    a placement skill carries its information). Returns agree_student, agree_teacher,
    agree_first_student, agree_first_teacher, agreement_steps, agreement_episodes.
    """
    from sdar_engine.prompt_fit import fit_prompt_ids

    chosen = sorted((s for s in steps if marker in s.action), key=lambda s: (s.episode, s.step))
    if not chosen:
        raise ValueError(f"agreement marker={marker!r} is in none of the {len(steps)} expert actions")
    firsts = list({s.episode: s for s in reversed(chosen)}.values())
    cap = cfg.rollout.max_prompt_tokens

    def agree(sel: list, which: str) -> float:
        ids = [fit_prompt_ids(tokenizer, [getattr(s, which)], cap, f"{which} prompt") for s in sel]
        outs = backend.generate(ids, max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0, top_p=1.0)
        said = [" ".join(tokenizer.decode(o, skip_special_tokens=True).split()) for o in outs]
        return sum(g == " ".join(s.action.split()) for g, s in zip(said, sel)) / len(sel)

    return {"agree_student": agree(chosen, "prompt"), "agree_teacher": agree(chosen, "teacher"),
            "agree_first_student": agree(firsts, "prompt"), "agree_first_teacher": agree(firsts, "teacher"),
            "agreement_steps": float(len(chosen)), "agreement_episodes": float(len(firsts))}


def _sdar_gate_beta(cfg: Any) -> float:
    """The gate_beta SDAR trains with: the preset's unless ``algo.loss`` overrides it."""
    from sdar_kernels import LossConfig

    override = {"gate_beta": cfg.algo.loss["gate_beta"]} if "gate_beta" in (cfg.algo.loss or {}) else {}
    return float(LossConfig.preset("sdar", **override).gate_beta)


def probe_teacher(cfg: Any, model: Any, env: Any, eval_env: Any, *, tokenizer: Any = None,
                  backend: Any = None, student_success: float | None = None,
                  eval_seeds: int = 1, agreement_marker: str | None = None) -> dict[str, float]:
    """Student vs teacher on the held-out tasks of ``cfg.env.eval_tasks`` (the eval set).

    cfg: the run's TrainConfig (rollout / env / algo sections are read; ``model.path`` gives the
    tokenizer when ``tokenizer`` is None). model: the policy (nn.Module); None loads ``model.path``.
    env: the train env (not read; callers pass the (env, eval_env) pair they hold).
    eval_env: the held-out env. backend: a generation backend to reuse (default: a new one for
    ``model``). student_success: a greedy eval already measured with these weights, to skip the
    student rollout (seed 0 only). eval_seeds: with a sampling ``rollout.eval_temperature``, play
    every held-out task this many times per prompt (seed k: ``sampling_seed("eval", train.seed)``
    for k = 0, the eval's own draw, then ``sampling_seed("eval", train.seed, k)``); successes
    are means over all games. One process; returns {student_success, teacher_success,
    teacher_minus_student with its 95 % paired-bootstrap interval over tasks (diff_lo, diff_hi),
    teacher_only_wins, student_only_wins, eval_games, gap_mean_expert, gate_mean_expert,
    gap_step_mean_expert, expert_steps, probe_seconds}; with ``agreement_marker`` also the
    ``expert_agreement`` keys.
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

    if not isinstance(eval_seeds, int) or eval_seeds < 1:
        raise ValueError(f"eval_seeds={eval_seeds!r} is not valid; use an int >= 1")
    if cfg.rollout.eval_temperature == 0 and eval_seeds > 1:
        raise ValueError(f"eval_seeds={eval_seeds} needs a sampling rollout.eval_temperature (> 0); "
                         "greedy games repeat exactly")
    reuse = student_success is not None and eval_seeds == 1

    def won(view: Any, desc: str, k: int) -> list[bool]:
        seed = sampling_seed("eval", cfg.train.seed) if k == 0 else sampling_seed("eval", cfg.train.seed, k)
        ro = run_episodes(view, backend, tokenizer, task_ids=tasks, group_size=1,
                          max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                          top_p=1.0, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                          max_turns=cfg.rollout.max_turns, keep_samples=False, desc=desc, seed=seed)
        return list(ro.won)

    was_training = model.training
    model.eval()
    teacher_view = TeacherPromptEnv(eval_env, cfg.env.retrieval)
    teacher = [w for k in range(eval_seeds) for w in won(teacher_view, f"probe teacher {k}", k)]
    out: dict[str, float] = {"teacher_success": sum(teacher) / max(1, len(teacher))}
    if reuse:
        out["student_success"] = float(student_success)
    else:
        student = [w for k in range(eval_seeds) for w in won(eval_env, f"probe student {k}", k)]
        out.update(paired_wins(student, teacher, len(tasks)))
    from sdar_engine.warmstart import play_expert

    steps, _ = play_expert(eval_env, tasks, max_turns=cfg.rollout.max_turns, retrieval=cfg.env.retrieval)
    out.update(expert_gap(cfg, model, tokenizer, eval_env, tasks, steps))
    if agreement_marker:
        out.update(expert_agreement(cfg, tokenizer, backend, steps, agreement_marker))
    model.train(was_training)
    out["probe_seconds"] = time.perf_counter() - t0
    log.info("teacher probe on %d held-out tasks x %d seeds: student %.3f teacher %.3f gap_mean_expert "
             "%+.4f gate_mean_expert %.3f (%d expert steps, %.0fs)", len(tasks), eval_seeds,
             out["student_success"], out["teacher_success"], out["gap_mean_expert"],
             out["gate_mean_expert"], out["expert_steps"], out["probe_seconds"])
    return out


def paired_wins(student: list[bool], teacher: list[bool], n_tasks: int, resamples: int = 10_000,
                seed: int = 0) -> dict[str, float]:
    """Student vs teacher on the same games (index i: task i % n_tasks, same sampling seed).

    teacher_minus_student is the success difference; diff_lo / diff_hi its 95 % percentile-
    bootstrap interval, resampling tasks (a task's games under every seed move together).
    """
    from sdar_engine.study_stats import bootstrap_ci

    if len(student) != len(teacher) or not student or len(student) % n_tasks:
        raise ValueError(f"paired_wins: {len(student)} student and {len(teacher)} teacher games are not "
                         f"whole rounds of the same {n_tasks} tasks")
    per_task = [0.0] * n_tasks
    for i, (s, t) in enumerate(zip(student, teacher)):
        per_task[i % n_tasks] += (float(t) - float(s)) * n_tasks / len(student)
    lo, hi = bootstrap_ci(per_task, resamples, seed)
    return {"student_success": sum(student) / len(student), "teacher_minus_student": sum(per_task) / n_tasks,
            "diff_lo": lo, "diff_hi": hi, "eval_games": float(len(student)),
            "teacher_only_wins": float(sum(t and not s for s, t in zip(student, teacher))),
            "student_only_wins": float(sum(s and not t for s, t in zip(student, teacher)))}


def main(argv: list[str] | None = None) -> None:
    """``python -m sdar_engine.teacher_probe --config C --model DIR [--eval-seeds 3]``."""
    import argparse
    import dataclasses
    import json

    from sdar_engine.config import load_config
    from sdar_engine.trainer import make_env

    parser = argparse.ArgumentParser(description="Can the SDAR teacher use its skills? Student vs "
                                     "teacher on the config's held-out games, and the expert gap.")
    parser.add_argument("--config", required=True, help="a TrainConfig yaml (name in sdar_engine/configs or path)")
    parser.add_argument("--model", required=True, help="local HF model directory (e.g. <study>/warmstart/model_warmstart)")
    parser.add_argument("--eval-seeds", type=int, default=1, help="sampling seeds per task (eval_temperature > 0)")
    parser.add_argument("--agreement-marker", default=None,
                        help='also measure greedy agreement with the expert on actions containing this '
                             '(ALFWorld moves: "<action>go to")')
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model))
    eval_env = make_env(cfg, "test")
    try:
        out = probe_teacher(cfg, None, None, eval_env, eval_seeds=args.eval_seeds,
                            agreement_marker=args.agreement_marker)
    finally:
        getattr(eval_env, "close", lambda: None)()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
