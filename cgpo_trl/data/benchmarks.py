"""Loaders for the public SOD / SIS / CoSOD benchmarks in the folder layouts they are distributed in.

`load_benchmark(name, data_dir)` returns rows with the contract columns (`cgpo_trl.data.rows.ROW_FEATURES`).
Images and masks stay file paths cast to `datasets.Image` (RGB / L), decoded only when a row is read, so a set of
10k images loads in seconds and never sits in RAM decoded. While loading, every file's header is read (no pixel
decoding) to check that it opens and that each mask matches its image's size and has a mask mode.

Accepted layouts (`data_dir` is the dataset's folder, or its parent holding the folder named below; folder names
match case-insensitively; images are .jpg/.jpeg/.png/.bmp/.tif, masks .png/.bmp/.jpg/.tif, paired by file stem):

| name | folder | image dir, mask dir (first = published release, then the toolbox variants) |
|---|---|---|
| duts-tr / duts-te | DUTS-TR / DUTS-TE | `DUTS-TR-Image`, `DUTS-TR-Mask` (resp. `DUTS-TE-…`) |
| ecssd | ECSSD | `images`, `ground_truth_mask` |
| hku-is | HKU-IS | `imgs`, `gt` |
| pascal-s | PASCAL-S | `datasets/imgs/pascal`, `datasets/masks/pascal` |
| dut-omron | DUT-OMRON | `DUT-OMRON-image`, `pixelwiseGT-new-PNG` |
| every SOD set | | also `Image`+`Mask`, `Imgs`+`GT`, `images`+`masks`, `im`+`gt` |
| coca / cosal2015 / cosod3k | CoCA / CoSal2015 / CoSOD3k | `Image/<group>`, `GroundTruth/<group>`; also `image`+`binary` (CoCA release), `images/<Name>`+`gts/<Name>` (GCoNet-style test root), `img`+`gt` |
| ilso / soc / sis10k | ILSO / SOC / SIS10K | one split folder: a COCO instances JSON (the only `*.json` there, or `annotations=`) and `imgs` / `Imgs` / `Image` / `images` |

SIS annotations may be polygons, uncompressed or compressed RLE; they become compressed RLE in `instances`
(category and `iscrowd` are ignored: salient instances are class-agnostic). Real rows have no reference answer:
`solution` is "" (the output-to-reasoning builder writes one).

`save_benchmark(dataset, name, data_dir)` writes rows in the first (published) layout of `name`, so the loaders
and the evaluation CLI can be tested end to end on synthetic data.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

from ..saliency.prompts import build_prompt
from .rows import ROW_FEATURES, annotation_to_rle, decode_instance

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_MODES = ("RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "YCbCr")
"""Image modes that convert to RGB without losing meaning (16-bit and float images are refused)."""
MASK_MODES = ("1", "L", "P", "LA", "RGB")
"""Mask modes accepted (read as L, 8-bit grey: RGB masks are the grey masks some releases store as colour)."""

_GENERIC_SOD = (("Image", "Mask"), ("Imgs", "GT"), ("images", "masks"), ("im", "gt"))
_SIS_IMAGE_DIRS = ("imgs", "Imgs", "Image", "images", "JPEGImages")


class BenchmarkError(ValueError):
    """A benchmark file or folder is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one benchmark keeps its files. `layouts` lists (image dir, mask dir) pairs relative to the dataset
    folder, published release first; for SIS sets the second entry is the annotation file name used when saving."""

    name: str
    task: str
    folder: str
    layouts: tuple[tuple[str, str], ...]
    citation: str


def _cosod_layouts(folder: str) -> tuple[tuple[str, str], ...]:
    return (("Image", "GroundTruth"), ("image", "binary"), (f"images/{folder}", f"gts/{folder}"), ("img", "gt"))


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "duts-tr", "sod", "DUTS-TR", (("DUTS-TR-Image", "DUTS-TR-Mask"), *_GENERIC_SOD), "Wang et al., CVPR 2017"
        ),
        BenchmarkSpec(
            "duts-te", "sod", "DUTS-TE", (("DUTS-TE-Image", "DUTS-TE-Mask"), *_GENERIC_SOD), "Wang et al., CVPR 2017"
        ),
        BenchmarkSpec(
            "ecssd", "sod", "ECSSD", (("images", "ground_truth_mask"), *_GENERIC_SOD), "Shi et al., TPAMI 2016"
        ),
        BenchmarkSpec("hku-is", "sod", "HKU-IS", (("imgs", "gt"), *_GENERIC_SOD), "Li & Yu, CVPR 2015"),
        BenchmarkSpec(
            "pascal-s",
            "sod",
            "PASCAL-S",
            (("datasets/imgs/pascal", "datasets/masks/pascal"), *_GENERIC_SOD),
            "Li et al., CVPR 2014",
        ),
        BenchmarkSpec(
            "dut-omron",
            "sod",
            "DUT-OMRON",
            (("DUT-OMRON-image", "pixelwiseGT-new-PNG"), *_GENERIC_SOD),
            "Yang et al., CVPR 2013",
        ),
        BenchmarkSpec("ilso", "sis", "ILSO", (("imgs", "test.json"),), "Li et al., CVPR 2017"),
        BenchmarkSpec("soc", "sis", "SOC", (("Imgs", "test.json"),), "Fan et al., ECCV 2018"),
        BenchmarkSpec("sis10k", "sis", "SIS10K", (("Image", "test.json"),), "SIS10K"),
        BenchmarkSpec("coca", "cosod", "CoCA", _cosod_layouts("CoCA"), "Zhang et al., ECCV 2020"),
        BenchmarkSpec("cosal2015", "cosod", "CoSal2015", _cosod_layouts("CoSal2015"), "Zhang et al., CVPR 2015"),
        BenchmarkSpec("cosod3k", "cosod", "CoSOD3k", _cosod_layouts("CoSOD3k"), "Fan et al., CVPR 2020"),
    )
}


def list_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def get_benchmark_spec(name: str) -> BenchmarkSpec:
    key = name.lower()
    if key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; available: {list_benchmarks()}")
    return BENCHMARKS[key]


# --------------------------------------------------------------------------------------------------- file access


def _child(parent: Path, name: str) -> Path | None:
    """`parent/name` matched case-insensitively (exact match first)."""
    exact = parent / name
    if exact.exists():
        return exact
    if not parent.is_dir():
        return None
    lowered = name.lower()
    for entry in os.scandir(parent):
        if entry.name.lower() == lowered:
            return Path(entry.path)
    return None


def _resolve(root: Path, relative: str) -> Path | None:
    path: Path | None = root
    for part in Path(relative).parts:
        path = _child(path, part) if path is not None else None
    return path


def _dataset_roots(spec: BenchmarkSpec, data_dir: Path) -> list[Path]:
    roots = [data_dir]
    nested = _child(data_dir, spec.folder)
    if nested is not None and nested.is_dir():
        roots.append(nested)
    return roots


def _files(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Stem -> path of the files in `folder` with one of `extensions` (hidden files ignored)."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in extensions:
            continue
        if stem in found:
            raise BenchmarkError(f"two files share the stem {stem!r} in {folder}: {found[stem].name} and {entry.name}")
        found[stem] = Path(entry.path)
    return found


def _header(path: Path, modes: tuple[str, ...], kind: str) -> tuple[int, int]:
    """Open `path` without decoding pixels; return its (width, height) or raise naming the file."""
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BenchmarkError(f"unreadable {kind} {path}: {error}") from None
    if mode not in modes:
        raise BenchmarkError(f"{kind} {path} has mode {mode!r}; expected one of {list(modes)}")
    return size


class _Problems:
    """Collects bad items: raises on the first unless `skip_bad`, then warns once with the count."""

    def __init__(self, name: str, skip_bad: bool):
        self.name, self.skip_bad, self.messages = name, skip_bad, []

    def report(self, message: str) -> None:
        if not self.skip_bad:
            raise BenchmarkError(message)
        self.messages.append(message)

    def guard(self, check: Callable[[], object]) -> object | None:
        try:
            return check()
        except BenchmarkError as error:
            self.report(str(error))
            return None

    def finish(self) -> int:
        if self.messages:
            shown = "\n  ".join(self.messages[:10])
            more = f"\n  ... and {len(self.messages) - 10} more" if len(self.messages) > 10 else ""
            warnings.warn(
                f"{self.name}: skipped {len(self.messages)} bad item(s):\n  {shown}{more}", UserWarning, stacklevel=3
            )
        return len(self.messages)


# ------------------------------------------------------------------------------------------------------ loaders


def _find_pair_layout(spec: BenchmarkSpec, data_dir: Path) -> tuple[Path, Path]:
    for root in _dataset_roots(spec, data_dir):
        for image_dir, mask_dir in spec.layouts:
            images, masks = _resolve(root, image_dir), _resolve(root, mask_dir)
            if images is not None and masks is not None and images.is_dir() and masks.is_dir():
                return images, masks
    tried = ", ".join(f"{i}/ + {m}/" for i, m in spec.layouts)
    raise BenchmarkError(f"{spec.name}: no known layout under {data_dir} (tried {tried}, also inside {spec.folder}/)")


def _pair_files(image_dir: Path, mask_dir: Path, problems: _Problems) -> list[tuple[Path, Path]]:
    images = _files(image_dir, IMAGE_EXTENSIONS)
    masks = _files(mask_dir, MASK_EXTENSIONS)
    for stem in sorted(set(masks) - set(images)):
        problems.report(f"mask {masks[stem]} has no image named {stem}.* in {image_dir}")
    pairs = []
    for stem, image in images.items():
        if stem not in masks:
            problems.report(f"image {image} has no mask named {stem}.* in {mask_dir}")
            continue

        def check(image=image, mask=masks[stem]):
            image_size = _header(image, IMAGE_MODES, "image")
            mask_size = _header(mask, MASK_MODES, "mask")
            if mask_size != image_size:
                raise BenchmarkError(
                    f"mask {mask} is {mask_size[0]}x{mask_size[1]} but image {image} is {image_size[0]}x{image_size[1]}"
                )
            return image, mask

        pair = problems.guard(check)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _load_sod(spec: BenchmarkSpec, data_dir: Path, problems: _Problems) -> dict[str, list]:
    image_dir, mask_dir = _find_pair_layout(spec, data_dir)
    pairs = _pair_files(image_dir, mask_dir, problems)
    if not pairs:
        raise BenchmarkError(f"{spec.name}: no usable image/mask pairs in {image_dir} and {mask_dir}")
    prompt = build_prompt("sod", 1)
    n = len(pairs)
    return {
        "prompt": [prompt] * n,
        "images": [[str(image)] for image, _ in pairs],
        "task": ["sod"] * n,
        "masks": [[str(mask)] for _, mask in pairs],
        "instances": [[] for _ in range(n)],
        "group": [""] * n,
        "solution": [""] * n,
    }


def _subdirs(folder: Path) -> dict[str, Path]:
    return {
        e.name: Path(e.path)
        for e in sorted(os.scandir(folder), key=lambda e: e.name)
        if e.is_dir() and not e.name.startswith(".")
    }


def _load_cosod(spec: BenchmarkSpec, data_dir: Path, problems: _Problems) -> dict[str, list]:
    image_root, mask_root = _find_pair_layout(spec, data_dir)
    image_groups, mask_groups = _subdirs(image_root), _subdirs(mask_root)
    if not image_groups:
        raise BenchmarkError(f"{spec.name}: no group folders in {image_root}")
    for name in sorted(set(mask_groups) - set(image_groups)):
        problems.report(f"ground-truth group {mask_groups[name]} has no image group {image_root / name}")
    columns: dict[str, list] = {name: [] for name in ROW_FEATURES}
    for name, folder in image_groups.items():
        if name not in mask_groups:
            problems.report(f"image group {folder} has no ground-truth group {mask_root / name}")
            continue
        pairs = _pair_files(folder, mask_groups[name], problems)
        if not pairs:
            problems.report(f"empty group {folder}: no usable image/mask pairs")
            continue
        columns["prompt"].append(build_prompt("cosod", len(pairs)))
        columns["images"].append([str(image) for image, _ in pairs])
        columns["task"].append("cosod")
        columns["masks"].append([str(mask) for _, mask in pairs])
        columns["instances"].append([])
        columns["group"].append(name)
        columns["solution"].append("")
    if not columns["group"]:
        raise BenchmarkError(f"{spec.name}: no usable groups in {image_root}")
    return columns


def _find_annotations(
    spec: BenchmarkSpec, data_dir: Path, annotations: str | os.PathLike | None, split: str | None = None
) -> Path:
    if annotations is not None:
        path = Path(annotations)
        if not path.is_file():
            raise BenchmarkError(f"{spec.name}: annotation file {path} does not exist")
        return path
    for root in _dataset_roots(spec, data_dir):
        found = sorted(p for p in root.glob("*.json") if p.is_file())
        if len(found) > 1 and split:
            found = [p for p in found if split.lower() in p.name.lower()] or found
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BenchmarkError(
                f"{spec.name}: several JSON files in {root} ({[p.name for p in found]}); pass annotations="
            )
    raise BenchmarkError(f"{spec.name}: no COCO annotation *.json in {data_dir}; pass annotations=")


def _load_sis(
    spec: BenchmarkSpec, data_dir: Path, problems: _Problems, annotations=None, split=None
) -> dict[str, list]:
    annotation_file = _find_annotations(spec, data_dir, annotations, split)
    try:
        coco = json.loads(annotation_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"unreadable annotation file {annotation_file}: {error}") from None
    if (
        not isinstance(coco, dict)
        or not isinstance(coco.get("images"), list)
        or not isinstance(coco.get("annotations"), list)
    ):
        raise BenchmarkError(
            f"{annotation_file} is not COCO instances JSON: it needs 'images' and 'annotations' lists"
        )
    image_dir = None
    for root in (annotation_file.parent, *_dataset_roots(spec, data_dir)):
        for candidate in (spec.layouts[0][0], *_SIS_IMAGE_DIRS):
            found = _resolve(root, candidate)
            if found is not None and found.is_dir():
                image_dir = found
                break
        if image_dir is not None:
            break
    if image_dir is None:
        raise BenchmarkError(f"{spec.name}: no image folder ({', '.join(_SIS_IMAGE_DIRS)}) next to {annotation_file}")

    records: dict[int, dict] = {}
    for position, record in enumerate(coco["images"]):
        missing = [k for k in ("id", "file_name", "height", "width") if k not in record]
        if missing:
            raise BenchmarkError(f"{annotation_file}: images[{position}] lacks field(s) {missing}")
        records[record["id"]] = {**record, "instances": [], "bad": False}
    for position, annotation in enumerate(coco["annotations"]):
        if "image_id" not in annotation or "segmentation" not in annotation:
            raise BenchmarkError(f"{annotation_file}: annotations[{position}] lacks 'image_id' or 'segmentation'")
        record = records.get(annotation["image_id"])
        if record is None:
            problems.report(
                f"{annotation_file}: annotation {annotation.get('id', position)} refers to unknown image_id {annotation['image_id']!r}"
            )
            continue
        try:
            record["instances"].append(
                annotation_to_rle(annotation["segmentation"], int(record["height"]), int(record["width"]))
            )
        except (ValueError, TypeError) as error:
            problems.report(
                f"{annotation_file}: annotation {annotation.get('id', position)} of {record['file_name']}: {error}"
            )
            record["bad"] = True

    columns: dict[str, list] = {name: [] for name in ROW_FEATURES}
    prompt = build_prompt("sis", 1)
    for record in records.values():
        if record["bad"]:
            continue
        path = image_dir / record["file_name"]

        def check(path=path, record=record):
            if not path.is_file():
                raise BenchmarkError(f"image {path} listed in {annotation_file} does not exist")
            width, height = _header(path, IMAGE_MODES, "image")
            if (width, height) != (int(record["width"]), int(record["height"])):
                raise BenchmarkError(
                    f"image {path} is {width}x{height} but {annotation_file} says {record['width']}x{record['height']}"
                )
            return path

        if problems.guard(check) is None:
            continue
        columns["prompt"].append(prompt)
        columns["images"].append([str(path)])
        columns["task"].append("sis")
        columns["masks"].append([])
        columns["instances"].append(record["instances"])
        columns["group"].append("")
        columns["solution"].append("")
    if not columns["images"]:
        raise BenchmarkError(f"{spec.name}: no usable images in {annotation_file}")
    return columns


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike,
    skip_bad: bool = False,
    annotations: str | os.PathLike | None = None,
    split: str | None = None,
) -> Dataset:
    """Load benchmark `name` (see `list_benchmarks()`) from `data_dir` into contract rows with lazy images.

    Bad items (unpaired files, unreadable files, masks of the wrong size or mode, empty groups, bad annotations)
    raise `BenchmarkError` naming the file; with `skip_bad=True` they are skipped and one warning gives the count.
    `annotations` overrides the SIS annotation JSON. SOD and CoSOD sets name their split (`duts-tr` / `duts-te`), so
    `split` only matters for SIS sets: a `<split>` subfolder of `data_dir` (e.g. `SOC/test`) is entered when it
    exists, and among several JSON files the one whose name contains `split` is used.
    """
    spec = get_benchmark_spec(name)
    root = Path(data_dir)
    if not root.is_dir():
        raise BenchmarkError(f"{spec.name}: data_dir {root} is not a directory")
    if spec.task == "sis" and split:
        for base in _dataset_roots(spec, root):
            folder = _child(base, split)
            if folder is not None and folder.is_dir():
                root = folder
                break
    problems = _Problems(spec.name, skip_bad)
    if spec.task == "sod":
        columns = _load_sod(spec, root, problems)
    elif spec.task == "cosod":
        columns = _load_cosod(spec, root, problems)
    else:
        columns = _load_sis(spec, root, problems, annotations, split)
    problems.finish()
    return Dataset.from_dict(columns, features=ROW_FEATURES)


def load_saliency_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    split: str | None = None,
    **synthetic,
) -> Dataset:
    """One entry point for recipes and CLIs: `synthetic-sod|sis|cosod` generates the synthetic benchmark
    (keyword arguments go to `SyntheticConfig`), any other name loads a public benchmark from `data_dir`."""
    if name.startswith("synthetic-"):
        from .synthetic import generate_synthetic

        return generate_synthetic(task=name.removeprefix("synthetic-"), split=split or "train", **synthetic)
    if data_dir is None:
        raise BenchmarkError(f"benchmark {name!r} needs data_dir")
    return load_benchmark(name, data_dir, skip_bad=skip_bad, split=split)


# ------------------------------------------------------------------------------------------------------- writer


def _save_image(image: Image.Image, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path)


def save_benchmark(dataset: Dataset, name: str, data_dir: str | os.PathLike, image_format: str = "png") -> Path:
    """Write `dataset` (rows of the benchmark's task) under `data_dir` in the published layout of `name`.

    SOD files are named by row index, CoSOD groups by the `group` column (or `group<i>`), SIS gets the image folder
    and a COCO instances JSON. Returns the dataset folder that `load_benchmark(name, ...)` reads back.
    """
    spec = get_benchmark_spec(name)
    if image_format not in ("png", "jpg", "bmp"):
        raise ValueError(f"image_format must be 'png', 'jpg' or 'bmp', got {image_format!r}")
    tasks = set(dataset["task"])
    if tasks != {spec.task}:
        raise ValueError(f"{spec.name} holds {spec.task} rows, the dataset has task(s) {sorted(tasks)}")
    root = Path(data_dir)
    image_dir, second = spec.layouts[0]
    if spec.task == "sod":
        for i, row in enumerate(dataset):
            _save_image(row["images"][0], root / image_dir / f"{i:05d}.{image_format}", "RGB")
            _save_image(row["masks"][0], root / second / f"{i:05d}.png", "L")
    elif spec.task == "cosod":
        for i, row in enumerate(dataset):
            group = row["group"] or f"group{i:03d}"
            for j, (image, mask) in enumerate(zip(row["images"], row["masks"])):
                _save_image(image, root / image_dir / group / f"{j:03d}.{image_format}", "RGB")
                _save_image(mask, root / second / group / f"{j:03d}.png", "L")
    else:
        _save_sis(dataset, root, image_dir, second, image_format)
    return root


def _save_sis(dataset: Dataset, root: Path, image_dir: str, json_name: str, image_format: str) -> None:
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for i, row in enumerate(dataset):
        image = row["images"][0]
        file_name = f"{i:05d}.{image_format}"
        _save_image(image, root / image_dir / file_name, "RGB")
        images.append({"id": i + 1, "file_name": file_name, "width": image.width, "height": image.height})
        for rle in row["instances"]:
            compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(compressed)),
                    "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "salient"}]}
    (root / json_name).write_text(json.dumps(coco))


def instance_masks(row: dict) -> np.ndarray:
    """Decode a row's `instances` into an N x H x W bool array (N may be 0)."""
    masks = [decode_instance(rle) for rle in row["instances"]]
    if masks:
        return np.stack(masks)
    width, height = row["images"][0].size
    return np.zeros((0, height, width), dtype=bool)


__all__ = [
    "BENCHMARKS",
    "BenchmarkError",
    "BenchmarkSpec",
    "get_benchmark_spec",
    "instance_masks",
    "list_benchmarks",
    "load_benchmark",
    "load_saliency_dataset",
    "save_benchmark",
]
