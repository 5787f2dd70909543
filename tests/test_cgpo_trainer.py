"""CGPOTrainer end to end on tiny offline models: training, advantages, forward-pass count, resume, LoRA."""

import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.testing import (
    build_tiny_lm,
    build_tiny_vlm,
    image_prompt_dataset,
    length_reward,
    resume_tiny_lm_run,
    save_tiny_lm,
    text_prompt_dataset,
    tiny_run_settings,
)


def has_digit_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def make_args(tmp_path, **overrides):
    return tiny_run_settings(tmp_path / "out", **overrides)


class RecordingCGPOTrainer(CGPOTrainer):
    """Keeps the advantages and rewards each loss step used."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.__dict__.setdefault("seen", []).append(
            (inputs["advantages"].detach().clone(), inputs["cgpo_rewards"].clone(), inputs["completion_mask"].clone())
        )
        return loss


def assert_trains(trainer, model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))[:5]}"
    logs = [h for h in trainer.state.log_history if "cgpo/reward" in h]
    assert len(logs) == 3
    for key in ("cgpo/confidence", "cgpo/advantage_mean", "cgpo/abs_gap", "cgpo/ece", "cgpo/entropy_ratio", "entropy"):
        assert all(math.isfinite(h[key]) for h in logs), key
    assert "frac_reward_zero_std" not in logs[0]  # meaningless with one sample per prompt


@pytest.mark.parametrize(
    "level,confidence,calibration",
    [("token", "self_agreement", "batch"), ("token", "max_prob", "online"), ("sequence", "geo_mean", "none")],
)
def test_three_steps_tiny_lm(tmp_path, level, confidence, calibration):
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **make_args(tmp_path),
        confidence_level=level,
        confidence=confidence,
        confidence_calibration=calibration,
        calibration_min_pairs=4,
    )
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    assert trainer.num_generations == 1
    assert_trains(trainer, model)


def test_three_steps_tiny_vlm(tmp_path):
    model, processor = build_tiny_vlm()
    args = CGPOConfig(**make_args(tmp_path, per_device_train_batch_size=2))
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=image_prompt_dataset(), processing_class=processor
    )
    assert trainer._is_vlm
    assert_trains(trainer, model)


def test_lora_three_steps(tmp_path):
    from peft import LoraConfig

    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**make_args(tmp_path), confidence="max_prob")
    trainer = CGPOTrainer(
        model,
        [length_reward],
        args=args,
        train_dataset=text_prompt_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora and all(not torch.equal(lora[n], p) for n, p in trainer.model.named_parameters() if n in lora)
    assert all(math.isfinite(h["cgpo/confidence"]) for h in trainer.state.log_history if "cgpo/confidence" in h)


def test_independent_samples_are_not_group_normalised(tmp_path):
    """num_generations=4, c = 0 and no calibration: the advantage is exactly the scaled reward."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **make_args(tmp_path, per_device_train_batch_size=8, max_steps=2),
        num_generations=4,
        confidence_level="sequence",
        confidence="none",
        confidence_calibration="none",
        reward_weights=[1.0, 3.0],
    )
    trainer = RecordingCGPOTrainer(
        model,
        [length_reward, has_digit_reward],
        args=args,
        train_dataset=text_prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    for advantages, rewards, _ in trainer.seen:
        torch.testing.assert_close(advantages, rewards)
        assert ((rewards >= 0) & (rewards <= 1)).all()  # weight_sum scaling keeps r in [0, 1]
    assert any(a.std() > 0 for a, _, _ in trainer.seen)


def test_token_advantages_are_masked_and_token_shaped(tmp_path):
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**make_args(tmp_path, max_steps=1), confidence_calibration="none")
    trainer = RecordingCGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    advantages, rewards, mask = trainer.seen[0]
    assert advantages.shape == mask.shape
    assert (advantages[mask == 0] == 0).all()
    # A_t = r - b_t with b_t = max_v p(v | y<t) in (0, 1]: below the reward, above r - 1
    valid = mask.bool()
    expanded = rewards.unsqueeze(1).expand_as(advantages)
    assert (advantages[valid] < expanded[valid]).all() and (advantages[valid] >= expanded[valid] - 1).all()


def count_forwards(trainer):
    """Calls of the policy and of the reference model, split into scoring passes and generation steps."""
    counts = {"scoring": 0, "total": 0, "reference": 0}

    def hook(module, args, kwargs):
        counts["total"] += 1
        counts["scoring"] += int(bool(kwargs.get("fused_lm_head")))

    def ref_hook(module, args, kwargs):
        counts["reference"] += 1

    handles = [trainer.model.register_forward_pre_hook(hook, with_kwargs=True)]
    if trainer.ref_model is not None:
        handles.append(trainer.ref_model.register_forward_pre_hook(ref_hook, with_kwargs=True))
    trainer.train()
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cgpo_step_runs_no_extra_forward_pass(tmp_path, beta):
    """Same completions per step, same fixed length: CGPO makes exactly GRPO's model calls."""
    common = make_args(tmp_path, max_steps=2, beta=beta, generation_kwargs={"min_new_tokens": 8})
    checkpoint = save_tiny_lm(tmp_path / "tiny-lm")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    counts = {}
    for name, config in {
        "grpo": GRPOConfig(**common, num_generations=2),
        "cgpo_token_max_prob": CGPOConfig(**common, confidence="max_prob", confidence_calibration="online"),
        "cgpo_token_self_agreement": CGPOConfig(**common, confidence="self_agreement"),
        "cgpo_sequence": CGPOConfig(**common, confidence_level="sequence", confidence_span="answer"),
    }.items():
        cls = GRPOTrainer if name == "grpo" else CGPOTrainer
        trainer = cls(
            checkpoint, [length_reward], args=config, train_dataset=text_prompt_dataset(), processing_class=tokenizer
        )
        counts[name] = count_forwards(trainer)
    # 2 steps: one scoring pass each (the loss); generation makes 8 new tokens + prefill per step
    assert counts["grpo"]["scoring"] == 2 and counts["grpo"]["total"] == 2 + 2 * 8
    assert counts["grpo"]["reference"] == (2 if beta else 0)
    for name, count in counts.items():
        assert count == counts["grpo"], (name, counts)


def test_config_validation():
    with pytest.raises(ValueError, match="num_generations must be >= 1"):
        CGPOConfig(output_dir="x", use_cpu=True, bf16=False, num_generations=0)
    with pytest.raises(ValueError, match="applies to confidence_level='sequence'"):
        CGPOConfig(output_dir="x", use_cpu=True, bf16=False, confidence_span="answer")
    with pytest.raises(ValueError, match="confidence_calibration"):
        CGPOConfig(output_dir="x", use_cpu=True, bf16=False, confidence_calibration="sometimes")
    with pytest.raises(ValueError, match="generation_batch_size"):  # GRPO's own checks still run
        CGPOConfig(output_dir="x", use_cpu=True, bf16=False, num_generations=3, per_device_train_batch_size=4)
    with pytest.raises(TypeError, match="CGPOConfig"):
        model, tokenizer = build_tiny_lm()
        CGPOTrainer(model, [length_reward], args=GRPOConfig(output_dir="x", use_cpu=True, bf16=False))


def test_resume_restores_calibration_state(tmp_path):
    """`train(resume_from_checkpoint=...)` restores the CGPO state saved with the checkpoint before the first resumed
    step, through the trainer's own resume path."""
    model, tokenizer = build_tiny_lm()
    kwargs = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    # sequence level: one (c, r) pair per completion, so the window's size is known exactly
    args = CGPOConfig(**kwargs, confidence_level="sequence", confidence_calibration="online", calibration_min_pairs=4)
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(checkpoint, "cgpo_state.json")) as f:
        saved = json.load(f)
    assert len(saved["calibrator"]["rewards"]) == 8 and saved["calibrator"]["a"] is not None

    resumed, at_start = resume_tiny_lm_run(args, checkpoint)
    assert at_start == saved
    assert resumed.state.global_step == 4
    assert resumed.calibrator.rewards[:8] == saved["calibrator"]["rewards"] and len(resumed.calibrator.rewards) == 16


@pytest.mark.parametrize("confidence", ["max_prob", "self_agreement", "neg_entropy"])
def test_token_baselines_equal_the_policy_distribution(tmp_path, confidence):
    """b_t recomputed from the model's full logits at each completion position: A_t = r - b_t exactly."""

    class Recording(CGPOTrainer):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            self.seen = {
                k: inputs[k].clone()
                for k in (
                    "prompt_ids",
                    "prompt_mask",
                    "completion_ids",
                    "completion_mask",
                    "advantages",
                    "cgpo_rewards",
                )
            }
            return loss

    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **make_args(tmp_path, max_steps=1, learning_rate=0.0), confidence=confidence, confidence_calibration="none"
    )
    trainer = Recording(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    seen = trainer.seen
    ids = torch.cat([seen["prompt_ids"], seen["completion_ids"]], 1)
    attention = torch.cat([seen["prompt_mask"], seen["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    length = seen["completion_ids"].size(1)
    probs = logits[:, -length - 1 : -1].softmax(-1)
    expected = {
        "max_prob": probs.max(-1).values,
        "self_agreement": (probs**2).sum(-1),
        "neg_entropy": torch.exp((probs * probs.clamp_min(1e-30).log()).sum(-1)),
    }[confidence]
    mask = seen["completion_mask"].float()
    want = (seen["cgpo_rewards"].unsqueeze(1) - expected) * mask
    torch.testing.assert_close(seen["advantages"], want, atol=1e-4, rtol=1e-4)
