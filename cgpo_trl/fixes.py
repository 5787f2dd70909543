"""What CGPO's trainer and the pipeline's GRPO baseline both need on top of `trl.GRPOTrainer` 1.16.

* Reward values that must never reach the weights: a function returning ±inf is treated as "no reward" (NaN, what
  TRL uses for None) and, when the trainer compares rewards with values in [0, 1], values outside [0, 1] are clipped;
  each case is logged once with the function's name and counted in `cgpo/invalid_rewards/<name>`. (TRL itself
  turns +inf into an advantage of 3.4e38 and every weight into NaN one step later.)
* Colocated vLLM with images: TRL 1.16 hands vLLM the processor-expanded image placeholders, which vLLM expands
  again (huggingface/trl#6294) and samples from a corrupted prompt; vLLM gets one placeholder per image instead.
"""

from __future__ import annotations

import logging

from .advantages import check_rewards

logger = logging.getLogger("cgpo_trl.trainer")


class GRPOFixesMixin:
    """Mix in before `trl.GRPOTrainer`."""

    unit_range_rewards: bool = False
    """Clip reward values to [0, 1] (CGPO's confidence and tracker baselines need it)."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards_per_func, problems = check_rewards(
            rewards_per_func, list(self.reward_func_names), self.unit_range_rewards
        )
        mode = "train" if self.model.training else "eval"
        reported = self.__dict__.setdefault("_reported_reward_problems", set())
        for problem in problems:
            self._metrics[mode][f"cgpo/invalid_rewards/{problem.function}"].append(float(problem.count))
            if (problem.function, problem.kind) not in reported:
                reported.add((problem.function, problem.kind))
                action = "treated as no reward" if problem.kind == "non-finite" else "clipped to [0, 1]"
                logger.warning(
                    "reward function %r returned %d %s value(s) (e.g. %r): %s. Logged as cgpo/invalid_rewards/%s",
                    problem.function,
                    problem.count,
                    problem.kind,
                    problem.example,
                    action,
                    problem.function,
                )
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        pad = getattr(self.processing_class, "image_token_id", None)
        if self.use_vllm and self.vllm_mode == "colocate" and images is not None and pad is not None:
            prompt_ids = [
                [t for i, t in enumerate(ids) if t != pad or i == 0 or ids[i - 1] != pad] for ids in prompt_ids
            ]
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
