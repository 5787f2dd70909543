"""Referring segmenters: expression -> mask backends behind one protocol, loaded by name.

Backends import heavy libraries (transformers, model code), so each lives in its own module and is imported only
when `load_segmenter` asks for it.
"""

from __future__ import annotations

import importlib

from .base import (
    DEFAULT_CACHE_BYTES,
    SEGMENTERS,
    CachedSegmenter,
    ReferringSegmenter,
    image_digest,
    register_segmenter,
)

# Built-in backends: name -> module that registers it.
BACKEND_MODULES: dict[str, str] = {
    "shapes": "cgpo_trl.saliency.segmenters.shapes",
    "clipseg": "cgpo_trl.saliency.segmenters.clipseg",
    "sam3": "cgpo_trl.saliency.segmenters.sam3",
    "grounded-sam": "cgpo_trl.saliency.segmenters.grounded_sam",
    "evf-sam": "cgpo_trl.saliency.segmenters.evf_sam",
}

__all__ = [
    "BACKEND_MODULES",
    "DEFAULT_CACHE_BYTES",
    "CachedSegmenter",
    "ReferringSegmenter",
    "image_digest",
    "list_segmenters",
    "load_segmenter",
    "register_segmenter",
]


def list_segmenters() -> list[str]:
    """Names `load_segmenter` accepts: the built-in backends and any registered by user code."""
    return sorted(set(BACKEND_MODULES) | set(SEGMENTERS))


def load_segmenter(
    name: str, cache_size: int | None = 1024, cache_bytes: int = DEFAULT_CACHE_BYTES, **kwargs
) -> ReferringSegmenter:
    """Build the backend registered as `name` with `kwargs` (e.g. `checkpoint`, `device`, `dtype`).

    With `cache_size` (default 1024 entries) the backend is wrapped in a `CachedSegmenter` that also holds at most
    `cache_bytes` of masks (default 512 MiB per process: soft masks of large images fill it long before 1024
    entries); `cache_size=None` or 0 disables the cache.
    """
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 1:
        raise ValueError(f"load_segmenter: cache_bytes must be a positive integer (bytes), got {cache_bytes!r}")
    if name not in SEGMENTERS:
        if name not in BACKEND_MODULES:
            raise ValueError(f"unknown segmenter {name!r}; available: {list_segmenters()}")
        importlib.import_module(BACKEND_MODULES[name])
        if name not in SEGMENTERS:
            raise RuntimeError(f"module {BACKEND_MODULES[name]} did not register a segmenter named {name!r}")
    segmenter = SEGMENTERS[name](**kwargs)
    return CachedSegmenter(segmenter, cache_size, max_bytes=cache_bytes) if cache_size else segmenter
