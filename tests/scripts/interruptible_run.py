"""A tiny pipeline run (stage-1 SFT or stage-2 CGPO of the tiny VLM on synthetic SOD) that can be made to stop at a
chosen point, for the fault-injection tests to kill there:

    python tests/scripts/interruptible_run.py sft OUT --hang_after_save 2          # checkpoint-2 complete
    python tests/scripts/interruptible_run.py cgpo OUT --hang_in_checkpoint 4      # checkpoint-4 half written

When it reaches that point it writes OUT/hanging and sleeps until it is killed. `run_args` is imported by the tests
so the interrupted run and the runs they compare it with are configured identically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
MARKER = "hanging"


def run_args(stage: str, output_dir: str | os.PathLike, *extra: str) -> tuple:
    """(script, training, model) arguments of the demo recipe, shrunk to a few CPU seconds."""
    from trl import ModelConfig, SFTConfig

    from cgpo_trl.config import CGPOConfig
    from cgpo_trl.pipeline import SaliencyScriptArguments, parse_args

    config = "demo_cpu_sft.yaml" if stage == "sft" else "demo_cpu.yaml"
    argv = ["--config", str(ROOT / "recipes" / "saliency" / config), "--model_name_or_path", "tiny-random"]
    argv += ["--datasets", '[{"name": "synthetic", "task": "sod", "num_samples": 48, "options": {"image_size": 56}}]']
    argv += ["--output_dir", str(output_dir), "--max_steps", "6", "--save_steps", "2"]
    argv += ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--warmup_steps", "0", "--seed", "1"]
    argv += ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true"]
    if stage == "cgpo":
        argv += ["--max_completion_length", "8", "--learning_rate", "1e-2", "--calibration_min_pairs", "4"]
    types = (SaliencyScriptArguments, SFTConfig if stage == "sft" else CGPOConfig, ModelConfig)
    return parse_args(types, [*argv, *extra])


def build(stage: str, output_dir: str | os.PathLike, *extra: str):
    from cgpo_trl.pipeline import build_rl_trainer, build_sft_trainer

    script_args, training_args, model_args = run_args(stage, output_dir, *extra)
    builder = build_sft_trainer if stage == "sft" else build_rl_trainer
    return builder(script_args, training_args, model_args), script_args, model_args


def hang(output_dir: Path) -> None:
    (output_dir / MARKER).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


class HangAfterSave(TrainerCallback):
    """Stop right after checkpoint-`step` is complete."""

    def __init__(self, step: int, output_dir: Path):
        self.step, self.output_dir = step, output_dir

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            hang(self.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("sft", "cgpo"))
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--hang_after_save", type=int, help="stop once checkpoint-N is complete")
    parser.add_argument("--hang_in_checkpoint", type=int, help="stop after checkpoint-N's weights, before the rest")
    args = parser.parse_args(argv)
    from cgpo_trl.pipeline import train_and_save

    trainer, script_args, model_args = build(args.stage, args.output_dir)
    if args.hang_after_save is not None:
        trainer.add_callback(HangAfterSave(args.hang_after_save, args.output_dir))
    if args.hang_in_checkpoint is not None:
        save_optimizer = trainer._save_optimizer_and_scheduler  # the Trainer's next write after the weights

        def interrupted_save(output_dir):
            if trainer.state.global_step == args.hang_in_checkpoint:
                hang(args.output_dir)
            save_optimizer(output_dir)

        trainer._save_optimizer_and_scheduler = interrupted_save
    train_and_save(trainer, script_args, model_args, stage=args.stage)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
