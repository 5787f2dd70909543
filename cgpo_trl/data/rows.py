"""The row schema every saliency dataset shares (see the data contract in DESIGN.md), and COCO RLE helpers.

Synthetic rows and rows loaded from the public benchmarks have the same columns and Arrow types, so datasets of
either kind can be concatenated, saved and fed to the same rewards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from datasets import Features, Image, List, Value

# One conversation turn: image blocks carry only `type`; `text` is null for them.
MESSAGE = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
RLE = {"size": List(Value("int64")), "counts": Value("string")}

ROW_FEATURES = Features(
    {
        "prompt": List(MESSAGE),
        "images": List(Image(mode="RGB")),
        "task": Value("string"),
        "masks": List(Image(mode="L")),
        "instances": List(RLE),
        "group": Value("string"),
        "solution": Value("string"),
    }
)
"""Columns of the data contract. `masks` holds SOD / CoSOD ground truth aligned with `images` (empty for SIS);
`instances` holds SIS ground truth (empty otherwise); `solution` is empty when no reference answer is known."""


def check_name(name: object, what: str) -> str:
    """Return `name` unchanged if it can be one path component (a file stem or a group folder), else raise.

    Names travel from the dataset on disk to prediction files and back to the ground truth unchanged, so spaces and
    any other character a file system accepts are kept; only what would leave or break the folder is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if name in (".", "..") or "\0" in name or any(sep in name for sep in separators):
        raise ValueError(f"{what} {name!r} is not a valid file or folder name (path separator, '..' or NUL)")
    return name


def encode_instances(masks: np.ndarray | Sequence[np.ndarray]) -> list[dict]:
    """Encode binary HxW masks (a sequence, or an HxWxN stack) as compressed COCO RLE with text `counts`."""
    from pycocotools import mask as mask_utils

    stack = np.asarray(masks)
    if stack.ndim == 2:
        stack = stack[..., None]
    elif not isinstance(masks, np.ndarray):
        stack = np.moveaxis(stack, 0, -1)  # a sequence of HxW masks -> HxWxN
    if stack.shape[-1] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(stack > 0, dtype=np.uint8))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


def decode_instance(rle: dict) -> np.ndarray:
    """Decode one RLE dict (text or bytes `counts`) into a bool HxW mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def annotation_to_rle(segmentation, height: int, width: int) -> dict:
    """Turn a COCO `segmentation` (polygons, uncompressed RLE or compressed RLE) into one compressed RLE dict."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        total = sum(segmentation["counts"])
        if total != height * width:
            raise ValueError(f"uncompressed RLE counts sum to {total}, not height x width = {height * width}")
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        from ..saliency.metrics import check_rle

        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        if [int(s) for s in rle["size"]] == [height, width]:
            check_rle(rle, height, width, "compressed RLE")  # pycocotools would decode garbage into a wrong mask
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    if [int(s) for s in rle["size"]] != [height, width]:
        raise ValueError(f"segmentation size {list(rle['size'])} differs from the image size {[height, width]}")
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
