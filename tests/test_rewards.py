import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cgpo_trl.saliency.rewards import (
    CoSODReward,
    FormatReward,
    SaliencyReward,
    SODReward,
    build_reward_funcs,
    completion_text,
    eos_token_ids_of,
    get_reward_funcs,
    instance_quality,
    list_rewards,
    region_quality,
)
from cgpo_trl.saliency.segmenters import ReferringSegmenter, load_segmenter
from cgpo_trl.saliency.tags import format_answer

H = W = 10


def _box(r0, r1, c0, c1, shape=(H, W)):
    mask = np.zeros(shape, np.float32)
    mask[r0:r1, c0:c1] = 1.0
    return mask


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _gt_image(mask):
    return Image.fromarray((mask * 255).astype(np.uint8))


class TableSegmenter(ReferringSegmenter):
    """Returns a fixed mask per expression (empty if unknown); "boom" raises; records every call."""

    name = "table"

    def __init__(self, table):
        self.table, self.calls = table, []

    def _segment_regions(self, images, expressions):
        self.calls.append(list(expressions))
        if "boom" in expressions:
            raise RuntimeError("backend exploded")
        out = []
        for image, e in zip(images, expressions):
            mask = self.table.get(e, np.zeros((H, W), np.float32))
            out.append(
                (
                    mask
                    if mask.shape == (image.height, image.width)
                    else np.zeros((image.height, image.width), np.float32),
                    1.0,
                )
            )
        return out


TABLE = {
    "top left": _box(0, 4, 0, 4),  # 16 px
    "top half": _box(0, 4, 0, 8),  # 32 px, contains top left
    "bottom right": _box(6, 10, 6, 10),
    "everything": np.ones((H, W), np.float32),
}
IMAGE = Image.new("RGB", (W, H))
IMAGE_2 = Image.new("RGB", (W, H), (1, 1, 1))


def _answer(tag, *expressions):
    return format_answer("because", **{("regions" if tag == "rg" else "instances"): list(expressions)})


def _chat(text):
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------------------------
# completion text and format


def test_completion_text_reads_strings_messages_and_text_blocks():
    assert completion_text("plain") == "plain"
    assert completion_text(_chat("a")) == "a"
    assert (
        completion_text(
            [
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
                }
            ]
        )
        == "ab"
    )
    assert completion_text([{"role": "user", "content": "no"}, {"role": "assistant", "content": "yes"}]) == "yes"
    assert completion_text(None) == "" and completion_text([1, {"content": 3}]) == ""


def test_format_reward_requires_well_formed_task_answer_think_and_eos():
    reward = FormatReward(eos_token_ids=[7])
    completions = [
        _chat(_answer("rg", "the dog")),  # good
        _chat(_answer("ins", "the dog")),  # wrong tag for sod
        _chat("<answer><rg>the dog</rg></answer>"),  # no think
        _chat(_answer("rg", "the dog") + " thanks!"),  # text after </answer>
        _chat(_answer("rg", "the dog")),  # stopped by the length cap
        "<think>x</think><answer><ins>a</ins><ins>b</ins></answer>",  # good SIS, plain string
    ]
    ids = [[1, 2, 7], [1, 7], [1, 7], [1, 7], [1, 2, 3], [5, 7]]
    tasks = ["sod"] * 5 + ["sis"]
    assert reward([None] * 6, completions, completion_ids=ids, task=tasks) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert reward.__name__ == "format"


def test_format_reward_termination_from_length_cap_or_text_only():
    good = [_answer("rg", "a")] * 2
    assert FormatReward(max_completion_length=3)(None, good, completion_ids=[[1, 2], [1, 2, 3]]) == [1.0, 0.0]
    assert FormatReward()(None, good, completion_ids=[[1, 2], [1, 2, 3]]) == [1.0, 1.0]
    both = FormatReward(eos_token_ids=[9], max_completion_length=3)
    assert both(None, good * 2, completion_ids=[[1, 2], [1, 2, 3], [1, 2, 9], [1, 9, 9, 9]]) == [1.0, 0.0, 1.0, 1.0]
    assert FormatReward(eos_token_ids=2, require_think=False)(
        None, ["<answer><rg>a</rg></answer>"], completion_ids=[[2]]
    ) == [1.0]


def test_eos_token_ids_follow_trl_rule():
    class Tok:
        eos_token_id = 5

    class Proc:
        tokenizer = Tok()

    class GenConfig:
        eos_token_id = [6, 5]

    assert eos_token_ids_of(Tok()) == [5]
    assert eos_token_ids_of(Proc(), GenConfig()) == [6, 5]


# ----------------------------------------------------------------------------------------------------------------
# metrics on hand-made masks


def test_region_quality_hand_computed():
    gt = TABLE["top left"] > 0
    pred = TABLE["top half"]  # TP 16, FP 16, FN 0
    assert region_quality(pred, gt, "iou") == pytest.approx(0.5)
    fbeta = 1.3 * 0.5 * 1.0 / (0.3 * 0.5 + 1.0)  # precision 0.5, recall 1
    assert region_quality(pred, gt, "fbeta") == pytest.approx(fbeta)
    assert region_quality(pred, gt, {"iou": 1, "fbeta": 3}) == pytest.approx((0.5 + 3 * fbeta) / 4)
    assert region_quality(gt.astype(np.float32), gt) == pytest.approx(1.0)
    # S-measure on an empty ground truth is 1 - mean(prediction).
    assert region_quality(np.full((H, W), 0.25), np.zeros((H, W), bool)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="metric must be one of"):
        region_quality(pred, gt, "dice")


def test_instance_quality_hungarian_matching_hand_computed():
    a, b = TABLE["top left"], TABLE["bottom right"]
    gts = [_rle(a), _rle(b)]
    assert instance_quality([b, a], gts) == pytest.approx(1.0)  # order does not matter
    assert instance_quality([a], gts) == pytest.approx(0.5)  # one missed
    assert instance_quality([a, b, TABLE["everything"]], gts) == pytest.approx(2 / 3)  # one spurious
    # "top half" overlaps a with IoU 0.5 and b with 0; greedy on order would not matter here, matching is optimal:
    assert instance_quality([TABLE["top half"], b], gts) == pytest.approx((0.5 + 1.0) / 2)
    assert instance_quality([], gts) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# task rewards


def _rows():
    """A mixed batch: SOD (half right), SIS (one exact, one missed), CoSOD (exact in one image, empty in other),
    a malformed SOD answer, and a SOD answer in the wrong tag."""
    completions = [
        _chat(_answer("rg", "top half")),
        _chat(_answer("ins", "top left")),
        _chat(_answer("rg", "top left")),
        _chat("<answer><rg>top left"),
        _chat(_answer("ins", "top left")),
    ]
    columns = dict(
        task=["sod", "sis", "cosod", "sod", "sod"],
        images=[[IMAGE], [IMAGE], [IMAGE, IMAGE_2], [IMAGE], [IMAGE]],
        masks=[
            [_gt_image(TABLE["top left"])],
            [],
            [_gt_image(TABLE["top left"]), _gt_image(TABLE["top left"])],
            [_gt_image(TABLE["top left"])],
            [_gt_image(TABLE["top left"])],
        ],
        instances=[[], [_rle(TABLE["top left"]), _rle(TABLE["bottom right"])], [], [], []],
    )
    return completions, columns


def test_saliency_reward_mixed_batch_hand_computed_with_one_segmenter_call():
    segmenter = TableSegmenter(TABLE)
    reward = SaliencyReward(segmenter=segmenter, metric="iou")
    completions, columns = _rows()
    logged = {}
    rewards = reward([None] * 5, completions, log_metric=logged.__setitem__, **columns)
    assert rewards == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0])
    assert segmenter.calls == [["top half", "top left", "top left", "top left"]]
    assert logged["saliency/segmenter_failures"] == 0.0 and logged["saliency/malformed"] == pytest.approx(2 / 5)


def test_single_task_rewards_return_none_on_other_tasks():
    completions, columns = _rows()
    sod = SODReward(segmenter=TableSegmenter(TABLE), metric="iou")([None] * 5, completions, **columns)
    assert sod == pytest.approx([0.5, None, None, 0.0, 0.0])
    cosod = CoSODReward(segmenter=TableSegmenter(TABLE))([None] * 5, completions, **columns)
    assert cosod == [None, None, pytest.approx(1.0), None, None]


def test_union_of_regions_and_cosod_mean_over_images():
    segmenter = TableSegmenter(TABLE)
    gt = TABLE["top left"] + TABLE["bottom right"]
    completions = [_answer("rg", "top left", "bottom right"), _answer("rg", "top left")]
    rewards = SaliencyReward(segmenter, metric="iou")(
        [None, None],
        completions,
        task=["sod", "cosod"],
        images=[[IMAGE], [IMAGE, IMAGE_2]],
        masks=[[_gt_image(gt)], [_gt_image(TABLE["top left"]), _gt_image(TABLE["top half"])]],
    )
    assert rewards == pytest.approx([1.0, (1.0 + 0.5) / 2])


def test_segmenter_failure_zeroes_only_that_row_and_is_logged():
    segmenter = TableSegmenter(TABLE)
    completions = [_answer("rg", "top left"), _answer("rg", "boom"), _answer("rg", "top half")]
    logged = {}
    rewards = SODReward(segmenter, metric="iou")(
        [None] * 3,
        completions,
        images=[[IMAGE]] * 3,
        masks=[[_gt_image(TABLE["top left"])]] * 3,
        log_metric=logged.__setitem__,
    )
    assert rewards == pytest.approx([1.0, 0.0, 0.5])
    assert logged["sod/segmenter_failures"] == 1.0
    assert len(segmenter.calls) == 4  # the batch, then row by row


def test_prediction_is_resized_to_a_larger_ground_truth():
    gt = np.zeros((20, 20), np.float32)
    gt[:8, :8] = 1
    [reward] = SODReward(TableSegmenter(TABLE), metric="iou")(
        [None], [_answer("rg", "top left")], images=[[IMAGE]], masks=[[_gt_image(gt)]]
    )
    assert reward == pytest.approx(1.0, abs=0.15)


def test_bad_columns_and_arguments_are_clear_errors():
    completions, columns = _rows()
    reward = SaliencyReward(TableSegmenter(TABLE))
    with pytest.raises(ValueError, match="needs the `task` column"):
        reward([None] * 5, completions, images=columns["images"], masks=columns["masks"])
    with pytest.raises(ValueError, match="need the `masks` column"):
        SODReward(TableSegmenter(TABLE))([None], [_answer("rg", "top left")], images=[[IMAGE]])
    with pytest.raises(ValueError, match="2 images but 1 ground-truth masks"):
        CoSODReward(TableSegmenter(TABLE))(
            [None], [_answer("rg", "top left")], images=[[IMAGE, IMAGE_2]], masks=[[_gt_image(TABLE["top left"])]]
        )
    with pytest.raises(TypeError, match="needs segmenter="):
        SaliencyReward(segmenter="shapes")


def test_registry_builds_rewards_by_name_and_routes_options():
    assert {"format", "sod", "sis", "cosod", "saliency"} <= set(list_rewards())
    segmenter = TableSegmenter(TABLE)
    fmt, sal = get_reward_funcs(["format", "saliency"], segmenter=segmenter, eos_token_ids=[2], metric="iou")
    assert isinstance(fmt, FormatReward) and fmt.eos_token_ids == {2}
    assert isinstance(sal, SaliencyReward) and sal.segmenter is segmenter and sal.metric == "iou"
    assert [f.__name__ for f in (fmt, sal)] == ["format", "saliency"]
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_funcs(["accuracy"])
    with pytest.raises(ValueError, match=r"\['metrc'\] are not accepted"):
        get_reward_funcs(["format"], metrc="iou")


def test_build_reward_funcs_loads_a_segmenter_by_name_once():
    sod, cosod = build_reward_funcs(["sod", "cosod"], segmenter="shapes", segmenter_kwargs={"cache_size": 16})
    assert sod.segmenter is cosod.segmenter and sod.segmenter.name == "shapes"
    [fmt] = build_reward_funcs(["format"], segmenter="shapes")  # a segmenter no reward takes is not an error
    assert isinstance(fmt, FormatReward)
    with pytest.raises(ValueError, match="segmenter_kwargs applies only"):
        build_reward_funcs(["sod"], segmenter=TableSegmenter(TABLE), segmenter_kwargs={"cache_size": 1})


def test_saliency_reward_with_shapes_segmenter_on_a_drawn_scene():
    from skimage.draw import disk, polygon

    image = np.full((48, 48, 3), 128, np.uint8)
    rr, cc = disk((14, 14), 8, shape=(48, 48))
    image[rr, cc] = (220, 40, 40)
    gt = np.zeros((48, 48), np.uint8)
    gt[rr, cc] = 255
    rr, cc = polygon([28, 28, 44, 44], [28, 44, 44, 28], shape=(48, 48))
    image[rr, cc] = (40, 80, 220)
    reward = SaliencyReward(load_segmenter("shapes"))
    completions = [
        _chat(_answer("rg", "the red circle")),
        _chat(_answer("rg", "the blue square")),
        _chat(_answer("rg", "a dog")),
    ]
    rewards = reward(
        [None] * 3,
        completions,
        task=["sod"] * 3,
        images=[[Image.fromarray(image)]] * 3,
        masks=[[Image.fromarray(gt)]] * 3,
    )
    assert rewards[0] == pytest.approx(1.0)
    assert rewards[1] < 0.5 and rewards[2] < 0.5


def test_undecoded_images_are_a_data_error_not_a_segmenter_failure():
    with pytest.raises(TypeError, match="row 0: `images` must hold PIL images"):
        SODReward(TableSegmenter(TABLE))([None], [_answer("rg", "a")], images=[[{"bytes": b""}]], masks=[[None]])


# ----------------------------------------------------------------------------------------------------------------
# bad segmenter output, empty ground truth, group size


def test_a_nan_mask_costs_its_row_not_the_step():
    """pysodmetrics raises on a NaN mask; the segmenter contract turns it into a failure of that row alone."""
    table = {**TABLE, "nan": np.full((H, W), np.nan, np.float32)}
    logged = {}
    rewards = SODReward(TableSegmenter(table), metric="iou")(
        [None] * 3,
        [_answer("rg", "top left"), _answer("rg", "nan"), _answer("rg", "top half")],
        images=[[IMAGE]] * 3,
        masks=[[_gt_image(TABLE["top left"])]] * 3,
        log_metric=logged.__setitem__,
    )
    assert rewards == pytest.approx([1.0, 0.0, 0.5])
    assert logged["sod/segmenter_failures"] == 1.0


def test_a_broken_segmenter_stops_the_run_after_consecutive_failing_calls():
    reward = SODReward(TableSegmenter(TABLE), metric="iou", max_failure_rate=0.5, max_failed_calls=2)
    columns = dict(images=[[IMAGE]] * 2, masks=[[_gt_image(TABLE["top left"])]] * 2)
    broken = [_answer("rg", "boom"), _answer("rg", "boom")]
    healthy = [_answer("rg", "top left"), _answer("rg", "boom")]  # 1 of 2 rows fails: not above the rate
    assert reward([None] * 2, broken, **columns) == [0.0, 0.0]
    assert reward([None] * 2, healthy, **columns) == pytest.approx([1.0, 0.0])  # resets the count
    assert reward([None] * 2, broken, **columns) == [0.0, 0.0]
    with pytest.raises(RuntimeError, match=r"segmenter 'table' failed on more than 50% .* last 2 calls .*exploded"):
        reward([None] * 2, broken, **columns)
    with pytest.raises(ValueError, match="max_failure_rate"):
        SODReward(TableSegmenter(TABLE), max_failure_rate=1.0)


def test_nothing_is_salient_has_a_right_answer():
    """An empty <answer></answer> is well-formed; it scores 1 on an empty ground truth and 0 elsewhere, and any
    expression on an empty ground truth is a false positive."""
    from cgpo_trl.saliency.rewards import NO_EXPRESSION, read_answer
    from cgpo_trl.saliency.tags import parse_answer

    empty = "<think>nothing stands out</think><answer></answer>"
    assert parse_answer(empty, task="sis").problems == [NO_EXPRESSION]  # the problem read_answer lifts
    assert read_answer(empty, "sis").ok and not read_answer("<think>x</think><answer><ins></ins></answer>", "sis").ok
    assert FormatReward(eos_token_ids=[7])([None], [empty], completion_ids=[[1, 7]], task=["sis"]) == [1.0]
    segmenter = TableSegmenter(TABLE)
    blank = np.zeros((H, W), np.float32)
    rewards = SaliencyReward(segmenter, metric="iou")(
        [None] * 6,
        [empty, _answer("ins", "top left"), empty, empty, _answer("rg", "top left"), _answer("rg", "nothing")],
        task=["sis", "sis", "sis", "sod", "sod", "sod"],
        images=[[IMAGE]] * 6,
        instances=[[], [], [_rle(TABLE["top left"])], [], [], []],
        masks=[[], [], [], [_gt_image(blank)], [_gt_image(blank)], [_gt_image(blank)]],
    )
    # "nothing" segments to an empty mask: IoU of empty on empty is 1 (pysodmetrics alone gives 0)
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert segmenter.calls == [["top left", "top left", "nothing"]]  # empty answers need no segmentation
    assert instance_quality([], []) == 1.0 and instance_quality([TABLE["top left"]], []) == 0.0


def test_cosod_rows_are_scored_on_at_most_max_group_size_images():
    segmenter = TableSegmenter(TABLE)
    group = [Image.new("RGB", (W, H), (k, k, k)) for k in range(10)]
    gts = [_gt_image(TABLE["top left"] if k % 3 else TABLE["bottom right"]) for k in range(10)]
    reward = CoSODReward(segmenter, metric="iou", max_group_size=4)
    [value] = reward([None], [_answer("rg", "top left")], images=[group], masks=[gts])
    assert segmenter.calls == [["top left"] * 4]
    # images 0, 3, 6 and 9 are kept (evenly spaced): their masks are bottom right (0, 3, 6, 9 are multiples of 3)
    assert value == pytest.approx(0.0)
    [whole] = CoSODReward(segmenter, metric="iou", max_group_size=None)(
        [None], [_answer("rg", "top left")], images=[group], masks=[gts]
    )
    assert whole == pytest.approx(6 / 10)
