"""The measurement behind the RL settings of `recipes/saliency/demo_cpu.yaml` (results: `rl_sweep.md`).

Every run starts from one SFT checkpoint of the demo, trains with `demo_cpu.yaml` plus the run's overrides, and is
evaluated exactly as `make demo` evaluates its stages (greedy answers on the held-out `validation` rows, `shapes`
segmenter, standard metrics), against the SFT checkpoint on the same rows (paired standard errors).

    make demo && cp -r outputs/demo/sft outputs/rl_sweep_sft          # or any SFT checkpoint of demo_cpu_sft.yaml
    python docs/demo/rl_sweep.py --sft outputs/rl_sweep_sft --out outputs/rl_sweep    # ~4 min per run on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS: dict[str, list[str]] = {
    "beta 0": ["--beta", "0"],
    "beta 0, seed 1": ["--beta", "0", "--seed", "1"],
    "beta 0, seed 2": ["--beta", "0", "--seed", "2"],
    "beta 0, batch-mean baseline": ["--beta", "0", "--baseline", "batch_mean", "--scale_rewards", "batch"],
    "beta 0, temperature 0.7": ["--beta", "0", "--temperature", "0.7"],
    "beta 0, lr 1e-3": ["--beta", "0", "--learning_rate", "1e-3"],
    "beta 0.04": ["--beta", "0.04"],
    "beta 0.1 (demo)": [],
    "beta 0.1, seed 1": ["--seed", "1"],
    "beta 0.2": ["--beta", "0.2"],
    "GRPO G=4, beta 0.1": ["--trainer", "grpo", "--num_generations", "4"],
}


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "recipes" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, required=True, help="the SFT checkpoint every run starts from")
    parser.add_argument("--out", type=Path, default=Path("outputs/rl_sweep"))
    parser.add_argument("--eval_samples", type=int, default=600, help="held-out rows per task")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help=f"a subset of {list(RUNS)}")
    args = parser.parse_args(argv)
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {list(RUNS)}")

    from trl import ModelConfig

    from cgpo_trl.config import CGPOConfig
    from cgpo_trl.pipeline import SaliencyScriptArguments, build_reward_funcs, build_rl_trainer, load_policy
    from cgpo_trl.saliency.diagnostics import expression_diagnostics

    demo = load_demo()
    types = (SaliencyScriptArguments, CGPOConfig, ModelConfig)
    base = demo.stage_args(demo.RECIPES / "demo_cpu.yaml", ["--model_name_or_path", str(args.sft)], types)
    rows_by_task = demo.eval_rows(base[0], args.eval_samples)
    sft_model, processor = load_policy(ModelConfig(model_name_or_path=str(args.sft)))
    reward_funcs = build_reward_funcs(base[0], processor, sft_model, base[1].max_completion_length)
    weights = base[1].reward_weights

    def evaluate(name, model):
        shutil.rmtree(args.out / "eval" / name, ignore_errors=True)  # predict_rows would resume from old answers
        return demo.evaluate_stage(
            name, model, processor, rows_by_task, reward_funcs, weights, args.out, base[1].max_completion_length, False
        )

    results_path = args.out / "rl_sweep.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    sft_metrics, sft_samples = evaluate("sft", sft_model)
    results["SFT checkpoint"] = {"metrics": sft_metrics, "answers": expression_diagnostics(sft_samples["expressions"])}
    for run in args.runs:
        extra = ["--model_name_or_path", str(args.sft), "--output_dir", str(args.out / "runs" / run.replace(" ", "_"))]
        extra += ["--overwrite_output_dir", "true", "--disable_tqdm", "true", *RUNS[run]]
        rl = demo.stage_args(demo.RECIPES / "demo_cpu.yaml", extra, types)
        trainer = build_rl_trainer(*rl)
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        metrics, samples = evaluate(run.replace(" ", "_"), trainer.model)
        errors = demo.compare(samples, sft_samples)
        results[run] = {
            "overrides": RUNS[run],
            "steps": trainer.state.global_step,
            "seconds": round(seconds),
            "metrics": metrics,
            "minus_sft": {k: [metrics[k] - sft_metrics[k], errors[k]] for k in demo.RESULT_KEYS},
            "answers": expression_diagnostics(samples["expressions"]),
        }
        diffs = ", ".join(f"{k} {d:+.3f} ± {se:.3f}" for k, (d, se) in results[run]["minus_sft"].items())
        print(f"{run}: {diffs}", flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        write_table(results, args, args.out / "rl_sweep.md", demo.RESULT_KEYS)
    return results


def write_table(results: dict, args, path: Path, keys) -> None:
    sft = results["SFT checkpoint"]
    lines = [
        f"Every run: `recipes/saliency/demo_cpu.yaml` plus its overrides, from the SFT checkpoint `{args.sft}`; "
        f"greedy answers on {args.eval_samples} held-out rows per task, evaluated as `make demo` does. Cells: run "
        "minus SFT ± the paired standard error (same rows; `sis_AP`: same bootstrap resamples). Last column: the "
        "colour / shape word entropy of the greedy answers (`cgpo_trl.saliency.diagnostics`; 1 = uniform, 0 = one word).",
        "",
        "| run | steps | s | " + " | ".join(keys) + " | answers |",
        "|---|---|---|" + "---|" * len(keys) + "---|",
        "| SFT checkpoint (absolute) | | | "
        + " | ".join(f"{sft['metrics'][k]:.3f}" for k in keys)
        + f" | {_answers(sft['answers'])} |",
    ]
    for run in (run for run in RUNS if run in results):
        result = results[run]
        cells = " | ".join(f"{d:+.3f} ± {se:.3f}" for d, se in (result["minus_sft"][k] for k in keys))
        lines.append(f"| {run} | {result['steps']} | {result['seconds']} | {cells} | {_answers(result['answers'])} |")
    path.write_text("\n".join(lines) + "\n")


def _answers(values: dict) -> str:
    keys = ("colour_entropy", "shape_entropy")
    return " / ".join(f"{values[k]:.2f}" if k in values else "–" for k in keys)


if __name__ == "__main__":
    main()
