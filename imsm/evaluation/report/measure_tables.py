"""The --measures' part of the report, as data for the one writer (``report.writer``): each measure's table (every
label's value, mean ± sd over its runs, and its change against the untuned model with both intervals of
``imsm.evaluation.stats``), the frontier lines (``imsm.evaluation.measures.frontier``), and the ``measures`` record of
``stats.json``. ``MeasureSections`` holds them; the writer puts the target's tables into ``summary.md``, the
forgetting ones into ``forgetting.md``, all of them into ``measures.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imsm.evaluation.arguments import MeasureArguments
from imsm.evaluation.measures.frontier import FrontierGap, LabelRuns, frontier_gap
from imsm.evaluation.measures.measures import (
    auroc_resampled,
    balanced_accuracy_from_counts,
    choose_threshold,
    confusion,
    mcc_from_counts,
)
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.results import measured_names, read_measures
from imsm.evaluation.stats import AVERAGE, Measure, average_measure, change, format_p, task_counts

TARGET_MEASURES = ("auroc", "mcc", "balanced_accuracy")
MEASURE_TITLES = {
    "auroc": "AUROC of the yes/no log-odds (0.5: the majority class only)",
    "mcc": "MCC at the threshold chosen on held-out training rows",
    "balanced_accuracy": "balanced accuracy at the threshold chosen on held-out training rows",
    "general_nll": "NLL of held-out natural text, nats per token",
    "kl": "KL(untuned ‖ model) per greedy answer token of the untuned model",
}
LEGEND = ("Value: mean ± sd over a label's runs. Change against the untuned model: estimate [examples-only 95% "
          "interval] [method-level 95% interval] p (the method-level interval adds the seed variance; see "
          "docs/evaluation.md#measures).")


@dataclass
class MeasureSections:
    """The measures' report, computed before anything is written: each section's lines, the ``measures`` record of
    stats.json, and the frontier gaps (for frontier.png)."""

    target_part: list[str]  # the target's measures: summary.md's section
    forgetting_part: list[str]  # the forgetting measures: forgetting.md's section
    stats: dict
    frontier: dict[str, FrontierGap] = field(default_factory=dict)

    def measures_md(self) -> str:
        return "\n".join(["# Measures", "", LEGEND, "", *self.target_part, *self.forgetting_part])

    def summary_section(self) -> list[str]:
        return self._section(self.target_part, "Target learning without a threshold")

    def forgetting_section(self) -> list[str]:
        return self._section(self.forgetting_part, "Forgetting without the answer format")

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
    frontier = {}
    if margs.frontier is not None:
        frontier = _frontier(results, target, margs, resamples, seed)
        for measure, gap in frontier.items():
            sections[f"frontier {measure}"] = [
                f"### Frontier ({measure}): IMSM's forgetting minus the LoRA curve at IMSM's target gain", "",
                f"gap {_fmt(gap.gap)} [examples-only {_fmt(gap.examples_low)}, {_fmt(gap.examples_high)}] "
                f"[method-level {_fmt(gap.method_low)}, {_fmt(gap.method_high)}] p = {format_p(gap.p)}; IMSM at "
                f"(gain {gap.imsm[0]:+.4f}, forgetting {gap.imsm[1]:+.4f}); curve "
                + ", ".join(f"({g:+.4f}, {f:+.4f})" for g, f in gap.curve)
                + ("; " + "; ".join(gap.notes) if gap.notes else ""), ""]
        stats["frontier"] = {k: v.to_dict() for k, v in frontier.items()}
    target_part = [line for k, v in sections.items() if k in TARGET_MEASURES for line in v]
    forgetting_part = [line for k, v in sections.items() if k not in TARGET_MEASURES for line in v]
    return MeasureSections(target_part, forgetting_part, stats, frontier)


def _frontier(results: dict[str, list[dict]], target: str, margs: MeasureArguments, resamples: int,
              seed: int) -> dict:
    imsm_label, lora_label = margs.frontier_labels
    if get_task(target).kind != "yesno" or target not in results["untuned"][0].get("yes_no", {}):
        raise ValueError(f"--frontier measures the target's gain by AUROC: the target {target} must be a yes/no task")
    curve_labels = [lb for lb in results if lb == lora_label or lb.startswith(lora_label + "@")]
    if imsm_label not in results or not curve_labels:
        raise ValueError(f"--frontier {margs.frontier}: labels {imsm_label!r} and {lora_label!r}[@...] must be "
                         f"evaluated (have {sorted(results)})")
    seeds = len(results[curve_labels[0]])
    positive = np.array(results["untuned"][0]["yes_no"][target]["gold_yes"], bool)
    out = {}
    for measure in ("general_nll", "kl"):
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
        out[measure] = frontier_gap(runs_of(imsm_label), lora, runs_of("untuned"), positive, resamples, seed)
    return out


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
    first = results["untuned" if "untuned" in results else next(iter(results))][0]
    return results, MeasureArguments(measures=",".join(measured_names(first)), general_text="(saved)",
                                     frontier=frontier)
