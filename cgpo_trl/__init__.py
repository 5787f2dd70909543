"""cgpo_trl: CGPO (Confidence-Guided Policy Optimization) for TRL, and the Saliency-R1 recipe built on it."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .confidence import get_confidence_estimator, list_confidence_estimators, register_confidence_estimator
    from .config import CGPOConfig
    from .trainer import CGPOTrainer

_LAZY = {
    "CGPOConfig": ".config",
    "CGPOTrainer": ".trainer",
    "get_confidence_estimator": ".confidence",
    "list_confidence_estimators": ".confidence",
    "register_confidence_estimator": ".confidence",
}

__all__ = [
    "CGPOConfig",
    "CGPOTrainer",
    "get_confidence_estimator",
    "list_confidence_estimators",
    "register_confidence_estimator",
]


def __getattr__(name: str):
    # Importing TRL costs seconds; keep `import cgpo_trl.saliency...` (metrics, tags) free of it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
