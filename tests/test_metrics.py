"""Saliency metrics against values worked out by hand from the metric definitions."""

import json

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.saliency.metrics import (
    SOD_METRICS,
    MetricInputError,
    aggregate,
    aggregate_groups,
    encode_mask,
    evaluate_sis,
    load_pair,
    match_files,
    read_mask,
    score_pair,
)

H = W = 40


def square_gt():
    """A centred 20x20 square: the foreground centroid splits it into four mixed quadrants."""
    gt = np.zeros((H, W), np.uint8)
    gt[10:30, 10:30] = 255
    return gt


def f_beta(precision, recall, beta2=0.3):
    return (1 + beta2) * precision * recall / (beta2 * precision + recall)


def e_measure(pred01, gt_bool):
    """Enhanced-alignment measure (Fan et al. 2018) with the MATLAB code's (N - 1) normaliser."""
    p, g = pred01 - pred01.mean(), gt_bool - gt_bool.mean()
    align = 2 * p * g / (p**2 + g**2 + 1e-16)
    return ((align + 1) ** 2 / 4).sum() / (gt_bool.size - 1)


def test_perfect_prediction_scores_one():
    gt = square_gt()
    m = aggregate([score_pair(gt, gt)])
    assert m["MAE"] == 0
    for key in ("Sm", "wFm", "maxFm", "adpFm"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    # E-measure's sum over N pixels is divided by N - 1 in the reference code.
    em_perfect = H * W / (H * W - 1)
    assert m["maxEm"] == m["adpEm"] == pytest.approx(em_perfect)
    # The mean runs over 256 thresholds; the lowest (t = 0) marks every pixel foreground.
    assert m["meanFm"] == pytest.approx((255 + f_beta(0.25, 1.0)) / 256)
    assert m["meanEm"] == pytest.approx((255 * em_perfect + e_measure(np.ones((H, W)), gt > 128)) / 256)


def test_all_zero_prediction_against_square():
    gt = square_gt()
    u = 400 / 1600  # foreground fraction
    m = aggregate([score_pair(np.zeros_like(gt), gt)])
    assert m["MAE"] == pytest.approx(u)
    # S-object: foreground score 0, background score 2*1/(1+1) = 1, weighted by 1 - u; S-region: every quadrant mixes
    # foreground and background while the prediction is flat, so each SSIM is 0. Sm = 0.5 * (1 - u).
    assert m["Sm"] == pytest.approx(0.5 * (1 - u))
    assert m["wFm"] == 0
    # A flat prediction is not stretched; its adaptive threshold 2*mean = 0 marks every pixel foreground.
    assert m["adpFm"] == pytest.approx(f_beta(u, 1.0))
    assert m["adpEm"] == pytest.approx(e_measure(np.ones((H, W)), gt > 128))


def test_empty_gt():
    gt = np.zeros((H, W), np.uint8)
    m = aggregate([score_pair(np.zeros_like(gt), gt)])
    assert m["MAE"] == 0 and m["Sm"] == 1
    full = aggregate([score_pair(np.full_like(gt, 255), gt)])
    assert full["MAE"] == 1 and full["Sm"] == 0


def test_partial_binary_prediction_from_definitions():
    gt = square_gt()
    pred = np.zeros_like(gt)
    pred[10:30, 10:20] = 255  # left half of the square: TP = 200
    pred[0:5, 0:10] = 255  # 50 false positives
    m = aggregate([score_pair(pred, gt)])
    assert m["MAE"] == pytest.approx((200 + 50) / 1600)
    f_pred = f_beta(200 / 250, 200 / 400)
    f_all = f_beta(400 / 1600, 1.0)  # threshold 0: every pixel foreground
    # 256 thresholds t = 0..255 ("pred*255 >= t"): t = 0 selects all pixels, t >= 1 the predicted mask.
    assert m["adpFm"] == pytest.approx(f_pred)
    assert m["maxFm"] == pytest.approx(max(f_pred, f_all))
    assert m["meanFm"] == pytest.approx((255 * f_pred + f_all) / 256)
    em_pred, em_all = e_measure(pred / 255.0, gt > 128), e_measure(np.ones((H, W)), gt > 128)
    assert m["adpEm"] == pytest.approx(em_pred)
    assert m["meanEm"] == pytest.approx((255 * em_pred + em_all) / 256)


def test_grey_prediction_is_min_max_stretched():
    gt = square_gt()
    pred = np.full_like(gt, 64)
    pred[10:30, 10:30] = 192
    pred[0:10, 0:10] = 128
    # mapminmax: 64 -> 0, 192 -> 1, 128 -> 0.5, so only the 100 pixels at 128 are wrong, by 0.5 each.
    assert aggregate([score_pair(pred, gt)])["MAE"] == pytest.approx(100 * 0.5 / 1600)


def test_shape_and_dtype_mismatch_are_clear_errors():
    gt = square_gt()
    with pytest.raises(MetricInputError, match="shape"):
        score_pair(gt[:20], gt)
    with pytest.raises(MetricInputError, match="uint8"):
        score_pair(gt.astype(np.float32), gt)


def test_per_image_scores_match_the_toolkits_accumulating_recorder():
    """PySODEvalToolkit steps one set of pysodmetrics objects over all images; scoring images one at a time and
    averaging must give the same numbers bit for bit."""
    import py_sod_metrics as psm

    rng = np.random.default_rng(0)
    preds, gts = [], []
    for i in range(5):
        gt = np.zeros((30 + i, 36), np.uint8)
        gt[5 + i : 20 + i, 8:30] = 255
        preds.append(rng.integers(0, 256, gt.shape, dtype=np.uint8))
        gts.append(gt)
    mae, sm, wfm, em, fm = psm.MAE(), psm.Smeasure(), psm.WeightedFmeasure(), psm.Emeasure(), psm.FmeasureV2()
    fm.add_handler("fm", psm.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3, sample_based=True))
    for p, g in zip(preds, gts):
        for metric in (mae, sm, wfm, em, fm):
            metric.step(p, g)
    fm_res, em_res = fm.get_results()["fm"], em.get_results()["em"]
    toolkit = {
        "MAE": mae.get_results()["mae"],
        "Sm": sm.get_results()["sm"],
        "wFm": wfm.get_results()["wfm"],
        "maxFm": fm_res["dynamic"].max(),
        "meanFm": fm_res["dynamic"].mean(),
        "adpFm": fm_res["adaptive"],
        "maxEm": em_res["curve"].max(),
        "meanEm": em_res["curve"].mean(),
        "adpEm": em_res["adp"],
    }
    ours = aggregate([score_pair(p, g) for p, g in zip(preds, gts)])
    assert list(ours) == list(SOD_METRICS)
    assert ours == {k: float(v) for k, v in toolkit.items()}


def test_cosod_conventions_differ_on_unbalanced_groups():
    gt = square_gt()
    perfect, empty = score_pair(gt, gt), score_pair(np.zeros_like(gt), gt)
    groups = {"a": [perfect, perfect, perfect], "b": [empty]}
    by_image = aggregate_groups(groups, "image")
    by_group = aggregate_groups(groups, "group")
    assert by_image["MAE"] == pytest.approx(0.25 / 4)  # (0 + 0 + 0 + 0.25) / 4 images
    assert by_group["MAE"] == pytest.approx(0.25 / 2)  # (0 + 0.25) / 2 groups
    # max F is taken on the averaged curve in both conventions
    assert by_group["maxFm"] == pytest.approx(np.max((perfect.fm_curve + empty.fm_curve) / 2))
    with pytest.raises(MetricInputError, match="convention"):
        aggregate_groups(groups, "dataset")


def test_read_mask_and_resize(tmp_path):
    gt = square_gt()
    Image.fromarray(gt).save(tmp_path / "gt.png")
    small = np.zeros((20, 20), np.uint8)
    small[5:15, 5:15] = 255
    Image.fromarray(small).convert("RGB").save(tmp_path / "pred.png")  # colour file: read as grey
    pred, g = load_pair(tmp_path / "pred.png", tmp_path / "gt.png")
    assert pred.shape == g.shape == (H, W) and pred.dtype == np.uint8
    np.testing.assert_array_equal(g, gt)
    assert pred[20, 20] == 255 and pred[2, 2] == 0 and 0 < pred[9, 20] < 255  # bilinear edge
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MetricInputError, match="bad.png"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(MetricInputError, match="nothere.png"):
        read_mask(tmp_path / "nothere.png")


def test_match_files_names_missing_and_extra(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for name in ("a", "b"):
        Image.fromarray(square_gt()).save(tmp_path / "g" / f"{name}.png")
    for name in ("a", "c"):
        Image.fromarray(square_gt()).save(tmp_path / "p" / f"{name}.png")
    with pytest.raises(MetricInputError, match=r"missing predictions .*: b.*extra predictions .*: c"):
        match_files(tmp_path / "p", tmp_path / "g")
    matched = match_files(tmp_path / "p", tmp_path / "g", allow_missing=True)
    assert list(matched.pairs) == ["a"] and matched.missing == ["b"] and matched.extra == ["c"]


# ------------------------------------------------------------------------------------------------------------- SIS


def coco_gt(masks):
    images = [{"id": 1, "file_name": "1.png", "height": H, "width": W}]
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": encode_mask(m), "iscrowd": 0}
        for i, m in enumerate(masks)
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "salient"}]}


def two_instances():
    a = np.zeros((H, W), bool)
    a[2:12, 2:12] = True
    b = np.zeros((H, W), bool)
    b[20:36, 20:36] = True
    return a, b


def det(mask, score):
    return {"image_id": 1, "segmentation": encode_mask(mask), "score": score}


def test_sis_perfect_and_half_recall():
    a, b = two_instances()
    gt = coco_gt([a, b])
    assert evaluate_sis([det(a, 0.9), det(b, 0.8)], gt) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP70": 1.0})
    # Recall stops at 0.5 with precision 1: COCO's 101 recall points 0, .01, ..., .50 score 1, the rest 0.
    half = evaluate_sis([det(a, 0.9)], gt)
    assert half == pytest.approx({"AP": 51 / 101, "AP50": 51 / 101, "AP70": 51 / 101})


def test_sis_iou_between_thresholds():
    a, _ = two_instances()
    pred = np.zeros((H, W), bool)
    pred[2:12, 2:8] = True  # 60 of a's 100 pixels, nothing else: IoU 0.6 -> matched at .50, .55, .60 only
    out = evaluate_sis([det(pred, 0.5)], coco_gt([a]))
    assert out == pytest.approx({"AP": 3 / 10, "AP50": 1.0, "AP70": 0.0})


def test_sis_bad_inputs(tmp_path):
    a, b = two_instances()
    gt = coco_gt([a, b])
    assert evaluate_sis([], gt) == {"AP": 0.0, "AP50": 0.0, "AP70": 0.0}
    bad = tmp_path / "results.json"
    bad.write_text("[{not json")
    with pytest.raises(MetricInputError, match="results.json"):
        evaluate_sis(bad, gt)
    with pytest.raises(MetricInputError, match="image_id"):
        evaluate_sis([{**det(a, 0.9), "image_id": 7}], gt)
    with pytest.raises(MetricInputError, match="score"):
        evaluate_sis([{"image_id": 1, "segmentation": encode_mask(a)}], gt)
    two_cats = {**gt, "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}
    with pytest.raises(MetricInputError, match="one 'salient' category"):
        evaluate_sis([det(a, 0.9)], two_cats)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    assert evaluate_sis([det(a, 0.9), det(b, 0.8)], gt_file)["AP"] == pytest.approx(1.0)


def test_read_mask_of_16_bit_and_alpha_channel_pngs(tmp_path):
    """Two encodings OpenCV's grayscale read turns black: a 16-bit PNG holding 0-255, and the mask drawn in the
    alpha channel of a transparent PNG. A full-range 16-bit map is still read as OpenCV (the toolkit) reads it."""
    gt = square_gt()
    Image.fromarray(gt.astype(np.uint16)).save(tmp_path / "sixteen.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "sixteen.png"), gt)
    full = gt.astype(np.uint16) * 257
    Image.fromarray(full).save(tmp_path / "full.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "full.png"), gt)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = gt
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "alpha.png"), gt)
    coloured = rgba.copy()
    coloured[..., 0] = gt  # colour varies: an ordinary RGBA image, read as its grey level like OpenCV does
    Image.fromarray(coloured).save(tmp_path / "colour.png")
    assert read_mask(tmp_path / "colour.png").max() < 255


def test_sis_input_is_validated_with_errors_naming_the_entry():
    a, b = two_instances()
    gt = coco_gt([a, b])
    with pytest.raises(MetricInputError, match=r"results\[0\] has score nan"):
        evaluate_sis([det(a, float("nan"))], gt)
    with pytest.raises(MetricInputError, match=r"results\[0\] has score '0.9'"):
        evaluate_sis([det(a, "0.9")], gt)
    garbage = {**det(a, 0.9), "segmentation": {"size": [H, W], "counts": "0"}}  # pycocotools decodes it
    with pytest.raises(MetricInputError, match=r"results\[0\]: RLE runs sum to 0"):
        evaluate_sis([garbage], gt)
    with pytest.raises(MetricInputError, match=r"results\[0\]: .*invalid character"):
        evaluate_sis([{**garbage, "segmentation": {"size": [H, W], "counts": "garbage!!"}}], gt)
    wrong_size = {**det(a, 0.9), "segmentation": encode_mask(np.ones((20, 20), bool))}
    with pytest.raises(MetricInputError, match=r"results\[0\]: RLE size \[20, 20\] differs from the image size"):
        evaluate_sis([wrong_size], gt)
    polygon = {"id": 9, "image_id": 5, "category_id": 1, "segmentation": [[1, 1, 8, 1, 8, 8]]}
    with pytest.raises(MetricInputError, match=r"annotations\[2\] refers to image_id 5"):
        evaluate_sis([det(a, 0.9)], {**gt, "annotations": gt["annotations"] + [polygon]})
    no_height = {**gt, "images": [{"id": 1, "file_name": "1.png", "width": W}]}
    with pytest.raises(MetricInputError, match=r"images\[0\] lacks field\(s\) \['height'\]"):
        evaluate_sis([det(a, 0.9)], no_height)
    broken_gt = {**gt, "annotations": [{**gt["annotations"][0], "segmentation": {"size": [H, W], "counts": "0"}}]}
    with pytest.raises(MetricInputError, match=r"annotations\[0\]: RLE runs sum to 0"):
        evaluate_sis([det(a, 0.9)], broken_gt)
    # Polygons and uncompressed RLE in the ground truth are still read.
    square = {**gt["annotations"][0], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}
    assert evaluate_sis([det(a, 0.9)], {**gt, "annotations": [square]})["AP50"] == pytest.approx(1.0)
