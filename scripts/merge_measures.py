"""Merge the ``--measures`` of several finished evaluate.py reports into one measures report: e.g. LoRA at one more
adapter scale, evaluated later, joins the frontier without measuring every other model again.

    python scripts/merge_measures.py --out runs/cpu_study/eval_frontier --target mrpc --frontier IMSM-LoRA:LoRA \
        runs/cpu_study/eval_measures runs/cpu_study/eval_measures_075

It reads each model's ``measures.json`` (``<label>[/run<k>]/``) from every report and writes ``measures.md``,
``frontier.md``/``frontier.png`` and ``stats.json`` (key ``measures``) to ``--out``, exactly as evaluate.py would have
from one evaluation of them all (``imsm.evaluation.report.writer.write_measures_report``). The untuned model's
measures must be the same in every report (the same rows, threshold rows, passages and KL prompts; within 1e-9), else
the reports measured different things and the merge is refused, naming them; so is a label found in two reports, an
unfinished report (``INCOMPLETE``), a report without measures, and one where a model it evaluated has no
``measures.json`` (or a damaged one: the error names the file). Runs of a label keep their ``run<k>`` order, which
must be the same seed order for every label on the curve (as evaluate.py's ``--run_dir`` order is).

``--join`` adds seeds instead: every label (but the untuned model) must be in every report, and its runs are
appended in the order the reports are given, so reports of seeds 1 and of seeds 2-3 (``cpu_study.py --first_seed 2``)
join into one three-seed report whose method-level intervals count every seed. A label missing from some report is
refused, naming it (its runs would no longer line up seed by seed with the others'): leave it out with ``--labels``,
which keeps only the labels given, each with its variants (``LoRA`` keeps ``LoRA@0.5``, ``LoRA@1``, ..., as
``--frontier`` names LoRA's curve; ``untuned`` is always kept) and refuses a name no report holds. A run found twice
(the same report given twice, or a report that measured seed 1 again: equal measures to 1e-9) is refused, as it
would count one seed twice and narrow every method-level interval.

    python scripts/merge_measures.py --join --out runs/forgetting_three_seeds --target mrpc --frontier all:LoRA \
        --labels LoRA,IMSM-LoRA,KL0.1-LoRA runs/forgetting_mrpc/eval_measures runs/forgetting_mrpc_s23/eval_measures

``--out`` is a new folder or an earlier merge (it holds ``merged_from.json``), which is replaced whole once the new
merge is written; any other folder (an evaluation's report, a run) is refused, so nothing in it is overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.atomic import atomic_write_json
from imsm.evaluation.arguments import MeasureArguments, in_family
from imsm.evaluation.report.results import MEASURES_FILE, measured_names, read_measures
from imsm.evaluation.report.writer import read_report_inputs, write_measures_report

MERGED_FROM = "merged_from.json"


def read_report(folder: Path) -> dict[str, list[dict]]:
    """label -> its runs' measures, in run order, of one finished report."""
    if not (folder / "imsm_evaluation.json").is_file():
        raise SystemExit(f"merge_measures: {folder} is not an evaluate.py report (no imsm_evaluation.json)")
    if (folder / "INCOMPLETE").exists():
        raise SystemExit(f"merge_measures: {folder} is unfinished (INCOMPLETE); let the evaluation end first")
    try:  # every model the evaluation planned (report_inputs.json): a missing measures.json is an error, not a gap
        results = read_measures(folder, read_report_inputs(folder).get("folders"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"merge_measures: {e}") from None
    if not results:
        raise SystemExit(f"merge_measures: {folder} holds no {MEASURES_FILE} (evaluated without --measures)")
    return results


def _same(a, b) -> bool:
    """Equal measures: the same keys, and numbers equal within 1e-9."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        try:
            x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        except (TypeError, ValueError):
            return a == b
        return x.shape == y.shape and bool(np.allclose(x, y, rtol=0, atol=1e-9))
    return a == b


def _measured(record: dict) -> dict:
    """A model's measures without its name, folder and training cost: what two evaluations of one model share."""
    return {k: v for k, v in record.items() if k not in ("label", "folder", "untuned", "cost")}


def merge(reports: list[Path], join: bool = False, labels: list[str] | None = None) -> dict[str, list[dict]]:
    """label -> runs of every report; the untuned model once (checked equal in each). Without ``join`` a label may be
    in one report only; with it, every kept label must be in every report and its runs are appended in report order.
    ``labels``: keep only these and their ``NAME@...`` variants (and the untuned model)."""
    twice = [r for k, r in enumerate(reports) if r.resolve() in {q.resolve() for q in reports[:k]}]
    if twice:
        raise SystemExit(f"merge_measures: {twice[0]} is given twice")
    merged: dict[str, list[dict]] = {}
    untuned = None
    found: list[set[str]] = []
    for folder in reports:
        report = read_report(folder)
        if "untuned" not in report:
            raise SystemExit(f"merge_measures: {folder} has no untuned model (evaluate.py --untuned)")
        measured = _measured(report["untuned"][0])
        if untuned is None:
            untuned = (folder, measured)
            merged["untuned"] = report["untuned"]
        elif not _same(untuned[1], measured):
            raise SystemExit(f"merge_measures: the untuned model's measures differ between {untuned[0]} and {folder}: "
                             "the reports were measured on different rows, passages or prompts")
        kept = {label: runs for label, runs in report.items()
                if label != "untuned" and (labels is None or any(in_family(label, name) for name in labels))}
        found.append(set(kept))
        for label, runs in kept.items():
            if label in merged and not join:
                raise SystemExit(f"merge_measures: label {label!r} is in two reports (the second: {folder}); "
                                 "--join appends its runs as more seeds")
            for run in runs:
                if any(_same(_measured(run), _measured(other)) for other in merged.get(label, [])):
                    raise SystemExit(f"merge_measures: {folder}/{run['folder']} has the same measures as a run "
                                     f"of {label!r} already merged: one model measured twice (the same seed?) "
                                     "would count as two seeds")
            merged.setdefault(label, []).extend(runs)
    if labels is not None:
        absent = [name for name in labels if name != "untuned" and not any(in_family(k, name) for k in merged)]
        if absent:
            raise SystemExit(f"merge_measures: --labels {', '.join(absent)}: in none of the reports")
    if join:
        for folder, held in zip(reports, found, strict=True):
            missing = sorted(set(merged) - {"untuned"} - held)
            if missing:
                raise SystemExit(f"merge_measures: --join: {folder} has no {', '.join(missing)}: a label must be in "
                                 "every report for its runs to line up seed by seed; leave it out with --labels")
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path, help="finished evaluate.py --measures output folders")
    p.add_argument("--out", type=Path, required=True, help="the merged report's folder (created)")
    p.add_argument("--target", required=True, help="the task the runs were tuned on")
    p.add_argument("--frontier", default=None, help="IMSM:LORA labels, as evaluate.py's --frontier")
    p.add_argument("--join", action="store_true",
                   help="the reports hold more seeds of the same labels: append each label's runs in report order")
    p.add_argument("--labels", default=None,
                   help="comma-separated labels to keep, each with its NAME@... variants (LoRA keeps LoRA@0.5, "
                        "LoRA@1, ...; the untuned model always is); default: every label")
    p.add_argument("--bootstrap_resamples", type=int, default=2000)
    p.add_argument("--bootstrap_seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.reports) < 2:
        p.error("give at least two reports to merge")
    if args.bootstrap_resamples < 1000:
        p.error(f"--bootstrap_resamples {args.bootstrap_resamples}: use at least 1000")
    if args.out.resolve() in {r.resolve() for r in args.reports}:
        p.error("--out must be a new folder, not one of the reports")
    if args.out.exists() and not (args.out / MERGED_FROM).is_file():
        p.error(f"--out {args.out} exists and is not an earlier merge (no {MERGED_FROM}); give a new folder")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    results = merge(args.reports, args.join, labels)
    names = measured_names(results["untuned"][0])
    margs = MeasureArguments(measures=",".join(names), general_text="(merged)", frontier=args.frontier)
    # written beside --out, then put in its place: a failed merge leaves an earlier one as it was
    staging = args.out.with_name(args.out.name + ".merging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = write_measures_report(results, args.target, margs, staging, args.bootstrap_resamples,
                                    args.bootstrap_seed)
    atomic_write_json(staging / MERGED_FROM, [str(r) for r in args.reports])  # the reports, in the order joined
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    paths = {name: args.out / path.name for name, path in written.items()}
    print(paths["measures_md"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
