"""Exact expected gradients of CGPO baselines under TRL's loss aggregations, on an enumerable toy policy.

The toy: vocabulary {a, b, EOS}, completions of at most 3 tokens (ending at EOS or at the length cap), a tabular
policy with one logit vector per prefix (7 prefixes x 3 logits, fixed random values). Every completion gets reward
0, so the true policy gradient is exactly 0 and whatever expected gradient remains is the *bias* the baseline term
adds under a given loss. Batches of N i.i.d. completions are enumerated exactly (15^N batches), because several of
TRL's normalisers (`dapo`, `bnpo`, `cispo`) divide by the batch's token count.

The loss gradients follow `trl.GRPOTrainer._compute_loss` (TRL 1.16) on-policy, where every importance ratio is 1:
the clipped losses (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`), `sapo` (its sigmoid has slope 1/4 x 4 at ratio 1)
and `cispo` (a detached ratio) all reduce to `-A_t * grad(ratio_t)`, with `ratio_t` the token ratio
(importance_sampling_level="token") or the sequence ratio `exp(mean_s log ratio_s)` ("sequence"); `cispo`'s gradient
is `-A_t * grad log p_t` at either level. Aggregations: `grpo`/`sapo` mean over completions of the per-completion
token mean; `bnpo`/`dapo`/`cispo` the batch's token sum over its token count; `dr_grpo` over N x max length;
`luspo` the mean over completions of the per-completion token sum.

Run `python tests/exact_toy.py` to print the table that docs/cgpo_algebra.md holds; `tests/test_unbiasedness.py`
recomputes it and checks the document.
"""

from __future__ import annotations

import itertools

import numpy as np

VOCAB = 3  # a, b, EOS
EOS = 2
MAX_LEN = 3
LOSS_TYPES = ("dr_grpo", "dapo", "bnpo", "cispo", "grpo", "sapo", "luspo")
IS_LEVELS = ("token", "sequence")
BASELINES = ("max_prob (token)", "self_agreement (token)", "geo_mean c(y) (sequence)", "constant 0.5")
SIGNAL = "signal"


def _prefixes() -> list[tuple[int, ...]]:
    return [p for n in range(MAX_LEN) for p in itertools.product((0, 1), repeat=n)]


PREFIXES = _prefixes()
INDEX = {p: i for i, p in enumerate(PREFIXES)}


def completions() -> list[tuple[int, ...]]:
    out = []
    for n in range(1, MAX_LEN + 1):
        for body in itertools.product((0, 1), repeat=n - 1):
            out.append(body + (EOS,))
        if n == MAX_LEN:
            out.extend(itertools.product((0, 1), repeat=n))  # truncated at the cap, no EOS
    return out


def policy(seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 1.0, size=(len(PREFIXES), VOCAB))
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def per_token(y: tuple[int, ...], probs: np.ndarray):
    """For each token: its probability, the distribution it was drawn from, and grad log p_t (flattened)."""
    rows = []
    for t, token in enumerate(y):
        prefix = INDEX[y[:t]]
        dist = probs[prefix]
        grad = np.zeros_like(probs)
        grad[prefix] = -dist
        grad[prefix, token] += 1.0
        rows.append((dist[token], dist, grad.ravel()))
    return rows


def token_advantages(y, probs, baseline: str) -> np.ndarray:
    """A_t = r - b_t. `signal`: reward 1[first token is a], no baseline (the reference gradient); every baseline
    row: reward 0 minus the baseline (token baselines per position, sequence ones broadcast)."""
    rows = per_token(y, probs)
    if baseline == SIGNAL:
        return np.full(len(rows), float(y[0] == 0))
    if baseline.startswith("max_prob"):
        return -np.array([dist.max() for _, dist, _ in rows])
    if baseline.startswith("self_agreement"):
        return -np.array([(dist**2).sum() for _, dist, _ in rows])
    if baseline.startswith("geo_mean"):
        c = np.exp(np.mean([np.log(p) for p, _, _ in rows]))
        return -np.full(len(rows), c)
    return -np.full(len(rows), 0.5)


def sample_terms(y, probs, baseline: str, is_level: str, loss_type: str) -> tuple[np.ndarray, int]:
    """Sum over the completion's tokens of grad(per-token loss) before normalisation, and its length."""
    rows = per_token(y, probs)
    adv = token_advantages(y, probs, baseline)
    grads = np.stack([g for _, _, g in rows])
    if is_level == "token" or loss_type == "cispo":
        ratio_grads = grads
    else:
        ratio_grads = np.broadcast_to(grads.mean(0), grads.shape)
    return -(adv[:, None] * ratio_grads).sum(0), len(y)


def expected_gradient(probs, baseline: str, is_level: str, loss_type: str, batch: int) -> np.ndarray:
    """E[g], the loss gradient's expectation over all batches of `batch` i.i.d. completions."""
    ys = completions()
    p_y = np.array([np.prod([probs[INDEX[y[:t]], tok] for t, tok in enumerate(y)]) for y in ys])
    assert abs(p_y.sum() - 1) < 1e-12
    terms = [sample_terms(y, probs, baseline, is_level, loss_type) for y in ys]
    mean = np.zeros(probs.size)
    for combo in itertools.product(range(len(ys)), repeat=batch):
        weight = np.prod(p_y[list(combo)])
        sums = [terms[i][0] for i in combo]
        lengths = [terms[i][1] for i in combo]
        if loss_type in ("grpo", "sapo"):
            g = sum(s / n for s, n in zip(sums, lengths)) / batch
        elif loss_type in ("bnpo", "dapo", "cispo"):
            g = sum(sums) / sum(lengths)
        elif loss_type == "dr_grpo":
            g = sum(sums) / (batch * MAX_LEN)
        elif loss_type == "luspo":
            g = sum(sums) / batch
        else:
            raise ValueError(loss_type)
        mean += weight * g
    return mean


def table(batch: int = 2, seed: int = 0) -> dict[tuple[str, str, str], float]:
    """|E[g]| of each baseline with reward 0 (its bias), divided by |E[g]| of a unit reward signal
    (reward 1[first token is a], no baseline) under the same loss, IS level and batch size."""
    probs = policy(seed)
    out = {}
    for loss_type in LOSS_TYPES:
        for is_level in IS_LEVELS:
            signal = np.linalg.norm(expected_gradient(probs, SIGNAL, is_level, loss_type, batch))
            for baseline in BASELINES:
                bias = np.linalg.norm(expected_gradient(probs, baseline, is_level, loss_type, batch))
                out[(baseline, loss_type, is_level)] = float(bias / signal)
    return out


def markdown(values: dict[tuple[str, str, str], float]) -> str:
    header = "| baseline | IS level | " + " | ".join(f"`{t}`" for t in LOSS_TYPES) + " |"
    lines = [header, "|" + "---|" * (len(LOSS_TYPES) + 2)]
    for baseline in BASELINES:
        for is_level in IS_LEVELS:
            cells = " | ".join(f"{values[(baseline, t, is_level)]:.3f}" for t in LOSS_TYPES)
            lines.append(f"| {baseline} | {is_level} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(table(batch=int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
