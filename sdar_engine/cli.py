"""The ``sdar`` command: train, eval, demo, study, bench.

    sdar train --config alfworld_qwen2.5-3b.yaml --set algo.method=sdar --set train.steps=150
    sdar train --config tiny_alfworld.yaml --output runs/x --resume
    sdar eval  --config tiny_alfworld.yaml --set model.path=runs/x/model_warmstart
    sdar demo  [--compare] [--output DIR]
    sdar study [--config C] [--methods grpo,sdar,grpo_opsd] [--seeds 3] [--out DIR]   (rerun to resume)
    sdar bench [args...]        (delegates to the benchmarks package)
    torchrun --nproc_per_node=K $(which sdar) train --config ...   (K ranks, one run)

Arguments are parsed before any env is built (the ALFWorld planner rewrites ``sys.argv``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from sdar_engine.extras import missing_extra_message
from sdar_engine.progress import quiet_library_bars

log = logging.getLogger("sdar.cli")


def _add_config_args(p: argparse.ArgumentParser, default_config: str | None) -> None:
    p.add_argument("--config", default=default_config,
                   help="YAML file, or the name of a packaged config in sdar_engine/configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set algo.method=grpo (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdar", description="SDAR training engine")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="RL training run (GRPO / SDAR / baselines)")
    _add_config_args(train, None)  # required, checked in cmd_train (the error lists the packaged configs)
    train.add_argument("--output", default=None, help="run directory (default: train.output_dir or runs/<time>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    ev = sub.add_parser("eval", help="held-out success of a model")
    _add_config_args(ev, None)
    ev.add_argument("--output", default=None, help="where the eval metrics go")
    ev.add_argument("--tasks", type=int, default=None, help="number of test tasks (default env.eval_tasks)")
    demo = sub.add_parser("demo", help="tiny model + offline ALFWorld: warm-start then SDAR RL (CPU)")
    _add_config_args(demo, "tiny_alfworld_demo.yaml")
    demo.add_argument("--output", default=None, help="run directory (default runs/demo-<time>)")
    demo.add_argument("--compare", action="store_true", help="also run GRPO from the same warm-start and seed")
    demo.add_argument("--skip-untrained", action="store_true", help="skip the untrained-model eval")
    study = sub.add_parser("study", help="methods x RL seeds on one config: bootstrap table, curves, provenance")
    _add_config_args(study, "tiny_alfworld_demo.yaml")
    study.add_argument("--methods", default="grpo,sdar,grpo_opsd", help="comma list of algo.method values")
    study.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a comma list of RL seeds")
    study.add_argument("--out", "--output", dest="output", default=None,
                       help="study directory (default runs/study-<time>); rerun with the same one to resume")
    study.add_argument("--warmstart-per-seed", action="store_true",
                       help="a warm-start per seed instead of one shared by all runs")
    study.add_argument("--bootstrap-resamples", type=int, default=10_000, help="bootstrap resamples per interval")
    study.add_argument("--bootstrap-seed", type=int, default=0, help="RNG seed of the bootstrap")
    study.add_argument("--no-plot", action="store_true", help="skip the learning-curve plot (no matplotlib needed)")
    bench = sub.add_parser("bench", help="kernel / engine benchmarks (delegates to benchmarks/)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _setup_logging(level: str) -> None:
    where = f"rank{os.environ.get('RANK', '0')} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s {where}%(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    """One run on this process, or on every rank of a torchrun job (rank 0 builds what is shared:
    the run directory, the tiny model / warm start, the env's game cache first)."""
    from sdar_engine.config import load_config
    from sdar_engine.demo import prepare_policy
    from sdar_engine.distributed import barrier, broadcast_object, cleanup, init_distributed
    from sdar_engine.trainer import Trainer, default_run_dir, make_env

    cfg = load_config(_train_config_path(args.config), args.overrides)
    rank, world, _ = init_distributed(cfg.train.device, cpu_offload=cfg.model.fsdp_cpu_offload)
    run_dir = Path(broadcast_object(str(args.output or cfg.train.output_dir or default_run_dir())))
    if args.resume and not run_dir.is_dir():
        raise ValueError(f"--resume: run directory {str(run_dir)!r} does not exist; pass --output DIR")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    env = make_env(cfg, "train") if rank == 0 else None
    barrier()  # rank 0 built any game cache; the others read it
    env = env if env is not None else make_env(cfg, "train")
    start = _built_start_model(run_dir) if args.resume else None
    if start is not None:  # resumed: the start model (ref-KL anchor) was built by the first run
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(start)))
    elif cfg.model.path is None or cfg.warmstart.enabled:
        cfg = broadcast_object(prepare_policy(cfg, run_dir, env) if rank == 0 else None)
    trainer = Trainer(cfg, run_dir, resume=args.resume, env=env)
    last = trainer.fit()
    if rank == 0:
        print(f"[sdar train] run dir {run_dir}: step {trainer.step} ranks {world} "
              f"success {last.get('success', float('nan')):.3f} "
              f"held-out {last.get('eval/success', float('nan')):.3f}", flush=True)
        for name in ("metrics.jsonl", "curves.png", "checkpoints"):
            if (run_dir / name).exists():
                print(f"[sdar train] {name + ':':<15} {run_dir / name}", flush=True)
    cleanup()
    return 0


def _train_config_path(config: str | None) -> str | None:
    """``--config`` of ``sdar train``: required (a silent 150-step run on the built-in defaults
    surprised users); ``--config defaults`` asks for the built-in defaults explicitly (None)."""
    from sdar_engine.config import PACKAGE_CONFIG_DIR

    if config == "defaults":
        return None
    if not config:
        avail = ", ".join(sorted(p.name for p in PACKAGE_CONFIG_DIR.glob("*.yaml")))
        raise ValueError("--config is required: a YAML file or a packaged config, one of: " + avail +
                         " (e.g. sdar train --config tiny_alfworld.yaml); --config defaults runs the "
                         "built-in defaults (150 steps, a tiny model built from scratch)")
    return config


def _built_start_model(run_dir: Path) -> Path | None:
    """The start model a previous ``sdar train`` built in ``run_dir`` (warm-started first)."""
    for name in ("model_warmstart", "model_init"):
        if (run_dir / name / "config.json").is_file():
            return run_dir / name
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from sdar_engine.config import load_config
    from sdar_engine.trainer import Trainer, default_run_dir

    cfg = load_config(None if args.config == "defaults" else args.config, args.overrides)
    if cfg.model.path is None:
        raise ValueError("sdar eval needs --set model.path=DIR (a local HF model directory)")
    trainer = Trainer(cfg, Path(args.output or default_run_dir(tag="eval")))
    metrics = trainer.evaluate(n_tasks=args.tasks)
    trainer.logger.log(0, metrics)
    for key, value in sorted(metrics.items()):
        print(f"[sdar eval] {key} {value:.4f}", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sdar_engine.config import load_config
    from sdar_engine.demo import run_demo

    cfg = load_config(args.config, args.overrides)
    run_demo(cfg, output=args.output, compare=args.compare, eval_untrained=not args.skip_untrained)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from sdar_engine.config import load_config
    from sdar_engine.study import parse_methods, parse_seeds, run_study

    cfg = load_config(args.config, args.overrides)
    run_study(cfg, out=args.output, methods=parse_methods(args.methods), seeds=parse_seeds(args.seeds),
              warmstart_per_seed=args.warmstart_per_seed, resamples=args.bootstrap_resamples,
              bootstrap_seed=args.bootstrap_seed, plot=not args.no_plot)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sdar_benchmarks.cli import main as bench_main  # benchmarks/, installed as sdar_benchmarks

    return int(bench_main(list(args.args)) or 0)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "study": cmd_study, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdar`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the benchmarks CLI, options too
        args = argparse.Namespace(command="bench", args=argv[1:], log_level="INFO")
    else:
        args = build_parser().parse_args(argv)
    missing = missing_extra_message(args.command)
    if missing:  # before any work, not minutes into a run (sdar_engine/extras.py)
        print(missing, file=sys.stderr, flush=True)
        return 2
    _setup_logging(getattr(args, "log_level", "INFO"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_bars()  # no transformers / hub bars in a log file
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:  # bad config / input: one clear line, no traceback
        print(f"sdar {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2
