"""Where CGPO meets TRL's options: each test fails if the behaviour it names breaks (sign, reuse, span, capture,
reward checks, baselines through the trainer's own paths)."""

import gc
import logging
import math
import weakref

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl import trainer as trainer_module
from cgpo_trl.testing import (
    build_tiny_lm,
    build_tiny_vlm,
    build_tokenizer,
    image_prompt_dataset,
    length_reward,
    resume_tiny_lm_run,
    text_prompt_dataset,
    tiny_run_settings,
)


class Recording(CGPOTrainer):
    """Keeps a copy of what every loss pass saw."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "cgpo_rewards")
        self.__dict__.setdefault("seen", []).append({k: inputs[k].detach().clone() for k in keep})
        return loss


def first_is_best(completions, **kwargs):
    """Reward 1 for the batch's first completion, 0 for the others: known advantage signs under batch_mean."""
    return [1.0] + [0.0] * (len(completions) - 1)


def constant_reward(completions, **kwargs):
    return [0.7] * len(completions)


def sequence_logps(model, seen) -> torch.Tensor:
    ids = torch.cat([seen["prompt_ids"], seen["completion_ids"]], 1)
    attention = torch.cat([seen["prompt_mask"], seen["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    length = seen["completion_ids"].size(1)
    logps = logits[:, -length - 1 : -1].log_softmax(-1).gather(-1, seen["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return (logps * seen["completion_mask"]).sum(-1)


def settings(tmp_path, **overrides):
    return tiny_run_settings(tmp_path / "out", **overrides)


LOSS_CASES = [
    ("dapo", "token"),
    ("dr_grpo", "token"),
    ("bnpo", "token"),
    ("grpo", "token"),
    ("cispo", "token"),
    ("sapo", "token"),
    ("vespo", "token"),
    ("luspo", "sequence"),
    ("dapo", "sequence"),
]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,is_level", LOSS_CASES)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_update_moves_logprobs_with_the_advantage_sign(tmp_path, loss_type, is_level):
    """One SGD step raises sum_i A_i * log p(y_i): the completion with A > 0 gains relative to the others."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **settings(tmp_path, max_steps=1, learning_rate=0.05, optim="sgd", per_device_train_batch_size=4),
        baseline="batch_mean",
        loss_type=loss_type,
        importance_sampling_level=is_level,
    )
    trainer = Recording(
        model, [first_is_best], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}  # (a deepcopy would share TRL's patched forward)
    trainer.train()
    seen = trainer.seen[0]
    advantages = seen["advantages"] if seen["advantages"].dim() == 1 else seen["advantages"][:, 0]
    assert sorted(seen["cgpo_rewards"].tolist()) == [0.0, 0.0, 0.0, 1.0]  # TRL shuffles the batch
    torch.testing.assert_close(advantages, seen["cgpo_rewards"] - 0.25)
    after = sequence_logps(model, seen)
    model.load_state_dict(before)
    moved = after - sequence_logps(model, seen)
    assert (advantages * moved).sum() > 0, moved


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_zero_advantages_give_a_zero_policy_gradient(tmp_path, loss_type, caplog):
    """Equal rewards under batch_mean: every advantage is 0, no parameter moves, and the run says so."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**settings(tmp_path, max_steps=2), baseline="batch_mean", loss_type=loss_type)
    trainer = CGPOTrainer(
        model, [constant_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="cgpo_trl.trainer"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert "every advantage of this batch is exactly 0" in caplog.text
    logs = [h for h in trainer.state.log_history if "cgpo/zero_advantage_batch" in h]
    assert logs and all(h["cgpo/zero_advantage_batch"] == 1.0 for h in logs)


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reused_generation_keeps_its_advantages_and_commits_once(tmp_path, level):
    """num_iterations=2: both passes over a generated batch get identical advantages, and each completion's
    calibration pairs enter the window once, after the batch's last use."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **settings(tmp_path, max_steps=4),
        num_iterations=2,
        confidence_level=level,
        confidence_calibration="online",
        calibration_min_pairs=4,
    )
    trainer = Recording(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    commits = []
    original = trainer.calibrator.commit
    trainer.calibrator.commit = lambda: (commits.append(trainer._step), original())[1]
    trainer.train()
    seen = trainer.seen
    assert len(seen) == 4
    for first, second in ((seen[0], seen[1]), (seen[2], seen[3])):
        assert torch.equal(first["completion_ids"], second["completion_ids"])  # the same generation, reused
        assert torch.equal(first["advantages"], second["advantages"])
    assert not torch.equal(seen[0]["advantages"], seen[2]["advantages"])
    assert commits == [1, 3]  # after the second pass of each generation, never between its passes
    per_completion = 1 if level == "sequence" else 8
    assert len(trainer.calibrator.rewards) <= 2 * 4 * per_completion  # two generations of 4, stored once each
    if level == "sequence":
        assert len(trainer.calibrator.rewards) == 8


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_answer_span_is_found_and_used(tmp_path):
    """The span mask marks exactly the tokens inside <answer>...</answer>, and the sequence confidence averages
    only those."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(
        **settings(tmp_path),
        confidence_level="sequence",
        confidence="arith_mean",
        confidence_span="answer",
        confidence_calibration="none",
    )
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    text = "<think>a shape</think><answer><rg>the red circle</rg></answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    completion_ids = torch.tensor([ids + [tokenizer.pad_token_id] * 2])
    completion_mask = torch.tensor([[1] * len(ids) + [0, 0]])
    span = trainer._answer_span_mask(completion_ids, completion_mask)[0].tolist()
    inside = "".join(p for p, m in zip(pieces, span) if m)
    # tokens overlapping the answer's text (a token may straddle a marker, as "><" does here), nothing else
    assert "<rg>the red circle</rg>" in inside and "think" not in inside and "answer" not in inside
    assert inside == "><rg>the red circle</rg></"  # this tokenizer: "><" and "</" straddle the markers
    assert span[len(ids) :] == [0, 0]
    # log-probs: 0.5 inside the span, 0.1 outside; the confidence must be 0.5
    probs = torch.tensor([[0.5 if m else 0.1 for m in span]])
    inputs = {"cgpo_span_mask": torch.tensor([span])}
    confidence = trainer._confidence(inputs, probs.log(), None, None, probs.size(1), completion_mask.float())
    torch.testing.assert_close(confidence, torch.tensor([0.5]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sequence_confidence_uses_the_policy_unless_the_sampler_is_asked_for(tmp_path):
    model, tokenizer = build_tiny_lm()
    kwargs = dict(confidence_level="sequence", confidence="arith_mean", confidence_calibration="none")
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    inputs = {
        "sampling_per_token_logps": torch.log(torch.tensor([[0.5, float("nan"), 0.7], [0.2, 0.4, 0.9]])),
        "old_per_token_logps": torch.log(torch.full((2, 3), 0.25)),
    }
    own = torch.zeros(2, 3)
    policy = CGPOTrainer(
        model,
        [length_reward],
        args=CGPOConfig(**settings(tmp_path), **kwargs),
        processing_class=tokenizer,
        train_dataset=text_prompt_dataset(),
    )
    torch.testing.assert_close(policy._confidence(inputs, own, None, None, 3, mask), torch.tensor([0.25, 0.25]))
    without_old = {"sampling_per_token_logps": inputs["sampling_per_token_logps"]}
    torch.testing.assert_close(policy._confidence(without_old, own, None, None, 3, mask), torch.tensor([1.0, 1.0]))
    sampler = CGPOTrainer(
        model,
        [length_reward],
        args=CGPOConfig(**settings(tmp_path), confidence_logps="sampler", **kwargs),
        processing_class=tokenizer,
        train_dataset=text_prompt_dataset(),
    )
    # vLLM's log-probs, NaN where it could not score a token
    torch.testing.assert_close(sampler._confidence(inputs, own, None, None, 3, mask), torch.tensor([0.6, 0.3]))


def test_capture_is_removed_and_the_model_does_not_keep_the_trainer_alive(tmp_path):
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**settings(tmp_path, max_steps=1), confidence="max_prob")
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    fused_forward = model.forward
    trainer.train()
    assert model.forward is fused_forward  # TRL's fused head, not a CGPO wrapper
    assert not model.model._forward_hooks  # the hidden-state hook of max_prob is gone
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert ref() is None


def tiny_gemma2(tokenizer):
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=50.0,
        query_pre_attn_scalar=32,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_default_trains_soft_capped_gemma2_and_max_prob_matches_its_logits(tmp_path, chunk_bytes, monkeypatch):
    """The default estimator on a model with final-logit soft-capping (GRPO trains Gemma 2; so must CGPO): b_t is
    the max of the soft-capped distribution, also when the projection runs one position at a time."""
    if chunk_bytes is not None:
        monkeypatch.setattr(trainer_module, "MAX_PROB_CHUNK_BYTES", chunk_bytes)
    tokenizer = build_tokenizer()
    model = tiny_gemma2(tokenizer)
    args = CGPOConfig(**settings(tmp_path, max_steps=1, learning_rate=0.0), confidence_calibration="none")
    trainer = Recording(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    seen = trainer.seen[0]
    ids = torch.cat([seen["prompt_ids"], seen["completion_ids"]], 1)
    attention = torch.cat([seen["prompt_mask"], seen["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()  # Gemma 2 soft-caps these itself
    length = seen["completion_ids"].size(1)
    expected = logits[:, -length - 1 : -1].softmax(-1).max(-1).values
    mask = seen["completion_mask"].float()
    want = (seen["cgpo_rewards"].unsqueeze(1) - expected) * mask
    torch.testing.assert_close(seen["advantages"], want, atol=1e-4, rtol=1e-4)


def infinite_reward(completions, **kwargs):
    return [math.inf] + [0.5] * (len(completions) - 1)


def too_large_reward(completions, **kwargs):
    return [3.0] * len(completions)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_pipelines_grpo_baseline_drops_non_finite_rewards_too(tmp_path, caplog):
    from trl import GRPOConfig

    from cgpo_trl.checkpoints import ResumableGRPOTrainer

    model, tokenizer = build_tiny_lm()
    args = GRPOConfig(**settings(tmp_path, max_steps=2), num_generations=2)
    trainer = ResumableGRPOTrainer(
        model, [infinite_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    with caplog.at_level(logging.WARNING, logger="cgpo_trl.trainer"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "'infinite_reward' returned 1 non-finite" in caplog.text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_finite_and_out_of_range_rewards_never_reach_the_weights(tmp_path, caplog):
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**settings(tmp_path, max_steps=2))
    trainer = Recording(
        model,
        [infinite_reward, too_large_reward],
        args=args,
        train_dataset=text_prompt_dataset(),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="cgpo_trl.trainer"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for seen in trainer.seen:
        rewards = seen["cgpo_rewards"]
        assert torch.isfinite(rewards).all() and ((rewards >= 0) & (rewards <= 1)).all()
        assert torch.isfinite(seen["advantages"]).all()
    assert "'infinite_reward' returned 1 non-finite" in caplog.text
    assert "'too_large_reward' returned 4 out of range" in caplog.text
    logged = [h for h in trainer.state.log_history if "cgpo/invalid_rewards/too_large_reward" in h]
    assert logged and logged[0]["cgpo/invalid_rewards/too_large_reward"] == 4.0


def test_config_refuses_options_without_a_meaning_for_single_samples():
    base = dict(output_dir="x", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="CGPO has no groups"):
        CGPOConfig(**base, scale_rewards="group")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        CGPOConfig(**base, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="calibration_min_pairs must be >= 2"):
        CGPOConfig(**base, calibration_min_pairs=0)
    with pytest.raises(ValueError, match="calibration_window"):
        CGPOConfig(**base, calibration_window=0, calibration_min_pairs=2)
    with pytest.raises(ValueError, match="negative weight"):
        CGPOConfig(**base, reward_weights=[1.0, -0.5])
    assert CGPOConfig(**base, baseline="batch_mean", reward_weights=[1.0, -0.5]).baseline == "batch_mean"
    with pytest.warns(UserWarning, match="divides each completion's loss by its own length"):
        CGPOConfig(**base, loss_type="grpo")
    with pytest.warns(UserWarning, match="token-level confidence baselines are then"):
        CGPOConfig(**base, importance_sampling_level="sequence")


def test_reward_scaling_none_must_keep_r_in_unit_range(tmp_path):
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**settings(tmp_path), reward_scaling="none", reward_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="needs r in \\[0, 1\\]"):
        CGPOTrainer(
            model,
            [length_reward, length_reward],
            args=args,
            processing_class=tokenizer,
            train_dataset=text_prompt_dataset(),
        )


def test_confidence_calibrated_metric_is_the_mean_of_the_mapped_baselines(tmp_path):
    """cgpo/confidence_calibrated logs mean_t g(b_t), not g(mean_t b_t)."""
    model, tokenizer = build_tiny_lm()
    args = CGPOConfig(**settings(tmp_path, max_steps=1), calibration_min_pairs=4)
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.calibrator.a, trainer.calibrator.b = 3.0, 15.0  # a fitted map, steep where this model's b_t lie
    captured = {}
    original = trainer._log_cgpo_metrics

    def spy(rewards, confidence, values, result, mask, entropies):
        # the map in use at this step, on each b_t and on each completion's mean b_t
        mean_b = (confidence * mask).sum(-1) / mask.sum(-1)
        captured.update(g=trainer.calibrator(confidence), g_of_mean=trainer.calibrator(mean_b), mask=mask.clone())
        return original(rewards, confidence, values, result, mask, entropies)

    trainer._log_cgpo_metrics = spy
    trainer.train()
    g, mask = captured["g"], captured["mask"]
    per_completion = (g * mask).sum(-1) / mask.sum(-1)
    logged = [h["cgpo/confidence_calibrated"] for h in trainer.state.log_history if "cgpo/confidence_calibrated" in h]
    assert logged[0] == pytest.approx(per_completion.mean().item(), abs=1e-6)
    assert abs(logged[0] - captured["g_of_mean"].mean().item()) > 1e-3  # the test tells the two apart


@pytest.mark.parametrize(
    "baseline, schedule",
    [("prompt_tracker", "constant"), ("tracker_confidence", "constant"), ("prompt_tracker", "kl")],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tracker_state_is_saved_and_restored_through_resume(tmp_path, baseline, schedule):
    """The per-prompt tracker (and the two-feature map) are in the checkpoint and back before the first resumed
    step; every prompt the run visited is tracked."""
    import json
    import os

    kwargs = settings(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    args = CGPOConfig(
        **kwargs, baseline=baseline, calibration_min_pairs=4, scale_rewards="batch", tracker_rho_schedule=schedule
    )
    model, tokenizer = build_tiny_lm()
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "cgpo_state.json").read_text())
    assert len(saved["tracker"]["alpha"]) == 8  # 2 steps x 4 prompts, all distinct within an epoch of 16
    assert len(trainer.tracker) == 16
    if schedule == "kl":  # with their last responses, to measure the next visit's drift
        assert len(saved["tracker"]["responses"]) == 8
    if baseline == "tracker_confidence":
        assert saved["calibrator"]["with_values"] and len(saved["calibrator"]["values"]) == len(
            saved["calibrator"]["rewards"]
        )

    resumed, at_start = resume_tiny_lm_run(args, os.path.join(args.output_dir, "checkpoint-2"))
    assert at_start == saved
    assert len(resumed.tracker) == 16


def kl_tracker_args(tmp_path, **overrides) -> CGPOConfig:
    """SPO's tracker with the KL-adaptive rho, 3 tiny steps."""
    return CGPOConfig(
        **settings(tmp_path, **{"max_steps": 3, **overrides}), baseline="prompt_tracker", tracker_rho_schedule="kl"
    )


@pytest.mark.parametrize("learning_rate", [0.0, 1e-2])
def test_kl_adaptive_rho_measures_how_far_the_policy_moved_on_the_stored_response(tmp_path, learning_rate):
    """SPO's adaptive forgetting through the trainer: the same 4 prompts every step, so from step 2 on each has a
    stored response. A policy that never moves (lr 0) re-scores it exactly (D = 0, rho at its upper clip 0.96);
    a moving one (lr 1e-2) gives D > 0 and a smaller rho. A misaligned or wrong stored response would give D > 0
    at lr 0; a drift never measured, or never used, would give rho = 0.96 at lr 1e-2."""
    args = kl_tracker_args(tmp_path, learning_rate=learning_rate)
    model, tokenizer = build_tiny_lm()
    trainer = Recording(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(4), processing_class=tokenizer
    )
    visits = []
    update = trainer.tracker.update
    trainer.tracker.update = lambda keys, rewards, rhos=None: (
        visits.append(rhos.clone()),
        update(keys, rewards, rhos),
    )
    trainer.train()
    assert len(visits) == 3 and len(trainer.tracker.responses) == 4
    assert visits[0].tolist() == pytest.approx([0.96] * 4)  # first visits: nothing stored yet
    drifts = [h["cgpo/tracker_drift"] for h in trainer.state.log_history if "cgpo/tracker_drift" in h]
    assert len(drifts) == 2  # measured on both revisits
    later = torch.cat(visits[1:])
    if learning_rate == 0.0:
        assert max(drifts) < 1e-4
        assert later.tolist() == pytest.approx([0.96] * 8)
    else:
        assert min(drifts) > 1e-3
        assert (later < 0.96 - 1e-3).any()
        assert later.min() >= 0.875 - 1e-6  # SPO's lower clip
    # the stored responses are the last visit's completions (their unpadded ids)
    last = trainer.seen[-1]
    completions = {
        tuple(i for i, m in zip(ids, mask) if m)
        for ids, mask in zip(last["completion_ids"].tolist(), last["completion_mask"].tolist())
    }
    assert {tuple(ids) for ids, _ in trainer.tracker.responses.values()} == completions


def test_kl_adaptive_rho_rescores_stored_responses_with_their_images(tmp_path):
    """The VLM path of the drift pass: 4 prompts that differ only by their image, revisited every step. With a policy
    that never moves the stored responses re-score exactly, which holds only if each is scored with its own prompt's
    image (pixel values, grid and per-position token types rebuilt for the stored response's length)."""
    args = kl_tracker_args(tmp_path, learning_rate=0.0, max_completion_length=6)
    model, processor = build_tiny_vlm()
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=image_prompt_dataset(4), processing_class=processor
    )
    trainer.train()
    drifts = [h["cgpo/tracker_drift"] for h in trainer.state.log_history if "cgpo/tracker_drift" in h]
    assert len(drifts) == 2 and max(drifts) < 1e-4
    assert len(trainer.tracker.responses) == 4


def test_kl_drift_pass_runs_only_when_the_batch_revisits_a_stored_prompt(tmp_path, monkeypatch):
    """8 prompts, 4 per step: step 1 stores, step 2 sees 4 new prompts (no stored response: no pass), step 3 is the
    second epoch and revisits. The extra forward pass runs once, not on every step after the first."""
    passes = []
    drift = trainer_module.logprob_drift
    monkeypatch.setattr(trainer_module, "logprob_drift", lambda *a: passes.append(1) or drift(*a))
    args = kl_tracker_args(tmp_path, shuffle_dataset=False)
    model, tokenizer = build_tiny_lm()
    trainer = CGPOTrainer(
        model, [length_reward], args=args, train_dataset=text_prompt_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    assert len(passes) == 1
    assert len([h for h in trainer.state.log_history if "cgpo/tracker_drift" in h]) == 1
