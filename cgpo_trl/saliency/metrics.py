"""Saliency metrics: a thin layer over pysodmetrics (SOD, CoSOD) and pycocotools (SIS).

The numbers are meant to equal what the published toolboxes print for the same files, so this module copies their
input path rather than inventing one:

* Masks are read with ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` as uint8, like PySODEvalToolkit. A prediction of
  another size is resized to the ground truth with ``cv2.resize`` — bilinear for SOD (the toolkit's image mode) and
  bicubic for CoSOD (its grouped mode) — then cast to uint8.
* Each pair goes through pysodmetrics with its default normalisation (GT > 128; prediction / 255, then min-max
  stretched when not constant). The metric objects are the toolkit's: ``MAE``, ``Smeasure``,
  ``WeightedFmeasure()`` (beta = 1, as defined by Margolin et al.), ``Emeasure`` and ``FmeasureV2`` with an
  ``FmeasureHandler(beta=0.3, sample_based=True)`` giving the 256-threshold curve and the adaptive value.
* Aggregation is the mean over images; max/mean F- and E-measure are the max/mean of the image-averaged curve.

Images are scored one at a time (`score_pair`) so the work spreads over processes and so CoSOD can be averaged two
ways: ``"image"`` (mean over every image of the dataset, as the CoSOD evaluation toolbox eval-co-sod used by CoCA,
GICD, GCoNet and their successors does — the default, because the published CoSOD tables come from it) and
``"group"`` (mean over groups of per-group means, PySODEvalToolkit's grouped mode). Both keep pysodmetrics' formulas
and the toolkit's resizing, so ``"image"`` is eval-co-sod's averaging, not its exact numbers: measured within 0.004
of it on predictions at the ground truth's size and within 0.02 on resized soft maps (docs/evaluation.md). The
toolkit prints numbers rounded to 3 decimals; these functions return them unrounded.

SIS is COCO mask AP with a single "salient" category: AP (IoU .50:.95), AP50 and AP70, read from
``COCOeval.eval["precision"]`` exactly as ``COCOeval.summarize`` reads AP50.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SOD_METRICS: tuple[str, ...] = ("MAE", "Sm", "wFm", "maxFm", "meanFm", "adpFm", "maxEm", "meanEm", "adpEm")
SIS_METRICS: tuple[str, ...] = ("AP", "AP50", "AP70")
CONVENTIONS: tuple[str, ...] = ("image", "group")
DEFAULT_CONVENTION = "image"
MASK_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Starting a worker process costs ~4 s (imports) and a 400x300 pair ~50 ms to score, so by default each worker gets
# at least this many pairs; an explicit `workers` count is used as given.
MIN_FILES_PER_WORKER = 128


class MetricInputError(ValueError):
    """A metric input (file, folder, JSON) is missing, unreadable or inconsistent; the message names it."""


# --------------------------------------------------------------------------------------------------------------------
# Per-image scores and their aggregation


@dataclass
class ImageScores:
    """Everything pysodmetrics records for one (prediction, ground truth) pair."""

    mae: float
    sm: float
    wfm: float
    adp_fm: float
    adp_em: float
    fm_curve: np.ndarray = field(repr=False)  # 256 thresholds
    em_curve: np.ndarray = field(repr=False)


def score_pair(pred: np.ndarray, gt: np.ndarray) -> ImageScores:
    """Score one uint8 prediction against its uint8 ground truth of the same shape with pysodmetrics."""
    import py_sod_metrics as psm

    if pred.shape != gt.shape:
        raise MetricInputError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise MetricInputError(f"masks must be uint8, got prediction {pred.dtype} and ground truth {gt.dtype}")
    mae, sm, wfm, em = psm.MAE(), psm.Smeasure(), psm.WeightedFmeasure(), psm.Emeasure()
    fm = psm.FmeasureV2()
    fm.add_handler("fm", psm.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3, sample_based=True))
    for metric in (mae, sm, wfm, em, fm):
        metric.step(pred, gt)
    em_res, fm_res = em.get_results()["em"], fm.get_results()["fm"]
    return ImageScores(
        mae=mae.get_results()["mae"],
        sm=sm.get_results()["sm"],
        wfm=wfm.get_results()["wfm"],
        adp_fm=fm_res["adaptive"],
        adp_em=em_res["adp"],
        fm_curve=fm_res["dynamic"],
        em_curve=em_res["curve"],
    )


def _mean_scores(scores: Sequence[ImageScores]) -> dict[str, np.ndarray]:
    # Same reductions as pysodmetrics' get_results: float64 means over the recorded per-image values.
    scalars = {k: np.mean(np.array([getattr(s, k) for s in scores], dtype=np.float64)) for k in _SCALARS}
    curves = {k: np.mean(np.array([getattr(s, k) for s in scores], dtype=np.float64), axis=0) for k in _CURVES}
    return {**scalars, **curves}


_SCALARS = ("mae", "sm", "wfm", "adp_fm", "adp_em")
_CURVES = ("fm_curve", "em_curve")


def _to_table(means: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {
        "MAE": float(means["mae"]),
        "Sm": float(means["sm"]),
        "wFm": float(means["wfm"]),
        "maxFm": float(means["fm_curve"].max()),
        "meanFm": float(means["fm_curve"].mean()),
        "adpFm": float(means["adp_fm"]),
        "maxEm": float(means["em_curve"].max()),
        "meanEm": float(means["em_curve"].mean()),
        "adpEm": float(means["adp_em"]),
    }


def aggregate(scores: Sequence[ImageScores]) -> dict[str, float]:
    """Dataset metrics (keys `SOD_METRICS`) as the mean over images."""
    if not scores:
        raise MetricInputError("no image pairs to evaluate")
    return _to_table(_mean_scores(scores))


def aggregate_groups(groups: Mapping[str, Sequence[ImageScores]], convention: str = DEFAULT_CONVENTION) -> dict:
    """CoSOD metrics: ``"image"`` pools every image; ``"group"`` averages the per-group means over groups."""
    if convention not in CONVENTIONS:
        raise MetricInputError(f"unknown CoSOD convention {convention!r}; expected one of {CONVENTIONS}")
    nonempty = {g: s for g, s in groups.items() if s}
    if not nonempty:
        raise MetricInputError("no image pairs to evaluate")
    if convention == "image":
        return aggregate([s for scores in nonempty.values() for s in scores])
    per_group = [_mean_scores(s) for s in nonempty.values()]
    means = {k: np.mean(np.stack([np.asarray(g[k]) for g in per_group]), axis=0) for k in per_group[0]}
    return _to_table(means)


# --------------------------------------------------------------------------------------------------------------------
# Files


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask as uint8 grayscale the way PySODEvalToolkit does (OpenCV, any bit depth or colour -> 8-bit L).

    Two PNG/TIFF encodings that OpenCV's grayscale read turns black are read for what they hold: a 16-bit file whose
    values fit in 0-255 (an 8-bit map saved at 16 bits) is read as those values, and a file whose colour channels are
    constant while its alpha channel varies (the mask drawn in the alpha channel) is read as its alpha channel.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise MetricInputError(f"mask file not found: {path}")
    if path.suffix.lower() in (".png", ".tif", ".tiff"):
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise MetricInputError(f"cannot read image file {path} (not an image, or corrupt)")
        if raw.ndim == 2 and raw.dtype == np.uint8:
            return raw
        if raw.ndim == 2 and raw.dtype == np.uint16 and raw.max() <= 255:
            return raw.astype(np.uint8)
        if raw.ndim == 3 and raw.shape[2] == 4:
            colour, alpha = raw[..., :3], raw[..., 3]
            if (colour == colour.flat[0]).all() and (alpha != alpha.flat[0]).any():
                return alpha if alpha.dtype == np.uint8 else _to_uint8(alpha)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise MetricInputError(f"cannot read image file {path} (not an image, or corrupt)")
    return mask


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # A 16-bit channel holding 0-255 is already 8-bit data; otherwise scale its full range, as OpenCV does.
    return values.astype(np.uint8) if values.max() <= 255 else (values // 257).astype(np.uint8)


def load_pair(pred_path: str | os.PathLike, gt_path: str | os.PathLike, interpolation: str = "linear"):
    """Read a prediction and its ground truth; resize the prediction to the GT size as the toolkit does."""
    import cv2

    flags = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
    pred, gt = read_mask(pred_path), read_mask(gt_path)
    if pred.shape != gt.shape:
        pred = cv2.resize(pred, dsize=gt.shape[::-1], interpolation=flags[interpolation]).astype(np.uint8)
    return pred, gt


def _score_files(args: tuple[str, str, str]) -> ImageScores:
    pred_path, gt_path, interpolation = args
    try:
        return score_pair(*load_pair(pred_path, gt_path, interpolation))
    except MetricInputError as err:
        raise MetricInputError(f"{err} (pair {pred_path} / {gt_path})") from None


def list_masks(folder: str | os.PathLike, grouped: bool = False) -> dict[str, Path]:
    """Map each mask's key (its stem, or ``group/stem`` when grouped) to its path; one image suffix per key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricInputError(f"not a directory: {folder}")
    parents = sorted(p for p in folder.iterdir() if p.is_dir()) if grouped else [folder]
    found: dict[str, Path] = {}
    for parent in parents:
        for path in sorted(parent.iterdir()):
            if not path.is_file() or path.suffix.lower() not in MASK_SUFFIXES:
                continue
            key = f"{parent.name}/{path.stem}" if grouped else path.stem
            if key in found:
                raise MetricInputError(f"two masks share the name {key!r}: {found[key]} and {path}")
            found[key] = path
    if not found:
        layout = "<group>/<name>.png" if grouped else "<name>.png"
        raise MetricInputError(f"no mask images ({', '.join(MASK_SUFFIXES)}) in {folder} (expected {layout})")
    return found


@dataclass
class MatchedFiles:
    """Prediction / ground-truth pairs keyed by name, and the names found on one side only."""

    pairs: dict[str, tuple[Path, Path]]
    missing: list[str]  # ground truth without a prediction
    extra: list[str]  # prediction without a ground truth


def match_files(pred_dir, gt_dir, grouped: bool = False, allow_missing: bool = False) -> MatchedFiles:
    """Pair predictions with ground truth by file stem; a name on one side only is an error unless allowed."""
    preds, gts = list_masks(pred_dir, grouped), list_masks(gt_dir, grouped)
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    if (missing or extra) and not allow_missing:
        lines = []
        for what, names, where in (("missing predictions", missing, pred_dir), ("extra predictions", extra, gt_dir)):
            if names:
                shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
                verb = "absent from" if what.startswith("missing") else "without ground truth in"
                lines.append(f"{what} ({verb} {where}): {shown}")
        raise MetricInputError("; ".join(lines) + ". Pass --allow_missing to evaluate the common names only.")
    pairs = {k: (preds[k], gts[k]) for k in sorted(set(preds) & set(gts))}
    if not pairs:
        raise MetricInputError(f"no prediction in {pred_dir} matches a ground-truth name in {gt_dir}")
    return MatchedFiles(pairs=pairs, missing=missing, extra=extra)


def score_files(
    pairs: Mapping[str, tuple[Path, Path]],
    interpolation: str = "linear",
    workers: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> dict[str, ImageScores]:
    """Score every pair, in worker processes when there are enough files to pay for starting them."""
    from tqdm.auto import tqdm

    keys = list(pairs)
    jobs = [(str(pairs[k][0]), str(pairs[k][1]), interpolation) for k in keys]
    if workers is None:  # automatic: only as many processes as the file count pays for
        workers = min(os.cpu_count() or 1, 8, len(jobs) // MIN_FILES_PER_WORKER)
    workers = max(1, min(workers, len(jobs)))
    bar = dict(total=len(jobs), desc=desc, disable=not progress, unit="img")
    if workers == 1:
        results = [_score_files(job) for job in tqdm(jobs, **bar)]
    else:
        # spawn, not fork: the caller may hold torch / OpenMP threads (the report runs the model first).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            chunk = max(1, len(jobs) // (workers * 8))
            results = list(tqdm(pool.map(_score_files, jobs, chunksize=chunk), **bar))
    return dict(zip(keys, results))


@dataclass
class EvalResult:
    """Metrics plus how many names were evaluated and how many were found on one side only."""

    metrics: dict[str, float]
    num_images: int
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    num_groups: int | None = None
    convention: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics)
        out["num_images"] = self.num_images
        if self.num_groups is not None:
            out["num_groups"], out["convention"] = self.num_groups, self.convention
        out["num_missing"], out["num_extra"] = len(self.missing), len(self.extra)
        return out


def evaluate_sod(pred_dir, gt_dir, allow_missing: bool = False, workers: int | None = None, progress: bool = True):
    """SOD metrics of a folder of predicted masks against a folder of GT masks (paired by stem)."""
    matched = match_files(pred_dir, gt_dir, grouped=False, allow_missing=allow_missing)
    scores = score_files(matched.pairs, "linear", workers, progress, desc=f"SOD {Path(gt_dir).name}")
    return EvalResult(aggregate(list(scores.values())), len(scores), matched.missing, matched.extra)


def evaluate_cosod(
    pred_dir,
    gt_dir,
    convention: str = DEFAULT_CONVENTION,
    allow_missing: bool = False,
    workers: int | None = None,
    progress: bool = True,
):
    """CoSOD metrics of ``pred_dir/<group>/<name>.png`` against ``gt_dir/<group>/<name>.png``."""
    if convention not in CONVENTIONS:
        raise MetricInputError(f"unknown CoSOD convention {convention!r}; expected one of {CONVENTIONS}")
    matched = match_files(pred_dir, gt_dir, grouped=True, allow_missing=allow_missing)
    scores = score_files(matched.pairs, "cubic", workers, progress, desc=f"CoSOD {Path(gt_dir).name}")
    groups: dict[str, list[ImageScores]] = {}
    for key, value in scores.items():
        groups.setdefault(key.split("/", 1)[0], []).append(value)
    metrics = aggregate_groups(groups, convention)
    return EvalResult(metrics, len(scores), matched.missing, matched.extra, len(groups), convention)


# --------------------------------------------------------------------------------------------------------------------
# SIS (COCO mask AP)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary HxW mask (any dtype; nonzero is foreground), JSON-ready (``counts`` as str)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _load_json(source: str | os.PathLike | Any, what: str):
    if not isinstance(source, (str, os.PathLike)):
        return source, f"<{what} object>"
    path = Path(source)
    if not path.is_file():
        raise MetricInputError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetricInputError(f"{what} file {path} is not valid JSON: {err}") from None


def _check_fields(items: Iterable, required: Sequence[str], where: str, what: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MetricInputError(f"{where}: {what}[{i}] is {type(item).__name__}, expected an object")
        absent = [k for k in required if k not in item]
        if absent:
            raise MetricInputError(f"{where}: {what}[{i}] lacks field(s) {absent}")


def rle_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (the LEB128-like code of pycocotools' `rleFrString`).

    pycocotools decodes whatever it is given, and a malformed string silently becomes a wrong mask; reading the runs
    lets `check_rle` reject it first."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("RLE counts string ends inside a number")
            chunk = counts[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"RLE counts string has the invalid character {chr(counts[position])!r}")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_rle(rle: Mapping, height: int, width: int, where: str = "RLE") -> None:
    """Raise `MetricInputError` unless `rle` is a COCO RLE of a `height` x `width` mask whose runs cover it exactly."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise MetricInputError(f"{where}: segmentation must be a COCO RLE with 'size' and 'counts', got {rle!r:.80}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise MetricInputError(f"{where}: RLE size must be [height, width], got {size!r}")
    if list(size) != [height, width]:
        raise MetricInputError(f"{where}: RLE size {list(size)} differs from the image size {[height, width]}")
    counts = rle["counts"]
    try:
        if isinstance(counts, list):
            runs = [int(v) for v in counts]
        else:
            runs = rle_counts(counts.encode("ascii") if isinstance(counts, str) else bytes(counts))
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        raise MetricInputError(f"{where}: unreadable RLE counts ({err})") from None
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise MetricInputError(
            f"{where}: RLE runs sum to {sum(runs)} (or are negative), not height x width = {height * width}"
        )


def evaluate_sis(results, annotations) -> dict[str, float]:
    """Mask AP, AP50 and AP70 of COCO results (list of {image_id, segmentation, score}) against COCO annotations.

    Both arguments are paths or already-loaded JSON. The ground truth must have exactly one category ("salient");
    results without ``category_id`` get it, results with another one are an error. Every image needs an integer
    ``height`` and ``width``; every segmentation (ground-truth polygons or RLE, result RLE) must fit its image, every
    score must be a finite number, and every ``image_id`` must be listed in the annotations.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_json, gt_where = _load_json(annotations, "annotations")
    res_json, res_where = _load_json(results, "results")
    if not isinstance(gt_json, dict) or not all(k in gt_json for k in ("images", "annotations", "categories")):
        raise MetricInputError(f"{gt_where}: COCO annotations need 'images', 'annotations' and 'categories'")
    _check_fields(gt_json["images"], ("id", "height", "width"), gt_where, "images")
    _check_fields(gt_json["annotations"], ("image_id", "segmentation", "id"), gt_where, "annotations")
    sizes: dict[Any, tuple[int, int]] = {}
    for i, img in enumerate(gt_json["images"]):
        size = tuple(img[k] for k in ("height", "width"))
        if not all(_is_number(v) and v > 0 and float(v).is_integer() for v in size):
            raise MetricInputError(f"{gt_where}: images[{i}] needs positive integer height and width, got {size}")
        if img["id"] in sizes:
            raise MetricInputError(f"{gt_where}: images[{i}] repeats the id {img['id']!r}")
        sizes[img["id"]] = (int(size[0]), int(size[1]))
    if len(gt_json["categories"]) != 1:
        names = [c.get("name") for c in gt_json["categories"]]
        raise MetricInputError(f"{gt_where}: SIS uses one 'salient' category, found {len(names)}: {names}")
    category = gt_json["categories"][0]["id"]
    annotations_out = []
    for i, ann in enumerate(gt_json["annotations"]):
        where = f"{gt_where}: annotations[{i}]"
        if ann["image_id"] not in sizes:
            raise MetricInputError(f"{where} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        annotations_out.append({"iscrowd": 0, **ann, "segmentation": _gt_segmentation(ann, sizes, where)})
    if not isinstance(res_json, list):
        raise MetricInputError(f"{res_where}: COCO results must be a JSON list of detections")
    _check_fields(res_json, ("image_id", "segmentation", "score"), res_where, "results")
    unknown = sorted({r["image_id"] for r in res_json} - set(sizes), key=str)
    if unknown:
        raise MetricInputError(f"{res_where}: image_id(s) {unknown[:10]} are not in the annotations {gt_where}")
    detections = []
    for i, det in enumerate(res_json):
        where = f"{res_where}: results[{i}]"
        if det.get("category_id", category) != category:
            raise MetricInputError(f"{where} has category_id {det['category_id']}, not {category}")
        score = det["score"]
        if not _is_number(score) or not np.isfinite(score):
            raise MetricInputError(f"{where} has score {score!r}; scores must be finite numbers")
        check_rle(det["segmentation"], *sizes[det["image_id"]], where)
        detections.append({**det, "category_id": category})
    if not detections:
        return dict.fromkeys(SIS_METRICS, 0.0)

    from pycocotools import mask as mask_utils

    for ann in annotations_out:
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(ann["segmentation"]))
    gt_json = {**gt_json, "annotations": annotations_out}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        "AP": _nonneg(evaluator.stats[0]),
        "AP50": _nonneg(evaluator.stats[1]),
        "AP70": _precision_at(evaluator, 0.70),
    }


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gt_segmentation(ann: Mapping, sizes: Mapping, where: str) -> dict:
    """A ground-truth segmentation (polygons, uncompressed or compressed RLE) as a checked compressed RLE."""
    from pycocotools import mask as mask_utils

    height, width = sizes[ann["image_id"]]
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if len(polygons) != len(segmentation) or not polygons:
            raise MetricInputError(f"{where}: polygon segmentation must be a non-empty list of coordinate lists")
        for polygon in polygons:
            if len(polygon) < 6 or len(polygon) % 2 or not all(_is_number(v) and np.isfinite(v) for v in polygon):
                raise MetricInputError(f"{where}: a polygon needs at least 3 finite (x, y) pairs, got {polygon!r:.80}")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    check_rle(segmentation, height, width, where)
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _nonneg(value: float) -> float:
    # COCOeval reports -1 when nothing could be measured (no ground-truth instance at all).
    return float(value) if value >= 0 else 0.0


def _precision_at(evaluator, iou: float) -> float:
    """Mean precision at one IoU threshold, area 'all', the largest maxDets — COCOeval's own AP50 reduction."""
    params = evaluator.params
    (index,) = np.flatnonzero(np.isclose(params.iouThrs, iou))
    area = params.areaRngLbl.index("all")
    precision = evaluator.eval["precision"][index, :, :, area, -1]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Formatting


def format_row(metrics: Mapping[str, float], keys: Sequence[str], digits: int = 3) -> str:
    """One markdown row fragment; the toolboxes print 3 decimals."""
    return " | ".join(f"{metrics[k]:.{digits}f}" for k in keys)


__all__: list[str] = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "SIS_METRICS",
    "SOD_METRICS",
    "EvalResult",
    "ImageScores",
    "MatchedFiles",
    "MetricInputError",
    "aggregate",
    "aggregate_groups",
    "check_rle",
    "encode_mask",
    "evaluate_cosod",
    "evaluate_sis",
    "evaluate_sod",
    "list_masks",
    "load_pair",
    "match_files",
    "read_mask",
    "score_files",
    "score_pair",
]
