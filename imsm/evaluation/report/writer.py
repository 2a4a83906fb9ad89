"""The evaluation report: what it holds and the order it is written in.

``write_report`` writes, into the evaluation's output folder,

* ``summary.{md,csv}``, ``forgetting.md``, ``comparisons.md``: the tables (``imsm.evaluation.report.tables``);
* ``stats.json`` / ``stats.csv``: every value, spread, per-run value and comparison, unrounded, with both interval
  kinds and the test of each comparison (``imsm.evaluation.report.comparisons``, ``imsm.evaluation.stats``);
* ``tradeoff.{png,csv}``, ``forgetting.png``: the charts (``imsm.evaluation.report.charts``);
* with --measures, ``measures.md`` and ``frontier.png``, a section of ``summary.md`` and ``forgetting.md`` each, and
  the key ``measures`` of ``stats.json``: handed in as data (``report.measure_tables.MeasureSections``), so every file
  has this one writer and is written once.

Evaluation writes ``report_inputs.json`` (the model folders in order, target, pairs, bootstrap settings, notes, the
--measures frontier) before it decodes and every model's predictions as soon as they are decoded, so
``rebuild_report`` (``evaluate.py --report_only OUTPUT_DIR``) can write the report again from the folder alone,
without decoding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from imsm.atomic import atomic_write_json, atomic_write_text
from imsm.evaluation.arguments import MeasureArguments
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.charts import POINT_KEYS, plot_forgetting, plot_frontier, plot_tradeoff, tradeoff_points
from imsm.evaluation.report.comparisons import RECORD_KEYS, Comparisons, stats_records
from imsm.evaluation.report.measure_tables import MeasureSections, measure_sections
from imsm.evaluation.report.results import (
    NLL,
    PRIMARY,
    REPORT_INPUTS,
    RunResult,
    group_runs,
    load_output_dir,
    read_json,
)
from imsm.evaluation.report.tables import (
    INTERVAL_LEGEND,
    P_LEGEND,
    comparison_table,
    forgetting_table,
    summary_table,
    to_csv,
)

logger = logging.getLogger(__name__)

REPORT_NAMES = (("summary_md", "summary.md"), ("summary_csv", "summary.csv"), ("forgetting_md", "forgetting.md"),
                ("forgetting_png", "forgetting.png"), ("comparisons_md", "comparisons.md"),
                ("stats_json", "stats.json"), ("stats_csv", "stats.csv"), ("tradeoff_png", "tradeoff.png"),
                ("tradeoff_csv", "tradeoff.csv"))


def _blank(value: Any) -> Any:
    return "" if value is None else value


def write_report(runs: list[RunResult], target: str, out_dir: str | Path, baseline_label: str = "untuned",
                 pairs: list[tuple[str, str]] | None = None, resamples: int = 2000, seed: int = 0,
                 notes: list[str] | None = None, measures: MeasureSections | None = None) -> dict[str, Path]:
    """Write summary.{md,csv}, forgetting.{md,png}, comparisons.md, stats.{json,csv} and tradeoff.{png,csv} into
    ``out_dir`` (with ``measures``, their sections too, measures.md and frontier.png); return their paths by key."""
    out_dir = Path(out_dir)
    pairs = pairs or []
    rows = group_runs(runs)
    known = {row.label for row in rows}
    for label in (label for pair in pairs for label in pair):
        if label not in known:
            raise ValueError(f"--compare names {label!r}, which is not a label of this report ({sorted(known)})")
    comparisons = Comparisons(rows, target, resamples, seed)
    summary_md, summary_csv = summary_table(runs)
    has_nll = any(NLL in m for run in runs for m in run.metrics.values())
    has_primary = any(get_task(t).primary in m for run in runs for t, m in run.metrics.items())
    shown = [(measure, title) for measure, title in (
        (PRIMARY, "decoded metric"),
        (NLL, "answer NLL, nats per answer token pooled over the task (lower is better)"))
        if (measure == NLL and has_nll) or (measure == PRIMARY and has_primary)]
    forgetting = [f"### Forgetting: {title}\n\n" + forgetting_table(runs, target, baseline_label, measure, comparisons)
                  + f"\n{INTERVAL_LEGEND}.\n" for measure, title in shown]
    compared = [f"### Comparisons: {title} (A − B)\n\n" + comparison_table(runs, target, pairs, measure, comparisons)
                + f"\n{INTERVAL_LEGEND}; {P_LEGEND}.\n" for measure, title in shown if pairs]
    records = stats_records(runs, target, baseline_label, pairs, comparisons)
    records["notes"] = list(notes or [])
    if notes:
        summary_md += "\n" + "".join(f"Note: {note}.\n" for note in notes)
    points = tradeoff_points(runs, target, baseline_label, comparisons)
    paths = {key: out_dir / name for key, name in REPORT_NAMES}
    forgetting_md = "\n".join(forgetting)
    if measures is not None:  # the target's measures beside the task metrics, the forgetting ones beside forgetting's
        summary_md = _with_section(summary_md, measures.summary_section())
        forgetting_md = _with_section(forgetting_md, measures.forgetting_section())
    atomic_write_text(paths["summary_md"], summary_md)
    atomic_write_text(paths["summary_csv"], summary_csv)
    atomic_write_text(paths["forgetting_md"], forgetting_md)
    atomic_write_text(paths["comparisons_md"], "\n".join(compared) or "No pairs named (--compare A:B).\n")
    _write_stats(paths["stats_json"], records, measures)
    atomic_write_text(paths["stats_csv"], to_csv(RECORD_KEYS, [[_blank(rec[k]) for k in RECORD_KEYS]
                                                               for rec in records["comparisons"]]))
    atomic_write_text(paths["tradeoff_csv"], to_csv(POINT_KEYS, [[_blank(p[k]) for k in POINT_KEYS] for p in points]))
    plot_forgetting(runs, target, paths["forgetting_png"])
    plot_tradeoff(points, target, paths["tradeoff_png"])
    if measures is not None:
        paths |= _write_measures(out_dir, measures, target)
    logger.info("report written to %s", out_dir)
    return paths


def _with_section(text: str, section: list[str]) -> str:
    return text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n" if section else text


def _write_stats(path: Path, records: dict[str, Any], measures: MeasureSections | None) -> None:
    """stats.json: the report's records, and the measures' under the key ``measures``. The two layouts are the ones
    reports have always had (indent 1 without the measures, ``atomic_write_json``'s with them), so files compare."""
    if measures is None:
        atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    else:
        atomic_write_json(path, records | {"measures": measures.stats})


def _write_measures(out_dir: Path, measures: MeasureSections, target: str) -> dict[str, Path]:
    """measures.md, and frontier.png when a frontier was asked for."""
    paths = {"measures_md": out_dir / "measures.md"}
    atomic_write_text(paths["measures_md"], measures.measures_md())
    if measures.frontier:
        paths["frontier_png"] = plot_frontier(measures.frontier, measures.frontier_rows, target,
                                              out_dir / "frontier.png")
    return paths


def write_measures_report(results: dict[str, list[dict]], target: str, margs: MeasureArguments,
                          out_dir: str | Path, resamples: int, seed: int) -> dict[str, Path]:
    """The measures alone (``scripts/merge_measures.py``, into a folder of its own): measures.md, stats.json with
    only the key ``measures``, and frontier.png."""
    out_dir = Path(out_dir)
    measures = measure_sections(results, target, margs, resamples, seed)
    _write_stats(out_dir / "stats.json", {}, measures)
    return _write_measures(out_dir, measures, target)


def write_report_inputs(out_dir: str | Path, folders: list[str], target: str, pairs: list[tuple[str, str]],
                        resamples: int, seed: int, notes: list[str], frontier: str | None = None) -> Path:
    """Record what the report needs besides the prediction records, before anything is decoded."""
    path = Path(out_dir) / REPORT_INPUTS
    atomic_write_json(path, {"folders": folders, "target": target, "pairs": [list(p) for p in pairs],
                             "bootstrap_resamples": resamples, "bootstrap_seed": seed, "notes": notes,
                             "frontier": frontier})
    return path


def read_report_inputs(out_dir: str | Path) -> dict[str, Any]:
    """The saved report inputs ({} for a folder written before they were saved)."""
    path = Path(out_dir) / REPORT_INPUTS
    return read_json(path) if path.is_file() else {}


def report_settings(out_dir: str | Path, target: str | None = None, pairs: list[tuple[str, str]] | None = None,
                    resamples: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """The settings a report of an existing output folder is written with: those given, else those the evaluation
    recorded (``target`` is required for a folder without them); also its model folders and --measures frontier."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"--report_only {out_dir}: no such folder")
    saved = read_report_inputs(out_dir)
    target = target or saved.get("target")
    if target is None:
        raise ValueError(f"--report_only {out_dir}: the folder records no target task (written before "
                         f"{REPORT_INPUTS} existed); give --target")
    return {"target": target, "pairs": pairs if pairs else [tuple(p) for p in saved.get("pairs", [])],
            "resamples": resamples if resamples is not None else saved.get("bootstrap_resamples", 2000),
            "seed": seed if seed is not None else saved.get("bootstrap_seed", 0), "notes": saved.get("notes", []),
            "folders": saved.get("folders"), "frontier": saved.get("frontier")}


def rebuild_report(out_dir: str | Path, settings: dict[str, Any],
                   measures: MeasureSections | None = None) -> dict[str, Path]:
    """Write the report of an existing output folder from its saved records, with ``report_settings``'s settings
    (and the measures' sections, from its saved measures)."""
    return write_report(load_output_dir(out_dir), settings["target"], out_dir, pairs=settings["pairs"],
                        resamples=settings["resamples"], seed=settings["seed"], notes=settings["notes"],
                        measures=measures)
