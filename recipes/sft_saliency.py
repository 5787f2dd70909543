"""Stage 1 of Saliency-R1: supervised fine-tuning on reference answers (`SFTTrainer`, loss on the answer only).

    python recipes/sft_saliency.py --config recipes/saliency/demo_cpu_sft.yaml
    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/sft_saliency.py \
        --config recipes/saliency/sft_qwen2_5_vl_3b.yaml

Every field of `SaliencyScriptArguments`, `trl.SFTConfig` and `trl.ModelConfig` can be set in the YAML file and
overridden on the command line; an unknown YAML key is an error naming it.
"""

from trl import ModelConfig, SFTConfig

from cgpo_trl.pipeline import SaliencyScriptArguments, build_sft_trainer, end_run, parse_args, train_and_save


def main(argv=None):
    script_args, training_args, model_args = parse_args((SaliencyScriptArguments, SFTConfig, ModelConfig), argv)
    trainer = build_sft_trainer(script_args, training_args, model_args)
    metrics = train_and_save(trainer, script_args, model_args, stage="sft")
    end_run(trainer)
    return metrics


if __name__ == "__main__":
    main()
