"""Prediction pipeline: synthetic rows -> answers -> `shapes` segmenter -> benchmark layout -> eval."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.data.rows import decode_instance
from cgpo_trl.data.synthetic import generate_synthetic
from cgpo_trl.eval import main as eval_main
from cgpo_trl.predict import PredictConfig, predict_rows, rows_from_folder
from cgpo_trl.saliency.segmenters import ReferringSegmenter, load_segmenter
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


class BlobSegmenter(ReferringSegmenter):
    """'both' is one expression whose mask has two separate blobs; 'left' the left blob alone."""

    name = "blobs"

    @staticmethod
    def masks(height, width):
        left, right = np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
        left[4:12, 2:10], right[4:12, 20:28] = 1.0, 1.0
        return {"left": left, "both": np.maximum(left, right)}

    def _segment_regions(self, images, expressions):
        empty = [np.zeros((im.height, im.width), np.float32) for im in images]
        return [(self.masks(im.height, im.width).get(e, z), 0.9) for im, e, z in zip(images, expressions, empty)]


def test_sis_detections_are_the_masks_the_sis_reward_scores(tmp_path):
    """One detection per <ins>, its region mask whole (not split into connected components), as in training."""
    from cgpo_trl.data.rows import encode_instances
    from cgpo_trl.saliency.rewards import SISReward

    image = Image.new("RGB", (32, 16))
    truth = BlobSegmenter.masks(16, 32)["both"] > 0
    row = {"task": "sis", "images": [image], "instances": encode_instances([truth]), "name": "pair"}
    answer = format_answer("two parts, one object", instances=["both"])
    summary = predict_rows([row], Oracle(lambda r: answer), BlobSegmenter(), tmp_path / "p", progress=False)
    results = json.loads(summary.results_json.read_text())
    assert len(results) == 1
    np.testing.assert_array_equal(decode_instance(results[0]["segmentation"]), truth)
    ap = eval_main(["sis", "--pred", str(summary.results_json), "--gt", str(summary.annotations_json)])
    assert ap == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP70": 1.0})
    [reward] = SISReward(BlobSegmenter())([None], [answer], images=[[image]], instances=[row["instances"]])
    assert reward == pytest.approx(1.0)


def test_names_are_kept_as_on_disk_end_to_end(tmp_path, segmenter):
    """CoCA-style group folders with spaces and file stems with spaces: predictions land under the same names and
    score against the original folders."""
    rows = generate_synthetic(task="cosod", num_samples=2, split="test", group_size=(2, 2))
    for row, group in zip(rows, ("alarm clock", "rubber  duck")):
        for j, (image, mask) in enumerate(zip(row["images"], row["masks"])):
            (tmp_path / "images" / group).mkdir(parents=True, exist_ok=True)
            (tmp_path / "gt" / group).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "images" / group / f"photo {j}.png")
            mask.save(tmp_path / "gt" / group / f"photo {j}.png")
    folder_rows = rows_from_folder(tmp_path / "images", "cosod")
    assert folder_rows["group"] == ["alarm clock", "rubber  duck"]
    expressions = {"alarm clock": rows[0]["solution"], "rubber  duck": rows[1]["solution"]}
    summary = predict_rows(
        folder_rows, Oracle(lambda r: expressions[r["group"]]), segmenter, tmp_path / "out", progress=False
    )
    assert sorted(p.name for p in summary.masks_dir.iterdir()) == ["alarm clock", "rubber  duck"]
    m = eval_main(["cosod", "--pred", str(summary.masks_dir), "--gt", str(tmp_path / "gt"), "--no_progress"])
    assert m["num_images"] == 4 and m["MAE"] == 0
    with pytest.raises(ValueError, match=r"group 'a/b' is not a valid file or folder name"):
        predict_rows(
            [{"task": "cosod", "group": "a/b", "images": [Image.new("RGB", (8, 8))]}],
            Oracle(),
            segmenter,
            tmp_path / "bad",
            progress=False,
        )


def test_folder_images_16_bit_and_truncated(tmp_path):
    (tmp_path / "imgs").mkdir()
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "imgs" / "depth.png")  # I;16: converting straight to RGB clips to white
    [row] = rows_from_folder(tmp_path / "imgs", "sod")
    grey = np.asarray(row["images"][0])[..., 0]
    np.testing.assert_array_equal(grey, np.rint(ramp / 257).astype(np.uint8))
    assert row["names"] == ["depth"]
    buffer = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(buffer).save(tmp_path / "imgs" / "cut.jpg", quality=90)
    data = (tmp_path / "imgs" / "cut.jpg").read_bytes()
    (tmp_path / "imgs" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg: .*truncated"):
        rows_from_folder(tmp_path / "imgs", "sod")
    (tmp_path / "imgs" / "cut.jpg").unlink()
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "imgs" / "float.tif")
    with pytest.raises(ValueError, match=r"image .*float\.tif holds floating-point pixels"):
        rows_from_folder(tmp_path / "imgs", "sod")


def test_resume_refuses_predictions_made_with_other_settings(tmp_path, segmenter):
    from cgpo_trl.predict import ResumeError, run_fingerprint

    rows = generate_synthetic(task="sod", num_samples=3, split="test")
    settings = dict(
        answers="model",
        model="a",
        generation={"max_new_tokens": 8},
        segmenter="shapes",
        segmenter_kwargs={},
        instance_score="segmenter",
    )
    first = run_fingerprint(rows, **settings)
    assert run_fingerprint(generate_synthetic(task="sod", num_samples=3, split="test"), **settings) == first
    predict_rows(rows, Oracle(), segmenter, tmp_path / "r", progress=False, fingerprint=first)
    again = predict_rows(rows, Oracle(), segmenter, tmp_path / "r", progress=False, fingerprint=first)
    assert again.num_skipped == 3
    other_model = run_fingerprint(rows, **{**settings, "model": "b"})
    with pytest.raises(ResumeError, match=r"other settings \(model: 'a' -> 'b'\)"):
        predict_rows(rows, Oracle(), segmenter, tmp_path / "r", progress=False, fingerprint=other_model)
    other_data = run_fingerprint(generate_synthetic(task="sod", num_samples=3, split="validation"), **settings)
    with pytest.raises(ResumeError, match=r"other settings \(data: "):
        predict_rows(rows, Oracle(), segmenter, tmp_path / "r", progress=False, fingerprint=other_data)
    (tmp_path / "r" / "run.json").unlink()
    with pytest.raises(ResumeError, match="did not record its settings"):
        predict_rows(rows, Oracle(), segmenter, tmp_path / "r", progress=False, fingerprint=first)


def test_a_killed_write_leaves_no_half_written_file(tmp_path, segmenter, monkeypatch):
    rows = generate_synthetic(task="sod", num_samples=2, split="test")
    real_save = Image.Image.save

    def dying_save(self, fp, *args, **kwargs):
        if "masks" in str(fp) and "000001" in str(fp):
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt  # the run is killed while writing this mask
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        predict_rows(rows, Oracle(), segmenter, tmp_path / "k", overlays=False, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "k" / "masks").iterdir()) == ["000000.png"]
    summary = predict_rows(rows, Oracle(), segmenter, tmp_path / "k", overlays=False, progress=False)
    assert summary.num_predicted == 1
    m = eval_main(["sod", "--pred", str(summary.masks_dir), "--gt", str(summary.gt_dir), "--no_progress"])
    assert m["MAE"] == 0


def test_an_empty_answer_is_well_formed_and_detects_nothing(tmp_path, segmenter):
    rows = generate_synthetic(task="sis", num_samples=2, split="test")
    summary = predict_rows(
        rows, Oracle(lambda r: "<think>none</think><answer></answer>"), segmenter, tmp_path / "e", progress=False
    )
    assert summary.num_well_formed == 2 and json.loads(summary.results_json.read_text()) == []
