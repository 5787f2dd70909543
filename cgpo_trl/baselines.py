"""Per-prompt value tracker (SPO, arXiv 2509.13232): a persistent baseline for one rollout per prompt.

Each prompt x keeps a Beta(alpha, beta) belief about its success rate; the baseline is its mean
``v(x) = alpha / (alpha + beta)``. After a visit with reward ``r`` in [0, 1] the belief is discounted and updated,
``alpha <- rho * alpha + r``, ``beta <- rho * beta + (1 - r)``, so old evidence fades as the policy changes.
``v(x)`` is read *before* the visit's own update, so it never depends on the sample it is subtracted from.

The forgetting factor is either constant or SPO's KL-adaptive one, ``rho = clip(2^(-D / 0.06), rho_min, 0.96)``,
where ``D`` is the mean absolute change of the log-probs of the prompt's last stored response between its last visit
and now: a prompt whose answers the policy has moved away from forgets its old evidence faster.

A prompt seen for the first time has no belief: its value is the global batch's mean reward (and, with
`baseline="tracker_confidence"`, the online value model also reads the model's confidence). The state is keyed by a stable hash of
the prompt and its images, updated identically on every process from gathered keys and rewards, and saved in
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch


def prompt_key(prompt: Any, images: Any = None) -> int:
    """Stable 63-bit key of a prompt (text or conversation) and its images (pixels, not object identity).

    Stable across processes and runs (no Python `hash`), so the tracker state survives restarts and agrees between
    ranks.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(_plain(prompt), sort_keys=True, ensure_ascii=False).encode())
    for image in _as_list(images):
        if hasattr(image, "tobytes"):  # PIL image
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
        else:
            digest.update(repr(image).encode())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def _as_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _plain(value: Any) -> Any:
    """Conversation content with images replaced by a placeholder (their pixels are hashed separately)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not hasattr(v, "tobytes")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(type(value).__name__)


RHO_SCHEDULES = ("constant", "kl")
KL_RHO_HALF_DRIFT = 0.06
"""SPO's D_half: a mean absolute log-prob change of 0.06 nats halves the weight of the prompt's old evidence."""
KL_RHO_MAX = 0.96
"""SPO's upper clip of the adaptive rho (also the rho of a visit with no stored response)."""


def logprob_drift(new_logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over `mask`ed tokens of |new - old| log-probs of the same responses; NaN for rows with no token."""
    mask = mask.float()
    total = ((new_logps.float() - old_logps.float()).abs() * mask).sum(-1)
    count = mask.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.full_like(total, math.nan))


def adaptive_rho(
    drift: torch.Tensor, rho_min: float, half_drift: float = KL_RHO_HALF_DRIFT, rho_max: float = KL_RHO_MAX
) -> torch.Tensor:
    """SPO's forgetting factor ``clip(2^(-D / half_drift), rho_min, rho_max)``; a NaN drift (no stored response)
    gives ``rho_max``."""
    rho = torch.pow(2.0, -drift.float() / half_drift).clamp(min=rho_min, max=rho_max)
    return torch.where(torch.isnan(drift), torch.full_like(rho, rho_max), rho)


@dataclass
class PromptTracker:
    """Beta(alpha, beta) success tracker per prompt key, with forgetting factor ``rho`` in (0, 1].

    With ``rho_schedule="kl"`` each visit brings its own rho (`adaptive_rho` of the drift the trainer measured) and
    the tracker keeps every prompt's last response (token ids and their log-probs then) to measure the next drift.
    """

    rho: float = 0.9
    rho_schedule: str = "constant"
    rho_min: float = 0.875
    alpha: dict[int, float] = field(default_factory=dict)
    beta: dict[int, float] = field(default_factory=dict)
    responses: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"tracker_rho must be in (0, 1], got {self.rho}")
        if self.rho_schedule not in RHO_SCHEDULES:
            raise ValueError(f"tracker_rho_schedule={self.rho_schedule!r} is not one of {RHO_SCHEDULES}")
        if not 0.0 < self.rho_min <= KL_RHO_MAX:
            raise ValueError(f"tracker_rho_min must be in (0, {KL_RHO_MAX}], got {self.rho_min}")

    @property
    def adaptive(self) -> bool:
        return self.rho_schedule == "kl"

    def values(self, keys: list[int]) -> torch.Tensor:
        """v(x) = alpha / (alpha + beta) per key; NaN for prompts never seen."""
        out = []
        for key in keys:
            a, b = self.alpha.get(key), self.beta.get(key)
            out.append(math.nan if a is None or a + b <= 0 else a / (a + b))
        return torch.tensor(out, dtype=torch.float32)

    def update(self, keys: list[int], rewards: torch.Tensor, rhos: torch.Tensor | None = None) -> None:
        """One visit per (key, r), in order, with `rhos` (one per visit) or the constant rho; NaN rewards are
        skipped. The first visit alone sets the belief."""
        rho_list = [self.rho] * len(keys) if rhos is None else rhos.detach().float().cpu().tolist()
        if len(rho_list) != len(keys):
            raise ValueError(f"{len(keys)} visits but {len(rho_list)} forgetting factors")
        for key, r, rho in zip(keys, rewards.detach().float().cpu().tolist(), rho_list):
            if math.isnan(r):
                continue
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"the prompt tracker needs rewards in [0, 1], got {r}")
            self.alpha[key] = rho * self.alpha.get(key, 0.0) + r
            self.beta[key] = rho * self.beta.get(key, 0.0) + (1.0 - r)

    def store(self, keys: list[int], ids: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep each key's latest response: its masked token ids and their log-probs (the last row of a repeated
        key wins)."""
        for key, row_ids, row_logps, row_mask in zip(keys, ids.tolist(), logps.float().tolist(), mask.tolist()):
            keep = [i for i, m in enumerate(row_mask) if m]
            self.responses[key] = ([row_ids[i] for i in keep], [row_logps[i] for i in keep])

    def __len__(self) -> int:
        return len(self.alpha)

    def state_dict(self) -> dict:
        # JSON object keys are strings; keys are ints.
        return {
            "rho": self.rho,
            "rho_schedule": self.rho_schedule,
            "rho_min": self.rho_min,
            "alpha": {str(k): v for k, v in self.alpha.items()},
            "beta": {str(k): v for k, v in self.beta.items()},
            "responses": {str(k): {"ids": ids, "logps": lp} for k, (ids, lp) in self.responses.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rho = float(state["rho"])
        self.rho_schedule = state.get("rho_schedule", "constant")
        self.rho_min = float(state.get("rho_min", self.rho_min))
        self.alpha = {int(k): float(v) for k, v in state["alpha"].items()}
        self.beta = {int(k): float(v) for k, v in state["beta"].items()}
        self.responses = {
            int(k): ([int(i) for i in v["ids"]], [float(x) for x in v["logps"]])
            for k, v in state.get("responses", {}).items()
        }
