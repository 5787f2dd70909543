"""Prediction: image(s) -> generated answer -> parsed tags -> referring segmenter -> masks, COCO results, overlays.

```
python -m cgpo_trl.predict --model_name_or_path CKPT --images DIR --task sod --output_dir OUT \
    [--segmenter evf-sam --segmenter_kwargs '{"checkpoint": "YxZhang/evf-sam2"}'] [--batch_size 8]
```
`--images DIR` holds one image per file (SOD, SIS) or one folder of images per group (CoSOD: `DIR/<group>/*.jpg`).
Everything is written under `OUT` in the layout the benchmarks and `python -m cgpo_trl.eval` use, with every file
and group name kept exactly as on disk (spaces included):

| path | what |
|---|---|
| `predictions.jsonl` | one record per row: names, generated text, parsed tags, parse problems, SIS detections |
| `masks/<name>.png`, `masks/<group>/<name>.png` | SOD / CoSOD saliency maps (uint8, the segmenter's soft mask x 255) |
| `results.json` | SIS detections as COCO results (`image_id`, `category_id` 1, RLE `segmentation`, `score`) |
| `overlays/...png` | the image with the predicted mask(s) tinted and the expressions as a caption |
| `gt/...`, `annotations.json` | written only when the rows carry ground truth (`masks` / `instances` columns) |
| `run.json` | what determines the predictions (model, answers, segmenter and options, prompts, data), for resuming |

A region answer (`<rg>`) is the pixel-wise max (soft union) of its expressions' masks; no expression gives an
all-zero map. Each `<ins>` expression becomes one instance: the segmenter's region mask for it, exactly as the `sis`
training reward reads it (empty masks are dropped). An empty `<answer></answer>` says "nothing is salient": no
instance, an all-zero map (see `cgpo_trl.saliency.rewards.read_answer`). The score of a detection follows
`instance_score`: `"segmenter"` (the segmenter's confidence) or `"order"` (emission order: the k-th of n
expressions scores (n - k) / n, so the model's first instance ranks first).

Runs are resumable: a row whose record is already in `predictions.jsonl` is skipped, a record is appended only after
the row's files are written, and every file is written to a temporary name and renamed, so a killed run leaves no
half-written file. A run given a `fingerprint` (the CLI and the eval report always give one) refuses an output folder
whose `run.json` records other settings, instead of mixing predictions of two models or datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from cgpo_trl.data.rows import check_name
from cgpo_trl.saliency.metrics import encode_mask
from cgpo_trl.saliency.prompts import TASKS, build_prompt
from cgpo_trl.saliency.rewards import read_answer

INSTANCE_SCORES = ("segmenter", "order")
TINY_MODEL = "tiny-random"  # the same offline stand-in the training recipes accept
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Tints for overlays: region masks use the first, instances cycle through all.
PALETTE = [(255, 40, 40), (40, 120, 255), (40, 200, 80), (255, 190, 0), (200, 60, 220), (0, 210, 210)]
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Greyscale modes of 16-bit (and 32-bit integer) files; their values are scaled to 8 bits (/ 257), not clipped."""
RUN_FILE = "run.json"


@dataclass
class PredictConfig:
    """Options of `python -m cgpo_trl.predict` (also the `predict` part of an eval report config)."""

    model_name_or_path: str = field(
        default=None, metadata={"help": "Checkpoint folder or hub id (Qwen2.5-VL), or 'tiny-random' (offline)."}
    )
    output_dir: str = field(default="predictions", metadata={"help": "Where masks, JSON and overlays go."})
    images: str | None = field(
        default=None, metadata={"help": "Folder of images (CoSOD: one sub-folder per group). CLI input only."}
    )
    task: str = field(default="sod", metadata={"help": "One of 'sod', 'sis', 'cosod' (rows may carry their own)."})
    segmenter: str = field(default="evf-sam", metadata={"help": "Referring segmenter name (load_segmenter)."})
    segmenter_kwargs: dict | str | None = field(
        default=None, metadata={"help": 'Backend kwargs as JSON, e.g. \'{"checkpoint": "YxZhang/evf-sam2"}\'.'}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows generated together (CoSOD: groups)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per answer."})
    temperature: float = field(default=0.0, metadata={"help": "0 decodes greedily; > 0 samples."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16."})
    device: str = field(default="cpu", metadata={"help": "Model device, e.g. 'cuda'."})
    instance_score: str = field(
        default="segmenter",
        metadata={"help": "Score of SIS detections: 'segmenter' (its confidence) or 'order' (emission order)."},
    )
    overlays: bool = field(default=True, metadata={"help": "Write an overlay PNG per image."})
    write_ground_truth: bool = field(
        default=True, metadata={"help": "Write the rows' ground truth (gt/, annotations.json) when they carry it."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.instance_score not in INSTANCE_SCORES:
            raise ValueError(f"instance_score must be one of {INSTANCE_SCORES}, got {self.instance_score!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.segmenter_kwargs, str):
            try:
                self.segmenter_kwargs = json.loads(self.segmenter_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"segmenter_kwargs is not valid JSON: {self.segmenter_kwargs!r} ({err})") from None
        self.segmenter_kwargs = dict(self.segmenter_kwargs or {})

    def generation(self) -> dict[str, Any]:
        """The generation options that determine an answer (and key a resumed run); the device does not."""
        return dict(dtype=self.dtype, max_new_tokens=self.max_new_tokens, temperature=self.temperature)


# --------------------------------------------------------------------------------------------------------------------
# Generation


class VLMGenerator:
    """Batched answers of a vision-language model to the rows' prompts (left padding, new tokens only)."""

    def __init__(self, model, processor, max_new_tokens: int = 256, temperature: float = 0.0):
        self.model, self.processor = model.eval(), processor
        self.processor.tokenizer.padding_side = "left"
        self.kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
        if temperature > 0:
            self.kwargs["temperature"] = temperature

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu", **kwargs):
        """Load a checkpoint; `tiny-random` builds the tiny offline Qwen2.5-VL of `cgpo_trl.testing` instead."""
        if name_or_path == TINY_MODEL:
            from cgpo_trl.testing import build_tiny_vlm

            model, processor = build_tiny_vlm()
            return cls(model.to(device), processor, **kwargs)
        from cgpo_trl.models import load_model_and_processor

        model, processor = load_model_and_processor(name_or_path, dtype=dtype, device=device)
        return cls(model, processor, **kwargs)

    def __call__(self, rows: Sequence[dict]) -> list[str]:
        import torch

        texts = [
            self.processor.apply_chat_template(row_prompt(row), add_generation_prompt=True, tokenize=False)
            for row in rows
        ]
        images = [[im.convert("RGB") for im in row["images"]] for row in rows]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.kwargs)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def row_prompt(row: dict) -> list[dict]:
    """The row's own prompt when it has one, else the task instruction for its images."""
    return row.get("prompt") or build_prompt(row["task"], len(row["images"]))


# --------------------------------------------------------------------------------------------------------------------
# Rows, names and inputs


def row_key(row: dict, index: int) -> str:
    """Stable identity of a row for resuming: `<group>/<first image>` (CoSOD; a large group can span several rows),
    else its image name, else its index. Names are kept as they are; one that is not a valid file name is an error."""
    names = row.get("names") or ([row["name"]] if row.get("name") else None)
    if row["task"] == "cosod":
        first = check_name(names[0], f"row {index} image name") if names else "000"
        return f"{check_name(row.get('group') or f'group{index:05d}', f'row {index} group')}/{first}"
    return check_name(names[0], f"row {index} image name") if names else f"{index:06d}"


def image_names(row: dict, index: int) -> list[str]:
    """Relative output path (no suffix) of each image: `<name>` for SOD / SIS, `<group>/<name>` for CoSOD."""
    names = row.get("names") or ([row["name"]] if row.get("name") else None)
    if names is not None and len(names) != len(row["images"]):
        raise ValueError(f"row {index}: {len(names)} names for {len(row['images'])} images")
    if row["task"] == "cosod":
        group = row_key(row, index).rsplit("/", 1)[0]
        stems = [check_name(n, f"row {index} image name") for n in names] if names else None
        return [f"{group}/{s}" for s in stems or (f"{j:03d}" for j in range(len(row["images"])))]
    return [row_key(row, index)]


def _eight_bit(image: Image.Image, path: Path) -> Image.Image | None:
    """An 8-bit copy of a 16-bit (or 32-bit integer) greyscale image, None for images PIL converts to RGB
    correctly. Converting "I;16" to "RGB" directly clips every value above 255 to white."""
    if image.mode == "F":
        raise ValueError(f"image {path} holds floating-point pixels (mode 'F'); save it as an 8- or 16-bit image")
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return None
    values = np.asarray(image, dtype=np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(f"image {path} holds values outside 0-65535 (mode {image.mode!r}); save it as 8 or 16 bits")
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")


def rows_from_folder(folder: str | Path, task: str):
    """A `datasets.Dataset` of rows (task, images, names, group) for a folder of images, decoded lazily per row.

    SOD / SIS take every image file in `folder`; CoSOD one sub-folder per group. Every file is decoded once here,
    so an unreadable or truncated image fails before any generation, naming the file. 16-bit greyscale images are
    kept as 8-bit copies (their values / 257); every name is kept as on disk.
    """
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, List, Value
    from datasets import Image as ImageFeature
    from datasets.table import InMemoryTable

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")

    def entry(path: Path) -> dict:
        try:
            image = Image.open(path)
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # unreadable, truncated
            raise ValueError(f"cannot read image {path}: {err}") from None
        with image:
            converted = _eight_bit(image, path)
        if converted is None:
            return {"bytes": None, "path": str(path)}
        buffer = io.BytesIO()
        converted.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": str(path)}

    def images_in(directory: Path) -> list[Path]:
        return sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )

    if task == "cosod":
        groups = [(g.name, images_in(g)) for g in sorted(p for p in folder.iterdir() if p.is_dir())]
        groups = [(name, paths) for name, paths in groups if paths]
    else:
        groups = [("", [path]) for path in images_in(folder)]
    if not groups:
        layout = "<group>/<image>" if task == "cosod" else "<image>"
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} (expected {layout})")
    features = Features(
        {
            "task": Value("string"),
            "group": Value("string"),
            "images": List(ImageFeature(mode="RGB")),
            "names": List(Value("string")),
        }
    )
    columns = {
        "task": [task] * len(groups),
        "group": [name for name, _ in groups],
        "images": [[entry(p) for p in paths] for _, paths in groups],
        "names": [[p.stem for p in paths] for _, paths in groups],
    }
    # Built from Arrow directly: `Dataset.from_dict` drops the bytes of an entry whose path exists.
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


# --------------------------------------------------------------------------------------------------------------------
# What determines a prediction (resume keys)


class ResumeError(ValueError):
    """An output folder holds predictions made with other settings; the message names what differs."""


def _digest(value: Any) -> str:
    """Content digest of rows' columns: images by their pixels or, for files, path + size + modification time."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(item: Any) -> None:
        if isinstance(item, Image.Image):
            digest.update(f"<image {item.mode} {item.size}>".encode())
            digest.update(item.tobytes())
        elif isinstance(item, Mapping) and set(item) == {"bytes", "path"}:
            if item["bytes"] is not None:
                digest.update(item["bytes"])
            else:
                stat = os.stat(item["path"])
                digest.update(f"<file {item['path']} {stat.st_size} {stat.st_mtime_ns}>".encode())
        elif isinstance(item, Mapping):
            digest.update(b"{")
            for key in sorted(item, key=str):
                feed(key)
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, (list, tuple)):
            digest.update(b"[")
            for element in item:
                feed(element)
            digest.update(b"]")
        elif isinstance(item, np.ndarray):
            digest.update(f"<array {item.dtype} {item.shape}>".encode() + item.tobytes())
        else:
            digest.update(repr(item).encode())

    feed(value)
    return digest.hexdigest()


def _columns(rows) -> dict[str, list]:
    from datasets import Dataset, List
    from datasets import Image as ImageFeature

    if isinstance(rows, Dataset):
        for column in ("images", "masks"):
            if column in rows.column_names:
                rows = rows.cast_column(column, List(ImageFeature(decode=False)))
        return rows.to_dict()
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


def _model_files(name_or_path: str) -> list | None:
    """Name, size and modification time of a local checkpoint's files: retraining into the same folder changes them."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]


def run_fingerprint(
    rows,
    *,
    answers: str,
    model: str | None,
    generation: Mapping[str, Any],
    segmenter: str,
    segmenter_kwargs: Mapping[str, Any],
    instance_score: str,
) -> dict[str, Any]:
    """Everything that determines the predictions of a run, as stored in `run.json` and compared on resume."""
    columns = _columns(rows)
    prompts = columns.get("prompt") or [
        build_prompt(task, len(images)) for task, images in zip(columns["task"], columns["images"])
    ]
    data = {k: v for k, v in columns.items() if k not in ("prompt", "solution")}
    by_model = answers == "model"
    return json.loads(
        json.dumps(
            {
                "answers": answers,
                "model": model if by_model else None,
                "model_files": _model_files(model) if by_model and model else None,
                "generation": dict(generation) if by_model else None,
                "reference_answers": None if by_model else _digest(columns.get("solution")),
                "segmenter": segmenter,
                "segmenter_kwargs": dict(segmenter_kwargs),
                "instance_score": instance_score,
                "prompts": _digest(prompts),
                "data": _digest(data),
            },
            default=str,
        )
    )


def check_resume(output_dir: str | Path, fingerprint: Mapping[str, Any]) -> None:
    """Raise `ResumeError` if `output_dir` holds predictions made with settings other than `fingerprint`."""
    out = Path(output_dir)
    stored_path, records = out / RUN_FILE, out / "predictions.jsonl"
    if stored_path.is_file():
        try:
            stored = json.loads(stored_path.read_text())
        except json.JSONDecodeError as err:
            raise ResumeError(f"{stored_path} is not valid JSON ({err}); delete {out} to predict afresh") from None
        differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if differ:
            shown = "; ".join(f"{k}: {stored.get(k)!r} -> {fingerprint.get(k)!r}" for k in differ)
            raise ResumeError(
                f"{out} holds predictions made with other settings ({shown}); delete it or choose another "
                "output_dir: predictions of two runs are never mixed"
            )
    elif records.is_file() and records.stat().st_size:
        raise ResumeError(
            f"{out} holds predictions of a run that did not record its settings ({RUN_FILE} is missing), so they "
            "cannot be resumed safely; delete it or choose another output_dir"
        )


# --------------------------------------------------------------------------------------------------------------------
# Masks, overlays


def to_png_array(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(mask, dtype=np.float32) * 255), 0, 255).astype(np.uint8)


def overlay(image: Image.Image, masks: Sequence[np.ndarray], caption: str, min_side: int = 256) -> Image.Image:
    """The image with each mask tinted in its own colour and `caption` written in a strip below."""
    image = image.convert("RGB")
    scale = max(1.0, min_side / min(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    canvas = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    for k, mask in enumerate(masks):
        alpha = np.asarray(Image.fromarray(to_png_array(mask)).resize(size, Image.Resampling.BILINEAR)) / 255.0
        canvas = canvas * (1 - 0.55 * alpha[..., None]) + np.array(PALETTE[k % len(PALETTE)]) * 0.55 * alpha[..., None]
        # A white outline keeps the mask visible on an object of the tint's own colour.
        inside = alpha >= 0.5
        canvas[inside & ~binary_erosion(inside, iterations=max(1, size[0] // 128))] = 255
    font = ImageFont.load_default(size=max(12, size[0] // 24))
    char_width = max(1.0, font.getlength("m"))
    lines = textwrap.wrap(caption or "(no expression)", width=max(8, int(size[0] / char_width * 1.6)))[:6]
    line_height = font.size + 4
    out = Image.new("RGB", (size[0], size[1] + line_height * len(lines) + 6), "white")
    out.paste(Image.fromarray(canvas.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, size[1] + 3 + i * line_height), line, fill="black", font=font)
    return out


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename it: a killed run leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _save_png(array_or_image, path: Path) -> None:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    _replace(path, lambda temporary: image.save(temporary, format="PNG"))


def _save_json(value: Any, path: Path) -> None:
    _replace(path, lambda temporary: temporary.write_text(json.dumps(value)))


# --------------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class PredictionSummary:
    """Counts of a `predict_rows` run and where its outputs are."""

    output_dir: Path
    num_rows: int
    num_predicted: int
    num_skipped: int
    num_well_formed: int
    task_counts: dict[str, int]

    @property
    def masks_dir(self) -> Path:
        return self.output_dir / "masks"

    @property
    def gt_dir(self) -> Path:
        return self.output_dir / "gt"

    @property
    def results_json(self) -> Path:
        return self.output_dir / "results.json"

    @property
    def annotations_json(self) -> Path:
        return self.output_dir / "annotations.json"


def _read_records(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves at most one partial last line: drop it so the row is redone and the
            # next record starts on a line of its own.
            if number == len(lines):
                path.write_text("".join(line + "\n" for line in lines[:-1]))
                continue
            raise ValueError(f"{path}:{number} is not valid JSON; delete the line or the file to redo it") from None
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError(f"{path}:{number} is not a prediction record (no 'key')")
        records[record["key"]] = record
    return records


def _image_id(row: dict, index: int) -> int:
    return int(row["image_id"]) if row.get("image_id") is not None else index + 1


def _write_ground_truth(row: dict, index: int, names: list[str], out: Path) -> None:
    if row["task"] in ("sod", "cosod") and row.get("masks"):
        for name, mask in zip(names, row["masks"]):
            path = out / "gt" / f"{name}.png"
            if not path.exists():
                _save_png(mask.convert("L"), path)


def _coco_image(row: dict, index: int) -> tuple[dict, list[dict]]:
    """A SIS row's COCO `images` entry and its ground-truth instances (RLE)."""
    image = row["images"][0]
    entry = {
        "id": _image_id(row, index),
        "file_name": f"{row_key(row, index)}.png",
        "height": image.height,
        "width": image.width,
    }
    return entry, list(row["instances"])


def _coco_ground_truth(entries: list[tuple[dict, list[dict]]]) -> dict:
    annotations = [
        {
            "id": n,
            "image_id": image["id"],
            "category_id": 1,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
            "iscrowd": 0,
        }
        for n, (image, rle) in enumerate(((image, rle) for image, rles in entries for rle in rles), 1)
    ]
    images = [image for image, _ in entries]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "salient"}]}


def _segment_batch(segmenter, rows: list[dict], parsed: list, instance_score: str) -> list[dict]:
    """Masks for every row of a batch with one segmenter call. Every expression is segmented in region mode: a
    `<rg>` mask joins its row's map, a `<ins>` mask is one instance, as the training rewards score them."""
    pairs = []  # (row, image, expression index)
    for r, (row, answer) in enumerate(zip(rows, parsed)):
        if row["task"] == "sis":
            pairs += [(r, 0, k) for k in range(len(answer.instances))]
        else:
            pairs += [(r, i, k) for i in range(len(row["images"])) for k in range(len(answer.regions))]
    expressions = [(parsed[r].instances if rows[r]["task"] == "sis" else parsed[r].regions)[k] for r, _, k in pairs]
    outputs = segmenter.segment([rows[r]["images"][i] for r, i, _ in pairs], expressions)
    results = []
    for row in rows:
        if row["task"] == "sis":
            results.append({"instances": []})
        else:
            results.append({"maps": [np.zeros((im.height, im.width), np.float32) for im in row["images"]]})
    for (r, i, k), (mask, score) in zip(pairs, outputs):
        if rows[r]["task"] != "sis":
            np.maximum(results[r]["maps"][i], mask, out=results[r]["maps"][i])
        elif (mask >= 0.5).any():
            n = len(parsed[r].instances)
            value = float(score) if instance_score == "segmenter" else (n - k) / n
            results[r]["instances"].append((mask, value, k))
    return results


def predict_rows(
    rows: Sequence[dict],
    generate: Callable[[Sequence[dict]], list[str]],
    segmenter,
    output_dir: str | Path,
    batch_size: int = 8,
    instance_score: str = "segmenter",
    overlays: bool = True,
    write_ground_truth: bool = True,
    progress: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
) -> PredictionSummary:
    """Run generation + segmentation over `rows` (data-contract dicts or a `datasets.Dataset`) into `output_dir`.

    `generate(batch_of_rows) -> texts` is any callable (a `VLMGenerator`, or a stub in tests). With `fingerprint`
    (see `run_fingerprint`), a folder holding predictions made with other settings is refused (`ResumeError`).
    """
    from tqdm.auto import tqdm

    if instance_score not in INSTANCE_SCORES:
        raise ValueError(f"instance_score must be one of {INSTANCE_SCORES}, got {instance_score!r}")
    out = Path(output_dir)
    if fingerprint is not None:
        check_resume(out, fingerprint)
        if not (out / RUN_FILE).is_file():
            _save_json(dict(fingerprint), out / RUN_FILE)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "predictions.jsonl"
    done = _read_records(records_path)
    keys, pending, seen = [], [], set()
    coco_entries: list[tuple[dict, list[dict]]] = []
    for index in range(len(rows)):
        row = rows[index]
        if row.get("task") not in TASKS:
            raise ValueError(f"row {index}: task must be one of {TASKS}, got {row.get('task')!r}")
        key = f"{row['task']}:{row_key(row, index)}"
        if key in seen:
            raise ValueError(f"row {index}: name {key!r} is used by an earlier row; names must be unique")
        seen.add(key)
        keys.append(key)
        if write_ground_truth:
            _write_ground_truth(row, index, image_names(row, index), out)
            if row["task"] == "sis" and row.get("instances") is not None:
                coco_entries.append(_coco_image(row, index))
        if key not in done:
            pending.append(index)

    task_counts: dict[str, int] = {}
    well_formed = sum(1 for r in done.values() if not r["problems"])
    bar = tqdm(total=len(pending), desc=f"predict {out.name}", disable=not progress, unit="row")
    with records_path.open("a") as log:
        for start in range(0, len(pending), batch_size):
            indices = pending[start : start + batch_size]
            batch = [rows[i] for i in indices]
            texts = generate(batch)
            parsed = [read_answer(text, row["task"]) for text, row in zip(texts, batch)]
            segmented = _segment_batch(segmenter, batch, parsed, instance_score)
            for index, row, text, answer, seg in zip(indices, batch, texts, parsed, segmented):
                names = image_names(row, index)
                record: dict[str, Any] = {
                    "key": keys[index],
                    "task": row["task"],
                    "names": names,
                    "group": row.get("group") or None,
                    "text": text,
                    "think": answer.think,
                    "regions": answer.regions,
                    "instances": answer.instances,
                    "problems": answer.problems,
                }
                if row["task"] == "sis":
                    record["image_id"] = _image_id(row, index)
                    record["detections"] = [
                        {"segmentation": encode_mask(m >= 0.5), "score": s, "expression": k}
                        for m, s, k in seg["instances"]
                    ]
                    masks = [m for m, _, _ in seg["instances"]]
                    if overlays:
                        caption = " | ".join(answer.instances)
                        _save_png(overlay(row["images"][0], masks, caption), out / "overlays" / f"{names[0]}.png")
                else:
                    for name, image, saliency in zip(names, row["images"], seg["maps"]):
                        _save_png(to_png_array(saliency), out / "masks" / f"{name}.png")
                        if overlays:
                            caption = " | ".join(answer.regions)
                            _save_png(overlay(image, [saliency], caption), out / "overlays" / f"{name}.png")
                log.write(json.dumps(record) + "\n")
                log.flush()
                done[keys[index]] = record
                well_formed += not answer.problems
                task_counts[row["task"]] = task_counts.get(row["task"], 0) + 1
            bar.update(len(indices))
    bar.close()

    detections = [
        {"image_id": r["image_id"], "category_id": 1, "segmentation": d["segmentation"], "score": d["score"]}
        for key in keys
        if done[key]["task"] == "sis"
        for r in [done[key]]
        for d in r["detections"]
    ]
    if any(done[key]["task"] == "sis" for key in keys):
        _save_json(detections, out / "results.json")
    if coco_entries:
        _save_json(_coco_ground_truth(coco_entries), out / "annotations.json")
    return PredictionSummary(
        output_dir=out,
        num_rows=len(rows),
        num_predicted=len(pending),
        num_skipped=len(rows) - len(pending),
        num_well_formed=well_formed,
        task_counts=task_counts,
    )


def run_predict(config: PredictConfig, rows: Sequence[dict] | None = None, generate=None, segmenter=None):
    """Load what `config` names (folder of images, segmenter, model: in that order, so that bad input fails before
    the model loads) unless given, then `predict_rows`."""
    from cgpo_trl.saliency.segmenters import load_segmenter

    if rows is None:
        if config.images is None:
            raise ValueError("give --images DIR (or rows from a dataset)")
        rows = rows_from_folder(config.images, config.task)
    if generate is None and config.model_name_or_path is None:
        raise ValueError("give --model_name_or_path")
    fingerprint = run_fingerprint(
        rows,
        answers="model",
        model=config.model_name_or_path,
        generation=config.generation(),
        segmenter=config.segmenter if segmenter is None else segmenter.name,
        segmenter_kwargs=config.segmenter_kwargs if segmenter is None else {},
        instance_score=config.instance_score,
    )
    check_resume(config.output_dir, fingerprint)
    if segmenter is None:
        segmenter = load_segmenter(config.segmenter, **config.segmenter_kwargs)
    if generate is None:
        generate = VLMGenerator.from_pretrained(config.model_name_or_path, device=config.device, **config.generation())
    return predict_rows(
        rows,
        generate,
        segmenter,
        config.output_dir,
        batch_size=config.batch_size,
        instance_score=config.instance_score,
        overlays=config.overlays,
        write_ground_truth=config.write_ground_truth,
        progress=config.progress,
        fingerprint=fingerprint,
    )


def main(argv: list[str] | None = None) -> PredictionSummary:
    from trl import TrlParser

    (config,) = TrlParser((PredictConfig,)).parse_args_and_config(argv)
    summary = run_predict(config)
    print(
        f"{summary.num_predicted} rows predicted, {summary.num_skipped} already done, "
        f"{summary.num_well_formed}/{summary.num_rows} well-formed answers -> {summary.output_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
