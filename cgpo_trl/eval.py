"""Command-line evaluation: ``python -m cgpo_trl.eval {sod,cosod,sis} ...``.

* ``sod --pred DIR --gt DIR [--json OUT]``: SOD metrics (``MAE, Sm, wFm, maxFm, meanFm, adpFm, maxEm, meanEm,
  adpEm``) of predicted masks against ground truth, paired by file stem.
* ``cosod --pred DIR --gt DIR [--convention image|group]``: the same over ``DIR/<group>/<name>.png``; ``image``
  (default) averages over all images like the CoSOD evaluation toolbox, ``group`` averages per-group means.
* ``sis --pred RESULTS.json --gt ANNOTATIONS.json``: COCO mask ``AP, AP50, AP70``.

Metric details (file reading, resizing, aggregation) are in `cgpo_trl.saliency.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
                "--workers", type=int, default=None, help="scoring processes (default: CPU count, at most 8)"
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
        help="'image': mean over all images (eval-co-sod toolbox, default); 'group': mean of per-group means "
        "(PySODEvalToolkit)",
    )
    add_common(cosod, folders=True)

    sis = sub.add_parser("sis", help="salient instance segmentation mask AP (COCO)")
    sis.add_argument("--pred", type=Path, required=True, help="COCO results JSON (image_id, segmentation, score)")
    sis.add_argument("--gt", type=Path, required=True, help="COCO annotations JSON with one category")
    add_common(sis, folders=False)

    return parser


def _print_metrics(metrics: dict, keys) -> None:
    print(" | ".join(f"{k:>7s}" for k in keys))
    print(" | ".join(f"{metrics[k]:7.3f}" for k in keys))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
    except MetricInputError as err:
        parser.exit(2, f"error: {err}\n")
    _print_metrics(out, keys)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
