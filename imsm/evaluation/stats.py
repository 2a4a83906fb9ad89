"""Paired statistics for models scored on the same examples: seed groups, two kinds of intervals, and their tests.

Every metric is f(mean over examples of a per-example component vector) (``metrics.METRIC_FUNCTIONS``): the
0/1 outcome for accuracy-type metrics, the confusion counts for F1 and MCC, (NLL sum, token count) for the pooled
``answer_nll``. A report row is a *label*: one run, or several runs (seeds) sharing it. Its value on a task is the
mean over its runs of each run's metric, and its spread the standard deviation over runs (n − 1 in the denominator).
A comparison A − B has two intervals, because it answers one of two questions:

**Examples-only interval** ("would these trained models' numbers move with other test examples?"). Rows of one
report were scored on the same n examples, so it resamples examples, not rows: B multisets of n example indices
drawn with replacement (one set of draws per task, shared by every comparison in the report, from
``numpy.random.default_rng(seed)``); for each draw b, value_A(I_b) − value_B(I_b) with every run of a label re-scored
on I_b and its runs averaged; the interval is the 2.5th and 97.5th percentile of the B differences. The general
average resamples each task's examples separately and averages the per-task differences (every task keeps equal
weight). It holds the runs fixed, so it leaves out seed-to-seed variance: with several seeds it is *not* an interval
for "does method A beat method B".

**Method-level interval** ("does method A beat method B, over training seeds and test examples?"). With k_A runs of
A, per-run values a_r (on a task, or each run's general average: a seed's effect is shared by every task it is scored
on, so the general average's seed variance is that of each run's own average), and V_ex the variance of the
examples-only bootstrap differences,

    SE² = V_ex + s²(a_r)/k_A + s²(b_r)/k_B,     df = SE⁴ / Σ_L (s²(L_r)/k_L)² / (k_L − 1)   (Welch–Satterthwaite)

and the interval is Δ ± t_{df, 0.975} · SE. The untuned model is deterministic (no seed): its seed term is 0. A
trained label with one run has no estimate of its seed variance, so the interval is *not estimable from one seed*.
Why not a two-level percentile bootstrap (seeds, then examples): with 3 seeds a label has 10 distinct seed resamples
and the percentile interval ignores that s² is itself estimated from 2 degrees of freedom; on synthetic 3-vs-3-seed
data (seed effect 0.2 logit, n = 1,000) it covered 88% (86% for a 3-task average), the t interval 95% (98%), the
examples-only interval 53% (33%) (``tests/evaluation/test_stats.py``). The two terms overlap by the run-specific
per-example noise (in both V_ex and s²), so the interval errs wide.

**Tests.** The p-value beside a change tests the same quantity as its interval, so the two cannot disagree:
with a method-level interval, p = 2 · P(T_df > |Δ| / SE) (p < 0.05 exactly when the interval leaves out 0);
where both labels are single models (one run, or the untuned model) and the metric is a 0/1 outcome, McNemar's exact
test of the same paired accuracies: with b the examples A gets right and B wrong and c the reverse,
p = min(1, 2 · P[X ≤ min(b, c)]), X ~ Binomial(b + c, 1/2), summed in log space so that thousands of discordant
pairs do not overflow (Δ = (b − c)/n, so its sign is the direction the test is about). No test runs on a majority
vote of seeds: that is a different model from the seed mean the change and intervals describe.

**The measures** of ``evaluate.py --measures`` (AUROC of the yes/no log-odds, general-text NLL, KL to the untuned
model) get the same two intervals: a ``Measure`` evaluates each run on drawn examples, ``change`` gives the
examples-only percentile interval and ``method_interval``'s; an ``average`` column over several tasks draws each task
apart (``task_counts``). ``bounded_percentiles`` is the frontier's examples-only interval when some draws have no
value (``imsm.evaluation.measures.frontier``). ``CONFIDENCE`` is every interval's level, here alone. A change of KL
against the untuned model gets intervals but no p-value (``change(..., testable=False)``): KL(untuned ‖ tuned) >= 0,
and 0 only for the very same model, so "no change" cannot hold for a trained model and a test of it says nothing.

**Reporting p.** A p-value below ``P_FLOOR`` = 1e-4 is reported as ``"<1e-4"`` (``reported_p`` in stats.json,
``format_p`` in text), never as its digits: so far out in the tail the number is set by the approximation, not the
data (a t of 30 with Welch's df ≈ 200 from 3 seeds gives p ≈ 1e-58, the same t at df 2 gives 1e-3; McNemar's and the
t tail underflow to exactly 0.0 beyond ~1e-308).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from imsm.evaluation.measures.metrics import METRIC_FUNCTIONS

CONFIDENCE = 0.95
P_FLOOR = 1e-4
P_BELOW = "<1e-4"
NOT_ESTIMABLE = "not estimable from one seed"
NO_KL_TEST = ("no test: KL to the untuned model is >= 0 and 0 only for the same model, so the null of no change "
              "cannot hold; read the interval")
METHOD_T = "method-level t"
MCNEMAR = "McNemar exact"
AVERAGE = "average"  # the column of several tasks' mean (each task weighs the same, as in the frontier)


@dataclass
class LabelScores:
    """One label's per-example components on one task for one measure: ``components`` is (runs, n, c);
    ``seeded`` says whether its runs are training seeds (False for the deterministic untuned model)."""

    kind: str  # a key of METRIC_FUNCTIONS
    components: np.ndarray
    seeded: bool = True

    def __post_init__(self) -> None:
        self.components = np.asarray(self.components, dtype=float)
        if self.components.ndim != 3:
            raise ValueError(f"components must be (runs, examples, c), got shape {self.components.shape}")

    @property
    def n(self) -> int:
        return self.components.shape[1]

    @property
    def runs(self) -> int:
        return self.components.shape[0]

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
    indices = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(indices.ravel(), minlength=resamples * n).reshape(resamples, n).astype(float)


@dataclass
class Difference:
    """value(A) − value(B) with its examples-only interval, its method-level interval (None where not estimable,
    ``method_note`` says why) and the p-value of the test of the same quantity (``test`` names it; None: no test)."""

    delta: float
    examples_low: float
    examples_high: float
    method_low: float | None = None
    method_high: float | None = None
    method_note: str | None = None
    p: float | None = None
    test: str | None = None

    def covers(self, value: float) -> bool:
        """Whether the examples-only interval holds ``value``."""
        return self.examples_low <= value <= self.examples_high

    def method_covers(self, value: float) -> bool:
        if self.method_low is None or self.method_high is None:
            raise ValueError(f"no method-level interval: {self.method_note}")
        return self.method_low <= value <= self.method_high

    @property
    def headline(self) -> tuple[float, float]:
        """The interval a reader should quote: the method-level one where estimable, else the examples-only one."""
        if self.method_low is not None and self.method_high is not None:
            return self.method_low, self.method_high
        return self.examples_low, self.examples_high


def _seed_variance(scores: Sequence[LabelScores]) -> tuple[float, int] | None:
    """(s²/k, k) of a label's per-run values averaged over its tasks; (0, 1) for the untuned model; None when a
    trained label has one run."""
    first = scores[0]
    if not first.seeded:
        return 0.0, 1
    if first.runs < 2:
        return None
    per_run = np.mean([s.per_run() for s in scores], axis=0)  # each run's own average: its seed effect is shared
    return float(per_run.var(ddof=1)) / first.runs, first.runs


def reported_p(p: float | None) -> float | str | None:
    """``p`` as a report states it: None stays None, below ``P_FLOOR`` the string ``"<1e-4"`` (never 0.0)."""
    if p is None or isinstance(p, str):
        return p
    return P_BELOW if p < P_FLOOR else float(p)


def format_p(p: float | str | None) -> str:
    """``p`` for text: "<1e-4" below ``P_FLOOR``, else three significant digits; "–" for None."""
    p = reported_p(p)
    return "–" if p is None else p if isinstance(p, str) else f"{p:.3g}"


def method_interval(delta: float, examples_variance: float, seed_terms: Sequence[tuple[float, int]],
                    confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, p) of Δ ± t_{df} · SE, SE² = ``examples_variance`` + Σ s²/k, df by Welch–Satterthwaite over the
    seed terms (infinite, i.e. normal, when they are all 0)."""
    seed = [(v, k) for v, k in seed_terms if k > 1]
    se = math.sqrt(examples_variance + sum(v for v, _ in seed))
    denom = sum(v * v / (k - 1) for v, k in seed)
    df = se**4 / denom if denom > 0 else math.inf
    quantile = scipy_stats.t.ppf(0.5 + confidence / 2.0, df) if math.isfinite(df) else \
        scipy_stats.norm.ppf(0.5 + confidence / 2.0)
    if se == 0.0:
        return delta, delta, 1.0 if delta == 0.0 else 0.0
    z = abs(delta) / se
    p = 2.0 * (scipy_stats.t.sf(z, df) if math.isfinite(df) else scipy_stats.norm.sf(z))
    return delta - quantile * se, delta + quantile * se, float(min(1.0, p))


def paired_difference(pairs: Sequence[tuple[LabelScores, LabelScores]], counts: Sequence[np.ndarray],
                      confidence: float = CONFIDENCE) -> Difference:
    """The mean over tasks of value(A) − value(B), for one task or the general average; ``counts[t]`` are the shared
    resamples of task t. Both intervals; the method-level p-value where that interval exists."""
    if len(pairs) != len(counts) or not pairs:
        raise ValueError("one resample matrix per (A, B) task pair is needed")
    for (a, b), c in zip(pairs, counts, strict=True):
        if a.n != b.n or a.n != c.shape[1]:
            raise ValueError(f"paired scores need the same examples: {a.n} vs {b.n} examples, {c.shape[1]} resampled")
    delta = float(np.mean([a.value() - b.value() for a, b in pairs]))
    samples = np.mean([a.resampled(c) - b.resampled(c) for (a, b), c in zip(pairs, counts, strict=True)], axis=0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    diff = Difference(delta, float(low), float(high))
    seed_a, seed_b = _seed_variance([a for a, _ in pairs]), _seed_variance([b for _, b in pairs])
    if seed_a is None or seed_b is None:
        diff.method_note = NOT_ESTIMABLE
    elif pairs[0][0].seeded or pairs[0][1].seeded:
        variance = float(samples.var(ddof=1)) if len(samples) > 1 else 0.0
        diff.method_low, diff.method_high, diff.p = method_interval(delta, variance, [seed_a, seed_b], confidence)
        diff.test = METHOD_T
    return diff


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A right, B wrong) and c (A wrong, B right),
    its binomial tail summed in log space (``2.0**n`` overflows a float from n = 1,024)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(log_terms)
    log_tail = top + math.log(sum(math.exp(t - top) for t in log_terms)) - n * math.log(2.0)
    return min(1.0, 2.0 * math.exp(log_tail))


def single_outcomes(scores: LabelScores) -> np.ndarray:
    """The one run's per-example 0/1 outcomes, (n,); McNemar compares two single models, never a vote of seeds."""
    if scores.kind != "mean" or scores.components.shape[2] != 1:
        raise ValueError("McNemar needs a 0/1 outcome per example")
    if scores.runs != 1:
        raise ValueError(f"McNemar compares two single models; this label has {scores.runs} runs (use the "
                         "method-level test)")
    return scores.components[0, :, 0] > 0.5


def mcnemar(a: LabelScores, b: LabelScores) -> float:
    right_a, right_b = single_outcomes(a), single_outcomes(b)
    return mcnemar_exact(int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b)))


def bounded_percentiles(values: Sequence[float | None], tail: float) -> tuple[float, float] | None:
    """The (tail, 1 − tail) percentiles (numpy's linear interpolation) of ``values``, where a None is a draw whose
    value is unknown: the lower end is taken with every None at −inf, the upper with every None at +inf, so the
    interval contains the percentile interval whatever the unknown values are. None when the unknown draws are
    more than a tail holds (an end would be infinite)."""
    known = np.sort([v for v in values if v is not None])
    n, missing = len(values), len(values) - len(known)
    if n == 0 or len(known) == 0:
        return None
    low_rank, high_rank = tail * (n - 1) - missing, (1.0 - tail) * (n - 1)  # positions in ``known``
    if low_rank < 0 or high_rank > len(known) - 1:
        return None
    return float(np.interp(low_rank, np.arange(len(known)), known)), float(np.interp(high_rank,
                                                                                      np.arange(len(known)), known))


# ---- the --measures' statistics (``evaluate.py --measures``: AUROC, general-text NLL, KL) ---------------------------
@dataclass
class Measure:
    """One label's measure on one task: ``fn(counts (B, n)) -> (runs, B)`` evaluates each run on drawn examples."""

    n: int
    fn: Callable[[np.ndarray], np.ndarray]
    seeded: bool

    def per_run(self) -> np.ndarray:
        return self.fn(np.ones((1, self.n)))[:, 0]


def change(a: Measure, b: Measure, counts: np.ndarray, confidence: float = CONFIDENCE, testable: bool = True) -> dict:
    """value(a) − value(b) with the examples-only and method-level intervals (the module docstring); ``p`` as
    ``reported_p`` states it, None with a ``p_note`` when ``testable`` is False (KL against the untuned model)."""
    delta = float(a.per_run().mean() - b.per_run().mean())
    samples = a.fn(counts).mean(0) - b.fn(counts).mean(0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(samples, [tail, 1.0 - tail])
    out = {"delta": delta, "examples_low": float(low), "examples_high": float(high), "method_low": None,
           "method_high": None, "p": None}
    terms = []
    for m in (a, b):
        runs = m.per_run()
        if m.seeded and len(runs) < 2:
            out["note"] = "method-level interval not estimable from one seed"
            return out
        terms.append((float(runs.var(ddof=1)) / len(runs), len(runs)) if m.seeded else (0.0, 1))
    low, high, p = method_interval(delta, float(np.nanvar(samples, ddof=1)), terms, confidence)
    out["method_low"], out["method_high"] = float(low), float(high)
    if testable:
        out["p"] = reported_p(p)
    else:
        out["p_note"] = NO_KL_TEST
    return out


def average_measure(measures: list[Measure]) -> Measure:
    """The mean of several tasks' measures. Its examples are the tasks' side by side, and a draw of them is each
    task's own draw (``task_counts``): the tasks are resampled apart, as each column is."""
    edges = np.cumsum([0, *(m.n for m in measures)])

    def fn(counts: np.ndarray) -> np.ndarray:
        return np.mean([m.fn(counts[:, a:b]) for m, a, b in zip(measures, edges[:-1], edges[1:], strict=True)], axis=0)

    return Measure(int(edges[-1]), fn, measures[0].seeded)


def task_counts(by_task: dict[str, Measure], resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """task -> (resamples, n) draws of its examples; the average's draws are the tasks' own, side by side."""
    counts = {task: resample_counts(m.n, resamples, rng) for task, m in by_task.items() if task != AVERAGE}
    if AVERAGE in by_task:
        counts[AVERAGE] = np.concatenate(list(counts.values()), axis=1)
    return counts
