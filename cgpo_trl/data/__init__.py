"""Saliency data: the synthetic benchmark, public-benchmark loaders and the output-to-reasoning SFT builder.

Names resolve lazily so `import cgpo_trl.data` stays cheap; every module yields rows of the data contract
(`rows.ROW_FEATURES`).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .benchmarks import BenchmarkError, list_benchmarks, load_benchmark, load_saliency_dataset, save_benchmark
    from .reasoning import BuildStats, build_reasoning_dataset, make_teacher
    from .rows import ROW_FEATURES
    from .synthetic import SyntheticConfig, generate_synthetic

_LAZY = {
    "BenchmarkError": ".benchmarks",
    "list_benchmarks": ".benchmarks",
    "load_benchmark": ".benchmarks",
    "load_saliency_dataset": ".benchmarks",
    "save_benchmark": ".benchmarks",
    "BuildStats": ".reasoning",
    "build_reasoning_dataset": ".reasoning",
    "make_teacher": ".reasoning",
    "ROW_FEATURES": ".rows",
    "SyntheticConfig": ".synthetic",
    "generate_synthetic": ".synthetic",
}

__all__ = [
    "ROW_FEATURES",
    "BenchmarkError",
    "BuildStats",
    "SyntheticConfig",
    "build_reasoning_dataset",
    "generate_synthetic",
    "list_benchmarks",
    "load_benchmark",
    "load_saliency_dataset",
    "make_teacher",
    "save_benchmark",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
