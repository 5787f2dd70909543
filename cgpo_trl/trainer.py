"""`CGPOTrainer`: `GRPOTrainer` with the confidence-guided single-sample advantage, and nothing else changed.

What differs from GRPO:

1. Rollouts: `num_generations` independent completions per prompt (1 by default); no group statistics.
2. Rewards: `_calculate_rewards` is wrapped to keep the raw per-function rewards, scaled into `r` per completion
   and carried with the batch (`cgpo_rewards`), like every other per-sample tensor TRL shuffles and splits.
3. Advantages: computed inside the loss step, from the log-probs and next-token statistics that the loss's own
   forward pass produces anyway (or the vLLM sampling / old-policy log-probs when the step has them). The loss
   itself — clipping, `beta`, `loss_type` — is TRL's, fed `(B,)` or `(B, T)` advantages.

No forward pass is added: token baselines use statistics of TRL's fused LM head (`log_sum_sq_probs`, `entropy`);
`max_prob` adds one no-grad projection of the completion positions' hidden states through the LM head.
"""

from __future__ import annotations

import functools
import json
import math
import os
import types
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from .confidence import (
    ConfidenceInputs,
    OnlineCalibrator,
    cgpo_advantages,
    expected_calibration_error,
    get_confidence_estimator,
    scale_rewards,
    span_mask_from_text,
    token_pairs,
)
from .config import CGPOConfig

STATE_FILE = "cgpo_state.json"


class CGPOTrainer(GRPOTrainer):
    """Drop-in replacement for [`~trl.GRPOTrainer`] (same constructor) that trains with CGPO advantages."""

    _tag_names = ["trl", "cgpo"]
    _name = "CGPO"

    def __init__(self, model, reward_funcs=None, args: CGPOConfig | None = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = CGPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CGPO")
        if not isinstance(args, CGPOConfig):
            raise TypeError(f"CGPOTrainer needs args=CGPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        self.confidence_estimator = get_confidence_estimator(args.confidence, args.confidence_level)
        self.calibrator = (
            OnlineCalibrator(args.calibration_window, args.calibration_min_pairs)
            if args.confidence_calibration == "online"
            else None
        )
        self._cgpo_pending: dict[str, Any] | None = None
        self._cgpo_captured: list[Any] = []
        self._cgpo_hidden: list[torch.Tensor] = []
        self._cgpo_entropy_ref: float | None = None
        self._cgpo_capturing = False
        if args.confidence_level == "token":
            self._install_token_statistics()

    # ------------------------------------------------------------------ generation side: rewards and spans
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._cgpo_rewards_per_func = rewards_per_func  # gathered over processes, (global B, n funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * local
        all_rewards = scale_rewards(
            self._cgpo_rewards_per_func,
            self.reward_weights.to(self._cgpo_rewards_per_func.device),
            self.args.reward_scaling,
        )
        output["cgpo_rewards"] = all_rewards[start : start + local]
        if self.args.confidence_span == "answer":
            output["cgpo_span_mask"] = self._answer_span_mask(output["completion_ids"], output["completion_mask"])
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        if num_generations == 1:
            # Group statistics are undefined for one sample; TRL's zero-std fraction (always 1) would mislead.
            self._metrics[mode].pop("frac_reward_zero_std", None)
        # TRL logs its (group) advantages for the completions table; CGPO's exist only at the loss step.
        for _ in range(min(len(all_rewards), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend([math.nan] * len(all_rewards))
        return output

    def _answer_span_mask(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        open_marker, close_marker = self.args.answer_markers
        rows = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            n = int(sum(mask))
            pieces = self._tokenizer.batch_decode([[i] for i in ids[:n]], skip_special_tokens=False)
            rows.append(span_mask_from_text(pieces, open_marker, close_marker) + [0] * (len(ids) - n))
        return torch.tensor(rows, dtype=completion_mask.dtype, device=completion_mask.device)

    # ------------------------------------------------------------------ loss side: confidence and advantage
    def _compute_loss(self, model, inputs):
        self._cgpo_pending = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._cgpo_pending = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        inputs, self._cgpo_pending = self._cgpo_pending, None
        if inputs is None:  # old-policy / reference passes: untouched
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._cgpo_captured, self._cgpo_hidden = [], []
        self._cgpo_capturing = True
        try:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            self._cgpo_capturing = False
        inputs["advantages"] = self._advantages(inputs, logps.detach(), entropies, logits_to_keep)
        return logps, entropies, aux

    def _advantages(self, inputs, logps, entropies, logits_to_keep) -> torch.Tensor:
        args = self.args
        mask = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        rewards = inputs["cgpo_rewards"]
        if args.confidence_level == "sequence":
            # The log-probs of the tokens as they were sampled: vLLM's, else the old policy's, else this pass's.
            source = inputs.get("sampling_per_token_logps", inputs.get("old_per_token_logps", logps))
            valid = mask * (~torch.isnan(source)).float()
            if "cgpo_span_mask" in inputs:
                span = valid * inputs["cgpo_span_mask"]
                valid = torch.where(span.sum(-1, keepdim=True) > 0, span, valid)
            stats = ConfidenceInputs(logps=torch.nan_to_num(source), mask=valid)
            confidence = self.confidence_estimator.fn(stats).float()
            per_sequence = confidence
        else:
            stats = ConfidenceInputs(logps=logps, mask=mask, entropy=None if entropies is None else entropies.detach())
            self._fill_token_statistics(stats, logits_to_keep)
            confidence = self.confidence_estimator.fn(stats).float() * mask
            per_sequence = (confidence * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

        all_r = self.accelerator.gather(rewards)
        all_c = self.accelerator.gather(per_sequence)
        gap_mean = torch.nanmean(all_r - all_c) if args.confidence_calibration == "batch" else None
        advantages = cgpo_advantages(
            rewards, confidence, args.confidence_calibration, self.calibrator, gap_mean, args.advantage_clip
        )
        if advantages.dim() == 2:
            advantages = advantages * mask
        self._log_cgpo_metrics(all_r, all_c, advantages, mask, entropies)
        if self.calibrator is not None and self.model.training:  # after use: g never depends on what it scores
            if confidence.dim() == 2:
                pair_c, pair_r = token_pairs(confidence, mask, rewards)
                self.calibrator.update(
                    self.accelerator.gather(pair_c).flatten(), self.accelerator.gather(pair_r).flatten()
                )
            else:
                self.calibrator.update(all_c, all_r)
        return advantages

    def _log_cgpo_metrics(self, all_r, all_c, advantages, mask, entropies) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        keep = ~torch.isnan(all_r)
        r, c = all_r[keep], all_c[keep]
        if advantages.dim() == 2:
            seq_adv = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        else:
            seq_adv = advantages
        seq_adv = self.accelerator.gather(seq_adv)
        metrics["cgpo/reward"].append(r.mean().item() if r.numel() else math.nan)
        metrics["cgpo/confidence"].append(c.mean().item() if c.numel() else math.nan)
        if self.calibrator is not None:
            calibrated = self.calibrator(c)
            metrics["cgpo/confidence_calibrated"].append(calibrated.mean().item() if c.numel() else math.nan)
        metrics["cgpo/advantage_mean"].append(seq_adv.mean().item())
        metrics["cgpo/advantage_std"].append(seq_adv.std().item() if seq_adv.numel() > 1 else 0.0)
        metrics["cgpo/abs_gap"].append((r - c).abs().mean().item() if r.numel() else math.nan)
        metrics["cgpo/ece"].append(expected_calibration_error(c, r))
        if r.numel() > 1 and r.std() > 0 and c.std() > 0:
            metrics["cgpo/confidence_reward_corr"].append(torch.corrcoef(torch.stack([c, r]))[0, 1].item())
        if entropies is not None:
            totals = self.accelerator.reduce(torch.stack([(entropies.detach() * mask).sum(), mask.sum()]), "sum")
            entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if self._cgpo_entropy_ref is None and mode == "train":
                self._cgpo_entropy_ref = entropy
            if self._cgpo_entropy_ref:
                metrics["cgpo/entropy_ratio"].append(entropy / self._cgpo_entropy_ref)

    # ------------------------------------------------------------------ token statistics from the fused head
    def _install_token_statistics(self) -> None:
        """Make the fused LM head also return what the token estimator needs, and keep it for `_advantages`."""
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        requires = self.confidence_estimator.requires
        add_fused_lm_head(
            target,
            temperature=self.temperature,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            outputs=("log_probs", "entropy", "log_sum_sq_probs"),
        )
        fused_forward = target.forward
        trainer = self

        @functools.wraps(type(target).forward)
        def forward(module, *args, **kwargs):
            output = fused_forward(*args, **kwargs)
            if kwargs.get("fused_lm_head") and trainer._cgpo_capturing:
                trainer._cgpo_captured.append((output, kwargs.get("labels")))
            return output

        target.forward = types.MethodType(forward, target)
        if "max_logprob" in requires:
            text_config = target.config.get_text_config()
            for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
                if getattr(text_config, attr, None) not in (None, 1, 1.0):
                    raise ValueError(
                        f"confidence='max_prob' does not support models with `{attr}` set; use 'self_agreement'"
                    )

            def keep_hidden(module, args, output):
                if trainer._cgpo_capturing:
                    trainer._cgpo_hidden.append(output.last_hidden_state.detach())

            target.base_model.register_forward_hook(keep_hidden)

    def _fill_token_statistics(self, stats: ConfidenceInputs, logits_to_keep: int) -> None:
        outputs = [out for out, _ in self._cgpo_captured]
        if not outputs:
            raise RuntimeError("CGPO token statistics were not captured; was the model's forward replaced?")
        stats.log_sum_sq_probs = torch.cat([o.log_sum_sq_probs for o in outputs])[:, -logits_to_keep:].float()
        if stats.entropy is None:
            stats.entropy = torch.cat([o.entropy for o in outputs])[:, -logits_to_keep:].float()
        if "max_logprob" in self.confidence_estimator.requires:
            stats.max_logprob = self._max_logprob(logits_to_keep)
        self._cgpo_captured, self._cgpo_hidden = [], []

    @torch.no_grad()
    def _max_logprob(self, logits_to_keep: int) -> torch.Tensor:
        """log max_v p(v | y<t) at the completion positions, from the hidden states the loss pass computed."""
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        rows = []
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 shards the head outside its own forward
            for hidden, (_, labels) in zip(self._cgpo_hidden, self._cgpo_captured):
                hidden = hidden[:, :-1][:, -logits_to_keep:]
                valid = labels[:, 1:][:, -logits_to_keep:] != -100
                out = torch.zeros(valid.shape, device=hidden.device)
                for chunk in valid.nonzero().split(4096):
                    h = hidden[chunk[:, 0], chunk[:, 1]].to(weight.dtype)
                    logits = torch.nn.functional.linear(h, weight, bias).float() / self.temperature
                    out[chunk[:, 0], chunk[:, 1]] = logits.max(-1).values - logits.logsumexp(-1)
                rows.append(out)
        return torch.cat(rows)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state = {"entropy_ref": self._cgpo_entropy_ref}
            if self.calibrator is not None:
                state["calibrator"] = self.calibrator.state_dict()
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(state, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_cgpo_state(checkpoint)

    def _load_cgpo_state(self, checkpoint: str) -> None:
        """Restore the online calibration and the entropy reference saved next to a checkpoint."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            state = json.load(f)
        self._cgpo_entropy_ref = state.get("entropy_ref")
        if self.calibrator is not None and "calibrator" in state:
            self.calibrator.load_state_dict(state["calibrator"])
