"""The LoRA frontier: the lower curve and its interpolation by hand, the out-of-range case, and the gap's point
estimate and intervals on synthetic per-example data whose curve is known."""

import numpy as np
import pytest

from imsm.evaluation.measures.frontier import LabelRuns, frontier_gap, interpolate, lower_frontier
from imsm.evaluation.measures.measures import auroc, pooled

N_TARGET, N_TEXT = 1000, 300
POSITIVE = np.arange(N_TARGET) % 2 == 1


def test_lower_frontier_keeps_the_points_nothing_beats_on_both_axes():
    points = [(0.0, 0.0), (0.1, 0.3), (0.05, 0.4), (0.2, 0.5), (0.2, 0.45), (0.15, 0.6), (-0.01, 0.2)]
    # (0.05, 0.4) and (0.15, 0.6) are beaten by (0.1, 0.3) / (0.2, 0.45); (0.2, 0.5) by (0.2, 0.45);
    # (-0.01, 0.2) by (0, 0)
    assert lower_frontier(points) == [(0.0, 0.0), (0.1, 0.3), (0.2, 0.45)]


def test_interpolation_is_linear_inside_the_range_and_refused_outside():
    curve = [(0.0, 0.0), (0.1, 0.3), (0.2, 0.45)]
    assert interpolate(curve, 0.05) == pytest.approx(0.15)  # half way from (0, 0) to (0.1, 0.3)
    assert interpolate(curve, 0.15) == pytest.approx(0.375)  # half way from (0.1, 0.3) to (0.2, 0.45)
    assert interpolate(curve, 0.2) == pytest.approx(0.45)
    assert interpolate(curve, 0.0) == 0.0
    assert interpolate(curve, 0.2001) is None and interpolate(curve, -0.001) is None
    assert interpolate([(0.1, 0.2)], 0.1) == pytest.approx(0.2) and interpolate([(0.1, 0.2)], 0.11) is None


def _runs(signal, shift, seeds=3, seed=0, seed_sd=0.05):
    """``seeds`` runs: log-odds = signal · (gold yes) + noise, per-passage NLL sums = tokens · (2 + shift + noise)."""
    g = np.random.default_rng(seed)
    target, text = [], []
    noise_t, noise_f = g.normal(size=N_TARGET), g.normal(scale=0.3, size=N_TEXT)  # shared examples: paired
    tokens = g.integers(20, 200, size=N_TEXT).astype(float)
    for r in range(seeds):
        s = signal + g.normal(scale=seed_sd)
        target.append(s * POSITIVE + noise_t + g.normal(scale=0.3, size=N_TARGET))
        text.append(np.stack([tokens * (2.0 + shift + g.normal(scale=seed_sd) + noise_f), tokens], axis=1))
    return LabelRuns(np.array(target), [np.array(text)])


def _lora(seeds=3, seed_sd=0.05):
    """LoRA at scales 0 .. 1: gain grows with the scale, forgetting with its square (a convex curve)."""
    return {f"LoRA@{a:g}": _runs(2.0 * a, 0.5 * a * a, seeds, seed=7, seed_sd=seed_sd)
            for a in (0.0, 0.25, 0.5, 0.75, 1.0)}


UNTUNED = _runs(0.0, 0.0, seeds=1, seed=7, seed_sd=0.0)


def test_the_gap_is_imsm_minus_the_curve_at_its_gain_computed_by_hand():
    lora, imsm = _lora(seed_sd=0.01), _runs(1.5, 0.0, seed=3, seed_sd=0.01)  # seeds that agree: a clear effect

    def point(runs):  # AUROC and pooled NLL per run, by the measures' own definitions, minus the untuned model's
        gain = np.mean([auroc(t, POSITIVE) for t in runs.target]) - auroc(UNTUNED.target[0], POSITIVE)
        forgetting = np.mean([pooled(f) for f in runs.forgetting[0]]) - pooled(UNTUNED.forgetting[0][0])
        return gain, forgetting

    points = {name: point(runs) for name, runs in lora.items()}
    g, f = point(imsm)
    gains = [p[0] for p in points.values()]
    assert gains == sorted(gains)  # the scales are the curve, in order
    low = max((p for p in points.values() if p[0] <= g), key=lambda p: p[0])
    high = min((p for p in points.values() if p[0] >= g), key=lambda p: p[0])
    expected = f - (low[1] + (g - low[0]) / (high[0] - low[0]) * (high[1] - low[1]))
    result = frontier_gap(imsm, lora, UNTUNED, POSITIVE, resamples=300)
    for name, (gain, forgetting) in points.items():
        assert result.points[name] == pytest.approx((gain, forgetting))
    assert result.gap == pytest.approx(expected)
    assert result.gap < 0  # IMSM was built to forget less than LoRA at its gain
    assert result.examples_low < result.gap < result.examples_high
    assert result.method_low < result.gap < result.method_high
    assert result.method_high < 0 and result.p < 0.05


def test_a_point_on_the_curve_has_gap_zero_inside_its_intervals():
    lora = _lora()
    result = frontier_gap(lora["LoRA@0.5"], lora, UNTUNED, POSITIVE, resamples=300)
    assert result.gap == pytest.approx(0.0, abs=1e-12)
    assert result.examples_low <= 0.0 <= result.examples_high
    assert result.method_low <= 0.0 <= result.method_high and result.p > 0.05


def test_a_gain_outside_the_curve_is_not_extrapolated():
    result = frontier_gap(_runs(4.0, 0.0, seed=3), _lora(), UNTUNED, POSITIVE, resamples=300)
    assert result.gap is None and result.examples_low is None and result.method_low is None
    assert "outside the LoRA curve's gain range" in result.notes[0] and "not extrapolated" in result.notes[0]


def test_one_seed_gives_no_method_level_interval_and_unaligned_seeds_are_refused():
    result = frontier_gap(_runs(1.1, 0.05, seeds=1, seed=3), _lora(), UNTUNED, POSITIVE, resamples=300)
    assert result.gap is not None and result.examples_low is not None and result.method_low is None
    assert "not estimable from one seed" in result.notes[0]
    lora = _lora() | {"LoRA@step100": _runs(1.0, 0.3, seeds=2)}
    with pytest.raises(ValueError, match="same seeds"):
        frontier_gap(_runs(1.1, 0.05), lora, UNTUNED, POSITIVE)


def test_bounded_percentiles_hold_whatever_the_unknown_draws_are():
    """A few draws without a gap (IMSM's gain outside the curve's range on them): the interval contains the
    percentile interval for any values of those draws, and is refused once they outnumber a tail."""
    from imsm.evaluation.stats import bounded_percentiles

    rng = np.random.default_rng(0)
    known = list(rng.normal(size=1990))
    values = known + [None] * 10
    low, high = bounded_percentiles(values, 0.025)
    for fill in (-1e9, 1e9, 0.0, 5.0, -5.0):
        filled = np.quantile(known + [fill] * 10, [0.025, 0.975])
        assert low <= filled[0] + 1e-12 and filled[1] <= high + 1e-12
    # at the extremes the bounds are attained: every unknown draw lowest gives the lower end exactly
    assert low == pytest.approx(np.quantile(known + [-1e9] * 10, 0.025))
    assert high == pytest.approx(np.quantile(known + [1e9] * 10, 0.975))
    assert bounded_percentiles(known, 0.025) == pytest.approx(tuple(np.quantile(known, [0.025, 0.975])))
    assert bounded_percentiles(known[:1900] + [None] * 100, 0.025) is None  # 5% unknown: more than a tail
