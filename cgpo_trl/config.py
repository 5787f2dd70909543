"""`CGPOConfig`: `GRPOConfig` plus the fields of the confidence-guided advantage."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .confidence import CALIBRATIONS, LEVELS, SPANS, get_confidence_estimator

DEFAULT_ESTIMATOR = {"token": "max_prob", "sequence": "geo_mean"}


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
        if self.reward_scaling not in ("weight_sum", "none"):
            raise ValueError(f"reward_scaling={self.reward_scaling!r} is not one of ('weight_sum', 'none')")
        if self.calibration_window < self.calibration_min_pairs:
            raise ValueError(
                f"calibration_window ({self.calibration_window}) must be >= calibration_min_pairs "
                f"({self.calibration_min_pairs})"
            )
