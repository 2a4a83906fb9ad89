"""Restate a stats.json written before method-level intervals existed, from what it stores (no predictions needed).

    python scripts/restate_stats.py docs/cpu_study_stats.json docs/cpu_baselines3_stats.json

Older reports kept only each run's value per task and, per comparison, the examples-only bootstrap interval and
McNemar's p on the seeds' majority vote; the per-example predictions behind them were not kept. This adds the
method-level interval of ``imsm.evaluation.stats`` with the examples-only variance read back from the stored interval
(V_ex = ((high − low) / (2 · 1.96))², the normal reading of a percentile interval) and the seed variance from the
stored per-run values, replaces the vote's p by the p-value of the test of the same quantity (the method-level t test
with several seeds, McNemar between two single runs), and renames the answer-NLL keys after their definitions: the old
``answer_nll`` (mean over examples of per-example means) becomes ``answer_nll_example_mean``, the old
``answer_nll_per_token`` (pooled) becomes ``answer_nll``. A file already restated is left as it is (``restate``
refuses it). ``--chart`` redraws the file's tradeoff chart with the restated intervals. A rerun of the study gives the
exact (bootstrap) examples-only variance in place of the read-back one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from imsm.evaluation.report.charts import plot_tradeoff
from imsm.evaluation.report.comparisons import INTERVALS
from imsm.evaluation.report.results import DEFINITIONS, GENERAL, forgetting_columns
from imsm.evaluation.stats import MCNEMAR, METHOD_T, NOT_ESTIMABLE, method_interval, reported_p

SOURCE = ("method-level intervals restated by scripts/restate_stats.py from the stored per-run values and "
          "examples-only intervals (the per-example predictions were not kept); NLL comparisons are of "
          "answer_nll_example_mean, the definition they were computed with")


def _per_run(label: dict[str, Any], task_keys: list[tuple[str, str]]) -> np.ndarray | None:
    """Each run's value averaged over ``task_keys`` ((task, metric) pairs), None when one is missing."""
    values = [label["tasks"].get(task, {}).get(key) for task, key in task_keys]
    if any(v is None for v in values):
        return None
    return np.mean([v["per_run"] for v in values], axis=0)


def _seed_term(label: dict[str, Any], per_run: np.ndarray) -> tuple[float, int] | None:
    if label["runs"] == [None]:  # the untuned model: deterministic, no seed
        return 0.0, 1
    if len(per_run) < 2:
        return None
    return float(np.var(per_run, ddof=1)) / len(per_run), len(per_run)


def restate(records: dict[str, Any]) -> dict[str, Any]:
    if "intervals" in records:
        raise ValueError("already restated (it has an 'intervals' block)")
    for label in records["labels"].values():
        for metrics in label["tasks"].values():
            old_mean, old_pooled = metrics.pop("answer_nll", None), metrics.pop("answer_nll_per_token", None)
            if old_mean is not None:
                metrics["answer_nll_example_mean"] = old_mean
            if old_pooled is not None:
                metrics["answer_nll"] = old_pooled
    z = scipy_stats.norm.ppf(0.5 + records["confidence"] / 2.0)
    general = forgetting_columns(records["target"])[1:]
    restated = []
    for rec in records["comparisons"]:
        key = "answer_nll_example_mean" if rec["measure"] == "answer_nll" else None
        a, b = records["labels"][rec["a"]], records["labels"][rec["b"]]
        if rec["column"] == GENERAL:  # "average of contain,accuracy,contain": one metric per general task
            listed = rec["metric"].removeprefix("average of ").split(",")
            keys = [(t, key or m) for t, m in zip(general, listed, strict=True) if t in a["tasks"]]
            metric = "average of " + ",".join(key or m for m in listed)
        else:
            keys = [(rec["column"], key or rec["metric"])]
            metric = keys[0][1]
        runs_a, runs_b = _per_run(a, keys), _per_run(b, keys)
        if runs_a is None or runs_b is None:
            raise ValueError(f"{rec['a']} vs {rec['b']} on {rec['column']}: per-run values missing")
        if not np.isclose(runs_a.mean() - runs_b.mean(), rec["delta"], atol=1e-9):
            raise ValueError(f"{rec['a']} vs {rec['b']} on {rec['column']}: per-run values do not give the change")
        out = {"a": rec["a"], "b": rec["b"], "measure": rec["measure"], "metric": metric, "column": rec["column"],
               "delta": rec["delta"], "examples_low": rec["low"], "examples_high": rec["high"], "method_low": None,
               "method_high": None, "method_note": None, "p": None, "test": None}
        seed_a, seed_b = _seed_term(a, runs_a), _seed_term(b, runs_b)
        if seed_a is None or seed_b is None:
            out["method_note"] = NOT_ESTIMABLE
            if rec.get("p_mcnemar") is not None:  # two single runs: the vote of one run is the run
                out["p"], out["test"] = reported_p(rec["p_mcnemar"]), MCNEMAR
        else:
            variance = ((rec["high"] - rec["low"]) / (2.0 * z)) ** 2
            out["method_low"], out["method_high"], p = method_interval(rec["delta"], variance, [seed_a, seed_b])
            out["p"] = reported_p(p)
            out["test"] = METHOD_T
        restated.append(out)
    notes = records.pop("notes", [])
    labels = records.pop("labels")
    records.pop("comparisons")
    return records | {"intervals": INTERVALS, "definitions": DEFINITIONS, "method_source": SOURCE, "labels": labels,
                      "comparisons": restated, "notes": notes}


def tradeoff_points(records: dict[str, Any]) -> list[dict[str, Any]]:
    """The learning-forgetting chart's numbers from a restated file: per label its change against the baseline
    with the headline interval (method-level, else examples-only), per run its own change (``charts``' layout)."""
    baseline, target = records["labels"][records["baseline"]], records["target"]
    general = [t for t in forgetting_columns(target)[1:] if t in baseline["tasks"]]
    found = {(r["a"], r["b"], r["measure"], r["column"]): r for r in records["comparisons"]}
    points = []
    for name, label in records["labels"].items():
        if name == records["baseline"]:
            continue
        for measure in ("primary", "answer_nll"):
            sign, factor = (-1.0, 1.0) if measure == "answer_nll" else (1.0, 100.0)
            dx, dy = found.get((name, records["baseline"], measure, target)), \
                found.get((name, records["baseline"], measure, GENERAL))
            if dx is None or dy is None:
                continue
            kind = "method" if dx["method_low"] is not None and dy["method_low"] is not None else "examples"
            box = {}
            for axis, rec in (("x", dx), ("y", dy)):
                low, high = (rec["method_low"], rec["method_high"]) if kind == "method" else \
                    (rec["examples_low"], rec["examples_high"])
                box[axis] = sign * factor * rec["delta"]
                box[f"{axis}_low"], box[f"{axis}_high"] = sorted((sign * factor * low, sign * factor * high))
            points.append({"label": name, "run": "mean", "measure": measure, "interval": kind} | box)
            key = (lambda t: "answer_nll_example_mean") if measure == "answer_nll" else \
                (lambda t, m=dx["metric"], g=dy["metric"]: m if t == target else
                 g.removeprefix("average of ").split(",")[forgetting_columns(target)[1:].index(t)])
            x_runs = _per_run(label, [(target, key(target))]) - _per_run(baseline, [(target, key(target))])
            y_runs = _per_run(label, [(t, key(t)) for t in general]) - \
                _per_run(baseline, [(t, key(t)) for t in general])
            if len(x_runs) > 1:
                points += [{"label": name, "run": run, "measure": measure, "interval": None,
                            "x": sign * factor * x, "y": sign * factor * y, "x_low": None, "x_high": None,
                            "y_low": None, "y_high": None}
                           for run, x, y in zip(label["runs"], x_runs, y_runs, strict=True)]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--chart", action="store_true",
                        help="Also redraw FILE's tradeoff chart (FILE with _stats.json -> _tradeoff.png) from it.")
    args = parser.parse_args()
    for path in args.files:
        records = json.loads(path.read_text())
        if "intervals" not in records:
            records = restate(records)
            path.write_text(json.dumps(records, indent=1) + "\n")
            print(f"restated {path}")
        if args.chart:
            chart = path.with_name(path.name.replace("_stats.json", "_tradeoff.png"))
            plot_tradeoff(tradeoff_points(records), records["target"], chart, nll="example means")
            print(f"drew {chart}")


if __name__ == "__main__":
    main()
