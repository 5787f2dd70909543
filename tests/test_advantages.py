"""`compute_advantages` and the per-prompt tracker on hand-computed values (no model)."""

import math

import pytest
import torch

from cgpo_trl.advantages import (
    STD_EPS,
    AdvantageInputs,
    AdvantageSettings,
    check_rewards,
    compute_advantages,
    scale_rewards,
)
from cgpo_trl.baselines import PromptTracker, prompt_key
from cgpo_trl.confidence import OnlineCalibrator

NAN = math.nan


def adv(rewards, settings, confidence=None, values=None, mask=None, calibrator=None, gather=None):
    rewards = torch.tensor(rewards)
    mask = torch.ones(len(rewards), 2) if mask is None else torch.tensor(mask)
    inputs = AdvantageInputs(
        rewards=rewards,
        mask=mask,
        confidence=None if confidence is None else torch.tensor(confidence),
        prompt_values=None if values is None else torch.tensor(values),
    )
    kwargs = {} if gather is None else {"gather": gather}
    return compute_advantages(inputs, settings, calibrator, **kwargs)


def other_process(*tensors):
    """A `gather` that appends what a second process holds (shape-matched by position in the call order)."""
    queue = [torch.tensor(t) for t in tensors]

    def gather(x):
        return torch.cat([x, queue.pop(0).to(x.dtype).reshape(-1, *x.shape[1:])])

    return gather


def test_confidence_none_batch_clip_and_unscored():
    r, c = [1.0, 0.0, 0.5, NAN], [0.6, 0.2, 0.5, 0.3]
    out = adv(r, AdvantageSettings("confidence", "none"), confidence=c)
    torch.testing.assert_close(out.advantages, torch.tensor([0.4, -0.2, 0.0, 0.0]))
    gap = (0.4 - 0.2 + 0.0) / 3  # the unscored completion is left out of the centre
    out = adv(r, AdvantageSettings("confidence", "batch"), confidence=c)
    torch.testing.assert_close(out.advantages, torch.tensor([0.4 - gap, -0.2 - gap, -gap, 0.0]))
    out = adv(r, AdvantageSettings("confidence", "none", clip=0.1), confidence=c)
    torch.testing.assert_close(out.advantages, torch.tensor([0.1, -0.1, 0.0, 0.0]))


def test_token_baselines_are_per_token_and_masked():
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("confidence", "none"),
        confidence=[[0.9, 0.5], [0.25, 0.75]],
        mask=[[1.0, 1.0], [1.0, 0.0]],
    )
    torch.testing.assert_close(out.advantages, torch.tensor([[0.1, 0.5], [-0.25, 0.0]]))


def test_online_calibration_cold_start_is_the_batch_mean_then_the_map():
    cal = OnlineCalibrator(window=100, min_pairs=4)
    out = adv(
        [1.0, 0.0, 1.0, 0.0],
        AdvantageSettings("confidence", "online"),
        confidence=[0.9, 0.1, 0.8, 0.2],
        calibrator=cal,
    )
    torch.testing.assert_close(out.advantages, torch.tensor([0.5, -0.5, 0.5, -0.5]))  # never A = r
    cal.add(torch.linspace(0.1, 0.9, 9), (torch.linspace(0.1, 0.9, 9) > 0.5).float())
    cal.commit()
    c = torch.tensor([0.9, 0.1])
    out = adv([1.0, 0.0], AdvantageSettings("confidence", "online"), confidence=c.tolist(), calibrator=cal)
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, 0.0]) - cal(c))


def test_batch_mean_is_global_over_processes():
    out = adv([1.0, 0.0], AdvantageSettings("batch_mean"), gather=other_process([1.0, 1.0]))
    torch.testing.assert_close(out.advantages, torch.tensor([0.25, -0.75]))  # mean of [1, 0, 1, 1]


def test_whitening_of_a_hand_made_batch():
    """baseline=batch_mean + scale=batch is REINFORCE++ with k = 1: (r - mean) / std over the global batch."""
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    out = adv(r, AdvantageSettings("batch_mean", scale="batch"))
    mean, std = 0.6, math.sqrt(sum((x - 0.6) ** 2 for x in r) / 4)  # unbiased std, like GRPO's torch.std
    torch.testing.assert_close(out.advantages, (torch.tensor(r) - mean) / (std + STD_EPS))
    assert out.scale == pytest.approx(std + STD_EPS)
    # token-level: the std runs over valid tokens, every token weighted once
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("confidence", "none", scale="batch"),
        confidence=[[0.5, 0.5], [0.5, 0.9]],
        mask=[[1.0, 1.0], [1.0, 0.0]],
    )
    values = torch.tensor([0.5, 0.5, -0.5])
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.5], [-0.5, 0.0]]) / (values.std() + STD_EPS))


def test_whitening_uses_every_process():
    gather = other_process([0.0, 0.0], [[-1.0, 0.5, 2.0]])  # rewards; then sum, sum of squares, count of its A
    out = adv([1.0, 1.0], AdvantageSettings("batch_mean", scale="batch"), gather=gather)
    a = torch.tensor([0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(out.advantages, torch.tensor([0.5, 0.5]) / (a.std() + STD_EPS))


def test_prompt_tracker_values_after_a_known_reward_sequence():
    tracker = PromptTracker(rho=0.5)
    key = prompt_key("What is 1+1?")
    assert math.isnan(tracker.values([key])[0])
    for r in (1.0, 0.0, 1.0):
        tracker.update([key], torch.tensor([r]))
    # alpha: 1 -> 0.5 -> 1.25 ; beta: 0 -> 1 -> 0.5
    assert tracker.alpha[key] == pytest.approx(1.25) and tracker.beta[key] == pytest.approx(0.5)
    assert tracker.values([key])[0] == pytest.approx(1.25 / 1.75)
    # a prior seeds an unseen prompt with one pseudo-observation of its value
    other = prompt_key("What is 2+2?")
    tracker.update([other], torch.tensor([0.0]), prior=torch.tensor([0.8]))
    assert tracker.alpha[other] == pytest.approx(0.4) and tracker.beta[other] == pytest.approx(0.1 + 1.0)
    again = PromptTracker()
    again.load_state_dict(tracker.state_dict())
    assert again.state_dict() == tracker.state_dict()
    with pytest.raises(ValueError, match="rewards in \\[0, 1\\]"):
        tracker.update([key], torch.tensor([1.5]))


def test_prompt_keys_are_stable_and_see_images():
    from PIL import Image

    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name it."}]}]
    assert prompt_key(conversation, [red]) == prompt_key(conversation, [Image.new("RGB", (4, 4), "red")])
    assert prompt_key(conversation, [red]) != prompt_key(conversation, [blue])
    assert prompt_key("a") != prompt_key("b")
    assert prompt_key("a") == 2888010436916310038  # a fixed digest, not Python's per-process `hash`


def test_prompt_tracker_baseline_and_tracker_confidence():
    out = adv([1.0, 0.0, 1.0], AdvantageSettings("prompt_tracker"), values=[0.25, NAN, 0.75])
    # unseen prompt: the global batch's mean reward (2/3)
    torch.testing.assert_close(out.advantages, torch.tensor([0.75, -2 / 3, 0.25]))
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("tracker_confidence", "none"),
        confidence=[[0.9, 0.5], [0.2, 0.4]],
        values=[0.25, NAN],
    )
    # seen: the tracker value on every token; unseen: the token baselines
    torch.testing.assert_close(out.advantages, torch.tensor([[0.75, 0.75], [-0.2, -0.4]]))


def test_check_rewards_names_the_function():
    per_func = torch.tensor([[math.inf, 0.5], [0.2, 1.7], [NAN, -0.1]])
    cleaned, problems = check_rewards(per_func, ["accuracy", "format"], unit_range=True)
    assert math.isnan(cleaned[0, 0]) and math.isnan(cleaned[2, 0])  # inf -> no reward; NaN stays "no reward"
    assert cleaned[:, 1].tolist() == [0.5, 1.0, 0.0]
    assert [(p.function, p.kind, p.count) for p in problems] == [
        ("accuracy", "non-finite", 1),
        ("format", "out of range", 2),
    ]
    cleaned, problems = check_rewards(per_func, ["accuracy", "format"], unit_range=False)
    assert cleaned[1, 1] == pytest.approx(1.7) and [p.kind for p in problems] == ["non-finite"]


def test_scale_rewards_by_hand():
    per_func = torch.tensor([[1.0, 0.5], [NAN, 1.0], [NAN, NAN]])
    weights = torch.tensor([1.0, 3.0])
    out = scale_rewards(per_func, weights, "weight_sum")
    assert out[:2].tolist() == [pytest.approx(2.5 / 4), 1.0] and math.isnan(out[2])
    out = scale_rewards(per_func, weights, "none")
    assert out[:2].tolist() == [2.5, 3.0] and math.isnan(out[2])
    with pytest.raises(ValueError, match="reward_scaling"):
        scale_rewards(per_func, weights, "max")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="baseline"):
        AdvantageSettings("running_mean")
    with pytest.raises(ValueError, match="scale_rewards"):
        AdvantageSettings(scale="group")
    with pytest.raises(ValueError, match="needs `confidence`"):
        adv([1.0], AdvantageSettings("confidence", "none"))
