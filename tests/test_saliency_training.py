"""CGPO on synthetic saliency rows with the weight-free `shapes` segmenter and the `saliency` reward."""

import math

import pytest
from datasets import concatenate_datasets

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.data.synthetic import generate_synthetic
from cgpo_trl.saliency.rewards import build_reward_funcs, eos_token_ids_of
from cgpo_trl.testing import build_tiny_vlm, tiny_run_settings


class Recording:
    """Passes the call through to a reward and keeps the keyword columns TRL handed it."""

    def __init__(self, reward):
        self.reward, self.__name__, self.calls = reward, reward.__name__, []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append(kwargs)
        return self.reward(prompts, completions, **kwargs)


def test_cgpo_trains_on_mixed_synthetic_tasks_with_shapes_and_saliency_reward(tmp_path):
    rows = concatenate_datasets(
        [generate_synthetic(task=task, num_samples=2, group_size=(2, 2), seed=1) for task in ("sod", "sis", "cosod")]
    ).shuffle(seed=0)
    model, processor = build_tiny_vlm()
    format_reward, saliency_reward = build_reward_funcs(
        ["format", "saliency"],
        segmenter="shapes",
        eos_token_ids=eos_token_ids_of(processor, model.generation_config),
    )
    recording = Recording(saliency_reward)
    args = CGPOConfig(
        **tiny_run_settings(tmp_path / "out", per_device_train_batch_size=2, max_completion_length=16),
        # A random model scores 0 everywhere; without calibration A_t = r - b_t still moves every parameter, which
        # is what this plumbing test checks (online calibration would give A = 0 until rewards vary).
        confidence_calibration="none",
    )
    trainer = CGPOTrainer(model, [format_reward, recording], args=args, train_dataset=rows, processing_class=processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    assert any(not p.detach().equal(before[n]) for n, p in model.named_parameters())
    logs = [h for h in trainer.state.log_history if "rewards/saliency/mean" in h]
    assert len(logs) == 3
    for log in logs:
        assert 0.0 <= log["rewards/saliency/mean"] <= 1.0 and 0.0 <= log["rewards/format/mean"] <= 1.0
        assert log["saliency/segmenter_failures"] == 0.0 and math.isfinite(log["saliency/malformed"])

    # The columns TRL passed are the data contract's; with the reference answers the reward is exact.
    seen = {task for call in recording.calls for task in call["task"]}
    assert seen == {"sod", "sis", "cosod"} and len(recording.calls) == 3  # 3 steps x 2 rows: every row once
    for call in recording.calls:
        columns = {k: v for k, v in call.items() if k not in ("log_metric", "log_extra", "trainer_state")}
        solutions = [[{"role": "assistant", "content": s}] for s in columns["solution"]]
        assert saliency_reward(None, solutions, **columns) == pytest.approx([1.0] * len(solutions))
