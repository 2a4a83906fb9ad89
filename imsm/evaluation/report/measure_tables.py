"""The --measures' part of the report, as data for the one writer (``report.writer``): each measure's table (every
label's value, mean ± sd over its runs, and its change against the untuned model with both intervals of
``imsm.evaluation.stats``), the frontier's gap table (``imsm.evaluation.measures.frontier``: every --frontier method
against one LoRA curve), and the ``measures`` record of ``stats.json``. ``MeasureSections`` holds them; the writer puts
the target's tables into ``summary.md``, the forgetting ones into ``forgetting.md``, the gap table into both, all of
them (and every gap's two intervals) into ``measures.md``.

stats.json's ``measures`` keys of the frontier: ``frontier`` (forgetting measure -> the first method's record, the
only method's with one: the layout it always had), ``frontier_methods`` (method -> forgetting measure -> its record)
and ``frontier_table`` (the gap table's rows, ``frontier_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imsm.evaluation.arguments import MeasureArguments
from imsm.evaluation.measures.frontier import FrontierGap, LabelRuns, fit_curve, frontier_gaps
from imsm.evaluation.measures.measures import (
    auroc_resampled,
    balanced_accuracy_from_counts,
    choose_threshold,
    confusion,
    mcc_from_counts,
)
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.results import measured_names, read_json, read_measures
from imsm.evaluation.stats import AVERAGE, Measure, average_measure, change, format_p, reported_p, task_counts

TARGET_MEASURES = ("auroc", "mcc", "balanced_accuracy")
MEASURE_TITLES = {
    "auroc": "AUROC of the yes/no log-odds (0.5: the majority class only)",
    "mcc": "MCC at the threshold chosen on held-out training rows",
    "balanced_accuracy": "balanced accuracy at the threshold chosen on held-out training rows",
    "general_nll": "NLL of held-out natural text, nats per token",
    "kl": "KL(untuned ‖ model) per greedy answer token of the untuned model",
}
FRONTIER_MEASURES = {"general_nll": "NLL", "kl": "KL"}  # the forgetting measures a frontier reads, short names
FRONTIER_LEGEND = (
    "Gap: the method's forgetting minus LoRA's fitted curve a·g + b·g² at the method's own AUROC gain g (< 0: it "
    "forgets less than LoRA at that gain); out of range: its gain lies outside the curve's, not extrapolated. "
    "[95%]: method-level (seeds and examples), (ex): examples-only (one seed, or a LoRA seed's curve short of the "
    "gain). p: the method-level test's. Draws outside: bootstrap draws on which the gain left the curve's range "
    "(counted as ±inf by the examples-only interval). Cost: train_runtime_s per optimizer step over LoRA's (each "
    "run's train_stats.json, mean over seeds; — unknown). Rows by the NLL gap (KL without NLL).")
LEGEND = ("Value: mean ± sd over a label's runs. Change against the untuned model: estimate [examples-only 95% "
          "interval] [method-level 95% interval] p (the method-level interval adds the seed variance; see "
          "docs/evaluation.md#measures).")


@dataclass
class MeasureSections:
    """The measures' report, computed before anything is written: each section's lines, the ``measures`` record of
    stats.json, and the frontier's gaps and gap-table rows (for frontier.png)."""

    target_part: list[str]  # the target's measures: summary.md's section
    forgetting_part: list[str]  # the forgetting measures: forgetting.md's section
    stats: dict
    frontier: dict[str, dict[str, FrontierGap]] = field(default_factory=dict)  # method -> forgetting measure -> gap
    frontier_rows: list[dict] = field(default_factory=list)  # the gap table's rows (stats.json's frontier_table)
    frontier_part: list[str] = field(default_factory=list)  # the gap table, the curve, the notes: in every section
    frontier_detail: list[str] = field(default_factory=list)  # both intervals of every gap: measures.md only

    def measures_md(self) -> str:
        return "\n".join(["# Measures", "", LEGEND, "", *self.target_part, *self.forgetting_part, *self.frontier_part,
                          *self.frontier_detail])

    def summary_section(self) -> list[str]:
        return self._section(self.target_part + self.frontier_part, "Target learning without a threshold")

    def forgetting_section(self) -> list[str]:
        return self._section(self.forgetting_part + self.frontier_part, "Forgetting without the answer format")

    @staticmethod
    def _section(part: list[str], title: str) -> list[str]:
        return [f"## {title} (--measures)", "", LEGEND, "", *part] if part else []


def _ratio(components: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """(runs, n, 2) (sum, count) -> pooled per-token value of each run on each draw."""
    return lambda c: np.stack([(c @ comp[:, 0]) / (c @ comp[:, 1]) for comp in components])


def _auroc(scores: np.ndarray, positive: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda c: np.stack([auroc_resampled(s, positive, c) for s in scores])


def _at_threshold(scores, positive, thresholds, metric) -> Callable[[np.ndarray], np.ndarray]:
    """MCC or balanced accuracy of each run at its own threshold, on drawn examples."""
    confusions = [confusion(s, positive, t) for s, t in zip(scores, thresholds, strict=True)]
    return lambda c: np.stack([metric(*(c @ conf).T) for conf in confusions])


def label_measures(runs: list[dict]) -> dict[str, dict[str, Measure]]:
    """measure name -> task -> Measure of one label's runs."""
    seeded = not runs[0]["untuned"]  # the untuned model is deterministic: no seed variance
    table: dict[str, dict[str, Measure]] = {}
    for task in runs[0].get("yes_no", {}):
        entries = [r["yes_no"][task] for r in runs]
        scores, positive = np.array([e["log_odds"] for e in entries]), np.array(entries[0]["gold_yes"], bool)
        table.setdefault("auroc", {})[task] = Measure(len(positive), _auroc(scores, positive), seeded)
        if "train_log_odds" in entries[0]:
            thresholds = [choose_threshold(e["train_log_odds"], np.array(e["train_gold_yes"], bool)) for e in entries]
            for name, metric in (("mcc", mcc_from_counts), ("balanced_accuracy", balanced_accuracy_from_counts)):
                table.setdefault(name, {})[task] = Measure(len(positive), _at_threshold(scores, positive, thresholds,
                                                                                        metric), seeded)
    if "general_nll" in runs[0]:
        comps = np.array([r["general_nll"] for r in runs])
        table["general_nll"] = {"general text": Measure(comps.shape[1], _ratio(comps), seeded)}
    for task in runs[0].get("kl", {}):
        comps = np.array([r["kl"][task] for r in runs])
        table.setdefault("kl", {})[task] = Measure(comps.shape[1], _ratio(comps), seeded)
    if len(table.get("kl", {})) > 1:
        table["kl"][AVERAGE] = average_measure(list(table["kl"].values()))
    return table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_change(c: dict) -> str:
    text = f"{c['delta']:+.4f} [{c['examples_low']:+.4f}, {c['examples_high']:+.4f}]"
    if c["method_low"] is not None:
        text += f" [{c['method_low']:+.4f}, {c['method_high']:+.4f}]"
        text += f" p={format_p(c['p'])}" if c["p"] is not None else ""
    return text


def measure_sections(results: dict[str, list[dict]], target: str, margs: MeasureArguments, resamples: int,
                     seed: int) -> MeasureSections:
    """Every label's measures against the untuned model's (``results``: label -> its runs' measures.json records)."""
    if "untuned" not in results:
        raise ValueError("--measures reports changes against the untuned model: add --untuned")
    tables = {label: label_measures(runs) for label, runs in results.items()}
    base = tables["untuned"]
    rng = np.random.default_rng(seed)
    counts = {(name, task): c for name, by_task in base.items()
              for task, c in task_counts(by_task, resamples, rng).items()}
    sections: dict[str, list[str]] = {}  # measure -> its lines
    stats: dict = {}
    for name, by_task in base.items():
        tasks = list(by_task)
        lines = [f"### {name}: {MEASURE_TITLES[name]}", "",
                 "| label | " + " | ".join(f"{t} | change" for t in tasks) + " |", "|---|" + "---|---|" * len(tasks)]
        for label, table in tables.items():
            cells = []
            for task in tasks:
                m = table[name][task]
                runs = m.per_run()
                cells.append(f"{runs.mean():.4f}" + (f" ± {runs.std(ddof=1):.4f}" if len(runs) > 1 else ""))
                if label == "untuned":
                    cells.append("")
                    continue
                c = change(m, by_task[task], counts[(name, task)], testable=name != "kl")
                cells.append(_fmt_change(c))
                stats.setdefault(name, {}).setdefault(task, {})[label] = {"value": float(runs.mean()),
                                                                          "per_run": runs.tolist(), "change": c}
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        sections[name] = [*lines, ""]
    frontier, rows, frontier_part, detail = {}, [], [], []
    if margs.frontier is not None:
        frontier, curve_labels = _frontier(results, target, margs, resamples, seed)
        rows = frontier_rows(frontier, curve_labels, results, stats, target)
        frontier_part, detail = _frontier_lines(frontier, rows), _frontier_detail(frontier, rows)
        first = next(iter(frontier))  # the key "frontier" keeps its layout: the first (with one, the only) method's
        stats["frontier"] = {k: v.to_dict() for k, v in frontier[first].items()}
        stats["frontier_methods"] = {m: {k: v.to_dict() for k, v in by.items()} for m, by in frontier.items()}
        stats["frontier_table"] = rows
    target_part = [line for k, v in sections.items() if k in TARGET_MEASURES for line in v]
    forgetting_part = [line for k, v in sections.items() if k not in TARGET_MEASURES for line in v]
    return MeasureSections(target_part, forgetting_part, stats, frontier, rows, frontier_part, detail)


def _frontier(results: dict[str, list[dict]], target: str, margs: MeasureArguments, resamples: int,
              seed: int) -> tuple[dict[str, dict[str, FrontierGap]], list[str]]:
    """(method -> forgetting measure -> its gap to LoRA's curve, the curve's labels); every method on one curve and
    one set of draws per measure (``frontier.frontier_gaps``)."""
    if get_task(target).kind != "yesno" or target not in results["untuned"][0].get("yes_no", {}):
        raise ValueError(f"--frontier measures the target's gain by AUROC: the target {target} must be a yes/no task")
    methods, curve_labels = margs.frontier_groups(results)
    seeds = len(results[curve_labels[0]])
    positive = np.array(results["untuned"][0]["yes_no"][target]["gold_yes"], bool)
    out: dict[str, dict[str, FrontierGap]] = {method: {} for method in methods}
    for measure in FRONTIER_MEASURES:
        if measure not in results["untuned"][0]:
            continue

        def runs_of(label, repeat=1, measure=measure):
            runs = results[label] * repeat
            target_scores = [r["yes_no"][target]["log_odds"] for r in runs]
            if measure == "general_nll":
                forgetting = [np.array([r["general_nll"] for r in runs])]
            else:
                forgetting = [np.array([r["kl"][t] for r in runs]) for t in runs[0]["kl"]]
            return LabelRuns(np.array(target_scores), forgetting)

        lora = {lb: runs_of(lb) for lb in curve_labels} | {"untuned (scale 0)": runs_of("untuned", seeds)}
        gaps = frontier_gaps({m: runs_of(m) for m in methods}, lora, runs_of("untuned"), positive, resamples, seed)
        for method, gap in gaps.items():
            out[method][measure] = gap
    return out, curve_labels


def seconds_per_step(runs: list[dict]) -> float | None:
    """Mean over runs of train_runtime_s / optimizer_steps (each run's train_stats.json, saved as ``cost``); None
    when a run's is unknown."""
    rates = []
    for run in runs:
        cost = run.get("cost") or {}
        seconds, steps = cost.get("train_runtime_s"), cost.get("optimizer_steps")
        if not seconds or not steps:
            return None
        rates.append(float(seconds) / float(steps))
    return float(np.mean(rates)) if rates else None


def _lora_seconds_per_step(results: dict[str, list[dict]], curve_labels: list[str]) -> float | None:
    """LoRA's rate from its finished runs: the curve's runs at the most optimizer steps (a scale is the same run; an
    earlier checkpoint's rate carries more of the start-up)."""
    runs = [run for label in curve_labels for run in results[label]]
    steps = [(run.get("cost") or {}).get("optimizer_steps") for run in runs]
    if not runs or any(not s for s in steps):
        return None
    return seconds_per_step([run for run, s in zip(runs, steps, strict=True) if s == max(steps)])


def _headline(c: dict) -> dict:
    """A change's value with its headline interval: method-level where the seeds give one, else examples-only."""
    kind = "method" if c["method_low"] is not None else "examples"
    return {"value": c["delta"], "low": c[f"{kind}_low"], "high": c[f"{kind}_high"], "interval": kind}


def _share(curve: float | None, low: float | None, high: float | None) -> list[float] | None:
    """What a gap interval allows, as a share of LoRA's forgetting at the same gain: [(curve + low) / curve,
    (curve + high) / curve] (1: as much as LoRA). None without an interval, or where LoRA's curve there is not above
    0 (no share of it is meaningful)."""
    if curve is None or low is None or curve <= 0:
        return None
    return [(curve + low) / curve, (curve + high) / curve]


def frontier_rows(frontier: dict[str, dict[str, FrontierGap]], curve_labels: list[str], results: dict[str, list[dict]],
                  stats: dict, target: str) -> list[dict]:
    """The gap table: per method its AUROC gain and forgetting changes (with their headline intervals, from the
    measures' own tables), its gap on each forgetting measure (both intervals, p, the draws outside the curve) and
    its training cost per optimizer step relative to LoRA's; sorted by the NLL gap (the KL gap without NLL), gaps
    not given last."""
    lora_rate = _lora_seconds_per_step(results, curve_labels)
    rows = []
    for method, by_measure in frontier.items():
        rate = seconds_per_step(results[method])
        row = {"method": method, "runs": len(results[method]),
               "gain": _headline(stats["auroc"][target][method]["change"]),
               "cost": {"seconds_per_step": rate, "lora_seconds_per_step": lora_rate,
                        "ratio": rate / lora_rate if rate is not None and lora_rate else None}}
        for measure, gap in by_measure.items():
            column = AVERAGE if AVERAGE in stats[measure] else next(iter(stats[measure]))
            kind = "method" if gap.method_low is not None else "examples" if gap.examples_low is not None else None
            low, high = (getattr(gap, f"{kind}_low"), getattr(gap, f"{kind}_high")) if kind else (None, None)
            curve = None if gap.gap is None else gap.imsm[1] - gap.gap  # LoRA's fitted curve at the method's gain
            row[measure] = {"change": _headline(stats[measure][column][method]["change"]), "gap": gap.gap,
                            "gap_low": low, "gap_high": high, "gap_interval": kind, "curve_at_gain": curve,
                            "share_of_lora": _share(curve, low, high),
                            "examples_low": gap.examples_low, "examples_high": gap.examples_high,
                            "method_low": gap.method_low, "method_high": gap.method_high, "p": reported_p(gap.p),
                            "draws": gap.draws, "draws_outside": gap.draws_outside,
                            "out_of_range": gap.gap is None and gap.draws == 0}
        rows.append(row)
    key = "general_nll" if any("general_nll" in row for row in rows) else "kl"
    return sorted(rows, key=lambda row: (row[key]["gap"] is None, row[key]["gap"] or 0.0))


def _gap_cell(cell: dict) -> str:
    if cell["out_of_range"]:
        return "out of range"
    if cell["gap_interval"] is None:
        return f"{cell['gap']:+.4f} (no interval)"
    return (f"{cell['gap']:+.4f} [{cell['gap_low']:+.4f}, {cell['gap_high']:+.4f}]"
            + (" (ex)" if cell["gap_interval"] == "examples" else ""))


def _frontier_lines(frontier: dict[str, dict[str, FrontierGap]], rows: list[dict]) -> list[str]:
    """The gap table, LoRA's curve on each measure and every gap's notes."""
    measures = list(next(iter(frontier.values())))
    short = [FRONTIER_MEASURES[m] for m in measures]
    header = ["method", "runs", "AUROC gain"] + [{"NLL": "NLL change"}.get(m, m) for m in short]
    header += [cell for m in short for cell in (f"{m} gap [95%]", f"p ({m})")]
    header += [f"draws outside the curve ({', '.join(short)})", "train s/step ÷ LoRA's"]
    lines = ["### Frontier: each method's forgetting minus LoRA's curve at the method's own target gain", "",
             FRONTIER_LEGEND, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [row["method"], str(row["runs"]), f"{row['gain']['value']:+.4f}"]
        cells += [f"{row[m]['change']['value']:+.4f}" for m in measures]
        cells += [c for m in measures for c in (_gap_cell(row[m]), format_p(row[m]["p"]))]
        cells.append(", ".join(f"{row[m]['draws_outside']}/{row[m]['draws']}" if row[m]["draws"] else "–"
                               for m in measures))
        cells.append("—" if row["cost"]["ratio"] is None else f"{row['cost']['ratio']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for measure in measures:
        gap = next(iter(frontier.values()))[measure]  # one curve: every method's holds it
        a, b = fit_curve(gap.curve)
        lines.append(f"LoRA's curve ({measure}): forgetting = {a:+.4g}·g {b:+.4g}·g², fitted to its lower frontier "
                     + ", ".join(f"({g:+.4f}, {f:+.4f})" for g, f in gap.curve)
                     + f", read over gains [{gap.gain_range[0]:+.4f}, {gap.gain_range[1]:+.4f}]; every point: "
                     + ", ".join(f"{label} ({g:+.4f}, {f:+.4f})" for label, (g, f) in gap.points.items()))
        lines.append("")
    notes = [f"- {method} ({measure}): {note}" for method, by in frontier.items() for measure, gap in by.items()
             for note in gap.notes]
    return lines + ([*notes, ""] if notes else [])


def _frontier_detail(frontier: dict[str, dict[str, FrontierGap]], rows: list[dict]) -> list[str]:
    """measures.md's table of every gap with both intervals, in the gap table's order."""
    def signed(value: float | None) -> str:
        return "–" if value is None else f"{value:+.4f}"

    lines = ["### Frontier: both intervals of every gap", "",
             ("| method | measure | gap | examples-only 95% | method-level 95% | p | draws outside the curve | "
              "LoRA seeds' curves short of the gain |"), "|---|---|---|---|---|---|---|---|"]
    for method in (row["method"] for row in rows):
        for measure, gap in frontier[method].items():
            lines.append(f"| {method} | {measure} | {'out of range' if gap.draws == 0 else signed(gap.gap)} | "
                         f"[{signed(gap.examples_low)}, {signed(gap.examples_high)}] | [{signed(gap.method_low)}, "
                         f"{signed(gap.method_high)}] | {format_p(gap.p)} | "
                         f"{f'{gap.draws_outside}/{gap.draws}' if gap.draws else '–'} | {gap.seeds_outside} |")
    return [*lines, ""]


def saved_measures(out_dir: str | Path, folders: list[str] | None,
                   frontier: str | None) -> tuple[dict[str, list[dict]], MeasureArguments] | None:
    """The measures an evaluation saved (``read_measures``) and the arguments that report them again with
    ``measure_sections`` (``evaluate.py --report_only``); None for a report evaluated without --measures."""
    results = read_measures(out_dir, folders)
    if not results:
        if frontier:
            raise ValueError(f"--report_only {out_dir}: --frontier needs the models' measures, and the folder has "
                             "none (evaluated without --measures)")
        return None
    for record in (record for runs in results.values() for record in runs if not record["untuned"]):
        if "cost" not in record:  # measured before measures.json held it: the model's results.json has it
            path = Path(out_dir) / record["folder"] / "results.json"
            record["cost"] = read_json(path).get("cost") if path.is_file() else None
    first = results["untuned" if "untuned" in results else next(iter(results))][0]
    return results, MeasureArguments(measures=",".join(measured_names(first)), general_text="(saved)",
                                     frontier=frontier)
