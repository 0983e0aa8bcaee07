"""`sdar study`: methods x RL seeds on one config, a paired comparison with bootstrap intervals.

Design (the paper's seeds are RL seeds from ONE pretrained model): one shared warm-start per
study (built with the config's ``train.seed``), unless ``warmstart_per_seed``; every (method,
seed) run starts from it with ``train.seed = seed``, which sets the RL task draws and sampling,
so runs of different methods with the same seed draw the same tasks at each step and are paired.
Every run has the same episode budget (train.steps x env.tasks_per_step x env.group_size) and is
evaluated on the same held-out task ids (``env.eval_tasks``, fixed for the study, recorded).

Run directory (``out``)::

    study.json               config + plan; a rerun with the same out must match its config
    provenance.json          config, methods, seeds, versions, git commit, task ids, machine, command
    warmstart/[seed_<s>/]    the warm-start (model, warmstart.json, eval) + done.json when complete
    runs/<method>/seed_<s>/  a Trainer run dir (metrics.jsonl, checkpoints) + done.json when finished
    table.md|csv|json, curves.png

Resumable: finished runs (done.json) are skipped, a half-finished run resumes from its latest
checkpoint (or restarts from scratch without one), a complete warm-start is reused.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from sdar_engine.config import METHODS, TrainConfig
from sdar_engine.metrics import read_metrics
from sdar_engine.trainer import Trainer, default_run_dir, eval_tasks, make_env

log = logging.getLogger("sdar.study")
DEFAULT_METHODS = ("grpo", "sdar", "grpo_opsd")
PLOT_EXTRA = "pip install 'sdar-engine[bench]' (or [dev]) for matplotlib, or pass --no-plot"
PREFIX = "[sdar study]"


def say(msg: str) -> None:
    """One greppable progress line on stdout."""
    print(f"{PREFIX} {msg}", flush=True)


def parse_methods(text: str) -> list[str]:
    """"grpo,sdar" -> ["grpo", "sdar"]; each must be a valid ``algo.method``, no repeats."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods {text!r}: {bad or 'empty'} not valid; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r} repeats a method")
    return methods


def parse_seeds(text: str) -> list[int]:
    """"3" -> [0, 1, 2] (N seeds); "0,5,9" -> those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give a count N >= 1 or a comma list of ints, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct seeds")
    return seeds


def check_plotting() -> None:
    """Raise ValueError (naming the extra) if matplotlib is missing: checked before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"the study plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from None


def evals_per_run(cfg: TrainConfig) -> int:
    """Held-out evals of one RL run: every train.eval_every steps before the last, plus the final one."""
    t = cfg.train
    return 1 + (len([k for k in range(1, t.steps) if k % t.eval_every == 0]) if t.eval_every else 0)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically (a kill never leaves half a marker)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class StudyTrainer(Trainer):
    """A Trainer that reports each finished step to ``on_step(step, metrics)``."""

    on_step: Callable[[int, dict], None] | None = None

    def train_step(self, step: int) -> dict[str, float]:
        metrics = super().train_step(step)
        if self.on_step is not None:
            self.on_step(step, metrics)
        return metrics


def close_envs(*envs: Any) -> None:
    """Stop the envs' worker processes (each run makes its own envs: no state carries over)."""
    for env in envs:
        if hasattr(env, "close"):
            env.close()


# ---------------------------------------------------------------------------- warm-start
def warm_start_once(cfg: TrainConfig, wdir: Path) -> dict[str, Any]:
    """The warm-start of ``cfg`` in ``wdir`` (reused if its done.json exists), its held-out eval
    and the teacher probe if available. Returns the done record (model path relative to wdir when
    the warm-start built it, else ``model.path`` as given)."""
    from sdar_engine.demo import prepare_policy

    marker = wdir / "done.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        say(f"warm-start reused: {wdir} (held-out success {rec['eval']['eval/success']:.3f})")
        return rec
    if wdir.exists():
        shutil.rmtree(wdir)  # an unfinished warm-start: start it over
    wdir.mkdir(parents=True)
    t0 = time.perf_counter()
    env, eval_env = make_env(cfg, "train"), make_env(cfg, "test")
    wcfg = prepare_policy(cfg, wdir, env)
    built = time.perf_counter() - t0
    trainer = Trainer(wcfg, wdir / "eval", env=env, eval_env=eval_env)
    t1 = time.perf_counter()
    ev = trainer.evaluate()
    eval_seconds = time.perf_counter() - t1
    trainer.logger.log(0, ev)
    trainer.logger.close()
    path = Path(wcfg.model.path)
    inside = path.exists() and path.resolve().is_relative_to(wdir.resolve())
    rec = {"model_path": os.path.relpath(path.resolve(), wdir.resolve()) if inside else str(wcfg.model.path),
           "model_in_study": inside,  # a path relative to the warm-start dir (the study dir may move)
           "eval": ev, "eval_seconds": eval_seconds, "warmstart_seconds": built,
           "teacher_probe": _teacher_probe(wcfg, trainer, env, eval_env, ev)}
    close_envs(env, eval_env)
    _write_json(marker, rec)
    say(f"warm-start done in {built / 60:.1f} min: held-out success {ev['eval/success']:.3f}, "
        f"eval of {len(eval_tasks(eval_env.task_ids, cfg.env.eval_tasks))} games {eval_seconds:.1f} s")
    return rec


def _teacher_probe(cfg: TrainConfig, trainer: Trainer, env: Any, eval_env: Any,
                   ev: dict[str, float]) -> dict | None:
    """``sdar_engine.teacher_probe.probe_teacher`` (student vs teacher before RL) when present;
    a greedy warm-start eval (``ev``) stands in for its student rollout."""
    try:
        from sdar_engine.teacher_probe import probe_teacher  # type: ignore[import-not-found]
    except ImportError:
        return None
    t0 = time.perf_counter()
    try:
        greedy = cfg.rollout.eval_temperature == 0
        out = dict(probe_teacher(cfg, trainer.model, env, eval_env, tokenizer=trainer.tokenizer,
                                 backend=trainer.backend, student_success=ev["eval/success"] if greedy else None))
    except Exception as err:  # a probe failure must not cost the study; it is recorded instead
        log.warning("teacher probe failed: %r", err)
        return {"error": repr(err)}
    out = _jsonable(out)
    say(f"teacher probe ({time.perf_counter() - t0:.0f} s): {format_probe(out)}")
    return out


def format_probe(probe: dict) -> str:
    """``k=v`` pairs, floats to 3 decimals."""
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in probe.items())


# ---------------------------------------------------------------------------- one run
def run_record(metrics_path: Path, method: str, seed: int, cfg: TrainConfig) -> dict[str, Any]:
    """The done.json record of a finished run from its metrics.jsonl: curve, final, best."""
    evals: dict[int, dict[str, float]] = {}
    first_step = None
    for rec in read_metrics(metrics_path):
        if "eval/success" in rec:  # the last eval logged at a step wins (a resumed run may repeat one)
            evals[int(rec["step"])] = {k[len("eval/"):]: v for k, v in rec.items()
                                       if k == "eval/success" or k.startswith("eval/success/")}
        if rec.get("step") == 1 and "step_seconds" in rec:
            first_step = rec["step_seconds"]
    curve = [{"step": s, **evals[s]} for s in sorted(evals)]
    steps = cfg.train.steps
    if steps not in evals:
        raise RuntimeError(f"{metrics_path}: no held-out eval at the final step {steps}")
    best: dict[str, float] = {}
    for s, ev in evals.items():
        if s >= 1:
            for k, v in ev.items():
                best[k] = max(best.get(k, v), v)
    return {"method": method, "seed": seed, "steps": steps,
            "episodes": steps * cfg.env.tasks_per_step * cfg.env.group_size,
            "final": evals[steps], "best": best, "curve": curve, "first_step_seconds": first_step}


def run_one(cfg: TrainConfig, rdir: Path, warm_eval: dict[str, float],
            on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train one (method, seed) run in ``rdir`` (resuming from its checkpoint if any) and write
    its done.json. ``cfg`` already carries the method, seed and start model."""
    from sdar_engine.checkpoint import latest_checkpoint

    resume = rdir.is_dir() and latest_checkpoint(str(rdir)) is not None
    if not resume and rdir.exists():
        shutil.rmtree(rdir)  # started but never checkpointed: start over cleanly
    rdir.mkdir(parents=True, exist_ok=True)
    trainer = StudyTrainer(cfg, rdir, resume=resume, env=make_env(cfg, "train"), eval_env=make_env(cfg, "test"))
    trainer.on_step = on_step
    t = cfg.train
    resumed_from = trainer.step if resume else None
    if resume:
        say(f"resuming {rdir} from step {trainer.step}")
        logged = {r["step"] for r in read_metrics(trainer.logger.path) if "eval/success" in r}
        due = t.eval_every and trainer.step % t.eval_every == 0 and 0 < trainer.step < t.steps
        if due and trainer.step not in logged:  # killed between the checkpoint and its eval
            trainer.logger.log(trainer.step, trainer.evaluate())
    else:
        trainer.logger.log(0, warm_eval)  # the shared warm-start's eval is step 0 of every curve
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        close_envs(trainer.env, trainer._eval_env)
    rec = run_record(trainer.logger.path, cfg.algo.method, cfg.train.seed, cfg)
    rec["rl_seconds_this_session"] = time.perf_counter() - t0
    del trainer
    gc.collect()
    if torch.cuda.is_available():  # the next run loads its own model: give this one's memory back
        torch.cuda.empty_cache()
    rec["resumed_from_step"] = resumed_from
    _write_json(rdir / "done.json", rec)
    return rec


# ---------------------------------------------------------------------------- provenance
def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(cfg: TrainConfig, plan: dict[str, Any], eval_ids: list[str], command: str) -> dict[str, Any]:
    """What is needed to rerun the study and judge its numbers."""
    versions = {}
    for dist in ("torch", "transformers", "triton", "sdar-engine", "numpy", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    status = _git("status", "--porcelain")
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"command": command, "config": _jsonable(cfg.to_dict()), **plan, "versions": versions,
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "eval_task_ids": eval_ids, "machine": machine,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------- the study
def config_diff(old: dict, new: dict) -> list[str]:
    """``section.key: old -> new`` for every key whose value differs (a missing key shows as None)."""
    out = []
    for sec in sorted(set(old) | set(new)):
        a, b = old.get(sec) or {}, new.get(sec) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{sec}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


class _Clock:
    """Wall-time estimate from the first measured RL step, the time a run took to reach it (env
    workers, model load) and the warm-start's eval time."""

    def __init__(self, steps: int, evals: int, eval_seconds: float) -> None:
        self.steps, self.evals, self.eval_seconds = steps, evals, eval_seconds
        self.printed = False

    def first_step(self, step: int, seconds: float, setup: float, label: str, runs_left: int) -> None:
        if self.printed:
            return
        self.printed = True
        per_run = setup + self.steps * seconds + self.evals * self.eval_seconds
        left = (self.steps - step - 1) * seconds + self.evals * self.eval_seconds + (runs_left - 1) * per_run
        say(f"estimate: first RL step {seconds:.1f} s ({label}), run setup {setup:.1f} s, eval "
            f"{self.eval_seconds:.1f} s -> about {per_run / 60:.1f} min per run, {left / 60:.1f} min for the "
            f"{runs_left} runs left (wall, this machine; methods that score a teacher take longer per step)")


def run_study(cfg: TrainConfig, out: str | Path | None = None, methods: list[str] | None = None,
              seeds: list[int] | None = None, warmstart_per_seed: bool = False, resamples: int = 10_000,
              bootstrap_seed: int = 0, plot: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run (or continue) the study in ``out``; returns the table (also written there)."""
    from sdar_engine import study_report

    methods = list(methods or DEFAULT_METHODS)
    seeds = list(range(3)) if seeds is None else list(seeds)
    if plot:
        check_plotting()
    if resamples < 1:
        raise ValueError(f"--bootstrap-resamples must be >= 1, got {resamples}")
    out = Path(out) if out else default_run_dir(tag="study")
    out.mkdir(parents=True, exist_ok=True)
    conf = _jsonable(cfg.to_dict())
    plan = {"methods": methods, "seeds": seeds, "warmstart_per_seed": warmstart_per_seed,
            "warmstart_seed": None if warmstart_per_seed else cfg.train.seed,
            "bootstrap": {"resamples": resamples, "seed": bootstrap_seed, "level": 0.95}}
    t, e = cfg.train, cfg.env
    eval_env = make_env(cfg, "test")
    eval_ids = eval_tasks(eval_env.task_ids, e.eval_tasks)
    close_envs(eval_env)
    study_file = out / "study.json"
    if study_file.is_file():
        old = json.loads(study_file.read_text())
        if old["config"] != conf or old["warmstart_per_seed"] != warmstart_per_seed:
            what = (f"config ({', '.join(config_diff(old['config'], conf)[:6])})" if old["config"] != conf
                    else "--warmstart-per-seed")
            raise ValueError(f"{out} holds a study with a different {what}; rerun with the same --config/--set "
                             "(and --warmstart-per-seed) to continue it, or pass a new --out")
        if old.get("eval_task_ids", eval_ids) != eval_ids:
            raise ValueError(f"{out}: the env's held-out task ids changed since the study started (game cache or "
                             "generator changed?); its runs would not be comparable: pass a new --out")
        say(f"continuing the study in {out}")
    _write_json(study_file, {"config": conf, **plan, "eval_task_ids": eval_ids})

    command = command or " ".join(shlex.quote(a) for a in ["sdar", *sys.argv[1:]])
    prov = provenance(cfg, plan, eval_ids, command)
    if (out / "provenance.json").is_file():  # a resumed study: keep what the earlier sessions ran with
        old = json.loads((out / "provenance.json").read_text())
        keep = ("command", "versions", "git_commit", "git_dirty", "machine", "started_utc", "methods", "seeds")
        prov["previous_sessions"] = old.get("previous_sessions", []) + [{k: old.get(k) for k in keep}]
    _write_json(out / "provenance.json", prov)

    jobs = [(m, s) for s in seeds for m in methods]  # seed-major: a partial study still has pairs
    n_evals = evals_per_run(cfg)
    episodes = t.steps * e.tasks_per_step * e.group_size
    n_ws = len(seeds) if warmstart_per_seed else 1
    say(f"budget: {len(methods)} methods x {len(seeds)} seeds = {len(jobs)} runs; {t.steps} RL steps x "
        f"{e.tasks_per_step} tasks x {e.group_size} copies = {episodes} episodes per run "
        f"({len(jobs) * t.steps} steps, {len(jobs) * episodes} episodes in all); {n_evals} evals x "
        f"{len(eval_ids)} held-out games per run + {n_ws} warm-start eval(s) = "
        f"{(len(jobs) * n_evals + n_ws) * len(eval_ids)} eval games; out {out}")

    warm: dict[int | None, dict] = {}
    for key in (seeds if warmstart_per_seed else [None]):
        wcfg = cfg if key is None else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=key))
        wdir = out / "warmstart" / ("" if key is None else f"seed_{key}")
        warm[key] = warm_start_once(wcfg, wdir)
        warm[key]["dir"] = wdir
    for rec in warm.values():
        prov.setdefault("warmstart", []).append({k: v for k, v in rec.items() if k != "dir"} | {"dir": str(rec["dir"])})
    _write_json(out / "provenance.json", prov)

    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    pending = []
    for m, s in jobs:
        marker = out / "runs" / m / f"seed_{s}" / "done.json"
        if marker.is_file():
            runs[m][s] = json.loads(marker.read_text())
        else:
            pending.append((m, s))
    if len(pending) < len(jobs):
        say(f"{len(jobs) - len(pending)} of {len(jobs)} runs already finished: skipped")
    first_warm = next(iter(warm.values()))
    clock = _Clock(t.steps, n_evals, first_warm["eval_seconds"])
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="study runs", unit="run",
               disable=not sys.stderr.isatty())
    t_start = time.perf_counter()
    for i, (m, s) in enumerate(pending):
        w = warm[s if warmstart_per_seed else None]
        start = w["dir"] / w["model_path"] if w["model_in_study"] else w["model_path"]
        rtrain = dataclasses.replace(cfg.train, seed=s, output_dir="", plot=cfg.train.plot and plot)
        rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(start)),
                                   algo=dataclasses.replace(cfg.algo, method=m), train=rtrain)
        done_before = len(jobs) - len(pending) + i
        say(f"run {done_before + 1}/{len(jobs)}: {m} seed {s}")
        left = len(pending) - i
        t0 = time.perf_counter()
        on_step = lambda step, mt, lab=f"{m} seed {s}", left=left, t0=t0: clock.first_step(  # noqa: E731
            step, mt.get("step_seconds", 0.0), time.perf_counter() - t0 - mt.get("step_seconds", 0.0), lab, left)
        rec = run_one(rcfg, out / "runs" / m / f"seed_{s}", w["eval"], on_step)
        runs[m][s] = rec
        bar.update(1)
        elapsed = time.perf_counter() - t_start
        eta = elapsed / (i + 1) * (len(pending) - i - 1)
        say(f"run {done_before + 1}/{len(jobs)} done: {m} seed {s} FINAL {rec['final']['success']:.3f} "
            f"BEST-SO-FAR {rec['best'].get('success', float('nan')):.3f} ({(time.perf_counter() - t0) / 60:.1f} min; "
            f"about {eta / 60:.1f} min left)")
    bar.close()

    table = study_report.build_table(runs, methods, resamples, bootstrap_seed)
    header = [f"# sdar study: {cfg.env.name}, {', '.join(methods)} x seeds {seeds}",
              f"Budget per run: {t.steps} RL steps, {episodes} episodes; held-out games: {len(eval_ids)} "
              f"(same ids for every run, in provenance.json); warm-start: "
              + ("one per seed" if warmstart_per_seed else f"one shared (seed {cfg.train.seed})")]
    for key, w in warm.items():
        tag = "" if key is None else f" (seed {key})"
        header.append(f"Warm-start held-out success{tag}: {w['eval']['eval/success']:.3f}")
        if w.get("teacher_probe"):
            probe = {k: v for k, v in w["teacher_probe"].items() if not k.endswith("_seconds")}
            header.append(f"Teacher probe before RL{tag} (held-out games): {format_probe(probe)}")
    paths = study_report.write_tables(out, table, header)
    if plot:
        paths.append(study_report.plot_curves(runs, methods, out / "curves.png",
                                              f"{cfg.env.name}: held-out success vs RL step", resamples,
                                              bootstrap_seed))
    print(study_report.to_markdown(table, header), flush=True)
    for p in paths:
        say(f"wrote {p}")
    return table
