"""`python -m cgpo_trl.eval` on fixture folders written in tmp_path."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.eval import main
from cgpo_trl.saliency.metrics import SIS_METRICS, SOD_METRICS, encode_mask


def square(size=40, lo=10, hi=30):
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 255
    return mask


def write(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / f"{name}.png")


@pytest.fixture
def sod_dirs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    write(gt, "a", square())
    write(gt, "b", square())
    write(pred, "a", square())  # perfect
    write(pred, "b", np.zeros((40, 40), np.uint8))  # empty: MAE 0.25
    return pred, gt


def test_sod_json(sod_dirs, tmp_path, capsys):
    pred, gt = sod_dirs
    out = main(["sod", "--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "r" / "sod.json")])
    written = json.loads((tmp_path / "r" / "sod.json").read_text())
    assert written == out
    assert all(k in written for k in SOD_METRICS)
    assert written["num_images"] == 2 and written["num_missing"] == written["num_extra"] == 0
    assert written["MAE"] == pytest.approx(0.125)
    assert written["Sm"] == pytest.approx((1 + 0.5 * 0.75) / 2)
    assert "MAE" in capsys.readouterr().out


def test_sod_resizes_prediction_of_another_size(sod_dirs):
    pred, gt = sod_dirs
    write(pred, "a", square(size=80, lo=20, hi=60))  # same square at twice the resolution
    out = main(["sod", "--pred", str(pred), "--gt", str(gt), "--no_progress"])
    assert out["MAE"] == pytest.approx(0.125, abs=2e-3)


def test_missing_and_extra_files(sod_dirs, capsys):
    pred, gt = sod_dirs
    (pred / "b.png").unlink()
    write(pred, "zzz", square())
    with pytest.raises(SystemExit) as exc:
        main(["sod", "--pred", str(pred), "--gt", str(gt)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing predictions" in err and ": b" in err and "zzz" in err and "Traceback" not in err
    out = main(["sod", "--pred", str(pred), "--gt", str(gt), "--allow_missing"])
    assert out["num_images"] == 1 and out["num_missing"] == 1 and out["num_extra"] == 1
    assert out["MAE"] == 0


def test_bad_inputs_name_the_file(sod_dirs, tmp_path, capsys):
    pred, gt = sod_dirs
    (pred / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit):
        main(["sod", "--pred", str(pred), "--gt", str(gt)])
    assert "b.png" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["sod", "--pred", str(tmp_path / "empty"), "--gt", str(gt)])
    assert "no mask images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sod", "--pred", str(tmp_path / "nowhere"), "--gt", str(gt)])
    assert "nowhere" in capsys.readouterr().err


def test_cosod_conventions(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for name in ("1", "2", "3"):
        write(gt / "apple", name, square())
        write(pred / "apple", name, square())
    write(gt / "pear", "1", square())
    write(pred / "pear", "1", np.zeros((40, 40), np.uint8))
    by_image = main(["cosod", "--pred", str(pred), "--gt", str(gt)])
    by_group = main(["cosod", "--pred", str(pred), "--gt", str(gt), "--convention", "group"])
    assert by_image["convention"] == "image" and by_group["convention"] == "group"
    assert by_image["num_groups"] == by_group["num_groups"] == 2
    assert by_image["MAE"] == pytest.approx(0.25 / 4)
    assert by_group["MAE"] == pytest.approx(0.25 / 2)


def test_cosod_missing_names_include_group(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    write(gt / "apple", "1", square())
    write(gt / "apple", "2", square())
    write(pred / "apple", "1", square())
    with pytest.raises(SystemExit):
        main(["cosod", "--pred", str(pred), "--gt", str(gt)])
    assert "apple/2" in capsys.readouterr().err


def test_sis_cli(tmp_path):
    mask = square().astype(bool)
    gt = {
        "images": [{"id": 3, "file_name": "x.png", "height": 40, "width": 40}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "segmentation": encode_mask(mask)}],
        "categories": [{"id": 1, "name": "salient"}],
    }
    results = [{"image_id": 3, "segmentation": encode_mask(mask), "score": 0.7}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    out = main(["sis", "--pred", str(tmp_path / "res.json"), "--gt", str(tmp_path / "gt.json")])
    assert out == pytest.approx(dict.fromkeys(SIS_METRICS, 1.0))


def test_sis_cli_malformed_json(tmp_path, capsys):
    (tmp_path / "gt.json").write_text('{"images": []')
    (tmp_path / "res.json").write_text("[]")
    with pytest.raises(SystemExit):
        main(["sis", "--pred", str(tmp_path / "res.json"), "--gt", str(tmp_path / "gt.json")])
    assert "gt.json" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_and_worker_processes(tmp_path):
    """Runs as `python -m`; with enough files it scores in 2 processes and must agree with one process."""
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for i in range(64):
        write(gt, f"{i:03d}", square(size=32, lo=4 + i % 8, hi=24))
        write(pred, f"{i:03d}", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    serial = main(["sod", "--pred", str(pred), "--gt", str(gt), "--workers", "1", "--no_progress"])
    cmd = [sys.executable, "-m", "cgpo_trl.eval", "sod", "--pred", str(pred), "--gt", str(gt)]
    cmd += ["--workers", "2", "--json", str(tmp_path / "p.json")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert json.loads((tmp_path / "p.json").read_text()) == serial


# ---------------------------------------------------------------------------------------------------------- report


def write_config(path, **fields):
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def test_report_with_reference_answers(tmp_path):
    """Reference answers + the exact `shapes` segmenter: every table cell has a known value."""
    config = write_config(
        tmp_path / "report.yaml",
        answers="reference",
        segmenter="shapes",
        output_dir=str(tmp_path / "out"),
        progress=False,
        examples_per_dataset=2,
        datasets=[
            {"name": "synthetic-sod", "label": "Syn-SOD", "num_samples": 4, "split": "test"},
            {"name": "synthetic-sis", "num_samples": 3, "split": "test", "image_size": 112},
            {"name": "synthetic-cosod", "num_samples": 2, "split": "test"},
        ],
    )
    report = main(["report", "--config", str(config)])
    assert report["sod"]["Syn-SOD"]["MAE"] == 0 and report["sod"]["Syn-SOD"]["Sm"] == pytest.approx(1.0)
    assert report["sod"]["Syn-SOD"]["num_images"] == 4 and report["sod"]["Syn-SOD"]["well_formed"] == 1
    assert report["sis"]["synthetic-sis"]["AP"] == pytest.approx(1.0)
    assert report["cosod"]["synthetic-cosod"]["MAE"] == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| Syn-SOD | 4 | 0.000 | 1.000 |" in markdown and "## Salient instance segmentation" in markdown
    grid = Image.open(tmp_path / "out" / "examples.png")
    assert grid.width > 2 * 192 and grid.height > 3 * 192


@pytest.mark.slow
def test_report_on_benchmark_folders_scores_against_the_original_files(tmp_path):
    """Benchmarks in their published layout: predictions are named after the files and scored against the GT
    folder itself, CoCA groups named with spaces (`alarm clock`) included. The untrained tiny model writes no tags,
    so every map is empty and MAE is the GT's mean."""
    from cgpo_trl.data.benchmarks import save_benchmark
    from cgpo_trl.data.synthetic import generate_synthetic

    sod = generate_synthetic(task="sod", num_samples=3, split="test")
    root = save_benchmark(sod, "ecssd", tmp_path / "data" / "ECSSD")
    cosod = generate_synthetic(task="cosod", num_samples=2, split="test", group_size=(2, 2))
    coca = save_benchmark(cosod, "coca", tmp_path / "data" / "CoCA")
    for row, name in zip(cosod, ("alarm clock", "Teddy bear")):
        for top in ("Image", "GroundTruth"):
            (coca / top / row["group"]).rename(coca / top / name)
    config = write_config(
        tmp_path / "report.yaml",
        model_name_or_path="tiny-random",
        max_new_tokens=4,
        segmenter="shapes",
        output_dir=str(tmp_path / "out"),
        progress=False,
        datasets=[
            {"name": "ecssd", "data_dir": str(root)},
            {"name": "coca", "data_dir": str(tmp_path / "data" / "CoCA")},
        ],
    )
    report = main(["report", "--config", str(config)])
    assert not (tmp_path / "out" / "ecssd" / "gt").exists()  # scored against data/ECSSD/ground_truth_mask
    assert sorted(p.name for p in (tmp_path / "out" / "ecssd" / "masks").iterdir()) == [
        f"{i:05d}.png" for i in range(3)
    ]
    gt_mean = np.mean([np.asarray(row["masks"][0]).mean() / 255 for row in sod])
    assert report["sod"]["ecssd"]["MAE"] == pytest.approx(gt_mean)
    assert report["sod"]["ecssd"]["well_formed"] == 0
    co_mean = np.mean([np.asarray(m).mean() / 255 for row in cosod for m in row["masks"]])
    assert report["cosod"]["coca"]["MAE"] == pytest.approx(co_mean)
    assert report["cosod"]["coca"]["num_images"] == 4 and report["cosod"]["coca"]["num_missing"] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "coca" / "masks").iterdir()) == ["Teddy bear", "alarm clock"]


def test_report_config_errors(tmp_path, capsys):
    from pathlib import Path

    from cgpo_trl.eval import load_report_config

    bad = write_config(tmp_path / "bad.yaml", output_dir="x", datasets=[{"name": "synthetic-sod"}], colour="red")
    with pytest.raises(SystemExit):
        main(["report", "--config", str(bad)])
    assert "bad.yaml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'datasets' is required"):
        load_report_config(write_config(tmp_path / "empty.yaml", output_dir="x"))
    with pytest.raises(ValueError, match="unique"):
        load_report_config(
            write_config(tmp_path / "twice.yaml", output_dir="x", datasets=[{"name": "coca"}, {"name": "coca"}])
        )
    # The shipped recipes parse, and their SIS sets name the split they evaluate.
    for recipe in sorted(Path("recipes/eval").glob("*.yaml")):
        config = load_report_config(recipe)
        assert config.datasets and config.predict["segmenter"]
        for entry in config.datasets:
            if entry.name in ("ilso", "soc", "sis10k"):
                assert entry.options.get("split") == "test", (recipe, entry.name)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks below must all happen before it."""
    from cgpo_trl.predict import VLMGenerator

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(VLMGenerator, "from_pretrained", refuse)


def test_report_checks_datasets_and_segmenter_before_loading_the_model(tmp_path, capsys, no_model):
    base = dict(model_name_or_path="tiny-random", output_dir=str(tmp_path / "out"), progress=False)
    config = write_config(
        tmp_path / "a.yaml",
        segmenter="shapes",
        datasets=[{"name": "synthetic-sod", "num_samples": 2}, {"name": "ecssd", "data_dir": str(tmp_path / "no")}],
        **base,
    )
    with pytest.raises(SystemExit):
        main(["report", "--config", str(config)])
    assert "dataset ecssd: ecssd: data_dir" in capsys.readouterr().err
    config = write_config(
        tmp_path / "b.yaml", segmenter="evf-sam", datasets=[{"name": "synthetic-sod", "num_samples": 2}], **base
    )
    with pytest.raises(SystemExit):
        main(["report", "--config", str(config)])
    assert "segmenter 'evf-sam': segmenter 'evf-sam' needs a checkpoint" in capsys.readouterr().err
    config = write_config(
        tmp_path / "c.yaml",
        segmenter="shapes",
        datasets=[{"name": "synthetic-sod", "num_samples": 2, "colour": "red"}],
        **base,
    )
    with pytest.raises(SystemExit):
        main(["report", "--config", str(config)])
    assert "unknown option(s) ['colour']" in capsys.readouterr().err


def test_report_never_mixes_predictions_of_two_runs(tmp_path, capsys, no_model):
    """A report run with reference answers, then with a model into the same folder, used to reuse the reference
    predictions and report the untrained model at S-measure 1.000."""
    datasets = [{"name": "synthetic-sod", "label": "Syn-SOD", "num_samples": 3, "split": "test"}]
    common = dict(segmenter="shapes", output_dir=str(tmp_path / "out"), progress=False, datasets=datasets)
    reference = write_config(tmp_path / "ref.yaml", answers="reference", **common)
    assert main(["report", "--config", str(reference)])["sod"]["Syn-SOD"]["Sm"] == pytest.approx(1.0)
    assert main(["report", "--config", str(reference)])["sod"]["Syn-SOD"]["Sm"] == pytest.approx(1.0)  # resumes
    model = write_config(tmp_path / "model.yaml", answers="model", model_name_or_path="tiny-random", **common)
    with pytest.raises(SystemExit):
        main(["report", "--config", str(model)])
    err = capsys.readouterr().err
    assert "dataset Syn-SOD:" in err and "answers: 'reference' -> 'model'" in err
    more = [{**datasets[0], "num_samples": 4}]
    with pytest.raises(SystemExit):
        main(
            [
                "report",
                "--config",
                str(write_config(tmp_path / "more.yaml", answers="reference", **{**common, "datasets": more})),
            ]
        )
    assert "data: " in capsys.readouterr().err
