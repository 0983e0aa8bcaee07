"""One validated dataclass tree for a training run: YAML file + ``--set a.b=value`` overrides.

``TrainConfig`` holds the sections model / env / rollout / algo / optim / train / warmstart.
Every unknown key or invalid value raises ``ValueError`` naming the dotted key, the value and
what is valid, before any model, env or file is touched.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sdar_engine.distributed import DEVICES
from sdar_engine.model import ModelConfig
from sdar_engine.optim import OptimConfig
from sdar_envs.prompts import PROMPT_STYLES, THINK_STYLES
from sdar_envs.skills import RETRIEVALS

METHODS = ("grpo", "sdar", "grpo_opsd", "opsd", "skill_sd", "rlsd")
ADVANTAGES = ("grpo", "drgrpo", "gigpo")
ENV_NAMES = ("alfworld", "webshop", "searchqa")
BACKENDS = ("hf", "vllm")
SAMPLE_MODES = ("step", "trajectory")  # algo.sample_mode: one sample per env step, or per episode
# model.dtype / model.attn choices live in model.py (DTYPES, ATTNS), train.device's in distributed.py
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class EnvConfig:
    """Which environment suite and how a step's batch of B tasks x G copies is drawn."""

    name: str = "alfworld"
    seed: int = 0
    options: dict = field(default_factory=dict)  # passed to the suite (e.g. room size)
    history_length: Optional[int] = None    # (obs, action) pairs in the prompt; None = suite default
    invalid_penalty: Optional[float] = None  # subtracted from an invalid step's reward; None = suite default
    retrieval: str = "keyword"       # teacher skill retrieval
    skill_top_k: int = 3
    tasks_per_step: int = 16         # B
    group_size: int = 8              # G
    eval_tasks: int = 0              # held-out tasks per eval; 0 = the whole test split
    num_workers: Optional[int] = None       # env worker processes; None = suite default
    prompt_style: str = "verl-agent"  # or "compact": task, last k actions, observation, actions
    expert_think: str = "plan"        # warm-start expert's <think>: a one-line plan, or "empty"


@dataclass
class RolloutConfig:
    """Generation settings; temperatures are the softmax temperature (1.0 = the raw policy)."""

    backend: str = "hf"
    max_new_tokens: int = 512
    max_prompt_tokens: int = 2048    # longer prompts keep their last tokens
    temperature: float = 1.0
    top_p: float = 1.0
    eval_temperature: float = 0.4
    gen_batch: int = 0               # prompts per generate call; 0 = all at once
    max_turns: int = 0               # env steps per episode; 0 = the env's own cap
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {enable_thinking: false} (Qwen3)
    # backend "vllm" only (sdar_engine/vllm_backend.py):
    vllm_gpu_memory_utilization: float = 0.5  # GPU fraction vLLM takes while awake (weights + KV cache)
    vllm_sleep_level: int = 1        # after each rollout: 1 offload weights, 2 drop them, 0 never sleep
    vllm_max_model_len: int = 0      # 0 = max_prompt_tokens + max_new_tokens
    vllm_dtype: str = "bfloat16"     # serving dtype: auto | bfloat16 | float16 | float32
    vllm_enforce_eager: bool = False  # true: no CUDA graphs (faster start, slower decode)


@dataclass
class AlgoConfig:
    """Method (loss preset), advantage estimator and update schedule.

    PPO schedule (verl's ppo_mini_batch_size / ppo_epochs, counted in step samples): each epoch
    splits a seeded permutation of the step's N samples (over all ranks) into ceil(N / size)
    near-equal mini-batches, one optimizer step each; old log-probs are those of the rollout
    weights, so only the first mini-batch of the first epoch is exactly on-policy (ratio 1).
    ``max_tokens`` bounds each packed micro-batch inside a mini-batch (gradient accumulation).
    """

    method: str = "sdar"
    loss: dict = field(default_factory=dict)  # LossConfig overrides, e.g. {sd_coef: 0.01}
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    step_advantage_w: float = 1.0    # GiGPO only
    gamma: float = 0.95              # GiGPO discount
    max_tokens: int = 8192           # token budget of one packed micro-batch (per rank)
    ppo_mini_batch_size: int = 0     # step samples per optimizer step (all ranks); 0 = the whole batch
    ppo_epochs: int = 1              # passes over the step's samples (each pass: its mini-batches)
    rlsd_decay_steps: int = 0        # RLSD weight -> 0 linearly over this many steps; 0 = train.steps
    # Memory guard (docs/memory_levers.md): > 0 measures the update's per-token memory with a probe
    # at start-up and lowers the micro-batch budget (max_tokens stays its ceiling) so one
    # micro-batch's peak fits this many GiB (CUDA: allocated; CPU: process RSS). 0 = off.
    max_memory_gb: float = 0.0
    # "step": one sample per env step (prompt with a history window + response); "trajectory": one
    # per episode, all turns as one growing conversation, observations masked from the loss
    # (docs/trajectory_samples.md). ppo_mini_batch_size then counts episodes.
    sample_mode: str = "step"


@dataclass
class RunConfig:
    """Run length, seeding, output and logging."""

    steps: int = 150
    seed: int = 0
    output_dir: str = ""             # "" = a fresh runs/<timestamp> directory
    save_every: int = 50
    eval_every: int = 0              # 0 = eval only at the end
    device: str = "auto"
    plot: bool = True
    tensorboard: bool = True
    keep_checkpoints: int = 2
    log_episodes: bool = False       # episodes.jsonl: every step sample's action, reward and rank


@dataclass
class WarmstartConfig:
    """Supervised warm-start on expert trajectories before RL (cross-entropy on responses)."""

    enabled: bool = False
    episodes: int = 64               # expert episodes collected from the train split
    epochs: int = 2
    lr: float = 1e-3
    max_tokens: int = 4096
    batch_samples: int = 32          # step samples per optimizer step
    noise: float = 0.0               # DART: P(an expert step executes a random action instead)
    teacher_prompts: bool = False    # also train on the skill-prefixed (teacher) prompt of each step
    # with teacher_prompts: the student-prompt samples come from an expert searching this way instead
    # (env.options.expert_search values, e.g. "handcoded" while the env's expert reads the skills'
    # "prior"): the student imitates an expert that does not know where objects lie, the skill-prefixed
    # samples one that does. None: both from the env's own expert (the same actions).
    student_expert_search: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_config(self, step: int = 0):
        """The ``sdar_kernels.LossConfig`` of ``algo.method`` at ``step`` (RLSD weight decayed)."""
        return loss_config_for(self, step)


CHOICES: dict[str, tuple] = {
    "env.name": ENV_NAMES, "env.retrieval": RETRIEVALS, "rollout.backend": BACKENDS,
    "algo.method": METHODS, "algo.advantage": ADVANTAGES, "train.device": DEVICES,
    "env.prompt_style": PROMPT_STYLES, "env.expert_think": THINK_STYLES, "algo.sample_mode": SAMPLE_MODES,
}
POSITIVE = ("env.tasks_per_step", "env.group_size", "rollout.max_new_tokens",
            "rollout.max_prompt_tokens", "algo.max_tokens", "algo.ppo_epochs",
            "train.save_every", "warmstart.epochs", "warmstart.max_tokens",
            "warmstart.batch_samples", "train.keep_checkpoints")
NON_NEGATIVE = ("env.history_length", "env.invalid_penalty", "env.eval_tasks", "env.num_workers",
                "env.skill_top_k", "rollout.gen_batch", "rollout.max_turns", "rollout.eval_temperature",
                "algo.step_advantage_w", "algo.rlsd_decay_steps", "algo.ppo_mini_batch_size", "train.steps",
                "train.eval_every", "warmstart.episodes", "algo.adv_eps")


# Keys that existed once, and what replaced them (an old YAML gets told, not just rejected).
RENAMED = {"algo.mini_batches": "algo.ppo_mini_batch_size (step samples per optimizer step; "
                                "0 = the whole batch) and algo.ppo_epochs"}


def _fail(key: str, value: Any, valid: str) -> None:
    raise ValueError(f"config {key}={value!r} is invalid; valid: {valid}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint (int/float/bool/str/dict/tuple/Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        return dict(value)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "a list")
        return tuple(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys by dotted name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix, data, f"a mapping with keys {[f.name for f in dataclasses.fields(cls)]}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    renamed = [k for k in unknown if f"{prefix}.{k}" in RENAMED]
    if renamed:
        key = f"{prefix}.{renamed[0]}"
        raise ValueError(f"config key '{key}' was renamed: use {RENAMED[key]}")
    if unknown:
        where = f" under '{prefix}'" if prefix else ""
        raise ValueError(f"unknown config key '{prefix + '.' if prefix else ''}{unknown[0]}'; "
                         f"valid keys{where}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, value, hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config section '{prefix or 'root'}': {err}") from err


def _get(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name, None)


def validate(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Check choices, ranges, the loss preset and (optionally) the model directory."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in choices:
            _fail(key, value, "one of " + ", ".join(choices))
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not value > 0:
            _fail(key, value, "a number > 0")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if value is not None and value < 0:
            _fail(key, value, "a number >= 0")
    for key in ("rollout.temperature", "rollout.top_p"):
        value = _get(cfg, key)
        if not 0 < value <= (1.0 if key.endswith("top_p") else 100.0):
            _fail(key, value, "in (0, 1]" if key.endswith("top_p") else "a number > 0")
    if not isinstance(cfg.warmstart.teacher_prompts, bool):
        _fail("warmstart.teacher_prompts", cfg.warmstart.teacher_prompts, "true or false")
    if cfg.warmstart.student_expert_search is not None:
        if not cfg.warmstart.teacher_prompts:
            _fail("warmstart.student_expert_search", cfg.warmstart.student_expert_search,
                  "null unless warmstart.teacher_prompts is true (it labels the student half of those samples)")
        if not isinstance(cfg.warmstart.student_expert_search, str) or not cfg.warmstart.student_expert_search:
            _fail("warmstart.student_expert_search", cfg.warmstart.student_expert_search,
                  "null or an env.options.expert_search value such as 'handcoded'")
    if not 0.0 <= cfg.warmstart.noise < 1.0:
        _fail("warmstart.noise", cfg.warmstart.noise, "a probability in [0, 1)")
    if not 0.0 <= cfg.algo.gamma <= 1.0:
        _fail("algo.gamma", cfg.algo.gamma, "a number in [0, 1]")
    _validate_vllm(cfg)
    _validate_memory_levers(cfg)
    _validate_sample_mode(cfg)
    try:
        loss_config_for(cfg, 0)
    except ValueError as err:
        raise ValueError(f"config algo.loss / algo.method: {err}") from err
    if check_paths:
        check_model_dir(cfg.model)
    return cfg


def _validate_sample_mode(cfg: TrainConfig) -> None:
    """Trajectory samples have no per-step anchors: GiGPO's step groups do not exist."""
    if cfg.algo.sample_mode == "trajectory" and cfg.algo.advantage == "gigpo":
        raise ValueError("config algo.advantage='gigpo' is invalid with algo.sample_mode='trajectory': "
                         "GiGPO needs one sample per env step; use algo.advantage grpo or drgrpo, or "
                         "algo.sample_mode step")


def _validate_memory_levers(cfg: TrainConfig) -> None:
    """Offload levers need a GPU to offload from; the guard needs a non-negative cap."""
    if cfg.algo.max_memory_gb < 0:
        _fail("algo.max_memory_gb", cfg.algo.max_memory_gb, "0 (off) or a number of GiB > 0")
    for key in ("model.activation_offload", "model.fsdp_cpu_offload"):
        if _get(cfg, key) and cfg.train.device == "cpu":
            raise ValueError(f"config {key}=true is invalid with train.device='cpu': on the CPU tensors already "
                             f"live in host memory; set {key}=false or train.device to auto / cuda")


def _validate_vllm(cfg: TrainConfig) -> None:
    """The rollout.vllm_* keys; backend vllm without vLLM installed names the [vllm] extra."""
    from sdar_engine.vllm_backend import DTYPES, MISSING_VLLM, SLEEP_LEVELS, vllm_installed

    r = cfg.rollout
    if not 0.0 < r.vllm_gpu_memory_utilization <= 1.0:
        _fail("rollout.vllm_gpu_memory_utilization", r.vllm_gpu_memory_utilization, "a fraction in (0, 1]")
    if r.vllm_sleep_level not in SLEEP_LEVELS:
        _fail("rollout.vllm_sleep_level", r.vllm_sleep_level, "one of 0, 1, 2")
    if r.vllm_dtype not in DTYPES:
        _fail("rollout.vllm_dtype", r.vllm_dtype, "one of " + ", ".join(DTYPES))
    if r.vllm_max_model_len < 0:
        _fail("rollout.vllm_max_model_len", r.vllm_max_model_len, "0 (prompt + response cap) or a length > 0")
    if r.backend == "vllm" and cfg.train.device == "cpu":
        _fail("rollout.backend", "vllm", "hf with train.device=cpu (vLLM serves on CUDA; use train.device auto or cuda)")
    if r.backend == "vllm" and not vllm_installed():
        raise ValueError(MISSING_VLLM)


def check_model_dir(model_cfg: Any) -> None:
    """A set ``model.path`` must be a local HF directory (config.json, safetensors, tokenizer)."""
    from sdar_engine.model import check_model_dir as _check_dir

    path = getattr(model_cfg, "path", None)
    if not path:
        return  # the tiny preset is built at run time
    try:
        _check_dir(os.path.expanduser(str(path)))
    except FileNotFoundError as err:
        raise ValueError(f"config model.path={str(path)!r} is invalid: {err}") from err


def loss_config_for(cfg: TrainConfig, step: int):
    """LossConfig.preset(algo.method, **algo.loss), temperature tied to the rollout's.

    RLSD's teacher weight decays linearly from its preset value to 0 over the decay horizon.
    """
    from sdar_kernels import LossConfig

    overrides = dict(cfg.algo.loss)
    overrides.setdefault("temperature", cfg.rollout.temperature)
    loss = LossConfig.preset(cfg.algo.method, **overrides)
    if loss.teacher_use == "rlsd":
        horizon = cfg.algo.rlsd_decay_steps or cfg.train.steps
        frac = max(0.0, 1.0 - step / horizon) if horizon > 0 else 0.0
        loss = loss.replace(rlsd_weight=loss.rlsd_weight * frac)
    return loss


def resolve_config_path(path: str) -> Path:
    """A path as given, else relative to the packaged ``sdar_engine/configs`` directory."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for cand in (PACKAGE_CONFIG_DIR / path, PACKAGE_CONFIG_DIR / p.name):
        if cand.is_file():
            return cand
    avail = sorted(x.name for x in PACKAGE_CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"config file {path!r} not found; packaged configs: {', '.join(avail)}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} is invalid; use --set section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ValueError(f"--set {item!r} is invalid; the key needs a section, e.g. algo.method=sdar")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted override into a copy of the raw mapping (validated later by ``_build``)."""
    out = _deep_copy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}


def from_dict(data: dict, overrides: list[str] | None = None, check_paths: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig from a raw mapping plus dotted overrides."""
    raw = apply_overrides(data or {}, list(overrides or []))
    return validate(_build(TrainConfig, raw, ""), check_paths=check_paths)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                check_paths: bool = True) -> TrainConfig:
    """Read YAML (a path or a packaged config name), apply overrides, validate."""
    data: dict = {}
    if path:
        p = resolve_config_path(str(path))
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of sections; got {type(data).__name__}")
    return from_dict(data, overrides, check_paths=check_paths)
