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
    synthetic["sis"][1]["images"][0].save(tmp_path / "Imgs" / "00001.png")
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


def test_bad_files_are_named_at_load_time(duts):
    """Every file is decoded while loading: a truncated file (whose header reads fine) or an empty one is an error
    that names it here, not an `OSError: image file is truncated` naming nothing a training step later."""
    image_dir, mask_dir = duts
    data = (image_dir / "00001.png").read_bytes()
    (image_dir / "00001.png").write_bytes(data[: len(data) // 2])
    with Image.open(image_dir / "00001.png") as image:
        assert image.size == (56, 56)  # the header alone looks fine
    with pytest.raises(BenchmarkError, match=r"unreadable image .*00001\.png: .*truncated"):
        load_benchmark("duts-te", image_dir.parent)
    (image_dir / "00001.png").write_bytes(data)
    (mask_dir / "00002.png").write_bytes(b"")
    with pytest.raises(BenchmarkError, match=r"unreadable mask .*00002\.png: the file is empty"):
        load_benchmark("duts-te", image_dir.parent)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_benchmark("duts-te", image_dir.parent, skip_bad=True)) == 2


def _exif_jpeg(path, width, height, orientation):
    """A JPEG stored as width x height, red on its left half, tagged with an EXIF orientation."""
    pixels = np.full((height, width, 3), 20, np.uint8)
    pixels[:, : width // 2] = (230, 20, 20)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)


def test_exif_rotated_jpeg_lines_up_with_its_mask(tmp_path):
    """The mask was drawn on the stored pixels: the image must not come back rotated against it (datasets applies
    EXIF orientation when decoding). A mask that matches only the rotated size gets the rotated image."""
    folder = tmp_path / "ECSSD"
    (folder / "images").mkdir(parents=True)
    (folder / "ground_truth_mask").mkdir()
    _exif_jpeg(folder / "images" / "a.jpg", 40, 30, orientation=6)
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :20] = 255
    Image.fromarray(mask).save(folder / "ground_truth_mask" / "a.png")
    _exif_jpeg(folder / "images" / "b.jpg", 40, 30, orientation=6)
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(folder / "ground_truth_mask" / "b.png")
    rows = load_benchmark("ecssd", folder)
    first, second = rows[0], rows[1]
    assert first["images"][0].size == first["masks"][0].size == (40, 30)
    red = np.asarray(first["images"][0])[..., 0] > 128
    np.testing.assert_array_equal(red, np.asarray(first["masks"][0]) > 128)
    with Image.open(folder / "images" / "a.jpg") as raw:  # PIL alone does not apply the orientation
        np.testing.assert_array_equal(np.asarray(first["images"][0]), np.asarray(raw.convert("RGB")))
    assert second["images"][0].size == second["masks"][0].size == (30, 40)
    # The file behind the row is still named: predictions and resume keys come from it.
    from datasets import Image as ImageFeature
    from datasets import List

    raw = rows.cast_column("images", List(ImageFeature(decode=False)))
    assert [row["images"][0]["path"].endswith(name) for row, name in zip(raw, ("a.jpg", "b.jpg"))] == [True, True]


def test_cosod_names_with_spaces_mirrors_and_group_size_cap(tmp_path):
    rows = generate_synthetic(task="cosod", num_samples=2, seed=3, group_size=(10, 10))
    save_benchmark(rows, "cosal2015", tmp_path)
    first = rows[0]["group"]
    for top in ("Image", "GroundTruth"):
        (tmp_path / top / first).rename(tmp_path / top / "alarm clock")
    (tmp_path / "GroundTruth").rename(tmp_path / "GT")  # the Image + GT mirror
    loaded = load_benchmark("cosal2015", tmp_path, max_group_size=4)
    groups = [row["group"] for row in loaded]
    assert sorted(set(groups)) == sorted({"alarm clock", rows[1]["group"]})
    sizes = [len(row["images"]) for row in loaded if row["group"] == "alarm clock"]
    assert sizes == [3, 4, 3] and all(len(r["images"]) == len(r["masks"]) for r in loaded)
    assert [_prompt(row) for row in loaded][0] == build_prompt("cosod", 3)
    assert [len(row["images"]) for row in load_benchmark("cosal2015", tmp_path, max_group_size=None)] == [10, 10]
    assert len(load_benchmark("cosal2015", tmp_path)) == 2  # the default cap (16) keeps groups of 10 whole
    with pytest.raises(BenchmarkError, match="max_group_size must be a positive integer"):
        load_benchmark("cosal2015", tmp_path, max_group_size=0)


def _sis_files(rows, folder, json_path):
    """Write `rows` as images in `folder` and a COCO JSON at `json_path` (the published layout, then moved)."""
    staging = folder.parent / f"_staging_{folder.name}"
    save_benchmark(rows, "soc", staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staging / "Imgs", folder)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staging / "test.json", json_path)
    shutil.rmtree(staging)


@pytest.mark.parametrize(
    "layout",
    [
        # OQTR's ILSO "LI1000": image folders per split, JSONs at the root
        {"train": ("train", "Li_train500.json"), "test": ("test300", "test300.json")},
        # OQTR's COCO-style ILSO
        {"train": ("imgtrain600", "gttrain600.json"), "test": ("test300", "test300.json")},
        # OQTR's SOC: <split>/images, JSONs at the root
        {"train": ("train/images", "SOC_train1800.json"), "test": ("test/images", "SOC_test600.json")},
    ],
    ids=["LI1000", "cocostyle", "soc"],
)
def test_sis_split_layouts_load_the_split_asked_for(tmp_path, layout):
    """Both splits use the same file names (00000.png, ...): only the right folder gives the right pixels."""
    splits = {
        "train": generate_synthetic(task="sis", num_samples=2, seed=1),
        "test": generate_synthetic(task="sis", num_samples=3, seed=2),
    }
    for split, (images, annotations) in layout.items():
        _sis_files(splits[split], tmp_path / "ILSO" / images, tmp_path / "ILSO" / annotations)
    for split, source in splits.items():
        loaded = load_benchmark("ilso", tmp_path, split=split)
        assert len(loaded) == len(source)
        for row, original in zip(loaded, source):
            np.testing.assert_array_equal(_array(row["images"][0]), _array(original["images"][0]))
            np.testing.assert_array_equal(instance_masks(row), instance_masks(original))
    with pytest.raises(BenchmarkError, match="several JSON files|no COCO annotation"):
        load_benchmark("ilso", tmp_path / "ILSO")  # two splits and none asked for


def test_split_never_falls_back_to_another_split(tmp_path, synthetic):
    """A folder holding only test.json is not a training set."""
    save_benchmark(synthetic["sis"], "soc", tmp_path / "SOC")
    with pytest.raises(BenchmarkError, match=r"no annotation file for split 'train' .*\['test\.json'\]"):
        load_benchmark("soc", tmp_path, split="train")
    assert len(load_benchmark("soc", tmp_path, split="test")) == 3


def test_ilso_release_with_indexed_instance_masks(tmp_path):
    """ILSO as released: imgs/*.jpg, gt/*.png holding one palette index per instance, ImageSets/ lists; no JSON."""
    rows = generate_synthetic(task="sis", num_samples=4, seed=7, num_instances=(2, 3))
    root = tmp_path / "ILSO"
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    (root / "ImageSets").mkdir()
    names = [f"sun_{i}" for i in range(4)]
    for name, row in zip(names, rows):
        row["images"][0].save(root / "imgs" / f"{name}.jpg", quality=95)
        labels = np.zeros(row["images"][0].size[::-1], np.uint8)
        for k, mask in enumerate(instance_masks(row), start=1):
            labels[mask] = k
        indexed = Image.fromarray(labels, mode="L").convert("P")
        indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        indexed.save(root / "gt" / f"{name}.png")
    (root / "ImageSets" / "train_id.txt").write_text("sun_0\nsun_1\n")
    (root / "ImageSets" / "test_id.txt").write_text("sun_2\nsun_3\n")
    test = load_benchmark("ilso", tmp_path, split="test")
    assert len(test) == 2 and test.features == ROW_FEATURES
    for row, original in zip(test, rows.select(range(2, 4))):
        np.testing.assert_array_equal(instance_masks(row), instance_masks(original))
        assert row["images"][0].size == original["images"][0].size
    assert len(load_benchmark("ilso", tmp_path)) == 4  # no split: every image
    with pytest.raises(BenchmarkError, match=r"split 'val' .*\['test_id\.txt', 'train_id\.txt'\]"):
        load_benchmark("ilso", tmp_path, split="val")
    (root / "ImageSets" / "test_id_2000.txt").write_text("sun_3\n")
    with pytest.raises(BenchmarkError, match=r"several image lists match split 'test'.*split='test_id'"):
        load_benchmark("ilso", tmp_path, split="test")
    assert len(load_benchmark("ilso", tmp_path, split="test_id_2000")) == 1
    (root / "gt" / "sun_3.png").unlink()
    with pytest.raises(BenchmarkError, match=r"'sun_3', listed for split 'test_id', has no file sun_3\.\* in .*gt"):
        load_benchmark("ilso", tmp_path, split="test_id")


def test_coco_file_names_and_rle_are_checked(tmp_path, synthetic):
    save_benchmark(synthetic["sis"], "soc", tmp_path / "SOC")
    annotation_file = tmp_path / "SOC" / "test.json"
    coco = json.loads(annotation_file.read_text())
    shutil.copy(tmp_path / "SOC" / "Imgs" / "00000.png", tmp_path / "outside.png")
    for file_name in ("../outside.png", str(tmp_path / "outside.png")):
        coco["images"][0]["file_name"] = file_name
        annotation_file.write_text(json.dumps(coco))
        with pytest.raises(BenchmarkError, match="points outside the image folder"):
            load_benchmark("soc", tmp_path)
    coco["images"][0]["file_name"] = "00000.png"
    coco["annotations"][0]["segmentation"]["counts"] = "0"  # decodable by pycocotools, into a wrong mask
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(BenchmarkError, match=r"annotation 1 of 00000\.png: .*runs sum to 0"):
        load_benchmark("soc", tmp_path)


def test_load_saliency_dataset_passes_options_on_and_rejects_unknown_ones(tmp_path, synthetic):
    save_benchmark(synthetic["sis"], "soc", tmp_path)
    (tmp_path / "other.json").write_text("{}")
    assert len(load_saliency_dataset("soc", tmp_path, annotations=tmp_path / "test.json")) == 3
    with pytest.raises(BenchmarkError, match=r"unknown option\(s\) \['anotations'\]"):
        load_saliency_dataset("soc", tmp_path, anotations=tmp_path / "test.json")
    with pytest.raises(BenchmarkError, match=r"synthetic-sod: unknown option\(s\) \['colour'\]"):
        load_saliency_dataset("synthetic-sod", num_samples=2, colour="red")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'duts'"):
        load_saliency_dataset("duts")
