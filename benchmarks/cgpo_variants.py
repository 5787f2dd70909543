"""Which CGPO advantage works on the saliency task? Every confidence level x calibration (x span) against the
batch-mean-reward control and GRPO G=4, from one SFT-warmed checkpoint, for several seeds.

Task: synthetic SOD (odd one out, 56-px images) with the tiny demo Qwen2.5-VL, rewards `format` (0.1, EOS-aware) +
`saliency` (1.0, S-measure through the weight-free `shapes` segmenter) — the demo's stage 2 restricted to SOD.
Start: `outputs/demo/sft` when the demo has run, else a warm checkpoint made here by a few minutes of SFT through
`cgpo_trl.pipeline` (the demo's SFT settings, SOD only).

Every run generates the same number of completions (16 per step, the same number of steps: CGPO 16 prompts x 1,
GRPO 4 prompts x 4), so the final numbers compare at equal completions; the table also gives each run's wall time
and the held-out gain per training minute (equal wall time). Held-out: >= 500 validation images, greedy answers:
accuracy (predicted mask IoU >= 0.5), S-measure, format and EOS rates. Training logs: policy entropy (end / start),
CGPO's confidence-reward correlation and ECE (`cgpo/confidence_reward_corr`, `cgpo/ece`).

    python benchmarks/cgpo_variants.py --out benchmarks/results/cgpo_variants [--seeds 3 --rl_steps 300 --lr 3e-4] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REWARD_WEIGHTS,
    evaluate_saliency,
    logged,
    rl_settings,
    saliency_rewards,
    saliency_rows,
    slug,
    warm_checkpoint,
)

from cgpo_trl import CGPOConfig, CGPOTrainer  # noqa: E402

CONTROL = "control: r - mean(r)"
GRPO = "GRPO G=4"
VARIANTS: dict[str, dict] = {
    "sequence/completion/none (paper)": dict(
        confidence_level="sequence", confidence_span="completion", confidence_calibration="none"
    ),
    "sequence/completion/batch": dict(
        confidence_level="sequence", confidence_span="completion", confidence_calibration="batch"
    ),
    "sequence/completion/online": dict(
        confidence_level="sequence", confidence_span="completion", confidence_calibration="online"
    ),
    "sequence/answer/none": dict(confidence_level="sequence", confidence_span="answer", confidence_calibration="none"),
    "sequence/answer/batch": dict(
        confidence_level="sequence", confidence_span="answer", confidence_calibration="batch"
    ),
    "sequence/answer/online": dict(
        confidence_level="sequence", confidence_span="answer", confidence_calibration="online"
    ),
    "token/none": dict(confidence_level="token", confidence_calibration="none"),
    "token/batch": dict(confidence_level="token", confidence_calibration="batch"),
    "token/online (default)": dict(confidence_level="token", confidence_calibration="online"),
    CONTROL: dict(confidence_level="sequence", confidence="none", confidence_calibration="batch"),
    GRPO: dict(),
}
# Run order within a seed: the default, the control and GRPO first, so a partial run still answers the main question.
ORDER = [
    "token/online (default)",
    CONTROL,
    GRPO,
    "sequence/completion/none (paper)",
    "token/none",
    "token/batch",
    "sequence/completion/batch",
    "sequence/completion/online",
    "sequence/answer/none",
    "sequence/answer/batch",
    "sequence/answer/online",
]
MAX_COMPLETION = 32


def rl_run(name: str, checkpoint: Path, train, held_out, seed: int, steps: int, lr: float, out: Path) -> dict:
    from cgpo_trl.models import load_model_and_processor

    model, processor = load_model_and_processor(str(checkpoint))
    funcs = saliency_rewards(processor, model, MAX_COMPLETION)
    common = rl_settings(
        out / "runs" / slug(name) / f"seed{seed}",
        lr=lr,
        steps=steps,
        batch_size=16,
        max_completion_length=MAX_COMPLETION,
        seed=seed,
        reward_weights=REWARD_WEIGHTS,
        logging_steps=5,
    )
    if name == GRPO:
        trainer = GRPOTrainer(
            model, funcs, args=GRPOConfig(**common, num_generations=4), train_dataset=train, processing_class=processor
        )
    else:
        trainer = CGPOTrainer(
            model, funcs, args=CGPOConfig(**common, **VARIANTS[name]), train_dataset=train, processing_class=processor
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result = evaluate_saliency(model, processor, held_out, funcs, MAX_COMPLETION)
    entropy = logged(trainer, "entropy")

    def mean_of(key):
        values = [v for v in logged(trainer, key) if not math.isnan(v)]
        return statistics.mean(values) if values else None

    result.update(
        seconds=seconds,
        steps=trainer.state.global_step,
        completions=trainer.state.global_step * 16,
        entropy_start=entropy[0] if entropy else None,
        entropy_end=entropy[-1] if entropy else None,
        entropy_ratio=entropy[-1] / entropy[0] if len(entropy) > 1 and entropy[0] else None,
        confidence_reward_corr=mean_of("cgpo/confidence_reward_corr"),
        ece=mean_of("cgpo/ece"),
        confidence=logged(trainer, "cgpo/confidence"),
        train_reward=logged(trainer, "reward"),
        frac_reward_zero_std=mean_of("frac_reward_zero_std"),
    )
    return result


def aggregate(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
    if not values:
        return math.nan, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.mean(values), sem


def write_report(results: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start, runs_by_name = results["start"], results["runs"]
    info = results["info"]
    lines = [
        f"Measured on {info['machine']}. Start: {info['checkpoint']}; held-out {info['eval_size']} validation SOD "
        f"images, greedy. {info['rl_steps']} RL steps x 16 completions at lr {info['lr']}.",
        "",
        f"Start: accuracy {start['accuracy']:.3f}, S-measure {start['Sm']:.3f}, format {start['format']:.3f}, "
        f"EOS {start['eos']:.3f}.",
        "",
        "| advantage | seeds | accuracy (mean ± s.e.) | S-measure | format | EOS | entropy end/start | conf–reward corr "
        "| ECE | s/run | Δacc per min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(runs_by_name, key=lambda n: -aggregate(runs_by_name[n], "accuracy")[0])
    for name in ranked:
        runs = runs_by_name[name]
        acc, sem = aggregate(runs, "accuracy")
        secs = aggregate(runs, "seconds")[0]
        sem_text = "n/a" if math.isnan(sem) else f"{sem:.3f}"

        def cell(key, digits=3, runs=runs, name=name):
            if key == "ece" and name in (CONTROL, GRPO):  # no confidence: c = 0 makes ECE the mean reward
                return "n/a"
            value = aggregate(runs, key)[0]
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

        lines.append(
            f"| {name} | {len(runs)} | {acc:.3f} ± {sem_text} | {cell('Sm')} | {cell('format')} | "
            f"{cell('eos')} | "
            f"{cell('entropy_ratio', 2)} | {cell('confidence_reward_corr', 2)} | {cell('ece', 3)} | {secs:.0f} | "
            f"{(acc - start['accuracy']) / (secs / 60):+.3f} |"
        )
    lines += ["", *verdict(runs_by_name, start)]
    text = "\n".join(lines) + "\n"
    (out / "cgpo_variants.md").write_text(text)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in ranked:
        curves = [r["train_reward"] for r in runs_by_name[name]]
        length = min(len(c) for c in curves)
        if length:
            ax.plot(
                [5 * (i + 1) for i in range(length)],
                [sum(c[i] for c in curves) / len(curves) for i in range(length)],
                label=name,
            )
    ax.set_xlabel("RL step (16 completions each)")
    ax.set_ylabel("train reward (logged by TRL, mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cgpo_variants.png", dpi=80)
    plt.close(fig)
    return text


def verdict(runs_by_name: dict, start: dict) -> list[str]:
    if CONTROL not in runs_by_name:
        return []
    control, control_sem = aggregate(runs_by_name[CONTROL], "accuracy")
    lines = []
    confidence = {n: aggregate(r, "accuracy") for n, r in runs_by_name.items() if n not in (CONTROL, GRPO)}
    if confidence:
        best = max(confidence, key=lambda n: confidence[n][0])
        acc, sem = confidence[best]
        margin = 2 * math.hypot(sem if not math.isnan(sem) else 0.0, control_sem if not math.isnan(control_sem) else 0)
        if acc > control + margin:
            lines.append(
                f"Best confidence-based variant: **{best}** ({acc:.3f}), above the control ({control:.3f}) "
                "by more than two standard errors."
            )
        else:
            lines.append(
                f"No confidence-based variant beats the control: the best, {best} ({acc:.3f}), is within two "
                f"standard errors of (or below) r - mean(r) ({control:.3f})."
            )
    if GRPO in runs_by_name:
        grpo = aggregate(runs_by_name[GRPO], "accuracy")[0]
        lines.append(f"GRPO G=4 at equal completions: {grpo:.3f}; start {start['accuracy']:.3f}.")
    return lines


def machine() -> str:
    import platform

    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other workers, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cgpo_variants"))
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/variants"))
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="start (default: outputs/demo/sft, else WORK/sft, made here when absent)",
    )
    parser.add_argument("--sft_minutes", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rl_steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval_size", type=int, default=500)
    parser.add_argument("--train_size", type=int, default=4096)
    parser.add_argument("--variants", nargs="*", default=ORDER)
    parser.add_argument("--smoke", action="store_true", help="two variants, two steps, a tiny eval (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.rl_steps, args.eval_size, args.train_size = 1, 2, 8, 64
        args.variants = ["token/online (default)", GRPO]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        demo = Path("outputs/demo/sft")
        checkpoint = demo if (demo / "config.json").exists() else args.work / "sft"
    if not (checkpoint / "config.json").exists():
        if args.smoke:
            from cgpo_trl.testing import save_tiny_vlm

            save_tiny_vlm(checkpoint)
        else:
            info = warm_checkpoint(checkpoint, args.sft_minutes)
            (args.work / "sft_info.json").write_text(json.dumps(info))
    sft_info = args.work / "sft_info.json"
    described = f"`{checkpoint}`" + (
        f" ({json.loads(sft_info.read_text())['steps']} SFT steps made by this script)"
        if sft_info.exists() and checkpoint == args.work / "sft"
        else ""
    )
    train = saliency_rows(args.train_size, "train", seed=1)
    held_out = saliency_rows(args.eval_size, "validation")
    path = args.out / "cgpo_variants.json"
    saved = json.loads(path.read_text()) if path.exists() and not args.smoke else {}
    info = dict(machine=machine(), checkpoint=described, eval_size=args.eval_size, rl_steps=args.rl_steps, lr=args.lr)
    if saved.get("info", {}).get("rl_steps") != args.rl_steps or saved.get("info", {}).get("lr") != args.lr:
        saved = {}  # other settings: not comparable
    results = {"info": info, "start": saved.get("start"), "runs": saved.get("runs", {})}
    if results["start"] is None:
        from cgpo_trl.models import load_model_and_processor

        model, processor = load_model_and_processor(str(checkpoint))
        results["start"] = evaluate_saliency(
            model, processor, held_out, saliency_rewards(processor, model, MAX_COMPLETION), MAX_COMPLETION
        )
        path.write_text(json.dumps(results, indent=1))
    for seed in range(args.seeds):  # seeds outermost: a partial run still compares the variants
        for name in args.variants:
            runs = results["runs"].setdefault(name, [])
            if len(runs) > seed:
                continue
            start = time.perf_counter()
            runs.append(rl_run(name, checkpoint, train, held_out, seed, args.rl_steps, args.lr, args.work))
            print(
                f"seed {seed} {name}: acc {runs[-1]['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True
            )
            path.write_text(json.dumps(results, indent=1))
    text = write_report(results, args.out)
    print(text)
    return results


if __name__ == "__main__":
    main()
