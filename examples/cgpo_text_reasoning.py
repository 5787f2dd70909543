"""CGPOTrainer in a project with no images: learn two-digit addition with a verifiable reward.

This is how another RL project uses CGPO: import `CGPOTrainer` / `CGPOConfig` where it imported `GRPOTrainer` /
`GRPOConfig`, keep its dataset and reward functions, and draw one completion per prompt instead of a group.

    python examples/cgpo_text_reasoning.py --max_steps 200            # tiny offline LM, CPU, outputs/addition
    python examples/cgpo_text_reasoning.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --output_dir ... \
        --use_cpu false --bf16 true --per_device_train_batch_size 16

Without `--model_name_or_path` a tiny random Qwen2 LM is built offline (cgpo_trl.testing), which is enough to
watch the pipeline run on a CPU; a real instruction-tuned model actually learns the task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from cgpo_trl import CGPOConfig, CGPOTrainer


@dataclass
class AdditionArguments:
    num_train_samples: int = field(default=2000, metadata={"help": "Addition problems in the training set."})
    max_operand: int = field(default=99, metadata={"help": "Largest operand."})
    problem_seed: int = field(default=0, metadata={"help": "Seed of the problem generator."})


def addition_dataset(num_samples: int, max_operand: int, seed: int = 0) -> Dataset:
    """Conversational prompts "What is a + b?" with the sum as the `answer` column (passed to the rewards)."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(num_samples):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompts.append([{"role": "user", "content": f"What is {a} + {b}? Put the number inside <answer></answer>."}])
        answers.append(str(a + b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def format_reward(completions, **kwargs) -> list[float]:
    """1 when the completion holds exactly one <answer>number</answer>."""
    return [float(len(ANSWER.findall(_text(c))) == 1) for c in completions]


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1 when the number in <answer> is the sum: a verifiable reward in [0, 1], as CGPO expects."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = ANSWER.findall(_text(completion))
        rewards.append(float(len(found) == 1 and found[0] == expected))
    return rewards


def load_model(model_args: ModelConfig, seed: int):
    if model_args.model_name_or_path is None:
        from cgpo_trl.testing import build_tiny_lm

        return build_tiny_lm(seed=seed)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype or "auto")
    return model, AutoTokenizer.from_pretrained(model_args.model_name_or_path)


def main(argv: list[str] | None = None) -> CGPOTrainer:
    parser = TrlParser((AdditionArguments, CGPOConfig, ModelConfig))
    # Defaults for a CPU run of the tiny model; a --config YAML and the command line override them.
    parser.set_defaults(
        use_cpu=True, bf16=False, max_completion_length=16, report_to="none", output_dir="outputs/addition"
    )
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model, tokenizer = load_model(model_args, training_args.seed)
    trainer = CGPOTrainer(
        model=model,
        reward_funcs=[format_reward, correctness_reward],
        args=training_args,
        train_dataset=addition_dataset(
            script_args.num_train_samples, script_args.max_operand, script_args.problem_seed
        ),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
