"""vLLM rollout backend (``rollout.backend: vllm``, installed by the ``[vllm]`` extra).

Written against the public API of the pinned vLLM (``VLLM_PIN``), checked in its docs:

* ``vllm.LLM`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); under torchrun with more
  than one rank ``distributed_executor_backend="external_launcher"``, one engine per rank
  (tensor_parallel_size 1) serving that rank's share of the episodes.
* prompts are token ids (``vllm.inputs.TokensPrompt``), never re-tokenized text; one
  ``SamplingParams`` per prompt carrying its own ``seed``, so an episode's samples do not depend
  on which rank or batch served it.
* sleep mode shares the GPU with training: ``LLM.sleep(level)`` after the rollout frees the KV
  cache (and offloads, level 1, or drops, level 2, the weights); ``sync_weights`` wakes the
  weights alone (``wake_up(tags=["weights"])``), pushes the policy's weights through the
  model's own ``load_weights`` via ``LLM.apply_model``, then wakes the KV cache and resets the
  prefix cache (cached KV of the old weights must not be reused).

Pushed weights are the policy's ``named_parameters`` under their Hugging Face checkpoint names
(wrapper prefixes stripped, tied duplicates once), full tensors (FSDP2 shards gathered one
parameter at a time, on every rank in the same order), cast to the serving dtype.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import torch

from sdar_engine.rollout import stop_token_ids

log = logging.getLogger("sdar.vllm")

VLLM_PIN = "vllm==0.32.0"  # = setup.py's [vllm] extra
MISSING_VLLM = ("config rollout.backend='vllm' needs vLLM, which is not installed: install the [vllm] "
                f"extra (pip install -e '.[vllm]', pins {VLLM_PIN}; CUDA only), or set rollout.backend=hf")
SLEEP_LEVELS = (0, 1, 2)  # 0: no sleep mode (vLLM keeps its memory); 1: offload weights; 2: drop them
DTYPES = ("auto", "bfloat16", "float16", "float32")
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def vllm_installed() -> bool:
    """Whether ``import vllm`` can work, without importing it (importing vLLM takes seconds)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """ImportError naming the ``[vllm]`` extra when vLLM is missing."""
    if not vllm_installed():
        raise ImportError(MISSING_VLLM)


# ---------------------------------------------------------------------- request contract
def token_prompts(prompts_ids: Sequence[Sequence[int]]) -> list[Any]:
    """One ``TokensPrompt`` per prompt: its token ids, exactly as the trainer scores them."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompts_ids]


def sampling_params(n: int, max_new_tokens: int, temperature: float, top_p: float, stop_ids: Sequence[int],
                    stop: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[Any]:
    """``n`` ``SamplingParams``, one per prompt; prompt k gets ``seeds[k]`` (None: unseeded).

    ``temperature <= 0`` is greedy decoding (vLLM's temperature 0); top-k stays off, as in the
    HF backend, so both sample from the same temperature / top-p distribution.
    """
    from vllm import SamplingParams

    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries; expected one per prompt ({n})")
    greedy = temperature <= 0
    common = dict(n=1, max_tokens=int(max_new_tokens), temperature=0.0 if greedy else float(temperature),
                  top_p=1.0 if greedy else float(top_p), stop_token_ids=[int(t) for t in stop_ids],
                  stop=list(stop) if stop else None)
    return [SamplingParams(**common, seed=None if seeds is None else int(seeds[k])) for k in range(n)]


def trim_response(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Cut after the first end-of-turn token (kept); never empty (packing needs >= 1 token)."""
    tokens = [int(t) for t in tokens]
    for j, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: j + 1]
    return tokens or [int(eos_ids[0])]


# ---------------------------------------------------------------------- weight contract
def hf_weight_name(name: str) -> str:
    """A parameter name as the Hugging Face checkpoint spells it (torch.compile, activation
    checkpointing, FSDP1 and DDP wrapper segments removed)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def weight_stream(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter of ``model``, lazily, in ``named_parameters`` order.

    A DTensor (FSDP2 shard) is gathered with ``full_tensor()``, a collective: every rank must
    consume the stream in the same order. Tied parameters come once (``named_parameters``
    de-duplicates; vLLM ties them back from its config).
    """
    for name, param in model.named_parameters():
        t = param.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield hf_weight_name(name), (t if dtype is None else t.to(dtype))


def _load_into(model: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside the vLLM worker (``LLM.apply_model``): the model's own checkpoint loader."""
    loaded = model.load_weights(weights)
    return len(loaded) if loaded is not None else -1  # small result: apply_model returns it per worker


def engine_kwargs(model_path: str, *, dtype: str = "bfloat16", seed: int = 0, gpu_memory_utilization: float = 0.5,
                  sleep_level: int = 1, max_model_len: int = 0, enforce_eager: bool = False,
                  world_size: int = 1) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one engine per trainer rank."""
    if sleep_level not in SLEEP_LEVELS:
        raise ValueError(f"config rollout.vllm_sleep_level={sleep_level!r} is invalid; valid: one of 0, 1, 2")
    if dtype not in DTYPES:
        raise ValueError(f"config rollout.vllm_dtype={dtype!r} is invalid; valid: one of {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = dict(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=int(seed),
                                  tensor_parallel_size=1, gpu_memory_utilization=float(gpu_memory_utilization),
                                  enable_sleep_mode=sleep_level > 0, enforce_eager=bool(enforce_eager),
                                  enable_prefix_caching=True)
    if max_model_len:
        kwargs["max_model_len"] = int(max_model_len)
    if world_size > 1:  # torchrun started us: one in-process engine per rank, no worker processes
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def make_llm(**kwargs: Any) -> Any:
    """``vllm.LLM(**kwargs)`` in this process: ``apply_model`` then hands the weight stream over
    by reference instead of pickling it to an engine process."""
    require_vllm()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: weight sync needs the engine in-process",
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(**kwargs)


class VLLMBackend:
    """Generation through vLLM, sharing the GPU with training via sleep mode.

    Life cycle per training step: ``generate`` (wakes the engine if asleep) for every turn of
    the rollout -> ``sleep()`` before the scoring / update passes -> ``sync_weights(policy)``
    after the optimizer step. ``policy`` (the trained module) lets ``generate`` re-push the
    weights itself when a level-2 sleep dropped them and no sync came since.
    """

    def __init__(self, model_path: str, tokenizer: Any, *, policy: Any = None, dtype: str = "bfloat16",
                 seed: int = 0, gpu_memory_utilization: float = 0.5, sleep_level: int = 1,
                 max_model_len: int = 0, enforce_eager: bool = False, world_size: int = 1,
                 llm: Any = None) -> None:
        require_vllm()
        kwargs = engine_kwargs(model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                               sleep_level=sleep_level, max_model_len=max_model_len,
                               enforce_eager=enforce_eager, world_size=world_size)
        self.eos_ids = stop_token_ids(tokenizer)
        self.policy, self.sleep_level = policy, sleep_level
        self.dtype = None if dtype == "auto" else getattr(torch, dtype)
        t0 = time.perf_counter()
        self.llm = llm if llm is not None else make_llm(**kwargs)
        log.info("vllm engine up in %.1fs: %s", time.perf_counter() - t0,
                 {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")})
        self.asleep = False
        self.weights_dropped = False  # level-2 sleep discarded them: a push must precede generation
        self.pushes = 0

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, policy: Any = None, world_size: int = 1) -> "VLLMBackend":
        """The backend of a ``TrainConfig`` (serves ``model.path``; ``rollout.vllm_*`` keys)."""
        r = cfg.rollout
        return cls(str(cfg.model.path), tokenizer, policy=policy, dtype=r.vllm_dtype, seed=cfg.train.seed,
                   gpu_memory_utilization=r.vllm_gpu_memory_utilization, sleep_level=r.vllm_sleep_level,
                   max_model_len=r.vllm_max_model_len or r.max_prompt_tokens + r.max_new_tokens,
                   enforce_eager=r.vllm_enforce_eager, world_size=world_size)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, stop: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        """Sampled continuation ids per prompt (end-of-turn token kept), in prompt order."""
        if not prompts_ids:
            return []
        self.wake_up()
        params = sampling_params(len(prompts_ids), max_new_tokens, temperature, top_p, self.eos_ids, stop, seeds)
        outs = self.llm.generate(token_prompts(prompts_ids), sampling_params=params, use_tqdm=False)
        return [trim_response(o.outputs[0].token_ids, self.eos_ids) for o in outs]

    # ------------------------------------------------------------------ GPU sharing
    def sleep(self) -> None:
        """Free vLLM's GPU memory for the scoring and update passes (no-op at level 0)."""
        if self.sleep_level == 0 or self.asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_dropped = self.sleep_level == 2

    def wake_up(self) -> None:
        """Ready to generate: weights back (re-pushed from ``policy`` after a level-2 sleep), KV cache."""
        if not self.asleep:
            return
        if self.weights_dropped:
            if self.policy is None:
                raise RuntimeError("vLLM slept at level 2 (weights dropped) and no sync_weights(model) came "
                                   "since; call sync_weights or use rollout.vllm_sleep_level=1")
            self.sync_weights(self.policy)
            return
        _release_cached_gpu_memory()
        self.llm.wake_up()
        self.asleep = False

    def sync_weights(self, model: Any) -> int:
        """Push ``model``'s current weights into the engine; returns the number of tensors sent."""
        t0 = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # KV cache stays freed while the weights stream in
        sent = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal sent
            for item in weight_stream(model, self.dtype):
                sent += 1
                yield item

        self.llm.apply_model(functools.partial(_load_into, weights=counted()))
        if self.asleep:
            _release_cached_gpu_memory()
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights
        self.asleep = self.weights_dropped = False
        self.pushes += 1
        log.info("vllm weights synced: %d tensors in %.2fs (push %d)", sent, time.perf_counter() - t0, self.pushes)
        return sent


def _release_cached_gpu_memory() -> None:
    """Return PyTorch's cached blocks so vLLM can re-allocate its KV cache."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
