"""Prediction pipeline: synthetic rows -> answers -> `shapes` segmenter -> benchmark layout -> eval."""

import json

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.data.rows import decode_instance
from cgpo_trl.data.synthetic import generate_synthetic
from cgpo_trl.eval import main as eval_main
from cgpo_trl.predict import PredictConfig, predict_rows, rows_from_folder
from cgpo_trl.saliency.segmenters import load_segmenter
from cgpo_trl.saliency.tags import format_answer


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter("shapes")


class Oracle:
    """Answers every row with its reference solution and counts the rows it was asked about."""

    def __init__(self, answer=lambda row: row["solution"]):
        self.answer, self.calls = answer, 0

    def __call__(self, rows):
        self.calls += len(rows)
        return [self.answer(row) for row in rows]


def test_sod_oracle_answers_score_perfectly(tmp_path, segmenter):
    rows = generate_synthetic(task="sod", num_samples=5, split="test")
    summary = predict_rows(rows, Oracle(), segmenter, tmp_path / "sod", batch_size=2, progress=False)
    assert summary.num_predicted == 5 and summary.num_well_formed == 5
    assert sorted(p.name for p in summary.masks_dir.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert len(list((tmp_path / "sod" / "overlays").iterdir())) == 5
    m = eval_main(["sod", "--pred", str(summary.masks_dir), "--gt", str(summary.gt_dir), "--no_progress"])
    assert m["MAE"] == 0 and m["Sm"] == pytest.approx(1.0) and m["maxFm"] == pytest.approx(1.0)
    record = json.loads((tmp_path / "sod" / "predictions.jsonl").read_text().splitlines()[0])
    assert record["regions"] == rows[0]["expressions"] and record["problems"] == []


def test_cosod_layout_and_metrics(tmp_path, segmenter):
    rows = generate_synthetic(task="cosod", num_samples=3, split="test")
    summary = predict_rows(rows, Oracle(), segmenter, tmp_path / "co", progress=False)
    for row in rows:
        files = sorted(p.name for p in (summary.masks_dir / row["group"]).iterdir())
        assert files == [f"{j:03d}.png" for j in range(len(row["images"]))]
    for convention in ("image", "group"):
        m = eval_main(
            ["cosod", "--pred", str(summary.masks_dir), "--gt", str(summary.gt_dir), "--convention", convention]
        )
        assert m["MAE"] == 0 and m["Sm"] == pytest.approx(1.0), convention


def test_sis_results_and_score_policies(tmp_path, segmenter):
    rows = generate_synthetic(task="sis", num_samples=4, split="test", num_instances=(3, 3), image_size=112)
    summary = predict_rows(rows, Oracle(), segmenter, tmp_path / "sis", progress=False)
    ap = eval_main(["sis", "--pred", str(summary.results_json), "--gt", str(summary.annotations_json)])
    assert ap == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP70": 1.0})
    results = json.loads(summary.results_json.read_text())
    assert len(results) == 12 and {r["score"] for r in results} == {1.0}  # shapes scores every match 1.0

    # Emission order: the k-th of n expressions scores (n - k) / n. Naming a clutter object first ranks a false
    # positive above every true instance: with F such detections over the set, precision is 12 / (12 + F) at every
    # recall level, and so is AP50.
    def clutter_first(row):
        clutter = next(o for o in row["scene"][0] if not o["salient"])
        return format_answer(instances=[f"the {clutter['colour']} {clutter['shape']}", *row["expressions"]])

    ordered = predict_rows(
        rows, Oracle(clutter_first), segmenter, tmp_path / "order", instance_score="order", progress=False
    )
    results = json.loads(ordered.results_json.read_text())
    assert sorted({r["score"] for r in results}) == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])
    false_positives = sum(r["score"] == 1.0 for r in results)
    assert false_positives >= 4
    ap = eval_main(["sis", "--pred", str(ordered.results_json), "--gt", str(ordered.annotations_json)])
    assert ap["AP50"] == pytest.approx(12 / (12 + false_positives))
    gt = json.loads(ordered.annotations_json.read_text())
    first = decode_instance(gt["annotations"][0]["segmentation"])
    assert first.shape == (rows[0]["images"][0].height, rows[0]["images"][0].width)


def test_region_answers_are_merged(tmp_path, segmenter):
    """A SOD answer with several <rg> is the union of their masks."""
    sis = generate_synthetic(task="sis", num_samples=2, split="test", num_instances=(2, 2))
    rows = []
    for row in sis:
        union = np.any([decode_instance(r) for r in row["instances"]], axis=0)
        rows.append(
            {
                "task": "sod",
                "images": row["images"],
                "masks": [Image.fromarray(union.astype(np.uint8) * 255)],
                "solution": format_answer(regions=row["expressions"]),
            }
        )
    summary = predict_rows(rows, Oracle(), segmenter, tmp_path / "union", overlays=False, progress=False)
    m = eval_main(["sod", "--pred", str(summary.masks_dir), "--gt", str(summary.gt_dir)])
    assert m["MAE"] == 0


def test_resume_skips_finished_rows(tmp_path, segmenter):
    rows = generate_synthetic(task="sod", num_samples=4, split="test")
    oracle = Oracle()
    predict_rows(rows, oracle, segmenter, tmp_path / "r", progress=False)
    again = predict_rows(rows, oracle, segmenter, tmp_path / "r", progress=False)
    assert oracle.calls == 4 and again.num_skipped == 4
    log = tmp_path / "r" / "predictions.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # a run killed while writing row 2
    third = predict_rows(rows, oracle, segmenter, tmp_path / "r", progress=False)
    assert third.num_predicted == 2 and oracle.calls == 6
    records = [json.loads(line) for line in log.read_text().splitlines()]  # the torn line was replaced
    assert [r["key"] for r in records] == [f"sod:{i:06d}" for i in range(4)]
    log.write_text("garbage\n" + log.read_text())
    with pytest.raises(ValueError, match="predictions.jsonl:1"):
        predict_rows(rows, oracle, segmenter, tmp_path / "r", progress=False)


def test_malformed_answers_give_empty_masks(tmp_path, segmenter):
    rows = generate_synthetic(task="sod", num_samples=3, split="test")
    summary = predict_rows(rows, Oracle(lambda row: "<answer><rg>"), segmenter, tmp_path / "bad", progress=False)
    assert summary.num_well_formed == 0
    for path in summary.masks_dir.iterdir():
        assert not np.asarray(Image.open(path)).any()


def test_bad_inputs(tmp_path, segmenter):
    with pytest.raises(ValueError, match="instance_score"):
        PredictConfig(model_name_or_path="x", instance_score="random")
    with pytest.raises(ValueError, match="segmenter_kwargs"):
        PredictConfig(model_name_or_path="x", segmenter_kwargs="{oops")
    assert PredictConfig(segmenter_kwargs='{"device": "cpu"}').segmenter_kwargs == {"device": "cpu"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        rows_from_folder(tmp_path / "empty", "sod")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.jpg"):
        rows_from_folder(tmp_path / "imgs", "sod")
    image = Image.new("RGB", (32, 32))
    twins = [{"task": "sod", "images": [image], "name": "a"}, {"task": "sod", "images": [image], "name": "a"}]
    with pytest.raises(ValueError, match="unique"):
        predict_rows(twins, Oracle(), segmenter, tmp_path / "twins", progress=False)
    with pytest.raises(ValueError, match="task"):
        predict_rows([{"task": "vqa", "images": [image]}], Oracle(), segmenter, tmp_path / "t", progress=False)


@pytest.mark.slow
def test_cli_with_tiny_checkpoint_on_an_image_folder(tmp_path):
    """`python -m cgpo_trl.predict` path: checkpoint folder -> load_model_and_processor -> generate -> files."""
    from cgpo_trl.predict import main
    from cgpo_trl.testing import save_tiny_vlm

    checkpoint = save_tiny_vlm(tmp_path / "tiny")
    rows = generate_synthetic(task="cosod", num_samples=2, split="test", group_size=(2, 2))
    for row in rows:
        for j, image in enumerate(row["images"]):
            (tmp_path / "images" / row["group"]).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "images" / row["group"] / f"img{j}.jpg")
    argv = ["--model_name_or_path", checkpoint, "--images", str(tmp_path / "images"), "--task", "cosod"]
    argv += ["--segmenter", "shapes", "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "8"]
    summary = main(argv + ["--batch_size", "2"])
    assert summary.num_predicted == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["names"] for r in records] == [[f"{row['group']}/img0", f"{row['group']}/img1"] for row in rows]
    for record in records:
        assert isinstance(record["text"], str)
        for name in record["names"]:
            mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
            assert mask.shape == (56, 56) and mask.dtype == np.uint8
            assert (tmp_path / "out" / "overlays" / f"{name}.png").is_file()
    assert main(argv).num_skipped == 2
