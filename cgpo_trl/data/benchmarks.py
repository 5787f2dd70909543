"""Loaders for the public SOD / SIS / CoSOD benchmarks in the folder layouts they are distributed in.

`load_benchmark(name, data_dir)` returns rows with the contract columns (`cgpo_trl.data.rows.ROW_FEATURES`).
Images and masks stay file paths cast to `datasets.Image` (RGB / L), decoded only when a row is read, so a set of
10k images never sits in RAM decoded. While loading, every file is decoded once (about 3 ms per 400x300 image and
mask, docs/evaluation.md) so that an unreadable, empty or truncated file, or a mask whose size differs from its
image, is an error naming the file here rather than a crash in the middle of training.

Accepted layouts (`data_dir` is the dataset's folder, or its parent holding the folder named below; folder names
match case-insensitively; images are .jpg/.jpeg/.png/.bmp/.tif, masks .png/.bmp/.jpg/.tif, paired by file stem;
docs/evaluation.md draws each tree):

| name | folder | image dir, mask dir (first = published release, then the toolbox variants) |
|---|---|---|
| duts-tr / duts-te | DUTS-TR / DUTS-TE | `DUTS-TR-Image`, `DUTS-TR-Mask` (resp. `DUTS-TE-…`) |
| ecssd | ECSSD | `images`, `ground_truth_mask` |
| hku-is | HKU-IS | `imgs`, `gt` |
| pascal-s | PASCAL-S | `datasets/imgs/pascal`, `datasets/masks/pascal` |
| dut-omron | DUT-OMRON | `DUT-OMRON-image`, `pixelwiseGT-new-PNG` |
| every SOD set | | also `Image`+`Mask`, `Imgs`+`GT`, `images`+`masks`, `im`+`gt` |
| coca / cosal2015 / cosod3k | CoCA / CoSal2015 / CoSOD3k | `Image/<group>`, `GroundTruth/<group>`; also `image`+`binary` (CoCA release), `Image`+`GT`, `images/<Name>`+`gts/<Name>` (GCoNet-style test root), `img`+`gt` |
| ilso / soc / sis10k | ILSO / SOC / SIS10K | a COCO instances JSON and its image folder (see below), or ILSO's release: `imgs/` + `gt/` instance masks |

SIS sets (`layout="coco"` or `"indexed"`; detected when not given):

- **COCO JSON** (RDPNet, OQTR, SIS10K and the like). The annotation file is `annotations=`, else the `*.json` of
  the split: inside a `<split>/` folder, or in the dataset folder with the split in its name (`test.json`,
  `SOC_test600.json`, `test300.json`, `gttrain600.json`). With `split` given, a folder holding only another split's
  JSON is an error (never silently the test set); without it, one JSON is used and several are an error. The image
  folder is the one next to the JSON (or inside `<split>/`) that holds the files the JSON lists: `imgs`, `Imgs`,
  `Image`, `images`, `<split>/images`, `test300`, `imgtrain600`, ... A `file_name` must stay inside that folder
  (no absolute path, no `..`).
- **Indexed instance masks** (ILSO's release): `imgs/<stem>.jpg` and `gt/<stem>.png`, where every non-zero value
  of the PNG (palette index or grey level) is one instance, as ILSO's own evaluation code reads them. A `split` picks
  the image list `ImageSets/<split>*.txt` (e.g. `test_id_1000.txt`); with `split` and no matching list, it is an
  error.

SIS annotations may be polygons, uncompressed or compressed RLE; they become compressed RLE in `instances`
(category and `iscrowd` are ignored: salient instances are class-agnostic). An image without instances (SOC's
non-salient images) is a row with empty `instances`. Real rows have no reference answer: `solution` is "" (the
output-to-reasoning builder writes one).

CoSOD groups larger than `max_group_size` (default 16) become several rows of the same `group`, split into nearly
equal consecutive chunks, so no prompt carries more images than that; every image is still predicted and scored.

JPEG orientation: a JPEG whose EXIF tag would rotate or flip it is read as stored (its pixel array as in the file),
which is what the masks and COCO sizes of these benchmarks were drawn on; when the mask (or the JSON size) matches
only the rotated size, the rotation is applied. Either way image and mask line up.

`save_benchmark(dataset, name, data_dir)` writes rows in the first (published) layout of `name`, so the loaders
and the evaluation CLI can be tested end to end on synthetic data.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

from ..saliency.prompts import build_prompt
from .rows import ROW_FEATURES, annotation_to_rle, check_name, decode_instance, encode_instances

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
INSTANCE_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
IMAGE_MODES = ("RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "YCbCr")
"""Image modes that convert to RGB without losing meaning (16-bit and float images are refused)."""
MASK_MODES = ("1", "L", "P", "LA", "RGB")
"""Mask modes accepted (read as L, 8-bit grey: RGB masks are the grey masks some releases store as colour)."""
INSTANCE_MODES = ("P", "L", "1", "I;16", "I")
"""Modes of indexed instance masks: the pixel value is the instance label."""
SIS_LAYOUTS = ("coco", "indexed")
DEFAULT_MAX_GROUP_SIZE = 16
ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 swap width and height

_GENERIC_SOD = (("Image", "Mask"), ("Imgs", "GT"), ("images", "masks"), ("im", "gt"))
_SIS_IMAGE_DIRS = ("imgs", "Imgs", "Image", "images", "JPEGImages", "img")
_INSTANCE_DIRS = ("gt", "instance_gt", "instances")


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
    return (
        ("Image", "GroundTruth"),
        ("image", "binary"),
        ("Image", "GT"),
        (f"images/{folder}", f"gts/{folder}"),
        ("img", "gt"),
    )


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


def _dir(root: Path, relative: str) -> Path | None:
    found = _resolve(root, relative)
    return found if found is not None and found.is_dir() else None


def _dataset_roots(spec: BenchmarkSpec, data_dir: Path) -> list[Path]:
    roots = [data_dir]
    nested = _dir(data_dir, spec.folder)
    if nested is not None:
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


def _subdirs(folder: Path) -> dict[str, Path]:
    return {
        e.name: Path(e.path)
        for e in sorted(os.scandir(folder), key=lambda e: e.name)
        if e.is_dir() and not e.name.startswith(".")
    }


@dataclass(frozen=True)
class _ImageInfo:
    """What loading needs to know of a file it has decoded once: its stored size and EXIF orientation."""

    path: Path
    size: tuple[int, int]  # (width, height) as stored
    orientation: int | None
    labels: np.ndarray | None = None  # the pixel values, for indexed instance masks

    @property
    def decoded_size(self) -> tuple[int, int]:
        """The size `datasets` decodes it to: it applies the EXIF orientation."""
        return self.size[::-1] if self.orientation in (5, 6, 7, 8) else self.size


def _inspect(path: Path, modes: tuple[str, ...], kind: str, keep_pixels: bool = False) -> _ImageInfo:
    """Decode `path` fully (a truncated file fails here, not in training) and check its mode; raise naming it."""
    try:
        if path.stat().st_size == 0:
            raise BenchmarkError(f"unreadable {kind} {path}: the file is empty (0 bytes)")
        with Image.open(path) as image:
            if image.mode not in modes:
                raise BenchmarkError(f"{kind} {path} has mode {image.mode!r}; expected one of {list(modes)}")
            image.load()  # before reading EXIF: a PNG may store it after the pixels, and datasets reads it here too
            orientation = image.getexif().get(ORIENTATION_TAG)
            labels = np.asarray(image) if keep_pixels else None
            return _ImageInfo(path, image.size, orientation, labels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        if isinstance(error, BenchmarkError):
            raise
        raise BenchmarkError(f"unreadable {kind} {path}: {error}") from None


def _inspect_many(jobs: list[tuple[Path, tuple[str, ...], str, bool]]) -> list[_ImageInfo | BenchmarkError]:
    """`_inspect` every job in threads (decoding releases the GIL); errors are returned in place, in order."""

    def run(job):
        try:
            return _inspect(*job)
        except BenchmarkError as error:
            return error

    workers = min(8, os.cpu_count() or 1, max(1, len(jobs) // 64))
    if workers == 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs, chunksize=16))


def _image_entry(info: _ImageInfo, target: tuple[int, int], mismatch: str) -> dict:
    """The Arrow value of an image that must decode to `target` (width, height): its path, or, for a JPEG whose
    EXIF orientation would turn it away from its annotation, its stored pixels (PNG bytes, path kept)."""
    if info.orientation not in (None, 1) and info.size == target:
        with Image.open(info.path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")  # no EXIF travels with the PNG: decoded as stored
        return {"bytes": buffer.getvalue(), "path": str(info.path)}
    if info.decoded_size == target:
        return {"bytes": None, "path": str(info.path)}
    raise BenchmarkError(mismatch)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


class _Problems:
    """Collects bad items: raises on the first unless `skip_bad`, then warns once with the count."""

    def __init__(self, name: str, skip_bad: bool):
        self.name, self.skip_bad, self.messages = name, skip_bad, []

    def report(self, message: str) -> None:
        if not self.skip_bad:
            raise BenchmarkError(message)
        self.messages.append(message)

    def guard(self, check: Callable[..., object], *args) -> object | None:
        try:
            return check(*args)
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


def _to_dataset(columns: dict[str, list]) -> Dataset:
    """Contract rows from columns whose images / masks are `{"bytes", "path"}` entries.

    Built from an Arrow table directly: `Dataset.from_dict` would drop the bytes of an entry whose path exists."""
    import pyarrow as pa
    from datasets import DatasetInfo
    from datasets.table import InMemoryTable

    table = pa.Table.from_pydict(columns, schema=ROW_FEATURES.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=ROW_FEATURES))


def _path_entry(path: Path) -> dict:
    return {"bytes": None, "path": str(path)}


# ------------------------------------------------------------------------------------------------------ loaders


def _find_pair_layout(spec: BenchmarkSpec, roots: list[Path]) -> tuple[Path, Path]:
    for root in roots:
        for image_dir, mask_dir in spec.layouts:
            images, masks = _dir(root, image_dir), _dir(root, mask_dir)
            if images is not None and masks is not None:
                return images, masks
    tried = ", ".join(f"{i}/ + {m}/" for i, m in spec.layouts)
    raise BenchmarkError(f"{spec.name}: no known layout under {roots[0]} (tried {tried}, also inside {spec.folder}/)")


def _pair_files(image_dir: Path, mask_dir: Path, problems: _Problems, extensions=MASK_EXTENSIONS):
    """(image, mask) paths paired by stem; an unpaired file is a problem naming it."""
    images = _files(image_dir, IMAGE_EXTENSIONS)
    masks = _files(mask_dir, extensions)
    for stem in sorted(set(masks) - set(images)):
        problems.report(f"mask {masks[stem]} has no image named {stem}.* in {image_dir}")
    pairs = []
    for stem, image in images.items():
        if stem not in masks:
            problems.report(f"image {image} has no mask named {stem}.* in {mask_dir}")
            continue
        pairs.append((image, masks[stem]))
    return pairs


def _check_pairs(pairs: list[tuple[Path, Path]], problems: _Problems) -> list[tuple[dict, dict]]:
    """Decode every image and mask; keep the pairs that open and line up, as Arrow entries."""
    jobs = [
        job
        for image, mask in pairs
        for job in ((image, IMAGE_MODES, "image", False), (mask, MASK_MODES, "mask", False))
    ]
    infos = _inspect_many(jobs)
    kept = []
    for (image, mask), image_info, mask_info in zip(pairs, infos[::2], infos[1::2]):
        error = next((i for i in (image_info, mask_info) if isinstance(i, BenchmarkError)), None)
        if error is not None:
            problems.report(str(error))
            continue
        target = mask_info.decoded_size
        mismatch = f"mask {mask} is {_size(target)} but image {image} is {_size(image_info.decoded_size)}"
        entry = problems.guard(_image_entry, image_info, target, mismatch)
        if entry is not None:
            kept.append((entry, _path_entry(mask)))
    return kept


def _load_sod(spec: BenchmarkSpec, roots: list[Path], problems: _Problems) -> dict[str, list]:
    image_dir, mask_dir = _find_pair_layout(spec, roots)
    pairs = _check_pairs(_pair_files(image_dir, mask_dir, problems), problems)
    if not pairs:
        raise BenchmarkError(f"{spec.name}: no usable image/mask pairs in {image_dir} and {mask_dir}")
    prompt = build_prompt("sod", 1)
    n = len(pairs)
    return {
        "prompt": [prompt] * n,
        "images": [[image] for image, _ in pairs],
        "task": ["sod"] * n,
        "masks": [[mask] for _, mask in pairs],
        "instances": [[] for _ in range(n)],
        "group": [""] * n,
        "solution": [""] * n,
    }


def _chunks(items: list, max_size: int | None) -> list[list]:
    """`items` in nearly equal consecutive chunks of at most `max_size` (all of them when None)."""
    if max_size is None or len(items) <= max_size:
        return [items]
    count = -(-len(items) // max_size)
    bounds = np.linspace(0, len(items), count + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _load_cosod(spec: BenchmarkSpec, roots: list[Path], problems: _Problems, max_group_size) -> dict[str, list]:
    image_root, mask_root = _find_pair_layout(spec, roots)
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
        pairs = _check_pairs(_pair_files(folder, mask_groups[name], problems), problems)
        if not pairs:
            problems.report(f"empty group {folder}: no usable image/mask pairs")
            continue
        for chunk in _chunks(pairs, max_group_size):
            columns["prompt"].append(build_prompt("cosod", len(chunk)))
            columns["images"].append([image for image, _ in chunk])
            columns["task"].append("cosod")
            columns["masks"].append([mask for _, mask in chunk])
            columns["instances"].append([])
            columns["group"].append(name)
            columns["solution"].append("")
    if not columns["group"]:
        raise BenchmarkError(f"{spec.name}: no usable groups in {image_root}")
    return columns


def _sis_columns(rows: Iterable[tuple[dict, list[dict]]]) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in ROW_FEATURES}
    prompt = build_prompt("sis", 1)
    for image, instances in rows:
        columns["prompt"].append(prompt)
        columns["images"].append([image])
        columns["task"].append("sis")
        columns["masks"].append([])
        columns["instances"].append(instances)
        columns["group"].append("")
        columns["solution"].append("")
    return columns


def _split_roots(bases: list[Path], split: str | None) -> tuple[list[Path], list[Path]]:
    """(folders that are the split itself, the dataset folders): `data_dir/<split>` or a data_dir named so."""
    split_roots, plain_roots = [], []
    for base in bases:
        if split and base.name.lower() == split.lower():
            split_roots.append(base)
            continue
        folder = _dir(base, split) if split else None
        if folder is not None:
            split_roots.append(folder)
        plain_roots.append(base)
    return split_roots, plain_roots


def _jsons(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))


def _find_annotations(spec: BenchmarkSpec, bases: list[Path], split: str | None) -> Path | None:
    """The COCO JSON of `split` (see the module docstring), None when there is no JSON at all."""

    def one(found: list[Path], root: Path) -> Path:
        if len(found) > 1:
            hint = "pass annotations=" if split else "pass split= (e.g. 'test') or annotations="
            raise BenchmarkError(f"{spec.name}: several JSON files in {root} ({[p.name for p in found]}); {hint}")
        return found[0]

    split_roots, plain_roots = _split_roots(bases, split)
    for root in split_roots:
        if found := _jsons(root):
            return one(found, root)
    others: list[Path] = []
    for root in plain_roots:
        found = _jsons(root)
        if split:
            matching = [p for p in found if split.lower() in p.stem.lower()]
            others += [p for p in found if p not in matching]
            found = matching
        if found:
            return one(found, root)
    if others:
        raise BenchmarkError(
            f"{spec.name}: no annotation file for split {split!r} under {bases[0]}: found {[p.name for p in others]}, "
            f"none named after the split and no {split}/ folder holding one. Pass the split those files hold "
            "(e.g. split='test') or annotations="
        )
    return None


def _relative_file(file_name: object, where: str) -> str:
    """A COCO `file_name` that stays inside the image folder: relative, no `..`, no NUL."""
    if not isinstance(file_name, str) or not file_name or "\0" in file_name:
        raise BenchmarkError(f"{where}: file_name {file_name!r} is not a file name")
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise BenchmarkError(f"{where}: file_name {file_name!r} points outside the image folder")
    return file_name


def _find_coco_images(
    spec: BenchmarkSpec, annotation_file: Path, file_names: list[str], bases: list[Path], split: str | None
) -> Path:
    """The folder that holds the files the JSON lists, searched next to the JSON, inside `<split>/` and in the
    dataset folders: known image folder names first, then folders named after the split, then any other."""
    probe = file_names[:5]
    candidates: list[Path] = []
    for root in dict.fromkeys((annotation_file.parent, *bases)):
        split_dir = _dir(root, split) if split else None
        if split_dir is not None:
            candidates += [d for name in _SIS_IMAGE_DIRS if (d := _dir(split_dir, name)) is not None] + [split_dir]
        candidates += [d for name in _SIS_IMAGE_DIRS if (d := _dir(root, name)) is not None]
        subdirs = list(_subdirs(root).values())
        if split:
            subdirs.sort(key=lambda d: split.lower() not in d.name.lower())
        for folder in subdirs:
            candidates += [folder] + [d for name in _SIS_IMAGE_DIRS if (d := _dir(folder, name)) is not None]
        candidates.append(root)
    best, best_hits = None, 0
    for folder in dict.fromkeys(candidates):
        hits = sum((folder / name).is_file() for name in probe)
        if hits > best_hits:
            best, best_hits = folder, hits
        if hits == len(probe):
            break
    if best is None:
        raise BenchmarkError(
            f"{spec.name}: no folder next to {annotation_file} holds the images it lists (e.g. {probe[0]!r}); "
            f"expected one of {', '.join(_SIS_IMAGE_DIRS)} or a folder named after the split"
        )
    return best


def _load_coco(
    spec: BenchmarkSpec, annotation_file: Path, bases: list[Path], split: str | None, problems: _Problems
) -> dict[str, list]:
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
    if not coco["images"]:
        raise BenchmarkError(f"{spec.name}: {annotation_file} lists no images")
    records: dict[object, dict] = {}
    seen_files: dict[str, object] = {}
    for position, record in enumerate(coco["images"]):
        where = f"{annotation_file}: images[{position}]"
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where} is not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in record]
        if missing:
            raise BenchmarkError(f"{where} lacks field(s) {missing}")
        file_name = _relative_file(record["file_name"], where)
        if record["id"] in records:
            raise BenchmarkError(f"{where} repeats the image id {record['id']!r}")
        if file_name in seen_files:
            raise BenchmarkError(
                f"{where}: file_name {file_name!r} is listed twice (ids {seen_files[file_name]!r} and {record['id']!r})"
            )
        seen_files[file_name] = record["id"]
        records[record["id"]] = {**record, "instances": [], "bad": False}
    for position, annotation in enumerate(coco["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "segmentation" not in annotation:
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

    image_dir = _find_coco_images(spec, annotation_file, [r["file_name"] for r in records.values()], bases, split)
    kept = [r for r in records.values() if not r["bad"]]
    for record in kept:
        if not (image_dir / record["file_name"]).is_file():
            problems.report(f"image {image_dir / record['file_name']} listed in {annotation_file} does not exist")
            record["bad"] = True
    kept = [r for r in kept if not r["bad"]]
    infos = _inspect_many([(image_dir / r["file_name"], IMAGE_MODES, "image", False) for r in kept])
    rows = []
    for record, info in zip(kept, infos):
        if isinstance(info, BenchmarkError):
            problems.report(str(info))
            continue
        target = (int(record["width"]), int(record["height"]))
        mismatch = (
            f"image {info.path} is {_size(info.decoded_size)} but {annotation_file} says "
            f"{record['width']}x{record['height']}"
        )
        entry = problems.guard(_image_entry, info, target, mismatch)
        if entry is not None:
            rows.append((entry, record["instances"]))
    if not rows:
        raise BenchmarkError(f"{spec.name}: no usable images in {annotation_file}")
    return _sis_columns(rows)


def _find_indexed_layout(bases: list[Path]) -> tuple[Path, Path, Path] | None:
    """(root, image dir, instance-mask dir) of ILSO's release layout, if present."""
    for root in bases:
        images = next((d for name in _SIS_IMAGE_DIRS if (d := _dir(root, name)) is not None), None)
        masks = next((d for name in _INSTANCE_DIRS if (d := _dir(root, name)) is not None), None)
        if images is not None and masks is not None:
            return root, images, masks
    return None


def _image_list(spec: BenchmarkSpec, root: Path, split: str) -> list[str]:
    """The stems listed for `split` in `root/ImageSets/`: `<split>.txt`, else the one list named after it."""
    folder = _dir(root, "ImageSets")
    lists = sorted(p for p in folder.glob("*.txt") if p.is_file()) if folder is not None else []
    exact = [p for p in lists if p.stem.lower() == split.lower()]
    matching = exact or [p for p in lists if split.lower() in p.stem.lower()]
    if not matching:
        found = f"found {[p.name for p in lists]}" if lists else "there is no ImageSets/ folder of .txt lists"
        raise BenchmarkError(
            f"{spec.name}: split {split!r} asked for, but no image list in {root / 'ImageSets'} is named after it "
            f"({found}); leave split unset to load every image, or name a list"
        )
    if len(matching) > 1:
        raise BenchmarkError(
            f"{spec.name}: several image lists match split {split!r}: {[p.name for p in matching]}; pass the list's "
            f"name as split (e.g. split={matching[0].stem!r})"
        )
    names = matching[0].read_text().split()
    if not names:
        raise BenchmarkError(f"{spec.name}: image list {matching[0]} is empty")
    return names


def _load_indexed(spec: BenchmarkSpec, bases: list[Path], split: str | None, problems: _Problems) -> dict[str, list]:
    found = _find_indexed_layout(bases)
    if found is None:
        raise BenchmarkError(
            f"{spec.name}: no indexed instance-mask layout under {bases[0]}: expected an image folder "
            f"({', '.join(_SIS_IMAGE_DIRS)}) and an instance-mask folder ({', '.join(_INSTANCE_DIRS)})"
        )
    root, image_dir, mask_dir = found
    if split:
        images, masks = _files(image_dir, IMAGE_EXTENSIONS), _files(mask_dir, INSTANCE_EXTENSIONS)
        pairs = []
        for stem in _image_list(spec, root, split):
            if stem not in images or stem not in masks:
                where = image_dir if stem not in images else mask_dir
                problems.report(f"{stem!r}, listed for split {split!r}, has no file {stem}.* in {where}")
                continue
            pairs.append((images[stem], masks[stem]))
    else:
        pairs = _pair_files(image_dir, mask_dir, problems, INSTANCE_EXTENSIONS)
    jobs = [
        j
        for image, mask in pairs
        for j in ((image, IMAGE_MODES, "image", False), (mask, INSTANCE_MODES, "instance mask", True))
    ]
    infos = _inspect_many(jobs)
    rows = []
    for (image, mask), image_info, mask_info in zip(pairs, infos[::2], infos[1::2]):
        error = next((i for i in (image_info, mask_info) if isinstance(i, BenchmarkError)), None)
        if error is not None:
            problems.report(str(error))
            continue
        target = mask_info.size
        mismatch = f"instance mask {mask} is {_size(target)} but image {image} is {_size(image_info.decoded_size)}"
        entry = problems.guard(_image_entry, image_info, target, mismatch)
        if entry is None:
            continue
        labels = mask_info.labels
        instances = encode_instances([labels == value for value in np.unique(labels) if value != 0])
        rows.append((entry, instances))
    if not rows:
        raise BenchmarkError(f"{spec.name}: no usable image / instance-mask pairs in {image_dir} and {mask_dir}")
    return _sis_columns(rows)


def _load_sis(
    spec: BenchmarkSpec,
    bases: list[Path],
    problems: _Problems,
    annotations: str | os.PathLike | None,
    split: str | None,
    layout: str | None,
) -> dict[str, list]:
    if annotations is not None:
        if layout == "indexed":
            raise BenchmarkError(f"{spec.name}: annotations= is a COCO JSON; it does not go with layout='indexed'")
        path = Path(annotations)
        if not path.is_file():
            raise BenchmarkError(f"{spec.name}: annotation file {path} does not exist")
        return _load_coco(spec, path, bases, split, problems)
    if layout == "indexed":
        return _load_indexed(spec, bases, split, problems)
    annotation_file = _find_annotations(spec, bases, split)
    if annotation_file is not None:
        return _load_coco(spec, annotation_file, bases, split, problems)
    if layout is None and _find_indexed_layout(bases) is not None:
        return _load_indexed(spec, bases, split, problems)
    raise BenchmarkError(
        f"{spec.name}: no COCO annotation *.json under {bases[0]} (nor in {spec.folder}/ or a {split or '<split>'}/ "
        f"folder){'' if layout else ' and no imgs/ + gt/ instance masks'}; pass annotations="
    )


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike,
    skip_bad: bool = False,
    annotations: str | os.PathLike | None = None,
    split: str | None = None,
    layout: str | None = None,
    max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE,
) -> Dataset:
    """Load benchmark `name` (see `list_benchmarks()`) from `data_dir` into contract rows with lazy images.

    Bad items (unpaired files, unreadable, empty or truncated files, masks of the wrong size or mode, empty groups,
    bad annotations) raise `BenchmarkError` naming the file; with `skip_bad=True` they are skipped and one warning
    gives the count. SOD and CoSOD sets name their split (`duts-tr` / `duts-te`), so `split` selects files only for
    SIS sets (see the module docstring), where `annotations` overrides the JSON and `layout` ("coco" or "indexed")
    the detection. `max_group_size` caps the images of one CoSOD row (None: whole groups).
    """
    spec = get_benchmark_spec(name)
    root = Path(data_dir)
    if not root.is_dir():
        raise BenchmarkError(f"{spec.name}: data_dir {root} is not a directory")
    if layout is not None and (spec.task != "sis" or layout not in SIS_LAYOUTS):
        raise BenchmarkError(f"{spec.name}: layout must be one of {list(SIS_LAYOUTS)} for SIS sets, got {layout!r}")
    if annotations is not None and spec.task != "sis":
        raise BenchmarkError(f"{spec.name}: annotations= applies to SIS sets (COCO JSON), not to {spec.task}")
    if max_group_size is not None and (
        isinstance(max_group_size, bool) or not isinstance(max_group_size, int) or max_group_size < 1
    ):
        raise BenchmarkError(f"{spec.name}: max_group_size must be a positive integer or None, got {max_group_size!r}")
    bases = _dataset_roots(spec, root)
    problems = _Problems(spec.name, skip_bad)
    if spec.task == "sod":
        columns = _load_sod(spec, bases, problems)
    elif spec.task == "cosod":
        columns = _load_cosod(spec, bases, problems, max_group_size)
    else:
        columns = _load_sis(spec, bases, problems, annotations, split, layout)
    problems.finish()
    return _to_dataset(columns)


LOADER_OPTIONS = ("annotations", "layout", "max_group_size")
"""Options `load_saliency_dataset` passes on to `load_benchmark` (besides `data_dir`, `skip_bad` and `split`)."""


def load_saliency_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    split: str | None = None,
    **options,
) -> Dataset:
    """One entry point for recipes and CLIs: `synthetic-sod|sis|cosod` generates the synthetic benchmark
    (`options` are `SyntheticConfig` fields), any other name loads a public benchmark from `data_dir` (`options`:
    `annotations`, `layout`, `max_group_size`). An option the target does not take is an error naming it."""
    if name.startswith("synthetic-"):
        from dataclasses import fields

        from .synthetic import SyntheticConfig, generate_synthetic

        accepted = sorted({f.name for f in fields(SyntheticConfig)} - {"task", "split"})
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise BenchmarkError(f"{name}: unknown option(s) {unknown}; synthetic sets accept {accepted}")
        return generate_synthetic(task=name.removeprefix("synthetic-"), split=split or "train", **options)
    spec = get_benchmark_spec(name)
    unknown = sorted(set(options) - set(LOADER_OPTIONS))
    if unknown:
        raise BenchmarkError(
            f"{spec.name}: unknown option(s) {unknown}; benchmarks accept data_dir, skip_bad, split and "
            f"{list(LOADER_OPTIONS)}"
        )
    if data_dir is None:
        raise BenchmarkError(f"benchmark {name!r} needs data_dir")
    return load_benchmark(name, data_dir, skip_bad=skip_bad, split=split, **options)


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
            group = check_name(row["group"] or f"group{i:03d}", f"row {i} group")
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
    "DEFAULT_MAX_GROUP_SIZE",
    "SIS_LAYOUTS",
    "BenchmarkError",
    "BenchmarkSpec",
    "get_benchmark_spec",
    "instance_masks",
    "list_benchmarks",
    "load_benchmark",
    "load_saliency_dataset",
    "save_benchmark",
]
