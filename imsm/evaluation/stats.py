"""Paired statistics for models scored on the same examples: seed groups, paired bootstrap intervals, McNemar.

Every metric is f(mean over examples of a per-example component vector) (``metrics.METRIC_FUNCTIONS``): the
0/1 outcome for accuracy-type metrics, the confusion counts for F1 and MCC, the per-token NLL for ``answer_nll``.
A report row is a *label*: one run, or several runs (seeds) sharing it. Its value on a task is the mean over its runs
of each run's metric, and its spread the standard deviation over runs (n − 1 in the denominator).

**Paired bootstrap.** Rows of one report were scored on the same n examples, so a comparison resamples examples, not
rows: draw B multisets of n example indices with replacement (one set of draws per task, shared by every comparison
in the report, from ``numpy.random.default_rng(seed)``); for each draw b compute value_A(I_b) − value_B(I_b) with
every run of a label re-scored on the same I_b (seeds averaged per draw, so the interval is on the seed-averaged
per-example scores); the 95% interval is the 2.5th and 97.5th percentile of the B differences. The general average
resamples each task's examples separately and averages the per-task differences, so every task keeps equal weight
whatever its n. The point estimate is the difference on the original examples.

**McNemar's exact test** (accuracy-type metrics only): with b the examples A gets right and B wrong, and c the
reverse, p = min(1, 2 · P[X ≤ min(b, c)]) for X ~ Binomial(b + c, 1/2) (p = 1 when b + c = 0). For a seed group an
example counts as right when more than half of the label's runs get it right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imsm.evaluation.metrics import METRIC_FUNCTIONS

CONFIDENCE = 0.95


@dataclass
class LabelScores:
    """One label's per-example components on one task for one measure: ``components`` is (runs, n, c)."""

    kind: str  # a key of METRIC_FUNCTIONS
    components: np.ndarray

    def __post_init__(self) -> None:
        self.components = np.asarray(self.components, dtype=float)
        if self.components.ndim != 3:
            raise ValueError(f"components must be (runs, examples, c), got shape {self.components.shape}")

    @property
    def n(self) -> int:
        return self.components.shape[1]

    def per_run(self) -> np.ndarray:
        """Each run's metric on all examples, (runs,)."""
        return METRIC_FUNCTIONS[self.kind](self.components.mean(axis=1))

    def value(self) -> float:
        return float(self.per_run().mean())

    def spread(self) -> float | None:
        """Standard deviation over runs (n − 1), None for a single run."""
        runs = self.per_run()
        return float(runs.std(ddof=1)) if len(runs) > 1 else None

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """The label's value on each resample, (B,): ``counts`` (B, n) says how often each example was drawn."""
        means = np.einsum("bn,snc->sbc", counts, self.components) / counts.sum(axis=1)[None, :, None]
        return METRIC_FUNCTIONS[self.kind](means).mean(axis=0)


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) draw counts of n examples drawn n times with replacement, resample by resample."""
    indices = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=float)
    np.add.at(counts, (np.arange(resamples)[:, None], indices), 1.0)
    return counts


@dataclass
class Difference:
    """value(A) − value(B) with its paired bootstrap interval (and McNemar's p where it applies)."""

    delta: float
    low: float
    high: float
    p_mcnemar: float | None = None

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def paired_difference(pairs: Sequence[tuple[LabelScores, LabelScores]], counts: Sequence[np.ndarray],
                      confidence: float = CONFIDENCE) -> Difference:
    """The mean over tasks of value(A) − value(B), for one task or the general average; ``counts[t]`` are the shared
    resamples of task t."""
    if len(pairs) != len(counts) or not pairs:
        raise ValueError("one resample matrix per (A, B) task pair is needed")
    for (a, b), c in zip(pairs, counts, strict=True):
        if a.n != b.n or a.n != c.shape[1]:
            raise ValueError(f"paired scores need the same examples: {a.n} vs {b.n} examples, {c.shape[1]} resampled")
    delta = float(np.mean([a.value() - b.value() for a, b in pairs]))
    samples = np.mean([a.resampled(c) - b.resampled(c) for (a, b), c in zip(pairs, counts, strict=True)], axis=0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return Difference(delta, float(low), float(high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A right, B wrong) and c (A wrong, B right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def majority_correct(scores: LabelScores) -> np.ndarray:
    """Per example, whether more than half of the label's runs are right (a 0/1 ``mean`` measure), (n,)."""
    if scores.kind != "mean" or scores.components.shape[2] != 1:
        raise ValueError("McNemar needs a 0/1 outcome per example")
    return scores.components[:, :, 0].mean(axis=0) > 0.5


def mcnemar(a: LabelScores, b: LabelScores) -> float:
    right_a, right_b = majority_correct(a), majority_correct(b)
    return mcnemar_exact(int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b)))
