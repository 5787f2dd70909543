"""The prepared GPU check: run, in one call on a CUDA machine, what no CPU here can show (docs/gpu_check.md).

Sections, each independent (a failure is recorded with its traceback and the next section still runs), inside one
time budget (`--budget_s`): each section has a share of it, a training run stops at its section's deadline, and a run
or section that would start after it is listed as skipped.

- `environment`: library versions and the device.
- `lm`: a random Qwen2.5-0.5B-shaped LM (494 M parameters; LM head of 151,936 rows over the small test tokenizer)
  in bf16. CGPO with the library defaults (token baseline `max_prob`, online calibration), CGPO with `self_agreement`
  (a baseline read off the fused LM head's statistics: no extra projection) and GRPO with G = 4, at equal prompts per
  step; CGPO and GRPO again with gradient checkpointing. Repeats are interleaved. Per configuration: median step time
  and its split (generation / reward / loss forward+backward / confidence, with the `max_prob` projection and the
  calibration refit inside it) and peak GPU memory (`torch.cuda.max_memory_allocated`); per pair, the median of the
  per-repeat step-time ratios.
- `vlm_evf_sam`, `vlm_evf_sam2`: a random Qwen2.5-VL-shaped model (434 M parameters, same LM head) in bf16 with
  gradient checkpointing, CGPO steps on synthetic SOD + SIS images with the `format` + `saliency` rewards through a
  tiny random EVF-SAM (EVF-SAM2) checkpoint loaded by `load_segmenter` in fp16 on the GPU (`device: auto`, as the
  recipes do); then the rows' reference answers through the same segmenter into `cgpo_trl.predict` and the SOD and
  SIS metrics on those masks.

A random policy writes malformed answers, which score 0 and never reach the segmenter; so a third reward scores each
row's reference answer through the same `saliency` reward. The segmenter then runs inside every training step, and
with its weight (0.5) the rewards, the advantages and so the gradients are not all zero.

    python scripts/gpu_check.py --out outputs/gpu_check/gpu_check.json   # on a CUDA machine
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check.json         # CPU, tiny sizes, fp32 (the test suite)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from cgpo_vs_grpo import paired_ratios, rounded  # noqa: E402
from common import RSSSampler, StepProfiler, TimeLimit, median_spread, rl_settings, slug  # noqa: E402

QWEN_VOCAB = 151_936
SECTION_SHARES = {"environment": 0.0, "lm": 0.55, "vlm_evf_sam": 0.225, "vlm_evf_sam2": 0.225}
"""Share of the time budget per section; a section's deadline is the running sum over the sections selected."""
LM_CONFIGS: dict[str, dict] = {
    "CGPO": {},
    "GRPO G=4": {"num_generations": 4},
    "CGPO self_agreement": {"confidence": "self_agreement"},
    "CGPO gc": {"gradient_checkpointing": True},
    "GRPO G=4 gc": {"num_generations": 4, "gradient_checkpointing": True},
}
"""Run order inside each repeat: the pair the ratio needs first, so a tight budget still measures it."""
RATIOS = (("CGPO", "GRPO G=4"), ("CGPO self_agreement", "GRPO G=4"), ("CGPO gc", "GRPO G=4 gc"))
PHASES = ("wall", "generation", "reward", "forward_backward", "confidence", "max_logprob", "calibration_fit", "other")
PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "datasets",
    "tokenizers",
    "huggingface-hub",
    "numpy",
    "pyarrow",
    "pysodmetrics",
    "pycocotools",
    "scikit-image",
    "sentencepiece",
)


@dataclass(frozen=True)
class Setup:
    """Sizes and precision of one mode: the GPU check, or its CPU smoke version."""

    device: str
    model_dtype: torch.dtype
    segmenter_dtype: str
    lm: dict
    vlm: dict
    lm_prompts: int
    lm_completion: int
    vlm_prompts: int
    vlm_completion: int
    repeats: int
    steps: int  # per run; the first is a warm-up left out of the medians
    budget_s: float
    notes: list[str] = field(default_factory=list)


GPU = Setup(
    device="cuda",
    model_dtype=torch.bfloat16,
    segmenter_dtype="float16",
    # Qwen2.5-0.5B's shape.
    lm=dict(
        hidden_size=896,
        num_layers=24,
        config_overrides=dict(
            intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=QWEN_VOCAB
        ),
    ),
    # Qwen2.5-VL's vision tower width, 8 of its 32 blocks; a 1024-wide, 8-layer text model.
    vlm=dict(
        hidden_size=1024,
        num_layers=8,
        vision_hidden_size=1280,
        vision_depth=8,
        image_size=448,
        text_config=dict(
            vocab_size=QWEN_VOCAB,
            intermediate_size=2816,
            num_attention_heads=16,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        vision_config=dict(intermediate_size=3420, num_heads=16, fullatt_block_indexes=[3, 7]),
    ),
    lm_prompts=16,
    lm_completion=128,
    vlm_prompts=8,
    vlm_completion=64,
    repeats=2,
    steps=3,
    budget_s=300,
)
SMOKE = Setup(
    device="cpu",
    model_dtype=torch.float32,
    segmenter_dtype="float32",
    # An LM head larger than the tokenizer, as in the GPU sizes.
    lm=dict(config_overrides=dict(vocab_size=1024)),
    vlm=dict(text_config=dict(vocab_size=1024)),
    lm_prompts=2,
    lm_completion=8,
    vlm_prompts=2,
    vlm_completion=8,
    repeats=1,
    steps=2,
    budget_s=300,
    notes=["smoke: CPU, tiny sizes, fp32 (transformers refuses bf16 training without a GPU); memory is peak RSS"],
)


# ------------------------------------------------------------------------------------------ timing and memory
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncedStepProfiler(StepProfiler):
    """`StepProfiler` that waits for the GPU around each timed phase and at each step boundary.

    CUDA kernels run asynchronously: without the waits, work queued by one phase (the loss forward) would be charged
    to whichever phase next waits for it (the confidence). The wait before a phase runs outside its clock, the wait
    after it inside.
    """

    def _wrap(self, name: str, key: str, owner=None) -> None:
        target = self.trainer if owner is None else owner
        original = getattr(target, name)

        def finished(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()

        setattr(target, name, finished)
        super()._wrap(name, key, owner)
        timed = getattr(target, name)

        def started(*args, **kwargs):
            synchronize()
            return timed(*args, **kwargs)

        setattr(target, name, started)

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        super().on_step_end(args, state, control, **kwargs)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_measured(trainer, deadline: float) -> dict:
    """Train with per-step profiling until `max_steps` or the deadline; peak memory of the run (GPU: allocated by
    torch, from a reset just before training; CPU: resident set)."""
    profiler = SyncedStepProfiler(trainer)
    trainer.add_callback(TimeLimit(max(deadline - time.monotonic(), 0.0) / 60))
    trainer.remove_callback(PrinterCallback)  # the JSON keeps what matters; the log lines would bury the table
    cuda = torch.cuda.is_available()
    if cuda:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    with RSSSampler() as rss:
        trainer.train()
    synchronize()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    run = dict(
        steps=profiler.steps,
        loss=[entry["loss"] for entry in logs],
        grad_norm=[entry.get("grad_norm", math.nan) for entry in logs],
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak,
    )
    if cuda:
        run.update(peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20, allocated_before_train_mib=before)
    return run


def phase_medians(runs: list[dict], warmup: int = 1) -> dict:
    """Median of each phase over the measured steps of every run (the warm-up steps left out)."""
    steps = [s for run in runs for s in run["steps"][warmup:]]
    out = {key: median_spread([s[key] for s in steps])[0] for key in PHASES}
    out["completions_per_step"] = median_spread([s["completions"] for s in steps])[0]
    out["completion_tokens_per_step"] = median_spread([s["completion_tokens"] for s in steps])[0]
    out["confidence_share"] = out["confidence"] / out["wall"] if steps else math.nan
    out["peak_memory_mib"] = max(run["peak_memory_mib"] for run in runs)
    out["measured_steps"] = len(steps)
    return out


def build_model(builder: Callable, setup: Setup, **kwargs):
    """A `cgpo_trl.testing` builder's model created on the target device (fast for 0.5 B parameters), in its dtype."""
    with torch.device(setup.device):
        model, processing_class = builder(**kwargs)
    return model.to(setup.model_dtype), processing_class


def trainer_settings(setup: Setup, out: Path, batch_size: int, completion: int, weights: list[float]) -> dict:
    """The benchmarks' RL settings (`common.rl_settings`) on this setup's device and precision."""
    settings = rl_settings(
        out,
        lr=1e-6,
        steps=setup.steps,
        batch_size=batch_size,
        max_completion_length=completion,
        seed=0,
        reward_weights=weights,
        logging_steps=1,
    )
    settings.update(use_cpu=setup.device == "cpu", bf16=setup.device == "cuda")
    return settings


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ sections
def environment_section(setup: Setup, work: Path, deadline: float) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    data = dict(python=platform.python_version(), packages=versions, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return data


def lm_run(setup: Setup, name: str, work: Path, deadline: float) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from cgpo_trl import CGPOConfig, CGPOTrainer
    from cgpo_trl.testing import build_tiny_lm, length_reward, text_prompt_dataset

    options = dict(LM_CONFIGS[name])
    group = options.get("num_generations", 1)
    model, tokenizer = build_model(build_tiny_lm, setup, **setup.lm)
    settings = trainer_settings(setup, work / slug(name), setup.lm_prompts * group, setup.lm_completion, [1.0])
    config_class, trainer_class = (CGPOConfig, CGPOTrainer) if group == 1 else (GRPOConfig, GRPOTrainer)
    trainer = trainer_class(
        model,
        [length_reward],
        args=config_class(**settings, **options),
        train_dataset=text_prompt_dataset(setup.lm_prompts * setup.steps),
        processing_class=tokenizer,
    )
    return dict(parameters=parameters(model), **train_measured(trainer, deadline))


def lm_section(setup: Setup, work: Path, deadline: float) -> dict:
    # runs[name][r] is repeat r, None when it failed or was skipped: ratios pair runs of the same repeat only.
    runs: dict[str, list[dict | None]] = {name: [] for name in LM_CONFIGS}
    errors, skipped = {}, []
    for repeat in range(setup.repeats):  # interleaved: repeat r of every configuration, then r + 1
        for name in LM_CONFIGS:
            run = None
            if time.monotonic() >= deadline:
                skipped.append(f"{name} #{repeat}")
            else:
                try:
                    run = lm_run(setup, name, work / f"repeat{repeat}", deadline)
                except Exception:
                    errors[f"{name} #{repeat}"] = traceback.format_exc()
                free_memory()
            runs[name].append(run)
    done = {name: [run for run in repeats if run is not None] for name, repeats in runs.items()}
    summary = {name: phase_medians(repeats) for name, repeats in done.items() if repeats}
    ratios = {}
    for cgpo, grpo in RATIOS:
        pairs = [(a, b) for a, b in zip(runs[cgpo], runs[grpo]) if a is not None and b is not None]
        per_repeat = paired_ratios([a for a, _ in pairs], [b for _, b in pairs], 1)
        if per_repeat:
            ratios[f"{cgpo} / {grpo}"] = dict(median=median_spread(per_repeat)[0], per_repeat=per_repeat)
    data = dict(
        prompts_per_step=setup.lm_prompts,
        max_completion_length=setup.lm_completion,
        parameters=next((repeats[0]["parameters"] for repeats in done.values() if repeats), None),
        summary=summary,
        step_time_ratios=ratios,
        runs=runs,
    )
    if "CGPO" in summary and "CGPO self_agreement" in summary:
        data["max_prob_extra_peak_mib"] = (
            summary["CGPO"]["peak_memory_mib"] - summary["CGPO self_agreement"]["peak_memory_mib"]
        )
    if errors or skipped:
        data.update(status="partial", errors=errors, skipped=skipped)
    return data


class ReferenceProbe:
    """Each row's reference answer (`solution`) scored by `reward`, so the segmenter behind it runs inside every
    training step whatever the policy writes."""

    def __init__(self, reward):
        self.reward = reward
        self.__name__ = f"reference_{reward.__name__}"

    def __call__(self, prompts, completions, solution, log_metric=None, **columns):
        return self.reward(prompts=prompts, completions=list(solution), **columns)


def saliency_rows(setup: Setup, num_rows: int):
    """Synthetic SOD and SIS rows, alternating, at the VLM's image size."""
    from datasets import interleave_datasets

    from cgpo_trl.data.synthetic import generate_synthetic

    size = setup.vlm.get("image_size", 56)
    parts = [generate_synthetic(task=task, num_samples=num_rows // 2, image_size=size) for task in ("sod", "sis")]
    return interleave_datasets(parts)


def vlm_section(setup: Setup, work: Path, deadline: float, sam2: bool) -> dict:
    from cgpo_trl import CGPOConfig, CGPOTrainer
    from cgpo_trl.pipeline import SaliencyScriptArguments, build_reward_funcs
    from cgpo_trl.predict import predict_rows
    from cgpo_trl.saliency.metrics import evaluate_sis, evaluate_sod
    from cgpo_trl.saliency.segmenters.evf.tiny import save_tiny_checkpoint
    from cgpo_trl.testing import build_tiny_vlm

    checkpoint = save_tiny_checkpoint(work / "evf_checkpoint", sam2=sam2)
    model, processor = build_model(build_tiny_vlm, setup, **setup.vlm)
    num_parameters = parameters(model)
    rows = saliency_rows(setup, setup.vlm_prompts * setup.steps)
    script = SaliencyScriptArguments(
        segmenter="evf-sam",
        segmenter_kwargs={"checkpoint": checkpoint, "device": "auto", "dtype": setup.segmenter_dtype},
        reward_funcs=["format", "saliency"],
        reward_kwargs={"require_think": False},
    )
    fmt, saliency = build_reward_funcs(script, processor, model, setup.vlm_completion)
    settings = trainer_settings(setup, work / "cgpo", setup.vlm_prompts, setup.vlm_completion, [0.1, 1.0, 0.5])
    trainer = CGPOTrainer(
        model,
        [fmt, saliency, ReferenceProbe(saliency)],
        args=CGPOConfig(**settings, gradient_checkpointing=True),
        train_dataset=rows,
        processing_class=processor,
    )
    run = train_measured(trainer, deadline)
    segmenter = saliency.segmenter  # the cache in front of the EVF-SAM backend
    weight = next(segmenter.segmenter.model.parameters())
    calls_in_training = segmenter.misses
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items() if "/" in k}
    del trainer, model
    free_memory()

    predicted = predict_rows(
        rows,
        generate=lambda batch: [row["solution"] for row in batch],
        segmenter=segmenter,
        output_dir=work / "predict",
        overlays=False,
        progress=False,
    )
    out = predicted.output_dir
    return dict(
        parameters=num_parameters,
        prompts_per_step=setup.vlm_prompts,
        max_completion_length=setup.vlm_completion,
        segmenter=dict(
            family="EVF-SAM2" if sam2 else "EVF-SAM",
            device=str(weight.device),
            dtype=str(weight.dtype),
            pairs_segmented_in_training=calls_in_training,
            cache_hits=segmenter.hits,
            cache_misses=segmenter.misses,
        ),
        summary=phase_medians([run]),
        last_logs={k: v for k, v in logs.items() if k.startswith(("rewards/", "reward", "cgpo/", "saliency/"))},
        sod=evaluate_sod(out / "masks", out / "gt", progress=False).to_json(),
        sis=evaluate_sis(out / "results.json", out / "annotations.json"),
        run=run,
    )


SECTIONS: dict[str, Callable[[Setup, Path, float], dict]] = {
    "environment": environment_section,
    "lm": lm_section,
    "vlm_evf_sam": lambda setup, work, deadline: vlm_section(setup, work, deadline, sam2=False),
    "vlm_evf_sam2": lambda setup, work, deadline: vlm_section(setup, work, deadline, sam2=True),
}


# ------------------------------------------------------------------------------------------ report
def fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"
    )


def table(results: dict) -> str:
    sections = results["sections"]
    lines = [f"GPU check ({results['mode']}), {results['seconds']:.0f} s of a {results['budget_s']:.0f} s budget"]
    lines += [f"  {name:<14} {data['status']:<8} {data.get('seconds', 0):.0f} s" for name, data in sections.items()]
    lm = sections.get("lm", {})
    if lm.get("summary"):
        lines += [
            "",
            "lm | step s | generation | reward | fwd+bwd | confidence (max_prob / refit) | peak MiB",
        ]
        for name, s in lm["summary"].items():
            lines.append(
                f"{name} | {fmt(s['wall'])} | {fmt(s['generation'])} | {fmt(s['reward'])} | "
                f"{fmt(s['forward_backward'])} | {fmt(s['confidence'], 1e3, 1)} ms "
                f"({fmt(s['max_logprob'], 1e3, 1)} / {fmt(s['calibration_fit'], 1e3, 1)}) | {fmt(s['peak_memory_mib'], 1, 0)}"
            )
        for pair, ratio in lm["step_time_ratios"].items():
            lines.append(f"step time {pair}: {fmt(ratio['median'])}x")
    for name in ("vlm_evf_sam", "vlm_evf_sam2"):
        data = sections.get(name, {})
        if data.get("status") == "ok":
            s, seg = data["summary"], data["segmenter"]
            lines.append(
                f"{name}: step {fmt(s['wall'])} s (reward {fmt(s['reward'])} s), peak {fmt(s['peak_memory_mib'], 1, 0)} "
                f"MiB; segmenter {seg['device']} {seg['dtype']}, {seg['pairs_segmented_in_training']} pairs in "
                f"training; SOD Sm {fmt(data['sod']['Sm'], digits=3)} MAE {fmt(data['sod']['MAE'], digits=3)}; "
                f"SIS AP {fmt(data['sis']['AP'], digits=3)}"
            )
    return "\n".join(lines)


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(results), indent=1, allow_nan=True) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check/gpu_check.json"))
    parser.add_argument(
        "--work", type=Path, default=None, help="trainer and prediction folders (default: beside --out)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fp32: the version the test suite runs")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget_s", type=float, default=None, help="time budget of all sections (default: 300)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --smoke runs the CPU version")
    setup = SMOKE if args.smoke else GPU
    budget = setup.budget_s if args.budget_s is None else args.budget_s
    work = args.work or args.out.parent / "work"
    start = time.monotonic()
    results = dict(
        mode="smoke (CPU)" if args.smoke else "GPU",
        budget_s=budget,
        setup={k: str(v) if isinstance(v, torch.dtype) else v for k, v in asdict(setup).items()},
        sections={},
    )
    total_share = sum(SECTION_SHARES[name] for name in args.sections) or 1.0
    share = 0.0
    for name in args.sections:
        share += SECTION_SHARES[name]
        deadline = start + budget * share / total_share
        begun = time.monotonic()
        if name != "environment" and begun >= deadline:
            data = dict(status="skipped", reason=f"time budget of {budget:.0f} s spent before the section started")
        else:
            shutil.rmtree(work / name, ignore_errors=True)  # predictions resume from their folder: start clean
            try:
                data = SECTIONS[name](setup, work / name, deadline)
                data.setdefault("status", "ok")
            except Exception:
                data = dict(status="error", traceback=traceback.format_exc())
        data["seconds"] = time.monotonic() - begun
        results["sections"][name] = data
        free_memory()
        results["seconds"] = time.monotonic() - start
        write(args.out, results)
        print(f"[gpu_check] {name}: {data['status']} in {data['seconds']:.0f} s", flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
