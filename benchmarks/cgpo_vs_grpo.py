"""What one rollout per prompt saves: CGPO against GRPO (G = 2, 4, 8), measured side by side in one process.

Two regimes, each with the same model, data, rewards, prompts per step and seed for every configuration:

- `latency`: the tiny demo Qwen2.5-VL (0.66 M parameters; the SFT-warmed checkpoint when one exists) on synthetic
  SOD with the `format` + `saliency` rewards through the `shapes` segmenter, few prompts per step;
- `compute`: a larger random text LM (Qwen2, 6 layers x 384 hidden, 7.4 M parameters) on two-number addition
  (the task of `cgpo_text_variants.py`), >= 16 prompts per step. A text LM, because a VLM of that size would multiply
  the cost of every run on 2 shared cores (not measured); the regime measures cost, not learning (a random LM earns
  no reward).

Every configuration generates the same total number of completions (CGPO runs G times the steps of GRPO(G)), so
held-out reward can be compared at equal steps, equal completions and equal wall time. Repeats are interleaved
(repeat 1 of every configuration, then repeat 2, ...) and step times are summarised by median and half-IQR.

Per configuration: wall time per optimizer step and its split (generation, reward/segmenter, loss forward+backward,
confidence — CGPO's `_advantages` —, the rest: optimizer step, tokenisation, data), completion tokens and model
forward calls per step, peak RSS during the run, GRPO's fraction of groups with zero reward spread
(`frac_reward_zero_std`), and held-out reward against steps, completions and wall time.

    python benchmarks/cgpo_vs_grpo.py --out benchmarks/results/cgpo_vs_grpo [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cgpo_text_variants import correctness_reward, format_reward, make_pairs, prompt  # noqa: E402
from common import (  # noqa: E402
    REWARD_WEIGHTS,
    RSSSampler,
    StepProfiler,
    evaluate_saliency,
    logged,
    max_rss_mib,
    median_spread,
    rl_settings,
    saliency_rewards,
    saliency_rows,
    slug,
)

from cgpo_trl import CGPOConfig, CGPOTrainer  # noqa: E402
from cgpo_trl.testing import build_tiny_lm, save_pretrained  # noqa: E402

CONFIGS = ("CGPO", "CGPO batch", "GRPO G=2", "GRPO G=4", "GRPO G=8")
"""`CGPO`: the library defaults (token / max_prob / online calibration); `CGPO batch`: batch calibration, which has no
per-step refit."""
TARGETS = {
    "step_ratio": "CGPO step wall time <= 0.35 x GRPO(G=4), equal prompts per step",
    "confidence_share": "confidence <= 3% of a CGPO step",
    "equal_completions": "held-out reward at equal completions: CGPO >= GRPO",
}


def group_size(name: str) -> int:
    return 1 if name.startswith("CGPO") else int(name.split("=")[1])


# ------------------------------------------------------------------------------------------ regimes
class Regime:
    """Model factory, training data, rewards and held-out evaluation of one regime."""

    name: str
    max_completion_length: int

    def model(self):
        raise NotImplementedError

    def evaluate(self, model, processing_class) -> tuple[float, float]:
        """Held-out reward and its standard error."""
        raise NotImplementedError


class LatencyRegime(Regime):
    name = "latency"
    max_completion_length = 32

    def __init__(self, checkpoint: Path | None, work: Path, train_rows: int, eval_rows: int):
        from cgpo_trl.testing import save_tiny_vlm

        if checkpoint is None or not (checkpoint / "config.json").exists():
            checkpoint = work / "tiny_vlm_random"
            if not (checkpoint / "config.json").exists():
                save_tiny_vlm(checkpoint)
            self.start = "random init (no SFT checkpoint found)"
        else:
            self.start = f"SFT-warmed checkpoint {checkpoint}"
        self.checkpoint = checkpoint
        self.dataset = saliency_rows(train_rows, "train", seed=1)
        self.held_out = saliency_rows(eval_rows, "validation")
        self.description = (
            f"tiny Qwen2.5-VL (0.66 M params, {self.start}); synthetic SOD, 56 px; rewards format (0.1) + saliency "
            f"(1.0) via the `shapes` segmenter; max {self.max_completion_length} completion tokens"
        )

    def model(self):
        from cgpo_trl.models import load_model_and_processor

        return load_model_and_processor(str(self.checkpoint))

    def reward_funcs(self, model, processor):
        self._funcs = saliency_rewards(processor, model, self.max_completion_length)
        return self._funcs, REWARD_WEIGHTS

    def evaluate(self, model, processor) -> tuple[float, float]:
        result = evaluate_saliency(model, processor, self.held_out, self._funcs, self.max_completion_length)
        return result["reward"], result["reward_se"]


class ComputeRegime(Regime):
    name = "compute"
    max_completion_length = 16

    def __init__(self, work: Path, hidden: int, layers: int, eval_prompts: int):
        self.checkpoint = work / f"lm_{layers}x{hidden}"
        if not (self.checkpoint / "config.json").exists():
            save_pretrained(*build_tiny_lm(seed=0, hidden_size=hidden, num_layers=layers), self.checkpoint)
        train_pairs, eval_pairs = make_pairs(30)
        self.dataset = Dataset.from_dict({"prompt": [prompt(a, b) for a, b in train_pairs]})
        self.eval_pairs = eval_pairs[:eval_prompts]
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(self.checkpoint).parameters())
        self.description = (
            f"random Qwen2 LM, {layers} layers x {hidden} hidden ({params / 1e6:.1f} M params); addition "
            f"'a+b=' -> '<answer>a+b</answer>', rewards correctness (1.0) + format (0.1); max "
            f"{self.max_completion_length} completion tokens"
        )

    def model(self):
        tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        tokenizer.padding_side = "left"
        return AutoModelForCausalLM.from_pretrained(self.checkpoint), tokenizer

    def reward_funcs(self, model, tokenizer):
        eos = tokenizer.eos_token_id

        def fmt(completions, completion_ids=None, **kwargs):
            return format_reward(completions, completion_ids, eos)

        fmt.__name__ = "format"
        self._fmt = fmt
        return [correctness_reward, fmt], [1.0, 0.1]

    @torch.no_grad()
    def evaluate(self, model, tokenizer) -> tuple[float, float]:
        model.eval()
        prompts = [prompt(a, b) for a, b in self.eval_pairs]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=self.max_completion_length, pad_token_id=tokenizer.pad_token_id
        )[:, enc["input_ids"].size(1) :]
        ids = out.tolist()
        eos = tokenizer.eos_token_id
        ids = [row[: row.index(eos) + 1] if eos in row else row for row in ids]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        correct = correctness_reward(prompts, texts)
        fmt = self._fmt(texts, ids)
        model.train()
        rewards = [(c + 0.1 * f) / 1.1 for c, f in zip(correct, fmt)]
        return statistics.mean(rewards), statistics.stdev(rewards) / math.sqrt(len(rewards))


class HeldOut(TrainerCallback):
    """Held-out reward whenever the completions generated so far cross the next checkpoint (time excluded)."""

    def __init__(self, regime, model, processing_class, profiler: StepProfiler, every: int):
        self.regime, self.model, self.processing_class = regime, model, processing_class
        self.profiler, self.every = profiler, every
        self.points: list[dict] = []
        self.next = 0

    def measure(self, step: int) -> None:
        start = time.perf_counter()
        reward, se = self.regime.evaluate(self.model, self.processing_class)
        steps = self.profiler.steps
        self.points.append(
            dict(
                step=step,
                completions=sum(s["completions"] for s in steps),
                wall=sum(s["wall"] for s in steps),
                reward=reward,
                se=se,
            )
        )
        self.next += self.every
        self.profiler.excluded += time.perf_counter() - start

    def on_train_begin(self, args, state, control, **kwargs):
        self.measure(0)

    def on_step_end(self, args, state, control, **kwargs):
        if sum(s["completions"] for s in self.profiler.steps) >= self.next:
            self.measure(state.global_step)


def run_config(
    regime, name: str, prompts_per_step: int, total_completions: int, seed: int, lr: float, eval_points: int, out: Path
) -> dict:
    """One training run; held-out curves only when `eval_points` (runs of one seed are deterministic, so the
    repeats after the first only time the steps)."""
    g = group_size(name)
    steps = max(total_completions // (prompts_per_step * g), 1)
    model, processing_class = regime.model()
    funcs, weights = regime.reward_funcs(model, processing_class)
    common = rl_settings(
        out / "runs" / regime.name / slug(name),
        lr=lr,
        steps=steps,
        batch_size=prompts_per_step * g,
        max_completion_length=regime.max_completion_length,
        seed=seed,
        reward_weights=weights,
        logging_steps=1,
    )
    if g == 1:
        extra = {"confidence_calibration": "batch"} if name == "CGPO batch" else {}
        trainer = CGPOTrainer(
            model,
            funcs,
            args=CGPOConfig(**common, **extra),
            train_dataset=regime.dataset,
            processing_class=processing_class,
        )
    else:
        trainer = GRPOTrainer(
            model,
            funcs,
            args=GRPOConfig(**common, num_generations=g),
            train_dataset=regime.dataset,
            processing_class=processing_class,
        )
    profiler = StepProfiler(trainer)
    held_out = None
    if eval_points:
        held_out = HeldOut(regime, model, processing_class, profiler, max(total_completions // eval_points, 1))
        trainer.add_callback(held_out)
    with RSSSampler() as rss:
        trainer.train()
    if held_out is not None and held_out.points[-1]["step"] != steps:
        held_out.measure(steps)
    zero_std = logged(trainer, "frac_reward_zero_std")
    return dict(
        steps=profiler.steps,
        held_out=held_out.points if held_out is not None else None,
        peak_rss_mib=rss.peak,
        frac_reward_zero_std=sum(zero_std) / len(zero_std) if zero_std else None,
        train_reward=logged(trainer, "reward"),
    )


def step_median(run: dict, warmup: int, key: str = "wall") -> float:
    steps = run["steps"][warmup:] or run["steps"]
    return median_spread([s[key] for s in steps])[0]


def summarise(runs: list[dict], warmup: int) -> dict:
    """Median and half-IQR over every measured step of every repeat (the first `warmup` steps of each run skipped:
    they include lazy initialisation); held-out numbers from the first repeat (the one evaluated)."""
    steps = [s for run in runs for s in run["steps"][warmup:]] or [s for run in runs for s in run["steps"]]
    out = {}
    keys = (
        "wall",
        "generation",
        "reward",
        "forward_backward",
        "confidence",
        "max_logprob",
        "confidence_metrics",
        "calibration_fit",
        "other",
        "completion_tokens",
        "forward_calls",
        "completions",
    )
    for key in keys:
        out[key], out[key + "_spread"] = median_spread([s.get(key, 0.0) for s in steps])
    out["confidence_share"] = median_spread([s.get("confidence", 0.0) / s["wall"] for s in steps])[0]
    out["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    zero = [run["frac_reward_zero_std"] for run in runs if run["frac_reward_zero_std"] is not None]
    out["frac_reward_zero_std"] = sum(zero) / len(zero) if zero else None
    curve = runs[0]["held_out"]
    out["held_out_start"], out["held_out_final"] = curve[0]["reward"], curve[-1]["reward"]
    out["held_out_se"] = curve[-1].get("se", math.nan)
    out["train_wall"] = median_spread([sum(s["wall"] for s in run["steps"]) for run in runs])[0]
    return out


def paired_ratios(runs_a: list[dict], runs_b: list[dict], warmup: int) -> list[float]:
    """Step-time ratio a / b within each repeat: the two ran back to back, under the same machine load."""
    return [step_median(a, warmup) / step_median(b, warmup) for a, b in zip(runs_a, runs_b)]


def fmt_ms(value: float, spread: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    digits = 1 if abs(value) < 0.01 else 0
    text = f"{value * 1e3:.{digits}f}"
    return f"{text} ± {spread * 1e3:.{digits}f}" if spread is not None else text


def report(results: dict, out: Path) -> str:
    lines = []
    for regime, data in results["regimes"].items():
        summary = {name: summarise(runs, data["warmup"]) for name, runs in data["runs"].items() if runs}
        data["summary"] = summary
        lines += [
            f"### Regime `{regime}`: {data['description']}",
            "",
            f"{data['prompts_per_step']} prompts per step, {data['total_completions']} completions per run, "
            f"{len(next(iter(data['runs'].values())))} interleaved repeats; lr {data['lr']}. Times: median ± half-IQR "
            "per optimizer step in ms; confidence = CGPO's `_advantages` (in brackets: its `max_prob` LM-head projection / online-calibration refit). Held-out "
            f"reward: {data['eval_size']} held-out items, greedy, ± its standard error.",
            "",
            "| config | step | generation | reward/segmenter | fwd+bwd | confidence | other | completion tokens/step "
            "| forward calls/step | peak RSS MiB | zero-std groups | held-out reward start → end |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in summary.items():
            zero = "n/a" if s["frac_reward_zero_std"] is None else f"{s['frac_reward_zero_std']:.2f}"
            confidence = fmt_ms(s["confidence"])
            if s["confidence"] > 0:
                confidence += f" ({fmt_ms(s['max_logprob'])} / {fmt_ms(s['calibration_fit'])})"
            lines.append(
                f"| {name} | {fmt_ms(s['wall'], s['wall_spread'])} | {fmt_ms(s['generation'])} | "
                f"{fmt_ms(s['reward'])} | {fmt_ms(s['forward_backward'])} | {confidence} | "
                f"{fmt_ms(s['other'])} | {s['completion_tokens']:.0f} | {s['forward_calls']:.0f} | "
                f"{s['peak_rss_mib']:.0f} | {zero} | {s['held_out_start']:.3f} → {s['held_out_final']:.3f} "
                f"± {s['held_out_se']:.3f} |"
            )
        lines += ["", *target_lines(data, summary), ""]
    text = "\n".join(lines)
    (out / "cgpo_vs_grpo.md").write_text(f"Measured on {results['machine']}.\n\n" + text + "\n")
    plot(results, out)
    return text


def target_lines(data: dict, summary: dict) -> list[str]:
    """The issue's three targets, for each CGPO configuration (`CGPO` = the library defaults)."""
    if "GRPO G=4" not in summary:
        return []
    grpos = {n: s for n, s in summary.items() if not n.startswith("CGPO")}
    best = max(grpos, key=lambda n: grpos[n]["held_out_final"])
    lines = ["| target | config | measured | |", "|---|---|---|---|"]
    data["step_ratio_per_repeat"] = {}
    for name in (n for n in summary if n.startswith("CGPO")):
        cgpo = summary[name]
        ratios = paired_ratios(data["runs"][name], data["runs"]["GRPO G=4"], data["warmup"])
        ratio = median_spread(ratios)[0]
        data["step_ratio_per_repeat"][name] = ratios
        share = cgpo["confidence_share"]
        gap = cgpo["held_out_final"] - grpos[best]["held_out_final"]
        noise = 2 * math.hypot(cgpo["held_out_se"], grpos[best]["held_out_se"])
        if all(s["held_out_final"] == 0 == s["held_out_start"] for s in summary.values()):
            learning = "not measurable: every held-out reward is 0 (random model)"
        elif gap >= 0:
            learning = "met"
        else:
            learning = "**missed**" + (f" (within noise: gap {-gap:.3f} < 2 s.e. {noise:.3f})" if -gap < noise else "")
        ratio_text = f"{ratio:.2f}x (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
        lines += [
            f"| {TARGETS['step_ratio']} | {name} | {ratio_text} | {'met' if ratio <= 0.35 else '**missed**'} |",
            f"| {TARGETS['confidence_share']} | {name} | {100 * share:.1f}% | "
            f"{'met' if share <= 0.03 else '**missed**'} |",
            f"| {TARGETS['equal_completions']} | {name} | {cgpo['held_out_final']:.3f} vs best GRPO ({best}) "
            f"{grpos[best]['held_out_final']:.3f} | {learning} |",
        ]
    return lines


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = results["regimes"]
    fig, axes = plt.subplots(len(regimes), 4, figsize=(18, 4 * len(regimes)), squeeze=False)
    for row, (regime, data) in enumerate(regimes.items()):
        summary = data["summary"]
        names = list(summary)
        bottom = [0.0] * len(names)
        for key in ("generation", "reward", "forward_backward", "other"):
            values = [max(summary[n][key], 0.0) for n in names]
            axes[row][0].bar(names, values, bottom=bottom, label=key)
            bottom = [b + v for b, v in zip(bottom, values)]
        axes[row][0].set_ylabel("seconds per step (median)")
        axes[row][0].set_title(f"{regime}: step time split")
        axes[row][0].legend(fontsize=7)
        axes[row][0].tick_params(axis="x", labelrotation=30, labelsize=8)
        for col, (key, label) in enumerate(
            (
                ("step", "optimizer steps"),
                ("completions", "completions generated"),
                ("wall", "training wall time (s, steps x median step time)"),
            ),
            start=1,
        ):
            ax = axes[row][col]
            for name, runs in data["runs"].items():
                points = runs[0]["held_out"]
                # Wall time from the median step time of every repeat: the evaluated repeat alone is too noisy.
                xs = [p["step"] * summary[name]["wall"] if key == "wall" else p[key] for p in points]
                ax.errorbar(
                    xs,
                    [p["reward"] for p in points],
                    yerr=[p.get("se", 0.0) for p in points],
                    marker="o",
                    capsize=2,
                    label=name,
                )
            ax.set_xlabel(label)
            ax.set_ylabel("held-out reward (± s.e.)")
            ax.set_title(f"{regime}: held-out reward vs {label.split(' (')[0]}", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cgpo_vs_grpo.png", dpi=80)
    plt.close(fig)


def rounded(value):
    """Floats to 4 significant digits: keeps the per-step JSON small enough to commit."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def write_json(path: Path, results: dict) -> None:
    """Compact JSON with each run's per-step records stored column-wise (`read_json` restores them)."""
    results = rounded(results)
    for data in results.get("regimes", {}).values():
        for runs in data.get("runs", {}).values():
            for run in runs:
                keys = list(dict.fromkeys(k for step in run["steps"] for k in step))
                run["steps"] = {k: [step.get(k, 0) for step in run["steps"]] for k in keys}
    path.write_text(json.dumps(results, separators=(",", ":")))


def read_json(path: Path) -> dict:
    results = json.loads(path.read_text())
    for data in results.get("regimes", {}).values():
        for runs in data.get("runs", {}).values():
            for run in runs:
                columns = run["steps"]
                if isinstance(columns, dict):
                    run["steps"] = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return results


def machine() -> str:
    cores = os.cpu_count()
    return (
        f"{platform.machine()} CPU, {cores} cores shared with other workers, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cgpo_vs_grpo"))
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("outputs/bench/cgpo_vs_grpo"),
        help="checkpoints and trainer folders (not committed)",
    )
    parser.add_argument("--regimes", nargs="*", default=["latency", "compute"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="latency regime's start (default: outputs/demo/sft, else outputs/bench/variants/sft)",
    )
    parser.add_argument("--latency_prompts", type=int, default=4)
    parser.add_argument("--latency_completions", type=int, default=512, help="completions per run")
    parser.add_argument("--compute_prompts", type=int, default=16)
    parser.add_argument("--compute_completions", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--eval_size", type=int, default=256, help="held-out images / prompts")
    parser.add_argument("--eval_points", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny setup (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.latency_prompts, args.latency_completions = 1, 2, 16
        args.compute_prompts, args.compute_completions, args.hidden, args.layers = 2, 16, 64, 2
        args.eval_size, args.eval_points = 4, 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.out / "cgpo_vs_grpo.json"
    results = read_json(path) if path.exists() and not args.smoke else {}
    results.update(machine=machine(), args={k: str(v) for k, v in vars(args).items()})
    results.setdefault("regimes", {})
    checkpoint = args.checkpoint or next(
        (p for p in (Path("outputs/demo/sft"), Path("outputs/bench/variants/sft")) if (p / "config.json").exists()),
        None,
    )
    for regime_name in args.regimes:
        if regime_name == "latency":
            regime = LatencyRegime(checkpoint, args.work, 1024 if not args.smoke else 64, args.eval_size)
            prompts, total = args.latency_prompts, args.latency_completions
        else:
            regime = ComputeRegime(args.work, args.hidden, args.layers, args.eval_size)
            prompts, total = args.compute_prompts, args.compute_completions
        data = results["regimes"].setdefault(regime_name, {})
        if data.get("prompts_per_step") != prompts or data.get("total_completions") != total:
            data.clear()  # a different setup: the old repeats are not comparable
        data.update(
            eval_size=args.eval_size,
            description=regime.description,
            prompts_per_step=prompts,
            total_completions=total,
            lr=args.lr,
            warmup=0 if args.smoke else 1,
        )
        data.setdefault("runs", {})
        for repeat in range(args.repeats):  # interleaved: repeat r of every configuration, then r + 1
            for name in args.configs:
                runs = data["runs"].setdefault(name, [])
                if len(runs) > repeat:
                    continue
                random.seed(args.seed)
                start = time.perf_counter()
                points = args.eval_points if repeat == 0 else 0
                runs.append(run_config(regime, name, prompts, total, args.seed, args.lr, points, args.work))
                print(f"[{regime_name}] {name} repeat {repeat}: {time.perf_counter() - start:.0f} s", flush=True)
                write_json(path, results)
    results["process_peak_rss_mib"] = max_rss_mib()
    print(report(results, args.out))
    write_json(path, results)
    return results


if __name__ == "__main__":
    main()
