"""The exact-toy bias table of docs/cgpo_algebra.md is recomputed here, so the page cannot drift from the maths."""

from pathlib import Path

import numpy as np
import pytest
from exact_toy import LOSS_TYPES, SIGNAL, expected_gradient, markdown, policy, table

DOC = Path(__file__).parents[1] / "docs" / "cgpo_algebra.md"


@pytest.fixture(scope="module")
def values():
    return table(batch=2)


def test_docs_table_is_the_computed_one(values):
    assert markdown(values) in DOC.read_text()


def test_what_the_table_says(values):
    token_baselines = ("max_prob (token)", "self_agreement (token)")
    for baseline in (*token_baselines, "constant 0.5"):
        for loss_type in ("dr_grpo", "luspo"):
            assert values[(baseline, loss_type, "token")] < 1e-12  # exact
        for loss_type in ("grpo", "sapo"):
            assert values[(baseline, loss_type, "token")] > 0.5  # length normalisation: biased at any N
    for baseline in token_baselines:
        assert values[(baseline, "dr_grpo", "sequence")] > 0.01  # sequence IS sees later baselines
    assert values[("constant 0.5", "dr_grpo", "sequence")] < 1e-12
    assert all(values[("geo_mean c(y) (sequence)", t, "token")] > 0.1 for t in LOSS_TYPES)  # the paper's c(y)


def test_batch_normalised_losses_lose_their_bias_with_batch_size():
    """dapo's normaliser is the batch's token count: the bias of a constant baseline shrinks as N grows."""
    probs = policy(0)
    signal = {n: np.linalg.norm(expected_gradient(probs, SIGNAL, "token", "dapo", n)) for n in (1, 2, 3)}
    bias = {
        n: np.linalg.norm(expected_gradient(probs, "constant 0.5", "token", "dapo", n)) / signal[n] for n in (1, 2, 3)
    }
    assert bias[1] > bias[2] > bias[3] > 0
