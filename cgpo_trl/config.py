"""`CGPOConfig`: `GRPOConfig` plus the fields of the confidence-guided advantage."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .advantages import BASELINES, CONFIDENCE_BASELINES, REWARD_SCALINGS, SCALES, TRACKER_BASELINES
from .baselines import RHO_SCHEDULES, PromptTracker
from .confidence import CALIBRATIONS, LEVELS, SPANS, get_confidence_estimator

DEFAULT_ESTIMATOR = {"token": "max_prob", "sequence": "geo_mean"}
CONFIDENCE_LOGPS = ("policy", "sampler")
# Loss aggregations that divide each completion by its own length: any non-zero baseline then adds a bias of the
# order of the reward signal (docs/cgpo_algebra.md, exact toy table).
LENGTH_NORMALISED_LOSSES = ("grpo", "sapo")


class _SingleSample(int):
    """`1` that passes `GRPOConfig`'s `num_generations < 2` check, used only while the parent validates.

    Every other check of `GRPOConfig.__post_init__` (batch divisibility, vLLM importance sampling, ...) still runs
    on the real value, which is restored right after.
    """

    def __lt__(self, other):
        return False if other == 2 else int(self) < other


@dataclass
class CGPOConfig(GRPOConfig):
    r"""
    Configuration for [`CGPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    CGPO draws `num_generations` *independent* completions per prompt (1 by default) and gives each one the advantage
    `A = r - c`: its reward `r`, scaled into [0, 1], minus the model's confidence `c`. Rewards are never normalised
    within a group.

    Parameters:
        baseline (`str`, defaults to `"confidence"`):
            What is subtracted from `r`: `"confidence"` (the model's confidence, below), `"batch_mean"` (the global
            batch's mean reward; with `scale_rewards="batch"` this is REINFORCE++ with one sample), `"prompt_tracker"`
            (SPO's per-prompt Beta value tracker, state shared across processes and saved in checkpoints) or
            `"tracker_confidence"` (an online value model `g(c, v(x))` of the confidence and the tracked prompt value,
            fitted on earlier batches; needs `confidence_calibration="online"`).
        scale_rewards (`str`, defaults to `"none"`):
            `"none"` or `"batch"` (divide the advantages by their root mean square over the global batch: for the
            centred `batch_mean` baseline, their standard deviation, as GRPO's `"batch"`).
            GRPO's `"group"` has no meaning without groups and is refused.
        tracker_rho (`float`, defaults to `0.9`):
            Forgetting factor of the per-prompt tracker: `alpha <- rho * alpha + r`, `beta <- rho * beta + 1 - r`.
        tracker_rho_schedule (`str`, defaults to `"constant"`):
            `"constant"` (`tracker_rho`) or `"kl"`: SPO's KL-adaptive factor `clip(2^(-D / 0.06), tracker_rho_min,
            0.96)`, with `D` the mean absolute change of the log-probs of the prompt's last stored response since its
            last visit. Costs one extra no-grad forward pass per generation batch that revisits a prompt (over the
            stored responses) and keeps one response per prompt in memory and in checkpoints.
        tracker_rho_min (`float`, defaults to `0.875`):
            Lower clip of the KL-adaptive factor (SPO's default).
        confidence_logps (`str`, defaults to `"policy"`):
            Log-probs a sequence-level confidence is computed from: `"policy"` (TRL's old-policy log-probs when the
            step has them, else the loss pass's own) or `"sampler"` (vLLM's sampling log-probs when present; they
            depend on the server's sampling settings).
        confidence_level (`str`, defaults to `"token"`):
            `"sequence"`: one confidence `c(y)` per completion from the sampled tokens' own probabilities (the paper's
            literal form). `"token"`: a baseline `b_t` per completion token from the policy's distribution at that
            position before sampling, `A_t = r - b_t` (unbiased).
        confidence (`str`, callable or `None`, defaults to `None`):
            Registry name (`"geo_mean"`, `"arith_mean"`, `"min_prob"`, `"none"` for `"sequence"`; `"max_prob"`,
            `"self_agreement"`, `"neg_entropy"` for `"token"`) or a callable `fn(ConfidenceInputs) -> Tensor`.
            `None` picks the level's default: `"max_prob"` (token; the measured default, see the README) or
            `"geo_mean"` (sequence).
        confidence_span (`str`, defaults to `"completion"`):
            Tokens a sequence confidence is computed over: `"completion"` (all) or `"answer"` (only those between
            `answer_markers`, when present). Token baselines already condition on each position, so `"answer"`
            applies to `"sequence"` only.
        answer_markers (`list[str]`, defaults to `["<answer>", "</answer>"]`):
            Opening and closing markers of the answer span.
        confidence_calibration (`str`, defaults to `"online"`):
            `"none"`: `A = r - c`. `"batch"`: `A = (r - c) - mean_batch(r - c)` over the global batch of the loss
            step. `"online"`: `A = r - g(c)` with `g` a monotone map from confidence to expected reward fitted on a
            sliding window of recent (c, r) pairs from all processes; its state is saved in checkpoints.
        calibration_window (`int`, defaults to `2048`):
            Number of recent (c, r) pairs the online calibration is fitted on.
        calibration_min_pairs (`int`, defaults to `64`):
            Pairs needed before the online map is fitted; until then `g` is the window's mean reward.
        advantage_clip (`float` or `None`, defaults to `None`):
            Symmetric clip of the advantage.
        reward_scaling (`str`, defaults to `"weight_sum"`):
            `"weight_sum"`: `r = sum_i w_i r_i / sum_i w_i` (in [0, 1] when every reward is); `"none"`: `sum_i w_i r_i`.
    """

    baseline: str = field(
        default="confidence",
        metadata={
            "help": "`confidence`, `batch_mean`, `prompt_tracker` or `tracker_confidence`.",
            "choices": list(BASELINES),
        },
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "`none` or `batch` (divide advantages by their global RMS). `group` is refused."},
    )
    tracker_rho: float = field(default=0.9, metadata={"help": "Forgetting factor of the per-prompt tracker."})
    tracker_rho_schedule: str = field(
        default="constant",
        metadata={
            "help": "`constant` (tracker_rho) or `kl` (SPO's KL-adaptive forgetting factor).",
            "choices": list(RHO_SCHEDULES),
        },
    )
    tracker_rho_min: float = field(default=0.875, metadata={"help": "Lower clip of the KL-adaptive factor."})
    confidence_logps: str = field(
        default="policy",
        metadata={
            "help": "Sequence confidence from the `policy`'s own log-probs or the `sampler`'s (vLLM).",
            "choices": list(CONFIDENCE_LOGPS),
        },
    )
    num_generations: int | None = field(
        default=1,
        metadata={"help": "Independent completions per prompt (1 = single-sample CGPO). Never group-normalised."},
    )
    confidence_level: str = field(
        default="token",
        metadata={
            "help": "`sequence` (paper's c(y)) or `token` (pre-sampling baseline b_t).",
            "choices": list(LEVELS),
        },
    )
    # Typed `str` so that TrlParser / HfArgumentParser read it from YAML and the CLI; a callable is accepted too.
    confidence: str | None = field(
        default=None,
        metadata={
            "help": "Confidence estimator: registry name for the chosen level, or a callable. Default: "
            "`max_prob` for `token`, `geo_mean` for `sequence`."
        },
    )
    confidence_span: str = field(
        default="completion",
        metadata={"help": "`completion` or `answer` (sequence level only).", "choices": list(SPANS)},
    )
    answer_markers: list[str] = field(
        default_factory=lambda: ["<answer>", "</answer>"],
        metadata={"help": "Opening and closing markers of the answer span for confidence_span='answer'."},
    )
    confidence_calibration: str = field(
        default="online",
        metadata={
            "help": "`none`, `batch` (centre r - c over the batch) or `online` (fitted map g(c)).",
            "choices": list(CALIBRATIONS),
        },
    )
    calibration_window: int = field(default=2048, metadata={"help": "Recent (c, r) pairs the online map is fit on."})
    calibration_min_pairs: int = field(default=64, metadata={"help": "Pairs needed before fitting the online map."})
    advantage_clip: float | None = field(default=None, metadata={"help": "Symmetric clip of the advantage."})
    reward_scaling: str = field(
        default="weight_sum",
        metadata={
            "help": "`weight_sum` (weighted mean, r in [0, 1]) or `none` (weighted sum).",
            "choices": ["weight_sum", "none"],
        },
    )

    def __post_init__(self):
        if self.num_generations is None or self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        single = self.num_generations == 1
        if single:
            self.num_generations = _SingleSample(1)
        try:
            super().__post_init__()
        finally:
            if single:
                self.num_generations = 1
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be >= 1, got {self.num_generations_eval}")
        if self.confidence is None:
            self.confidence = DEFAULT_ESTIMATOR.get(self.confidence_level, "max_prob")
        get_confidence_estimator(self.confidence, self.confidence_level)  # fails early on a bad name
        if self.confidence_span not in SPANS:
            raise ValueError(f"confidence_span={self.confidence_span!r} is not one of {SPANS}")
        if self.confidence_span == "answer" and self.confidence_level == "token":
            raise ValueError(
                "confidence_span='answer' applies to confidence_level='sequence'; token baselines b_t are taken at "
                "every completion token"
            )
        if self.confidence_calibration not in CALIBRATIONS:
            raise ValueError(f"confidence_calibration={self.confidence_calibration!r} is not one of {CALIBRATIONS}")
        if len(self.answer_markers) != 2 or not all(self.answer_markers):
            raise ValueError(f"answer_markers must be two non-empty strings, got {self.answer_markers!r}")
        if self.advantage_clip is not None and self.advantage_clip <= 0:
            raise ValueError(f"advantage_clip must be positive, got {self.advantage_clip}")
        if self.reward_scaling not in REWARD_SCALINGS:
            raise ValueError(f"reward_scaling={self.reward_scaling!r} is not one of {REWARD_SCALINGS}")
        if self.calibration_min_pairs < 2:
            raise ValueError(f"calibration_min_pairs must be >= 2, got {self.calibration_min_pairs}")
        if self.calibration_window < self.calibration_min_pairs:
            raise ValueError(
                f"calibration_window ({self.calibration_window}) must be >= calibration_min_pairs "
                f"({self.calibration_min_pairs})"
            )
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r} is not one of {BASELINES}")
        if self.scale_rewards == "group":
            raise ValueError(
                "scale_rewards='group' normalises within groups of completions of one prompt; CGPO has no groups. "
                "Use scale_rewards='batch' (global scale) or 'none'"
            )
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is not one of {SCALES}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} normalises each reward within "
                "groups; CGPO combines rewards with `reward_scaling` (weighted mean or sum) and has no groups"
            )
        if self.confidence_logps not in CONFIDENCE_LOGPS:
            raise ValueError(f"confidence_logps={self.confidence_logps!r} is not one of {CONFIDENCE_LOGPS}")
        if self.baseline == "tracker_confidence" and self.confidence_calibration != "online":
            raise ValueError(
                "baseline='tracker_confidence' is the online map g(confidence, prompt value): it needs "
                f"confidence_calibration='online', got {self.confidence_calibration!r}"
            )
        if self.baseline in TRACKER_BASELINES:
            # the tracker checks its own settings; built here so a bad YAML value fails before any model is loaded
            PromptTracker(self.tracker_rho, self.tracker_rho_schedule, self.tracker_rho_min)
        if self.reward_weights is not None and self.needs_unit_rewards and any(w < 0 for w in self.reward_weights):
            raise ValueError(
                f"reward_weights={self.reward_weights} has a negative weight, so r can leave [0, 1]; "
                f"baseline={self.baseline!r} compares r with a value in [0, 1]. Use non-negative weights (give a "
                "penalty as 1 - penalty) or baseline='batch_mean'"
            )
        self._warn_biased_combinations()

    @property
    def needs_unit_rewards(self) -> bool:
        """Confidences and tracker values live in [0, 1], so their baselines need rewards in [0, 1]."""
        return self.baseline in CONFIDENCE_BASELINES + TRACKER_BASELINES

    def _warn_biased_combinations(self) -> None:
        """Combinations whose baseline term has a non-zero expected gradient (docs/cgpo_algebra.md, exact toys)."""
        if self.loss_type in LENGTH_NORMALISED_LOSSES:
            warnings.warn(
                f"loss_type={self.loss_type!r} divides each completion's loss by its own length, so any non-zero "
                "baseline (CGPO's, or GRPO's group mean) adds a bias comparable to the reward signal; 'dr_grpo' is "
                "exact and 'dapo' (the default) is biased only by O(1/tokens per batch). See docs/cgpo_algebra.md",
                stacklevel=4,
            )
        if self.loss_type == "vespo":
            warnings.warn(
                "loss_type='vespo' reweights completions by their importance ratios; CGPO's baselines were not "
                "analysed under it (docs/cgpo_algebra.md)",
                stacklevel=4,
            )
        uses_confidence = self.baseline in CONFIDENCE_BASELINES
        if uses_confidence and self.confidence_level == "token" and self.importance_sampling_level == "sequence":
            warnings.warn(
                "importance_sampling_level='sequence' multiplies every token by the completion's mean token "
                "advantage, which includes baselines b_t of later tokens: token-level confidence baselines are then "
                "slightly biased (docs/cgpo_algebra.md). Use importance_sampling_level='token', or a prompt-level "
                "baseline ('batch_mean', 'prompt_tracker')",
                stacklevel=4,
            )
        if uses_confidence and self.confidence_level == "sequence" and self.confidence != "none":
            warnings.warn(
                f"confidence_level='sequence' with confidence={self.confidence!r} subtracts a function of the sampled "
                "completion itself: not a baseline, it biases the gradient towards higher entropy (the paper's literal "
                "form, docs/cgpo_algebra.md). The token level is unbiased",
                stacklevel=4,
            )
