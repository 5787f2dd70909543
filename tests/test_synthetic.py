import numpy as np
import pytest
from PIL import Image

from cgpo_trl.data.rows import decode_instance
from cgpo_trl.data.synthetic import GAP, SYNTHETIC_FEATURES, SyntheticConfig, generate_rows, generate_synthetic
from cgpo_trl.saliency.prompts import build_prompt
from cgpo_trl.saliency.tags import parse_answer
from cgpo_trl.saliency.vocabulary import COLOURS, SHAPES, parse_description


def _colour_pixels(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def _check_background(image: np.ndarray, objects: np.ndarray):
    # Everything that is no object stays grey-ish and inside [60, 200]: far from every vocabulary colour.
    background = image[~objects].astype(int)
    assert background.min() >= 60 and background.max() <= 200
    assert (background.max(axis=1) - background.min(axis=1)).max() <= 20


def _check_border(mask: np.ndarray):
    assert not mask[:GAP].any() and not mask[-GAP:].any() and not mask[:, :GAP].any() and not mask[:, -GAP:].any()


@pytest.mark.parametrize("rule", ["colour", "shape", "size"])
def test_sod_rows_have_exact_ground_truth(rule):
    rows = list(generate_rows(SyntheticConfig(task="sod", num_samples=40, rule=rule, seed=3)))
    for row in rows:
        (image,), (mask,), (scene,) = row["images"], row["masks"], row["scene"]
        target = scene[0]
        assert target["salient"] and not any(o["salient"] for o in scene[1:])
        assert 3 <= len(scene) <= 4
        # The mask is exactly the target's pixels, which carry the target's colour.
        assert mask.any() and np.all(image[mask] == COLOURS[target["colour"]])
        _check_border(mask)
        description = parse_description(row["expressions"][0])
        assert (description.colour, description.shape) == (target["colour"], target["shape"])
        assert parse_answer(row["solution"], task="sod").regions == row["expressions"]
        # No other object has the target's (colour, shape) pair, so the expression names one object.
        assert all((o["colour"], o["shape"]) != (target["colour"], target["shape"]) for o in scene[1:])
        distractors = scene[1:]
        if rule == "colour":
            assert len({o["colour"] for o in distractors}) == 1 and distractors[0]["colour"] != target["colour"]
            # Under the colour rule the target's colour occurs nowhere else.
            assert _colour_pixels(image, target["colour"]).sum() == mask.sum()
        elif rule == "shape":
            assert len({o["shape"] for o in distractors}) == 1 and distractors[0]["shape"] != target["shape"]
        else:
            assert description.size == "large"
            assert all(o["radius"] < target["radius"] for o in distractors)
        objects = np.zeros_like(mask)
        for o in scene:
            objects |= _colour_pixels(image, o["colour"])
        _check_background(image, objects)
    if rule == "shape":  # half the distractors share the target's colour, so only shape separates them
        assert any(o["colour"] == r["scene"][0][0]["colour"] for r in rows for o in r["scene"][0][1:])


def test_sis_instances_are_disjoint_rles_with_unique_expressions():
    rows = list(generate_rows(SyntheticConfig(task="sis", num_samples=30, seed=1, num_clutter=(2, 4))))
    for row in rows:
        (image,), (scene,) = row["images"], row["scene"]
        salient = [o for o in scene if o["salient"]]
        assert row["masks"] == [] and 2 <= len(salient) <= 3
        assert len(row["instances"]) == len(salient) == len(row["expressions"])
        assert parse_answer(row["solution"], task="sis").instances == row["expressions"]
        union = np.zeros(image.shape[:2], dtype=int)
        for rle, obj, expression in zip(row["instances"], salient, row["expressions"]):
            assert rle["size"] == [56, 56] and isinstance(rle["counts"], str)
            mask = decode_instance(rle)
            assert np.all(image[mask] == COLOURS[obj["colour"]])
            _check_border(mask)
            union += mask
            description = parse_description(expression)
            assert (description.colour, description.shape) == (obj["colour"], obj["shape"])
        assert union.max() == 1
        salient_pairs = [(o["colour"], o["shape"]) for o in salient]
        clutter = [o for o in scene if not o["salient"]]
        assert len(set(salient_pairs)) == len(salient_pairs)
        assert not set(salient_pairs) & {(o["colour"], o["shape"]) for o in clutter}
        assert all(c["radius"] < salient[0]["radius"] for c in clutter)


def test_cosod_groups_share_exactly_one_object():
    rows = list(generate_rows(SyntheticConfig(task="cosod", num_samples=25, seed=2, group_size=(3, 6))))
    sizes = set()
    for row in rows:
        n = len(row["images"])
        sizes.add(n)
        assert 3 <= n <= 6 and len(row["masks"]) == n == len(row["scene"])
        assert row["prompt"] == build_prompt("cosod", n)
        description = parse_description(row["expressions"][0])
        common = (description.colour, description.shape)
        assert common[1] in SHAPES and row["group"].endswith(f"{common[0]}-{common[1]}")
        pair_sets = [{(o["colour"], o["shape"]) for o in scene} for scene in row["scene"]]
        assert set.intersection(*pair_sets) == {common}
        for image, mask, scene in zip(row["images"], row["masks"], row["scene"]):
            assert (scene[0]["colour"], scene[0]["shape"]) == common and scene[0]["salient"]
            assert mask.any() and np.all(image[mask] == COLOURS[common[0]])
        # Pose and size vary inside the group.
        assert len({tuple(scene[0]["bbox"]) for scene in row["scene"]}) > 1
    assert len(sizes) > 1


def test_determinism_splits_and_row_independence():
    a = generate_synthetic(task="sod", num_samples=6, seed=7)
    b = generate_synthetic(task="sod", num_samples=3, seed=7)
    assert a.features == SYNTHETIC_FEATURES
    for i in range(3):  # row i does not depend on num_samples
        assert a[i]["images"][0].tobytes() == b[i]["images"][0].tobytes()
        assert a[i]["solution"] == b[i]["solution"]
    other_split = generate_synthetic(task="sod", num_samples=3, seed=7, split="test")
    other_seed = generate_synthetic(task="sod", num_samples=3, seed=8)
    for other in (other_split, other_seed):
        assert [r["images"][0].tobytes() for r in other] != [r["images"][0].tobytes() for r in b]


def test_dataset_columns_follow_the_contract():
    ds = generate_synthetic(task="sod", num_samples=4)
    row = ds[0]
    assert row["task"] == "sod" and row["group"] == "" and row["instances"] == []
    assert row["prompt"][0]["content"][0]["type"] == "image"
    assert row["images"][0].mode == "RGB" and row["images"][0].size == (56, 56)
    mask = np.array(row["masks"][0])
    assert row["masks"][0].mode == "L" and set(np.unique(mask)) == {0, 255}


def test_curriculum_and_difficulty_knobs():
    alone = list(generate_rows(SyntheticConfig(num_samples=20, single_object_fraction=1.0)))
    assert all(len(r["scene"][0]) == 1 for r in alone)
    half = list(generate_rows(SyntheticConfig(num_samples=200, single_object_fraction=0.5)))
    fraction = np.mean([len(r["scene"][0]) == 1 for r in half])
    assert 0.4 < fraction < 0.6
    similar = list(generate_rows(SyntheticConfig(num_samples=40, colour_similarity=1.0)))
    # RGB distances: red-orange 102, red-purple 162, red-pink 171; blue-purple 110, blue-cyan 120, blue-green 184.
    nearest = {"red": {"orange", "purple"}, "blue": {"purple", "cyan"}}
    checked = 0
    for row in similar:
        target, distractor = row["scene"][0][0], row["scene"][0][1]
        if target["colour"] in nearest:
            assert distractor["colour"] in nearest[target["colour"]]
            checked += 1
    assert checked > 0
    big = list(generate_rows(SyntheticConfig(num_samples=3, image_size=128, object_scale=1.0, texture_strength=0.0)))
    image = big[0]["images"][0]
    assert image.shape == (128, 128, 3)
    scale = list(generate_rows(SyntheticConfig(num_samples=1, image_size=128, object_scale=2.0)))
    assert scale[0]["scene"][0][0]["radius"] == pytest.approx(2 * big[0]["scene"][0][0]["radius"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "detect"}, "task"),
        ({"rule": "texture"}, "rule"),
        ({"split": "dev"}, "split"),
        ({"num_distractors": (1, 3)}, "at least 2 distractors"),
        ({"num_distractors": (3, 2)}, "num_distractors"),
        ({"single_object_fraction": 1.5}, "single_object_fraction"),
        ({"image_size": 8}, "image_size"),
        ({"task": "cosod", "group_size": (1, 3)}, "group_size"),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_crowded_scene_raises_a_clear_error():
    with pytest.raises(ValueError, match="object_scale"):
        generate_synthetic(task="sod", num_samples=1, object_scale=4.0)


@pytest.mark.parametrize("task", ["sod", "sis", "cosod"])
def test_shapes_segmenter_reproduces_the_ground_truth(task):
    # The contract in synthetic.py's docstring: expressions + exact colours let the weight-free segmenter be exact.
    from cgpo_trl.saliency.segmenters import load_segmenter

    segmenter = load_segmenter("shapes", cache_size=None)
    rows = generate_synthetic(task=task, num_samples=12, seed=6, rule="mixed", group_size=(3, 3))
    images, expressions, targets = [], [], []
    for row in rows:
        if task == "sis":
            for rle, expression in zip(row["instances"], row["expressions"]):
                images.append(row["images"][0])
                expressions.append(expression)
                targets.append(decode_instance(rle))
        else:
            for image, mask in zip(row["images"], row["masks"]):
                images.append(image)
                expressions.append(row["expressions"][0])
                targets.append(np.asarray(mask) > 0)
    for (prediction, _score), target in zip(segmenter.segment(images, expressions), targets):
        np.testing.assert_array_equal(prediction >= 0.5, target)


def test_partly_wrong_expressions_earn_graded_credit_on_the_synthetic_world():
    # Under the colour rule the target's colour is unique: the right colour with a wrong shape still segments the
    # target (as a real referring segmenter would), the distractors' colour segments the distractors, and the strict
    # all-or-nothing mode gives nothing for either.
    from cgpo_trl.saliency.segmenters import load_segmenter

    graded = load_segmenter("shapes", cache_size=None)
    strict = load_segmenter("shapes", strict=True, cache_size=None)
    rows = list(generate_rows(SyntheticConfig(task="sod", num_samples=12, rule="colour", seed=2)))
    for row in rows:
        (image,), (mask,), (scene,) = row["images"], row["masks"], row["scene"]
        target, distractor = scene[0], scene[1]
        wrong_shape = next(s for s in SHAPES if s != target["shape"] and all(o["shape"] != s for o in scene))
        expressions = [f"the {target['colour']} {wrong_shape}", f"the {distractor['colour']} {wrong_shape}"]
        pil = Image.fromarray(image)
        [(right_colour, score), (wrong_colour, _)] = graded.segment([pil, pil], expressions)
        np.testing.assert_array_equal(right_colour >= 0.5, mask)
        assert score == pytest.approx(4 / 6)
        assert right_colour.any() and not (wrong_colour >= 0.5)[mask].any() and wrong_colour.any()
        assert all(not m.any() for m, _ in strict.segment([pil, pil], expressions))
