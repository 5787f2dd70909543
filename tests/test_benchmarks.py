import json
import shutil

import numpy as np
import pytest
from datasets import concatenate_datasets
from PIL import Image

from cgpo_trl.data.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    instance_masks,
    list_benchmarks,
    load_benchmark,
    load_saliency_dataset,
    save_benchmark,
)
from cgpo_trl.data.rows import ROW_FEATURES, decode_instance
from cgpo_trl.data.synthetic import generate_synthetic
from cgpo_trl.saliency.prompts import build_prompt

SOD = [n for n, s in BENCHMARKS.items() if s.task == "sod"]
SIS = [n for n, s in BENCHMARKS.items() if s.task == "sis"]
COSOD = [n for n, s in BENCHMARKS.items() if s.task == "cosod"]


@pytest.fixture(scope="module")
def synthetic():
    return {
        "sod": generate_synthetic(task="sod", num_samples=3, seed=11),
        "sis": generate_synthetic(task="sis", num_samples=3, seed=11),
        "cosod": generate_synthetic(task="cosod", num_samples=2, seed=11, group_size=(3, 4)),
    }


def _array(image):
    return np.asarray(image)


def _prompt(row):
    # Arrow stores image blocks with `text: None`; compare with what build_prompt returns.
    return [
        {**m, "content": [{k: v for k, v in c.items() if v is not None} for c in m["content"]]} for m in row["prompt"]
    ]


def test_registry_names():
    assert list_benchmarks() == sorted(
        [
            "duts-tr",
            "duts-te",
            "ecssd",
            "hku-is",
            "pascal-s",
            "dut-omron",
            "ilso",
            "soc",
            "sis10k",
            "coca",
            "cosal2015",
            "cosod3k",
        ]
    )


@pytest.mark.parametrize("name", SOD)
def test_sod_round_trip_in_published_layout(tmp_path, synthetic, name):
    source = synthetic["sod"]
    folder = tmp_path / BENCHMARKS[name].folder
    save_benchmark(source, name, folder)
    for data_dir in (folder, tmp_path):  # the dataset folder itself, or its parent
        loaded = load_benchmark(name, data_dir)
        assert loaded.features == ROW_FEATURES and len(loaded) == 3
        # Lazy: Arrow holds paths, no bytes.
        stored = loaded.data.column("images")[0].as_py()[0]
        assert stored["bytes"] is None and stored["path"].endswith("00000.png")
        for original, row in zip(source, loaded):
            assert row["task"] == "sod" and row["solution"] == "" and row["group"] == ""
            assert _prompt(row) == build_prompt("sod", 1)
            np.testing.assert_array_equal(_array(row["images"][0]), _array(original["images"][0]))
            np.testing.assert_array_equal(_array(row["masks"][0]), _array(original["masks"][0]))
            assert row["masks"][0].mode == "L"
    # Loaded rows concatenate with synthetic ones (same Arrow types for the contract columns).
    merged = concatenate_datasets([loaded, source.select_columns(list(ROW_FEATURES))])
    assert len(merged) == 6


@pytest.mark.parametrize("name", COSOD)
def test_cosod_round_trip_in_published_layout(tmp_path, synthetic, name):
    source = synthetic["cosod"]
    save_benchmark(source, name, tmp_path / BENCHMARKS[name].folder)
    assert (tmp_path / BENCHMARKS[name].folder / "GroundTruth" / source[0]["group"]).is_dir()
    loaded = load_benchmark(name, tmp_path)
    assert sorted(loaded["group"]) == sorted(source["group"])
    by_group = {row["group"]: row for row in loaded}
    for original in source:
        row = by_group[original["group"]]
        assert len(row["images"]) == len(original["images"]) == len(row["masks"])
        assert _prompt(row) == build_prompt("cosod", len(row["images"]))
        for image, mask, want_image, want_mask in zip(
            row["images"], row["masks"], original["images"], original["masks"]
        ):
            np.testing.assert_array_equal(_array(image), _array(want_image))
            np.testing.assert_array_equal(_array(mask), _array(want_mask))


@pytest.mark.parametrize("name", SIS)
def test_sis_round_trip_with_coco_json(tmp_path, synthetic, name):
    source = synthetic["sis"]
    split = tmp_path / BENCHMARKS[name].folder / "test"
    save_benchmark(source, name, split)
    assert (split / "test.json").is_file() and (split / BENCHMARKS[name].layouts[0][0]).is_dir()
    loaded = load_benchmark(name, split)
    assert len(loaded) == 3
    # The dataset folder (or its parent) plus `split` finds the same rows.
    assert load_benchmark(name, tmp_path, split="test")["instances"] == loaded["instances"]
    for original, row in zip(source, loaded):
        assert row["task"] == "sis" and row["masks"] == []
        np.testing.assert_array_equal(_array(row["images"][0]), _array(original["images"][0]))
        np.testing.assert_array_equal(instance_masks(row), instance_masks(original))


def test_toolbox_variants_and_case_insensitive_folders(tmp_path, synthetic):
    # ECSSD saved in its release layout, then renamed to the common toolbox layout with other capitalisation.
    save_benchmark(synthetic["sod"], "ecssd", tmp_path / "ECSSD")
    (tmp_path / "ECSSD" / "images").rename(tmp_path / "ECSSD" / "imgs_tmp")
    (tmp_path / "ECSSD" / "imgs_tmp").rename(tmp_path / "ECSSD" / "IMGS")
    (tmp_path / "ECSSD" / "ground_truth_mask").rename(tmp_path / "ECSSD" / "gt")
    assert len(load_benchmark("ecssd", tmp_path / "ECSSD")) == 3
    # CoCA as released (image/ + binary/) and inside a GCoNet-style test root (images/CoCA + gts/CoCA).
    save_benchmark(synthetic["cosod"], "coca", tmp_path / "release")
    (tmp_path / "release" / "Image").rename(tmp_path / "release" / "image")
    (tmp_path / "release" / "GroundTruth").rename(tmp_path / "release" / "binary")
    assert len(load_benchmark("coca", tmp_path / "release")) == 2
    (tmp_path / "test" / "images").mkdir(parents=True)
    (tmp_path / "test" / "gts").mkdir()
    shutil.move(tmp_path / "release" / "image", tmp_path / "test" / "images" / "CoCA")
    shutil.move(tmp_path / "release" / "binary", tmp_path / "test" / "gts" / "CoCA")
    assert len(load_benchmark("coca", tmp_path / "test")) == 2


def test_sis_polygon_and_uncompressed_rle_annotations(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 8), (120, 120, 120)).save(tmp_path / "imgs" / "a.jpg")
    square = [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]]  # polygon, x/y pairs
    column = {"size": [8, 10], "counts": [8 * 9, 8]}  # uncompressed RLE (column-major): column 9 is set
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 8, "width": 10}],
        "annotations": [
            {"id": 1, "image_id": 7, "segmentation": square, "iscrowd": 0},
            {"id": 2, "image_id": 7, "segmentation": column, "iscrowd": 0},
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    row = load_benchmark("ilso", tmp_path)[0]
    first, second = (decode_instance(rle) for rle in row["instances"])
    assert first[2:6, 2:6].all() and first.sum() <= 25 and not first[0].any()
    expected = np.zeros((8, 10), dtype=bool)
    expected[:, 9] = True
    np.testing.assert_array_equal(second, expected)
    coco["annotations"][1]["segmentation"] = {"size": [8, 10], "counts": [8 * 9, 8, 8]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    with pytest.raises(BenchmarkError, match=r"annotation 2 of a\.jpg: .*counts sum to 88"):
        load_benchmark("ilso", tmp_path)


def test_load_saliency_dataset_dispatch(tmp_path, synthetic):
    assert len(load_saliency_dataset("synthetic-cosod", num_samples=2)) == 2
    save_benchmark(synthetic["sod"], "hku-is", tmp_path / "HKU-IS")
    assert len(load_saliency_dataset("hku-is", tmp_path)) == 3
    with pytest.raises(BenchmarkError, match="data_dir"):
        load_saliency_dataset("hku-is")


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def duts(tmp_path, synthetic):
    save_benchmark(synthetic["sod"], "duts-te", tmp_path / "DUTS-TE")
    return tmp_path / "DUTS-TE" / "DUTS-TE-Image", tmp_path / "DUTS-TE" / "DUTS-TE-Mask"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda i, m: (m / "00001.png").unlink(), r"image .*00001\.png has no mask"),
        (lambda i, m: (i / "00001.png").unlink(), r"mask .*00001\.png has no image"),
        (lambda i, m: (i / "00001.png").write_bytes(b"not an image"), r"unreadable image .*00001\.png"),
        (lambda i, m: Image.new("L", (20, 20)).save(m / "00001.png"), r"mask .*00001\.png is 20x20 but image"),
        (
            lambda i, m: Image.fromarray(np.zeros((56, 56), dtype=np.uint16)).save(m / "00001.png"),
            r"mask .*00001\.png has mode 'I;16'",
        ),
        (lambda i, m: Image.new("RGB", (56, 56)).save(i / "00001.jpg"), "two files share the stem '00001'"),
    ],
)
def test_bad_sod_items_are_named(duts, damage, message):
    image_dir, mask_dir = duts
    damage(image_dir, mask_dir)
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark("duts-te", image_dir.parent)


def test_skip_bad_warns_with_the_count(duts):
    image_dir, mask_dir = duts
    (mask_dir / "00000.png").unlink()
    (image_dir / "00002.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match=r"duts-te: skipped 2 bad item\(s\)"):
        loaded = load_benchmark("duts-te", image_dir.parent, skip_bad=True)
    assert len(loaded) == 1 and loaded[0]["images"][0].size == (56, 56)


def test_bad_cosod_groups(tmp_path, synthetic):
    save_benchmark(synthetic["cosod"], "cosal2015", tmp_path)
    group = synthetic["cosod"][0]["group"]
    (tmp_path / "Image" / "emptygroup").mkdir()
    (tmp_path / "GroundTruth" / "emptygroup").mkdir()
    with pytest.raises(BenchmarkError, match=r"empty group .*emptygroup"):
        load_benchmark("cosal2015", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_benchmark("cosal2015", tmp_path, skip_bad=True)) == 2
    shutil.rmtree(tmp_path / "Image" / "emptygroup")
    shutil.rmtree(tmp_path / "GroundTruth" / "emptygroup")
    shutil.rmtree(tmp_path / "GroundTruth" / group)
    with pytest.raises(BenchmarkError, match=rf"image group .*{group} has no ground-truth group"):
        load_benchmark("cosal2015", tmp_path)


def test_bad_sis_inputs(tmp_path, synthetic):
    save_benchmark(synthetic["sis"], "soc", tmp_path)
    coco = json.loads((tmp_path / "test.json").read_text())
    (tmp_path / "Imgs" / "00001.png").unlink()
    with pytest.raises(BenchmarkError, match=r"image .*00001\.png listed in .*test\.json does not exist"):
        load_benchmark("soc", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_benchmark("soc", tmp_path, skip_bad=True)) == 2
    coco["images"][1]["file_name"] = "00000.png"
    coco["images"][0]["width"] = 99
    (tmp_path / "test.json").write_text(json.dumps(coco))
    with pytest.raises(BenchmarkError, match=r"annotation 1 of 00000\.png: segmentation size \[56, 56\] differs"):
        load_benchmark("soc", tmp_path)
    kept = [a for a in coco["annotations"] if a["image_id"] != 1]
    (tmp_path / "test.json").write_text(json.dumps({**coco, "annotations": kept}))
    with pytest.raises(BenchmarkError, match=r"00000\.png is 56x56 but .*test\.json says 99x56"):
        load_benchmark("soc", tmp_path)
    coco["images"][0]["width"] = 56
    coco["annotations"][0]["image_id"] = 999
    (tmp_path / "test.json").write_text(json.dumps(coco))
    with pytest.raises(BenchmarkError, match="unknown image_id 999"):
        load_benchmark("soc", tmp_path)
    (tmp_path / "test.json").write_text("{not json")
    with pytest.raises(BenchmarkError, match=r"unreadable annotation file .*test\.json"):
        load_benchmark("soc", tmp_path)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(BenchmarkError, match="several JSON files"):
        load_benchmark("soc", tmp_path)
    with pytest.raises(BenchmarkError, match=r"unreadable annotation file .*test\.json"):
        load_benchmark("soc", tmp_path, split="test")  # split picks test.json among the JSON files
    with pytest.raises(BenchmarkError, match="not COCO instances JSON"):
        load_benchmark("soc", tmp_path, annotations=tmp_path / "other.json")


def test_unknown_names_missing_layouts_and_wrong_writer_task(tmp_path, synthetic):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'duts'"):
        load_benchmark("duts", tmp_path)
    with pytest.raises(BenchmarkError, match="no known layout"):
        load_benchmark("pascal-s", tmp_path)
    with pytest.raises(BenchmarkError, match="not a directory"):
        load_benchmark("pascal-s", tmp_path / "missing")
    with pytest.raises(ValueError, match="holds sod rows"):
        save_benchmark(synthetic["cosod"], "ecssd", tmp_path)
