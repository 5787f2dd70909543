"""A folder of images -> saliency masks and overlays, with a trained Saliency-R1 checkpoint.

    python examples/predict_folder.py --model_name_or_path outputs/demo/cgpo --images my_images/ \
        --output_dir outputs/my_predictions --task sod --segmenter shapes --instruction short
    python examples/predict_folder.py --model_name_or_path outputs/saliency_r1_7b/cgpo --images photos/ \
        --output_dir outputs/photos --task sis --segmenter evf-sam \
        --segmenter_kwargs '{"checkpoint": "YxZhang/evf-sam-multitask", "device": "cuda"}' --device cuda

`--images` holds one image per file (SOD, SIS) or one sub-folder per group of images (CoSOD); file and group names
are kept as they are (spaces included). The output folder gets `masks/` (grey-level saliency maps, the layout
`python -m cgpo_trl.eval` reads), `overlays/` (each image with its mask tinted and the model's expressions as a
caption), `predictions.jsonl` (the generated answers) and, for SIS, `results.json` (COCO instance results). Rerunning
into the same folder resumes; a folder holding predictions made with another model, segmenter or instruction is
refused. Use the instruction style the checkpoint was trained with: `short` for the CPU demo's models, `full`
(default) for the Qwen2.5-VL recipes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cgpo_trl.pipeline import INSTRUCTION_STYLES, task_prompt
from cgpo_trl.predict import VLMGenerator, check_resume, predict_rows, rows_from_folder, run_fingerprint
from cgpo_trl.saliency.prompts import TASKS
from cgpo_trl.saliency.segmenters import list_segmenters, load_segmenter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="checkpoint folder (or hub id)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (CoSOD: of group folders)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--task", choices=TASKS, default="sod")
    parser.add_argument("--instruction", choices=INSTRUCTION_STYLES, default="full")
    parser.add_argument("--segmenter", default="evf-sam", help=f"one of {list_segmenters()}")
    parser.add_argument("--segmenter_kwargs", type=json.loads, default={}, help="backend options as JSON")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    rows = rows_from_folder(args.images, args.task)
    rows = rows.map(
        lambda row: {"prompt": task_prompt(row["task"], len(row["names"]), args.instruction)},
        desc="prompts",
    )
    generation = {"dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
    fingerprint = run_fingerprint(
        rows,
        answers="model",
        model=args.model_name_or_path,
        generation=generation,
        segmenter=args.segmenter,
        segmenter_kwargs=args.segmenter_kwargs,
        instance_score="segmenter",
    )
    check_resume(args.output_dir, fingerprint)  # before anything loads
    segmenter = load_segmenter(args.segmenter, **args.segmenter_kwargs)
    generate = VLMGenerator.from_pretrained(args.model_name_or_path, device=args.device, **generation)
    summary = predict_rows(
        rows, generate, segmenter, args.output_dir, batch_size=args.batch_size, fingerprint=fingerprint
    )
    print(
        f"{summary.num_predicted} rows predicted ({summary.num_well_formed}/{summary.num_rows} well-formed answers): "
        f"masks in {summary.masks_dir}, overlays in {args.output_dir / 'overlays'}"
    )
    return summary


if __name__ == "__main__":
    main()
