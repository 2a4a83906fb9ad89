"""IMSM against the LoRA frontier at equal target gain.

Vanilla LoRA at several adapter scales (``evaluate.py --adapter_scale``) and checkpoints gives points (target gain,
forgetting); IMSM is one point. With

    gain       = AUROC of the target's yes/no log-odds − the untuned model's           (``measures.auroc``)
    forgetting = the forgetting measure − the untuned model's, averaged over tasks      (general-text NLL per token:
                 tuned − untuned; KL(untuned ‖ tuned): the untuned model's is 0)

a label's point is the mean over its runs (seeds). The **LoRA curve** is the lower frontier of the LoRA points: those
that no other point beats on both axes (gain at least as high, forgetting at least as low), joined by straight
lines; a dominated scale or checkpoint is simply a worse way for LoRA to reach that gain. The reported **gap** is

    gap = F_IMSM − curve(G_IMSM)            (< 0: IMSM forgets less than LoRA at the same target gain)

and where G_IMSM lies outside the curve's gain range the gap is not given (never extrapolated): the note says so.

**Intervals.** The *examples-only* interval draws the target's and every forgetting task's examples with replacement
(``stats.resample_counts``; one draw shared by every label, so all points move together), recomputes every point,
**rebuilds the curve** and the gap on each draw, and takes the 2.5th and 97.5th percentiles. The *method-level*
interval adds the seeds through the statistics module's ``method_interval`` (Welch t over the seed terms):
SE² = V_ex + s²(d_r)/k_IMSM + s²(e_j)/k_LoRA, where d_r is the gap of IMSM's run r against the seed-averaged curve and
e_j the gap of the seed-averaged IMSM point against LoRA seed j's own curve (run j of every LoRA label is one training
run at its scales and checkpoints) - each seed's effect on the gap, to first order. A draw whose gain leaves the
curve's range has no gap: while such draws are fewer than a tail holds (2.5% of them), the examples-only interval is
bounded as if each were −inf (its lower end) and +inf (its upper end), so it holds whatever their gap
(``stats.bounded_percentiles``), and V_ex is the variance of the draws in range; with more, or a seed out of range, the
interval is not given, with the count in the note.
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


def interpolate(curve: Sequence[Point], gain: float) -> float | None:
    """The curve's forgetting at ``gain``, linear between its points; None outside its gain range."""
    if not curve or gain < curve[0][0] or gain > curve[-1][0]:
        return None
    gains, forgetting = zip(*curve, strict=True)
    return float(np.interp(gain, gains, forgetting))


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
    """IMSM's forgetting minus the LoRA curve's at IMSM's target gain, with its intervals (module docstring)."""

    gap: float | None
    imsm: Point
    points: dict[str, Point]  # every LoRA label's (gain, forgetting), seeds averaged
    curve: list[Point]  # the lower frontier of those points
    examples_low: float | None = None
    examples_high: float | None = None
    method_low: float | None = None
    method_high: float | None = None
    p: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: reported_p(self.p) if k == "p" else getattr(self, k)
                for k in ("gap", "imsm", "points", "curve", "examples_low", "examples_high", "method_low",
                          "method_high", "p", "notes")}


def _points(labels: dict[str, LabelRuns], untuned: LabelRuns, positive, counts_t, counts_f):
    """label -> (gain (runs, B), forgetting (runs, B)) relative to the untuned model on the same draws."""
    base_gain, base_forgetting = untuned.values(positive, counts_t, counts_f)
    return {name: tuple(v - b for v, b in zip(runs.values(positive, counts_t, counts_f), (base_gain, base_forgetting),
                                               strict=True))
            for name, runs in labels.items()}


def _curve_at(points: dict[str, tuple[np.ndarray, np.ndarray]], column: int, run: int | None = None) -> list[Point]:
    """The lower frontier of the labels' points on one draw, seeds averaged (or seed ``run`` alone)."""
    pick = (lambda a: a[:, column].mean()) if run is None else (lambda a: a[run, column])
    return lower_frontier([(pick(g), pick(f)) for g, f in points.values()])


def frontier_gap(imsm: LabelRuns, lora: dict[str, LabelRuns], untuned: LabelRuns, positive: np.ndarray,
                 resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> FrontierGap:
    """The gap of ``imsm`` to the curve of the ``lora`` labels (their runs aligned by seed), relative to ``untuned``
    (one run); ``positive`` are the target rows' gold labels. See the module docstring."""
    positive = np.asarray(positive, dtype=bool)
    if untuned.runs != 1:
        raise ValueError(f"the untuned model is one model, got {untuned.runs} runs")
    seeds = {runs.runs for runs in lora.values()}
    if len(seeds) != 1:
        raise ValueError(f"the LoRA labels' runs must be the same seeds at each scale/checkpoint; their run counts "
                         f"differ: { {name: runs.runs for name, runs in lora.items()} }")
    n_t, n_f = len(positive), [f.shape[1] for f in untuned.forgetting]
    ones_t, ones_f = np.ones((1, n_t)), [np.ones((1, n)) for n in n_f]
    points = _points(lora, untuned, positive, ones_t, ones_f)
    ig, if_ = _points({"imsm": imsm}, untuned, positive, ones_t, ones_f)["imsm"]
    g_imsm, f_imsm = float(ig.mean()), float(if_.mean())
    curve = _curve_at(points, 0)
    result = FrontierGap(None, (g_imsm, f_imsm), {k: (float(g.mean()), float(f.mean())) for k, (g, f) in
                                                  points.items()}, curve)
    at = interpolate(curve, g_imsm)
    if at is None:
        result.notes.append(f"IMSM's target gain {g_imsm:+.4f} lies outside the LoRA curve's gain range "
                            f"[{curve[0][0]:+.4f}, {curve[-1][0]:+.4f}]; not extrapolated")
        return result
    result.gap = f_imsm - at

    rng = np.random.default_rng(seed)
    counts_t = resample_counts(n_t, resamples, rng)
    counts_f = [resample_counts(n, resamples, rng) for n in n_f]
    drawn = _points(lora, untuned, positive, counts_t, counts_f)
    dg, df = _points({"imsm": imsm}, untuned, positive, counts_t, counts_f)["imsm"]
    gaps = []
    for b in range(resamples):
        value = interpolate(_curve_at(drawn, b), float(dg[:, b].mean()))
        gaps.append(None if value is None else float(df[:, b].mean()) - value)
    tail = (1.0 - confidence) / 2.0
    interval = bounded_percentiles(gaps, tail)
    outside = sum(g is None for g in gaps)
    if interval is None:
        result.notes.append(f"no interval: IMSM's gain leaves the LoRA curve's range in {outside} of {resamples} "
                            "draws of the examples, more than a tail holds")
        return result
    if outside:
        result.notes.append(f"IMSM's gain leaves the LoRA curve's range in {outside} of {resamples} draws of the "
                            "examples: the examples-only interval holds whatever the gap on those draws (they count "
                            "as -inf for its lower end, +inf for its upper end)")
    result.examples_low, result.examples_high = interval
    gaps = [g for g in gaps if g is not None]

    per_imsm_run = [interpolate(curve, float(ig[r, 0])) for r in range(imsm.runs)]
    per_lora_seed = [interpolate(_curve_at(points, 0, run=j), g_imsm) for j in range(seeds.pop())]
    if imsm.runs < 2 or len(per_lora_seed) < 2:
        result.notes.append("no method-level interval: not estimable from one seed")
        return result
    if any(v is None for v in per_imsm_run + per_lora_seed):
        result.notes.append("no method-level interval: a single seed's gain or curve leaves the curve's range")
        return result
    d = np.array([float(if_[r, 0]) - v for r, v in enumerate(per_imsm_run)])
    e = np.array([f_imsm - v for v in per_lora_seed])
    terms = [(float(d.var(ddof=1)) / len(d), len(d)), (float(e.var(ddof=1)) / len(e), len(e))]
    result.method_low, result.method_high, result.p = (float(x) for x in method_interval(
        result.gap, float(np.var(gaps, ddof=1)), terms, confidence))
    return result
