"""CGPO against the single-rollout methods users would pick instead, and the group methods as references.

One protocol for every method and task:

* the same starting checkpoint, training prompts, rewards, learning rate, temperature and number of **generated
  completions per step** (so GRPO G=4 sees 4x fewer prompts per step than a single-rollout method);
* the same number of steps, so the same generated completions in total (A*-PO's offline pass of 8 samples per
  training prompt is added to its count);
* a held-out split never trained on, scored during training (the evaluation's time is excluded from the clock), so
  every run gives a curve of held-out score against generated completions and against training seconds;
* `--seeds` seeds per method (>= 5 for the reported tables), mean ± standard error over seeds.

Methods (all through `CGPOTrainer` options unless stated): the CGPO default and the CGPO variants designed from the
earlier measurements; `r - mean(r)`; REINFORCE++ with one sample (batch mean + batch whitening); SPO (per-prompt
tracker + whitening, constant rho or SPO's KL-adaptive one); TRL's own `A2POTrainer` (A*-PO); TRL's `GRPOTrainer`
with G = 4 and 8 and `RLOOTrainer` with G = 2 as group references.

Tasks: `addition` (tiny random Qwen2 LM SFT-warmed on two-number addition; seconds per run), `smollm2` (the real
SmolLM2-135M-Instruct on small additions; `python benchmarks/prepare_smollm2.py` fetches it once), `saliency`
(synthetic SOD with the tiny VLM and the graded `shapes` segmenter).

    python benchmarks/single_rollout.py --task addition --seeds 5 --out benchmarks/results/single_rollout/addition

Each (method, seed) run is written to `<out>/runs/<method>/seed<k>.json` as soon as it ends, so an interrupted
benchmark resumes; the starting checkpoint, logs and trainer folders go to `--work` (not committed). `--jobs 2` runs
two at a time (one torch thread each). `--report_only` rebuilds the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

METHODS: dict[str, tuple[str, dict]] = {
    "CGPO default": ("cgpo", {}),
    "CGPO default, whitened": ("cgpo", dict(scale_rewards="batch")),
    "CGPO value model": ("cgpo", dict(baseline="tracker_confidence")),
    "CGPO value model, whitened": ("cgpo", dict(baseline="tracker_confidence", scale_rewards="batch")),
    "r - mean(r)": ("cgpo", dict(baseline="batch_mean")),
    "REINFORCE++ k=1": ("cgpo", dict(baseline="batch_mean", scale_rewards="batch")),
    "SPO (tracker, whitened)": ("cgpo", dict(baseline="prompt_tracker", scale_rewards="batch")),
    "SPO (KL-adaptive rho)": (
        "cgpo",
        dict(baseline="prompt_tracker", scale_rewards="batch", tracker_rho_schedule="kl"),
    ),
    "A*-PO (TRL A2PO)": ("a2po", {}),
    "GRPO G=4": ("grpo", dict(num_generations=4)),
    "GRPO G=8": ("grpo", dict(num_generations=8)),
    "RLOO G=2": ("rloo", dict(num_generations=2)),
}
SINGLE_ROLLOUT_BASELINES = (
    "r - mean(r)",
    "REINFORCE++ k=1",
    "SPO (tracker, whitened)",
    "SPO (KL-adaptive rho)",
    "A*-PO (TRL A2PO)",
)
SEED_BLOCK = 5
"""Seeds are run in blocks of 5 (0-4, then 5-9 as a replication): the report also compares each block alone."""
GROUP_REFERENCES = ("GRPO G=4", "GRPO G=8", "RLOO G=2")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """What a method is trained and scored on. `score` is the held-out metric the tables report."""

    name: str
    completions_per_step: int
    steps: int
    lr: float
    max_completion_length: int
    eval_points: int = 4
    reward_weights: list[float] = field(default_factory=lambda: [1.0])
    extra_config: dict = field(default_factory=dict)
    method_overrides: dict = field(default_factory=dict)
    """Per-method config changes, each stated in the report (e.g. A*-PO's own learning rate)."""

    def prepare(self, out: Path) -> Path:  # the starting checkpoint
        raise NotImplementedError

    def load(self, checkpoint: Path):
        raise NotImplementedError

    def train_dataset(self):
        raise NotImplementedError

    def reward_funcs(self, model, processing_class) -> list[Callable]:
        raise NotImplementedError

    def evaluate(self, model, processing_class, seed: int) -> dict:
        raise NotImplementedError


class AdditionTask(Task):
    """Two-number addition with a tiny random Qwen2 LM SFT-warmed to about half right (benchmarks/cgpo_text_variants)."""

    def __init__(self):
        super().__init__(
            name="addition",
            completions_per_step=16,
            steps=300,
            lr=3e-4,
            max_completion_length=12,
            reward_weights=[1.0, 0.1],
        )
        import cgpo_text_variants as text

        self.text = text
        # A*-PO regresses beta2 * log(pi / pi_ref) onto r - V* with beta2 = 1e-3: at the shared lr (3e-4) it pushes
        # sampled log-probs by hundreds of nats and collapses (held-out 0.075 ± 0.066, 5 seeds); its lr was picked
        # from {1e-5, 3e-5, 1e-4} by the final *training* reward of seed 0.
        self.method_overrides = {"A*-PO (TRL A2PO)": {"learning_rate": 1e-4}}
        self.train_pairs, self.eval_pairs = text.make_pairs(30)

    def prepare(self, out: Path) -> Path:
        checkpoint = out / "start"
        if not (checkpoint / "config.json").exists():
            info = self.text.sft(checkpoint, self.train_pairs, self.eval_pairs, 0.5, 6000, seed=0)
            (out / "start.json").write_text(json.dumps(info))
        return checkpoint

    def load(self, checkpoint: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.padding_side = "left"
        return AutoModelForCausalLM.from_pretrained(checkpoint), tokenizer

    def train_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"prompt": [self.text.prompt(a, b) for a, b in self.train_pairs]})

    def reward_funcs(self, model, tokenizer):
        eos = tokenizer.eos_token_id

        def format(completions, completion_ids=None, **kwargs):  # the reward's logged name
            return self.text.format_reward(completions, completion_ids, eos)

        return [self.text.correctness_reward, format]

    def evaluate(self, model, tokenizer, seed: int) -> dict:
        stats = self.text.evaluate(model, tokenizer, self.eval_pairs, samples=4, seed=1234 + seed)
        return {"score": stats["accuracy"], **stats}


class SmolLM2Task(Task):
    """One-digit additions asked in SmolLM2-135M-Instruct's own chat format; reward 1 when the last number of the
    answer is the sum. The real model answers ~80% of them greedily but only ~15% when sampled at temperature 1:
    the headroom is in sharpening what it knows, which is what a policy gradient does."""

    def __init__(self):
        super().__init__(
            name="smollm2", completions_per_step=8, steps=24, lr=5e-6, max_completion_length=8, eval_points=3
        )
        pairs = [(a, b) for a in range(10) for b in range(10)]
        random.Random(0).shuffle(pairs)
        self.eval_pairs, self.train_pairs = pairs[:30], pairs[30:]

    @staticmethod
    def question(a: int, b: int) -> list[dict]:
        return [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}]

    def prepare(self, out: Path) -> Path:
        sys.path.insert(0, str(HERE))
        from prepare_smollm2 import prepare

        return prepare()

    def load(self, checkpoint: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(checkpoint), tokenizer

    def train_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict(
            {
                "prompt": [self.question(a, b) for a, b in self.train_pairs],
                "target": [a + b for a, b in self.train_pairs],
            }
        )

    @staticmethod
    def correct(text: str, target: int) -> float:
        numbers = re.findall(r"-?\d+", text)
        return float(bool(numbers) and int(numbers[-1]) == target)

    def reward_funcs(self, model, tokenizer):
        def correct(completions, target, **kwargs):
            texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
            return [self.correct(t, y) for t, y in zip(texts, target)]

        return [correct]

    def evaluate(self, model, tokenizer, seed: int, samples: int = 4) -> dict:
        import torch

        torch.manual_seed(1234 + seed)
        model.eval()
        texts = [
            tokenizer.apply_chat_template(self.question(a, b), tokenize=False, add_generation_prompt=True)
            for a, b in self.eval_pairs
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            sampled = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=self.max_completion_length,
                pad_token_id=tokenizer.pad_token_id,
            )[:, enc["input_ids"].size(1) :]
            greedy = model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_completion_length, pad_token_id=tokenizer.pad_token_id
            )[:, enc["input_ids"].size(1) :]
        model.train()
        targets = [a + b for a, b in self.eval_pairs]
        s = tokenizer.batch_decode(sampled, skip_special_tokens=True)
        g = tokenizer.batch_decode(greedy, skip_special_tokens=True)
        accuracy = statistics.mean(self.correct(t, targets[i // samples]) for i, t in enumerate(s))
        greedy_accuracy = statistics.mean(self.correct(t, y) for t, y in zip(g, targets))
        return {"score": accuracy, "accuracy": accuracy, "greedy_accuracy": greedy_accuracy}


class SaliencyTask(Task):
    """Synthetic SOD with the tiny demo VLM (SFT-warmed through the pipeline), `format` + `saliency` rewards through
    the `shapes` segmenter (graded by default), scored on 500 held-out images (greedy S-measure). TRL 1.16's
    A2POTrainer is text-only (it takes a tokenizer and never passes images), so A*-PO is not run on this task."""

    def __init__(self):
        super().__init__(
            name="saliency",
            completions_per_step=16,
            steps=300,
            lr=3e-4,
            max_completion_length=32,
            reward_weights=[0.1, 1.0],
            # the demo's measured RL settings (docs/demo/rl_sweep.md): a KL penalty to the start keeps it stable
            extra_config={"beta": 0.1},
        )
        import common

        self.common = common
        self.eval_rows = common.saliency_rows(500, "test", seed=0)

    def prepare(self, out: Path) -> Path:
        checkpoint = out / "start"
        if not (checkpoint / "config.json").exists():
            info = self.common.warm_checkpoint(checkpoint, minutes=6.0)
            (out / "start.json").write_text(json.dumps(info))
        return checkpoint

    def load(self, checkpoint: Path):
        from cgpo_trl.models import load_model_and_processor

        return load_model_and_processor(str(checkpoint))

    def train_dataset(self):
        return self.common.saliency_rows(4096, "train", seed=0)

    def reward_funcs(self, model, processor):
        return self.common.saliency_rewards(processor, model, self.max_completion_length)

    def evaluate(self, model, processor, seed: int) -> dict:
        funcs = self.reward_funcs(model, processor)
        stats = self.common.evaluate_saliency(model, processor, self.eval_rows, funcs, self.max_completion_length)
        return {"score": stats["Sm"], **stats}


TASKS = {"addition": AdditionTask, "smollm2": SmolLM2Task, "saliency": SaliencyTask}


# ----------------------------------------------------------------------------------------------------- one run
def build_trainer(task: Task, method: str, model, processing_class, seed: int, out: Path):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from cgpo_trl import CGPOConfig, CGPOTrainer

    kind, overrides = METHODS[method]
    overrides = {**overrides, **task.method_overrides.get(method, {})}
    common = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        learning_rate=task.lr,
        lr_scheduler_type="constant",
        max_steps=task.steps,
        per_device_train_batch_size=task.completions_per_step,
        max_completion_length=task.max_completion_length,
        temperature=1.0,
        logging_steps=max(1, task.steps // 20),
        report_to=[],
        save_strategy="no",
        seed=seed,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        disable_tqdm=True,
        beta=0.0,
    )
    common.update(task.extra_config)
    funcs = task.reward_funcs(model, processing_class)
    dataset = task.train_dataset()
    if kind == "a2po":
        from trl.experimental.a2po import A2POConfig, A2POTrainer

        settings = {**{k: v for k, v in common.items() if k != "beta"}, **overrides}
        args = A2POConfig(**settings, reward_weights=task.reward_weights)
        return A2POTrainer(model, funcs, args=args, train_dataset=dataset, processing_class=processing_class)
    if kind == "grpo":
        args = GRPOConfig(**common, reward_weights=task.reward_weights, **overrides)
        return GRPOTrainer(model, funcs, args=args, train_dataset=dataset, processing_class=processing_class)
    if kind == "rloo":
        args = RLOOConfig(**common, reward_weights=task.reward_weights, **overrides)
        return RLOOTrainer(model, funcs, args=args, train_dataset=dataset, processing_class=processing_class)
    args = CGPOConfig(**common, reward_weights=task.reward_weights, **overrides)
    return CGPOTrainer(model, funcs, args=args, train_dataset=dataset, processing_class=processing_class)


def run_one(task: Task, method: str, seed: int, checkpoint: Path, out: Path) -> dict:
    import warnings

    import torch
    from transformers import TrainerCallback

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, processing_class = task.load(checkpoint)
    points = sorted({max(1, round(task.steps * k / task.eval_points)) for k in range(1, task.eval_points + 1)})
    curve: list[dict] = []
    clock = {"start": None, "excluded": 0.0}

    class HeldOut(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in points:
                t0 = time.perf_counter()
                seconds = t0 - clock["start"] - clock["excluded"]  # training time only
                stats = task.evaluate(model, processing_class, seed)
                clock["excluded"] += time.perf_counter() - t0
                curve.append({"step": state.global_step, "seconds": seconds, **stats})

    trainer = build_trainer(task, method, model, processing_class, seed, out / "trainer")
    trainer.add_callback(HeldOut())
    offline = 0
    if METHODS[method][0] == "a2po":
        t0 = time.perf_counter()
        trainer._estimate_optimal_values()  # stage 1: timed and counted with the run
        offline_seconds = time.perf_counter() - t0
        offline = len(task.train_dataset()) * trainer.args.num_value_samples
    else:
        offline_seconds = 0.0
    trainer.train()
    for point in curve:
        point["completions"] = offline + point["step"] * task.completions_per_step
        point["seconds"] += offline_seconds
    history = trainer.state.log_history
    entropies = [h["entropy"] for h in history if "entropy" in h]
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "final": curve[-1],
        "offline_completions": offline,
        "entropy_ratio": entropies[-1] / entropies[0] if len(entropies) > 1 else math.nan,
        "train_reward": [h["reward"] for h in history if "reward" in h],
        "zero_advantage_batches": sum(h.get("cgpo/zero_advantage_batch", 0.0) for h in history),
        # SPO's adaptive forgetting: mean drift and rho over the logged steps that revisited a prompt
        "tracker_drift": mean_logged(history, "cgpo/tracker_drift"),
        "tracker_rho": mean_logged(history, "cgpo/tracker_rho"),
    }


def mean_logged(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if key in h]
    return statistics.mean(values) if values else math.nan


# ----------------------------------------------------------------------------------------------------- report
def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def interpolate(curve: list[dict], key: str, x: float, score: str = "score") -> float:
    """Held-out score at `x` (completions or seconds) by linear interpolation; NaN outside the measured range."""
    xs, ys = [p[key] for p in curve], [p[score] for p in curve]
    if not xs or x < xs[0] or x > xs[-1]:
        return math.nan
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def load_runs(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for method in METHODS:
        folder = out / "runs" / slug(method)
        for path in sorted(folder.glob("seed*.json")):
            runs.setdefault(method, []).append(json.loads(path.read_text()))
    return runs


def report(out: Path, task: Task, start: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(out)
    if not runs:
        return "no runs yet"
    common_seconds = min(max(p["seconds"] for p in r["curve"]) for rs in runs.values() for r in rs)
    lines = [
        f"Task `{task.name}`: {task.steps} steps x {task.completions_per_step} generated completions, lr {task.lr}; "
        f"held-out score at the start {start['score']:.3f} ± {start.get('score_se', math.nan):.3f}.",
        "",
        f"| method | seeds | held-out score (equal completions) | at equal time ({common_seconds:.0f} s) | "
        "greedy | completions | train s/run | entropy end/start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for method, rs in runs.items():
        final, final_se = mean_se([r["final"]["score"] for r in rs])
        timed, timed_se = mean_se([interpolate(r["curve"], "seconds", common_seconds) for r in rs])
        greedy = mean_se([r["final"].get("greedy_accuracy", r["final"].get("Sm", math.nan)) for r in rs])[0]
        seconds = mean_se([r["final"]["seconds"] for r in rs])[0]
        summary[method] = {
            "score": final,
            "score_se": final_se,
            "at_equal_time": timed,
            "at_equal_time_se": timed_se,
            "seeds": len(rs),
            "scores": [r["final"]["score"] for r in rs],
        }
        lines.append(
            f"| {method} | {len(rs)} | {final:.3f} ± {final_se:.3f} | {timed:.3f} ± {timed_se:.3f} | {greedy:.3f} | "
            f"{rs[0]['final']['completions']} | {seconds:.0f} | {mean_se([r['entropy_ratio'] for r in rs])[0]:.2f} |"
        )
    for method, changes in task.method_overrides.items():
        lines.append(f"\n{method} runs with {changes} (see the task's note in benchmarks/single_rollout.py).")
    for method, rs in runs.items():
        measured = [r for r in rs if not math.isnan(r.get("tracker_drift", math.nan))]
        if measured:
            drift = statistics.mean(r["tracker_drift"] for r in measured)
            rho = statistics.mean(r["tracker_rho"] for r in measured)
            lines.append(
                f"\n{method}: mean log-prob drift between two visits {drift:.3f} nats, mean adaptive rho "
                f"{rho:.3f} ({len(measured)} seeds)."
            )
    lines += ["", *verdict(runs, summary, start)]
    (out / "summary.json").write_text(json.dumps({"task": task.name, "start": start, "methods": summary}, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for index, (method, rs) in enumerate(runs.items()):
        style = "--" if method in GROUP_REFERENCES else (":" if method in SINGLE_ROLLOUT_BASELINES else "-")
        for ax, key in zip(axes, ("completions", "seconds")):
            xs = [statistics.mean(p[key] for p in points) for points in zip(*[r["curve"] for r in rs])]
            ys = [statistics.mean(p["score"] for p in points) for points in zip(*[r["curve"] for r in rs])]
            ax.plot(
                [0, *xs] if key == "seconds" else [rs[0]["offline_completions"], *xs],
                [start["score"], *ys],
                style,
                marker="o",
                ms=3,
                label=method,
                color=plt.cm.tab20(index),
            )
    axes[0].set_xlabel("generated completions (A*-PO: offline pass included)")
    axes[1].set_xlabel("training seconds (held-out evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("held-out score")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{task.name}: mean over seeds (solid: CGPO, dotted: single-rollout baselines, dashed: groups)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def paired_difference(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean and standard error of the per-seed differences of final scores (runs `a` minus runs `b`)."""
    score_a = {r["seed"]: r["final"]["score"] for r in a}
    score_b = {r["seed"]: r["final"]["score"] for r in b}
    diffs = [score_a[k] - score_b[k] for k in sorted(score_a.keys() & score_b.keys())]
    if len(diffs) < 2:
        return math.nan, math.nan
    return statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def seed_subset(runs: list[dict], seeds: range) -> list[dict]:
    return [r for r in runs if r["seed"] in seeds]


def gap_in_se(a: list[dict], b: list[dict], paired: bool) -> float:
    """Mean final score of runs `a` minus runs `b`, in standard errors: unpaired (independent means), or paired by
    seed — a seed fixes the prompt order and the held-out sampling for every method (common random numbers), so
    the per-seed differences cancel that shared noise."""
    score_a = {r["seed"]: r["final"]["score"] for r in a}
    score_b = {r["seed"]: r["final"]["score"] for r in b}
    if paired:
        diff, se = paired_difference(a, b)
        return diff / se if se > 0 else math.nan
    if min(len(score_a), len(score_b)) < 2:
        return math.nan
    se = math.sqrt(
        statistics.variance(score_a.values()) / len(score_a) + statistics.variance(score_b.values()) / len(score_b)
    )
    return (statistics.mean(score_a.values()) - statistics.mean(score_b.values())) / se if se > 0 else math.nan


def verdict(runs: dict, summary: dict, start: dict) -> list[str]:
    """The issue's two claims, computed: a CGPO variant >= 2 s.e. above every single-rollout baseline, and reaching
    GRPO G=8's final score with <= 1/4 of its completions."""
    lines = []
    baselines = [m for m in SINGLE_ROLLOUT_BASELINES if m in summary]
    cgpo = [m for m in summary if m.startswith("CGPO")]
    for method in cgpo:
        for paired in (False, True):
            gaps = [(other, gap_in_se(runs[method], runs[other], paired)) for other in baselines]
            beats = all(g >= 2 for _, g in gaps) if gaps else False
            worst = min(gaps, key=lambda x: x[1]) if gaps else ("-", math.nan)
            lines.append(
                f"- {method}: {'beats' if beats else 'does not beat'} every single-rollout baseline by >= 2 s.e. "
                f"{'paired by seed' if paired else 'unpaired'} (closest: {worst[0]}, {worst[1]:.1f} s.e.)"
            )
        others = [m for m in (*baselines, *GROUP_REFERENCES) if m in runs]
        lines.append(
            f"- {method} minus, paired by seed: "
            + "; ".join("{} {:+.3f} ± {:.3f}".format(m, *paired_difference(runs[method], runs[m])) for m in others)
        )
        # seeds added later (a replication) are also compared on their own, block by block of SEED_BLOCK
        blocks = sorted({r["seed"] // SEED_BLOCK for r in runs[method]})
        for block in blocks if len(blocks) > 1 else []:
            seeds = range(block * SEED_BLOCK, (block + 1) * SEED_BLOCK)
            parts = []
            for m in others:
                diff, se = paired_difference(seed_subset(runs[method], seeds), seed_subset(runs[m], seeds))
                if not math.isnan(diff):
                    parts.append(
                        f"{m} {diff:+.3f} ± {se:.3f} ({diff / se:.1f} s.e.)" if se > 0 else f"{m} {diff:+.3f}"
                    )
            if parts:
                lines.append(f"- {method} minus, paired, seeds {seeds[0]}-{seeds[-1]} only: " + "; ".join(parts))
    if "GRPO G=8" in runs:
        target = summary["GRPO G=8"]["score"]
        budget = runs["GRPO G=8"][0]["final"]["completions"]
        if target <= start["score"]:
            lines.append(
                f"- GRPO G=8 ends at {target:.3f}, not above the start ({start['score']:.3f}): 'reaching its final "
                "score' says nothing here, so that claim is not tested on this task"
            )
            return lines
        for method in cgpo:
            reached = [
                next((p["completions"] for p in r["curve"] if p["score"] >= target), math.inf) for r in runs[method]
            ]
            frac = statistics.mean(reached) / budget
            first = runs[method][0]["curve"][0]["completions"] / budget
            lines.append(
                f"- {method}: reaches GRPO G=8's final held-out score ({target:.3f}) after "
                f"{'never (in some seed)' if math.isinf(frac) else f'{frac:.2f} x'} GRPO G=8's completions (mean "
                f"over seeds; target <= 0.25; first held-out evaluation at {first:.2f} x)"
            )
    return lines


def start_score(task: Task, checkpoint: Path, out: Path, repeats: int = 5) -> dict:
    path = out / "start_score.json"
    if path.exists():
        return json.loads(path.read_text())
    model, processing_class = task.load(checkpoint)
    scores = [task.evaluate(model, processing_class, seed)["score"] for seed in range(repeats)]
    start = {"score": statistics.mean(scores), "score_se": statistics.stdev(scores) / math.sqrt(repeats)}
    path.write_text(json.dumps(start))
    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="addition")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="checkpoints, logs, trainer folders (default outputs/bench/...)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, help="override the task's steps")
    parser.add_argument("--lr", type=float, help="override the task's learning rate")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    task = TASKS[args.task]()
    if args.steps:
        task.steps = args.steps
    if args.lr:
        task.lr = args.lr
    out = args.out or Path("outputs/bench/single_rollout") / args.task
    work = args.work or Path("outputs/bench/single_rollout_work") / args.task
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = task.prepare(work)
    if args.one:
        method, seed = args.one[0], int(args.one[1])
        result = run_one(task, method, seed, checkpoint, work / slug(method) / f"seed{seed}")
        path = out / "runs" / slug(method) / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return
    start = start_score(task, checkpoint, out)
    if (work / "start.json").exists():
        start["preparation"] = json.loads((work / "start.json").read_text())
    if not args.report_only:
        todo = [
            (m, s)
            for s in range(args.first_seed, args.first_seed + args.seeds)  # seeds outermost: partial runs compare
            for m in args.methods
            if not (out / "runs" / slug(m) / f"seed{s}.json").exists()
        ]
        running: list[subprocess.Popen] = []
        for index, (method, seed) in enumerate(todo):
            while len(running) >= args.jobs:
                running = [p for p in running if p.poll() is None]
                time.sleep(1)
            cmd = [sys.executable, __file__, "--task", args.task, "--out", str(out), "--work", str(work)]
            cmd += ["--one", method, str(seed)]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if args.lr:
                cmd += ["--lr", str(args.lr)]
            print(f"[{index + 1}/{len(todo)}] {method} seed {seed}", flush=True)
            with open(work / f"{slug(method)}_seed{seed}.log", "w") as log:
                running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for p in running:
            p.wait()
    print(report(out, task, start))


if __name__ == "__main__":
    main()
