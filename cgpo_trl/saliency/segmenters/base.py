"""The referring-segmenter protocol, the backend registry and the LRU cache that sits in front of every backend."""

from __future__ import annotations

import abc
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

MODES = ("region", "instance")
MASK_TOLERANCE = 1e-3
"""How far outside [0, 1] a mask value may stray (float rounding of interpolated probabilities) before it is an error."""
DEFAULT_CACHE_BYTES = 512 * 2**20

RegionResult = tuple[np.ndarray, float]
"""One float32 HxW mask in [0, 1] at the image's size, and the backend's confidence score."""

SEGMENTERS: dict[str, type[ReferringSegmenter]] = {}


def register_segmenter(name: str) -> Callable[[type[ReferringSegmenter]], type[ReferringSegmenter]]:
    """Class decorator: make a backend loadable as `load_segmenter(name)`."""

    def decorator(cls: type[ReferringSegmenter]) -> type[ReferringSegmenter]:
        if not (isinstance(cls, type) and issubclass(cls, ReferringSegmenter)):
            raise TypeError(f"@register_segmenter({name!r}) decorates a ReferringSegmenter subclass, got {cls!r}")
        if name in SEGMENTERS and SEGMENTERS[name] is not cls:
            raise ValueError(f"segmenter name {name!r} is already registered by {SEGMENTERS[name].__qualname__}")
        SEGMENTERS[name] = cls
        cls.name = name
        return cls

    return decorator


class ReferringSegmenter(abc.ABC):
    """Turns (image, referring expression) pairs into masks, in batches.

    Backends implement `_segment_regions` and may override `_segment_instances`; `segment` validates the input and
    the backend's output so that every backend honours the same contract.
    """

    name: str = ""
    min_instance_area: int = 16
    """Connected components smaller than this (pixels) are dropped by the default instance split."""

    def segment(
        self, images: Sequence[Image.Image], expressions: Sequence[str], mode: str = "region"
    ) -> list[RegionResult] | list[list[RegionResult]]:
        """Segment `expressions[i]` in `images[i]`.

        `mode="region"` gives one `(mask, score)` per pair; `mode="instance"` gives a list of zero or more
        `(mask, score)` per pair, one per object the expression refers to.
        """
        images, expressions = list(images), list(expressions)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(images) != len(expressions):
            raise ValueError(f"got {len(images)} images but {len(expressions)} expressions; they are paired")
        for index, (image, expression) in enumerate(zip(images, expressions)):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] must be a PIL image, got {type(image).__name__}")
            if not isinstance(expression, str):
                raise TypeError(f"expressions[{index}] must be a string, got {type(expression).__name__}")
        if not images:
            return []
        if mode == "region":
            results = self._segment_regions(images, expressions)
            self._check(results, images)
            return results
        results = self._segment_instances(images, expressions)
        if len(results) != len(images):
            raise RuntimeError(f"segmenter {self.name!r} returned {len(results)} results for {len(images)} pairs")
        for image, instances in zip(images, results):
            self._check(instances, [image] * len(instances))
        return results

    @abc.abstractmethod
    def _segment_regions(self, images: list[Image.Image], expressions: list[str]) -> list[RegionResult]:
        """One `(float32 HxW mask in [0, 1], score)` per pair, at each image's size."""

    def _segment_instances(self, images: list[Image.Image], expressions: list[str]) -> list[list[RegionResult]]:
        """Split each region mask into its connected components: right for backends with no instance notion."""
        from skimage.measure import label

        results = []
        for mask, score in self._segment_regions(images, expressions):
            components = label(mask >= 0.5, connectivity=2)
            sizes = np.bincount(components.ravel())
            results.append(
                [
                    ((components == k).astype(np.float32), score)
                    for k in range(1, len(sizes))
                    if sizes[k] >= self.min_instance_area
                ]
            )
        return results

    def _check(self, results: list[RegionResult], images: list[Image.Image]) -> None:
        if len(results) != len(images):
            raise RuntimeError(f"segmenter {self.name!r} returned {len(results)} results for {len(images)} pairs")
        for mask, _score in results:
            if not isinstance(mask, np.ndarray) or mask.dtype != np.float32:
                raise RuntimeError(f"segmenter {self.name!r} must return float32 masks, got {type(mask)}")
        for (mask, _score), image in zip(results, images):
            if mask.shape != (image.height, image.width):
                raise RuntimeError(
                    f"segmenter {self.name!r} returned a {mask.shape} mask for a {image.width}x{image.height} image"
                )
            # A NaN or out-of-range mask would otherwise fail later, inside a metric, for the whole batch.
            finite = np.isfinite(mask)
            low, high = (float(mask[finite].min()), float(mask[finite].max())) if finite.any() else (0.0, 0.0)
            if not finite.all() or low < -MASK_TOLERANCE or high > 1 + MASK_TOLERANCE:
                raise RuntimeError(
                    f"segmenter {self.name!r} returned an invalid mask: {int((~finite).sum())} NaN/inf pixels, "
                    f"finite values in [{low:.4g}, {high:.4g}] (expected [0, 1])"
                )


class InstanceFirstSegmenter(ReferringSegmenter):
    """A backend that detects instances (boxes or per-object masks): its region is the union of its instances,
    scored by the best instance, and `_segment_instances` is what it implements."""

    @abc.abstractmethod
    def _segment_instances(self, images: list[Image.Image], expressions: list[str]) -> list[list[RegionResult]]:
        """Zero or more `(mask, score)` per pair."""

    def _segment_regions(self, images: list[Image.Image], expressions: list[str]) -> list[RegionResult]:
        regions = []
        for image, instances in zip(images, self._segment_instances(images, expressions)):
            mask = np.zeros((image.height, image.width), dtype=np.float32)
            for instance, _ in instances:
                np.maximum(mask, instance, out=mask)
            regions.append((mask, max((score for _, score in instances), default=0.0)))
        return regions


def image_digest(image: Image.Image) -> str:
    """Content hash of an image: equal pixels give equal keys whatever object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class CachedSegmenter(ReferringSegmenter):
    """LRU cache keyed by (image digest, expression, mode) in front of a backend, bounded by entries and by bytes.

    RL revisits the same images and the policy repeats expressions, so most pairs after the first epochs are hits.
    Misses of one call go to the backend in one batched call; callers receive fresh arrays, so they cannot alter the
    cache. Binary masks (shapes, EVF-SAM) are stored bit-packed, 32x smaller than float32 and lossless; soft masks
    are stored as they are (a 1024x768 soft mask takes 3 MB), so `max_bytes` (default 512 MiB per process) is what
    bounds the memory of a cache of soft masks; the least recently used entries go first.
    """

    def __init__(self, segmenter: ReferringSegmenter, cache_size: int = 1024, max_bytes: int = DEFAULT_CACHE_BYTES):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.segmenter = segmenter
        self.name = segmenter.name
        self.cache_size = cache_size
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._cache: OrderedDict[tuple[str, str, str], object] = OrderedDict()
        self._sizes: dict[tuple[str, str, str], int] = {}  # bytes held by each entry

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Empty the cache and reset the counters."""
        self._cache.clear()
        self._sizes.clear()
        self.hits = self.misses = self.nbytes = 0

    def _segment_regions(self, images, expressions):
        return self._lookup(images, expressions, "region")

    def _segment_instances(self, images, expressions):
        return self._lookup(images, expressions, "instance")

    def _lookup(self, images: list[Image.Image], expressions: list[str], mode: str) -> list:
        keys = [(image_digest(image), expression, mode) for image, expression in zip(images, expressions)]
        found: dict[tuple[str, str, str], object] = {}
        missing: dict[tuple[str, str, str], int] = {}  # key -> index of its first pair, deduplicated in the batch
        for index, key in enumerate(keys):
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                self.hits += 1
            elif key in missing:
                self.hits += 1
            else:
                missing[key] = index
                self.misses += 1
        if missing:
            indices = list(missing.values())
            computed = self.segmenter.segment([images[i] for i in indices], [expressions[i] for i in indices], mode)
            for key, value in zip(missing, computed):
                found[key] = self._cache[key] = _pack(value)
                self._sizes[key] = _nbytes(found[key])
                self.nbytes += self._sizes[key]
            while self._cache and (len(self._cache) > self.cache_size or self.nbytes > self.max_bytes):
                evicted, _ = self._cache.popitem(last=False)
                self.nbytes -= self._sizes.pop(evicted)
        return [_unpack(found[key]) for key in keys]


def _nbytes(value) -> int:
    if isinstance(value, list):
        return sum(_nbytes(item) for item in value)
    stored, _score = value
    return stored[0].nbytes if isinstance(stored, tuple) else stored.nbytes


def _pack(value):
    if isinstance(value, list):
        return [_pack(item) for item in value]
    mask, score = value
    if np.all((mask == 0) | (mask == 1)):
        return (np.packbits(mask.astype(bool)), mask.shape), score
    return mask.copy(), score


def _unpack(value):
    if isinstance(value, list):
        return [_unpack(item) for item in value]
    stored, score = value
    if isinstance(stored, tuple):
        bits, shape = stored
        mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(np.float32)
        return mask, score
    return stored.copy(), score


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype for a backend's `dtype` option, with an error naming the accepted values."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)
