"""Short CGPO runs with vLLM rollouts, and what the tests read from them."""

from __future__ import annotations

import os

import torch

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.testing import tiny_run_settings

# Mean |log p_vLLM - log p_trainer| over completion tokens (TRL's `sampling/sampling_logp_difference/mean`). vLLM runs
# the float32 checkpoints in bfloat16 on CPU: measured 0.0004-0.004 right after a sync, 0.32-0.77 when vLLM keeps
# weights one to three large-lr updates old.
SYNCED_GAP = 0.02
STALE_GAP = 0.1


def vllm_args(output_dir: str | os.PathLike, mode: str, steps: int, **overrides) -> CGPOConfig:
    """CGPO's defaults with vLLM generation, at a learning rate large enough that stale weights show at once."""
    settings = tiny_run_settings(
        output_dir, max_steps=steps, learning_rate=3e-2, lr_scheduler_type="constant", vllm_mode=mode
    )
    settings.update(use_vllm=True, vllm_max_model_length=256)
    settings.update(overrides)
    return CGPOConfig(**settings)


def zero_reward(completions, **kwargs) -> list[float]:
    """r = 0, so that with no calibration the advantage is exactly -c: the confidence can be read back from it."""
    return [0.0] * len(completions)


class RecordingCGPOTrainer(CGPOTrainer):
    """Keeps, per loss step, the batch, CGPO's advantages and the trainer's own log-probs of the same completions.

    The trainer's log-probs come from a separate forward pass of the model, with the weights the loss step used.
    """

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attention = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attention).logits
        length = completion_ids.size(1)
        logprobs = (logits[:, -length - 1 : -1].float() / self.temperature).log_softmax(-1)
        sampler = inputs.get("sampling_per_token_logps")
        self.__dict__.setdefault("steps", []).append(
            {
                "prompt_ids": inputs["prompt_ids"].clone(),
                "completion_mask": completion_mask.float(),
                "advantages": inputs["advantages"].detach().clone(),
                "own_logps": logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1),
                "own_max_prob": logprobs.max(-1).values.exp(),
                "sampler_logps": None if sampler is None else sampler.clone(),
            }
        )
        return loss


def sampler_gaps(trainer: CGPOTrainer) -> list[float]:
    """TRL's per-step mean |log p_vLLM - log p_trainer| of the sampled tokens, step by step."""
    key = "sampling/sampling_logp_difference/mean"
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def stop_weight_sync_from(trainer: CGPOTrainer, step: int) -> None:
    """From global step `step` on, vLLM keeps the weights it has: the control that shows the gap detects staleness."""
    sync = trainer.vllm_generation.sync_weights

    def maybe_sync() -> None:
        if trainer.state.global_step < step:
            sync()

    trainer.vllm_generation.sync_weights = maybe_sync


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1)


def check_single_rollouts_and_sync(trainer: RecordingCGPOTrainer, before: dict, stale_from: int) -> None:
    """One completion per prompt; weights synced (small gap) until `stale_from`, stale (large gap) after; trained."""
    gaps = sampler_gaps(trainer)
    assert len(gaps) == trainer.args.max_steps, gaps
    assert max(gaps[:stale_from]) < SYNCED_GAP, gaps
    assert min(gaps[stale_from:]) > STALE_GAP, gaps
    batch = trainer.args.per_device_train_batch_size
    for step in trainer.steps:
        assert len({tuple(row) for row in step["prompt_ids"].tolist()}) == batch  # G = 1: every prompt once
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def check_confidence_source(trainer: RecordingCGPOTrainer, level: str, source: str) -> None:
    """With r = 0 and no calibration, A = -c: c must come from the trainer's log-probs unless the sampler's are asked.

    token: A_t = -max_v p(v | y<t) from the trainer's distribution. sequence: log(-A) = mean log p(y_t) of the
    trainer ("policy") or of vLLM ("sampler"); the two differ here (bfloat16 sampler), so the check can tell them apart.
    """
    assert len(trainer.steps) == trainer.args.max_steps
    largest_gap = 0.0
    for step in trainer.steps:
        mask, advantages = step["completion_mask"], step["advantages"]
        if level == "token":
            torch.testing.assert_close(advantages, -step["own_max_prob"] * mask, atol=1e-5, rtol=1e-4)
            continue
        sampler = step["sampler_logps"]
        own = masked_mean(step["own_logps"], mask)
        sampled = masked_mean(torch.nan_to_num(sampler), mask * (~torch.isnan(sampler)).float())
        largest_gap = max(largest_gap, (own - sampled).abs().max().item())
        expected = own if source == "policy" else sampled
        torch.testing.assert_close(torch.log(-advantages), expected, atol=2e-5, rtol=0)
    if level == "sequence":
        # the two sources differed somewhere in the run by more than 5x the tolerance above, so the check could tell
        # them apart (in a single step all completions can land closer than that: a random bfloat16 rounding gap)
        assert largest_gap > 1e-4, largest_gap
