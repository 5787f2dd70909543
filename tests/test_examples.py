"""The examples run as a user would run them: CGPO on a text-only task, and prediction on a folder of images."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_addition_rewards_have_known_answers():
    example = load_example("cgpo_text_reasoning")
    completions = ["<answer>19</answer>", "<answer> 19 </answer><answer>19</answer>", "19", "<answer>18</answer>"]
    assert example.format_reward(completions) == [1.0, 0.0, 0.0, 1.0]
    assert example.correctness_reward(completions, answer=["19"] * 4) == [1.0, 0.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": "<answer>7</answer>"}]]
    assert example.correctness_reward(conversational, answer=["7"]) == [1.0]
    data = example.addition_dataset(5, max_operand=9, seed=1)
    for row in data:
        a, b = (int(x) for x in row["prompt"][0]["content"].split("What is ")[1].split("?")[0].split(" + "))
        assert row["answer"] == str(a + b) and 0 <= a <= 9 and 0 <= b <= 9


def test_text_example_trains_a_few_steps(tmp_path):
    from cgpo_trl import CGPOTrainer

    example = load_example("cgpo_text_reasoning")
    trainer = example.main(
        [
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--num_train_samples",
            "24",
            "--logging_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--disable_tqdm",
            "true",
        ]
    )
    assert isinstance(trainer, CGPOTrainer) and trainer.args.num_generations == 1
    assert trainer.state.global_step == 3
    logged = [h for h in trainer.state.log_history if "rewards/correctness_reward/mean" in h]
    assert len(logged) == 3 and all("cgpo/confidence" in h for h in logged)
    assert (tmp_path / "model.safetensors").is_file()


@pytest.fixture
def image_folder(tmp_path):
    from cgpo_trl.data.synthetic import generate_synthetic

    folder = tmp_path / "images"
    folder.mkdir()
    for i, row in enumerate(generate_synthetic(task="sod", num_samples=3, split="test")):
        row["images"][0].save(folder / f"photo_{i}.jpg" if i == 0 else folder / f"photo_{i}.png")
    return folder


@pytest.mark.slow
def test_predict_folder_writes_masks_and_overlays(image_folder, tmp_path):
    from cgpo_trl.testing import save_tiny_vlm

    checkpoint = save_tiny_vlm(tmp_path / "ckpt")
    example = load_example("predict_folder")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", checkpoint, "--images", str(image_folder), "--output_dir", str(out)]
    argv += ["--segmenter", "shapes", "--instruction", "short", "--max_new_tokens", "8", "--batch_size", "2"]
    summary = example.main(argv)
    assert summary.num_rows == summary.num_predicted == 3
    for name in ("photo_0", "photo_1", "photo_2"):
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == (56, 56) and mask.dtype == np.uint8
        assert (out / "overlays" / f"{name}.png").is_file()
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["names"][0] for r in records) == ["photo_0", "photo_1", "photo_2"]
    # Rerunning resumes: nothing left to predict.
    assert example.main(argv).num_predicted == 0


def test_predict_folder_rejects_a_missing_folder(tmp_path):
    example = load_example("predict_folder")
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        example.main(["--model_name_or_path", "x", "--images", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
