"""`make demo`: quick mode writes every promised output with the promised keys; its statistics have known answers."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"
STAGES = ["untrained", "sft", "cgpo", "grpo"]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_demo_writes_results_with_standard_errors_curves_and_overlays(demo, tmp_path):
    from cgpo_trl.saliency.metrics import evaluate_cosod, evaluate_sis, evaluate_sod

    results = demo.main(["--out", str(tmp_path), "--quick", "--no_progress", "--eval_samples", "3"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == STAGES
    rows = {"reward": 9, "Sm": 3, "MAE": 3, "sis_AP": 3, "cosod_Sm": 3}  # 3 rows per task; CoSOD: groups
    for stage, metrics in saved.items():
        for key in demo.RESULT_KEYS:  # every task was evaluated: no NaN placeholders
            assert not math.isnan(metrics[key]), (stage, key)
            assert metrics[f"{key}_se"] >= 0.0, (stage, key)
            assert metrics[f"{key}_n"] == rows[key], (stage, key)
        assert 0.0 <= metrics["reward"] <= 1.0 and 0.0 <= metrics["Sm"] <= 1.0 and 0.0 <= metrics["MAE"] <= 1.0
        # the per-row numbers the standard errors come from average to the toolkit's own dataset metrics
        folder = tmp_path / "eval" / stage
        sod = evaluate_sod(folder / "sod" / "masks", folder / "sod" / "gt", workers=1, progress=False).metrics
        cosod = evaluate_cosod(folder / "cosod" / "masks", folder / "cosod" / "gt", workers=1, progress=False)
        sis = evaluate_sis(folder / "sis" / "results.json", folder / "sis" / "annotations.json")
        assert metrics["Sm"] == pytest.approx(sod["Sm"]) and metrics["MAE"] == pytest.approx(sod["MAE"])
        assert metrics["cosod_Sm"] == pytest.approx(cosod.metrics["Sm"])
        assert metrics["sis_AP"] == pytest.approx(sis["AP"])
    assert results == saved
    table = (tmp_path / "results.md").read_text()
    assert "| stage | reward | Sm | MAE | sis_AP | cosod_Sm |" in table and "| grpo |" in table
    assert "| cgpo − sft |" in table and "| grpo − sft |" in table and "| cgpo − grpo |" in table
    for name in ("curves.png", "overlays.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 200 and image.height > 200
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["sft_steps"] == 4 and info["rl"]["cgpo"]["steps"] == info["rl"]["grpo"]["steps"] == 2
    assert info["rl"]["cgpo"]["completions"] == info["rl"]["grpo"]["completions"] > 0  # the same budget
    for stage in STAGES[1:]:
        assert (tmp_path / stage / "model.safetensors").is_file()
        card = (tmp_path / stage / "README.md").read_text()
        assert "Saliency-R1 recipe" in card and "Held-out synthetic evaluation" in card
    assert "Segmenter: `shapes`" in (tmp_path / "cgpo" / "README.md").read_text()


def test_mean_se_over_rows_and_clustered_by_group(demo):
    mean, se = demo.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    # two groups of two identical images: residual sums -2 and +2 -> sqrt(2 / 1 * 8) / 4
    assert demo.mean_se([1.0, 1.0, 3.0, 3.0], ["a", "a", "b", "b"]) == (2.0, 1.0)
    assert math.isnan(demo.mean_se([1.0])[1]) and math.isnan(demo.mean_se([])[0])


def _sis_files(tmp_path, detections_per_image):
    """Three 8x8 images with one ground-truth square each; detections as (image id, (row, col) offset, score)."""
    from cgpo_trl.saliency.metrics import encode_mask

    def square(dy=0, dx=0):
        mask = np.zeros((8, 8), np.uint8)
        mask[2 + dy : 6 + dy, 2 + dx : 6 + dx] = 1
        return encode_mask(mask)

    annotations = {
        "images": [{"id": i, "height": 8, "width": 8} for i in (1, 2, 3)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "segmentation": square()} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "salient"}],
    }
    results = [{"image_id": i, "segmentation": square(*shift), "score": s} for i, shift, s in detections_per_image]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "results.json", tmp_path / "annotations.json"


def test_ap_replicates_reproduce_pycocotools_and_pair_resamples(demo, tmp_path):
    from cgpo_trl.saliency.metrics import evaluate_sis

    # image 1 exact, image 2 off by one pixel (IoU 0.6), image 3 missed
    results, annotations = _sis_files(tmp_path, [(1, (0, 0), 0.9), (2, (1, 0), 0.8)])
    value, replicates = demo.ap_replicates(results, annotations, replicates=50, seed=0)
    assert value == pytest.approx(evaluate_sis(results, annotations)["AP"])
    assert replicates.shape == (50,) and replicates.std() > 0  # resamples with more or fewer misses differ
    again = demo.ap_replicates(results, annotations, replicates=50, seed=0)[1]
    np.testing.assert_array_equal(replicates, again)  # same seed and images: the same resamples (paired)
    errors = demo.compare({"sis_AP": replicates}, {"sis_AP": again})
    assert errors["sis_AP"] == 0.0
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    assert demo.ap_replicates(empty, annotations, replicates=5, seed=0)[0] == 0.0


def test_compare_gives_the_paired_standard_error_of_the_difference(demo):
    before = {"reward": {"sod:0": 0.2, "sod:1": 0.4, "sod:2": 0.6}}
    after = {"reward": {"sod:0": 0.3, "sod:1": 0.6, "sod:2": 0.9}}  # differences 0.1, 0.2, 0.3
    assert demo.compare(after, before)["reward"] == pytest.approx(np.std([0.1, 0.2, 0.3], ddof=1) / math.sqrt(3))


def test_fixed_cases_are_ordered_by_the_change(demo):
    before = {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.5}
    after = {"a": 0.95, "b": 0.7, "c": 0.5, "d": 0.55}
    assert demo.fixed_cases(after, before) == (["a", "b"], ["c"])


def test_time_limit_stops_training(demo):
    from transformers import TrainerControl

    limit = demo.TimeLimit(minutes=0.0)
    limit.on_train_begin(None, None, TrainerControl())
    control = TrainerControl()
    limit.on_step_end(None, None, control)
    assert control.should_training_stop and control.should_save
    patient = demo.TimeLimit(minutes=60.0)
    patient.on_train_begin(None, None, TrainerControl())
    control = TrainerControl()
    patient.on_step_end(None, None, control)
    assert not control.should_training_stop
