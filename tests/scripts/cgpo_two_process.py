"""Worker for tests/test_multiprocess.py: a few CGPO steps under torchrun; each rank dumps what it saw."""

import json
import os
import sys

import torch.distributed as dist

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.pipeline import end_run
from cgpo_trl.testing import build_tiny_lm, length_reward, text_prompt_dataset, tiny_run_settings


def main(out_dir: str, baseline: str = "confidence") -> None:
    """`baseline` is a `CGPOConfig.baseline`, or `prompt_tracker:kl` for SPO's adaptive forgetting on 8 prompts (so
    steps 2 and 3 revisit them and measure drifts)."""
    baseline, _, schedule = baseline.partition(":")
    model, tokenizer = build_tiny_lm(seed=0)
    args = CGPOConfig(
        **tiny_run_settings(os.path.join(out_dir, "run"), seed=42),
        baseline=baseline,
        confidence_calibration="online",
        calibration_min_pairs=4,
        tracker_rho_schedule=schedule or "constant",
    )
    dataset = text_prompt_dataset(8 if schedule == "kl" else 32)
    trainer = CGPOTrainer(model, [length_reward], args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "num_processes": trainer.accelerator.num_processes,
        "calibrator": None if trainer.calibrator is None else trainer.calibrator.state_dict(),
        "tracker": None if trainer.tracker is None else trainer.tracker.state_dict(),
        "rewards": [h["cgpo/reward"] for h in trainer.state.log_history if "cgpo/reward" in h],
        "drifts": [h["cgpo/tracker_drift"] for h in trainer.state.log_history if "cgpo/tracker_drift" in h],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    end_run(trainer)  # both ranks leave the gloo group together


if __name__ == "__main__":
    main(*sys.argv[1:])
