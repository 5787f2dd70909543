"""Command-line evaluation: ``python -m cgpo_trl.eval {sod,cosod,sis,report} ...``.

* ``sod --pred DIR --gt DIR [--json OUT]``: SOD metrics (``MAE, Sm, wFm, maxFm, meanFm, adpFm, maxEm, meanEm,
  adpEm``) of predicted masks against ground truth, paired by file stem.
* ``cosod --pred DIR --gt DIR [--convention image|group]``: the same over ``DIR/<group>/<name>.png``; ``image``
  (default) averages over all images like the CoSOD evaluation toolbox, ``group`` averages per-group means.
* ``sis --pred RESULTS.json --gt ANNOTATIONS.json``: COCO mask ``AP, AP50, AP70``.
* ``report --config recipes/eval/<x>.yaml``: `cgpo_trl.predict` then the metrics over a list of datasets, written
  as ``report.md`` and ``report.json`` in the shape of the paper's tables (SOD benchmarks x metrics, SIS AP / AP50 /
  AP70, CoSOD benchmarks x metrics) plus ``examples.png``, a grid of prediction overlays (see `ReportConfig`).

Metric details (file reading, resizing, aggregation) are in `cgpo_trl.saliency.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cgpo_trl.saliency.metrics import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    SIS_METRICS,
    SOD_METRICS,
    MetricInputError,
    evaluate_cosod,
    evaluate_sis,
    evaluate_sod,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cgpo_trl.eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p: argparse.ArgumentParser, folders: bool) -> None:
        p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
        if folders:
            p.add_argument(
                "--allow_missing",
                action="store_true",
                help="evaluate the names found on both sides and count the others, instead of failing",
            )
            p.add_argument(
                "--workers",
                type=int,
                default=None,
                help="scoring processes (default: CPU count, at most 8 and one per 128 files)",
            )
            p.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    sod = sub.add_parser("sod", help="salient object detection metrics on mask folders")
    sod.add_argument("--pred", type=Path, required=True, help="folder of predicted masks <name>.png")
    sod.add_argument("--gt", type=Path, required=True, help="folder of ground-truth masks <name>.png")
    add_common(sod, folders=True)

    cosod = sub.add_parser("cosod", help="co-salient object detection metrics on grouped mask folders")
    cosod.add_argument("--pred", type=Path, required=True, help="folder of predicted masks <group>/<name>.png")
    cosod.add_argument("--gt", type=Path, required=True, help="folder of ground-truth masks <group>/<name>.png")
    cosod.add_argument(
        "--convention",
        choices=CONVENTIONS,
        default=DEFAULT_CONVENTION,
        help="'image': mean over all images, as the eval-co-sod toolbox averages (default; pysodmetrics formulas and "
        "cv2 resizing, so up to 0.02 from that toolbox on resized soft maps, see docs/evaluation.md); 'group': mean "
        "of per-group means (PySODEvalToolkit)",
    )
    add_common(cosod, folders=True)

    sis = sub.add_parser("sis", help="salient instance segmentation mask AP (COCO)")
    sis.add_argument("--pred", type=Path, required=True, help="COCO results JSON (image_id, segmentation, score)")
    sis.add_argument("--gt", type=Path, required=True, help="COCO annotations JSON with one category")
    add_common(sis, folders=False)

    report = sub.add_parser("report", help="predict and evaluate a list of benchmarks from a YAML config")
    report.add_argument("--config", type=Path, required=True, help="recipes/eval/<x>.yaml")
    report.add_argument("--output_dir", type=Path, default=None, help="override the config's output_dir")
    return parser


def _print_metrics(metrics: dict, keys) -> None:
    print(" | ".join(f"{k:>7s}" for k in keys))
    print(" | ".join(f"{metrics[k]:7.3f}" for k in keys))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            return run_report(load_report_config(args.config, output_dir=args.output_dir))
        if args.command == "sis":
            out = evaluate_sis(args.pred, args.gt)
            keys = SIS_METRICS
        else:
            common = dict(allow_missing=args.allow_missing, workers=args.workers, progress=not args.no_progress)
            if args.command == "sod":
                result = evaluate_sod(args.pred, args.gt, **common)
            else:
                result = evaluate_cosod(args.pred, args.gt, convention=args.convention, **common)
            out, keys = result.to_json(), SOD_METRICS
            if result.missing or result.extra:
                print(
                    f"evaluated {result.num_images} images; {len(result.missing)} without prediction, "
                    f"{len(result.extra)} without ground truth",
                    file=sys.stderr,
                )
    except (MetricInputError, ReportConfigError) as err:
        parser.exit(2, f"error: {err}\n")
    _print_metrics(out, keys)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Benchmark report

TASK_TITLES = {
    "sod": "Salient object detection",
    "sis": "Salient instance segmentation",
    "cosod": "Co-salient object detection",
}
LOWER_IS_BETTER = {"MAE"}


class ReportConfigError(ValueError):
    """The report cannot run as configured (config file, a dataset, the segmenter or an output folder that holds
    another run's predictions); the message names the file, field or folder."""


@dataclass
class ReportDataset:
    """One benchmark of a report: a `cgpo_trl.data.benchmarks.load_saliency_dataset` name and its options."""

    name: str
    """`synthetic-sod|sis|cosod` or a public benchmark (`duts-te`, `ecssd`, `ilso`, `coca`, ...)."""
    data_dir: str | None = None
    label: str | None = None
    """Name shown in the tables (default: `name`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Passed on to `load_saliency_dataset`: `split`, and `SyntheticConfig` fields for synthetic sets or `skip_bad`,
    `annotations`, `layout`, `max_group_size` for benchmarks; any other key is an error naming it."""
    allow_missing: bool = False


@dataclass
class ReportConfig:
    """What `python -m cgpo_trl.eval report --config X.yaml` runs. Every `PredictConfig` field may appear."""

    output_dir: str
    datasets: list[ReportDataset]
    predict: dict[str, Any] = field(default_factory=dict)
    """`PredictConfig` fields (model_name_or_path, segmenter, segmenter_kwargs, batch_size, ...)."""
    answers: str = "model"
    """`model` generates answers; `reference` uses each row's `solution` (the segmenter's ceiling on data that has
    reference answers, e.g. the synthetic sets)."""
    cosod_convention: str = DEFAULT_CONVENTION
    """`image` (eval-co-sod's averaging over all images; within 0.004 of that toolbox at the GT's size, 0.02 on
    resized soft maps, measured in docs/evaluation.md) or `group` (PySODEvalToolkit's mean of group means)."""
    examples_per_dataset: int = 4
    workers: int | None = None


def load_report_config(path: str | Path, output_dir: str | Path | None = None) -> ReportConfig:
    """Read a report YAML: top-level `ReportConfig` fields, and `PredictConfig` fields (collected into `predict`)."""
    import yaml

    from cgpo_trl.predict import PredictConfig

    path = Path(path)
    if not path.is_file():
        raise ReportConfigError(f"report config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ReportConfigError(f"{path}: expected a mapping of fields at the top level")
    own = {f.name for f in fields(ReportConfig)} - {"predict"}
    predict_fields = {f.name for f in fields(PredictConfig)} - {"output_dir", "images", "task"}
    unknown = sorted(set(raw) - own - predict_fields)
    if unknown:
        raise ReportConfigError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(own | predict_fields)}")
    if output_dir is not None:
        raw["output_dir"] = str(output_dir)
    for required in ("output_dir", "datasets"):
        if not raw.get(required):
            raise ReportConfigError(f"{path}: field {required!r} is required")
    datasets = []
    dataset_fields = {f.name for f in fields(ReportDataset)}
    for i, entry in enumerate(raw["datasets"]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ReportConfigError(f"{path}: datasets[{i}] must be a mapping with a 'name'")
        options = {k: v for k, v in entry.items() if k not in dataset_fields}
        datasets.append(
            ReportDataset(
                **{k: v for k, v in entry.items() if k in dataset_fields - {"options"}},
                options={**options, **(entry.get("options") or {})},
            )
        )
    config = ReportConfig(
        output_dir=str(raw["output_dir"]),
        datasets=datasets,
        predict={k: v for k, v in raw.items() if k in predict_fields},
        **{k: v for k, v in raw.items() if k in own - {"output_dir", "datasets"}},
    )
    if config.answers not in ("model", "reference"):
        raise ReportConfigError(f"{path}: answers must be 'model' or 'reference', got {config.answers!r}")
    if config.cosod_convention not in CONVENTIONS:
        raise ReportConfigError(f"{path}: cosod_convention must be one of {CONVENTIONS}")
    labels = [d.label or d.name for d in datasets]
    if len(set(labels)) != len(labels):
        raise ReportConfigError(f"{path}: dataset labels must be unique, got {labels}")
    return config


def _dataset_task(name: str) -> str:
    from cgpo_trl.data.benchmarks import get_benchmark_spec

    return name.removeprefix("synthetic-") if name.startswith("synthetic-") else get_benchmark_spec(name).task


def _source_files(dataset, column: str) -> list[list[str | None]]:
    """The file each image / mask of a benchmark row was loaded from (None for in-memory rows)."""
    from datasets import Image as ImageFeature
    from datasets import List

    if column not in dataset.column_names:
        return [[] for _ in range(len(dataset))]
    raw = dataset.select_columns([column]).cast_column(column, List(ImageFeature(decode=False)))
    return [[item["path"] for item in row] for row in raw[column]]


def _with_names_and_gt(dataset, task: str):
    """Name predictions after the benchmark's files and find the GT folder to score against (toolkit-exact).

    Returns the dataset (with a `names` column when the files are known) and the GT root, or None when the ground
    truth only exists in memory (synthetic rows) and `predict` has to write it.
    """
    images, masks = _source_files(dataset, "images"), _source_files(dataset, "masks")
    if not images or any(p is None for row in images for p in row):
        return dataset, None
    names = [[Path(p).stem for p in row] for row in images]
    dataset = dataset.add_column("names", names)
    if task == "sis" or any(p is None for row in masks for p in row):
        return dataset, None
    levels = 2 if task == "cosod" else 1
    roots = {Path(p).parents[levels - 1] for row in masks for p in row}
    mask_names = [[Path(p).stem for p in row] for row in masks]
    if len(roots) != 1 or mask_names != names:
        return dataset, None
    return dataset, roots.pop()


def run_report(config: ReportConfig) -> dict:
    """Predict and score every dataset of `config`; write report.md, report.json and examples.png.

    Every dataset is loaded and checked, and every output folder is checked against the settings its predictions
    were made with (`cgpo_trl.predict.run_fingerprint`), before the segmenter and then the model are loaded: bad
    input fails in seconds, and a folder holding another run's predictions is refused instead of reused.
    """
    from cgpo_trl.data.benchmarks import load_saliency_dataset
    from cgpo_trl.data.rows import check_name
    from cgpo_trl.predict import PredictConfig, VLMGenerator, check_resume, predict_rows, run_fingerprint
    from cgpo_trl.saliency.segmenters import load_segmenter

    out = Path(config.output_dir)
    predict_config = PredictConfig(output_dir=str(out), **config.predict)
    if config.answers == "model" and predict_config.model_name_or_path is None:
        raise ReportConfigError("model_name_or_path is required unless answers: reference")

    prepared = []
    for entry in config.datasets:
        label = entry.label or entry.name
        try:
            target = out / check_name(label, "dataset label")
            task = _dataset_task(entry.name)
            dataset = load_saliency_dataset(entry.name, entry.data_dir, **entry.options)
            dataset, gt_root = _with_names_and_gt(dataset, task)
            if config.answers == "reference" and not all(dataset["solution"]):
                raise ReportConfigError("answers: reference needs a `solution` in every row")
            fingerprint = run_fingerprint(
                dataset,
                answers=config.answers,
                model=predict_config.model_name_or_path,
                generation=predict_config.generation(),
                segmenter=predict_config.segmenter,
                segmenter_kwargs=predict_config.segmenter_kwargs,
                instance_score=predict_config.instance_score,
            )
            check_resume(target, fingerprint)
        except ValueError as err:  # BenchmarkError, ResumeError, a bad name
            raise ReportConfigError(f"dataset {label}: {err}") from None
        prepared.append((entry, label, task, dataset, gt_root, target, fingerprint))

    try:
        segmenter = load_segmenter(predict_config.segmenter, **predict_config.segmenter_kwargs)
    except (TypeError, ValueError) as err:
        raise ReportConfigError(f"segmenter {predict_config.segmenter!r}: {err}") from None
    if config.answers == "reference":
        generate, model_label = (lambda rows: [row["solution"] for row in rows]), "reference answers"
    else:
        generate = VLMGenerator.from_pretrained(
            predict_config.model_name_or_path, device=predict_config.device, **predict_config.generation()
        )
        model_label = predict_config.model_name_or_path

    tables: dict[str, dict[str, dict]] = {"sod": {}, "sis": {}, "cosod": {}}
    examples: list[tuple[str, list[Path]]] = []
    for entry, label, task, dataset, gt_root, target, fingerprint in prepared:
        summary = predict_rows(
            dataset,
            generate,
            segmenter,
            target,
            batch_size=predict_config.batch_size,
            instance_score=predict_config.instance_score,
            overlays=predict_config.overlays,
            write_ground_truth=gt_root is None,
            progress=predict_config.progress,
            fingerprint=fingerprint,
        )
        common = dict(allow_missing=entry.allow_missing, workers=config.workers, progress=predict_config.progress)
        gt = gt_root or summary.gt_dir
        if task == "sis":
            metrics = evaluate_sis(summary.results_json, summary.annotations_json)
            metrics["num_images"] = summary.num_rows
        elif task == "sod":
            metrics = evaluate_sod(summary.masks_dir, gt, **common).to_json()
        else:
            metrics = evaluate_cosod(summary.masks_dir, gt, convention=config.cosod_convention, **common).to_json()
        metrics["well_formed"] = summary.num_well_formed / max(summary.num_rows, 1)
        tables[task][label] = metrics
        overlays = sorted((target / "overlays").rglob("*.png"))[: config.examples_per_dataset]
        if overlays:
            examples.append((label, overlays))

    report = {
        "model": model_label,
        "segmenter": predict_config.segmenter,
        "cosod_convention": config.cosod_convention,
        "instance_score": predict_config.instance_score,
        **{task: rows for task, rows in tables.items() if rows},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    if examples:
        example_grid(examples).save(out / "examples.png")
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """Markdown tables shaped like the paper's: one per task, benchmarks as rows, metrics as columns."""
    lines = [
        "# Saliency-R1 evaluation",
        "",
        f"Model: `{report['model']}` · segmenter: `{report['segmenter']}` · SIS score: {report['instance_score']} · "
        f"CoSOD average: over {'all images' if report['cosod_convention'] == 'image' else 'groups'}",
        "",
    ]
    for task, keys in (("sod", SOD_METRICS), ("sis", SIS_METRICS), ("cosod", SOD_METRICS)):
        rows = report.get(task)
        if not rows:
            continue
        header = [f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys]
        lines += [f"## {TASK_TITLES[task]}", ""]
        lines += ["| Dataset | images | " + " | ".join(header) + " | well-formed |"]
        lines += ["|---|---:|" + "---:|" * len(keys) + "---:|"]
        for label, metrics in rows.items():
            values = " | ".join(f"{metrics[k]:.3f}" for k in keys)
            lines.append(f"| {label} | {metrics['num_images']} | {values} | {metrics['well_formed']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def example_grid(examples: list[tuple[str, list[Path]]], tile: int = 192):
    """One row of overlay tiles per dataset, the dataset's name above its row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    columns = max(len(paths) for _, paths in examples)
    tiles = [[Image.open(p).convert("RGB") for p in paths] for _, paths in examples]
    heights = [max(round(im.height * tile / im.width) for im in row) for row in tiles]
    grid = Image.new("RGB", (columns * (tile + 4) + 4, sum(h + 24 for h in heights) + 4), "white")
    draw, y = ImageDraw.Draw(grid), 4
    for (label, _), row, height in zip(examples, tiles, heights):
        draw.text((6, y + 2), label, fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im.resize((tile, round(im.height * tile / im.width))), (4 + c * (tile + 4), y + 20))
        y += height + 24
    return grid


if __name__ == "__main__":
    main()
