"""Confidence estimators, spans and the online calibration on hand-computed values."""

import functools
import math

import pytest
import torch

from cgpo_trl.confidence import (
    ConfidenceInputs,
    OnlineCalibrator,
    expected_calibration_error,
    get_confidence_estimator,
    list_confidence_estimators,
    masked_mean,
    register_confidence_estimator,
    span_mask_from_text,
    token_pairs,
)


def update(cal: OnlineCalibrator, c: torch.Tensor, r: torch.Tensor) -> None:
    cal.add(c, r)
    cal.commit()


LOGPS = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.8, 0.8]]))
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the 0.9 of row 0 is padding


def seq(name, logps=LOGPS, mask=MASK):
    return get_confidence_estimator(name, "sequence").fn(ConfidenceInputs(logps=logps, mask=mask))


def test_sequence_estimators_by_hand():
    torch.testing.assert_close(seq("geo_mean"), torch.tensor([math.sqrt(0.5 * 0.25), 0.8]))
    torch.testing.assert_close(seq("arith_mean"), torch.tensor([0.375, 0.8]))
    torch.testing.assert_close(seq("min_prob"), torch.tensor([0.25, 0.8]))
    torch.testing.assert_close(seq("none"), torch.tensor([0.0, 0.0]))


def test_sequence_estimators_ignore_padding_and_empty_rows():
    empty = torch.zeros_like(MASK)
    assert seq("min_prob", mask=empty).tolist() == [0.0, 0.0]
    assert seq("geo_mean", mask=empty).tolist() == [1.0, 1.0]  # exp(0): no tokens, no evidence; A masked anyway


def test_token_estimators_by_hand():
    stats = ConfidenceInputs(
        logps=LOGPS,
        mask=MASK,
        entropy=torch.full((2, 3), math.log(2)),
        log_sum_sq_probs=torch.log(torch.full((2, 3), 0.5)),
        max_logprob=torch.log(torch.full((2, 3), 0.8)),
    )
    for name, value in [("neg_entropy", 0.5), ("self_agreement", 0.5), ("max_prob", 0.8)]:
        out = get_confidence_estimator(name, "token").fn(stats)
        torch.testing.assert_close(out, torch.full((2, 3), value))


def test_registry_errors_and_custom_estimators():
    assert list_confidence_estimators("token") == ["max_prob", "neg_entropy", "self_agreement"]
    with pytest.raises(ValueError, match="not a sequence-level estimator"):
        get_confidence_estimator("max_prob", "sequence")
    with pytest.raises(ValueError, match="confidence_level"):
        get_confidence_estimator("geo_mean", "word")
    with pytest.raises(ValueError, match="unknown statistics"):
        register_confidence_estimator("bad", "token", requires=("logits",))

    def half(inputs):
        return torch.full((inputs.logps.size(0),), 0.5)

    estimator = get_confidence_estimator(half, "sequence")
    assert estimator.name == "half" and estimator.fn(ConfidenceInputs(LOGPS, MASK)).tolist() == [0.5, 0.5]
    assert estimator.level == "sequence" and estimator.requires == ()
    # a token-level callable gets the free fused-head statistics unless it names its own
    token = get_confidence_estimator(functools.partial(half), "token")
    assert token.name == "custom" and token.level == "token" and token.requires == ("log_sum_sq_probs", "entropy")
    half.requires = ("max_logprob",)
    assert get_confidence_estimator(half, "token").requires == ("max_logprob",)
    with pytest.raises(ValueError, match="\\['max_prob', 'neg_entropy', 'self_agreement'\\]"):
        get_confidence_estimator("geo_mean", "token")
    with pytest.raises(ValueError, match="confidence level 'word' is not one of"):
        register_confidence_estimator("x", "word")


def test_registered_estimators_are_complete():
    register_confidence_estimator("quarter", "token", requires=("entropy",))(lambda inputs: inputs.entropy * 0 + 0.25)
    try:
        estimator = get_confidence_estimator("quarter", "token")
        assert (estimator.name, estimator.level, estimator.requires) == ("quarter", "token", ("entropy",))
        stats = ConfidenceInputs(LOGPS, MASK, entropy=torch.zeros(2, 3))
        assert estimator.fn(stats).eq(0.25).all()
    finally:
        from cgpo_trl import confidence

        confidence._REGISTRY.pop(("token", "quarter"))


def test_answer_span_mask():
    pieces = ["<think>", "x", "</think>", "<answer>", "<rg>", "red", "</rg>", "</answer>", "<|im_end|>"]
    assert span_mask_from_text(pieces, "<answer>", "</answer>") == [0, 0, 0, 0, 1, 1, 1, 0, 0]
    # markers split across tokens, and an unclosed answer running to the end
    pieces = ["<ans", "wer>", "blue", " sq", "uare"]
    assert span_mask_from_text(pieces, "<answer>", "</answer>") == [0, 0, 1, 1, 1]
    # no answer at all: every token counts
    assert span_mask_from_text(["a", "b"], "<answer>", "</answer>") == [1, 1]


def test_online_calibrator_maps_and_is_monotone():
    cal = OnlineCalibrator(window=1000, min_pairs=10)
    c = torch.linspace(0.05, 0.95, 200)
    assert not cal.fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        cal(c)  # the caller picks the cold-start baseline (the trainer: the batch's mean reward)
    cal.add(c[:5], torch.ones(5))
    cal.commit()
    assert not cal.fitted  # too few pairs
    cal = OnlineCalibrator(window=1000, min_pairs=10)
    update(cal, c, c.clone())  # already calibrated: g is close to identity
    torch.testing.assert_close(cal(c), c, atol=0.03, rtol=0)
    cal = OnlineCalibrator(window=1000, min_pairs=10)
    update(cal, c, 1 - c)  # anti-correlated: the monotone fit is the constant mean
    assert cal.a == 0.0
    torch.testing.assert_close(cal(c), torch.full_like(c, 0.5), atol=1e-4, rtol=0)


def test_online_calibrator_fits_crowded_confidences():
    """Confidences near 1 with a small spread (as real ones are) still give an increasing, better-than-constant map."""
    gen = torch.Generator().manual_seed(0)
    c = (0.95 + 0.022 * torch.randn(3000, generator=gen)).clamp(0.5, 0.9999)
    r = (torch.rand(3000, generator=gen) < (c - 0.9) * 8).float()
    cal = OnlineCalibrator(window=4000, min_pairs=10)
    update(cal, c, r)
    assert cal.a > 1.0
    g = cal(c)
    bce = torch.nn.functional.binary_cross_entropy
    assert bce(g, r) < bce(torch.full_like(r, r.mean().item()), r) - 0.02
    assert (g[c.argsort()].diff() >= 0).all()


def test_online_calibrator_window_and_state_roundtrip():
    cal = OnlineCalibrator(window=8, min_pairs=4)
    update(cal, torch.linspace(0.1, 0.9, 12), torch.tensor([0.0, 1.0] * 6))
    assert len(cal.confidences) == 8 and cal.confidences[0] == pytest.approx(0.1 + 4 * 0.8 / 11)
    cal.add(torch.tensor([0.5]), torch.tensor([1.0]))  # queued, not yet in the window: kept in the state too
    again = OnlineCalibrator()
    again.load_state_dict(cal.state_dict())
    c = torch.tensor([0.2, 0.7])
    torch.testing.assert_close(again(c), cal(c))
    assert again.pending_rewards == [1.0] and len(again.rewards) == 8


def test_online_calibrator_only_changes_on_commit():
    """Pairs added while a generation is still in use never move the map until `commit`."""
    cal = OnlineCalibrator(window=100, min_pairs=4)
    c = torch.linspace(0.1, 0.9, 20)
    update(cal, c, (c > 0.5).float())
    before = cal(c).clone()
    cal.add(c, 1 - (c > 0.5).float())
    torch.testing.assert_close(cal(c), before)
    cal.commit()
    assert not torch.allclose(cal(c), before)
    assert cal.pending_rewards == [] and len(cal.rewards) == 40


@pytest.mark.parametrize("window,min_pairs,match", [(0, 2, "calibration_window"), (10, 0, "calibration_min_pairs")])
def test_online_calibrator_rejects_degenerate_windows(window, min_pairs, match):
    with pytest.raises(ValueError, match=match):
        OnlineCalibrator(window=window, min_pairs=min_pairs)


def test_expected_calibration_error_by_hand():
    c = torch.tensor([0.1, 0.1, 0.9, 0.9])
    r = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(c, r) == pytest.approx(0.1)
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(torch.tensor([0.5]), torch.tensor([math.nan])))


def test_token_pairs_are_evenly_spaced_valid_tokens():
    baselines = torch.arange(12, dtype=torch.float32).view(2, 6) / 10
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    c, r = token_pairs(baselines, mask, torch.tensor([1.0, 0.0]), per_completion=3)
    torch.testing.assert_close(c[0], torch.tensor([0.0, 0.2, 0.4]))  # positions 0, 2, 4 of the 5 valid ones
    torch.testing.assert_close(c[1, :2], torch.tensor([0.6, 0.7]))  # fewer valid tokens than asked: all of them
    assert math.isnan(c[1, 2]) and math.isnan(r[1, 2])
    assert r[0].tolist() == [1.0, 1.0, 1.0] and r[1, :2].tolist() == [0.0, 0.0]


def test_masked_mean_by_hand():
    x = torch.tensor([[2.0, 4.0, 9.0], [5.0, 7.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([3.0, 5.0]))  # one valid token: divide by 1
    assert masked_mean(x, mask, dim=None).item() == pytest.approx(11 / 3)
    assert masked_mean(x, torch.zeros_like(mask), dim=None).item() == 0.0


def test_answer_span_uses_the_first_pair_and_ignores_an_earlier_closing_marker():
    pieces = ["</answer>", "x", "<answer>", "a", "</answer>", "<answer>", "b", "</answer>"]
    assert span_mask_from_text(pieces, "<answer>", "</answer>") == [0, 0, 0, 1, 0, 0, 0, 0]


def test_online_calibrator_edges():
    cal = OnlineCalibrator(window=4, min_pairs=4)  # window == min_pairs is allowed
    cal.add(torch.tensor([0.2, math.nan, 0.4]), torch.tensor([0.0, 1.0, math.nan]))
    assert cal.pending_rewards == [0.0]  # a pair with a NaN on either side is dropped
    cal.add(torch.tensor([0.5, 0.6, 0.9]), torch.tensor([1.0, 0.0, 1.0]))
    cal.commit()
    assert cal.fitted  # exactly min_pairs pairs are enough
    cal.a, cal.b = 0.0, 0.3  # a flat map: confidences of exactly 0 or 1 must not give NaN
    torch.testing.assert_close(
        cal(torch.tensor([0.0, 1.0])), torch.full((2,), float(torch.sigmoid(torch.tensor(0.3))))
    )
    state = cal.state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("pending")}  # a checkpoint from before the queue
    again = OnlineCalibrator()
    again.load_state_dict(old)
    assert again.pending_rewards == [] and again.rewards == cal.rewards
    with pytest.raises(ValueError, match="missing \\['a'\\]"):
        again.load_state_dict({k: v for k, v in state.items() if k != "a"})


def test_platt_fit_survives_extreme_and_degenerate_inputs():
    cal = OnlineCalibrator(window=100, min_pairs=4)
    update(cal, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5]), torch.tensor([0.0, 1.0, 0.0, 1.5, 0.5]))
    assert math.isfinite(cal.a) and math.isfinite(cal.b) and cal.a > 0
    flat = OnlineCalibrator(window=100, min_pairs=4)
    update(flat, torch.full((8,), 0.7), torch.tensor([1.0, 0.0] * 4))  # no spread in c: g is the mean reward
    torch.testing.assert_close(flat(torch.tensor([0.1, 0.9])), torch.tensor([0.5, 0.5]), atol=1e-3, rtol=0)
    separable = OnlineCalibrator(window=100, min_pairs=4)
    c = torch.linspace(0.05, 0.95, 40)
    update(separable, c, (c > 0.5).float())  # perfectly separable: the L2 term keeps the slope finite
    assert 0 < separable.a < 100


def test_token_pairs_default_count_and_empty_rows():
    baselines = torch.arange(30, dtype=torch.float32).view(2, 15) / 100
    mask = torch.tensor([[0.0] * 15, [1.0] * 15])
    c, r = token_pairs(baselines, mask, torch.tensor([1.0, 0.0]))
    assert c.shape == (2, 8)  # 8 pairs per completion by default
    assert torch.isnan(c[0]).all() and not torch.isnan(c[1]).any()  # an empty row does not stop the next one


def test_expected_calibration_error_keeps_the_last_bin_and_drops_nan_confidences():
    c, r = torch.tensor([0.85, 0.95]), torch.tensor([0.95, 0.85])
    assert expected_calibration_error(c, r) == pytest.approx(0.1)  # bins 8 and 9, not merged
    assert expected_calibration_error(torch.tensor([math.nan, 0.3]), torch.tensor([1.0, 0.3])) == pytest.approx(0.0)


def test_edge_bins_rows_and_reward_clipping():
    assert masked_mean(torch.tensor([[4.0, 9.0]]), torch.tensor([[1.0, 0.0]]), dim=None).item() == 4.0
    # c = 1.0 falls in the last bin with 0.95, not a bin of its own
    assert expected_calibration_error(torch.tensor([1.0, 0.95]), torch.tensor([0.95, 1.0])) == pytest.approx(0.0)
    c, _ = token_pairs(torch.tensor([[0.3, 0.9]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]), per_completion=2)
    assert c[0, 0] == pytest.approx(0.3)  # a completion with a single valid token still gives its pair
    confidences = torch.linspace(0.1, 0.9, 12)
    above = OnlineCalibrator(window=100, min_pairs=4)
    update(above, confidences, torch.tensor([0.0, 1.5] * 6))  # rewards are fitted as clipped to [0, 1]
    clipped = OnlineCalibrator(window=100, min_pairs=4)
    update(clipped, confidences, torch.tensor([0.0, 1.0] * 6))
    assert (above.a, above.b) == pytest.approx((clipped.a, clipped.b))


def test_value_model_uses_both_features_and_refuses_mismatched_states():
    """With prompt values, g(c, v) learns a reward that depends on v where the confidence alone cannot."""
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(2000, generator=gen) * 0.8 + 0.1
    v = torch.rand(2000, generator=gen) * 0.8 + 0.1
    r = (torch.rand(2000, generator=gen) < v).float()  # the reward follows the prompt value, not the confidence
    fused = OnlineCalibrator(window=4000, min_pairs=10, with_values=True)
    fused.add(c, r, v)
    fused.commit()
    assert fused.a_value > 1.0 and fused.a < 0.5
    bce = torch.nn.functional.binary_cross_entropy
    alone = OnlineCalibrator(window=4000, min_pairs=10)
    update(alone, c, r)
    assert bce(fused(c, v), r) < bce(alone(c), r) - 0.05
    with pytest.raises(ValueError, match="pass `v`"):
        fused(c)
    with pytest.raises(ValueError, match="was the baseline changed"):
        alone.load_state_dict(fused.state_dict())


def test_ece_uses_ten_bins_and_puts_negative_confidences_in_the_first():
    # 0.08 and 0.095 share the first of 10 bins (they would not with 11): |0.0875 - 0.5| = 0.4125
    assert expected_calibration_error(torch.tensor([0.08, 0.095]), torch.tensor([1.0, 0.0])) == pytest.approx(0.4125)
    # -0.2 is clamped into bin 0 with 0.05: |(-0.2 + 0.05) / 2 - 0.5| = 0.575 (a bin of its own would give 0.625)
    assert expected_calibration_error(torch.tensor([-0.2, 0.05]), torch.tensor([1.0, 0.0])) == pytest.approx(0.575)
