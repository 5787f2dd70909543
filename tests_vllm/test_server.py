"""CGPO with generation on a separate vLLM server (`vllm_mode="server"`), on vLLM's CPU build.

The server runs the untied tiny LM; weights reach it through files instead of NCCL (`cpu_shims`).
"""

import pytest
from runs import (
    RecordingCGPOTrainer,
    check_confidence_source,
    check_single_rollouts_and_sync,
    stop_weight_sync_from,
    vllm_args,
    zero_reward,
)

from cgpo_trl.testing import length_reward, text_prompt_dataset

pytestmark = pytest.mark.slow  # every test here starts or drives a vLLM engine


def server_args(tmp_path, url, steps, **overrides):
    return vllm_args(tmp_path, "server", steps, vllm_server_base_url=url, **overrides)


def test_default_cgpo_generates_on_the_server_and_syncs_weights(
    vllm_server, file_weight_sync, untied_lm_path, tmp_path
):
    """As in colocate mode: single rollouts, the trained weights reach the server after each update, and the gap
    grows at once when they stop doing so."""
    args = server_args(tmp_path, vllm_server, steps=6)
    trainer = RecordingCGPOTrainer(untied_lm_path, [length_reward], args=args, train_dataset=text_prompt_dataset(32))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stop_weight_sync_from(trainer, 3)
    trainer.train()
    check_single_rollouts_and_sync(trainer, before, stale_from=3)


@pytest.mark.parametrize("source", ["policy", "sampler"])
def test_sequence_confidence_source_on_server_completions(
    vllm_server, file_weight_sync, untied_lm_path, tmp_path, source
):
    """The server's log-probs (parsed from its HTTP answer) become the confidence only with `confidence_logps="sampler"`."""
    args = server_args(
        tmp_path, vllm_server, 2, confidence_level="sequence", confidence_calibration="none", confidence_logps=source
    )
    trainer = RecordingCGPOTrainer(untied_lm_path, [zero_reward], args=args, train_dataset=text_prompt_dataset(8))
    trainer.train()
    check_confidence_source(trainer, "sequence", source)
