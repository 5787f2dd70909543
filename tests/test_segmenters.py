import numpy as np
import pytest
from PIL import Image

from cgpo_trl.saliency.segmenters import (
    CachedSegmenter,
    ReferringSegmenter,
    image_digest,
    list_segmenters,
    load_segmenter,
    register_segmenter,
)


@register_segmenter("test-left-half")
class LeftHalf(ReferringSegmenter):
    """Masks the left half for "left", two separate blobs for "blobs", nothing otherwise; counts backend calls."""

    def __init__(self, device: str = "cpu"):
        self.calls = []

    def _segment_regions(self, images, expressions):
        self.calls.append(list(expressions))
        results = []
        for image, expression in zip(images, expressions):
            mask = np.zeros((image.height, image.width), np.float32)
            if expression == "left":
                mask[:, : image.width // 2] = 1.0
            elif expression == "blobs":
                mask[1:6, 1:6] = 1.0
                mask[10:14, 10:14] = 0.8
                mask[0, -1] = 1.0  # one pixel: below min_instance_area
            results.append((mask, 0.5))
        return results


def _image(value=0, size=(20, 16)):
    return Image.new("RGB", size, (value, value, value))


def test_registry_lists_builtin_and_registered_backends():
    names = list_segmenters()
    assert {"shapes", "clipseg", "sam3", "grounded-sam", "evf-sam", "test-left-half"} <= set(names)
    with pytest.raises(ValueError, match="unknown segmenter 'nope'"):
        load_segmenter("nope")


def test_register_rejects_duplicates_and_non_segmenters():
    with pytest.raises(ValueError, match="already registered"):
        register_segmenter("test-left-half")(type("Other", (LeftHalf,), {}))
    with pytest.raises(TypeError, match="ReferringSegmenter subclass"):
        register_segmenter("x")(object)


def test_region_mode_returns_float_masks_at_image_size():
    segmenter = load_segmenter("test-left-half", cache_size=None)
    assert isinstance(segmenter, LeftHalf)
    [(mask, score)] = segmenter.segment([_image(size=(20, 16))], ["left"])
    assert mask.shape == (16, 20) and mask.dtype == np.float32 and score == 0.5
    assert mask[:, :10].all() and not mask[:, 10:].any()


def test_default_instance_mode_splits_connected_components():
    segmenter = load_segmenter("test-left-half", cache_size=None)
    [instances] = segmenter.segment([_image()], ["blobs"], mode="instance")
    assert [int(m.sum()) for m, _ in instances] == [25, 16]
    assert all(s == 0.5 for _, s in instances)


def test_input_is_validated_with_clear_errors():
    segmenter = load_segmenter("test-left-half", cache_size=None)
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        segmenter.segment([_image(), _image()], ["left"])
    with pytest.raises(TypeError, match=r"images\[0\] must be a PIL image"):
        segmenter.segment([np.zeros((4, 4))], ["left"])
    with pytest.raises(ValueError, match="mode must be one of"):
        segmenter.segment([_image()], ["left"], mode="panoptic")
    assert segmenter.segment([], []) == []


def test_cache_counts_hits_and_misses_and_batches_misses_in_one_call():
    segmenter = load_segmenter("test-left-half", cache_size=8)
    assert isinstance(segmenter, CachedSegmenter)
    backend = segmenter.segmenter
    segmenter.segment([_image(0), _image(0), _image(1)], ["left", "left", "left"])
    assert backend.calls == [["left", "left"]]  # duplicate pair in the batch computed once
    assert (segmenter.hits, segmenter.misses) == (1, 2)
    # An equal image in a new object is a hit; a new expression or mode is a miss.
    results = segmenter.segment([_image(0), _image(0)], ["left", "blobs"])
    assert backend.calls[-1] == ["blobs"]
    assert (segmenter.hits, segmenter.misses) == (2, 3)
    assert results[0][0][:, :10].all()
    segmenter.segment([_image(0)], ["left"], mode="instance")
    assert segmenter.misses == 4


def test_cache_returns_copies_and_evicts_least_recently_used():
    segmenter = load_segmenter("test-left-half", cache_size=2)
    [(mask, _)] = segmenter.segment([_image(0)], ["left"])
    mask[:] = 0  # must not reach the cache
    segmenter.segment([_image(1)], ["left"])
    [(again, _)] = segmenter.segment([_image(0)], ["left"])
    assert again.any() and segmenter.hits == 1
    segmenter.segment([_image(2)], ["left"])  # evicts image 1, the least recently used
    assert len(segmenter) == 2
    segmenter.segment([_image(1)], ["left"])
    assert segmenter.misses == 4
    segmenter.clear()
    assert (len(segmenter), segmenter.hits, segmenter.misses) == (0, 0, 0)


def test_image_digest_depends_on_pixels_mode_and_size():
    assert image_digest(_image(3)) == image_digest(_image(3))
    assert image_digest(_image(3)) != image_digest(_image(4))
    assert image_digest(_image(3)) != image_digest(_image(3).convert("L"))
    assert image_digest(Image.new("L", (4, 2))) != image_digest(Image.new("L", (2, 4)))


def test_backend_output_of_wrong_shape_is_caught():
    class Broken(LeftHalf):
        def _segment_regions(self, images, expressions):
            return [(np.zeros((2, 2), np.float32), 1.0) for _ in images]

    with pytest.raises(RuntimeError, match=r"returned a \(2, 2\) mask for a 20x16 image"):
        Broken().segment([_image()], ["left"])
