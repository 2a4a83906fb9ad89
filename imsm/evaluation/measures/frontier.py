"""Methods (IMSM, a KL anchor, replay, OSF, ...) against the LoRA frontier at equal target gain.

Vanilla LoRA at several adapter scales (``evaluate.py --adapter_scale``) and checkpoints gives points (target gain,
forgetting); each method read against it is one point (below, "IMSM" stands for any of them: ``frontier_gaps`` reads
several against one ``LoraCurve``, on the same bootstrap draws, each exactly as ``frontier_gap`` reads it alone). With

    gain       = AUROC of the target's yes/no log-odds − the untuned model's           (``measures.auroc``)
    forgetting = the forgetting measure − the untuned model's, averaged over tasks      (general-text NLL per token:
                 tuned − untuned; KL(untuned ‖ tuned): the untuned model's is 0)

a label's point is the mean over its runs (seeds). The **LoRA curve** is fitted to the lower frontier of the LoRA
points (those that no other point beats on both axes: gain at least as high, forgetting at least as low; a dominated
scale or checkpoint is simply a worse way for LoRA to reach that gain) and the untuned model's point (0, 0), which is
LoRA at scale 0:

    curve(g) = a·g + b·g²     (least squares through the origin; one frontier point: b·g² through it)

**Why a fitted curve, not the chord between neighbouring points** (as before this was written): forgetting grows
with the square of the adapter scale while the gain grows about linearly, so the true curve is convex, and a chord
lies above a convex curve between its points; IMSM's gap read off the chord is then too negative (flatters IMSM). On
forgetting = g² with points at g = 0.5 and 1, the chord says 0.625 at g = 0.75, the curve is 0.5625
(``tests/evaluation/measures/test_frontier.py``). The fit is read, never extrapolated, from min(0, lowest gain) up to
the highest gain of any single LoRA run (every seed's point on that draw, not only the seed means), so a LoRA seed's
own curve reaches IMSM's gain more often. The reported **gap** is

    gap = F_IMSM − curve(G_IMSM)            (< 0: IMSM forgets less than LoRA at the same target gain)

and where G_IMSM lies outside that range the gap is not given: the note says so.

**Intervals.** The *examples-only* interval draws the target's and every forgetting task's examples with replacement
(``stats.resample_counts``; one draw shared by every label, so all points move together), recomputes every point,
**rebuilds the curve** and the gap on each draw, and takes the 2.5th and 97.5th percentiles. The *method-level*
interval adds the seeds through the statistics module's ``method_interval`` (Welch t over the seed terms):
SE² = V_ex + s²(d_r)/k_IMSM + s²(e_j)/k_LoRA, where d_r = (F_r − F_IMSM) − curve'(G_IMSM)·(G_r − G_IMSM) is IMSM run
r's effect on the gap to first order (its forgetting and gain against the fitted curve's slope, so a run whose gain
lies beyond the curve's range still has one: reading the curve at each run's own gain is what left 13-22% of
synthetic studies without a method-level interval) and e_j the gap of the seed-averaged IMSM point against LoRA seed
j's own fitted curve (run j of every LoRA label is one training run at its scales and checkpoints). A draw whose
gain leaves the curve's range has no gap: while such draws are fewer than a tail holds (2.5% of them), the
examples-only interval is bounded as if each were −inf (its lower end) and +inf (its upper end), so it holds whatever
their gap (``stats.bounded_percentiles``), and V_ex is the variance of the draws in range; with more, the interval is
not given, with the count in the note. The method-level interval is also missing when a LoRA seed's own curve does
not reach IMSM's gain (``seeds_outside`` counts them; the note says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imsm.evaluation.measures.measures import auroc_resampled
from imsm.evaluation.stats import CONFIDENCE, bounded_percentiles, method_interval, reported_p, resample_counts

Point = tuple[float, float]  # (target gain, forgetting)


def lower_frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both axes (gain >=, forgetting <=, one of them strictly), by rising
    gain; along it forgetting rises strictly too."""
    curve: list[Point] = []
    for gain, forgetting in sorted(points, key=lambda p: (-p[0], p[1])):  # highest gain first
        if not curve or forgetting < curve[-1][1]:
            if curve and curve[-1][0] == gain:
                continue  # the same gain with more forgetting
            curve.append((float(gain), float(forgetting)))
    return curve[::-1]


def fit_curve(curve: Sequence[Point]) -> tuple[float, float]:
    """(a, b) of forgetting = a·g + b·g², least squares through the origin over the frontier points ``curve``."""
    g = np.array([p[0] for p in curve], dtype=float)
    f = np.array([p[1] for p in curve], dtype=float)
    keep = g != 0.0  # the origin is on the curve by construction; a point at gain 0 adds nothing to fit
    g, f = g[keep], f[keep]
    if len(g) == 0:
        return 0.0, 0.0
    if len(g) == 1:
        return 0.0, float(f[0] / g[0] ** 2)
    (a, b), *_ = np.linalg.lstsq(np.stack([g, g * g], axis=1), f, rcond=None)
    return float(a), float(b)


def curve_reading(curve: Sequence[Point], reach: float | None = None) -> tuple[float, float, float, float] | None:
    """(low, high, a, b): the fitted curve a·g + b·g² (``fit_curve``) and the gains it is read over,
    [min(0, lowest gain), highest gain], the upper end raised to ``reach`` when given (the highest gain of any single
    run); None for an empty curve."""
    if not curve:
        return None
    return (min(0.0, curve[0][0]), max(curve[-1][0], reach if reach is not None else -np.inf), *fit_curve(curve))


def read_curve(reading: tuple[float, float, float, float] | None, gain: float) -> float | None:
    """The curve's forgetting at ``gain`` (``curve_reading``); None outside the gains it is read over."""
    if reading is None:
        return None
    low, high, a, b = reading
    if gain < low or gain > high:
        return None
    return a * gain + b * gain * gain


def curve_value(curve: Sequence[Point], gain: float, reach: float | None = None) -> float | None:
    """The fitted curve's forgetting at ``gain`` (``fit_curve``); None outside [min(0, lowest gain), highest gain],
    the upper end raised to ``reach`` when given (the highest gain of any single run)."""
    return read_curve(curve_reading(curve, reach), gain)


@dataclass
class LabelRuns:
    """One label's per-run, per-example measures: ``target`` (runs, n) yes/no log-odds on the target's test rows;
    ``forgetting`` one (runs, n_k, 2) array per forgetting task of (sum, count) components, pooled per token (for KL
    the untuned model's are zeros)."""

    target: np.ndarray
    forgetting: list[np.ndarray]

    def __post_init__(self) -> None:
        self.target = np.atleast_2d(np.asarray(self.target, dtype=float))
        self.forgetting = [np.asarray(f, dtype=float) for f in self.forgetting]
        if any(f.ndim != 3 or f.shape[0] != self.runs or f.shape[2] != 2 for f in self.forgetting):
            raise ValueError(f"forgetting components must be (runs={self.runs}, examples, 2)")

    @property
    def runs(self) -> int:
        return self.target.shape[0]

    def values(self, positive: np.ndarray, counts_target: np.ndarray,
               counts_forgetting: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(AUROC (runs, B), forgetting measure averaged over tasks (runs, B)) on B draws of the examples."""
        gain = np.stack([auroc_resampled(t, positive, counts_target) for t in self.target])
        per_task = [np.stack([(c @ f[r, :, 0]) / (c @ f[r, :, 1]) for r in range(self.runs)])
                    for f, c in zip(self.forgetting, counts_forgetting, strict=True)]
        return gain, np.mean(per_task, axis=0)


@dataclass
class FrontierGap:
    """A method's forgetting minus the LoRA curve's at the method's target gain, with its intervals (module
    docstring). ``imsm`` is the method's point (the key's name is kept from when IMSM was the only method read)."""

    gap: float | None
    imsm: Point
    points: dict[str, Point]  # every LoRA label's (gain, forgetting), seeds averaged
    curve: list[Point]  # the lower frontier of those points
    examples_low: float | None = None
    examples_high: float | None = None
    method_low: float | None = None
    method_high: float | None = None
    p: float | None = None
    seeds_outside: int = 0  # LoRA seeds whose own curve does not reach the method's gain (no method-level interval)
    notes: list[str] = field(default_factory=list)
    gain_range: tuple[float, float] | None = None  # the gains the curve is read over (min(0, lowest), highest run)
    draws: int = 0  # bootstrap draws of the examples taken (0: the gain lies outside the curve, none were)
    draws_outside: int = 0  # of them, those on which the method's gain left the curve's range (no gap there)

    def to_dict(self) -> dict:
        return {k: reported_p(self.p) if k == "p" else getattr(self, k)
                for k in ("gap", "imsm", "points", "curve", "examples_low", "examples_high", "method_low",
                          "method_high", "p", "seeds_outside", "notes", "gain_range", "draws", "draws_outside")} | {
            "fit": fit_curve(self.curve)}


def _relative(runs: LabelRuns, base: tuple[np.ndarray, np.ndarray], positive, counts_t, counts_f):
    """(gain (runs, B), forgetting (runs, B)) of ``runs`` minus the untuned model's ``base`` on the same draws."""
    return tuple(v - b for v, b in zip(runs.values(positive, counts_t, counts_f), base, strict=True))


def _reach(points: dict[str, tuple[np.ndarray, np.ndarray]], column: int) -> float:
    """The highest gain of any single LoRA run on one draw: how far the fitted curve is read."""
    return float(max(g[:, column].max() for g, _ in points.values()))


def _curve_at(points: dict[str, tuple[np.ndarray, np.ndarray]], column: int, run: int | None = None) -> list[Point]:
    """The lower frontier of the labels' points on one draw, seeds averaged (or seed ``run`` alone)."""
    pick = (lambda a: a[:, column].mean()) if run is None else (lambda a: a[run, column])
    return lower_frontier([(pick(g), pick(f)) for g, f in points.values()])


class LoraCurve:
    """The curve of the ``lora`` labels (their runs aligned by seed) relative to ``untuned`` (one run), on the
    examples as they are and on each bootstrap draw (drawn once, when a method first needs them, from
    ``default_rng(seed)``: every method is read against the same draws, the ones a method read alone would get);
    ``gap`` reads one method against it. ``positive`` are the target rows' gold labels."""

    def __init__(self, lora: dict[str, LabelRuns], untuned: LabelRuns, positive: np.ndarray, resamples: int = 2000,
                 seed: int = 0, confidence: float = CONFIDENCE) -> None:
        self.positive = np.asarray(positive, dtype=bool)
        if untuned.runs != 1:
            raise ValueError(f"the untuned model is one model, got {untuned.runs} runs")
        seeds = {runs.runs for runs in lora.values()}
        if len(seeds) != 1:
            raise ValueError(f"the LoRA labels' runs must be the same seeds at each scale/checkpoint; their run "
                             f"counts differ: { {name: runs.runs for name, runs in lora.items()} }")
        self.lora, self.untuned, self.seeds = lora, untuned, seeds.pop()
        self.resamples, self.seed, self.confidence = resamples, seed, confidence
        self.n_t, self.n_f = len(self.positive), [f.shape[1] for f in untuned.forgetting]
        self.ones = (np.ones((1, self.n_t)), [np.ones((1, n)) for n in self.n_f])
        self.base = untuned.values(self.positive, *self.ones)
        self.points = {name: _relative(runs, self.base, self.positive, *self.ones) for name, runs in lora.items()}
        self.curve, reach = _curve_at(self.points, 0), _reach(self.points, 0)
        self.reading = curve_reading(self.curve, reach)
        # each LoRA seed's own curve (run j of every LoRA label is one training run at its scales and checkpoints),
        # read as far as the seed-averaged one
        self.seed_readings = [curve_reading(_curve_at(self.points, 0, run=j), reach) for j in range(self.seeds)]
        self._drawn = None

    def _draws(self):
        """(target counts, forgetting counts, the untuned model's values, each draw's curve reading), built once."""
        if self._drawn is None:
            rng = np.random.default_rng(self.seed)
            counts_t = resample_counts(self.n_t, self.resamples, rng)
            counts_f = [resample_counts(n, self.resamples, rng) for n in self.n_f]
            base = self.untuned.values(self.positive, counts_t, counts_f)
            drawn = {name: _relative(runs, base, self.positive, counts_t, counts_f)
                     for name, runs in self.lora.items()}
            readings = [curve_reading(_curve_at(drawn, b), _reach(drawn, b)) for b in range(self.resamples)]
            self._drawn = (counts_t, counts_f, base, readings)
        return self._drawn

    def gap(self, runs: LabelRuns, name: str = "IMSM") -> FrontierGap:
        """The gap of the method ``name`` (its ``runs``) to this curve, with its intervals (module docstring)."""
        ig, if_ = _relative(runs, self.base, self.positive, *self.ones)
        g_m, f_m = float(ig.mean()), float(if_.mean())
        low, high = self.reading[:2]
        result = FrontierGap(None, (g_m, f_m), {k: (float(g.mean()), float(f.mean())) for k, (g, f) in
                                                self.points.items()}, self.curve, gain_range=(low, high))
        at = read_curve(self.reading, g_m)
        if at is None:
            result.notes.append(f"{name}'s target gain {g_m:+.4f} lies outside the LoRA curve's gain range "
                                f"[{low:+.4f}, {high:+.4f}]; not extrapolated")
            return result
        result.gap = f_m - at

        counts_t, counts_f, base, readings = self._draws()
        dg, df = _relative(runs, base, self.positive, counts_t, counts_f)
        gaps = []
        for b, reading in enumerate(readings):
            value = read_curve(reading, float(dg[:, b].mean()))
            gaps.append(None if value is None else float(df[:, b].mean()) - value)
        tail = (1.0 - self.confidence) / 2.0
        interval = bounded_percentiles(gaps, tail)
        outside = sum(g is None for g in gaps)
        result.draws, result.draws_outside = self.resamples, outside
        if interval is None:
            result.notes.append(f"no interval: {name}'s gain leaves the LoRA curve's range in {outside} of "
                                f"{self.resamples} draws of the examples, more than a tail holds")
            return result
        if outside:
            result.notes.append(f"{name}'s gain leaves the LoRA curve's range in {outside} of {self.resamples} draws "
                                "of the examples: the examples-only interval holds whatever the gap on those draws "
                                "(they count as -inf for its lower end, +inf for its upper end)")
        result.examples_low, result.examples_high = interval
        gaps = [g for g in gaps if g is not None]

        per_lora_seed = [read_curve(reading, g_m) for reading in self.seed_readings]
        if runs.runs < 2 or len(per_lora_seed) < 2:
            result.notes.append("no method-level interval: not estimable from one seed")
            return result
        result.seeds_outside = sum(v is None for v in per_lora_seed)
        if result.seeds_outside:
            result.notes.append(f"no method-level interval: {result.seeds_outside} of {len(per_lora_seed)} LoRA "
                                f"seeds' own curves do not reach {name}'s gain")
            return result
        a, b = self.reading[2:]
        slope = a + 2.0 * b * g_m  # run r's gap, to first order: its own forgetting and gain against the slope
        d = np.array([float(if_[r, 0]) - f_m - slope * (float(ig[r, 0]) - g_m) for r in range(runs.runs)])
        e = np.array([f_m - v for v in per_lora_seed])
        terms = [(float(d.var(ddof=1)) / len(d), len(d)), (float(e.var(ddof=1)) / len(e), len(e))]
        result.method_low, result.method_high, result.p = (float(x) for x in method_interval(
            result.gap, float(np.var(gaps, ddof=1)), terms, self.confidence))
        return result


def frontier_gaps(methods: dict[str, LabelRuns], lora: dict[str, LabelRuns], untuned: LabelRuns,
                  positive: np.ndarray, resamples: int = 2000, seed: int = 0,
                  confidence: float = CONFIDENCE) -> dict[str, FrontierGap]:
    """Each method's gap to the curve of the ``lora`` labels, all on one ``LoraCurve`` (the same draws): method by
    method the numbers ``frontier_gap`` gives it alone."""
    curve = LoraCurve(lora, untuned, positive, resamples, seed, confidence)
    return {name: curve.gap(runs, name) for name, runs in methods.items()}


def frontier_gap(imsm: LabelRuns, lora: dict[str, LabelRuns], untuned: LabelRuns, positive: np.ndarray,
                 resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> FrontierGap:
    """The gap of ``imsm`` to the curve of the ``lora`` labels (their runs aligned by seed), relative to ``untuned``
    (one run); ``positive`` are the target rows' gold labels. See the module docstring."""
    return frontier_gaps({"IMSM": imsm}, lora, untuned, positive, resamples, seed, confidence)["IMSM"]
