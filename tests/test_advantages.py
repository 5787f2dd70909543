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
from cgpo_trl.baselines import PromptTracker, adaptive_rho, logprob_drift, prompt_key
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
    mean, std = 0.6, math.sqrt(sum((x - 0.6) ** 2 for x in r) / 5)  # the centred batch's (population) std
    torch.testing.assert_close(out.advantages, (torch.tensor(r) - mean) / (std + STD_EPS))
    assert out.scale == pytest.approx(std + STD_EPS)
    # token-level: the std runs over valid tokens, every token weighted once
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("confidence", "none", scale="batch"),
        confidence=[[0.5, 0.5], [0.5, 0.9]],
        mask=[[1.0, 1.0], [1.0, 0.0]],
    )
    values = torch.tensor([0.5, 0.5, -0.5])  # the padded token does not count
    rms = values.pow(2).mean().sqrt()
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.5], [-0.5, 0.0]]) / (rms + STD_EPS))


def test_whitening_uses_every_process():
    gather = other_process([0.0, 0.0, 0.0, 0.0], [[4 * 0.5**2, 4.0]])  # rewards; then its sum of A^2 and count
    out = adv([1.0, 1.0], AdvantageSettings("batch_mean", scale="batch"), gather=gather)
    a = torch.tensor([2 / 3, 2 / 3, -1 / 3, -1 / 3, -1 / 3, -1 / 3])
    a_here = torch.tensor([2 / 3, 2 / 3])
    rms = ((a_here.pow(2).sum() + 1.0) / 6).sqrt()
    torch.testing.assert_close(out.advantages, a_here / (rms + STD_EPS))
    assert a.mean().abs() < 1e-6  # the global centre used every process's rewards


def test_prompt_tracker_values_after_a_known_reward_sequence():
    tracker = PromptTracker(rho=0.5)
    key = prompt_key("What is 1+1?")
    assert math.isnan(tracker.values([key])[0])
    for r in (1.0, 0.0, 1.0):
        tracker.update([key], torch.tensor([r]))
    # alpha: 1 -> 0.5 -> 1.25 ; beta: 0 -> 1 -> 0.5
    assert tracker.alpha[key] == pytest.approx(1.25) and tracker.beta[key] == pytest.approx(0.5)
    assert tracker.values([key])[0] == pytest.approx(1.25 / 1.75)
    again = PromptTracker()
    again.load_state_dict(tracker.state_dict())
    assert again.state_dict() == tracker.state_dict()
    with pytest.raises(ValueError, match="rewards in \\[0, 1\\]"):
        tracker.update([key], torch.tensor([1.5]))


def test_kl_adaptive_rho_on_known_drifts():
    """SPO's clip(2^(-D / 0.06), rho_min, 0.96); no stored response (NaN) forgets at the upper clip."""
    drift = torch.tensor([0.0, 0.06, 0.01, 0.005, NAN])
    rho = adaptive_rho(drift, rho_min=0.875)
    torch.testing.assert_close(rho, torch.tensor([0.96, 0.875, 2 ** (-1 / 6), 2 ** (-1 / 12), 0.96]))
    # mean |new - old| over the masked tokens only; a row with no token has no drift
    new = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -2.0, -9.0], [-4.0, 0.0, 0.0]])
    out = logprob_drift(new, old, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert out[0].item() == pytest.approx(0.25) and math.isnan(out[1].item())


def test_prompt_tracker_with_a_rho_per_visit_and_stored_responses():
    tracker = PromptTracker(rho=0.9, rho_schedule="kl")
    tracker.update([7, 7], torch.tensor([1.0, 0.0]), rhos=torch.tensor([0.96, 0.5]))
    # alpha: 1 -> 0.5 * 1 + 0 ; beta: 0 -> 0.5 * 0 + 1 (the constant 0.9 would give alpha 0.9)
    assert tracker.alpha[7] == pytest.approx(0.5) and tracker.beta[7] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 visits but 1 forgetting factors"):
        tracker.update([7, 8], torch.tensor([1.0, 0.0]), rhos=torch.tensor([0.9]))
    # the last row of a repeated key wins; only masked tokens are kept
    ids = torch.tensor([[5, 6, 0], [8, 9, 10]])
    logps = torch.tensor([[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]])
    tracker.store([7, 7], ids, logps, torch.tensor([[1, 1, 0], [1, 1, 0]]))
    assert tracker.responses == {7: ([8, 9], [-1.0, -2.0])}
    again = PromptTracker()
    again.load_state_dict(tracker.state_dict())
    assert again.state_dict() == tracker.state_dict() and again.adaptive and again.responses == tracker.responses
    with pytest.raises(ValueError, match="tracker_rho_schedule='kll'"):
        PromptTracker(rho_schedule="kll")
    with pytest.raises(ValueError, match="tracker_rho_min must be in"):
        PromptTracker(rho_schedule="kl", rho_min=0.99)


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
    torch.testing.assert_close(out.prompt_values, torch.tensor([0.25, 2 / 3, 0.75]))
    # tracker_confidence: g(b_t, v) with a known fitted map; the unseen prompt reads v = the batch mean (0.5)
    cal = OnlineCalibrator(window=10, min_pairs=2, with_values=True)
    cal.a, cal.a_value, cal.b = 1.0, 2.0, -0.5
    confidence, values = torch.tensor([[0.9, 0.5], [0.2, 0.4]]), torch.tensor([[0.25], [0.5]])
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("tracker_confidence", "online"),
        confidence=confidence.tolist(),
        values=[0.25, NAN],
        calibrator=cal,
    )
    g = torch.sigmoid(torch.logit(confidence) + 2.0 * torch.logit(values) - 0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[1.0], [0.0]]) - g)
    with pytest.raises(ValueError, match="needs confidence_calibration='online'"):
        AdvantageSettings("tracker_confidence", "none")


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


def test_whitening_never_divides_a_nonzero_advantage_by_zero():
    """Identical token advantages (std 0) keep their size; only all-zero advantages stay 0."""
    out = adv([1.0, 1.0], AdvantageSettings("confidence", "none", scale="batch"), confidence=[[0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(out.advantages, torch.full((2, 2), 0.5 / (0.5 + STD_EPS)))
    out = adv([1.0, 1.0], AdvantageSettings("batch_mean", scale="batch"))
    assert out.advantages.abs().max() == 0 and out.scale == pytest.approx(STD_EPS)


def test_whitening_ignores_unscored_completions_and_padding():
    out = adv(
        [1.0, NAN, 0.0],
        AdvantageSettings("confidence", "none", scale="batch"),
        confidence=[[0.5, 0.9], [0.1, 0.1], [0.5, 0.5]],
        mask=[[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]],
    )
    rms = torch.tensor([0.5, -0.5, -0.5]).pow(2).mean().sqrt()
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.0], [0.0, 0.0], [-0.5, -0.5]]) / (rms + STD_EPS))


def test_no_reward_at_all_gives_zero_advantages_not_nan():
    for settings in (AdvantageSettings("batch_mean"), AdvantageSettings("confidence", "batch")):
        out = adv([NAN, NAN], settings, confidence=[0.3, 0.7])
        assert torch.equal(out.advantages, torch.zeros(2))
    cal = OnlineCalibrator(window=10, min_pairs=2)
    out = adv([NAN, NAN], AdvantageSettings("confidence", "online"), confidence=[0.3, 0.7], calibrator=cal)
    assert torch.equal(out.advantages, torch.zeros(2)) and torch.equal(out.baseline, torch.zeros(2))


def test_batch_calibration_centres_token_advantages_per_completion():
    """Each completion contributes the mean of its token gaps, padding excluded, to the batch centre."""
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("confidence", "batch"),
        confidence=[[0.2, 0.4], [0.5, 0.9]],
        mask=[[1.0, 1.0], [1.0, 0.0]],
    )
    centre = ((0.8 + 0.6) / 2 + (-0.5)) / 2
    want = torch.tensor([[0.8 - centre, 0.6 - centre], [-0.5 - centre, 0.0]])
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.baseline, torch.tensor([[0.2, 0.4], [0.5, 0.9]]))
    assert out.scale == 1.0


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="baseline='prompt_tracker' needs `prompt_values`"):
        adv([1.0], AdvantageSettings("prompt_tracker"))
    with pytest.raises(ValueError, match="baseline='tracker_confidence' needs `prompt_values`"):
        adv([1.0], AdvantageSettings("tracker_confidence", "online"), confidence=[0.5])
    with pytest.raises(ValueError, match="needs an OnlineCalibrator"):
        adv([1.0], AdvantageSettings("confidence", "online"), confidence=[0.5])
    for field, kwargs in (
        ("baseline=", {"baseline": "x"}),
        ("confidence_calibration=", {"calibration": "x"}),
        ("scale_rewards=", {"scale": "x"}),
    ):
        with pytest.raises(ValueError, match=field):
            AdvantageSettings(**kwargs)


def test_check_rewards_boundaries_and_examples():
    per_func = torch.tensor([[0.0], [1.0], [-math.inf], [1.25]])
    cleaned, problems = check_rewards(per_func, ["r"], unit_range=True)
    assert [(p.kind, p.count, p.example) for p in problems] == [
        ("non-finite", 1, -math.inf),
        ("out of range", 1, 1.25),
    ]
    assert cleaned[:2, 0].tolist() == [0.0, 1.0] and math.isnan(cleaned[2, 0]) and cleaned[3, 0] == 1.0


def test_prompt_tracker_edge_cases():
    tracker = PromptTracker(rho=1.0)  # no forgetting is allowed
    tracker.update([1, 1, 2], torch.tensor([0.0, NAN, 1.0]))  # a NaN reward is skipped, the next one still counts
    assert tracker.values([1, 2]).tolist() == [0.0, 1.0]  # one visit each: alpha + beta = 1
    for rho in (0.0, 1.5):
        with pytest.raises(ValueError, match="tracker_rho must be in \\(0, 1\\]"):
            PromptTracker(rho=rho)


def test_prompt_keys_ignore_key_order_and_keep_non_ascii_and_paths():
    assert prompt_key({"role": "user", "content": "x"}) == prompt_key({"content": "x", "role": "user"})
    assert prompt_key("Wie viel ist 2 + 2? ✓") == 3596486345954005039  # a fixed digest of the UTF-8 text
    assert prompt_key("q", ["a.png"]) != prompt_key("q", ["b.png"])  # image paths are keyed by name
    from PIL import Image

    red = Image.new("RGB", (4, 4), "red")
    assert prompt_key("q", red) == prompt_key("q", [red])  # one image or a list of one
    block = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "q"}]}]
    assert prompt_key(block) == prompt_key(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    )
    assert prompt_key([{"x": object()}]) == prompt_key([{"x": object()}])  # no crash on what JSON cannot hold


def test_prompt_keys_see_every_part_of_a_conversation():
    def chat(text, role="user"):
        return [{"role": role, "content": [{"type": "text", "text": text}]}]

    assert prompt_key(chat("2+2?")) != prompt_key(chat("3+3?"))
    assert prompt_key(chat("2+2?")) != prompt_key(chat("2+2?", role="system"))


def test_whitening_edge_counts():
    out = adv([NAN, NAN], AdvantageSettings("batch_mean", scale="batch"))
    assert torch.equal(out.advantages, torch.zeros(2))  # nothing scored: zeros, never NaN
    out = adv([1.0], AdvantageSettings("confidence", "none", scale="batch"), confidence=[[0.6]], mask=[[1.0]])
    torch.testing.assert_close(out.advantages, torch.tensor([[0.4 / (0.4 + STD_EPS)]]))  # one token is enough
    with pytest.raises(ValueError, match="scale_rewards="):
        AdvantageSettings(scale="x")


def test_prompt_key_tells_unknown_content_types_apart_and_a_decayed_belief_is_unknown():
    """Content the key cannot serialise is hashed by its type name, so two prompts differing only there get different
    keys; a tracker entry whose alpha + beta is 0 (a hand-edited or fully decayed state) reads as unseen, not as a
    division by zero."""
    from fractions import Fraction

    assert prompt_key([{"role": "user", "content": Fraction(1, 2)}]) != prompt_key(
        [{"role": "user", "content": complex(1, 2)}]
    )
    tracker = PromptTracker()
    tracker.load_state_dict({"rho": 0.9, "alpha": {"7": 0.0, "8": 1.0}, "beta": {"7": 0.0, "8": 3.0}})
    values = tracker.values([7, 8])
    assert math.isnan(values[0]) and values[1] == pytest.approx(0.25)


def test_fitted_online_map_at_token_level_and_value_model_at_sequence_level():
    """The fitted map g applies per token (b_t is [B, T]) and, for the value model at sequence level, pairs each
    completion's c with its own prompt's value; online calibration without a calibrator is refused by name."""
    cal = OnlineCalibrator(window=10, min_pairs=2)
    cal.a, cal.b = 2.0, 0.5
    confidence = torch.tensor([[0.9, 0.5], [0.2, 0.4]])
    out = adv([1.0, 0.0], AdvantageSettings("confidence", "online"), confidence=confidence.tolist(), calibrator=cal)
    g = torch.sigmoid(2.0 * torch.logit(confidence) + 0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[1.0], [0.0]]) - g)

    cal = OnlineCalibrator(window=10, min_pairs=2, with_values=True)
    cal.a, cal.a_value, cal.b = 1.0, 2.0, -0.5
    c, v = torch.tensor([0.9, 0.2]), torch.tensor([0.25, 0.75])
    out = adv(
        [1.0, 0.0],
        AdvantageSettings("tracker_confidence", "online"),
        confidence=c.tolist(),
        values=v.tolist(),
        calibrator=cal,
    )
    g = torch.sigmoid(torch.logit(c) + 2.0 * torch.logit(v) - 0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, 0.0]) - g)
    with pytest.raises(ValueError, match="needs an OnlineCalibrator"):
        adv([1.0], AdvantageSettings("confidence", "online"), confidence=[0.5])
