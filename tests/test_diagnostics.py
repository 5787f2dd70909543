"""Collapse diagnostics: known answers, and the saliency reward logs them through TRL's `log_metric`."""

import math

import numpy as np
import pytest
from PIL import Image

from cgpo_trl.saliency.diagnostics import expression_diagnostics, normalised_entropy
from cgpo_trl.saliency.rewards import get_reward_funcs
from cgpo_trl.saliency.segmenters import load_segmenter


def test_normalised_entropy_is_zero_for_one_word_and_one_for_a_uniform_vocabulary():
    assert normalised_entropy(["red"] * 5, 8) == 0.0
    assert normalised_entropy(["a", "b", "c", "d"], 4) == pytest.approx(1.0)
    assert normalised_entropy(["a", "a", "a", "b"], 2) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    )
    with pytest.raises(ValueError, match="vocabulary_size"):
        normalised_entropy(["a"], 1)


def test_expression_diagnostics_counts_distinct_phrases_and_word_entropies():
    got = expression_diagnostics(["the red circle", "The  red circle", "the blue square", "the red star", "the dog"])
    assert got["distinct_expressions"] == 4 / 5  # case and spacing ignored
    colours = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(8)  # red x3, blue x1
    shapes = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)  # circle x2, square, star
    assert got["colour_entropy"] == pytest.approx(colours)
    assert got["shape_entropy"] == pytest.approx(shapes)


def test_a_collapsed_batch_scores_zero_entropy_and_one_distinct_phrase():
    got = expression_diagnostics(["the purple circle"] * 16)
    assert got == {"distinct_expressions": 1 / 16, "colour_entropy": 0.0, "shape_entropy": 0.0}


def test_undefined_diagnostics_are_left_out():
    assert expression_diagnostics([]) == {}
    assert expression_diagnostics(["the dog", "a circle"]) == {"distinct_expressions": 1.0, "shape_entropy": 0.0}


def test_saliency_reward_logs_the_diagnostics_of_the_well_formed_answers():
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    mask = Image.fromarray(np.zeros((32, 32), np.uint8))
    [reward] = get_reward_funcs(["sod"], segmenter=load_segmenter("shapes", cache_size=None))
    completions = [
        "<answer><rg>the red circle</rg></answer>",
        "<answer><rg>the red circle</rg></answer>",
        "<answer><rg>the blue circle</rg></answer>",
        "no tags at all",  # malformed: scored 0, writes no expression
    ]
    logged = {}
    reward(
        prompts=[""] * 4,
        completions=completions,
        images=[[image]] * 4,
        task=["sod"] * 4,
        masks=[[mask]] * 4,
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert logged["sod/distinct_expressions"] == 2 / 3
    assert logged["sod/colour_entropy"] == pytest.approx(normalised_entropy(["red", "red", "blue"], 8))
    assert logged["sod/shape_entropy"] == 0.0
