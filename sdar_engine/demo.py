"""The main job, end to end on a fresh CPU machine: tiny model -> warm-start -> SDAR RL.

``run_demo`` builds the tiny Qwen2 + tokenizer from the environment's own text, plays the
expert on train games for a supervised warm-start, measures held-out success (untrained,
after the warm-start), runs RL (SDAR; with ``compare`` also GRPO from the same warm-start and
seed) and writes everything under one run directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from sdar_engine.config import TrainConfig
from sdar_engine.trainer import Trainer, default_run_dir, draw_tasks, make_env

log = logging.getLogger("sdar.demo")
DEMO_CONFIG = "tiny_alfworld_demo.yaml"


def collect_expert(cfg: TrainConfig, env: Any) -> tuple[list, float]:
    """Expert steps on ``warmstart.episodes`` train games (seeded draw) and the expert's success."""
    from sdar_engine.warmstart import play_expert

    n = max(cfg.warmstart.episodes, 1)
    tasks = draw_tasks(env.task_ids, n, cfg.train.seed, -1)
    t0 = time.perf_counter()
    steps, success = play_expert(env, tasks, max_turns=cfg.rollout.max_turns, noise=cfg.warmstart.noise,
                                 seed=cfg.train.seed, retrieval=cfg.env.retrieval)
    log.info("expert: %d episodes, %d steps, success %.2f with noise %.2f (%.1fs)", n, len(steps), success,
             cfg.warmstart.noise, time.perf_counter() - t0)
    search = cfg.warmstart.student_expert_search
    if search is None:
        return steps, success
    # the student-prompt samples from a second expert on the same tasks (e.g. one that does not read
    # the skills); the env's own expert then labels the skill-prefixed prompts only
    options = {**cfg.env.options, "expert_search": search}
    other = make_env(dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, options=options)), "train")
    student, student_success = play_expert(other, tasks, max_turns=cfg.rollout.max_turns,
                                           noise=cfg.warmstart.noise, seed=cfg.train.seed,
                                           retrieval=cfg.env.retrieval)
    log.info("student-prompt expert (expert_search=%s): %d steps, success %.2f; skill-prompt expert: %d steps",
             search, len(student), student_success, len(steps))
    return ([dataclasses.replace(s, role="student") for s in student]
            + [dataclasses.replace(s, role="teacher") for s in steps]), success


def build_model(cfg: TrainConfig, run_dir: Path, steps: list) -> TrainConfig:
    """Build the tiny preset from the expert text when ``model.path`` is unset; cfg with its path."""
    from sdar_engine.model import build_tiny
    from sdar_engine.warmstart import expert_corpus

    if cfg.model.path is not None:
        return cfg
    path = build_tiny(str(run_dir / "model_init"), expert_corpus(steps), cfg.model, seed=cfg.train.seed)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def warm_start(cfg: TrainConfig, run_dir: Path, steps: list, expert_success: float) -> TrainConfig:
    """Supervised warm-start of ``cfg.model`` on the expert steps; cfg pointing at the result.

    The model goes to ``<run_dir>/model_warmstart``, the numbers to ``warmstart.json``.
    """
    from sdar_engine.model import load_policy
    from sdar_engine.trainer import resolve_device
    from sdar_engine.warmstart import expert_samples, supervised_warmstart

    ws = cfg.warmstart
    model, tokenizer = load_policy(cfg.model, resolve_device(cfg.train.device))
    samples = expert_samples(steps, tokenizer, cfg.rollout.max_prompt_tokens, teacher_prompts=ws.teacher_prompts)
    t0 = time.perf_counter()
    losses = supervised_warmstart(model, samples, epochs=ws.epochs, lr=ws.lr, max_tokens=ws.max_tokens,
                                  batch_samples=ws.batch_samples, seed=cfg.train.seed)
    out = run_dir / "model_warmstart"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    info = {"expert_success": expert_success, "samples": len(samples), "teacher_prompts": ws.teacher_prompts,
            "optimizer_steps": len(losses),
            "nll_first": losses[0], "nll_last": losses[-1], "seconds": time.perf_counter() - t0,
            "response_tokens": sum(len(s.response_ids) for s in samples),
            "prompt_tokens_mean": sum(len(s.prompt_ids) for s in samples) / len(samples)}
    (run_dir / "warmstart.json").write_text(json.dumps(info, indent=2))
    log.info("warm-start saved to %s: %s", out, info)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(out)))


def prepare_policy(cfg: TrainConfig, run_dir: Path, env: Any) -> TrainConfig:
    """Tiny build (model.path unset) and warm-start (warmstart.enabled), as ``sdar train`` needs."""
    if cfg.model.path is not None and not cfg.warmstart.enabled:
        return cfg
    steps, success = collect_expert(cfg, env)
    cfg = build_model(cfg, run_dir, steps)
    return warm_start(cfg, run_dir, steps, success) if cfg.warmstart.enabled else cfg


def _rl(cfg: TrainConfig, method: str, run_dir: Path, env: Any, eval_env: Any,
        start_eval: dict[str, float] | None = None) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, method=method))
    trainer = Trainer(cfg, run_dir / method, env=env, eval_env=eval_env)
    if start_eval:  # the warm-start's eval is step 0 of every RL curve
        trainer.logger.log(0, start_eval)
    t0 = time.perf_counter()
    last = trainer.fit()
    last["rl_seconds"] = time.perf_counter() - t0
    return last


def run_demo(cfg: TrainConfig, output: str | None = None, compare: bool = False,
             eval_untrained: bool = True) -> dict[str, Any]:
    """Run the demo; returns a summary (also written to ``<run>/summary.json``) and prints it."""
    t_start, c_start = time.perf_counter(), time.process_time()
    run_dir = Path(output) if output else default_run_dir(tag="demo")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    env, eval_env = make_env(cfg, "train"), make_env(cfg, "test")
    summary: dict[str, Any] = {"run_dir": str(run_dir), "env": cfg.env.name,
                               "eval_tasks": len(eval_env.task_ids) if not cfg.env.eval_tasks
                               else cfg.env.eval_tasks}
    steps, expert_success = collect_expert(cfg, env)
    base = build_model(cfg, run_dir, steps)
    if eval_untrained:
        summary["success_untrained"] = _eval_only(base, run_dir / "eval_untrained", env, eval_env)["eval/success"]
        print(f"[sdar demo] held-out success, untrained tiny model: {summary['success_untrained']:.3f}",
              flush=True)
    c0 = time.process_time()
    warm = warm_start(base, run_dir, steps, expert_success)
    summary["warmstart_cpu_seconds"] = time.process_time() - c0
    warm_eval = _eval_only(warm, run_dir / "eval_warmstart", env, eval_env)
    summary["success_warmstart"] = warm_eval["eval/success"]
    print(f"[sdar demo] held-out success after warm-start: {summary['success_warmstart']:.3f}", flush=True)
    summary["teacher_probe"] = _probe(warm, run_dir, env, eval_env, summary["success_warmstart"])
    summary["rl_methods"] = ["grpo", "sdar"] if compare else [cfg.algo.method]  # run order
    for method in summary["rl_methods"]:
        c0 = time.process_time()
        last = _rl(warm, method, run_dir, env, eval_env, warm_eval)
        summary[f"rl_cpu_seconds_{method}"] = time.process_time() - c0
        summary[f"success_after_{method}"] = last.get("eval/success", float("nan"))
        summary[f"train_success_last_{method}"] = last.get("success", float("nan"))
        summary[f"rl_seconds_{method}"] = last["rl_seconds"]
        print(f"[sdar demo] held-out success after {method} RL ({cfg.train.steps} steps): "
              f"{summary[f'success_after_{method}']:.3f}", flush=True)
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["main_process_cpu_seconds"] = time.process_time() - c_start  # load-independent cost
    summary["outputs"] = output_paths(run_dir, summary["rl_methods"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return summary


def _probe(cfg: TrainConfig, run_dir: Path, env: Any, eval_env: Any, student_success: float) -> dict[str, float]:
    """``probe_teacher`` on the warm-started weights (their greedy eval reused), to teacher_probe.json."""
    from sdar_engine.teacher_probe import probe_teacher

    probe = probe_teacher(cfg, None, env, eval_env, student_success=student_success)
    (run_dir / "teacher_probe.json").write_text(json.dumps(probe, indent=2))
    print(f"[sdar demo] teacher probe before RL: student {probe['student_success']:.3f}, teacher with skills "
          f"{probe['teacher_success']:.3f}, gap_mean_expert {probe['gap_mean_expert']:+.4f} nats/token, "
          f"gate_mean_expert {probe['gate_mean_expert']:.3f}", flush=True)
    return probe


def _eval_only(cfg: TrainConfig, run_dir: Path, env: Any, eval_env: Any) -> dict[str, float]:
    trainer = Trainer(cfg, run_dir, env=env, eval_env=eval_env)
    metrics = trainer.evaluate()
    trainer.logger.log(0, metrics)
    trainer.logger.close()
    return metrics


def output_paths(run_dir: Path, methods: list[str]) -> dict[str, str]:
    """What a user opens after the demo, by label, for the files that exist (run order)."""
    paths = {"summary": run_dir / "summary.json", "config": run_dir / "config.json",
             "warm-start model": run_dir / "model_warmstart", "warm-start stats": run_dir / "warmstart.json"}
    for m in methods:
        paths.update({f"{m} curves": run_dir / m / "curves.png", f"{m} metrics": run_dir / m / "metrics.jsonl",
                      f"{m} checkpoints": run_dir / m / "checkpoints"})
    return {label: str(p) for label, p in paths.items() if p.exists() or label == "summary"}  # written last


def success_keys(summary: dict[str, Any]) -> list[str]:
    """The ``success_*`` keys in run order: untrained, warm-start, then each RL method as it ran."""
    order = ["success_untrained", "success_warmstart"]
    order += [f"success_after_{m}" for m in summary.get("rl_methods", [])]
    order += [k for k in summary if k.startswith("success_") and k not in order]  # anything else, as inserted
    return [k for k in order if k in summary]


def format_summary(summary: dict[str, Any]) -> str:
    """The closing lines: run dir, time, each stage's success with its win count (run order),
    and the path of every output a user wants (``summary["outputs"]``)."""
    n = int(summary["eval_tasks"])
    lines = [f"[sdar demo] run dir: {summary['run_dir']}  ({summary['total_seconds'] / 60:.1f} min wall, "
             f"{summary['main_process_cpu_seconds'] / 60:.1f} min CPU in the main process)",
             f"[sdar demo] held-out {summary['env']} success over {n} games:"]
    for key in success_keys(summary):
        lines.append(f"[sdar demo]   {key[len('success_'):]:<16} {summary[key]:.3f}  ({round(summary[key] * n)}/{n} won)")
    for label, path in summary.get("outputs", {}).items():
        lines.append(f"[sdar demo] {label + ':':<20} {path}")
    return "\n".join(lines)
