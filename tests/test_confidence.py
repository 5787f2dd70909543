"""Confidence estimators, spans and the online calibration on hand-computed values."""

import math

import pytest
import torch

from cgpo_trl.confidence import (
    ConfidenceInputs,
    OnlineCalibrator,
    expected_calibration_error,
    get_confidence_estimator,
    list_confidence_estimators,
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
