"""What `ReferringSegmenter.segment` guarantees whatever the backend, and the bounds of the cache in front of it."""

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.saliency.segmenters import CachedSegmenter, ReferringSegmenter, load_segmenter


class FixedSegmenter(ReferringSegmenter):
    """Returns `masks[expression]` (a function of the image size); counts the pairs it computed."""

    name = "fixed"

    def __init__(self, masks):
        self.masks, self.computed = masks, 0

    def _segment_regions(self, images, expressions):
        self.computed += len(images)
        return [(self.masks[e]((im.height, im.width)), 1.0) for im, e in zip(images, expressions)]


IMAGE = Image.new("RGB", (20, 10))


@pytest.mark.parametrize(
    "fill, message",
    [(np.nan, r"200 NaN/inf pixels"), (np.inf, r"200 NaN/inf pixels"), (1.5, r"finite values in \[1\.5, 1\.5\]")],
)
def test_invalid_masks_are_rejected_naming_the_segmenter(fill, message):
    segmenter = FixedSegmenter({"x": lambda shape: np.full(shape, fill, np.float32)})
    with pytest.raises(RuntimeError, match=rf"segmenter 'fixed' returned an invalid mask: .*{message}"):
        segmenter.segment([IMAGE], ["x"])
    # Float rounding of an interpolated probability just above 1 is not an error.
    segmenter.masks["y"] = lambda shape: np.full(shape, 1 + 1e-6, np.float32)
    assert segmenter.segment([IMAGE], ["y"])[0][0].shape == (10, 20)


def test_cache_is_bounded_by_bytes_least_recently_used_first():
    """Soft masks are stored as float32 (800 bytes for 10 x 20 here): 2000 bytes hold two of them."""
    masks = {
        name: (lambda shape, v=value: np.full(shape, v, np.float32)) for name, value in zip("abc", (0.2, 0.4, 0.6))
    }
    backend = FixedSegmenter(masks)
    cache = CachedSegmenter(backend, cache_size=100, max_bytes=2000)
    cache.segment([IMAGE] * 2, ["a", "b"])
    cache.segment([IMAGE], ["a"])  # a is now the most recently used
    cache.segment([IMAGE], ["c"])  # evicts b, not a
    assert len(cache) == 2 and cache.nbytes == 1600 and backend.computed == 3
    cache.segment([IMAGE], ["a"])
    assert backend.computed == 3
    cache.segment([IMAGE], ["b"])
    assert backend.computed == 4
    binary = CachedSegmenter(FixedSegmenter({"x": lambda shape: np.ones(shape, np.float32)}), max_bytes=2000)
    binary.segment([IMAGE], ["x"])
    assert binary.nbytes == 25  # bit-packed: 200 pixels in 25 bytes
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        CachedSegmenter(backend, max_bytes=0)


def test_evf_sam_without_a_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'evf-sam' needs a checkpoint: .*YxZhang/evf-sam2"):
        load_segmenter("evf-sam")
