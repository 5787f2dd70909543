"""`make demo` in quick mode: every stage runs and every promised output is written with the promised keys."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"


@pytest.mark.slow
def test_quick_demo_writes_results_curves_and_overlays(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    results = demo.main(["--out", str(tmp_path), "--quick", "--no_progress", "--eval_samples", "3"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == ["untrained", "sft", "cgpo"]
    for stage, metrics in saved.items():
        assert set(demo.RESULT_KEYS) <= set(metrics), stage
        for key in demo.RESULT_KEYS:  # every task was evaluated: no NaN placeholders
            assert not math.isnan(metrics[key]), (stage, key)
        assert 0.0 <= metrics["reward"] <= 1.0 and 0.0 <= metrics["Sm"] <= 1.0 and 0.0 <= metrics["MAE"] <= 1.0
    assert results == saved
    table = (tmp_path / "results.md").read_text()
    assert "| stage | reward | Sm | MAE | sis_AP | cosod_Sm |" in table and "| cgpo |" in table
    for name in ("curves.png", "overlays.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 200 and image.height > 200
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["sft_steps"] == 4 and info["rl_steps"] == 2
    for stage in ("sft", "cgpo"):
        assert (tmp_path / stage / "model.safetensors").is_file()
        card = (tmp_path / stage / "README.md").read_text()
        assert "Saliency-R1 recipe" in card and "Held-out synthetic evaluation" in card
    assert "Segmenter: `shapes`" in (tmp_path / "cgpo" / "README.md").read_text()


def test_time_limit_stops_training():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
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
