"""The LoRA frontier: the lower curve and its fitted curve by hand (and the chord's bias it removes), the
out-of-range case, and the gap's point estimate and intervals on synthetic per-example data whose curve is known."""

import numpy as np
import pytest

from imsm.evaluation.measures.frontier import LabelRuns, curve_value, fit_curve, frontier_gap, lower_frontier
from imsm.evaluation.measures.measures import auroc, pooled

N_TARGET, N_TEXT = 1000, 300
POSITIVE = np.arange(N_TARGET) % 2 == 1


def test_lower_frontier_keeps_the_points_nothing_beats_on_both_axes():
    points = [(0.0, 0.0), (0.1, 0.3), (0.05, 0.4), (0.2, 0.5), (0.2, 0.45), (0.15, 0.6), (-0.01, 0.2)]
    # (0.05, 0.4) and (0.15, 0.6) are beaten by (0.1, 0.3) / (0.2, 0.45); (0.2, 0.5) by (0.2, 0.45);
    # (-0.01, 0.2) by (0, 0)
    assert lower_frontier(points) == [(0.0, 0.0), (0.1, 0.3), (0.2, 0.45)]


def test_the_fitted_curve_removes_the_chords_bias_on_a_convex_curve():
    """Forgetting = g² (the square of the scale, gain linear in it), points at g = 0.5 and 1: the chord between them
    says 0.625 at g = 0.75 and flatters a point on the true curve by 0.0625; the fit through the origin is exact."""
    curve = [(0.5, 0.25), (1.0, 1.0)]
    assert curve_value(curve, 0.75) == pytest.approx(0.5625)
    assert 0.25 + (0.75 - 0.5) / 0.5 * 0.75 == pytest.approx(0.625)  # the chord's value there
    # a, b recovered from points on 0.3·g + 2·g² (normal equations of the through-origin least squares, by hand)
    g = np.array([0.1, 0.2, 0.4])
    f = 0.3 * g + 2.0 * g * g
    assert fit_curve(list(zip(g, f, strict=True))) == pytest.approx((0.3, 2.0))
    assert fit_curve([(0.1, 0.2)]) == pytest.approx((0.0, 20.0))  # one point: b·g² through it


def test_the_fit_is_read_from_the_origin_to_the_highest_run_never_beyond():
    curve = [(0.1, 0.3), (0.2, 0.45)]
    assert curve_value(curve, 0.05) is not None and curve_value(curve, 0.0) == 0.0  # the origin is LoRA at scale 0
    assert curve_value(curve, -0.001) is None and curve_value(curve, 0.2001) is None
    assert curve_value(curve, 0.25, reach=0.25) is not None and curve_value(curve, 0.2501, reach=0.25) is None


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
    gains, losses = zip(*sorted(points.values()), strict=True)
    assert list(losses) == sorted(losses)  # every scale is on the lower frontier
    # through-origin least squares of forgetting on (g, g²): the 2 x 2 normal equations solved by Cramer's rule
    x = [(gi, li) for gi, li in zip(gains, losses, strict=True) if gi != 0.0]
    s2, s3, s4 = (sum(gi**k for gi, _ in x) for k in (2, 3, 4))
    t1, t2 = sum(gi * li for gi, li in x), sum(gi * gi * li for gi, li in x)
    det = s2 * s4 - s3 * s3
    a, b = (t1 * s4 - s3 * t2) / det, (s2 * t2 - s3 * t1) / det
    expected = f - (a * g + b * g * g)
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
    assert abs(result.gap) < 5e-3  # a LoRA point lies on its fitted curve up to the fit's residual
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


def test_imsm_seeds_beyond_the_curve_no_longer_drop_the_method_level_interval():
    """IMSM near the top of LoRA's range (gain at LoRA@0.85, seeds differing by 0.15 logit). Reading the curve at each
    IMSM run's own gain (as before) leaves studies without a method-level interval whenever a run's gain passes the
    curve's end; the first-order seed term needs only the slope at IMSM's mean gain. Counted over synthetic studies
    (the counts are in docs/results.md)."""
    studies, before, now = 12, 0, 0
    for k in range(studies):
        lora = {f"LoRA@{a:g}": _runs(2.0 * a, 0.5 * a * a, 3, seed=100 + k, seed_sd=0.15)
                for a in (0.25, 0.5, 0.75, 1.0)}
        imsm = _runs(1.7, 0.3, seed=200 + k, seed_sd=0.15)
        result = frontier_gap(imsm, lora, UNTUNED, POSITIVE, resamples=100, seed=k)
        assert result.gap is not None
        if result.examples_low is None:  # too many draws leave the range: no interval of either kind, said so
            assert "more than a tail holds" in result.notes[0]
            continue
        gains = [auroc(t, POSITIVE) - auroc(UNTUNED.target[0], POSITIVE) for t in imsm.target]
        before += any(g > result.curve[-1][0] for g in gains)  # a run beyond the seed means' curve: no interval then
        now += result.method_low is None
    print(f"no method-level interval: {before}/{studies} studies when each IMSM run is read on the curve, "
          f"{now}/{studies} now")
    assert before > 0 and now == 0


def test_the_committed_frontier_restatement_is_reproduced_from_the_committed_record():
    """docs/cpu_study_frontier_restated.json (quoted in the README) follows from docs/cpu_study_measures.json alone."""
    import json
    from pathlib import Path

    from conftest import load_script

    docs = Path(__file__).resolve().parents[3] / "docs"
    record = json.loads((docs / "cpu_study_measures.json").read_text())
    restated = load_script("restate_frontier").restate(record)
    committed = json.loads((docs / "cpu_study_frontier_restated.json").read_text())
    assert restated.keys() == committed.keys() == {"general_nll", "kl"}
    for measure, values in committed.items():
        for key, value in values.items():
            if key == "two_scales":
                assert restated[measure][key]["labels"] == value["labels"] == ["LoRA@0.5", "LoRA@1"]
                for k in ("chord_gap", "fitted_gap"):
                    assert restated[measure][key][k] == pytest.approx(value[k]), (measure, k)
            else:
                assert restated[measure][key] == pytest.approx(value), (measure, key)
        gap = record["measures"]["frontier"][measure]
        lora_at_gain = gap["imsm"][1] - gap["gap"]  # the chord's forgetting at IMSM's gain, by hand
        assert values["share_of_lora_method_level"][0] == pytest.approx(1 + gap["method_low"] / lora_at_gain)
    assert committed["kl"]["share_of_lora_method_level"] == pytest.approx([0.304, 2.003], abs=1e-3)  # README: 30-200%
    (g05, f05), (g1, f1) = (record["measures"]["frontier"]["kl"]["points"][k] for k in ("LoRA@0.5", "LoRA@1"))
    g, f = record["measures"]["frontier"]["kl"]["imsm"]
    assert committed["kl"]["two_scales"]["chord_gap"] == pytest.approx(f - (f05 + (g - g05) / (g1 - g05) * (f1 - f05)))
    assert round(committed["kl"]["two_scales"]["chord_gap"], 3) == -0.003  # the README's "two LoRA points: -0.003"
