"""The CGPO advantage as one pure function of tensors, and the reward checks that feed it.

`compute_advantages` is the whole of what CGPO changes in GRPO's update: given each completion's scaled reward
``r``, what the chosen baseline needs (the model's confidence, a per-prompt value), the frozen calibration map and
a `gather` that concatenates a tensor over processes (identity on one process), it returns the advantages TRL's
loss consumes — ``(B,)`` for sequence-level baselines, ``(B, T)`` for token-level ones. The trainer only collects
the inputs, logs the outputs and updates the baseline state after the batch has been used.

Baselines (``CGPOConfig.baseline``):

* ``confidence`` — the model's own confidence ``c`` (sequence ``c(y)`` or token ``b_t``), optionally calibrated:
  ``none`` (as is), ``batch`` (``r - c`` centred over the global batch), ``online`` (``g(c)``, a map to expected
  reward fitted on earlier batches; the global batch's mean reward until it is fitted);
* ``batch_mean`` — the global batch's mean reward (with ``scale="batch"`` this is REINFORCE++ with k = 1);
* ``prompt_tracker`` — SPO's per-prompt value ``v(x)`` (`cgpo_trl.baselines.PromptTracker`); prompts never seen
  fall back to the global batch's mean reward;
* ``tracker_confidence`` — a value model from two free features: ``g(c, v(x))``, the online map of the confidence
  and the prompt's tracked value (the batch's mean reward for prompts never seen), fitted on earlier batches.

``scale="batch"`` divides by the advantages' root mean square over the global batch (over completions, or over valid
tokens for token-level advantages), plus GRPO's 1e-4: for the centred ``batch_mean`` this is GRPO's
``scale_rewards="batch"`` (with the population standard deviation), and it never divides a non-zero advantage by ~0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .confidence import CALIBRATIONS, OnlineCalibrator, masked_mean

BASELINES = ("confidence", "batch_mean", "prompt_tracker", "tracker_confidence")
CONFIDENCE_BASELINES = ("confidence", "tracker_confidence")
TRACKER_BASELINES = ("prompt_tracker", "tracker_confidence")
SCALES = ("none", "batch")
REWARD_SCALINGS = ("weight_sum", "none")
# GRPO's scale_rewards adds 1e-4 to the standard deviation; the same here so `batch` matches it.
STD_EPS = 1e-4

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class AdvantageSettings:
    baseline: str = "confidence"
    calibration: str = "online"
    scale: str = "none"
    clip: float | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("baseline", self.baseline, BASELINES),
            ("confidence_calibration", self.calibration, CALIBRATIONS),
            ("scale_rewards", self.scale, SCALES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.baseline == "tracker_confidence" and self.calibration != "online":
            raise ValueError(
                "baseline='tracker_confidence' is the online map g(confidence, prompt value): it needs "
                f"confidence_calibration='online', got {self.calibration!r}"
            )


@dataclass
class AdvantageInputs:
    """Local (this process's) tensors of one loss batch."""

    rewards: torch.Tensor
    """(B,) scaled reward per completion; NaN where no reward function scored it."""
    mask: torch.Tensor
    """(B, T) 1 for completion tokens the loss counts."""
    confidence: torch.Tensor | None = None
    """Raw confidence: (B,) sequence `c(y)` or (B, T) token `b_t`; confidence baselines only."""
    prompt_values: torch.Tensor | None = None
    """(B,) per-prompt tracker value read before this batch's update; NaN for prompts never seen."""


@dataclass
class AdvantageOutputs:
    advantages: torch.Tensor
    """(B,) or (B, T), zero on padding and on completions without a reward."""
    baseline: torch.Tensor
    """What was subtracted from r before centring and scaling, same shape as `advantages`."""
    scale: float
    """The divisor applied (1.0 unless scale="batch")."""
    prompt_values: torch.Tensor | None = None
    """(B,) the prompt values the baseline read, unseen prompts filled with the batch's mean reward."""


def compute_advantages(
    inputs: AdvantageInputs,
    settings: AdvantageSettings,
    calibrator: OnlineCalibrator | None = None,
    gather: Gather = _identity,
) -> AdvantageOutputs:
    """A = (r - baseline [- batch centre]) / [batch std], clipped; see the module docstring for each baseline."""
    rewards, mask = inputs.rewards.float(), inputs.mask.float()
    scored = ~torch.isnan(rewards)
    all_rewards = gather(rewards)
    mean_reward = torch.nanmean(all_rewards) if (~torch.isnan(all_rewards)).any() else all_rewards.new_zeros(())
    mean_reward = mean_reward.to(rewards.device)

    values = None
    if settings.baseline in TRACKER_BASELINES:
        values = _require(inputs.prompt_values, "prompt_values", settings).float()
        values = torch.where(torch.isnan(values), mean_reward, values)  # a prompt never seen: the batch's mean
    if settings.baseline == "batch_mean":
        baseline = torch.full_like(rewards, float(mean_reward))
    elif settings.baseline == "prompt_tracker":
        baseline = values
    else:
        baseline = _confidence_baseline(inputs, settings, calibrator, mean_reward, values)

    r = rewards if baseline.dim() == 1 else rewards.unsqueeze(1)
    advantages = r - baseline
    if settings.calibration == "batch" and settings.baseline in CONFIDENCE_BASELINES:
        per_completion = advantages if advantages.dim() == 1 else masked_mean(advantages, mask)
        all_gaps = gather(torch.where(scored, per_completion, torch.nan))
        centre = torch.nanmean(all_gaps) if (~torch.isnan(all_gaps)).any() else all_gaps.new_zeros(())
        advantages = advantages - centre.to(advantages.device)

    advantages = _zero_unscored(advantages, scored, mask)
    scale = 1.0
    if settings.scale == "batch":
        scale = _global_rms(advantages, scored, mask, gather) + STD_EPS
        advantages = advantages / scale
    if settings.clip is not None:
        advantages = advantages.clamp(-settings.clip, settings.clip)
    return AdvantageOutputs(advantages=advantages, baseline=baseline, scale=scale, prompt_values=values)


def _confidence_baseline(inputs, settings, calibrator, mean_reward, values) -> torch.Tensor:
    confidence = _require(inputs.confidence, "confidence", settings).float()
    if settings.calibration != "online":
        return confidence
    if calibrator is None:
        raise ValueError("confidence_calibration='online' needs an OnlineCalibrator")
    if not calibrator.fitted:  # cold start: the global batch's mean reward, never "no baseline at all"
        return torch.full_like(confidence, float(mean_reward))
    if values is not None:
        return calibrator(confidence, values.unsqueeze(1) if confidence.dim() == 2 else values)
    return calibrator(confidence)


def _require(value, name: str, settings: AdvantageSettings) -> torch.Tensor:
    if value is None:
        raise ValueError(f"baseline={settings.baseline!r} needs `{name}` in AdvantageInputs")
    return value


def _zero_unscored(advantages: torch.Tensor, scored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        return torch.where(scored, advantages, torch.zeros_like(advantages))
    return torch.where(scored.unsqueeze(1), advantages, torch.zeros_like(advantages)) * mask


def _global_rms(advantages, scored, mask, gather) -> float:
    """Root mean square of the advantages over every process's completions (or valid tokens), from gathered sums.

    For a centred baseline (`batch_mean`) this is their standard deviation; unlike the standard deviation it is 0
    only when every advantage is 0, so an uncentred token baseline with identical advantages is never divided by ~0.
    """
    weights = scored.float() if advantages.dim() == 1 else mask * scored.float().unsqueeze(1)
    local = torch.stack([(advantages**2 * weights).sum(), weights.sum()]).double()
    total = gather(local.reshape(1, 2)).reshape(-1, 2).sum(0)
    return math.sqrt(float(total[0]) / float(total[1])) if float(total[1]) > 0 else 0.0


def scale_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, scaling: str) -> torch.Tensor:
    """Weighted reward per completion; ``weight_sum`` divides by the weights of the functions that scored it.

    A function that returned None (NaN) for a completion is left out of both sums, so ``r`` stays in [0, 1] when
    every function does and no weight is negative. A completion no function scored gets NaN.
    """
    if scaling not in REWARD_SCALINGS:
        raise ValueError(f"reward_scaling={scaling!r} is not one of {REWARD_SCALINGS}")
    present = ~torch.isnan(rewards_per_func)
    weighted = (torch.nan_to_num(rewards_per_func, nan=0.0) * weights).sum(-1)
    if scaling == "weight_sum":
        norm = (present.float() * weights).sum(-1)
        weighted = weighted / norm.where(norm != 0, torch.ones_like(norm))
    return weighted.masked_fill(~present.any(-1), math.nan)


@dataclass
class RewardProblem:
    function: str
    kind: str  # "non-finite" or "out of range"
    count: int
    example: float


def check_rewards(
    rewards_per_func: torch.Tensor, names: list[str], unit_range: bool
) -> tuple[torch.Tensor, list[RewardProblem]]:
    """Reward values that must never reach the weights: ±inf becomes "no reward" (NaN, the value TRL uses for a
    function that returned None) and, when the baseline needs rewards in [0, 1], values outside it are clipped.

    Returns the cleaned tensor and one `RewardProblem` per function and kind, naming the function, so the caller
    can warn. (NaN itself is TRL's "None": left as is.)
    """
    cleaned = rewards_per_func.clone()
    problems = []
    for i, name in enumerate(names):
        column = cleaned[:, i]
        infinite = torch.isinf(column)
        if infinite.any():
            problems.append(RewardProblem(name, "non-finite", int(infinite.sum()), float(column[infinite][0])))
            column[infinite] = math.nan
        if unit_range:
            outside = (column < 0) | (column > 1)  # NaN compares False
            if outside.any():
                problems.append(RewardProblem(name, "out of range", int(outside.sum()), float(column[outside][0])))
                column.clamp_(0.0, 1.0)
    return cleaned, problems
