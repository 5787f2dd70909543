"""The recipes: every YAML parses and builds its trainer, bad keys are named, the GRPO swap, data mixtures,
end-to-end runs of the demo recipes with checkpoints, resume and model card, and multi-process CPU launches."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trl import GRPOConfig, ModelConfig, SFTConfig

from cgpo_trl.checkpoints import ResumableGRPOTrainer, ResumableSFTTrainer
from cgpo_trl.config import CGPOConfig
from cgpo_trl.pipeline import (
    DatasetSpec,
    SaliencyScriptArguments,
    build_mixture,
    build_rl_trainer,
    build_sft_trainer,
    parse_args,
    to_sft_rows,
)
from cgpo_trl.trainer import CGPOTrainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
YAMLS = sorted((RECIPES / "saliency").glob("*.yaml"))
RL_TYPES = (SaliencyScriptArguments, CGPOConfig, ModelConfig)
SFT_TYPES = (SaliencyScriptArguments, SFTConfig, ModelConfig)
CPU = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true"]


def types_for(path: Path):
    return SFT_TYPES if "sft" in path.stem else RL_TYPES


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from cgpo_trl.testing import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("tiny") / "tiny-vlm")


def small_synthetic(script_args) -> str:
    """The YAML's mixture as tiny synthetic components of the same tasks (public benchmarks are not here)."""
    from cgpo_trl.data.benchmarks import get_benchmark_spec

    specs = []
    for spec in script_args.datasets:
        task = spec.task or (get_benchmark_spec(spec.name).task if spec.name not in ("synthetic", "disk") else "sod")
        specs.append({"name": "synthetic", "task": task, "weight": spec.weight, "num_samples": 4})
    return json.dumps(specs)


# ------------------------------------------------------------------------------------------------ every YAML
def test_recipe_files_exist():
    names = {p.stem for p in YAMLS}
    for expected in (
        "demo_cpu",
        "demo_cpu_sft",
        "sft_qwen2_5_vl_3b",
        "sft_qwen2_5_vl_7b",
        "cgpo_qwen2_5_vl_3b",
        "cgpo_qwen2_5_vl_7b",
        "grpo_qwen2_5_vl_3b",
        "grpo_qwen2_5_vl_7b",
        "cgpo_qwen2_5_vl_7b_lora",
        "sft_qwen2_5_vl_7b_lora",
        "cgpo_qwen2_5_vl_7b_vllm_colocate",
        "cgpo_qwen2_5_vl_7b_vllm_server",
    ):
        assert expected in names
    for path in YAMLS:  # every file says what hardware it was sized for
        assert "Sized for:" in path.read_text().split("\n\n")[0], path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_yaml_parses_and_builds_its_trainer(path, tiny_checkpoint, tmp_path):
    from cgpo_trl.saliency.segmenters import list_segmenters

    raw = yaml.safe_load(path.read_text())
    # Build it on this machine: tiny checkpoint, tiny synthetic data of the same tasks, CPU, no vLLM.
    names = {f.name for f in dataclasses.fields(SaliencyScriptArguments)}
    yaml_script_args = SaliencyScriptArguments(**{k: v for k, v in raw.items() if k in names})
    overrides = [
        "--config",
        str(path),
        "--model_name_or_path",
        tiny_checkpoint,
        "--dtype",
        "float32",
        "--attn_implementation",
        "sdpa",
        "--output_dir",
        str(tmp_path),
        "--datasets",
        small_synthetic(yaml_script_args),
        "--segmenter",
        "shapes",
        "--segmenter_kwargs",
        "{}",
        *CPU,
    ]
    if types_for(path) is RL_TYPES:
        overrides += ["--use_vllm", "false"]
    script_args, training_args, model_args = parse_args(types_for(path), overrides)
    # The YAML's own values arrive untouched where not overridden.
    assert yaml_script_args.segmenter == raw.get("segmenter", "shapes")
    assert yaml_script_args.segmenter in list_segmenters()
    assert training_args.learning_rate == raw["learning_rate"]
    assert training_args.seed == raw["seed"]
    assert bool(model_args.use_peft) == bool(raw.get("use_peft", False))
    if "vllm_mode" in raw:
        assert raw["use_vllm"] and training_args.vllm_mode == raw["vllm_mode"]
    if types_for(path) is SFT_TYPES:
        trainer = build_sft_trainer(script_args, training_args, model_args)
        assert type(trainer) is ResumableSFTTrainer
        assert set(trainer.train_dataset.column_names) >= {"prompt", "completion", "images"}
    else:
        trainer = build_rl_trainer(script_args, training_args, model_args)
        expected = CGPOTrainer if raw.get("trainer", "cgpo") == "cgpo" else ResumableGRPOTrainer
        assert type(trainer) is expected
        assert [f.__name__ for f in trainer.reward_funcs] == raw["reward_funcs"]
        assert trainer.num_generations == raw["num_generations"]
    assert trainer.args.output_dir == str(tmp_path)
    from peft import PeftModel

    assert isinstance(trainer.model, PeftModel) == bool(raw.get("use_peft", False))


# ------------------------------------------------------------------------------------------------ parsing
def write_yaml(tmp_path, content: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, {"model_name_or_path": "tiny-random", "lerning_rate": 0.1, "output_dir": "x"})
    with pytest.raises(
        ValueError, match=r"recipe\.yaml: unknown key\(s\) 'lerning_rate' \(did you mean 'learning_rate'\?\)"
    ):
        parse_args(RL_TYPES, ["--config", str(path)])


def test_misspelt_dataset_key_is_named(tmp_path):
    path = write_yaml(
        tmp_path,
        {"output_dir": "x", "datasets": [{"name": "synthetic", "task": "sod", "num_sample": 3}]},
    )
    with pytest.raises(ValueError, match=r"datasets\[0\]: unknown key 'num_sample' \(did you mean 'num_samples'\?\)"):
        parse_args(RL_TYPES, ["--config", str(path)])


def test_command_line_overrides_the_yaml():
    config = RECIPES / "saliency" / "demo_cpu.yaml"
    datasets = '[{"name": "synthetic", "task": "cosod", "num_samples": 7}]'
    script_args, training_args, _ = parse_args(
        RL_TYPES,
        ["--config", str(config), "--learning_rate", "0.5", "--confidence", "max_prob", "--datasets", datasets],
    )
    assert training_args.learning_rate == 0.5
    assert training_args.confidence == "max_prob"
    assert training_args.max_completion_length == yaml.safe_load(config.read_text())["max_completion_length"]
    assert script_args.datasets == [DatasetSpec(name="synthetic", task="cosod", num_samples=7)]


def test_resume_from_checkpoint_values():
    from cgpo_trl.pipeline import resolve_checkpoint

    assert resolve_checkpoint("true") is True and resolve_checkpoint("last") is True  # newest in output_dir
    assert resolve_checkpoint("out/checkpoint-2") == "out/checkpoint-2"
    assert resolve_checkpoint(None) is None and resolve_checkpoint("false") is None


def test_bad_values_fail_early():
    with pytest.raises(ValueError, match="trainer must be one of"):
        SaliencyScriptArguments(trainer="ppo")
    with pytest.raises(ValueError, match="synthetic dataset needs `task`"):
        SaliencyScriptArguments(datasets=[{"name": "synthetic"}])
    with pytest.raises(ValueError, match="'duts-tr' needs `data_dir`"):
        SaliencyScriptArguments(datasets=[{"name": "duts-tr"}])
    with pytest.raises(ValueError, match="segmenter_kwargs: not valid JSON"):
        SaliencyScriptArguments(segmenter_kwargs="{device: cpu")
    with pytest.raises(ValueError, match=r"reward_funcs: unknown \['saliancy'\]"):
        SaliencyScriptArguments(reward_funcs=["format", "saliancy"])
    with pytest.raises(ValueError, match="segmenter: unknown 'evfsam'"):
        SaliencyScriptArguments(segmenter="evfsam")
    with pytest.raises(ValueError, match="unknown key 'rules' \\(did you mean 'rule'\\?\\)"):
        build_mixture([DatasetSpec(name="synthetic", task="sod", num_samples=2, options={"rules": "shape"})])


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"task": "sod", "weight": "heavy"}, r"datasets\[0\]: 'weight' must be a number, got 'heavy' \(str\)"),
        ({"task": "sod", "num_samples": "10"}, r"datasets\[0\]: 'num_samples' must be an integer, got '10' \(str\)"),
        ({"task": "sod", "weight": True}, r"datasets\[0\]: 'weight' must be a number, got True \(bool\)"),
        ({"task": ["sod"]}, r"datasets\[0\]: 'task' must be a string \(sod, sis or cosod\), got \['sod'\] \(list\)"),
        ({"task": "sod", "options": "rule=shape"}, r"datasets\[0\]: 'options' must be a mapping, got 'rule=shape'"),
        ({"name": "dutstr"}, r"datasets\[0\]: unknown benchmark 'dutstr' \(did you mean 'duts-tr'\?\)"),
        ({"name": "DUTS-TR"}, r"datasets\[0\]: dataset 'DUTS-TR' needs `data_dir`"),
        ({"task": "sod", "num_samples": 0}, r"datasets\[0\]: num_samples must be >= 1, got 0 \(an empty dataset\)"),
    ],
)
def test_bad_dataset_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        SaliencyScriptArguments(datasets=[{"name": "synthetic", **entry}])


def saved_sod(folder: Path, num_samples: int = 4) -> str:
    from cgpo_trl.data.synthetic import generate_synthetic

    generate_synthetic(task="sod", num_samples=num_samples, image_size=56).save_to_disk(str(folder))
    return str(folder)


def test_an_entry_with_no_rows_is_an_error_naming_it(tmp_path):
    data_dir = saved_sod(tmp_path / "sod")
    entries = [{"name": "synthetic", "task": "sod", "num_samples": 4}, {"name": "disk", "data_dir": data_dir}]
    script_args = SaliencyScriptArguments(datasets=entries, eval_datasets=[{**entries[1], "task": "sis"}])
    with pytest.raises(ValueError, match=r"eval_datasets\[0\] \(disk \(sis\): .*\) has no rows"):
        from cgpo_trl.pipeline import load_mixtures

        load_mixtures(script_args, seed=0)
    # Through the recipe: the run stops before anything is trained or saved.
    out = tmp_path / "out"
    entry = json.dumps([{"name": "disk", "data_dir": data_dir, "task": "cosod"}])
    with pytest.raises(ValueError, match=r"datasets\[0\] \(disk \(cosod\): .*\) has no rows"):
        load_script("sft_saliency").main(
            [
                "--config",
                str(RECIPES / "saliency" / "demo_cpu_sft.yaml"),
                "--datasets",
                entry,
                "--output_dir",
                str(out),
            ]
        )
    assert not (out / "model.safetensors").exists()


def test_cache_files_stay_out_of_input_folders(tmp_path):
    from cgpo_trl.data.benchmarks import save_benchmark
    from cgpo_trl.data.synthetic import generate_synthetic

    disk = saved_sod(tmp_path / "disk")
    benchmark = tmp_path / "ecssd"
    save_benchmark(generate_synthetic(task="sod", num_samples=3, image_size=56), "ecssd", benchmark)
    before = {path: sorted(p.name for p in Path(path).rglob("*")) for path in (disk, benchmark)}
    specs = [DatasetSpec(name="disk", data_dir=disk, task="sod"), DatasetSpec(name="ecssd", data_dir=str(benchmark))]
    assert len(build_mixture(specs, instruction="short")) >= 3  # filter, map, cast
    assert len(build_mixture(specs[:1], transform=to_sft_rows)) == 4
    after = {path: sorted(p.name for p in Path(path).rglob("*")) for path in (disk, benchmark)}
    assert after == before


# ------------------------------------------------------------------------------------------------ data
def test_mixture_follows_the_weights_without_repeating_rows():
    specs = [
        DatasetSpec(name="synthetic", task="sod", weight=3, num_samples=60),
        DatasetSpec(name="synthetic", task="sis", weight=1, num_samples=60),
    ]
    mixture = build_mixture(specs, seed=0)
    tasks = mixture["task"]
    # first_exhausted: stops when the sod component (drawn 3 times out of 4) runs out at 60 rows.
    assert tasks.count("sod") == 60
    assert 10 <= tasks.count("sis") <= 30
    solutions = [s for s, t in zip(mixture["solution"], tasks) if t == "sis"]
    assert len(set(solutions)) == len(solutions)


def test_short_instruction_and_sft_rows():
    specs = [DatasetSpec(name="synthetic", task="sod", num_samples=3)]
    rows = build_mixture(specs, instruction="short")
    text = [b["text"] for b in rows[0]["prompt"][0]["content"] if b["type"] == "text"]
    assert text == ["Name the salient object."]
    sft = to_sft_rows(rows)
    assert sft.column_names == ["prompt", "completion", "images"]
    assert sft[0]["completion"][0]["content"][0]["text"] == rows[0]["solution"]
    assert sft[0]["completion"][0]["role"] == "assistant"

    from datasets import Dataset

    with pytest.raises(ValueError, match="2 of 2 SFT rows have an empty `solution`"):
        to_sft_rows(Dataset.from_dict({"prompt": [[], []], "images": [[], []], "solution": ["", ""]}))


# ------------------------------------------------------------------------------------------------ output folders
def test_output_dir_of_another_run_is_refused(tmp_path):
    from cgpo_trl.pipeline import check_output_dir

    out = tmp_path / "run"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"previous run")
    argv = ["--config", str(RECIPES / "saliency" / "demo_cpu_sft.yaml"), "--output_dir", str(out), *CPU]
    with pytest.raises(FileExistsError, match=r"output_dir .*run already holds another run's model or checkpoints"):
        build_sft_trainer(*parse_args(SFT_TYPES, argv))  # before any data is generated or model built
    script_args, training_args, _ = parse_args(SFT_TYPES, [*argv, "--resume_from_checkpoint", "true"])
    assert check_output_dir(script_args, training_args) == []
    script_args, training_args, _ = parse_args(SFT_TYPES, [*argv, "--overwrite_output_dir", "true"])
    assert check_output_dir(script_args, training_args) == ["checkpoint-9"]
    assert (out / "model.safetensors").read_bytes() == b"previous run"  # nothing deleted until training starts


@pytest.mark.slow
def test_overwrite_replaces_the_previous_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"previous run")
    load_script("sft_saliency").main(
        [
            "--config",
            str(RECIPES / "saliency" / "demo_cpu_sft.yaml"),
            "--datasets",
            '[{"name": "synthetic", "task": "sod", "num_samples": 4}]',
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(out),
            "--overwrite_output_dir",
            "true",
            *CPU,
        ]
    )
    assert not (out / "checkpoint-9").exists()  # a later resume cannot pick up the previous run's checkpoint
    assert (out / "model.safetensors").stat().st_size > 1000
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


# ------------------------------------------------------------------------------------------------ GRPO swap
def demo_args(tiny_checkpoint, out, *extra):
    datasets = '[{"name": "synthetic", "task": "sod", "num_samples": 32}]'
    return parse_args(
        RL_TYPES,
        [
            "--config",
            str(RECIPES / "saliency" / "demo_cpu.yaml"),
            "--model_name_or_path",
            tiny_checkpoint,
            "--output_dir",
            str(out),
            "--datasets",
            datasets,
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            *CPU,
            *extra,
        ],
    )


def test_grpo_swap_keeps_data_rewards_and_settings(tiny_checkpoint, tmp_path):
    script_args, training_args, model_args = demo_args(tiny_checkpoint, tmp_path, "--num_generations", "2")
    cgpo = build_rl_trainer(script_args, training_args, model_args)
    script_args.trainer = "grpo"
    grpo = build_rl_trainer(script_args, training_args, model_args)
    assert type(cgpo) is CGPOTrainer and type(grpo) is ResumableGRPOTrainer
    assert type(grpo.args) is GRPOConfig
    for name in ("learning_rate", "max_completion_length", "temperature", "reward_weights", "num_generations", "seed"):
        assert getattr(grpo.args, name) == getattr(cgpo.args, name), name
    assert [f.__name__ for f in grpo.reward_funcs] == [f.__name__ for f in cgpo.reward_funcs]
    assert grpo.train_dataset["solution"] == cgpo.train_dataset["solution"]

    training_args.num_generations = 1
    with pytest.raises(ValueError, match=r"trainer=grpo needs num_generations >= 2"):
        build_rl_trainer(script_args, training_args, model_args)


# ------------------------------------------------------------------------------------------------ end to end
def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)["state"]


@pytest.mark.slow
def test_cgpo_recipe_trains_saves_and_resumes(tiny_checkpoint, tmp_path):
    script = load_script("cgpo_saliency")
    common = ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--seed", "3"]
    base = [
        "--config",
        str(RECIPES / "saliency" / "demo_cpu.yaml"),
        "--model_name_or_path",
        tiny_checkpoint,
        "--datasets",
        '[{"name": "synthetic", "task": "sod", "num_samples": 32}]',
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        *CPU,
        *common,
    ]
    first = tmp_path / "first"
    metrics = script.main([*base, "--output_dir", str(first)])
    assert "train_runtime" in metrics
    # Final model with its processor, loadable like any checkpoint.
    from cgpo_trl.models import load_model_and_processor

    model, processor = load_model_and_processor(first)
    assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    card = (first / "README.md").read_text()
    for needle in ("synthetic (sod)", "Segmenter: `shapes`", "`format` × 0.1", "`saliency` × 1", "CGPOTrainer"):
        assert needle in card, needle
    assert "| reward |" in card and "Launch: 1 process\n" in card

    # Resume from step 2 into a fresh folder: training starts at step 2 with checkpoint-2's optimizer moments and
    # learning-rate schedule, and ends at step 4 with the straight run's step count and learning rate.
    from transformers import TrainerCallback

    from cgpo_trl.pipeline import train_and_save

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            self.step = state.global_step
            self.moments = {
                k: {m: v[m].clone() for m in ("step", "exp_avg")} for k, v in optimizer.state_dict()["state"].items()
            }
            self.lr = lr_scheduler.get_last_lr()[0]

    second = tmp_path / "second"
    script_args, training_args, model_args = parse_args(
        RL_TYPES, [*base, "--output_dir", str(second), "--resume_from_checkpoint", str(first / "checkpoint-2")]
    )
    trainer = build_rl_trainer(script_args, training_args, model_args)
    snapshot = Snapshot()
    trainer.add_callback(snapshot)
    train_and_save(trainer, script_args, model_args, stage="rl")
    saved = optimizer_state(first / "checkpoint-2")
    assert snapshot.step == 2 and snapshot.moments.keys() == saved.keys()
    for key, moments in saved.items():
        assert snapshot.moments[key]["step"] == moments["step"] == 2
        assert torch.equal(snapshot.moments[key]["exp_avg"], moments["exp_avg"])
    straight_log = json.loads((first / "trainer_state.json").read_text())["log_history"]
    resumed_log = json.loads((second / "trainer_state.json").read_text())["log_history"]
    assert snapshot.lr == pytest.approx(next(h["learning_rate"] for h in straight_log if h.get("step") == 3))
    assert trainer.state.global_step == 4
    # The history carries on from the checkpoint's: steps 1-2 restored, 3-4 trained, on the same schedule.
    assert [h["step"] for h in resumed_log if "loss" in h] == [1, 2, 3, 4]
    assert [h["learning_rate"] for h in resumed_log if "loss" in h] == [
        h["learning_rate"] for h in straight_log if "loss" in h
    ]
    assert optimizer_state(second / "checkpoint-4")[0]["step"] == 4


@pytest.mark.slow
def test_sft_recipe_trains_and_writes_the_model_card(tmp_path):
    script = load_script("sft_saliency")
    out = tmp_path / "sft"
    script.main(
        [
            "--config",
            str(RECIPES / "saliency" / "demo_cpu_sft.yaml"),
            "--datasets",
            '[{"name": "synthetic", "task": "sod", "num_samples": 16}, {"name": "synthetic", "task": "cosod", "num_samples": 8}]',
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(out),
            *CPU,
        ]
    )
    card = (out / "README.md").read_text()
    assert "synthetic (sod)" in card and "synthetic (cosod)" in card and "SFTTrainer" in card
    assert "| train_loss |" in card
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


@pytest.mark.slow
def test_reasoning_data_trains_with_the_sft_recipe(tmp_path):
    """The documented stage-1 path: `python -m cgpo_trl.data.reasoning` output, `name: disk`, `instruction: short`."""
    from cgpo_trl.data.reasoning import main as build_reasoning
    from cgpo_trl.pipeline import SHORT_INSTRUCTIONS, load_mixtures

    data = tmp_path / "reasoning"
    build_reasoning(["--dataset", "synthetic-sod", "--num_samples", "6", "--teacher", "template", "--out", str(data)])
    config = yaml.safe_load((RECIPES / "saliency" / "demo_cpu_sft.yaml").read_text())
    config.update(
        datasets=[{"name": "disk", "data_dir": str(data)}],
        instruction="short",
        max_steps=2,
        per_device_train_batch_size=3,
        output_dir=str(tmp_path / "sft"),
    )
    path = write_yaml(tmp_path, config)
    load_script("sft_saliency").main(["--config", str(path), *CPU])
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "sft" / "trainer_state.json").read_text())["global_step"] == 2
    # What it trained on: the short instruction with the image, then the builder's reasoning and answer.
    script_args, _, _ = parse_args(SFT_TYPES, ["--config", str(path)])
    rows, _ = load_mixtures(script_args, seed=0, transform=to_sft_rows)
    user = rows[0]["prompt"][0]["content"]
    assert [b["text"] for b in user if b["type"] == "text"] == [SHORT_INSTRUCTIONS["sod"]]
    assert [b["type"] for b in user].count("image") == 1 and len(rows[0]["images"]) == 1
    answer = rows[0]["completion"][0]["content"][0]["text"]
    assert answer.startswith("<think>") and "</think><answer><rg>" in answer


@pytest.mark.slow
def test_lora_sft_saves_the_adapter_and_a_merged_checkpoint(tiny_checkpoint, tmp_path):
    from cgpo_trl.models import load_model_and_processor

    script = load_script("sft_saliency")
    out = tmp_path / "lora"
    argv = ["--config", str(RECIPES / "saliency" / "demo_cpu_sft.yaml"), "--model_name_or_path", tiny_checkpoint]
    argv += ["--datasets", '[{"name": "synthetic", "task": "sod", "num_samples": 8}]', "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "4", "--output_dir", str(out), "--use_peft", "true"]
    argv += ["--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", *CPU]
    script.main(argv)
    assert (out / "adapter_model.safetensors").is_file()
    assert "with LoRA" in (out / "README.md").read_text()
    merged, processor = load_model_and_processor(out / "merged")
    base, _ = load_model_and_processor(tiny_checkpoint)
    assert type(merged) is type(base) and type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    name = next(n for n, _ in base.named_parameters() if "q_proj.weight" in n and "visual" not in n)
    # lr 1e-3 for 2 steps moves the LoRA factors, so the merged q_proj differs from the base one.
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])


# ------------------------------------------------------------------------------------------------ multi-process
def launch(config_file: str, tiny_checkpoint: str, out: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    # faulthandler: should a rank ever abort again, its Python stack is in the failure message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES / "accelerate_configs" / config_file),
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
        *extra,
        str(RECIPES / "cgpo_saliency.py"),
        "--config",
        str(RECIPES / "saliency" / "demo_cpu.yaml"),
        "--model_name_or_path",
        tiny_checkpoint,
        "--output_dir",
        str(out),
        "--datasets",
        '[{"name": "synthetic", "task": "sod", "num_samples": 32}]',
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "2",
        "--save_steps",
        "1000",
        *CPU,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes(tiny_checkpoint, tmp_path, free_port):
    result = launch("cpu_2proc.yaml", tiny_checkpoint, tmp_path, free_port)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launch: 2 process(es), MULTI_CPU" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_two_cpu_processes_under_deepspeed(stage, tiny_checkpoint, tmp_path, free_port):
    pytest.importorskip("deepspeed")
    from cgpo_trl.models import load_model_and_processor

    result = launch(f"zero{stage}.yaml", tiny_checkpoint, tmp_path, free_port, "--mixed_precision", "no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Launch: 2 process(es), DEEPSPEED ZeRO stage {stage}" in (tmp_path / "README.md").read_text()
    # The final model is saved whole (ZeRO-3 gathers its shards) and loads like any checkpoint.
    trained, _ = load_model_and_processor(tmp_path)
    base, _ = load_model_and_processor(tiny_checkpoint)
    assert trained.state_dict().keys() == base.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
