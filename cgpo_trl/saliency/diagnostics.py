"""Collapse diagnostics for RL on referring expressions: how varied are the expressions a policy writes?

A policy can keep a well-formed answer and a fair reward while it collapses onto the words that are rewarded most
often (a measured demo run ended with every answer naming a circle). The reward curve hides that; the spread of what
the policy writes shows it. `SaliencyReward` logs these numbers for every batch it scores through TRL's `log_metric`,
so they appear next to TRL's own metrics (averaged over each logging step).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from .vocabulary import COLOURS, SHAPES, parse_description


def normalised_entropy(words: Iterable[str], vocabulary_size: int) -> float:
    """Shannon entropy of the words' empirical distribution over log(vocabulary_size): 0 when every word is the
    same, 1 when the words cover the vocabulary uniformly."""
    if vocabulary_size < 2:
        raise ValueError(f"vocabulary_size must be >= 2, got {vocabulary_size}")
    counts = Counter(words)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("the entropy of no words is undefined")
    entropy = sum(n / total * math.log(total / n) for n in counts.values())
    return entropy / math.log(vocabulary_size)


def expression_diagnostics(expressions: Sequence[str]) -> dict[str, float]:
    """Diversity of one batch of expressions (every `<rg>` / `<ins>` the policy wrote, over all completions).

    - `distinct_expressions`: distinct expressions (case and spacing ignored) / expressions, in (0, 1]; a policy
      that writes one phrase for every image scores 1 / batch size.
    - `colour_entropy`, `shape_entropy`: `normalised_entropy` of the colour and shape words
      (`vocabulary.parse_description`) over the expressions that name one; the synthetic targets are uniform over
      colours and shapes, so a healthy policy stays near the reference answers' value and a collapse falls to 0.

    A key is left out when it is undefined (no expressions, or none naming a colour / a shape).
    """
    canonical = [" ".join(e.lower().split()) for e in expressions]
    if not canonical:
        return {}
    result = {"distinct_expressions": len(set(canonical)) / len(canonical)}
    descriptions = [parse_description(e) for e in canonical]
    colours = [d.colour for d in descriptions if d.colour is not None]
    shapes = [d.shape for d in descriptions if d.shape is not None]
    if colours:
        result["colour_entropy"] = normalised_entropy(colours, len(COLOURS))
    if shapes:
        result["shape_entropy"] = normalised_entropy(shapes, len(SHAPES))
    return result
