"""`make demo`: the whole Saliency-R1 pipeline on the embedded synthetic benchmark, offline, on a CPU.

    python recipes/demo.py --out outputs/demo                  # ~20 minutes on 2 cores
    python recipes/demo.py --out /tmp/demo --quick             # a few steps of everything (tests)

1. build the tiny Qwen2.5-VL (random init, 0.66 M parameters; `model_name_or_path: tiny-random`);
2. SFT on synthetic reference answers with `recipes/saliency/demo_cpu_sft.yaml` (stops after `--sft_minutes`);
3. CGPO from the SFT checkpoint with `recipes/saliency/demo_cpu.yaml` (`--rl_steps` steps; `--trainer grpo`
   swaps in the GRPO baseline);
4. evaluate the untrained, SFT and CGPO models on a held-out synthetic split (`validation`, its own random stream)
   with greedy decoding, the `shapes` segmenter and the standard metrics;
5. write `OUT/results.json` and `OUT/results.md` (per stage: `reward`, `Sm`, `MAE`, `sis_AP`, `cosod_Sm`),
   `OUT/curves.png` (SFT loss; CGPO reward, confidence and advantage) and `OUT/overlays.png`.

The two stages run the same code as `recipes/sft_saliency.py` / `recipes/cgpo_saliency.py`, from the same YAML
files; the options below only override a few of their fields.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

RECIPES = Path(__file__).resolve().parent / "saliency"
RESULT_KEYS = ("reward", "Sm", "MAE", "sis_AP", "cosod_Sm")


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
    parser.add_argument("--sft_minutes", type=float, default=9.0, help="SFT wall-time budget")
    parser.add_argument("--sft_steps", type=int, default=None, help="SFT step cap (default: the YAML's max_steps)")
    parser.add_argument("--rl_steps", type=int, default=None, help="RL steps (default: the YAML's max_steps)")
    parser.add_argument("--rl_minutes", type=float, default=4.0, help="RL wall-time budget")
    parser.add_argument("--trainer", choices=("cgpo", "grpo"), default="cgpo", help="stage-2 trainer")
    parser.add_argument("--eval_samples", type=int, default=300, help="held-out rows per task (CoSOD: groups)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps and a small eval: checks the plumbing")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser


def stage_args(config: Path, extra: list[str], dataclass_types):
    from cgpo_trl.pipeline import parse_args

    return parse_args(dataclass_types, ["--config", str(config), *extra])


def eval_rows(script_args, num_samples: int):
    """Held-out rows: the training mixture's synthetic components, re-drawn from the `validation` stream."""
    from dataclasses import replace

    from cgpo_trl.pipeline import build_mixture

    per_task = {}
    for spec in script_args.datasets:
        if spec.task in per_task:
            continue
        options = {k: v for k, v in spec.options.items() if k != "single_object_fraction"}  # full difficulty
        held_out = replace(spec, split="validation", num_samples=num_samples, weight=1.0, options=options)
        per_task[spec.task] = build_mixture([held_out], instruction=script_args.instruction)
    return per_task


def evaluate_stage(name, model, processor, rows_by_task, reward_funcs, weights, out: Path, max_new_tokens, progress):
    """Greedy answers -> masks (shapes segmenter) -> metrics; `reward` is the weighted training reward."""
    from cgpo_trl.predict import VLMGenerator, predict_rows
    from cgpo_trl.saliency.metrics import evaluate_cosod, evaluate_sis, evaluate_sod

    segmenter = next(f.segmenter for f in reward_funcs if hasattr(f, "segmenter"))
    generate = VLMGenerator(model, processor, max_new_tokens=max_new_tokens)
    metrics: dict[str, float] = {}
    rewards, texts_by_task = [], {}
    for task, rows in rows_by_task.items():
        folder = out / "eval" / name / task
        summary = predict_rows(rows, generate, segmenter, folder, batch_size=32, progress=progress)
        records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        texts = [r["text"] for r in records]
        texts_by_task[task] = texts
        metrics[f"{task}_well_formed"] = summary.num_well_formed / max(summary.num_rows, 1)
        if task == "sod":
            result = evaluate_sod(summary.masks_dir, summary.gt_dir, workers=1, progress=False).metrics
            metrics["Sm"], metrics["MAE"] = result["Sm"], result["MAE"]
        elif task == "cosod":
            result = evaluate_cosod(summary.masks_dir, summary.gt_dir, workers=1, progress=False).metrics
            metrics["cosod_Sm"] = result["Sm"]
        else:
            metrics["sis_AP"] = evaluate_sis(summary.results_json, summary.annotations_json)["AP"]
        columns = {key: rows[key] for key in ("images", "task", "masks", "instances")}
        per_func = [f(prompts=rows["prompt"], completions=texts, **columns) for f in reward_funcs]
        for values in zip(*per_func):
            pairs = [(w, v) for w, v in zip(weights, values) if v is not None]
            rewards.append(sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) if pairs else 0.0)
    metrics["reward"] = sum(rewards) / max(len(rewards), 1)
    for key in RESULT_KEYS:
        metrics.setdefault(key, math.nan)
    return metrics


def plot_curves(sft_history: list[dict], rl_history: list[dict], path: Path, rl_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sft, ax_rl) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in sft_history if "loss" in h]
    ax_sft.plot(steps, [h["loss"] for h in sft_history if "loss" in h], label="loss")
    acc = [(h["step"], h["mean_token_accuracy"]) for h in sft_history if "mean_token_accuracy" in h and "loss" in h]
    if acc:
        ax_sft.plot(*zip(*acc), label="token accuracy")
    ax_sft.set_title("SFT")
    ax_sft.set_xlabel("step")
    ax_sft.legend()
    for key, label in (
        ("reward", "reward"),
        ("cgpo/confidence", "confidence"),
        ("cgpo/advantage_mean", "advantage mean"),
        ("cgpo/advantage_std", "advantage std"),
    ):
        points = [(h["step"], h[key]) for h in rl_history if key in h]
        if points:
            ax_rl.plot(*zip(*points), label=label)
    ax_rl.set_title(rl_name)
    ax_rl.set_xlabel("step")
    ax_rl.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay_grid(rows, stages: list[str], out: Path, path: Path, columns: int = 6) -> None:
    """One row per stage (ground truth first) of SOD overlays on the same held-out images."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from cgpo_trl.predict import image_names, overlay

    count = min(columns, len(rows))
    if count == 0:
        return
    names = [image_names(rows[i], i)[0] for i in range(count)]
    truth = [
        overlay(rows[i]["images"][0], [np.asarray(rows[i]["masks"][0]) / 255.0], " | ".join(rows[i]["expressions"]))
        for i in range(count)
    ]
    grid_rows = [("ground truth", truth)]
    for stage in stages:
        folder = out / "eval" / stage / "sod" / "overlays"
        grid_rows.append((stage, [Image.open(folder / f"{name}.png") for name in names]))
    width = max(t.width for _, tiles in grid_rows for t in tiles)
    height = max(t.height for _, tiles in grid_rows for t in tiles)
    margin = 120
    grid = Image.new("RGB", (margin + width * count, height * len(grid_rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, tiles) in enumerate(grid_rows):
        draw.text((6, r * height + height // 2), label, fill="black", font=ImageFont.load_default(size=16))
        for c, tile in enumerate(tiles):
            grid.paste(tile, (margin + c * width, r * height))
    grid.save(path)


def write_results(results: dict, out: Path, info: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Saliency-R1 CPU demo",
        "",
        f"Held-out synthetic `validation` split, {info['eval_samples']} rows per task, greedy decoding, `shapes` "
        "segmenter. `reward` is the training reward (weighted format + saliency) of the greedy answers.",
        "",
        "| stage | " + " | ".join(RESULT_KEYS) + " |",
        "|---|" + "---|" * len(RESULT_KEYS),
    ]
    for stage, metrics in results.items():
        lines.append(f"| {stage} | " + " | ".join(f"{metrics[k]:.3f}" for k in RESULT_KEYS) + " |")
    sft, rl = results.get("sft"), results.get(info["rl_key"])
    if sft and rl:
        deltas = ", ".join(f"{k} {rl[k] - sft[k]:+.3f}" for k in RESULT_KEYS)
        better = rl["reward"] > sft["reward"]
        lines += [
            "",
            f"{info['rl_name']} minus SFT: {deltas} (MAE: lower is better). "
            + (
                f"{info['rl_name']} raised the reward over SFT."
                if better
                else f"{info['rl_name']} did not raise the reward over SFT within this budget."
            ),
        ]
    lines += [
        "",
        f"- SFT: {info['sft_steps']} steps in {info['sft_seconds']:.0f} s; {info['rl_name']}: {info['rl_steps']} steps "
        f"in {info['rl_seconds']:.0f} s; total wall time {info['total_seconds'] / 60:.1f} min on {info['cpus']} CPU "
        f"core(s), {info['torch_threads']} torch thread(s) (timings depend on other load on the machine).",
        "- Curves: `curves.png`; SOD overlays (ground truth, then each stage): `overlays.png`.",
        "- Checkpoints with model cards: `sft/`, `cgpo/`.",
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

    started = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--seed", str(args.seed)]
    if args.no_progress:
        common += ["--disable_tqdm", "true"]
    sft_extra = [*common, "--output_dir", str(out / "sft")]
    rl_extra = [*common, "--output_dir", str(out / args.trainer), "--model_name_or_path", str(out / "sft")]
    rl_extra += ["--trainer", args.trainer]
    if args.trainer == "grpo":
        rl_extra += ["--num_generations", "4"]
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

    # Stage 2: CGPO (or GRPO) from the SFT checkpoint.
    say(f"2/3 {args.trainer.upper()}: from {out / 'sft'}, at most {args.rl_minutes:g} min")
    rl = stage_args(args.rl_config, rl_extra, (SaliencyScriptArguments, CGPOConfig, ModelConfig))
    if args.quick:
        for spec in rl[0].datasets:
            spec.num_samples = min(spec.num_samples or 32, 32)
    rl_trainer = build_rl_trainer(*rl)
    rl_trainer.add_callback(TimeLimit(args.rl_minutes))
    t0 = time.monotonic()
    train_and_save(rl_trainer, rl[0], rl[2], stage="rl")
    rl_seconds = time.monotonic() - t0
    rl_history, rl_steps = rl_trainer.state.log_history, rl_trainer.state.global_step

    # Evaluation of the three stages on the same held-out rows.
    say(f"3/3 evaluation: untrained, SFT and {args.trainer.upper()} on {eval_samples} held-out rows per task")
    rows_by_task = eval_rows(rl[0], eval_samples)
    reward_funcs = build_reward_funcs(rl[0], processor, untrained, rl[1].max_completion_length)
    weights = rl[1].reward_weights or [1.0] * len(reward_funcs)
    untrained.load_state_dict(untrained_state)
    models = {
        "untrained": untrained,
        "sft": load_policy(_model_config(out / "sft"))[0],
        args.trainer: rl_trainer.model,
    }
    results = {}
    for stage, model in models.items():
        results[stage] = evaluate_stage(
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
        print(f"{stage}: " + ", ".join(f"{k} {results[stage][k]:.3f}" for k in RESULT_KEYS), flush=True)

    rl_name = "CGPO" if args.trainer == "cgpo" else "GRPO"
    plot_curves(sft_history, rl_history, out / "curves.png", rl_name)
    if "sod" in rows_by_task:
        overlay_grid(rows_by_task["sod"], list(models), out, out / "overlays.png")
    info = {
        "eval_samples": eval_samples,
        "sft_steps": sft_steps,
        "sft_seconds": sft_seconds,
        "rl_name": rl_name,
        "rl_key": args.trainer,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rl_steps": rl_steps,
        "rl_seconds": rl_seconds,
        "total_seconds": time.monotonic() - started,
    }
    write_results(results, out, info)
    for stage in ("sft", args.trainer):  # the checkpoints' model cards get the held-out numbers too
        with open(out / stage / "README.md", "a") as card:
            card.write(
                f"\n### Held-out synthetic evaluation (`make demo`, {eval_samples} rows per task, greedy)\n\n"
                + "| "
                + " | ".join(RESULT_KEYS)
                + " |\n|"
                + "---|" * len(RESULT_KEYS)
                + "\n| "
                + " | ".join(f"{results[stage][k]:.3f}" for k in RESULT_KEYS)
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
