"""Per-prompt value tracker (SPO, arXiv 2509.13232): a persistent baseline for one rollout per prompt.

Each prompt x keeps a Beta(alpha, beta) belief about its success rate; the baseline is its mean
``v(x) = alpha / (alpha + beta)``. After a visit with reward ``r`` in [0, 1] the belief is discounted and updated,
``alpha <- rho * alpha + r``, ``beta <- rho * beta + (1 - r)``, so old evidence fades as the policy changes.
``v(x)`` is read *before* the visit's own update, so it never depends on the sample it is subtracted from.

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


@dataclass
class PromptTracker:
    """Beta(alpha, beta) success tracker per prompt key, with forgetting factor ``rho`` in (0, 1]."""

    rho: float = 0.9
    alpha: dict[int, float] = field(default_factory=dict)
    beta: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"tracker_rho must be in (0, 1], got {self.rho}")

    def values(self, keys: list[int]) -> torch.Tensor:
        """v(x) = alpha / (alpha + beta) per key; NaN for prompts never seen."""
        out = []
        for key in keys:
            a, b = self.alpha.get(key), self.beta.get(key)
            out.append(math.nan if a is None or a + b <= 0 else a / (a + b))
        return torch.tensor(out, dtype=torch.float32)

    def update(self, keys: list[int], rewards: torch.Tensor) -> None:
        """One visit per (key, r), in order; NaN rewards are skipped. The first visit alone sets the belief."""
        for key, r in zip(keys, rewards.detach().float().cpu().tolist()):
            if math.isnan(r):
                continue
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"the prompt tracker needs rewards in [0, 1], got {r}")
            self.alpha[key] = self.rho * self.alpha.get(key, 0.0) + r
            self.beta[key] = self.rho * self.beta.get(key, 0.0) + (1.0 - r)

    def __len__(self) -> int:
        return len(self.alpha)

    def state_dict(self) -> dict:
        # JSON object keys are strings; keys are ints.
        return {
            "rho": self.rho,
            "alpha": {str(k): v for k, v in self.alpha.items()},
            "beta": {str(k): v for k, v in self.beta.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rho = float(state["rho"])
        self.alpha = {int(k): float(v) for k, v in state["alpha"].items()}
        self.beta = {int(k): float(v) for k, v in state["beta"].items()}
