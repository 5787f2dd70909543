import re

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
from cgpo_trl.testing import TINY_SEGMENTERS


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


def test_load_segmenter_passes_the_byte_cap_to_the_cache():
    assert load_segmenter("test-left-half").max_bytes == 512 * 2**20  # the documented default
    soft = 20 * 16 * 4  # "blobs" is a soft 20x16 mask, stored as float32
    segmenter = load_segmenter("test-left-half", cache_size=8, cache_bytes=2 * soft)
    segmenter.segment([_image(0), _image(1), _image(2)], ["blobs"] * 3)
    assert (len(segmenter), segmenter.nbytes) == (2, 2 * soft)  # the byte cap, not the 8 entries, evicted image 0
    segmenter.segment([_image(0)], ["blobs"])
    assert segmenter.misses == 4
    for bad in (0, -1, 2.5, "1GB", True):
        with pytest.raises(ValueError, match=f"cache_bytes must be a positive integer .*got {re.escape(repr(bad))}"):
            load_segmenter("test-left-half", cache_bytes=bad)


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


# ----------------------------------------------------------------------------------------------------------------
# shapes backend, on scenes drawn here with skimage.draw like the synthetic world


def _vertices(n, radius, angle, inner=None):
    theta = angle + np.arange(n) * (2 * np.pi / n)
    radii = np.full(n, float(radius))
    if inner is not None:
        radii[1::2] = radius * inner
    return -radii * np.cos(theta), radii * np.sin(theta)


def _draw_scene(objects, size=96, seed=0):
    """objects: (colour, shape, (row, col), radius, angle). Returns the PIL image and one bool mask per object."""
    from skimage.draw import disk, polygon

    from cgpo_trl.saliency.vocabulary import COLOURS

    rng = np.random.default_rng(seed)
    grey = 130 + 25 * rng.standard_normal((size, size))
    image = np.clip(np.repeat(grey[..., None], 3, axis=-1) + rng.uniform(-6, 6, 3), 60, 200)
    masks = []
    for colour, shape, (cy, cx), radius, angle in objects:
        if shape == "circle":
            rows, cols = disk((cy, cx), radius, shape=(size, size))
        else:
            n, inner = {"square": (4, None), "triangle": (3, None), "star": (10, 0.5)}[shape]
            dy, dx = _vertices(n, radius, angle, inner)
            rows, cols = polygon(cy + dy, cx + dx, shape=(size, size))
        image[rows, cols] = COLOURS[colour]
        mask = np.zeros((size, size), bool)
        mask[rows, cols] = True
        masks.append(mask)
    return Image.fromarray(image.round().astype(np.uint8)), masks


SCENE = [
    ("red", "circle", (20, 20), 9, 0.0),
    ("red", "square", (20, 60), 10, 0.3),
    ("blue", "triangle", (60, 20), 11, 1.1),
    ("blue", "star", (62, 62), 12, 0.2),
    ("red", "circle", (80, 85), 5, 0.0),
]


@pytest.fixture(scope="module")
def shapes():
    return load_segmenter("shapes", cache_size=None)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star"])
def test_shapes_is_exact_on_rotated_shapes_of_any_size(shapes, shape, seed):
    rng = np.random.default_rng(seed)
    radius = float(rng.uniform(4.5, 30))
    size = int(2 * radius + 12)
    centre = tuple(size / 2 + rng.uniform(-1, 1, 2))
    image, [mask] = _draw_scene([("green", shape, centre, radius, rng.uniform(0, 2 * np.pi))], size=size, seed=seed)
    [(got, score)] = shapes.segment([image], [f"the green {shape}"])
    assert score == 1.0 and got.dtype == np.float32
    np.testing.assert_array_equal(got > 0.5, mask)


def test_shapes_region_mode_is_the_union_of_matching_components(shapes):
    image, masks = _draw_scene(SCENE)
    expressions = ["the red circle", "the blue star", "the red objects", "the large red circle", "the small circles"]
    results = shapes.segment([image] * len(expressions), expressions)
    expected = [masks[0] | masks[4], masks[3], masks[0] | masks[1] | masks[4], masks[0], masks[4]]
    for (got, score), want, expression in zip(results, expected, expressions):
        assert score == 1.0, expression
        np.testing.assert_array_equal(got > 0.5, want, err_msg=expression)


def test_shapes_instance_mode_gives_one_mask_per_component(shapes):
    image, masks = _draw_scene(SCENE)
    [red, blue_square] = shapes.segment([image, image], ["the red shapes", "the blue square"], mode="instance")
    # No blue square: the best fit is every blue component (colour right, shape wrong), each scored 4 / 6.
    assert [s for _, s in blue_square] == [4 / 6, 4 / 6]
    np.testing.assert_array_equal(np.logical_or(*(m > 0.5 for m, _ in blue_square)), masks[2] | masks[3])
    got = sorted((m > 0.5 for m, _ in red), key=lambda m: np.argwhere(m)[0].tolist())
    want = sorted([masks[0], masks[1], masks[4]], key=lambda m: np.argwhere(m)[0].tolist())
    assert [s for _, s in red] == [1.0, 1.0, 1.0]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("expression", ["the dog", "", "the green object", "the cyan one"])
def test_shapes_expressions_that_fit_nothing_give_an_empty_mask_and_zero_score(shapes, expression):
    image, _ = _draw_scene(SCENE)  # red and blue objects only
    [(mask, score)] = shapes.segment([image], [expression])
    assert score == 0.0 and not mask.any()
    assert shapes.segment([image], [expression], mode="instance") == [[]]


@pytest.mark.parametrize("expression", ["the dog", "", "a green triangle", "the cyan circle", "the red triangle"])
def test_strict_shapes_gives_an_empty_mask_unless_every_word_fits(expression):
    image, _ = _draw_scene(SCENE)
    strict = load_segmenter("shapes", strict=True, cache_size=None)
    [(mask, score)] = strict.segment([image], [expression])
    assert score == 0.0 and not mask.any()
    assert strict.segment([image], [expression], mode="instance") == [[]]


def test_shapes_returns_the_best_fitting_object_with_its_fit_as_score(shapes):
    image, [pink_square, blue_circle] = _draw_scene(
        [("pink", "square", (20, 20), 8, 0.1), ("blue", "circle", (20, 60), 10, 0.0)]  # areas ~130 and ~320 px
    )
    expressions = ["the pink circle", "the green circle", "the pink square", "the small pink circle"]
    results = shapes.segment([image] * len(expressions), expressions)
    # colour (4) outranks shape (2), which outranks size (1); score = matched weight / named weight
    expected = [(pink_square, 4 / 6), (blue_circle, 2 / 6), (pink_square, 1.0), (pink_square, 5 / 7)]
    for (got, score), (want, want_score), expression in zip(results, expected, expressions):
        assert score == pytest.approx(want_score), expression
        np.testing.assert_array_equal(got > 0.5, want, err_msg=expression)
    strict = load_segmenter("shapes", strict=True, cache_size=None)
    [(mask, score)] = strict.segment([image], ["the pink circle"])
    assert score == 0.0 and not mask.any()


def test_shapes_ties_return_every_best_fit_and_size_words_use_every_component(shapes):
    image, masks = _draw_scene(SCENE)
    expressions = ["the large red object", "the large purple circle", "the small star"]
    results = shapes.segment([image] * len(expressions), expressions)
    # areas: small red circle ~80 px, the rest 150-260 px: the only gap >= 1.5 puts it alone on the small side
    expected = [(masks[0] | masks[1], 1.0), (masks[0], 3 / 7), (masks[3], 2 / 3)]
    for (got, score), (want, want_score), expression in zip(results, expected, expressions):
        assert score == pytest.approx(want_score), expression
        np.testing.assert_array_equal(got > 0.5, want, err_msg=expression)


def test_shapes_size_words_keep_everything_when_sizes_are_alike(shapes):
    image, masks = _draw_scene([("pink", "square", (20, 20), 10, 0.1), ("pink", "square", (20, 60), 10.5, 0.7)])
    [(mask, _)] = shapes.segment([image], ["the large pink squares"])
    np.testing.assert_array_equal(mask > 0.5, masks[0] | masks[1])


def test_shapes_templates_are_the_pixels_the_synthetic_world_draws():
    # The template matcher rasterises every rotation at once; it must draw exactly what skimage.draw draws.
    from cgpo_trl.saliency.segmenters.shapes import _templates
    from cgpo_trl.saliency.vocabulary import SHAPES, shape_coordinates

    rng = np.random.default_rng(0)
    rows, cols = np.indices((40, 40)).reshape(2, 1, -1)
    for shape in SHAPES:
        centre, radius = tuple(rng.uniform(15, 25, 2)), rng.uniform(3, 12)
        angles = rng.uniform(0, 2 * np.pi, 5)
        templates = _templates(shape, centre, radius, angles, rows, cols).reshape(len(angles), 40, 40)
        for angle, template in zip(angles, templates):
            expected = np.zeros((40, 40), bool)
            expected[shape_coordinates(shape, centre, radius, angle, (40, 40))] = True
            np.testing.assert_array_equal(template, expected, err_msg=f"{shape} at {angle:.2f} rad")


def test_shapes_analyses_each_image_once_across_calls_and_evicts_least_recently_used(monkeypatch):
    shapes = load_segmenter("shapes", cache_size=None, scene_cache_size=2)
    analysed = []
    analyse = shapes._components
    monkeypatch.setattr(shapes, "_components", lambda image: analysed.append(image.getpixel((0, 0))) or analyse(image))
    one, _ = _draw_scene(SCENE, seed=1)
    two, _ = _draw_scene(SCENE, seed=2)
    three, _ = _draw_scene(SCENE, seed=3)
    first = shapes.segment([one, one.copy()], ["the red circle", "the blue star"])  # equal pixels: one analysis
    shapes.segment([two, one, three], ["the red circle"] * 3)  # `one` is a hit; `three` evicts `two`, not `one`
    again = shapes.segment([one, two], ["the red circle", "the red circle"])
    assert analysed == [p.getpixel((0, 0)) for p in (one, two, three, two)]
    np.testing.assert_array_equal(first[0][0], again[0][0])
    uncached = load_segmenter("shapes", cache_size=None, scene_cache_size=0)
    monkeypatch.setattr(uncached, "_components", lambda image: analysed.append(None) or analyse(image))
    uncached.segment([one, one], ["the red circle"] * 2)
    assert analysed[-2:] == [None, None]


def test_shapes_rejects_bad_options():
    with pytest.raises(ValueError, match="colour_tolerance"):
        load_segmenter("shapes", colour_tolerance=300)


# ----------------------------------------------------------------------------------------------------------------
# transformers backends: tiny random models built from configs, saved, and loaded through `checkpoint=`

IMAGE_320x240 = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
OTHER_IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 150, 3), dtype=np.uint8))
EXPRESSIONS = ["the red circle", "a dog on the left"]


@pytest.fixture(scope="module")
def backend_options(tmp_path_factory):
    """Tiny random checkpoints of every transformers backend, saved and loaded through `checkpoint=` like a user's."""
    return {name: TINY_SEGMENTERS[name](tmp_path_factory.mktemp(name)) for name in ("clipseg", "sam3", "grounded-sam")}


def _check_masks(results, images):
    assert len(results) == len(images)
    for (mask, score), image in zip(results, images):
        assert mask.shape == (image.height, image.width) and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        assert 0.0 <= score <= 1.0


@pytest.mark.parametrize("name", ["clipseg", "sam3", "grounded-sam"])
def test_transformers_backend_segments_real_size_images_from_a_local_checkpoint(name, backend_options):
    segmenter = load_segmenter(name, cache_size=None, batch_size=2, **backend_options[name])
    images = [IMAGE_320x240, IMAGE_320x240, OTHER_IMAGE]
    expressions = [*EXPRESSIONS, EXPRESSIONS[0]]
    regions = segmenter.segment(images, expressions)
    _check_masks(regions, images)
    assert regions[0][0].any()  # random weights, threshold 0: some foreground
    # Batching, padding and shared image features do not change a pair's result.
    alone = [segmenter.segment([image], [expression])[0] for image, expression in zip(images, expressions)]
    for (mask, score), (mask_alone, score_alone) in zip(regions, alone):
        np.testing.assert_allclose(mask, mask_alone, atol=1e-4)
        assert score == pytest.approx(score_alone, abs=1e-4)
    instances = segmenter.segment(images, expressions, mode="instance")
    assert len(instances) == 3
    for row, image in zip(instances, images):
        _check_masks(row, [image] * len(row))


@pytest.mark.parametrize("name", ["clipseg", "sam3", "grounded-sam"])
def test_transformers_backend_runs_in_bfloat16_and_rejects_unknown_dtypes(name, backend_options):
    segmenter = load_segmenter(name, cache_size=None, dtype="bfloat16", **backend_options[name])
    _check_masks(segmenter.segment([IMAGE_320x240], [EXPRESSIONS[0]]), [IMAGE_320x240])
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_segmenter(name, dtype="float64", **backend_options[name])


def test_sam3_instances_are_sorted_and_region_is_their_union(backend_options):
    segmenter = load_segmenter("sam3", cache_size=None, **backend_options["sam3"])
    [instances] = segmenter.segment([IMAGE_320x240], [EXPRESSIONS[0]], mode="instance")
    [(region, score)] = segmenter.segment([IMAGE_320x240], [EXPRESSIONS[0]])
    scores = [s for _, s in instances]
    assert len(instances) == 8 and scores == sorted(scores, reverse=True)  # every query passes threshold 0
    np.testing.assert_allclose(region, np.max([m for m, _ in instances], axis=0), atol=1e-6)
    assert score == pytest.approx(scores[0])
    strict = load_segmenter(
        "sam3", cache_size=None, checkpoint=backend_options["sam3"]["checkpoint"], score_threshold=0.99
    )
    [(empty, zero)] = strict.segment([IMAGE_320x240], [EXPRESSIONS[0]])
    assert not empty.any() and zero == 0.0


def test_sam3_without_sam3_in_transformers_names_the_version_needed(monkeypatch, backend_options):
    import sys

    monkeypatch.setitem(sys.modules, "transformers.models.sam3.modeling_sam3", None)
    with pytest.raises(ImportError, match=r"needs a transformers release that ships SAM 3.*>= 5.24"):
        load_segmenter("sam3", **backend_options["sam3"])


def test_importing_the_saliency_interface_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, cgpo_trl.saliency.rewards, cgpo_trl.saliency.segmenters, cgpo_trl.saliency.prompts; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cache_stores_binary_masks_packed_and_soft_masks_exactly():
    class Soft(LeftHalf):
        def _segment_regions(self, images, expressions):
            return [(np.full((i.height, i.width), 0.3, np.float32), 0.7) for i in images]

    binary = CachedSegmenter(LeftHalf())
    [(first, _)] = binary.segment([_image()], ["left"])
    [(again, _)] = binary.segment([_image()], ["left"])
    assert again.dtype == np.float32 and np.array_equal(first, again) and binary.hits == 1
    (bits, shape), _ = next(iter(binary._cache.values()))
    assert bits.nbytes == 16 * 20 // 8 and shape == (16, 20)  # one bit per pixel
    soft = CachedSegmenter(Soft())
    soft.segment([_image()], ["x"])
    [(mask, score)] = soft.segment([_image()], ["x"])
    assert np.array_equal(mask, np.full((16, 20), 0.3, np.float32)) and score == 0.7
    [[(instance, _), _]] = CachedSegmenter(LeftHalf()).segment([_image()], ["blobs"], mode="instance")
    assert instance.dtype == np.float32 and instance.sum() == 25
