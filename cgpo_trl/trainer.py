"""`CGPOTrainer`: `GRPOTrainer` with a single-rollout advantage, and nothing else changed.

What differs from GRPO, all plumbing around one pure function (`cgpo_trl.advantages.compute_advantages`):

1. Rollouts: `num_generations` independent completions per prompt (1 by default); no group statistics.
2. Rewards: each function's values are checked (`cgpo_trl.fixes`: non-finite -> no reward, outside [0, 1] ->
   clipped, with a warning naming the function), and the weighted, scaled reward `r` rides with the batch (`cgpo_rewards`),
   like every other per-sample tensor TRL shuffles and splits, together with a stable key per prompt for the
   per-prompt tracker.
3. Advantages: computed inside the loss step from what its own forward pass produces (log-probs, and the next-token
   statistics of TRL's fused LM head for token baselines), once per generated batch: when TRL reuses a generation
   (`num_iterations > 1`), later passes reuse the advantages of its first pass, and the online calibration map is
   refitted only after the generation's last use. The loss itself — clipping, `beta`, `loss_type` — is TRL's.

No forward pass is added: `self_agreement` and `neg_entropy` come out of TRL's fused LM head; `max_prob` adds one
no-grad projection of the completion positions' hidden states through the LM head, in chunks bounded by bytes.
The capture of those statistics is installed around the loss pass only and removed after it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from .advantages import (
    CONFIDENCE_BASELINES,
    TRACKER_BASELINES,
    AdvantageInputs,
    AdvantageOutputs,
    AdvantageSettings,
    compute_advantages,
    scale_rewards,
)
from .baselines import PromptTracker, adaptive_rho, logprob_drift, prompt_key
from .checkpoints import ResumableTrainerMixin, warn_missing_state
from .confidence import (
    ConfidenceInputs,
    OnlineCalibrator,
    expected_calibration_error,
    get_confidence_estimator,
    masked_mean,
    span_mask_from_text,
    token_pairs,
)
from .config import CGPOConfig
from .fixes import GRPOFixesMixin

logger = logging.getLogger(__name__)

STATE_FILE = "cgpo_state.json"
MAX_PROB_CHUNK_BYTES = 64 * 2**20
"""fp32 logits materialised at once by the `max_prob` projection (about 110 positions at a 151,936 vocabulary)."""


@dataclass
class _TokenCapture:
    """What the loss pass's fused LM head returned, and the hidden states it projected (for `max_prob`)."""

    outputs: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)


MULTIMODAL_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "image_position_ids",
)
"""Generation outputs TRL's loss pass forwards to the model besides the token ids (per image, not per position)."""


class CGPOTrainer(ResumableTrainerMixin, GRPOFixesMixin, GRPOTrainer):
    """Drop-in replacement for [`~trl.GRPOTrainer`] (same constructor) that trains with CGPO advantages."""

    _tag_names = ["trl", "cgpo"]
    _name = "CGPO"

    def __init__(self, model, reward_funcs=None, args: CGPOConfig | None = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = CGPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-CGPO")
        if not isinstance(args, CGPOConfig):
            raise TypeError(f"CGPOTrainer needs args=CGPOConfig(...), got {type(args).__name__}")
        self.unit_range_rewards = args.needs_unit_rewards
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        self.advantage_settings = AdvantageSettings(
            args.baseline, args.confidence_calibration, args.scale_rewards, args.advantage_clip
        )
        uses_confidence = args.baseline in CONFIDENCE_BASELINES
        self.confidence_estimator = (
            get_confidence_estimator(args.confidence, args.confidence_level) if uses_confidence else None
        )
        self.calibrator = (
            OnlineCalibrator(
                args.calibration_window, args.calibration_min_pairs, with_values=args.baseline == "tracker_confidence"
            )
            if uses_confidence and args.confidence_calibration == "online"
            else None
        )
        self.tracker = (
            PromptTracker(args.tracker_rho, args.tracker_rho_schedule, args.tracker_rho_min)
            if args.baseline in TRACKER_BASELINES
            else None
        )
        self._token_level = uses_confidence and args.confidence_level == "token"
        self._loss_inputs: dict | None = None  # set while TRL's loss pass runs
        self._entropy_ref: float | None = None
        self._check_reward_weights()
        if self._token_level:
            # TRL's own fused head, asked for one more free statistic; nothing else stays on the model.
            add_fused_lm_head(
                self._fused_target(),
                temperature=self.temperature,
                cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                outputs=("log_probs", "entropy", "log_sum_sq_probs"),
            )

    def _check_reward_weights(self) -> None:
        if not self.args.needs_unit_rewards:
            return
        weights = self.reward_weights.tolist()
        if any(w < 0 for w in weights):
            raise ValueError(
                f"reward weights {weights} include a negative weight, so r can leave [0, 1]; baseline="
                f"{self.args.baseline!r} compares r with a value in [0, 1]"
            )
        if self.args.reward_scaling == "none" and sum(weights) > 1:
            raise ValueError(
                f"reward_scaling='none' sums the weighted rewards (weights {weights}, up to {sum(weights)}), but "
                f"baseline={self.args.baseline!r} needs r in [0, 1]: use reward_scaling='weight_sum' or weights "
                "summing to at most 1"
            )

    # ------------------------------------------------------------------ generation side: rewards and prompt keys
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # checked
        self._scaled_rewards = scale_rewards(
            rewards_per_func, self.reward_weights.to(rewards_per_func.device), self.args.reward_scaling
        )
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * local
        output["cgpo_rewards"] = self._scaled_rewards[start : start + local]
        if self.args.baseline in CONFIDENCE_BASELINES and self.args.confidence_span == "answer":
            output["cgpo_span_mask"] = self._answer_span_mask(output["completion_ids"], output["completion_mask"])
        if self.tracker is not None:
            keys = [prompt_key(row.get("prompt"), row.get("images", row.get("image"))) for row in inputs]
            output["cgpo_prompt_keys"] = torch.tensor(keys, dtype=torch.int64, device=output["prompt_ids"].device)
            if self.tracker.adaptive and self.model.training:
                output["cgpo_tracker_drift"] = self._tracker_drift(output, keys)
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        if num_generations == 1:
            # Group statistics are undefined for one sample; TRL's zero-std fraction (always 1) would mislead.
            self._metrics[mode].pop("frac_reward_zero_std", None)
        # TRL logs its (group) advantages for the completions table; CGPO's exist only at the loss step.
        for _ in range(min(local * self.accelerator.num_processes, len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend([math.nan] * local * self.accelerator.num_processes)
        return output

    def _tracker_drift(self, output: dict, keys: list[int]) -> torch.Tensor:
        """SPO's D per prompt: mean |log pi_now - log pi_then| over the prompt's last stored response; NaN if none.

        One no-grad forward pass over this batch's prompts (and images) with their stored responses in place of the
        new ones. It runs on every process whenever any process's batch revisits a stored prompt (decided from a
        gathered flag, so the processes stay in lockstep under DDP and ZeRO-3), and is skipped otherwise.
        """
        device = output["prompt_ids"].device
        drift = torch.full((len(keys),), math.nan, device=device)
        stored = [self.tracker.responses.get(key) for key in keys]
        revisits = torch.tensor([any(entry and entry[0] for entry in stored)], device=device)
        if not self.accelerator.gather(revisits).any():
            return drift
        length = max([len(entry[0]) for entry in stored if entry] + [1])
        ids = torch.full(
            (len(keys), length), self._tokenizer.pad_token_id, dtype=output["completion_ids"].dtype, device=device
        )
        mask = torch.zeros((len(keys), length), dtype=output["completion_mask"].dtype, device=device)
        old = torch.zeros((len(keys), length), device=device)
        for row, entry in enumerate(stored):
            if entry and entry[0]:
                n = len(entry[0])
                ids[row, :n] = torch.tensor(entry[0], dtype=ids.dtype)
                mask[row, :n] = 1
                old[row, :n] = torch.tensor(entry[1])
        prompt_len = output["prompt_ids"].size(1)
        kwargs = {name: output.get(name) for name in MULTIMODAL_FORWARD_KEYS}
        for name in ("token_type_ids", "mm_token_type_ids"):  # per position: the prompt's kept, responses are text
            if output.get(name) is not None:
                kwargs[name] = torch.cat(
                    [output[name][:, :prompt_len], torch.zeros_like(ids, dtype=output[name].dtype)], 1
                )
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], ids], 1),
                torch.cat([output["prompt_mask"], mask], 1),
                length,
                batch_size=self.args.per_device_train_batch_size,
                **kwargs,
            )
        return logprob_drift(logps, old, mask)

    def _answer_span_mask(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        open_marker, close_marker = self.args.answer_markers
        rows = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            n = int(sum(mask))
            pieces = self._tokenizer.batch_decode([[i] for i in ids[:n]], skip_special_tokens=False)
            rows.append(span_mask_from_text(pieces, open_marker, close_marker) + [0] * (len(ids) - n))
        return torch.tensor(rows, dtype=completion_mask.dtype, device=completion_mask.device)

    # ------------------------------------------------------------------ loss side
    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.model.training and self.calibrator is not None and self._step % generate_every == generate_every - 1:
            self.calibrator.commit()  # after the generated batch's last use: g never scores what it was fit on
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        inputs, self._loss_inputs = self._loss_inputs, None
        if inputs is None or "cgpo_advantages" in inputs:
            # Old-policy / reference passes, or a reused generation whose advantages its first pass fixed.
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            if inputs is not None:
                inputs["advantages"] = inputs["cgpo_advantages"]
            return result
        with self._capture_token_statistics() as captured:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        advantages = self._advantages(inputs, logps.detach(), entropies, captured, logits_to_keep)
        inputs["advantages"] = inputs["cgpo_advantages"] = advantages
        return logps, entropies, aux

    def _advantages(self, inputs, logps, entropies, captured, logits_to_keep) -> torch.Tensor:
        """Gather what the baseline needs, call `compute_advantages`, log, then update the baseline state."""
        mask = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        rewards = inputs["cgpo_rewards"].float()
        gather = self.accelerator.gather
        confidence = self._confidence(inputs, logps, entropies, captured, logits_to_keep, mask)
        keys = values = None
        if self.tracker is not None:
            keys = gather(inputs["cgpo_prompt_keys"])
            values = self.tracker.values(inputs["cgpo_prompt_keys"].tolist()).to(rewards.device)
        result = compute_advantages(
            AdvantageInputs(rewards=rewards, mask=mask, confidence=confidence, prompt_values=values),
            self.advantage_settings,
            self.calibrator,
            gather,
        )
        self._log_cgpo_metrics(rewards, confidence, values, result, mask, entropies)
        if self.model.training:
            self._update_baseline_state(rewards, confidence, mask, keys, result, inputs, logps)
        return result.advantages

    def _confidence(self, inputs, logps, entropies, captured, logits_to_keep, mask) -> torch.Tensor | None:
        """The raw confidence: (B,) from the sampled tokens' log-probs, or (B, T) token baselines."""
        if self.confidence_estimator is None:
            return None
        if not self._token_level:
            source = inputs.get("old_per_token_logps", logps)
            if self.args.confidence_logps == "sampler":
                source = inputs.get("sampling_per_token_logps", source)
            valid = mask * (~torch.isnan(source)).float()
            if "cgpo_span_mask" in inputs:
                span = valid * inputs["cgpo_span_mask"]
                valid = torch.where(span.sum(-1, keepdim=True) > 0, span, valid)
            return self.confidence_estimator.fn(ConfidenceInputs(logps=torch.nan_to_num(source), mask=valid)).float()
        stats = ConfidenceInputs(logps=logps, mask=mask, entropy=None if entropies is None else entropies.detach())
        outputs = [out for out, _ in captured.outputs]
        if not outputs:
            raise RuntimeError("CGPO token statistics were not captured: the model's fused LM head was not called")
        stats.log_sum_sq_probs = torch.cat([o.log_sum_sq_probs for o in outputs])[:, -logits_to_keep:].float()
        if stats.entropy is None:
            stats.entropy = torch.cat([o.entropy for o in outputs])[:, -logits_to_keep:].float()
        if "max_logprob" in self.confidence_estimator.requires:
            stats.max_logprob = self._max_logprob(captured, logits_to_keep)
        return self.confidence_estimator.fn(stats).float() * mask

    def _update_baseline_state(self, rewards, confidence, mask, keys, result: AdvantageOutputs, inputs, logps) -> None:
        """After the advantages were computed: the calibration pairs and the tracker's visits of this batch."""
        gather = self.accelerator.gather
        if self.calibrator is not None:
            values = result.prompt_values
            if confidence.dim() == 2:
                pair_c, pair_r = token_pairs(confidence, mask, rewards)
                pair_v = None if values is None else values.unsqueeze(1).expand_as(pair_c)
            else:
                pair_c, pair_r, pair_v = confidence, rewards, values
            self.calibrator.add(
                gather(pair_c).flatten(),
                gather(pair_r).flatten(),
                None if pair_v is None else gather(pair_v).flatten(),
            )
        if self.tracker is None:
            return
        rhos = None
        if self.tracker.adaptive:
            drift = gather(inputs["cgpo_tracker_drift"])
            rhos = adaptive_rho(drift, self.tracker.rho_min)
            measured = ~torch.isnan(drift)
            if measured.any():
                self._metrics["train"]["cgpo/tracker_drift"].append(drift[measured].mean().item())
                self._metrics["train"]["cgpo/tracker_rho"].append(rhos[measured].mean().item())
        self.tracker.update(keys.tolist(), gather(rewards), rhos)
        if self.tracker.adaptive:
            # the responses of this visit, with their log-probs under the policy that sampled them
            source = inputs.get("old_per_token_logps")
            source = logps if source is None else source
            pad = self.accelerator.pad_across_processes
            self.tracker.store(
                keys.tolist(),
                gather(pad(inputs["completion_ids"], dim=1, pad_index=self._tokenizer.pad_token_id)),
                gather(pad(source.float(), dim=1)),
                gather(pad(inputs["completion_mask"], dim=1)),
            )

    # ------------------------------------------------------------------ logging
    def _log_cgpo_metrics(self, rewards, confidence, values, result: AdvantageOutputs, mask, entropies) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        per_completion = lambda x: x if x.dim() == 1 else masked_mean(x, mask)  # noqa: E731
        all_r = gather(rewards)
        keep = ~torch.isnan(all_r)
        r = all_r[keep]
        advantages = gather(per_completion(result.advantages))[keep]
        baseline = gather(per_completion(result.baseline).float())[keep]
        metrics["cgpo/reward"].append(r.mean().item() if r.numel() else math.nan)
        metrics["cgpo/baseline"].append(baseline.mean().item() if r.numel() else math.nan)
        metrics["cgpo/abs_gap"].append((r - baseline).abs().mean().item() if r.numel() else math.nan)
        metrics["cgpo/advantage_mean"].append(advantages.mean().item() if r.numel() else math.nan)
        metrics["cgpo/advantage_std"].append(advantages.std().item() if r.numel() > 1 else 0.0)
        all_zero = bool(r.numel()) and bool((gather(result.advantages.abs().amax().reshape(1)) == 0).all())
        metrics["cgpo/zero_advantage_batch"].append(float(all_zero))
        if all_zero:
            logger.warning(
                "every advantage of this batch is exactly 0 (%d scored completions, rewards %s): the step carries "
                "no learning signal. With baseline=%r this happens when all rewards are equal; check the reward "
                "functions, or use a baseline that is not the batch's own mean",
                r.numel(),
                sorted(set(r.tolist()))[:5],
                self.args.baseline,
            )
        if confidence is not None:
            c = gather(per_completion(confidence))[keep]
            metrics["cgpo/confidence"].append(c.mean().item() if c.numel() else math.nan)
            metrics["cgpo/ece"].append(expected_calibration_error(c, r))
            if c.numel() > 1 and r.std() > 0 and c.std() > 0:
                metrics["cgpo/confidence_reward_corr"].append(torch.corrcoef(torch.stack([c, r]))[0, 1].item())
            if self.calibrator is not None and self.calibrator.fitted:
                values = result.prompt_values
                if values is not None and confidence.dim() == 2:
                    values = values.unsqueeze(1)
                calibrated = self.calibrator(confidence, values)
                metrics["cgpo/confidence_calibrated"].append(
                    gather(per_completion(calibrated))[keep].mean().item() if c.numel() else math.nan
                )
        if values is not None:
            metrics["cgpo/tracker_seen"].append(float((~torch.isnan(gather(values))).float().mean()))
            metrics["cgpo/tracker_prompts"].append(float(len(self.tracker)))
        if entropies is not None:
            totals = self.accelerator.reduce(torch.stack([(entropies.detach() * mask).sum(), mask.sum()]), "sum")
            entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if self._entropy_ref is None and mode == "train":
                self._entropy_ref = entropy
            if self._entropy_ref:
                metrics["cgpo/entropy_ratio"].append(entropy / self._entropy_ref)

    # ------------------------------------------------------------------ token statistics from the fused head
    def _fused_target(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    @contextmanager
    def _capture_token_statistics(self):
        """Around one loss pass: record the fused head's outputs (and, for `max_prob`, the hidden states it
        projects). Both the wrapper and the hook are removed on exit, so the model never refers to the trainer."""
        captured = _TokenCapture()
        if not self._token_level:
            yield captured
            return
        target = self._fused_target()
        fused_forward = target.forward

        @functools.wraps(type(target).forward)
        def forward(*args, **kwargs):
            output = fused_forward(*args, **kwargs)
            if kwargs.get("fused_lm_head"):
                captured.outputs.append((output, kwargs.get("labels")))
            return output

        handle = None
        if "max_logprob" in self.confidence_estimator.requires:
            handle = target.base_model.register_forward_hook(
                lambda module, args, output: captured.hidden.append(output.last_hidden_state.detach())
            )
        target.forward = forward
        try:
            yield captured
        finally:
            target.forward = fused_forward
            if handle is not None:
                handle.remove()

    def _max_logprob(self, captured: _TokenCapture, logits_to_keep: int) -> torch.Tensor:
        """log max_v p(v | y<t) at the completion positions, from the hidden states the loss pass projected."""
        target = self._fused_target()
        lm_head = target.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if type(weight).__name__ == "DTensor":  # FSDP2 shards the head; the fused head gathers it the same way
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        scale, softcap = _logit_transform(target.config.get_text_config())
        rows = []
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 shards the head outside its own forward
            for hidden, (_, labels) in zip(captured.hidden, captured.outputs):
                hidden = hidden[:, :-1][:, -logits_to_keep:]
                valid = labels[:, 1:][:, -logits_to_keep:] != -100
                out = torch.zeros(valid.shape, device=hidden.device)
                out[valid] = max_logprob(hidden[valid], weight, bias, scale, softcap, self.temperature)
                rows.append(out)
        return torch.cat(rows)

    # ------------------------------------------------------------------ state saved with checkpoints
    def _cgpo_state_dict(self) -> dict:
        state: dict[str, Any] = {"entropy_ref": self._entropy_ref}
        if self.calibrator is not None:
            state["calibrator"] = self.calibrator.state_dict()
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def _cgpo_load_state_dict(self, state: dict, checkpoint: str) -> None:
        self._entropy_ref = state.get("entropy_ref")
        for name, part in (("calibrator", self.calibrator), ("tracker", self.tracker)):
            if part is None:
                continue
            if name not in state:
                warn_missing_state(checkpoint, f"{STATE_FILE}['{name}']", f"the {name} starts afresh")
                continue
            part.load_state_dict(state[name])

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files: its trainer_state.json, written last, marks a complete checkpoint.
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            state = self._cgpo_state_dict()
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(state, f)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_cgpo_state(checkpoint)

    def _load_cgpo_state(self, checkpoint: str) -> None:
        """Restore the online calibration and the entropy reference saved next to a checkpoint."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            warn_missing_state(
                checkpoint, STATE_FILE, "the calibration, the prompt tracker and the entropy reference start afresh"
            )
            return
        with open(path) as f:
            state = json.load(f)
        self._cgpo_load_state_dict(state, checkpoint)


@torch.no_grad()
def max_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """log max_v p(v) of `hidden @ weight.T` for (N, H) hidden states, in chunks of at most `chunk_bytes` of fp32
    logits (`MAX_PROB_CHUNK_BYTES` by default).

    The logits get the transform TRL's fused head applies (logit scale, soft-capping, temperature), so this is the
    maximum of the distribution the training log-probs come from.
    """
    chunk_bytes = MAX_PROB_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, chunk_bytes // (4 * weight.size(0)))
    out = torch.empty(hidden.size(0), device=hidden.device)
    for start in range(0, hidden.size(0), rows):
        logits = torch.nn.functional.linear(hidden[start : start + rows].to(weight.dtype), weight, bias).float()
        logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        out[start : start + rows] = logits.max(-1).values - logits.logsumexp(-1)
    return out


def _logit_transform(text_config) -> tuple[float, float | None]:
    """The (logit scale, soft-cap) TRL's fused LM head applies before the temperature (trl.add_fused_lm_head)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)
