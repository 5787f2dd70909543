"""Measure how far `python -m cgpo_trl.eval cosod --convention image` is from the eval-co-sod toolbox.

    git clone https://github.com/zzhanghub/eval-co-sod /tmp/eval-co-sod
    python docs/measurements/cosod_toolbox_gap.py --toolbox /tmp/eval-co-sod

Both tools score the same folders: ground truth from the synthetic CoSOD benchmark (40 groups of 3-6 images,
128 x 128) and three kinds of predictions: binary maps (the ground truth shifted by 2 px, as a binary segmenter
gives), soft maps at the ground truth's size (blurred, noisy, not spanning 0-255), and the same soft maps at 70% of
the size, which each tool resizes its own way (cv2 bicubic here, PIL bilinear there). The toolbox needs only
`torchvision.transforms.ToTensor` and `Compose`, which are stood in for by their documented meaning on 8-bit grey
images (uint8 / 255 as a 1 x H x W float tensor), so it runs without torchvision. The result is written as JSON
(`cosod_toolbox_gap.json` next to this script) and quoted in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

METRICS = {"MAE": "MAE", "Sm": "Sm", "maxFm": "MaxFm", "meanFm": "MeanFm", "maxEm": "MaxEm", "meanEm": "MeanEm"}


def import_toolbox(folder: Path):
    """eval-co-sod's `EvalDataset` and `Eval_thread`, imported with the torchvision stand-in (removed afterwards, so
    that libraries probing for torchvision are not misled)."""
    import torch

    transforms = types.ModuleType("torchvision.transforms")

    class ToTensor:
        def __call__(self, image):
            array = np.asarray(image, dtype=np.float32) / 255.0
            return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, value):
            for step in self.steps:
                value = step(value)
            return value

    transforms.ToTensor, transforms.Compose = ToTensor, Compose
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})
    sys.path.insert(0, str(folder))
    try:
        from dataloader import EvalDataset
        from evaluator import Eval_thread
    finally:
        sys.path.remove(str(folder))
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    return EvalDataset, Eval_thread


def write_folders(root: Path, seed: int = 0) -> list[str]:
    from cgpo_trl.data.synthetic import generate_synthetic

    rng = np.random.default_rng(seed)
    rows = generate_synthetic(task="cosod", num_samples=40, split="test", image_size=128, group_size=(3, 6), seed=seed)
    variants = ["binary", "soft", "soft_resized"]
    for row in rows:
        for j, mask in enumerate(row["masks"]):
            gt = np.asarray(mask.convert("L"))
            name = f"{row['group']}/{j:03d}.png"
            (root / "gt" / "set" / row["group"]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(gt).save(root / "gt" / "set" / name)
            shifted = np.roll(gt, (2, 2), axis=(0, 1))
            soft = np.asarray(Image.fromarray(gt).filter(ImageFilter.GaussianBlur(3)), dtype=np.float64)
            soft = np.clip(20 + 0.75 * soft + rng.normal(0, 12, soft.shape), 0, 255).astype(np.uint8)
            small = Image.fromarray(soft).resize((90, 90), Image.Resampling.BILINEAR)
            for variant, image in zip(variants, (Image.fromarray(shifted), Image.fromarray(soft), small)):
                (root / "pred" / variant / "set" / row["group"]).mkdir(parents=True, exist_ok=True)
                image.save(root / "pred" / variant / "set" / name)
    return variants


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolbox", type=Path, required=True, help="a clone of zzhanghub/eval-co-sod")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args(argv)
    import torch

    from cgpo_trl.saliency.metrics import evaluate_cosod

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = write_folders(root)
        EvalDataset, Eval_thread = import_toolbox(args.toolbox)
        for variant in variants:
            pred, gt = root / "pred" / variant / "set", root / "gt" / "set"
            ours = evaluate_cosod(pred, gt, convention="image", workers=1, progress=False).to_json()
            thread = Eval_thread(EvalDataset(str(pred), str(gt)), variant, "set", str(root), cuda=False)
            thread.run()
            theirs = torch.load(root / "Detail" / f"set_{variant}.pth", weights_only=False)
            results[variant] = {
                key: {
                    "cgpo_trl": round(ours[key], 4),
                    "eval-co-sod": round(float(theirs[name]), 4),
                    "difference": round(ours[key] - float(theirs[name]), 4),
                }
                for key, name in METRICS.items()
            }
            results[variant]["num_images"] = ours["num_images"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
