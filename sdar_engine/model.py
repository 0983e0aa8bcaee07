"""Policy models: load a local Hugging Face causal LM, build the tiny preset, trunk + lm_head.

A training step never asks the model for logits: ``trunk_hidden`` returns the last hidden
states of a packed stream and ``lm_head`` the output projection, and both go to the fused
loss kernel. ``head_forward`` runs trunk and a head function inside one (FSDP-registered)
forward so that sharded root parameters (embedding, final norm, lm_head) are gathered.

Precision: parameters (and so AdamW's state) are always float32 master weights, whatever the
checkpoint on disk holds. ``ModelConfig.dtype`` is the compute dtype: every forward of the
model - rollout generation, the old / teacher / reference scoring passes and the update - runs
under ``compute_autocast(model)``, the one autocast region defined here, so that on-policy the
scoring passes and the update see the same numbers.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

log = logging.getLogger("sdar_engine.model")

PRESETS = ("tiny",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTNS = ("auto", "flash", "sdpa", "eager")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ModelConfig:
    """Which model to load and how. ``path`` (a local HF directory) wins over ``preset``.

    ``dtype`` float32 runs without autocast; bfloat16 / float16 run every forward under
    torch.autocast of that dtype over float32 parameters (FSDP2: MixedPrecisionPolicy with
    that param dtype and float32 gradient reduction). float16 has no loss scaling: prefer bfloat16.
    tiny_* fields size the tiny Qwen2 preset: hidden width, decoder layers, attention heads,
    key/value heads, MLP width (0 = 4 x hidden) and the tokenizer's vocabulary upper bound.

    Memory levers (docs/memory_levers.md): ``grad_checkpointing`` recomputes every decoder layer
    in backward (non-reentrant, applied before FSDP2 shards); ``activation_offload`` keeps the
    update's saved activations in pinned host memory (``torch.autograd.graph.save_on_cpu``,
    CUDA only); ``fsdp_cpu_offload`` keeps parameters, gradients and optimizer state on the host
    between uses (FSDP2 ``CPUOffloadPolicy``; needs torchrun with more than one rank).
    """

    path: str | None = None
    preset: str = "tiny"
    dtype: str = "float32"      # compute dtype; parameters stay float32 (see the module docstring)
    attn: str = "auto"
    grad_checkpointing: bool = False
    activation_offload: bool = False
    fsdp_cpu_offload: bool = False
    trust_remote_code: bool = False
    tiny_hidden: int = 128
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate: int = 0
    tiny_vocab: int = 2048
    tiny_max_positions: int = 4096

    def __post_init__(self) -> None:
        _choice("preset", self.preset, PRESETS)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("attn", self.attn, ATTNS)
        for name in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} is invalid; expected an integer >= 1")
        if self.tiny_hidden % self.tiny_heads or self.tiny_heads % self.tiny_kv_heads:
            raise ValueError(
                f"ModelConfig.tiny_hidden={self.tiny_hidden}, tiny_heads={self.tiny_heads}, "
                f"tiny_kv_heads={self.tiny_kv_heads} are invalid; hidden must divide by heads "
                "and heads by kv_heads")
        if not isinstance(self.tiny_intermediate, int) or self.tiny_intermediate < 0:
            raise ValueError(f"ModelConfig.tiny_intermediate={self.tiny_intermediate!r} is invalid; "
                             "expected an integer >= 0 (0 = 4 x tiny_hidden)")
        if not isinstance(self.tiny_vocab, int) or self.tiny_vocab < 300:
            raise ValueError(f"ModelConfig.tiny_vocab={self.tiny_vocab!r} is invalid; expected an integer >= 300")


def _choice(field: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"ModelConfig.{field}={value!r} is invalid; valid choices: {', '.join(valid)}")


def build_tiny(out_dir: str, corpus: Iterable[str], cfg: ModelConfig, seed: int = 0) -> str:
    """Train the tokenizer on ``corpus``, build a seeded tiny Qwen2 and save both to ``out_dir``.

    The directory is a normal HF model dir (config.json, model.safetensors, tokenizer files,
    generation_config.json) that ``AutoModelForCausalLM.from_pretrained`` reloads. Returns it.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from .tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus, vocab_size=cfg.tiny_vocab)
    vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier matmul shapes; extra rows unused
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_kv_heads,
        intermediate_size=cfg.tiny_intermediate or 4 * cfg.tiny_hidden,
        max_position_embeddings=cfg.tiny_max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        rope_theta=10000.0, use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny Qwen2 at %s: %d params, vocab %d (tokenizer %d), hidden %d, layers %d",
             out_dir, n_params, vocab, len(tokenizer), cfg.tiny_hidden, cfg.tiny_layers)
    return out_dir


def check_model_dir(path: str) -> None:
    """Raise FileNotFoundError naming ``path`` and the expected files when it is no model dir."""
    expected = ("config.json, model.safetensors (or model.safetensors.index.json + shards), "
                "tokenizer.json or tokenizer_config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist; expected a local Hugging "
                                f"Face model directory holding {expected}")
    files = set(os.listdir(path))
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files.intersection(_WEIGHT_FILES):
        bins = sorted(f for f in files if f.endswith(".bin"))
        hint = f" (found {bins}: only safetensors are loaded)" if bins else ""
        missing.append("model.safetensors or model.safetensors.index.json" + hint)
    if not files.intersection(_TOKENIZER_FILES):
        missing.append("tokenizer.json or tokenizer_config.json")
    if missing:
        raise FileNotFoundError(f"model directory {path!r} is missing {'; '.join(missing)}; "
                                f"expected {expected}")


def resolve_attn(attn: str, device: torch.device | str) -> str:
    """Map ModelConfig.attn to a transformers attn_implementation for ``device``."""
    _choice("attn", attn, ATTNS)
    device = torch.device(device)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attn == "flash":
        if device.type != "cuda" or not has_flash:
            raise ValueError(f"ModelConfig.attn='flash' needs CUDA and the flash_attn package "
                             f"(device={device}, flash_attn installed={has_flash}); use 'auto' or 'sdpa'")
        return "flash_attention_2"
    if attn == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    return attn


def load_policy(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) from ``cfg.path`` (safetensors only) onto ``device``.

    Parameters are float32 (master weights) whatever the stored dtype; ``cfg.dtype`` becomes the
    model's compute dtype (``compute_autocast``). The model is in train mode, with gradient
    checkpointing when asked, and has ``head_forward`` attached. Raise FileNotFoundError for a
    missing/incomplete directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.path is None:
        raise ValueError("ModelConfig.path=None is invalid for load_policy; build a tiny model "
                         "first with build_tiny(out_dir, corpus, cfg) and pass its directory")
    check_model_dir(cfg.path)
    attn = resolve_attn(cfg.attn, device)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=torch.float32, attn_implementation=attn, use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code, local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.sdar_activation_offload = cfg.activation_offload  # read by memory_levers.activation_offload
    model.sdar_fsdp_cpu_offload = cfg.fsdp_cpu_offload      # read by distributed.wrap_fsdp
    model.train()
    attach_head_forward(model)
    set_compute_dtype(model, DTYPES[cfg.dtype])
    log.info("loaded %s (float32 parameters, %s compute, attn=%s, %d params) on %s", cfg.path, cfg.dtype, attn,
             sum(p.numel() for p in model.parameters()), device)
    return model, tokenizer


def decoder_layers(model: Any) -> list:
    """The decoder layers (``base_model.layers``): the unit of checkpointing and FSDP2 sharding."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no base_model.layers; expected a Llama/Qwen-style decoder")
    return list(layers)


def enable_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in backward (non-reentrant), whatever the transformers version.

    transformers' own switch is used where the model supports it (its layers flag
    ``gradient_checkpointing``); any decoder layer left unflagged (remote-code models without
    support) gets its ``forward`` wrapped in ``torch.utils.checkpoint`` here. Call before
    ``wrap_fsdp``: FSDP2's hooks then stay outside the recomputed region.
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as err:  # "does not support gradient checkpointing"
        log.info("transformers checkpointing unavailable for %s (%s); wrapping decoder layers",
                 type(model).__name__, err)
    wrapped = [_checkpoint_forward(layer) for layer in decoder_layers(model)
               if not getattr(layer, "gradient_checkpointing", False)]
    log.info("activation checkpointing on %d decoder layers (%d wrapped here, non-reentrant)",
             len(decoder_layers(model)), len(wrapped))


def _checkpoint_forward(layer: Any) -> Any:
    """Wrap ``layer.forward`` (an instance attribute: module hooks stay outside) in a
    non-reentrant checkpoint while training with grad enabled."""
    from torch.utils.checkpoint import checkpoint

    inner = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    layer.forward = forward
    layer.sdar_checkpointed = True
    return layer


def trunk_hidden(model: Any, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """Last hidden states of packed rows: input_ids/position_ids [R, L] -> hidden [R*L, H].

    Positions restart at 0 for every sample, and no attention mask is passed: transformers
    (>= 4.56, setup.py's floor) then builds the block-diagonal (per-sample causal) mask from the
    position resets, or flash-attn varlen uses them as cu_seqlens. No logits are computed.
    """
    if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                         "must both be [rows, length]")
    out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def lm_head(model: Any) -> tuple[Tensor, Tensor | None]:
    """The output projection (weight [V, H], bias [V] or None); tied to the embedding if so."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight, getattr(head, "bias", None)


HeadFn = Callable[[Tensor, Tensor, "Tensor | None"], Any]


def _head_forward(self: Any, input_ids: Tensor, position_ids: Tensor, fn: HeadFn) -> Any:
    hidden = trunk_hidden(self, input_ids, position_ids)
    weight, bias = lm_head(self)
    return fn(hidden, weight, bias)


def attach_head_forward(model: Any) -> None:
    """Give ``model`` a ``sdar_head_forward`` method (FSDP2 registers it as a forward).

    Re-attached when the method found is bound to another object (a copy made by
    ``copy.copy`` or pickling must never run the original model's forward)."""
    method = getattr(model, "sdar_head_forward", None)
    if method is None or getattr(method, "__self__", None) is not model:
        model.sdar_head_forward = types.MethodType(_head_forward, model)


def head_forward(model: Any, input_ids: Tensor, position_ids: Tensor, fn: HeadFn) -> Any:
    """Run ``fn(hidden [R*L, H], weight [V, H], bias)`` on the trunk's output in one forward.

    ``fn`` must return tensors / tuples / dicts of tensors (FSDP hooks its outputs for backward).
    Runs under ``compute_autocast(model)``; call backward outside it (as autocast wants).
    """
    attach_head_forward(model)
    with compute_autocast(model):
        return model.sdar_head_forward(input_ids, position_ids, fn)


def set_compute_dtype(model: Any, dtype: torch.dtype) -> None:
    """Record the dtype every forward of ``model`` computes in (``compute_autocast``)."""
    if dtype not in DTYPES.values():
        raise ValueError(f"compute dtype {dtype} is invalid; valid: {', '.join(map(str, DTYPES.values()))}")
    model.sdar_compute_dtype = dtype


def compute_dtype(model: Any) -> torch.dtype:
    """The compute dtype ``set_compute_dtype`` recorded; else the dtype of the first parameter."""
    dtype = getattr(model, "sdar_compute_dtype", None)
    return dtype if dtype is not None else next(model.parameters()).dtype


def compute_device(model: Any) -> torch.device:
    """Where ``model`` computes: the device ``wrap_fsdp`` recorded (parameters offloaded to the
    host still compute on the GPU), else that of the first parameter (its local shard)."""
    device = getattr(model, "sdar_compute_device", None)
    if device is not None:
        return device
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


def compute_autocast(model: Any) -> Any:
    """The one autocast region of every forward of ``model``: none for float32 compute, else
    torch.autocast(device type, compute dtype). Rollout generation, the old / teacher / ref
    scoring passes and the update all enter it, so they compute alike."""
    dtype = compute_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(compute_device(model).type, dtype=dtype)
