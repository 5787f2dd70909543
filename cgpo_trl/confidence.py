"""Confidence estimators, calibration and the CGPO advantage.

CGPO replaces GRPO's group-normalised advantage by the gap between a completion's reward ``r`` (in [0, 1]) and the
model's confidence ``c``. Two levels are implemented:

* ``sequence`` — the paper's literal form: one ``c(y)`` per completion from the sampled tokens' own log-probs
  (``geo_mean``, ``arith_mean``, ``min_prob``), ``A = r - c(y)``. Because ``c(y)`` depends on the sample it
  multiplies, ``E[c(y) grad log p(y)] != 0``: it is not a baseline but an extra, entropy-raising gradient term
  (docs/cgpo_algebra.md). Kept available and documented as the paper's form.
* ``token`` — a baseline ``b_t`` per completion token computed from the policy's distribution at position t
  *before* the token is sampled (``max_prob = max_v p(v|y<t)``, ``self_agreement = sum_v p(v|y<t)^2``,
  ``neg_entropy = exp(-H_t)``), ``A_t = r - b_t``. ``b_t`` depends only on ``y<t``, so ``E_{y_t}[b_t grad log
  p(y_t|y<t)] = 0``: the policy gradient stays unbiased.

Every quantity is computed from tensors the training step already has (no extra forward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

LEVELS = ("sequence", "token")
CALIBRATIONS = ("none", "batch", "online")
SPANS = ("completion", "answer")

# Per-token statistics of the next-token distribution an estimator can ask for. `log_sum_sq_probs` and `entropy`
# come free with TRL's fused LM head; `max_logprob` costs one extra (no-grad) LM-head projection of the completion
# positions' hidden states — still no extra forward pass through the model.
TOKEN_STATS = ("entropy", "log_sum_sq_probs", "max_logprob")


@dataclass
class ConfidenceInputs:
    """What an estimator sees for a batch of completions; all tensors are detached and shaped (B, T)."""

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    max_logprob: torch.Tensor | None = None


@dataclass(frozen=True)
class ConfidenceEstimator:
    name: str
    level: str
    fn: Callable[[ConfidenceInputs], torch.Tensor]
    requires: tuple[str, ...] = ()


_REGISTRY: dict[tuple[str, str], ConfidenceEstimator] = {}


def register_confidence_estimator(name: str, level: str, requires: tuple[str, ...] = ()):
    """Register ``fn(inputs: ConfidenceInputs) -> Tensor`` ((B,) for ``sequence``, (B, T) for ``token``)."""
    if level not in LEVELS:
        raise ValueError(f"confidence level {level!r} is not one of {LEVELS}")
    unknown = set(requires) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"estimator {name!r} requires unknown statistics {sorted(unknown)}; known: {TOKEN_STATS}")

    def decorator(fn):
        _REGISTRY[(level, name)] = ConfidenceEstimator(name=name, level=level, fn=fn, requires=tuple(requires))
        return fn

    return decorator


def list_confidence_estimators(level: str | None = None) -> list[str]:
    return sorted(name for lvl, name in _REGISTRY if level is None or lvl == level)


def get_confidence_estimator(confidence: str | Callable, level: str) -> ConfidenceEstimator:
    """Resolve a registry name or a callable into an estimator for ``level``."""
    if level not in LEVELS:
        raise ValueError(f"confidence_level={level!r} is not one of {LEVELS}")
    if callable(confidence):
        requires = tuple(getattr(confidence, "requires", ())) or (
            ("log_sum_sq_probs", "entropy") if level == "token" else ()
        )
        return ConfidenceEstimator(getattr(confidence, "__name__", "custom"), level, confidence, requires)
    if (level, confidence) not in _REGISTRY:
        raise ValueError(
            f"confidence={confidence!r} is not a {level}-level estimator; choose one of "
            f"{list_confidence_estimators(level)} (or pass a callable)"
        )
    return _REGISTRY[(level, confidence)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (along ``dim``, or everything with ``dim=None``); 0 where
    nothing is valid. The one masked mean used for confidences, advantages and logging."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


@register_confidence_estimator("geo_mean", "sequence")
def _geo_mean(inputs: ConfidenceInputs) -> torch.Tensor:
    """exp of the mean token log-prob: the geometric mean of the sampled tokens' probabilities."""
    return torch.exp(masked_mean(inputs.logps, inputs.mask))


@register_confidence_estimator("arith_mean", "sequence")
def _arith_mean(inputs: ConfidenceInputs) -> torch.Tensor:
    return masked_mean(torch.exp(inputs.logps), inputs.mask)


@register_confidence_estimator("min_prob", "sequence")
def _min_prob(inputs: ConfidenceInputs) -> torch.Tensor:
    probs = torch.exp(inputs.logps).masked_fill(inputs.mask == 0, math.inf).amin(-1)
    return torch.where(torch.isinf(probs), torch.zeros_like(probs), probs)


@register_confidence_estimator("none", "sequence")
def _no_confidence(inputs: ConfidenceInputs) -> torch.Tensor:
    """c = 0: with ``confidence_calibration="batch"`` this is the batch-mean-reward baseline (the control)."""
    return torch.zeros(inputs.logps.size(0), device=inputs.logps.device)


@register_confidence_estimator("max_prob", "token", requires=("max_logprob",))
def _max_prob(inputs: ConfidenceInputs) -> torch.Tensor:
    return torch.exp(inputs.max_logprob)


@register_confidence_estimator("self_agreement", "token", requires=("log_sum_sq_probs",))
def _self_agreement(inputs: ConfidenceInputs) -> torch.Tensor:
    """sum_v p(v|y<t)^2: the probability that two independent samples at position t agree."""
    return torch.exp(inputs.log_sum_sq_probs)


@register_confidence_estimator("neg_entropy", "token", requires=("entropy",))
def _neg_entropy(inputs: ConfidenceInputs) -> torch.Tensor:
    """exp(-H_t): one over the perplexity of the next-token distribution."""
    return torch.exp(-inputs.entropy)


def span_mask_from_text(pieces: list[str], open_marker: str, close_marker: str) -> list[int]:
    """1 for tokens whose text overlaps the inside of the first ``open_marker … close_marker`` pair, else 0 (a
    token that straddles a marker counts).

    ``pieces`` are the decoded tokens of one completion. Without an opening marker every token counts (the answer
    span is "when present"); an opening marker without a closing one extends the span to the end.
    """
    text = "".join(pieces)
    start = text.find(open_marker)
    if start < 0:
        return [1] * len(pieces)
    start += len(open_marker)
    end = text.find(close_marker, start)
    end = len(text) if end < 0 else end
    mask, pos = [], 0
    for piece in pieces:
        piece_start, pos = pos, pos + len(piece)
        mask.append(int(pos > start and piece_start < end))
    return mask


@dataclass
class OnlineCalibrator:
    """Monotone map g: confidence (and optionally a per-prompt value) -> expected reward, refitted on a sliding window
    of recent pairs (one per completion for sequence confidences, a few per completion for token baselines: see
    `token_pairs`).

    g(c) = sigmoid(a * logit(c) + b) with a >= 0 (Platt scaling with soft targets, fitted in float64). With
    ``with_values=True`` the map also reads the prompt's tracked value v (`baseline="tracker_confidence"`):
    g(c, v) = sigmoid(a * logit(c) + a_value * logit(v) + b), a, a_value >= 0 — a two-feature value model whose
    features depend only on the prompt and the tokens before each position, so subtracting it stays unbiased.

    Pairs are `add`ed when a generated batch is first scored and `commit`ted (window update + refit) only after the
    batch's last use, so g never scores a batch it was fitted on, even when TRL reuses a generation
    (`num_iterations > 1`, `steps_per_generation > 1`). The window holds pairs gathered from every process, so every
    process fits the same map. Until ``min_pairs`` pairs have been committed the map is not fitted (`fitted` is
    False) and the caller picks the fallback (the trainer uses the global batch's mean reward).
    """

    window: int = 2048
    min_pairs: int = 64
    with_values: bool = False
    confidences: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    pending_confidences: list[float] = field(default_factory=list)
    pending_values: list[float] = field(default_factory=list)
    pending_rewards: list[float] = field(default_factory=list)
    a: float | None = None
    a_value: float | None = None
    b: float | None = None

    def __post_init__(self):
        if self.min_pairs < 2:
            raise ValueError(
                f"calibration_min_pairs must be >= 2 (a map needs pairs to be fitted on), got {self.min_pairs}"
            )
        if self.window < self.min_pairs:
            raise ValueError(f"calibration_window ({self.window}) must be >= calibration_min_pairs ({self.min_pairs})")

    @property
    def fitted(self) -> bool:
        return self.a is not None

    def __call__(self, c: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("the online calibration map is not fitted yet; check `fitted` first")
        logit = self.a * _logit(c) + self.b
        if self.with_values:
            if v is None:
                raise ValueError("this calibration map also reads the prompt value: pass `v`")
            logit = logit + self.a_value * _logit(v.expand_as(c) if v.dim() < c.dim() else v)
        return torch.sigmoid(logit).to(c.dtype)

    def add(self, c: torch.Tensor, r: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Queue pairs for the next `commit` (pairs with a NaN are dropped)."""
        if self.with_values and v is None:
            raise ValueError("this calibration map also reads the prompt value: pass `v`")
        keep = ~(torch.isnan(c) | torch.isnan(r))
        if self.with_values:
            keep &= ~torch.isnan(v)
            self.pending_values.extend(v[keep].tolist())
        self.pending_confidences.extend(c[keep].tolist())
        self.pending_rewards.extend(r[keep].tolist())

    def commit(self) -> None:
        """Move the queued pairs into the window and refit."""
        if not self.pending_rewards:
            return
        self.confidences.extend(self.pending_confidences)
        self.values.extend(self.pending_values)
        self.rewards.extend(self.pending_rewards)
        self.pending_confidences, self.pending_values, self.pending_rewards = [], [], []
        del self.confidences[: -self.window], self.values[: -self.window], self.rewards[: -self.window]
        if len(self.rewards) >= self.min_pairs:
            features = [np.asarray(self.confidences)] + ([np.asarray(self.values)] if self.with_values else [])
            slopes, self.b = _fit_platt(np.stack(features, axis=1), np.asarray(self.rewards))
            self.a = slopes[0]
            self.a_value = slopes[1] if self.with_values else None

    _STATE = (
        "window",
        "min_pairs",
        "with_values",
        "confidences",
        "values",
        "rewards",
        "pending_confidences",
        "pending_values",
        "pending_rewards",
        "a",
        "a_value",
        "b",
    )
    _OPTIONAL = {"with_values": False, "values": [], "a_value": None}  # absent from states saved before they existed

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        optional = {*self._OPTIONAL, *(key for key in self._STATE if key.startswith("pending"))}
        missing = [key for key in self._STATE if key not in state and key not in optional]
        if missing:
            raise ValueError(f"calibration state is missing {missing}")
        if bool(state.get("with_values", False)) != self.with_values:
            raise ValueError(
                f"the saved calibration map {'reads' if state.get('with_values') else 'does not read'} prompt values "
                f"and this one {'does' if self.with_values else 'does not'}: was the baseline changed?"
            )
        for key in self._STATE:
            default = self._OPTIONAL.get(key, [])
            setattr(self, key, state.get(key, default))


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.logit(x.double().clamp(1e-4, 1 - 1e-4))


def _fit_platt(features: np.ndarray, r: np.ndarray, l2: float = 1e-3) -> tuple[list[float], float]:
    """Fit g = sigmoid(sum_j a_j * logit(x_j) + b), every a_j >= 0, by soft-target cross-entropy.

    `features` is (n, k) of values in [0, 1]. Confidences crowd near 1 (logits with a large mean and a small spread),
    which makes plain Newton steps diverge; the fit runs on standardised logits with a bound-constrained quasi-Newton
    solver and is mapped back. Returns the slopes and the intercept.
    """
    clipped = np.clip(features, 1e-4, 1 - 1e-4)
    x = np.log(clipped) - np.log1p(-clipped)
    r = np.clip(r, 0.0, 1.0)
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (x - mu) / sd
    k = z.shape[1]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ w[:k] + w[k]
        value = np.mean(np.logaddexp(0.0, logits) - r * logits) + 0.5 * l2 * float(w[:k] @ w[:k])
        residual = expit(logits) - r
        return value, np.concatenate([z.T @ residual / len(r) + l2 * w[:k], [np.mean(residual)]])

    mean = float(np.clip(r.mean(), 1e-4, 1 - 1e-4))
    start = np.concatenate([np.zeros(k), [math.log(mean / (1 - mean))]])
    w = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * k + [(None, None)]).x
    slopes = w[:k] / sd
    return [float(a) for a in slopes], float(w[k] - slopes @ mu)


def token_pairs(
    baselines: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, per_completion: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_t, r) pairs for fitting the online map at token level: `per_completion` evenly spaced valid tokens of each
    completion (all of them when it has fewer), NaN-padded to (B, per_completion) so processes can gather them.

    The token baseline is mapped token by token, so its map must be fitted on token-level pairs: fitting it on each
    completion's mean baseline and applying it to every b_t would calibrate the mean, not the tokens (Jensen).
    """
    c = torch.full((baselines.size(0), per_completion), math.nan, device=baselines.device)
    r = torch.full_like(c, math.nan)
    for row in range(baselines.size(0)):
        valid = mask[row].nonzero().squeeze(-1)
        if valid.numel() == 0:
            continue
        if valid.numel() > per_completion:
            valid = valid[torch.linspace(0, valid.numel() - 1, per_completion, device=valid.device).round().long()]
        c[row, : valid.numel()] = baselines[row, valid].float()
        r[row, : valid.numel()] = rewards[row].float()
    return c, r


def expected_calibration_error(c: torch.Tensor, r: torch.Tensor, bins: int = 10) -> float:
    """ECE of confidence against reward: sum over equal-width bins of |mean c - mean r| weighted by bin mass."""
    keep = ~(torch.isnan(c) | torch.isnan(r))
    c, r = c[keep].double(), r[keep].double()
    if c.numel() == 0:
        return math.nan
    index = (c.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in index.unique():
        sel = index == b
        ece += sel.double().mean().item() * abs(c[sel].mean().item() - r[sel].mean().item())
    return ece
