"""`make demo`: the whole Saliency-R1 pipeline on the embedded synthetic benchmark, offline, on a CPU.

    python recipes/demo.py --out outputs/demo                  # ~12 minutes on 2 cores (README: measured)
    python recipes/demo.py --out /tmp/demo --quick             # a few steps of everything (tests)

1. build the tiny Qwen2.5-VL (random init, 0.66 M parameters; `model_name_or_path: tiny-random`);
2. SFT on synthetic reference answers with `recipes/saliency/demo_cpu_sft.yaml` (stops after `--sft_minutes`);
3. CGPO from the SFT checkpoint with `recipes/saliency/demo_cpu.yaml` (`--rl_steps` steps);
4. GRPO (`--grpo_generations` per prompt) from the same SFT checkpoint with the same YAML and the same number of
   generated completions (same steps, same completions per step, so fewer prompts per step);
5. evaluate every stage on a held-out synthetic split (`validation`, its own random stream) with greedy decoding,
   the `shapes` segmenter and the standard metrics, each with its standard error;
6. write `OUT/results.json` (per stage and metric: `<metric>`, `<metric>_se` and `<metric>_n`, the rows the
   standard error is taken over), `OUT/results.md` (the table, and each stage against the one it started from with
   the paired standard error of the difference), `OUT/curves.png` (SFT loss; RL reward and the collapse
   diagnostics) and `OUT/overlays.png` (the held-out SOD images CGPO fixed the most).

The stages run the same code as `recipes/sft_saliency.py` / `recipes/cgpo_saliency.py`, from the same YAML files;
the options below only override a few of their fields.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

RECIPES = Path(__file__).resolve().parent / "saliency"
RESULT_KEYS = ("reward", "Sm", "MAE", "sis_AP", "cosod_Sm")
LOWER_IS_BETTER = ("MAE",)
DIAGNOSTICS = ("saliency/distinct_expressions", "saliency/colour_entropy", "saliency/shape_entropy")
AP_REPLICATES = 200


class TimeLimit(TrainerCallback):
    """Stop training (and save) once `minutes` of wall time have passed: the demo's budget is time, not steps."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--sft_config", type=Path, default=RECIPES / "demo_cpu_sft.yaml")
    parser.add_argument("--rl_config", type=Path, default=RECIPES / "demo_cpu.yaml")
    parser.add_argument("--sft_minutes", type=float, default=6.0, help="SFT wall-time budget")
    parser.add_argument("--sft_steps", type=int, default=None, help="SFT step cap (default: the YAML's max_steps)")
    parser.add_argument("--rl_steps", type=int, default=None, help="RL steps (default: the YAML's max_steps)")
    parser.add_argument(
        "--rl_minutes", type=float, default=6.0, help="wall-time cap of the CGPO run (a safety net: it stops by steps)"
    )
    parser.add_argument(
        "--grpo_generations", type=int, default=4, help="GRPO group size for the comparison row (0: no GRPO row)"
    )
    parser.add_argument("--eval_samples", type=int, default=600, help="held-out rows per task (CoSOD: groups)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps and a small eval: checks the plumbing")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser


def stage_args(config: Path, extra: list[str], dataclass_types):
    from cgpo_trl.pipeline import parse_args

    return parse_args(dataclass_types, ["--config", str(config), *extra])


def eval_rows(script_args, num_samples: int) -> dict[str, list[dict]]:
    """Held-out rows: the training mixture's synthetic components, re-drawn from the `validation` stream, decoded
    once (every stage reads the same rows)."""
    from dataclasses import replace

    from cgpo_trl.pipeline import build_mixture

    per_task = {}
    for spec in script_args.datasets:
        if spec.task in per_task:
            continue
        options = {k: v for k, v in spec.options.items() if k != "single_object_fraction"}  # full difficulty
        held_out = replace(spec, split="validation", num_samples=num_samples, weight=1.0, options=options)
        rows = build_mixture([held_out], instruction=script_args.instruction)
        per_task[spec.task] = [rows[i] for i in range(len(rows))]
    return per_task


# ---------------------------------------------------------------------------------------------- statistics
def mean_se(values, clusters=None) -> tuple[float, float]:
    """Mean and its standard error; with `clusters` (one label per value, e.g. the CoSOD group of each image) the
    cluster-robust standard error of the pooled mean, since images of one group are not independent."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if clusters is None:
        return mean, float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    labels = sorted(set(clusters))
    if len(labels) < 2:
        return mean, math.nan
    index = {label: k for k, label in enumerate(labels)}
    residual = np.zeros(len(labels))
    np.add.at(residual, [index[c] for c in clusters], values - mean)
    g = len(labels)
    return mean, float(math.sqrt(g / (g - 1) * np.sum(residual**2)) / values.size)


def ap_replicates(results_json: Path, annotations_json: Path, replicates: int, seed: int) -> tuple[float, np.ndarray]:
    """COCO mask AP (area all, 100 detections, IoU .50:.95) and its value on `replicates` bootstrap resamples of the
    images. pycocotools matches each image once (`evaluate`); a resample then only re-runs `accumulate` over the
    resampled per-image matches. Resamples depend on `seed` and the image count alone, so two stages evaluated on
    the same images share them (a paired bootstrap)."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = json.loads(Path(annotations_json).read_text())
    detections = json.loads(Path(results_json).read_text())
    if not detections:
        return 0.0, np.zeros(replicates)
    category = gt["categories"][0]["id"]
    for annotation in gt["annotations"]:
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(mask_utils.area(annotation["segmentation"])))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{**d, "category_id": category} for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
    per_image = evaluator.evalImgs  # [category][area range][image], flattened
    num_images, num_areas = len(evaluator.params.imgIds), len(evaluator.params.areaRng)
    all_area = evaluator.params.areaRngLbl.index("all")

    def ap(order) -> float:
        evaluator.evalImgs = [per_image[a * num_images + i] for a in range(num_areas) for i in order]
        evaluator.params.imgIds = evaluator._paramsEval.imgIds = list(range(len(order)))
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
        precision = evaluator.eval["precision"][:, :, :, all_area, -1]
        valid = precision[precision > -1]
        return float(valid.mean()) if valid.size else 0.0

    value = ap(np.arange(num_images))
    rng = np.random.default_rng(seed)
    return value, np.array([ap(rng.integers(0, num_images, num_images)) for _ in range(replicates)])


def region_scores(masks_dir: Path, gt_dir: Path, grouped: bool) -> dict[str, tuple[float, float]]:
    """(S-measure, MAE) per image, read and resized as `evaluate_sod` (linear) / `evaluate_cosod` (cubic) do and
    scored by pysodmetrics, so their means are those functions' Sm and MAE (only these two: the other metrics would
    cost most of the demo's evaluation time)."""
    import py_sod_metrics as psm

    from cgpo_trl.saliency.metrics import load_pair, match_files

    scores = {}
    for key, (pred_path, gt_path) in match_files(masks_dir, gt_dir, grouped=grouped).pairs.items():
        pred, gt = load_pair(pred_path, gt_path, "cubic" if grouped else "linear")
        sm, mae = psm.Smeasure(), psm.MAE()
        sm.step(pred, gt)
        mae.step(pred, gt)
        scores[key] = (float(sm.get_results()["sm"]), float(mae.get_results()["mae"]))
    return scores


def evaluate_stage(name, model, processor, rows_by_task, reward_funcs, weights, out: Path, max_new_tokens, progress):
    """Greedy answers -> masks (shapes segmenter) -> metrics with standard errors.

    Returns (metrics, samples): `metrics[key]`, `metrics[key + "_se"]` and `metrics[key + "_n"]` (the rows the
    standard error is over) for `RESULT_KEYS` and the well-formed rate per task; `samples[key]` the per-row values
    (keyed by row) or, for `sis_AP`, the bootstrap replicates, which `compare` pairs across stages, and
    `samples["expressions"]` every expression the stage wrote.
    """
    from cgpo_trl.predict import VLMGenerator, predict_rows

    segmenter = next(f.segmenter for f in reward_funcs if hasattr(f, "segmenter"))
    generate = VLMGenerator(model, processor, max_new_tokens=max_new_tokens)
    metrics: dict[str, float] = {}
    samples: dict[str, dict | np.ndarray | list] = {"reward": {}, "expressions": []}
    for task, rows in rows_by_task.items():
        folder = out / "eval" / name / task
        summary = predict_rows(rows, generate, segmenter, folder, batch_size=32, overlays=False, progress=progress)
        records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        texts = [r["text"] for r in records]
        samples["expressions"] += [e for r in records for e in r["regions"] + r["instances"]]
        well_formed = [float(not r["problems"]) for r in records]
        metrics[f"{task}_well_formed"], metrics[f"{task}_well_formed_se"] = mean_se(well_formed)
        metrics[f"{task}_well_formed_n"] = len(records)
        if task in ("sod", "cosod"):
            scores = region_scores(summary.masks_dir, summary.gt_dir, grouped=task == "cosod")
            keys = sorted(scores)
            groups = [k.split("/", 1)[0] for k in keys] if task == "cosod" else None
            columns = {"Sm": 0, "MAE": 1} if task == "sod" else {"cosod_Sm": 0}
            for key, field in columns.items():
                values = [scores[k][field] for k in keys]
                metrics[key], metrics[f"{key}_se"] = mean_se(values, groups)
                metrics[f"{key}_n"] = len(set(groups)) if groups else len(values)
                samples[key] = dict(zip(keys, values))
            if task == "cosod":
                samples["cosod_Sm_groups"] = dict(zip(keys, groups))
        else:
            value, replicates = ap_replicates(summary.results_json, summary.annotations_json, AP_REPLICATES, 0)
            metrics["sis_AP"], metrics["sis_AP_se"], metrics["sis_AP_n"] = (
                value,
                float(replicates.std(ddof=1)),
                len(rows),
            )
            samples["sis_AP"] = replicates
        columns = {key: [row[key] for row in rows] for key in ("images", "task", "masks", "instances")}
        prompts = [row["prompt"] for row in rows]
        per_func = [f(prompts=prompts, completions=texts, **columns) for f in reward_funcs]
        for i, values in enumerate(zip(*per_func)):
            pairs = [(w, v) for w, v in zip(weights, values) if v is not None]
            reward = sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) if pairs else 0.0
            samples["reward"][f"{task}:{i}"] = reward
    metrics["reward"], metrics["reward_se"] = mean_se(list(samples["reward"].values()))
    metrics["reward_n"] = len(samples["reward"])
    for key in RESULT_KEYS:
        for suffix in ("", "_se"):
            metrics.setdefault(key + suffix, math.nan)
        metrics.setdefault(key + "_n", 0)
    return metrics, samples


def compare(after: dict, before: dict) -> dict[str, float]:
    """Paired standard error of `after - before` per metric: over the same held-out rows (CoSOD: clustered by
    group), and for `sis_AP` over the same bootstrap resamples."""
    errors = {}
    for key in RESULT_KEYS:
        if key not in after or key not in before:
            continue
        if isinstance(after[key], np.ndarray):
            errors[key] = float((after[key] - before[key]).std(ddof=1)) if after[key].size > 1 else math.nan
            continue
        keys = sorted(after[key])
        groups = [after["cosod_Sm_groups"][k] for k in keys] if key == "cosod_Sm" else None
        errors[key] = mean_se([after[key][k] - before[key][k] for k in keys], groups)[1]
    return errors


# ---------------------------------------------------------------------------------------------- outputs
def plot_curves(sft_history: list[dict], rl_histories: dict[str, list[dict]], path: Path) -> None:
    """SFT loss; RL reward per generated completion; the collapse diagnostics of the RL runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sft, ax_rl, ax_diag) = plt.subplots(1, 3, figsize=(16, 4.2))
    steps = [h["step"] for h in sft_history if "loss" in h]
    ax_sft.plot(steps, [h["loss"] for h in sft_history if "loss" in h], label="loss")
    acc = [(h["step"], h["mean_token_accuracy"]) for h in sft_history if "mean_token_accuracy" in h and "loss" in h]
    if acc:
        ax_sft.plot(*zip(*acc), label="token accuracy")
    ax_sft.set_title("SFT")
    ax_sft.set_xlabel("step")
    ax_sft.legend()
    styles = {"diagnostics": ("-", "--", ":")}
    for (name, (history, completions_per_step)), colour in zip(rl_histories.items(), ("C0", "C1", "C2")):
        points = [(h["step"] * completions_per_step, h["reward"]) for h in history if "reward" in h]
        if points:
            ax_rl.plot(*zip(*points), color=colour, label=f"{name} reward (train, sampled)")
        for key, style in zip(DIAGNOSTICS, styles["diagnostics"]):
            points = [(h["step"] * completions_per_step, h[key]) for h in history if key in h]
            if points:
                ax_diag.plot(*zip(*points), color=colour, linestyle=style, label=f"{name} {key.split('/')[1]}")
    ax_rl.set_title("RL from the SFT checkpoint")
    ax_diag.set_title("collapse diagnostics (1 = diverse, 0 = collapsed)")
    for ax in (ax_rl, ax_diag):
        ax.set_xlabel("generated completions")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_diag.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fixed_cases(after: dict[str, float], before: dict[str, float], margin: float = 0.1) -> tuple[list, list]:
    """Held-out SOD images whose S-measure rose (fixed) or fell (broken) by more than `margin`, largest change first."""
    changes = {k: after[k] - before[k] for k in after}
    fixed = sorted((k for k, d in changes.items() if d > margin), key=lambda k: -changes[k])
    broken = sorted((k for k, d in changes.items() if d < -margin), key=lambda k: changes[k])
    return fixed, broken


def overlay_grid(rows, names: list[str], stages: list[str], out: Path, path: Path, title: str) -> None:
    """One row per stage (ground truth first) of SOD overlays on the held-out images called `names`, drawn from each
    stage's saved masks and answers."""
    from PIL import Image, ImageDraw, ImageFont

    from cgpo_trl.predict import image_names, overlay

    index = {image_names(rows[i], i)[0]: i for i in range(len(rows))}
    names = [n for n in names if n in index]
    if not names:
        return
    truth = []
    for name in names:
        row = rows[index[name]]
        truth.append(overlay(row["images"][0], [np.asarray(row["masks"][0]) / 255.0], " | ".join(row["expressions"])))
    grid_rows = [("ground truth", truth)]
    for stage in stages:
        folder = out / "eval" / stage / "sod"
        answers = {}
        for line in (folder / "predictions.jsonl").read_text().splitlines():
            record = json.loads(line)
            answers[record["names"][0]] = " | ".join(record["regions"])
        tiles = []
        for name in names:
            mask = np.asarray(Image.open(folder / "masks" / f"{name}.png"), dtype=np.float32) / 255.0
            tiles.append(overlay(rows[index[name]]["images"][0], [mask], answers[name]))
        grid_rows.append((stage, tiles))
    width = max(t.width for _, tiles in grid_rows for t in tiles)
    height = max(t.height for _, tiles in grid_rows for t in tiles)
    margin, header = 120, 30
    grid = Image.new("RGB", (margin + width * len(names), header + height * len(grid_rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title, fill="black", font=ImageFont.load_default(size=16))
    for r, (label, tiles) in enumerate(grid_rows):
        draw.text((6, header + r * height + height // 2), label, fill="black", font=ImageFont.load_default(size=16))
        for c, tile in enumerate(tiles):
            grid.paste(tile, (margin + c * width, header + r * height))
    grid.save(path)


def _cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f} ± {metrics[key + '_se']:.3f}"


def write_results(results: dict, comparisons: dict, out: Path, info: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = {key: next(iter(results.values()))[f"{key}_n"] for key in RESULT_KEYS}
    lines = [
        "# Saliency-R1 CPU demo",
        "",
        f"Held-out synthetic `validation` split, {info['eval_samples']} rows per task, greedy decoding, `shapes` "
        "segmenter. `reward` is the training reward (weighted format + saliency) of the greedy answers. Each cell is "
        "the value ± its standard error (rows: "
        + ", ".join(f"{k} {n}" for k, n in rows.items())
        + "; `sis_AP`: bootstrap over images; `cosod_Sm`: clustered by group).",
        "",
        "| stage | " + " | ".join(RESULT_KEYS) + " |",
        "|---|" + "---|" * len(RESULT_KEYS),
    ]
    for stage, metrics in results.items():
        lines.append(f"| {stage} | " + " | ".join(_cell(metrics, k) for k in RESULT_KEYS) + " |")
    lines += [
        "",
        "Each stage against the one it started from: difference ± paired standard error (same rows; `sis_AP`: same "
        "bootstrap resamples), and the difference in standard errors (MAE: lower is better, sign flipped).",
        "",
        "| comparison | " + " | ".join(RESULT_KEYS) + " |",
        "|---|" + "---|" * len(RESULT_KEYS),
    ]
    for (after, before), differences in comparisons.items():
        cells = []
        for key in RESULT_KEYS:
            value = results[after][key] - results[before][key]
            se = differences[key]
            sign = -1 if key in LOWER_IS_BETTER else 1
            cells.append(f"{value:+.3f} ± {se:.3f} ({sign * value / se:+.1f} se)" if se > 0 else f"{value:+.3f}")
        lines.append(f"| {after} − {before} | " + " | ".join(cells) + " |")
    lines += [""]
    for (after, before), differences in comparisons.items():
        better = all(results[after][k] - results[before][k] > 2 * differences[k] for k in ("reward", "Sm"))
        lines.append(
            f"- {after} vs {before}: {'above' if better else 'NOT above'} by more than 2 paired standard errors on "
            "both reward and Sm."
        )
    lines += [
        "",
        "What the greedy answers name, over every held-out row (see `cgpo_trl.saliency.diagnostics`; `reference`: the "
        "ground-truth expressions). A stage that writes one phrase or one shape word everywhere shows it here.",
        "",
        "| answers | expressions | distinct | colour entropy | shape entropy |",
        "|---|---|---|---|---|",
    ]
    for stage, values in info["answer_diagnostics"].items():
        written = values.get("expressions", 0)
        cells = [str(written), f"{round(values['distinct_expressions'] * written)}" if written else "–"]
        cells += [f"{values[k]:.3f}" if k in values else "–" for k in ("colour_entropy", "shape_entropy")]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- SFT: {info['sft_steps']} steps in {info['sft_seconds']:.0f} s; "
        + "; ".join(f"{name}: {r['steps']} steps in {r['seconds']:.0f} s" for name, r in info["rl"].items())
        + f"; total wall time {info['total_seconds'] / 60:.1f} min on {info['cpus']} CPU core(s), "
        f"{info['torch_threads']} torch thread(s) (timings depend on other load on the machine).",
        f"- {info['overlay_title']}",
        "- Curves: `curves.png`; SOD overlays (ground truth, then each stage): `overlays.png`.",
        "- Checkpoints with model cards: " + ", ".join(f"`{s}/`" for s in results if s != "untrained") + ".",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from trl import ModelConfig, SFTConfig

    from cgpo_trl.config import CGPOConfig
    from cgpo_trl.pipeline import (
        SaliencyScriptArguments,
        build_reward_funcs,
        build_rl_trainer,
        build_sft_trainer,
        load_policy,
        train_and_save,
    )
    from cgpo_trl.saliency.diagnostics import expression_diagnostics

    started = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--seed", str(args.seed), "--overwrite_output_dir", "true"]  # a rerun replaces the demo's own outputs
    if args.no_progress:
        common += ["--disable_tqdm", "true"]
    sft_extra = [*common, "--output_dir", str(out / "sft")]
    rl_extra = [*common, "--model_name_or_path", str(out / "sft")]
    eval_samples = args.eval_samples
    if args.quick:
        sft_extra += ["--max_steps", "4", "--save_steps", "1000", "--logging_steps", "1"]
        rl_extra += ["--max_steps", "2", "--save_steps", "1000", "--logging_steps", "1"]
        eval_samples = min(eval_samples, 4)
    if args.sft_steps is not None:
        sft_extra += ["--max_steps", str(args.sft_steps)]
    if args.rl_steps is not None:
        rl_extra += ["--max_steps", str(args.rl_steps)]

    # Stage 1: SFT from the tiny random model.
    say(f"1/3 SFT: generating the synthetic training mixture, then training for at most {args.sft_minutes:g} min")
    sft = stage_args(args.sft_config, sft_extra, (SaliencyScriptArguments, SFTConfig, ModelConfig))
    if args.quick:
        for spec in sft[0].datasets:
            spec.num_samples = min(spec.num_samples or 64, 64)
    untrained, processor = load_policy(sft[2], seed=sft[1].seed)
    untrained_state = {k: v.clone() for k, v in untrained.state_dict().items()}
    sft_trainer = build_sft_trainer(*sft, model=untrained, processor=processor)
    sft_trainer.add_callback(TimeLimit(args.sft_minutes))
    t0 = time.monotonic()
    train_and_save(sft_trainer, sft[0], sft[2], stage="sft")
    sft_seconds = time.monotonic() - t0
    sft_history, sft_steps = sft_trainer.state.log_history, sft_trainer.state.global_step

    # Stage 2: CGPO, then the GRPO comparison, from the same SFT checkpoint and the same number of completions.
    trainers = {"cgpo": []} | (
        {"grpo": ["--num_generations", str(args.grpo_generations)]} if args.grpo_generations else {}
    )
    rl_models, rl_info, rl_histories = {}, {}, {}
    for name, options in trainers.items():
        say(f"2/3 {name.upper()}: from {out / 'sft'}")
        extra = [*rl_extra, "--output_dir", str(out / name), "--trainer", name, *options]
        if name != "cgpo":  # exactly CGPO's steps (so its completions), even if CGPO's time cap stopped it early
            extra += ["--max_steps", str(rl_info["cgpo"]["steps"])]
        rl = stage_args(args.rl_config, extra, (SaliencyScriptArguments, CGPOConfig, ModelConfig))
        if args.quick:
            for spec in rl[0].datasets:
                spec.num_samples = min(spec.num_samples or 32, 32)
        rl_trainer = build_rl_trainer(*rl)
        if name == "cgpo":
            rl_trainer.add_callback(TimeLimit(args.rl_minutes))
        t0 = time.monotonic()
        train_and_save(rl_trainer, rl[0], rl[2], stage="rl")
        steps = rl_trainer.state.global_step
        rl_info[name] = {
            "steps": steps,
            "seconds": time.monotonic() - t0,
            "completions": steps * rl[1].per_device_train_batch_size * rl[1].gradient_accumulation_steps,
        }
        rl_models[name] = rl_trainer.model
        rl_histories[name.upper()] = (rl_trainer.state.log_history, rl_info[name]["completions"] / max(steps, 1))

    # Evaluation of every stage on the same held-out rows.
    say(f"3/3 evaluation: untrained, SFT, {', '.join(n.upper() for n in trainers)} on {eval_samples} rows per task")
    shutil.rmtree(out / "eval", ignore_errors=True)  # predict_rows resumes from saved predictions: start afresh
    rows_by_task = eval_rows(rl[0], eval_samples)
    reward_funcs = build_reward_funcs(rl[0], processor, untrained, rl[1].max_completion_length)
    weights = rl[1].reward_weights or [1.0] * len(reward_funcs)
    untrained.load_state_dict(untrained_state)
    models = {"untrained": untrained, "sft": load_policy(_model_config(out / "sft"))[0], **rl_models}
    results, samples = {}, {}
    for stage, model in models.items():
        results[stage], samples[stage] = evaluate_stage(
            stage,
            model,
            processor,
            rows_by_task,
            reward_funcs,
            weights,
            out,
            rl[1].max_completion_length,
            not args.no_progress,
        )
        print(f"{stage}: " + ", ".join(f"{k} {_cell(results[stage], k)}" for k in RESULT_KEYS), flush=True)
    pairs = [("sft", "untrained"), *((name, "sft") for name in rl_models)]
    if "grpo" in rl_models:
        pairs.append(("cgpo", "grpo"))
    comparisons = {pair: compare(samples[pair[0]], samples[pair[1]]) for pair in pairs}
    written = {"reference": [e for rows in rows_by_task.values() for row in rows for e in row["expressions"]]}
    written |= {stage: samples[stage]["expressions"] for stage in models}
    diagnostics = {name: {"expressions": len(e), **expression_diagnostics(e)} for name, e in written.items()}

    plot_curves(sft_history, rl_histories, out / "curves.png")
    fixed, broken = fixed_cases(samples["cgpo"]["Sm"], samples["sft"]["Sm"])
    overlay_title = (
        f"Held-out SOD images CGPO fixed (S-measure +0.1 or more over SFT): {len(fixed)} fixed, {len(broken)} broken "
        f"of {len(samples['cgpo']['Sm'])}"
    )
    overlay_grid(
        rows_by_task["sod"],
        (fixed or sorted(samples["cgpo"]["Sm"]))[:6],
        list(models)[1:],
        out,
        out / "overlays.png",
        overlay_title,
    )
    info = {
        "eval_samples": eval_samples,
        "sft_steps": sft_steps,
        "sft_seconds": sft_seconds,
        "rl": rl_info,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sod_fixed_by_cgpo": len(fixed),
        "sod_broken_by_cgpo": len(broken),
        "overlay_title": overlay_title,
        "answer_diagnostics": diagnostics,
        "total_seconds": time.monotonic() - started,
    }
    write_results(results, comparisons, out, info)
    for stage in models:  # the checkpoints' model cards get the held-out numbers too
        if stage == "untrained":
            continue
        with open(out / stage / "README.md", "a") as card:
            card.write(
                f"\n### Held-out synthetic evaluation (`make demo`, {eval_samples} rows per task, greedy)\n\n"
                + "| "
                + " | ".join(RESULT_KEYS)
                + " |\n|"
                + "---|" * len(RESULT_KEYS)
                + "\n| "
                + " | ".join(_cell(results[stage], k) for k in RESULT_KEYS)
                + " |\n"
            )
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    say(f"wrote {out / 'results.md'} ({info['total_seconds'] / 60:.1f} min)")
    return results


def _model_config(path: Path):
    from trl import ModelConfig

    return ModelConfig(model_name_or_path=str(path))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
