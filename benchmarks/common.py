"""Shared pieces of the benchmark scripts: step profiling, memory sampling, the saliency task and its evaluation.

Not a library module: the scripts in this folder import it as a sibling (`python benchmarks/X.py` puts the folder on
`sys.path`).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def max_rss_mib() -> float:
    """Peak resident set of this process so far (`getrusage`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RSSSampler:
    """Peak resident memory *during* a block: several configurations share one process, so `getrusage`'s
    process-wide maximum cannot tell them apart; a 20 ms sampler thread can."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self):
        self.peak = current_rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())
        return False


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def rl_settings(
    output_dir: Path,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    max_completion_length: int,
    seed: int,
    reward_weights: list[float],
    logging_steps: int,
) -> dict:
    """GRPOConfig / CGPOConfig fields every RL benchmark run shares: CPU, constant lr, temperature 1, no KL, and the
    optimiser settings measured to keep the tiny models stable (adam beta2 0.98, grad clip 1)."""
    return dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        max_completion_length=max_completion_length,
        temperature=1.0,
        logging_steps=logging_steps,
        report_to=[],
        save_strategy="no",
        seed=seed,
        reward_weights=reward_weights,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        disable_tqdm=True,
        beta=0.0,
    )


def median_spread(values: list[float]) -> tuple[float, float]:
    """Median and half the inter-quartile range (robust on a shared, noisy machine)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if len(values) < 4:
        return statistics.median(values), (max(values) - min(values)) / 2
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), (q[2] - q[0]) / 2


class StepProfiler(TrainerCallback):
    """Per optimizer step: wall time split into generation / reward / loss forward+backward / confidence / rest,
    completion tokens, model forward calls (a forward pre-hook) and completions.

    TRL 1.16's `profiling_context` only reports to wandb/mlflow/trackio, so the same methods are timed here by
    wrapping them on the trainer instance: `_generate` (sampling), `_calculate_rewards` (reward functions, the
    segmenter included), `compute_loss` + `backward` (`training_step` minus `_prepare_inputs`), and for CGPO
    `_advantages` (confidence + advantage, inside the loss pass).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps: list[dict] = []
        self.excluded = 0.0  # seconds spent in evaluation callbacks, removed from the wall clock
        self._acc = self._fresh()
        self._wrap("_generate", "generation")
        self._wrap("_calculate_rewards", "reward")
        self._wrap("_prepare_inputs", "prepare")
        self._wrap("training_step", "training_step")
        if hasattr(trainer, "_advantages"):
            self._wrap("_advantages", "confidence")
            self._wrap("_max_logprob", "max_logprob")  # the no-grad LM-head projection of `max_prob`
            self._wrap("_log_cgpo_metrics", "confidence_metrics")  # logging: gathers, correlation, ECE
            if getattr(trainer, "calibrator", None) is not None:
                self._wrap("commit", "calibration_fit", owner=trainer.calibrator)  # online map refit
        original = trainer._generate_and_score_completions

        def counted(inputs):
            output = original(inputs)
            self._acc["completion_tokens"] += int(output["completion_mask"].sum())
            self._acc["completions"] += int(output["completion_mask"].size(0))
            return output

        trainer._generate_and_score_completions = counted
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.register_forward_pre_hook(self._count_forward)
        trainer.add_callback(self)

    @staticmethod
    def _fresh() -> dict:
        return dict(
            generation=0.0,
            reward=0.0,
            prepare=0.0,
            training_step=0.0,
            confidence=0.0,
            max_logprob=0.0,
            confidence_metrics=0.0,
            calibration_fit=0.0,
            completion_tokens=0,
            completions=0,
            forward_calls=0,
        )

    def _count_forward(self, module, args):
        self._acc["forward_calls"] += 1

    def _wrap(self, name: str, key: str, owner=None) -> None:
        owner = self.trainer if owner is None else owner
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._acc[key] += time.perf_counter() - start

        setattr(owner, name, timed)

    def on_step_begin(self, args, state, control, **kwargs):
        self._acc = self._fresh()
        self._t0 = time.perf_counter()
        self._excluded0 = self.excluded

    def on_step_end(self, args, state, control, **kwargs):
        acc = self._acc
        wall = time.perf_counter() - self._t0 - (self.excluded - self._excluded0)
        loss = acc["training_step"] - acc["prepare"]
        self.steps.append(
            dict(
                step=state.global_step,
                wall=wall,
                generation=acc["generation"],
                reward=acc["reward"],
                forward_backward=loss,
                confidence=acc["confidence"],
                max_logprob=acc["max_logprob"],
                confidence_metrics=acc["confidence_metrics"],
                calibration_fit=acc["calibration_fit"],
                other=wall - acc["generation"] - acc["reward"] - loss,
                completion_tokens=acc["completion_tokens"],
                completions=acc["completions"],
                forward_calls=acc["forward_calls"],
            )
        )


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# ------------------------------------------------------------------------------------------ saliency task
def saliency_rows(num_samples: int, split: str, seed: int = 0, **options):
    """Synthetic SOD rows with the short instruction the tiny demo model is trained with."""
    from cgpo_trl.pipeline import DatasetSpec, build_mixture

    spec = DatasetSpec(
        name="synthetic",
        task="sod",
        num_samples=num_samples,
        split=split,
        options={"image_size": 56, "seed": seed, **options},
    )
    return build_mixture([spec], instruction="short")


def saliency_rewards(processor, model, max_completion_length: int, cache_size: int = 4096):
    """`format` (EOS-aware) + `saliency` (S-measure through the weight-free `shapes` segmenter), as in the demo.

    `shapes` is graded by default: a partly wrong expression segments the best-fitting object, whose mask quality is
    the reward (`strict=True` in `segmenter_kwargs` restores all-or-nothing matching)."""
    from cgpo_trl.pipeline import SaliencyScriptArguments, build_reward_funcs

    script = SaliencyScriptArguments(
        segmenter="shapes",
        segmenter_cache_size=cache_size,
        reward_funcs=["format", "saliency"],
        reward_kwargs={"require_think": False},
    )
    return build_reward_funcs(script, processor, model, max_completion_length)


REWARD_WEIGHTS = [0.1, 1.0]  # format, saliency (recipes/saliency/demo_cpu.yaml)


@torch.no_grad()
def evaluate_saliency(
    model, processor, rows, reward_funcs, max_new_tokens: int = 32, batch_size: int = 64, temperature: float = 0.0
) -> dict:
    """Held-out SOD: S-measure (the saliency reward), accuracy (predicted mask IoU >= 0.5 with the ground truth),
    format rate, EOS rate and the weighted training reward, from greedy (or sampled) answers."""
    from cgpo_trl.saliency.tags import parse_answer

    segmenter = next(f.segmenter for f in reward_funcs if hasattr(f, "segmenter"))
    saliency = next(f for f in reward_funcs if hasattr(f, "segmenter"))
    fmt = next(f for f in reward_funcs if not hasattr(f, "segmenter"))
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    eos_ids = set(fmt.eos_token_ids) if getattr(fmt, "eos_token_ids", None) else {tokenizer.eos_token_id}
    was_training = model.training
    model.eval()
    totals = dict(Sm=0.0, accuracy=0.0, format=0.0, eos=0.0, reward=0.0)
    n, rewards = 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = chunk["prompt"]
        texts = [processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        images = [[im.convert("RGB") for im in ims] for ims in chunk["images"]]
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        out = model.generate(**enc, **kwargs)[:, enc["input_ids"].size(1) :]
        ids = out.tolist()
        ids = [row[: next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))] for row in ids]
        completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
        columns = {k: chunk[k] for k in ("images", "task", "masks", "instances")}
        s = saliency(prompts=prompts, completions=completions, completion_ids=ids, **columns)
        f = fmt(prompts=prompts, completions=completions, completion_ids=ids, **columns)
        for i, text in enumerate(completions):
            parsed = parse_answer(text, "sod")
            sm = 0.0 if s[i] is None else s[i]
            totals["Sm"] += sm
            totals["format"] += float(f[i] or 0.0)
            totals["eos"] += float(ids[i][-1] in eos_ids)
            rewards.append((REWARD_WEIGHTS[0] * float(f[i] or 0.0) + REWARD_WEIGHTS[1] * sm) / sum(REWARD_WEIGHTS))
            totals["reward"] += rewards[-1]
            if parsed.regions:
                image = chunk["images"][i][0].convert("RGB")
                masks = [m for m, _ in segmenter.segment([image] * len(parsed.regions), parsed.regions)]
                pred = np.max(np.stack(masks), axis=0) >= 0.5
                gt = np.asarray(chunk["masks"][i][0]) > 127
                union = np.logical_or(pred, gt).sum()
                totals["accuracy"] += float(union > 0 and np.logical_and(pred, gt).sum() / union >= 0.5)
        n += len(completions)
    if was_training:
        model.train()
    result = {k: v / max(n, 1) for k, v in totals.items()}
    result["reward_se"] = statistics.stdev(rewards) / math.sqrt(n) if n > 1 else math.nan
    return result


class TimeLimit(TrainerCallback):
    """Stop after `minutes` of wall time (the SFT warm-up's budget is time, not steps)."""

    def __init__(self, minutes: float):
        self.seconds, self.start = minutes * 60, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True


def warm_checkpoint(out: Path, minutes: float, max_steps: int = 3000, seed: int = 0) -> dict:
    """SFT the tiny demo VLM on synthetic SOD (the demo's SFT settings, SOD only) for `minutes`, through
    `cgpo_trl.pipeline` — the RL starting point when the demo's `outputs/demo/sft` is absent."""
    from trl import ModelConfig, SFTConfig

    from cgpo_trl.pipeline import SaliencyScriptArguments, build_sft_trainer, parse_args, train_and_save

    config = Path(__file__).resolve().parent.parent / "recipes" / "saliency" / "demo_cpu_sft.yaml"
    datasets = [
        {
            "name": "synthetic",
            "task": "sod",
            "num_samples": 8192,
            "options": {"image_size": 56, "single_object_fraction": 0.5},
        }
    ]
    script, training, model_args = parse_args(
        (SaliencyScriptArguments, SFTConfig, ModelConfig),
        [
            "--config",
            str(config),
            "--output_dir",
            str(out),
            "--datasets",
            json.dumps(datasets),
            "--max_steps",
            str(max_steps),
            "--seed",
            str(seed),
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ],
    )
    trainer = build_sft_trainer(script, training, model_args)
    trainer.add_callback(TimeLimit(minutes))
    start = time.monotonic()
    train_and_save(trainer, script, model_args, stage="sft")
    return {"steps": trainer.state.global_step, "seconds": time.monotonic() - start, "minutes_budget": minutes}
