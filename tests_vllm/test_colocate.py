"""CGPO with vLLM colocated in the training process (`vllm_mode="colocate"`), on vLLM's CPU build."""

import cpu_shims
import pytest
import torch
from runs import (
    SYNCED_GAP,
    RecordingCGPOTrainer,
    check_confidence_source,
    check_single_rollouts_and_sync,
    sampler_gaps,
    stop_weight_sync_from,
    vllm_args,
    zero_reward,
)

from cgpo_trl import CGPOTrainer
from cgpo_trl.models import load_processor
from cgpo_trl.testing import image_prompt_dataset, length_reward, save_tiny_vlm, text_prompt_dataset

pytestmark = pytest.mark.slow  # every test here starts or drives a vLLM engine


def test_default_cgpo_generates_with_vllm_and_syncs_weights(cpu_vllm, tiny_lm_path, tmp_path):
    """CGPO's defaults (one rollout per prompt): after every large-lr update vLLM samples from the trained weights,
    and when the sync is switched off from step 3 the sampler's log-probs drift far from the trainer's."""
    args = vllm_args(tmp_path, "colocate", steps=6)
    assert args.num_generations == 1
    trainer = RecordingCGPOTrainer(tiny_lm_path, [length_reward], args=args, train_dataset=text_prompt_dataset(32))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stop_weight_sync_from(trainer, 3)
    trainer.train()
    check_single_rollouts_and_sync(trainer, before, stale_from=3)


@pytest.mark.parametrize(
    "level, source",
    [("token", "policy"), ("sequence", "policy"), ("sequence", "sampler")],
    ids=["token", "sequence-policy", "sequence-sampler"],
)
def test_advantages_use_the_trainers_logprobs(cpu_vllm, tiny_lm_path, tmp_path, level, source):
    """On vLLM completions, CGPO's advantages equal those computed from the trainer's own log-probs; vLLM's sampling
    log-probs only with `confidence_logps="sampler"`."""
    args = vllm_args(
        tmp_path, "colocate", steps=2, confidence_level=level, confidence_calibration="none", confidence_logps=source
    )
    trainer = RecordingCGPOTrainer(tiny_lm_path, [zero_reward], args=args, train_dataset=text_prompt_dataset(8))
    trainer.train()
    check_confidence_source(trainer, level, source)


def test_vlm_with_images_samples_from_the_trainers_prompt(cpu_vllm, tmp_path):
    """A tiny Qwen2.5-VL with one image per prompt: vLLM's log-probs of its own samples match the trainer's."""
    with pytest.MonkeyPatch.context() as patch:
        cpu_shims.qwen2_5_vl_without_torchvision(patch)
        path = save_tiny_vlm(tmp_path / "vlm")
        args = vllm_args(tmp_path / "out", "colocate", steps=2, learning_rate=1e-2, vllm_max_model_length=512)
        trainer = CGPOTrainer(
            path,
            [length_reward],
            args=args,
            train_dataset=image_prompt_dataset(8),
            processing_class=load_processor(path),
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    gaps = sampler_gaps(trainer)
    assert len(gaps) == 2 and max(gaps) < SYNCED_GAP, gaps
