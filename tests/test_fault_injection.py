"""Runs killed (SIGKILL, SIGINT, in the middle of writing a checkpoint) and resumed: the resumed run starts from
exactly the checkpoint's weights, optimizer and CGPO state, for the tiny VLM and the text LM, full and LoRA; a
half-written checkpoint is skipped with a message; weights that do not fit the model are an error, never a warning.
"""

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from datasets import Dataset
from transformers import TrainerCallback

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.checkpoints import (
    CheckpointError,
    ResumableGRPOTrainer,
    ResumableSFTTrainer,
    checkpoint_problem,
    last_complete_checkpoint,
    load_model_weights,
)
from cgpo_trl.models import load_model_and_processor
from cgpo_trl.testing import (
    build_tiny_lm,
    build_tiny_vlm,
    image_prompt_dataset,
    length_reward,
    text_prompt_dataset,
    tiny_run_settings,
)

SCRIPT = Path(__file__).resolve().parent / "scripts" / "interruptible_run.py"
spec = importlib.util.spec_from_file_location("interruptible_run", SCRIPT)
interruptible_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interruptible_run)


class AtTrainBegin(TrainerCallback):
    """What the resumed run holds when its first step is about to run."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.step = state.global_step
        self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        self.optimizer = {
            index: {name: value.clone() for name, value in moments.items()}
            for index, moments in optimizer.state_dict()["state"].items()
        }
        trainer = self.trainer
        self.cgpo_state = (
            json.loads(json.dumps(trainer._cgpo_state_dict())) if hasattr(trainer, "calibrator") else None
        )


def start_at_train_begin(trainer) -> AtTrainBegin:
    callback = AtTrainBegin()
    callback.trainer = trainer
    trainer.add_callback(callback)
    return callback


def run_until_hanging(output_dir: Path, *argv: str, timeout: float = 240) -> subprocess.Popen:
    """Start the interruptible run and return once it hangs at the requested point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")
    process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (output_dir / interruptible_run.MARKER).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run never hung: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.2)
    return process


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    different = [k for k in expected if not torch.equal(actual[k].to(expected[k].dtype), expected[k])]
    assert not different, f"{what}: {len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"


def saved_state(checkpoint: Path) -> tuple[dict, dict]:
    """A checkpoint's weights (read back by `from_pretrained`) and optimizer state (per-parameter Adam moments)."""
    weights = load_model_and_processor(checkpoint)[0].state_dict()
    return weights, torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)["state"]


def assert_optimizer_equal(actual: dict, saved: dict) -> None:
    assert actual.keys() == saved.keys() and saved
    for index, moments in saved.items():
        for name, value in moments.items():
            assert torch.equal(actual[index][name], value), (index, name)


# ------------------------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, caplog):
    out = tmp_path / "cgpo"
    process = run_until_hanging(out, "cgpo", str(out), "--hang_in_checkpoint", "4")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # checkpoint-4 holds its weights but not the rest; a kill just after mkdir leaves an empty checkpoint-6.
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert checkpoint_problem(out / "checkpoint-4") == "no trainer_state.json (the save did not finish)"
    (out / "checkpoint-6").mkdir()
    complete = out / "checkpoint-2"
    assert checkpoint_problem(complete) is None
    trainer, script_args, model_args = interruptible_run.build("cgpo", out, "--resume_from_checkpoint", "true")
    with pytest.raises(CheckpointError, match="cannot resume from .*checkpoint-4: no trainer_state.json"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    begin = start_at_train_begin(trainer)
    weights, optimizer = saved_state(complete)  # read now: rotation deletes checkpoint-2 once checkpoint-4 is saved
    saved_cgpo = json.loads((complete / "cgpo_state.json").read_text())
    from cgpo_trl.pipeline import train_and_save

    with caplog.at_level(logging.WARNING, logger="cgpo_trl.checkpoints"):
        train_and_save(trainer, script_args, model_args, stage="rl")
    assert f"Skipping incomplete checkpoint {out / 'checkpoint-6'}: no trainer_state.json" in caplog.text
    assert f"Skipping incomplete checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert f"Resuming from {complete}, the newest complete checkpoint" in caplog.text

    # The run starts at step 2 with checkpoint-2's weights, Adam moments and CGPO state (calibration window and map,
    # entropy reference), and finishes the 6 steps.
    assert begin.step == 2
    assert_same(begin.weights, weights, "weights at resume vs checkpoint-2")
    assert_optimizer_equal(begin.optimizer, optimizer)
    assert begin.cgpo_state == saved_cgpo and saved_cgpo["calibrator"]["rewards"]
    assert trainer.state.global_step == 6 and checkpoint_problem(out / "checkpoint-6") is None


@pytest.mark.slow
def test_sft_interrupted_by_sigint_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = tmp_path / "straight"
    trainer, script_args, model_args = interruptible_run.build("sft", straight)
    from cgpo_trl.pipeline import train_and_save

    train_and_save(trainer, script_args, model_args, stage="sft")
    expected = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    out = tmp_path / "interrupted"
    process = run_until_hanging(out, "sft", str(out), "--hang_after_save", "2")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) != 0  # KeyboardInterrupt: nothing saved on the way out
    assert not (out / "model.safetensors").exists() and checkpoint_problem(out / "checkpoint-2") is None

    weights, optimizer = saved_state(out / "checkpoint-2")
    trainer, script_args, model_args = interruptible_run.build("sft", out, "--resume_from_checkpoint", "true")
    begin = start_at_train_begin(trainer)
    train_and_save(trainer, script_args, model_args, stage="sft")
    assert begin.step == 2
    assert_same(begin.weights, weights, "weights at resume vs checkpoint-2")
    assert_optimizer_equal(begin.optimizer, optimizer)
    final = trainer.model.state_dict()
    moved = max((expected[k] - weights[k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # steps 3-6 changed the weights, so the comparison below can fail
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ every weight
def sft_rows(kind: str) -> Dataset:
    if kind == "lm":
        return Dataset.from_dict(
            {"prompt": [f"{i}+{i}=" for i in range(8)], "completion": [str(2 * i) for i in range(8)]}
        )
    from cgpo_trl.pipeline import DatasetSpec, build_mixture, to_sft_rows

    return build_mixture([DatasetSpec(task="sod", num_samples=8, options={"image_size": 56})], transform=to_sft_rows)


def make_trainer(trainer_kind: str, model_kind: str, lora: bool, output_dir: Path, seed: int, **overrides):
    from peft import LoraConfig
    from trl import GRPOConfig, SFTConfig

    model, processor = (build_tiny_vlm if model_kind == "vlm" else build_tiny_lm)(seed=seed)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
    settings = tiny_run_settings(
        output_dir, **{"max_steps": 1, "save_strategy": "steps", "save_steps": 1, **overrides}
    )
    if trainer_kind == "sft":
        settings.pop("max_completion_length")
        args = SFTConfig(**settings, max_length=None)
        rows = sft_rows(model_kind)
        return ResumableSFTTrainer(
            model,
            args=args,
            train_dataset=rows,
            eval_dataset=rows if args.eval_strategy != "no" else None,
            processing_class=processor,
            peft_config=peft_config,
        )
    data = image_prompt_dataset() if model_kind == "vlm" else text_prompt_dataset()
    trainer_cls, config_cls = (
        (CGPOTrainer, CGPOConfig) if trainer_kind == "cgpo" else (ResumableGRPOTrainer, GRPOConfig)
    )
    if trainer_kind == "grpo":
        settings["num_generations"] = 2
    return trainer_cls(
        model,
        [length_reward],
        args=config_cls(**settings),
        train_dataset=data,
        processing_class=processor,
        peft_config=peft_config,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer_kind,model_kind,lora",
    [
        ("cgpo", "vlm", False),
        ("cgpo", "vlm", True),
        ("cgpo", "lm", False),
        ("cgpo", "lm", True),
        ("grpo", "vlm", False),
        ("sft", "vlm", True),
        ("sft", "lm", False),
    ],
)
def test_resume_restores_every_weight(tmp_path, trainer_kind, model_kind, lora):
    first = make_trainer(trainer_kind, model_kind, lora, tmp_path / "out", seed=0)
    first.train()
    trained = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    # A fresh run (other random weights; LoRA: the same base, a fresh adapter) resumed from that checkpoint.
    resumed = make_trainer(trainer_kind, model_kind, lora, tmp_path / "out", seed=0 if lora else 1, max_steps=2)
    changed = [k for k, v in resumed.model.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed, "the fresh model already equals the checkpoint"
    begin = start_at_train_begin(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert begin.step == 1
    assert_same(begin.weights, trained, "weights at resume vs the checkpoint's")


@pytest.mark.slow
def test_load_best_model_at_end_restores_every_weight(tmp_path):
    # greater_is_better on the loss: the best checkpoint is an early one, not the weights training ended with.
    best = dict(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer = make_trainer("sft", "vlm", False, tmp_path, seed=0, max_steps=3, greater_is_better=True, **best)
    trainer.train()
    checkpoint = Path(trainer.state.best_model_checkpoint)
    assert checkpoint.name != "checkpoint-3"
    weights, _ = saved_state(checkpoint)
    assert_same(trainer.model.state_dict(), weights, f"weights after training vs the best ({checkpoint.name})")


# ------------------------------------------------------------------------------------------------ loud errors
@pytest.fixture
def lm_checkpoint(tmp_path):
    model, _ = build_tiny_lm()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_missing_or_unexpected_weights_are_errors(lm_checkpoint):
    model, folder = lm_checkpoint
    path = folder / "model.safetensors"
    weights = safetensors.torch.load_file(path)
    missing = "model.layers.1.mlp.up_proj.weight"
    safetensors.torch.save_file({k: v for k, v in weights.items() if k != missing}, path)
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\) \['{missing}'\]"):
        load_model_weights(model, folder)
    safetensors.torch.save_file({**weights, "model.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \['model.extra.weight'\]"):
        load_model_weights(model, folder)
    safetensors.torch.save_file({**weights, missing: torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=f"size mismatch for {missing}"):
        load_model_weights(model, folder)


def test_lora_adapter_keys_are_checked(tmp_path):
    from peft import LoraConfig, get_peft_model

    from cgpo_trl.checkpoints import load_checkpoint_weights

    def lora_model():
        return get_peft_model(build_tiny_lm()[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    saved = lora_model()
    for name, parameter in saved.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    saved.save_pretrained(tmp_path)
    model = lora_model()
    load_checkpoint_weights(model, tmp_path)
    assert_same(model.state_dict(), saved.state_dict(), "adapter")
    path = tmp_path / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(path)
    dropped = next(k for k in weights if "lora_B" in k)
    safetensors.torch.save_file({k: v for k, v in weights.items() if k != dropped}, path)
    with pytest.raises(CheckpointError, match=r"adapter does not match the model: 1 missing key"):
        load_checkpoint_weights(lora_model(), tmp_path)


def test_tensor_conversions_of_from_pretrained_are_applied(tmp_path):
    """Mixtral checkpoints store one tensor per expert; the model fuses them (a WeightConverter, not a rename)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    saved = MixtralForCausalLM(config)
    saved.save_pretrained(tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in saved.state_dict()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in safetensors.torch.load_file(
        tmp_path / "model.safetensors"
    )
    torch.manual_seed(1)
    model = MixtralForCausalLM(config)
    load_model_weights(model, tmp_path)
    assert_same(model.state_dict(), saved.state_dict(), "Mixtral")


# ------------------------------------------------------------------------------------------------ which checkpoint
def test_last_complete_checkpoint_skips_partial_ones(tmp_path, lm_checkpoint, caplog):
    _, folder = lm_checkpoint
    out = tmp_path / "run"
    complete = out / "checkpoint-10"
    shutil.copytree(folder, complete)
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    partial = out / "checkpoint-20"
    shutil.copytree(complete, partial)
    (partial / "trainer_state.json").write_text('{"global_step": 2')  # cut mid-write
    (out / "checkpoint-30").mkdir()  # killed right after mkdir
    sharded = out / "checkpoint-25"
    sharded.mkdir()
    (sharded / "trainer_state.json").write_text("{}")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with caplog.at_level(logging.WARNING, logger="cgpo_trl.checkpoints"):
        assert last_complete_checkpoint(out) == str(complete)
    assert "checkpoint-30: no trainer_state.json" in caplog.text
    assert "checkpoint-25: weight shard(s) ['model-00001.safetensors'] missing" in caplog.text
    assert "checkpoint-20: trainer_state.json is cut short" in caplog.text
    shutil.rmtree(complete)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoint-30: no trainer_state.json"):
        last_complete_checkpoint(out)
    with pytest.raises(CheckpointError, match="holds no checkpoint-N folder"):
        last_complete_checkpoint(tmp_path / "empty")


def test_checkpoint_without_cgpo_state_warns(tmp_path, caplog):
    args = CGPOConfig(**tiny_run_settings(tmp_path / "out", max_steps=1, save_strategy="steps", save_steps=1))
    model, tokenizer = build_tiny_lm()
    CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    ).train()
    (tmp_path / "out" / "checkpoint-1" / "cgpo_state.json").unlink()
    model, tokenizer = build_tiny_lm()
    resumed = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    with caplog.at_level(logging.WARNING, logger="cgpo_trl.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-1 has no cgpo_state.json: the calibration" in caplog.text
