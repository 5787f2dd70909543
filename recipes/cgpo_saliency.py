"""Stage 2 of Saliency-R1: RL with CGPO (or the GRPO baseline) on saliency tasks.

    python recipes/cgpo_saliency.py --config recipes/saliency/demo_cpu.yaml
    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/cgpo_saliency.py \
        --config recipes/saliency/cgpo_qwen2_5_vl_3b.yaml
    # the GRPO baseline on the same data, rewards and settings:
    ... --config recipes/saliency/cgpo_qwen2_5_vl_3b.yaml --trainer grpo --num_generations 8

Every field of `SaliencyScriptArguments`, `CGPOConfig` and `trl.ModelConfig` can be set in the YAML file and
overridden on the command line; an unknown YAML key is an error naming it.
"""

from trl import ModelConfig

from cgpo_trl.config import CGPOConfig
from cgpo_trl.pipeline import SaliencyScriptArguments, build_rl_trainer, end_run, parse_args, train_and_save


def main(argv=None):
    script_args, training_args, model_args = parse_args((SaliencyScriptArguments, CGPOConfig, ModelConfig), argv)
    trainer = build_rl_trainer(script_args, training_args, model_args)
    metrics = train_and_save(trainer, script_args, model_args, stage="rl")
    end_run(trainer)
    return metrics


if __name__ == "__main__":
    main()
