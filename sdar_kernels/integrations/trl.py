"""SDARGRPOTrainer: TRL's GRPOTrainer with its loss computed by sdar_kernels' fused loss.

A drop-in subclass of ``trl.GRPOTrainer`` (tested with trl 1.16.0): same constructor arguments,
plus ``loss_config`` (a LossConfig for the options TRL does not own: teacher term, gate, backend,
chunk sizes) and ``teacher_prompt_column`` (SDAR mode). Generation, rewards, advantages and the
old / reference log-prob passes stay TRL's; ``_compute_loss`` runs the policy trunk without its
lm_head (hidden states [B, P + C, H]), shifts by one, keeps the completion slice and hands it to
``fused_linear_sdar_loss``: no [B, C, V] logits exist in training.

Every GRPOConfig option the fused loss expresses is mapped (docs/integrations/trl.md); anything
else (cispo, sapo, vespo, luspo, top_entropy_quantile < 1, off_policy_mask_threshold,
adaptive entropy, an MoE aux loss, multimodal inputs, logit softcapping, a PEFT adapter on the lm_head)
runs TRL's own ``_compute_loss`` after a one-time warning naming the option. ``fused_loss_calls`` /
``fallback_loss_calls`` count which path ran.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import types
from typing import Any, Optional

import torch
from torch import Tensor
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..config import LossConfig
from ..loss import fused_linear_logprobs, fused_linear_sdar_loss

logger = logging.getLogger(__name__)

FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# inputs keys that carry images / multimodal fields: TRL's own forward handles them
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles")
# LossConfig fields GRPOConfig decides (a user loss_config may not set them to something else)
TRL_OWNED = {
    "temperature": "temperature", "clip_low": "epsilon", "clip_high": "epsilon_high",
    "dual_clip": "(none: TRL has no dual clip)", "kl_coef": "beta", "kl_type": "(k3_unclamped: TRL's KL)",
    "entropy_coef": "entropy_coef", "agg": "loss_type", "policy_coef": "(1: TRL has no policy coefficient)",
    "loss_scale_factor": "loss_type / max_completion_length", "ratio_level": "importance_sampling_level",
    "clip_ratio_max": "delta", "entropy_agg": "(token-mean: TRL's entropy bonus)",
    "kl_ratio_weighted": "use_bias_correction_kl",
}


def _logit_scale(text_config: Any) -> tuple[float, Optional[float]]:
    """(multiplier on the logits, final_logit_softcapping) as TRL's fused head reads them."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        div = text_config.logits_scaling
        scale = div if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / div
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def _add_hidden_state_forward(model: torch.nn.Module) -> None:
    """``model(..., sdar_hidden_states=True)`` returns the trunk's last hidden states [B, T, H]
    (no lm_head). Going through the model's own forward keeps DDP / FSDP / accelerate wrappers in
    the call path; the backbone is looked up per call since FSDP and PEFT replace modules."""
    if getattr(model, "_sdar_hidden_forward", False):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, sdar_hidden_states: bool = False, **kwargs):
        if not sdar_hidden_states:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
    model._sdar_hidden_forward = True


class SDARGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose training loss runs through ``fused_linear_sdar_loss``.

    Args (besides GRPOTrainer's, unchanged):
        loss_config: LossConfig for what GRPOConfig does not set (teacher_use, sd_coef, gate,
            gate_beta, backend, token_chunk, vocab_chunk, check_inputs, ...). The fields TRL owns
            (TRL_OWNED: clip, KL, entropy, aggregation, temperature, ...) always come from
            GRPOConfig; where loss_config holds another value, one warning at construction names
            each replaced field (so LossConfig.preset("sdar") can be passed as is).
        teacher_prompt_column: SDAR mode: the dataset column holding each sample's privileged
            (teacher) prompt, formatted like ``prompt``. After generation the same model reads
            teacher prompt + the sampled completion under no_grad; its per-token log-probs at the
            completion feed ``teacher_logprobs``. Defaults the teacher options to
            ``LossConfig.preset("sdar")``'s when ``loss_config`` is None.
    """

    def __init__(self, *args: Any, loss_config: Optional[LossConfig] = None,
                 teacher_prompt_column: Optional[str] = None, **kwargs: Any) -> None:
        if loss_config is not None and not isinstance(loss_config, LossConfig):
            raise ValueError(f"loss_config must be a sdar_kernels.LossConfig or None; got {type(loss_config).__name__}")
        super().__init__(*args, **kwargs)
        self.teacher_prompt_column = teacher_prompt_column
        self.fused_loss_calls = 0
        self.fallback_loss_calls = 0
        self._warned: set = set()
        self.base_loss_config = self._base_config(loss_config, teacher_prompt_column)
        _add_hidden_state_forward(self._causal_lm(self.model))
        self._check_owned_fields(loss_config)
        if self.base_loss_config.uses_teacher and self.fallback_reasons():
            raise ValueError("SDAR mode needs the fused loss, but these GRPOConfig / model options force TRL's own "
                             "loss: " + "; ".join(self.fallback_reasons()))

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def _base_config(user: Optional[LossConfig], teacher_column: Optional[str]) -> LossConfig:
        if user is None:
            user = LossConfig.preset("sdar") if teacher_column else LossConfig(teacher_use="none", sd_coef=0.0)
        if user.uses_teacher and not teacher_column:
            raise ValueError(f"loss_config.teacher_use={user.teacher_use!r} (sd_coef={user.sd_coef}) needs teacher "
                             "log-probs: pass teacher_prompt_column=<dataset column with the teacher prompt>, or set "
                             "teacher_use='none'")
        if user.full_vocab_divergence:
            raise ValueError(f"loss_config.divergence={user.divergence!r} needs the teacher's hidden states, which the "
                             "TRL adapter does not keep; use divergence='sampled'")
        return user

    def _check_owned_fields(self, user: Optional[LossConfig]) -> None:
        """Warn (once, at construction) about loss_config fields that GRPOConfig overrides."""
        if user is None:
            return
        derived = self.trl_loss_config()
        replaced = [f"{name}={getattr(user, name)!r} -> {getattr(derived, name)!r} ({option})"
                    for name, option in TRL_OWNED.items()
                    if getattr(user, name) != getattr(derived, name)]
        if replaced:
            logger.warning("SDARGRPOTrainer: GRPOConfig sets these loss_config fields: %s", "; ".join(replaced))

    def trl_loss_config(self) -> LossConfig:
        """The LossConfig equal to this trainer's current TRL loss settings (read from the same
        attributes TRL's _compute_loss reads), with the user's non-TRL fields on top."""
        scale, _ = _logit_scale(self._causal_lm(self.model).config.get_text_config())
        fields: dict[str, Any] = dict(
            temperature=self.temperature / scale, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            dual_clip=None, kl_coef=float(self.beta), kl_type="k3_unclamped", policy_coef=1.0,
            entropy_coef=float(self.entropy_coef) if self._entropy_bonus_enabled else 0.0,
            agg="seq-mean-token-mean" if self.loss_type == "grpo" else "token-mean", loss_scale_factor=None,
            ratio_level=self.importance_sampling_level, clip_ratio_max=self.args.delta, entropy_agg="token-mean",
            kl_ratio_weighted=bool(self.args.use_bias_correction_kl))
        return dataclasses.replace(self.base_loss_config, **fields)

    def fallback_reasons(self, inputs: Optional[dict] = None) -> list[str]:
        """The TRL options in force that the fused loss cannot express (empty: fused path)."""
        reasons = []
        if self.loss_type not in FUSED_LOSS_TYPES:
            reasons.append(f"loss_type={self.loss_type!r} (fused: {', '.join(FUSED_LOSS_TYPES)})")
        if self.top_entropy_quantile < 1.0:
            reasons.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None:
            reasons.append(f"off_policy_mask_threshold={self.off_policy_mask_threshold}")
        if self.use_adaptive_entropy:
            reasons.append("use_adaptive_entropy=True")
        if self.aux_loss_enabled:
            reasons.append("an MoE router aux loss (router_aux_loss_coef != 0)")
        lm = self._causal_lm(self.model)
        scale, softcap = _logit_scale(lm.config.get_text_config())
        if softcap is not None:
            reasons.append(f"final_logit_softcapping={softcap}")
        if not scale > 0:
            reasons.append(f"a logit scale of {scale}")
        head = lm.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            reasons.append("an lm_head without a weight")
        elif _is_peft_layer(head):
            reasons.append("a PEFT adapter on the lm_head")
        if inputs is not None:
            present = [k for k in MULTIMODAL_KEYS if inputs.get(k) is not None]
            if present:
                reasons.append(f"multimodal inputs ({', '.join(present)})")
        return reasons

    def _uses_is_ratio(self) -> bool:
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    @staticmethod
    def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # -- loss ----------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        reasons = self.fallback_reasons(inputs)
        if reasons:
            if self.base_loss_config.uses_teacher:
                raise ValueError("SDAR mode needs the fused loss, but these options force TRL's own loss: "
                                 + "; ".join(reasons))
            for reason in reasons:
                if reason not in self._warned:
                    self._warned.add(reason)
                    logger.warning("SDARGRPOTrainer: %s is not supported by the fused loss; computing this loss with "
                                   "TRL's own GRPOTrainer._compute_loss", reason)
            self.fallback_loss_calls += 1
            return super()._compute_loss(model, inputs)
        self.fused_loss_calls += 1
        return self._fused_loss(model, inputs)

    def _completion_hidden(self, model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                           completion_mask: Tensor) -> Tensor:
        """Trunk hidden states at the positions that predict each completion token: [B, C, H]."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, sdar_hidden_states=True)
        c = completion_ids.size(1)
        return hidden[:, -c - 1:-1]

    def _lm_head(self) -> tuple[Tensor, Optional[Tensor]]:
        head = self._causal_lm(self.accelerator.unwrap_model(self.model)).get_output_embeddings()
        return head.weight, head.bias

    def _normalizers(self, mask: Tensor, inputs: dict) -> tuple[Tensor, Tensor]:
        """(policy normalizer, entropy normalizer) reproducing TRL's per-loss-type division."""
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        b = mask.size(0)
        tokens = mask.sum().clamp(min=1.0)
        if self.loss_type == "grpo":
            policy = torch.as_tensor(float(b * accum), dtype=mask.dtype, device=mask.device)
        elif self.loss_type == "bnpo":
            policy = tokens * accum
        elif self.loss_type == "dr_grpo":
            policy = torch.as_tensor(float(b * self.max_completion_length * accum), dtype=mask.dtype,
                                     device=mask.device)
        else:  # dapo: num_items_in_batch spans the generation batch, on every process
            policy = inputs["num_items_in_batch"].to(mask.dtype).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                policy = policy * accum / self.args.steps_per_generation
        return policy, tokens * accum

    def _fused_loss(self, model, inputs: dict) -> Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        hidden = self._completion_hidden(model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids,
                                         completion_mask)
        weight, bias = self._lm_head()
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        cfg = self.trl_loss_config()
        fmask = mask.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        keep = mask.bool()
        b, c = mask.shape
        rows = torch.arange(b, device=mask.device).unsqueeze(1).expand(b, c)
        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(b, c)
        policy_norm, entropy_norm = self._normalizers(fmask, inputs)
        is_ratio = inputs["importance_sampling_ratio"].expand(b, c)[keep] if self._uses_is_ratio() else None
        h = hidden[keep]
        targets = completion_ids[keep]
        old = inputs.get("old_per_token_logps")
        old = old[keep] if old is not None else None  # None: on-policy (ratio 1, gradient of A log p)
        ref = inputs["ref_per_token_logps"][keep] if self.beta != 0.0 else None
        teacher = inputs["teacher_per_token_logps"][keep] if cfg.uses_teacher else None
        out = fused_linear_sdar_loss(
            h, weight, targets, advantages[keep], old, torch.ones_like(targets, dtype=fmask.dtype),
            teacher_logprobs=teacher, ref_logprobs=ref, segment_ids=rows[keep], normalizer=policy_norm,
            bias=bias, config=cfg, importance_weights=is_ratio, entropy_normalizer=entropy_norm)
        loss = out.loss
        if h.shape[0] == 0:  # keep the graph connected through the trunk for an all-masked micro-batch
            loss = loss + 0.0 * hidden.sum()
        self._log_fused_metrics(out, mask, keep, advantages, old, ref, cfg, entropy_norm)
        return loss

    # -- metrics (TRL's names and formulas, from the detached per-token outputs) ---------------
    def _log_fused_metrics(self, out, mask: Tensor, keep: Tensor, advantages: Tensor, old: Optional[Tensor],
                           ref: Optional[Tensor], cfg: LossConfig, entropy_norm: Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        fmask = mask.to(out.logprobs.dtype)

        def scatter(x: Tensor) -> Tensor:
            return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(keep, x)

        def global_masked_mean(x: Tensor) -> float:
            if x.shape[1] == 1:  # sequence-level ratio: one value per sequence, every sequence counts
                local = torch.stack([x.sum(), torch.as_tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)])
            else:
                local = torch.stack([(x * fmask).sum(), fmask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x: Tensor) -> Tensor:
            return x.squeeze(1) if x.shape[1] == 1 else (x * fmask).sum(-1) / fmask.sum(-1)

        logp = scatter(out.logprobs.detach())
        entropy = scatter(out.entropy.detach())
        log_ratio = logp - (scatter(old.detach().to(logp.dtype)) if old is not None else logp)
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * fmask).sum(-1, keepdim=True) / fmask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(log_ratio)
        if ref is not None:
            r = scatter(ref.detach().to(logp.dtype))
            kl = torch.exp(r - logp) - (r - logp) - 1
            metrics["kl"].append(global_masked_mean(kl * ratio if cfg.kl_ratio_weighted else kl))
        metrics["entropy"].append(global_masked_mean(entropy))
        adv = advantages[:, :1].to(logp.dtype) if ratio.shape[1] == 1 else advantages.to(logp.dtype)
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).to(logp.dtype)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.clamp(low + high, max=1.0)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        if self._entropy_bonus_enabled:
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            bonus = cfg.entropy_coef * (entropy * fmask).sum() / entropy_norm
            policy_loss = out.loss.detach() + bonus
            if self.loss_type != "dapo":
                policy_loss = policy_loss * accum
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        for name in ("gate_mean", "gate_active", "gap_mean", "sd_loss"):
            if name in out.metrics:
                metrics[f"sdar/{name}"].append(self.accelerator.gather(out.metrics[name].detach()).nanmean().item())

    # -- SDAR teacher pass ---------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.teacher_prompt_column is None:
            return output
        missing = [i for i, x in enumerate(inputs) if x.get(self.teacher_prompt_column) is None]
        if missing:
            raise ValueError(f"teacher_prompt_column={self.teacher_prompt_column!r}: samples {missing[:5]} have no "
                             "teacher prompt (every row needs one)")
        output["teacher_per_token_logps"] = self.teacher_logprobs(
            [x[self.teacher_prompt_column] for x in inputs], output["completion_ids"], output["completion_mask"])
        return output

    @torch.no_grad()
    def teacher_logprobs(self, teacher_prompts: list, completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
        """log pi(y_t | teacher prompt, y_<t) of the current policy at every completion token:
        [B, C] (0 on padding), computed in micro-batches of per_device_train_batch_size."""
        ids, _, _ = self._tokenize_prompts(teacher_prompts)
        device = completion_ids.device
        width = max(len(x) for x in ids)
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        t_ids = torch.full((len(ids), width), pad_id, dtype=torch.long, device=device)
        t_mask = torch.zeros((len(ids), width), dtype=completion_mask.dtype, device=device)
        for i, row in enumerate(ids):  # left padding, as TRL pads prompts
            if len(row):
                t_ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long, device=device)
                t_mask[i, width - len(row):] = 1
        cfg = self.trl_loss_config()
        weight, bias = self._lm_head()
        out = []
        step = self.args.per_device_train_batch_size
        for s in range(0, len(ids), step):
            sl = slice(s, s + step)
            hidden = self._completion_hidden(self.model, t_ids[sl], t_mask[sl], completion_ids[sl],
                                             completion_mask[sl])
            if self.args.cast_lm_head_to_fp32:
                hidden = hidden.float()
            logp, _ = fused_linear_logprobs(hidden, weight, completion_ids[sl], temperature=cfg.temperature,
                                            bias=bias, mask=completion_mask[sl], backend=cfg.backend,
                                            token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)
            out.append(logp)
        return torch.cat(out, 0)


def _is_peft_layer(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)
