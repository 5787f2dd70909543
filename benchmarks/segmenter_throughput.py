"""Masks per second of every referring-segmenter backend available offline, and what the cache saves in training.

Backends: `shapes` (weight-free, the demo's) and the transformers backends `clipseg`, `sam3`, `grounded-sam` and
`evf-sam` with tiny random checkpoints built here from configs (the published weights cannot be downloaded on this
machine; their numbers measure the pipeline's overhead — preprocessing, batching, postprocessing — not a real model's
compute). Workload: synthetic SOD images and their ground-truth referring expressions.

Per backend: batch 1 (one pair per call, cache off), batched (every pair in one call; transformers backends batch
internally), cache on (a second pass over the same pairs: all hits). Then the cache hit rate seen by the `shapes`
segmenter in short CGPO and GRPO runs of the tiny demo VLM (the SFT-warmed checkpoint when present).

    python benchmarks/segmenter_throughput.py --out benchmarks/results/segmenter_throughput [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REWARD_WEIGHTS, saliency_rewards, saliency_rows  # noqa: E402

from cgpo_trl.saliency.segmenters import load_segmenter  # noqa: E402
from cgpo_trl.testing import TINY_SEGMENTERS  # noqa: E402

BACKENDS = ("shapes", *TINY_SEGMENTERS)


# ------------------------------------------------------------------------------------------ measurements
def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times (the least disturbed by the other processes on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_backend(name: str, options: dict, images, expressions, batch_size: int, repeats: int) -> dict:
    kwargs = dict(options)
    if name != "shapes":
        kwargs["batch_size"] = batch_size
    plain = load_segmenter(name, cache_size=None, **kwargs)
    n = len(images)
    plain.segment(images[:2], expressions[:2])  # warm-up: lazy initialisation, first-call allocations
    one = timed(lambda: [plain.segment([im], [ex]) for im, ex in zip(images, expressions)], repeats)
    batched = timed(lambda: plain.segment(images, expressions), repeats)
    cached = load_segmenter(name, cache_size=4 * n, **kwargs)

    def cold_pass():
        cached.clear()  # empty cache, counters reset: every pair a miss
        cached.segment(images, expressions)

    cold = timed(cold_pass, repeats)
    warm = timed(lambda: cached.segment(images, expressions), repeats)
    return {
        "pairs": n,
        "batch1_masks_per_s": n / one,
        "batched_masks_per_s": n / batched,
        "cache_cold_masks_per_s": n / cold,
        "cache_warm_masks_per_s": n / warm,
        "cache_hits": cached.hits,
        "cache_misses": cached.misses,
    }


def cache_hit_rate(
    checkpoint: Path | None, steps: int, completions: int, train_rows: int, out: Path, num_generations: int = 1
) -> dict:
    """Hit rate of the shapes segmenter's cache over a short RL run with `completions` per step: CGPO
    (`num_generations=1`) or GRPO (the G completions of a prompt share its image)."""
    from trl import GRPOConfig, GRPOTrainer

    from cgpo_trl import CGPOConfig, CGPOTrainer
    from cgpo_trl.models import load_model_and_processor
    from cgpo_trl.testing import save_tiny_vlm

    if checkpoint is None or not (checkpoint / "config.json").exists():
        checkpoint = out / "tiny_vlm_random"
        save_tiny_vlm(checkpoint)
        start = "random init"
    else:
        start = str(checkpoint)
    model, processor = load_model_and_processor(str(checkpoint))
    funcs = saliency_rewards(processor, model, 32)
    segmenter = funcs[1].segmenter
    common = dict(
        output_dir=str(out / f"rl_g{num_generations}"),
        use_cpu=True,
        bf16=False,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=completions,
        max_completion_length=32,
        report_to=[],
        save_strategy="no",
        reward_weights=REWARD_WEIGHTS,
        disable_tqdm=True,
        logging_steps=steps,
    )
    if num_generations == 1:
        trainer_cls, args = CGPOTrainer, CGPOConfig(**common)
    else:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, num_generations=num_generations)
    train = saliency_rows(train_rows, "train", seed=1)
    trainer = trainer_cls(model, funcs, args=args, train_dataset=train, processing_class=processor)
    start_time = time.perf_counter()
    trainer.train()
    total = segmenter.hits + segmenter.misses
    return {
        "start": start,
        "steps": steps,
        "completions": steps * completions,
        "prompts": steps * completions // num_generations,
        "train_rows": train_rows,
        "hits": segmenter.hits,
        "misses": segmenter.misses,
        "hit_rate": segmenter.hits / total if total else 0.0,
        "seconds": time.perf_counter() - start_time,
    }


def report(results: dict, out: Path) -> str:
    lines = [
        f"Measured on {results['machine']}; {results['pairs']} synthetic SOD pairs ({results['image_size']} px), "
        f"backend batch size {results['batch_size']}, best of {results['repeats']}. Transformers backends use tiny "
        "random checkpoints (pipeline overhead, not real-model compute).",
        "",
        "| backend | batch 1 masks/s | batched masks/s | cache cold masks/s | cache warm (all hits) masks/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["backends"].items():
        if "error" in r:
            lines.append(f"| {name} | unavailable: {r['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {r['batch1_masks_per_s']:.1f} | {r['batched_masks_per_s']:.1f} | "
            f"{r['cache_cold_masks_per_s']:.1f} | {r['cache_warm_masks_per_s']:.0f} |"
        )
    runs = results.get("cache_runs", {})
    if runs:
        lines += [
            "",
            "Cache hit rate of the `shapes` segmenter in short RL runs (a pair hits when its (image, expression) was "
            "segmented before):",
            "",
            "| run | policy | steps | completions | distinct prompts | training images | hit rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in runs.items():
            lines.append(
                f"| {name} | {run['start']} | {run['steps']} | {run['completions']} | {run['prompts']} | "
                f"{run['train_rows']} | **{run['hit_rate']:.1%}** ({run['hits']} hits, {run['misses']} misses) |"
            )
    text = "\n".join(lines) + "\n"
    (out / "segmenter_throughput.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/segmenter_throughput"))
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/segmenters"))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="policy of the RL runs (default: outputs/demo/sft, else outputs/bench/variants/sft)",
    )
    parser.add_argument("--rl_steps", type=int, default=40, help="steps of the RL runs that measure the hit rate")
    parser.add_argument("--rl_completions", type=int, default=16, help="completions per RL step")
    parser.add_argument("--rl_rows", type=int, default=256, help="training images the RL runs draw from")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.repeats, args.rl_steps, args.rl_completions, args.rl_rows = 4, 1, 2, 4, 8
        args.backends = ["shapes", "clipseg"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = saliency_rows(args.pairs, "validation", image_size=args.image_size)
    images = [ims[0].convert("RGB") for ims in rows["images"]]
    expressions = [exps[0] for exps in rows["expressions"]]
    import platform

    results = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other workers, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "pairs": args.pairs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "backends": {},
    }
    for name in args.backends:
        try:
            options = {} if name == "shapes" else TINY_SEGMENTERS[name](args.work / name)
            results["backends"][name] = measure_backend(
                name, options, images, expressions, args.batch_size, args.repeats
            )
        except ImportError as err:  # an optional extra is missing: say so instead of failing the whole table
            results["backends"][name] = {"error": str(err).splitlines()[0]}
        print(name, results["backends"][name], flush=True)
    checkpoint = args.checkpoint or next(
        (p for p in (Path("outputs/demo/sft"), Path("outputs/bench/variants/sft")) if (p / "config.json").exists()),
        None,
    )
    results["cache_runs"] = {
        name: cache_hit_rate(checkpoint, args.rl_steps, args.rl_completions, args.rl_rows, args.work, g)
        for name, g in (("CGPO", 1), ("GRPO G=4", 4))
    }
    (args.out / "segmenter_throughput.json").write_text(json.dumps(results, indent=1))
    text = report(results, args.out)
    print(text)
    return results


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
