"""verl adapter (tested against verl==0.9.1): the fused log-prob/entropy forward and an ``sdar`` loss.

Importing this module (directly, through ``actor_rollout_ref.model.external_lib`` or through
``VERL_USE_EXTERNAL_MODULES``, both verl's own plugin hooks) registers:

- ``"sdar"`` in verl's policy-loss registry (``register_policy_loss``): verl's vanilla (or GSPO)
  policy loss plus the gated SDAR term ``lambda * Agg(sigmoid(beta (t - s)) (t - s))``, aggregated
  by verl's own ``agg_loss`` with the actor's ``loss_agg_mode`` and global batch info. verl's
  policy-loss signature has no slot for extra batch keys, so the teacher log-probs arrive as the
  keyword ``teacher_log_prob`` (``sdar_ppo_loss`` below passes it);
- ``"sdar"`` in verl's distillation registry (``register_distillation_loss``, estimator kind):
  the per-token gated term, read from ``data["teacher_logprobs"]`` like verl's own k1/k3
  distillation losses; verl aggregates it and adds ``distillation_loss_coef`` times it to its PPO
  loss. This is the route that runs inside verl's stock trainer without replacing its loss.

``sdar_ppo_loss`` is a drop-in for verl's actor loss function (``ppo_loss``, the callable a worker
takes through ``set_loss_fn``): verl's loss plus the SDAR term from ``data["teacher_log_probs"]``.

``install_fused_forward`` replaces a causal LM's forward with the one verl's
``use_fused_kernels`` expects (per-token ``log_probs`` and ``entropy``, temperature, rolled
``shift_labels``) computed by ``fused_linear_logprobs``: no [tokens x vocab] logits.

``loss_config_from_verl`` / ``verl_aggregation`` map verl's actor options to a ``LossConfig``
and normalizer so that ``fused_linear_sdar_loss`` computes the same loss straight from hidden
states (docs/integrations/verl.md lists every option).
"""
from __future__ import annotations

import dataclasses
import os
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

import verl
from verl.trainer.distillation.losses import (DISTILLATION_LOSS_REGISTRY, DistillationLossSettings,
                                              register_distillation_loss)
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, register_policy_loss
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from ..config import LossConfig
from ..loss import fused_linear_logprobs

VERL_VERSION = "0.9.1"
if verl.__version__ != VERL_VERSION:  # the registries' signatures are those of this version
    import warnings

    warnings.warn(f"sdar_kernels.integrations.verl is tested with verl=={VERL_VERSION}; found {verl.__version__}",
                  stacklevel=2)

# verl option name -> LossConfig.kl_type ("abs" and "full" have no equivalent)
KL_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
            "kl+": "k1+", "k1+": "k1+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+", "k3+": "k3+"}
BASE_LOSS_MODES = ("vanilla", "gspo")


# -- options of the SDAR term ------------------------------------------------------------------
@dataclass(frozen=True)
class SDAROptions:
    """The SDAR term's knobs. verl's config dataclasses take no extra keys, so they come from here:
    ``SDAR_VERL_SD_COEF`` (lambda, default 0.01), ``SDAR_VERL_GATE_BETA`` (beta, default 5),
    ``SDAR_VERL_BASE_LOSS`` (the policy loss under the term: vanilla or gspo) in the environment of
    every worker (Ray ``runtime_env.env_vars``), or ``configure(...)`` in-process."""

    sd_coef: float = 0.01
    gate_beta: float = 5.0
    base_loss_mode: str = "vanilla"

    def __post_init__(self) -> None:
        if self.base_loss_mode not in BASE_LOSS_MODES:
            raise ValueError(f"SDAROptions.base_loss_mode={self.base_loss_mode!r} is invalid; valid: "
                             f"{', '.join(BASE_LOSS_MODES)}")
        if not self.gate_beta >= 0:
            raise ValueError(f"SDAROptions.gate_beta={self.gate_beta!r} is invalid; expected a number >= 0")

    @classmethod
    def from_env(cls) -> "SDAROptions":
        return cls(sd_coef=float(os.environ.get("SDAR_VERL_SD_COEF", 0.01)),
                   gate_beta=float(os.environ.get("SDAR_VERL_GATE_BETA", 5.0)),
                   base_loss_mode=os.environ.get("SDAR_VERL_BASE_LOSS", "vanilla"))


_OPTIONS: Optional[SDAROptions] = None


def configure(**options: Any) -> SDAROptions:
    """Set the SDAR term's options in this process (over the environment's); returns them."""
    global _OPTIONS
    _OPTIONS = dataclasses.replace(current_options(), **options)
    return _OPTIONS


def current_options() -> SDAROptions:
    return _OPTIONS if _OPTIONS is not None else SDAROptions.from_env()


# -- the SDAR term on verl's padded [B, T] tensors ---------------------------------------------
def sdar_token_loss(log_prob: Tensor, teacher_log_prob: Tensor, gate_beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token g (t - s) with g = sigmoid(beta (t - s)) detached; gradient through s only.

    log_prob, teacher_log_prob: [B, T] (nats). Returns (loss [B, T], gate [B, T], gap [B, T])."""
    teacher = teacher_log_prob.detach().to(log_prob.dtype)
    gap = teacher - log_prob.detach()
    gate = torch.sigmoid(gate_beta * gap)
    return gate * (teacher - log_prob), gate, gap


def _gate_metrics(gate: Tensor, gap: Tensor, mask: Tensor) -> dict:
    """sdar/gate_mean and sdar/gap_mean over the response tokens (mask bool [B, T])."""
    count = mask.sum().clamp(min=1)
    return {"sdar/gate_mean": ((gate * mask).sum() / count).item(), "sdar/gap_mean": ((gap * mask).sum() / count).item()}


def _sdar_term(log_prob: Tensor, teacher_log_prob: Tensor, response_mask: Tensor, loss_agg_mode: str,
               global_batch_info: dict, options: SDAROptions) -> tuple[Tensor, dict]:
    if teacher_log_prob.shape != log_prob.shape:
        raise ValueError(f"teacher_log_prob must be [B, T]={tuple(log_prob.shape)} like log_prob; "
                         f"got {tuple(teacher_log_prob.shape)}")
    mask = response_mask.to(torch.bool)
    loss_mat, gate, gap = sdar_token_loss(log_prob, teacher_log_prob, options.gate_beta)
    sd = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=loss_agg_mode, **global_batch_info)
    return options.sd_coef * sd, {"sdar/sd_loss": sd.detach().item(), **_gate_metrics(gate, gap, mask)}


@register_policy_loss("sdar")
def compute_policy_loss_sdar(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "token-mean", config: Any = None,
                             rollout_is_weights: Optional[Tensor] = None,
                             teacher_log_prob: Optional[Tensor] = None,
                             options: Optional[SDAROptions] = None) -> tuple[Tensor, dict]:
    """verl policy loss "sdar": the base policy loss (vanilla: clip, dual clip, rollout_is_weights,
    any agg mode; or gspo) plus lambda Agg(g (t - s)). All tensors [B, T]; teacher_log_prob: the
    teacher's log-probs of the sampled tokens (verl's registry signature has no slot for it, so
    callers pass it by keyword; ``sdar_ppo_loss`` does). Returns verl's (loss, metrics)."""
    if teacher_log_prob is None:
        raise ValueError("the 'sdar' policy loss needs teacher_log_prob [B, T]: verl's ppo_loss does not pass "
                         "extra batch keys to a policy loss; use sdar_kernels.integrations.verl.sdar_ppo_loss as "
                         "the actor loss (it reads data['teacher_log_probs']) or the 'sdar' distillation loss")
    opts = options if options is not None else current_options()
    pg_loss, metrics = get_policy_loss_fn(opts.base_loss_mode)(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
        loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)
    sd_loss, sd_metrics = _sdar_term(log_prob, teacher_log_prob, response_mask, loss_agg_mode,
                                     config.global_batch_info, opts)
    metrics.update(sd_metrics)
    return pg_loss + sd_loss, metrics


def sdar_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None,
                  options: Optional[SDAROptions] = None) -> tuple[Tensor, dict]:
    """Drop-in for verl's actor loss ``verl.workers.utils.losses.ppo_loss`` (same arguments): verl's
    own loss (policy loss of ``actor.policy_loss.loss_mode``, entropy, KL) plus lambda Agg(g (t - s))
    with the teacher log-probs from ``data["teacher_log_probs"]``, response-aligned like
    ``old_log_probs`` (nested or padded [B, T]). Install it on the actor worker with
    ``worker.set_loss_fn(functools.partial(sdar_ppo_loss, config=actor_config))``."""
    if config.policy_loss.get("loss_mode", "vanilla") == "sdar":
        raise ValueError("sdar_ppo_loss adds the SDAR term itself: set actor.policy_loss.loss_mode to the base "
                         f"loss ({', '.join(BASE_LOSS_MODES)}), not 'sdar'")
    if "teacher_log_probs" not in data.keys():
        raise ValueError("sdar_ppo_loss needs data['teacher_log_probs'] (response-aligned like old_log_probs)")
    loss, metrics = ppo_loss(config, model_output, data, dp_group)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    padded = data.select("response_mask", "teacher_log_probs").to_padded_tensor()
    opts = options if options is not None else current_options()
    sd_loss, sd_metrics = _sdar_term(log_prob, padded["teacher_log_probs"], padded["response_mask"],
                                     config.loss_agg_mode, config.global_batch_info, opts)
    metrics.update(sd_metrics)
    return loss + sd_loss, metrics


def _register_distillation() -> None:
    if "sdar" in DISTILLATION_LOSS_REGISTRY:  # a re-import (verl raises on a second registration)
        return

    @register_distillation_loss(DistillationLossSettings(names=["sdar"], use_estimator=True))
    def compute_distillation_loss_sdar(config: Any, distillation_config: Any, model_output: dict,
                                       data: Any) -> tuple[Tensor, dict]:
        """Per-token g (t - s) [B, T] from data["teacher_logprobs"] (verl's distillation layout);
        verl clamps it (set distillation_loss.loss_max_clamp: null), aggregates and scales it by
        distillation_loss_coef (= lambda; use_task_rewards: true, use_policy_gradient: false)."""
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        teacher = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
        loss_mat, gate, gap = sdar_token_loss(log_prob, teacher, current_options().gate_beta)
        mask = data["response_mask"]
        mask = (mask.to_padded_tensor(0) if mask.is_nested else mask).to(torch.bool)
        return loss_mat, _gate_metrics(gate, gap, mask)


_register_distillation()


# -- verl options -> LossConfig -----------------------------------------------------------------
def verl_aggregation(loss_agg_mode: str, response_mask: Tensor, dp_size: int = 1,
                     batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None,
                     loss_scale_factor: Optional[float] = None) -> tuple[str, Optional[float]]:
    """(LossConfig.agg, normalizer) that reproduce verl's ``agg_loss`` on a [B, T] micro-batch.

    verl divides by the global count and multiplies by dp_size, i.e. divides by global / dp_size;
    seq-mean-token-sum-norm also divides by ``loss_scale_factor`` (default: the padded length T);
    token-sum is a token-mean over 1 / dp_size."""
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("batch_num_tokens (global) is required when dp_size > 1")
        return "token-mean", None if batch_num_tokens is None else float(batch_num_tokens) / dp_size
    if loss_agg_mode not in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is invalid; valid: token-mean, token-sum, "
                         "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm")
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    seqs = None if global_batch_size is None else float(global_batch_size) / dp_size
    if loss_agg_mode != "seq-mean-token-sum-norm":
        return loss_agg_mode, seqs
    if seqs is None:
        seqs = float((response_mask.sum(-1) > 0).sum())
    horizon = float(response_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss_agg_mode, seqs * horizon


def loss_config_from_verl(actor_config: Any, temperature: float = 1.0, options: Optional[SDAROptions] = None,
                          base: Optional[LossConfig] = None, with_sdar: Optional[bool] = None) -> LossConfig:
    """The LossConfig computing verl's actor loss for ``actor_config`` (an ActorConfig or its dict
    form), plus the SDAR term (``options``: lambda, beta, base loss) when the policy loss mode is
    "sdar" or ``with_sdar`` is True (the sdar_ppo_loss / distillation routes keep a base mode).
    Normalizers come from ``verl_aggregation``. Options verl has and LossConfig lacks raise ValueError."""
    get = (lambda k, d=None: actor_config.get(k, d))
    clip = get("clip_ratio", 0.2)
    low = get("clip_ratio_low") if get("clip_ratio_low") is not None else clip
    high = get("clip_ratio_high") if get("clip_ratio_high") is not None else clip
    mode = (get("policy_loss") or {}).get("loss_mode", "vanilla")
    opts = options if options is not None else current_options()
    if mode == "sdar" or with_sdar:
        mode = opts.base_loss_mode if mode == "sdar" else mode
        teacher = dict(teacher_use="sdar", sd_coef=opts.sd_coef, gate="gap", gate_beta=opts.gate_beta,
                       divergence="sampled")
    else:
        teacher = dict(teacher_use="none", sd_coef=0.0)
    if mode not in BASE_LOSS_MODES:
        raise ValueError(f"actor.policy_loss.loss_mode={mode!r} has no LossConfig equivalent; valid: "
                         f"{', '.join(BASE_LOSS_MODES + ('sdar',))}")
    kl = {"kl_coef": 0.0}
    if get("use_kl_loss", False):
        kind = get("kl_loss_type", "low_var_kl")
        if kind not in KL_TYPES:
            raise ValueError(f"actor.kl_loss_type={kind!r} has no LossConfig equivalent; valid: {', '.join(KL_TYPES)}")
        kl = {"kl_coef": float(get("kl_loss_coef", 0.001)), "kl_type": KL_TYPES[kind]}
    agg = get("loss_agg_mode", "token-mean")
    fields = dict(temperature=temperature, policy_coef=1.0, clip_low=float(low), clip_high=float(high),
                  dual_clip=float(get("clip_ratio_c", 3.0)) if mode == "vanilla" else None,
                  entropy_coef=float(get("entropy_coeff", 0.0)), agg="token-mean" if agg == "token-sum" else agg,
                  loss_scale_factor=None, **kl, **teacher)
    if mode == "gspo":  # verl's GSPO-token: sequence ratio value, straight-through per-token gradient
        fields["ratio_level"] = "sequence_token"
    try:
        return (base or LossConfig()).replace(**fields)
    except ValueError as err:
        raise ValueError(f"verl actor options have no LossConfig equivalent: {err}") from err


# -- the fused actor forward (what verl's use_fused_kernels expects) ----------------------------
@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """The model output verl's engine reads when use_fused_kernels is on: log_probs, entropy."""

    log_probs: Optional[torch.FloatTensor] = None
    entropy: Optional[torch.FloatTensor] = None


def fused_causal_lm_forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                            position_ids: Optional[Tensor] = None, past_key_values: Any = None,
                            inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                            use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                            output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                            cache_position: Optional[Tensor] = None, logits_to_keep: Any = 0,
                            temperature: float = 1.0, shift_labels: Optional[Tensor] = None,
                            **kwargs: Any) -> FusedCausalLMOutput:
    """A causal LM forward returning per-token log p(next token) and entropy (nats) at ``temperature``.

    The decoder (``get_decoder()``) runs as usual; the lm_head (``get_output_embeddings()``) is
    never applied as a GEMM to the whole sequence: ``fused_linear_logprobs`` reduces each vocabulary
    row on the fly. Labels: ``shift_labels`` [B, T] (verl passes them already rolled), else
    ``labels`` or ``input_ids`` rolled left by one (the last position wraps, as in verl).
    Returns log_probs, entropy [B, T] (fp32; fp64 for fp64 models), differentiable."""
    if temperature is None or isinstance(temperature, Tensor):
        raise ValueError(f"temperature={temperature!r} is invalid; the fused forward takes one float (as verl's)")
    passed = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                  cache_position=cache_position)
    # unset arguments stay unset: newer transformers warn on a past_key_values=None keyword
    outputs = self.get_decoder()(**{k: v for k, v in passed.items() if v is not None}, **kwargs)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None or input_ids is not None:
        targets = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("the fused forward needs shift_labels, labels or input_ids to score")
    head = self.get_output_embeddings()
    lead = hidden.shape[:-1]
    logp, entropy = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                          targets.reshape(-1).to(torch.long), temperature=float(temperature),
                                          with_entropy=True, bias=getattr(head, "bias", None),
                                          backend=getattr(self, "_sdar_fused_backend", "auto"))
    return FusedCausalLMOutput(log_probs=logp.reshape(lead), entropy=entropy.reshape(lead),
                               past_key_values=getattr(outputs, "past_key_values", None),
                               hidden_states=getattr(outputs, "hidden_states", None),
                               attentions=getattr(outputs, "attentions", None))


def install_fused_forward(target: Any, backend: str = "auto") -> Any:
    """Make ``target`` (a HF causal LM instance, or its class) return log_probs/entropy through the
    fused kernels, as verl's ``use_fused_kernels`` patch does. Set verl's
    ``model.use_fused_kernels: true`` and ``model.fused_kernel_options.impl_backend: sdar`` (verl
    then skips its own patch and still passes temperature and rolled labels). ``backend``: the
    kernels' backend ("auto": Triton on CUDA, the chunked torch backend elsewhere). Returns target."""
    if backend not in ("auto", "triton", "torch", "reference"):
        raise ValueError(f"backend={backend!r} is invalid; valid: auto, triton, torch, reference")
    target._sdar_fused_backend = backend
    if isinstance(target, type):
        target.forward = fused_causal_lm_forward
    else:
        target.forward = types.MethodType(fused_causal_lm_forward, target)
    return target


def install_for_architectures(names: list[str]) -> None:
    """install_fused_forward on transformers' classes by name (e.g. ["Qwen2ForCausalLM"]), before
    verl builds the model; ``SDAR_VERL_FUSED_ARCHS=Qwen2ForCausalLM,...`` does it at import."""
    import transformers

    for name in names:
        cls = getattr(transformers, name, None)
        if not isinstance(cls, type):
            raise ValueError(f"SDAR_VERL_FUSED_ARCHS: transformers has no model class {name!r}")
        install_fused_forward(cls)


if os.environ.get("SDAR_VERL_FUSED_ARCHS"):
    install_for_architectures([n.strip() for n in os.environ["SDAR_VERL_FUSED_ARCHS"].split(",") if n.strip()])
