"""``evaluate.py --measures``: the measures of ``imsm.evaluation.measures`` on every evaluated model, and their report.

    python evaluate.py --untuned --run lora/s1 lora/s2 imsm/s1 imsm/s2 --labels untuned,LoRA,LoRA,IMSM-LoRA,IMSM-LoRA \
        --adapter_scale 0.25,0.5,0.75,1 --tasks mrpc,webq,freebaseqa,multirc --target mrpc ... \
        --measures auroc,general_nll,kl --general_text data/general_text.jsonl \
        --threshold_file mrpc=DATA/mrpc/train.jsonl --frontier IMSM-LoRA:LoRA

* ``auroc``: every yes/no task's rows (``--measure_max_examples`` of them, default all) scored by their log-odds;
  AUROC, and with ``--threshold_file TASK=FILE`` MCC and balanced accuracy at the threshold each run chooses on
  ``--threshold_examples`` rows of FILE that no evaluated run trained on (the rows after the most any run's
  ``run_args.json`` says it took from that file); FILE may not be the task's test file.
* ``general_nll``: the passages of ``--general_text`` (``scripts/build_general_text.py``), NLL per token.
* ``kl``: KL(untuned ‖ model) over the untuned model's greedy answers (at most ``--kl_max_new_tokens`` tokens) to the
  first ``--kl_examples`` prompts of every task but the target. The untuned model stays loaded beside each model.

Each model's per-example values go to ``OUTPUT_DIR/<label>[/run<k>]/measures.json``. The report (``measures.md``,
a section appended to ``summary.md`` and ``forgetting.md``, the key ``measures`` of ``stats.json``) gives each label's
value (mean ± sd over its runs) and its change against the untuned model with both intervals of the statistics
module: examples-only (paired bootstrap, runs fixed) and method-level (plus the seed variance, Welch t). With
``--frontier IMSM:LORA`` and a yes/no target, ``frontier.md``/``frontier.png`` give IMSM's forgetting minus the LoRA
curve at IMSM's target gain (``imsm.evaluation.frontier``); the curve's points are the untuned model (LoRA at scale
0) and every label LORA or LORA@... (``--adapter_scale`` rows, checkpoints labelled e.g. LoRA@step30).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imsm.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from imsm.data import Truncation, read_jsonl
from imsm.evaluation.frontier import LabelRuns, frontier_gap
from imsm.evaluation.generation import gather_shards, shard
from imsm.evaluation.measures import (
    auroc_resampled,
    balanced_accuracy_from_counts,
    choose_threshold,
    confusion,
    continuation_nll,
    general_text_pairs,
    gold_yes,
    greedy_pairs,
    kl_to_reference,
    mcc_from_counts,
    read_general_text,
    yes_no_log_odds,
)
from imsm.evaluation.metrics import get_task
from imsm.evaluation.planning import read_task
from imsm.evaluation.results import read_json
from imsm.evaluation.scoring import FrozenMemo
from imsm.evaluation.stats import method_interval, resample_counts
from imsm.loader import load_backbone
from imsm.run_folder import RUN_ARGS, resolve
from imsm.templates import build_template

logger = logging.getLogger(__name__)

MEASURES = ("auroc", "general_nll", "kl")
TARGET_MEASURES = ("auroc", "mcc", "balanced_accuracy")
MEASURE_TITLES = {
    "auroc": "AUROC of the yes/no log-odds (0.5: the majority class only)",
    "mcc": "MCC at the threshold chosen on held-out training rows",
    "balanced_accuracy": "balanced accuracy at the threshold chosen on held-out training rows",
    "general_nll": "NLL of held-out natural text, nats per token",
    "kl": "KL(untuned ‖ model) per greedy answer token of the untuned model",
}
MEASURES_FILE = "measures.json"
AVERAGE = "average"  # the column of KL's mean over its tasks (each task weighs the same, as in the frontier)
CONFIDENCE = 0.95


@dataclass
class MeasureArguments:
    measures: str | None = field(default=None, metadata={
        "help": f"Comma-separated measures beside the task metrics: {', '.join(MEASURES)} (see docs/measures.md)."})
    general_text: str | None = field(default=None, metadata={
        "help": "JSONL passages for general_nll (build it with scripts/build_general_text.py)."})
    general_examples: int | None = field(default=None, metadata={"help": "Only the first N passages."})
    general_prefix_tokens: int = field(default=32, metadata={
        "help": "A passage's first tokens, the query IMSM's gate reads; the rest is scored."})
    threshold_file: list[str] = field(default_factory=list, metadata={
        "help": "TASK=TRAIN.jsonl: choose the yes/no threshold on rows of this training file that no run trained "
                "on (repeatable).", "action": "extend"})
    threshold_examples: int = field(default=500, metadata={"help": "Held-out training rows a threshold is chosen on."})
    measure_max_examples: int | None = field(default=None, metadata={
        "help": "Rows of each yes/no task scored by auroc (default: all; --max_examples limits decoding only)."})
    kl_examples: int = field(default=200, metadata={"help": "Prompts per non-target task for kl."})
    kl_max_new_tokens: int = field(default=32, metadata={"help": "Longest untuned greedy answer kl is read over."})
    frontier: str | None = field(default=None, metadata={
        "help": "IMSM:LORA labels: IMSM's forgetting minus the curve of LORA's scales/checkpoints at IMSM's gain."})

    def __post_init__(self) -> None:
        self.names = [m.strip() for m in (self.measures or "").split(",") if m.strip()]
        unknown = sorted(set(self.names) - set(MEASURES))
        if unknown:
            raise ValueError(f"--measures {self.measures!r}: unknown {unknown}; choose from {list(MEASURES)}")
        if "general_nll" in self.names and not self.general_text:
            raise ValueError("--measures general_nll needs --general_text FILE (scripts/build_general_text.py)")
        self.thresholds = {}
        for item in self.threshold_file:
            task, sep, path = item.partition("=")
            if not sep or not path or get_task(task).kind != "yesno":
                raise ValueError(f"--threshold_file {item!r}: expected TASK=FILE for a yes/no task")
            self.thresholds[task] = Path(path)
        if self.thresholds and "auroc" not in self.names:
            raise ValueError("--threshold_file applies to --measures auroc")
        if self.frontier is not None:
            imsm, sep, lora = self.frontier.partition(":")
            if not sep or not imsm or not lora:
                raise ValueError(f"--frontier {self.frontier!r}: expected IMSM_LABEL:LORA_LABEL")
            if "auroc" not in self.names or not {"general_nll", "kl"} & set(self.names):
                raise ValueError("--frontier needs --measures auroc and general_nll and/or kl")
            self.frontier_labels = (imsm, lora)
        for name in ("threshold_examples", "kl_examples", "kl_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")


def trained_rows(run_dir: Path, path: Path) -> int:
    """How many leading rows of ``path`` the run trained on (0 when it trained on another file)."""
    args_file = resolve(run_dir) / RUN_ARGS
    if not args_file.is_file():
        raise ValueError(f"--threshold_file: {run_dir} has no {RUN_ARGS}, so which rows it trained on is unknown")
    args = json.loads(args_file.read_text())
    if not args.get("train_file") or Path(args["train_file"]).resolve() != path.resolve():
        return 0
    return args["max_train_examples"] if args.get("max_train_examples") is not None else -1


class MeasureSession:
    """Reads and checks the measures' inputs before anything is evaluated, measures each model while it is loaded
    (``measure``, called by ``runner.evaluate_model``), and writes the report (``report``)."""

    def __init__(self, margs: MeasureArguments, eval_args, plans, files: dict[str, Path], dtype, device) -> None:
        self.margs, self.eval_args, self.dtype, self.device = margs, eval_args, dtype, device
        if not any(p.run_dir is None for p in plans):
            raise ValueError("--measures reports each change against the untuned model: add --untuned")
        self.target = eval_args.target
        names = margs.names
        yes_no = [t for t in eval_args.task_names if get_task(t).kind == "yesno"]
        self.rows = {t: read_task(t, files[t], margs.measure_max_examples) for t in yes_no} if "auroc" in names else {}
        self.threshold_rows: dict[str, list[dict]] = {}
        for task, path in margs.thresholds.items():
            if task not in self.rows:
                raise ValueError(f"--threshold_file {task}=...: {task} is not an evaluated yes/no task")
            if path.resolve() == files[task].resolve():
                raise ValueError(f"--threshold_file {task}={path} is the task's test file; give a training file")
            used = [trained_rows(p.run_dir, path) for p in plans if p.run_dir is not None]
            if -1 in used:
                raise ValueError(f"--threshold_file {task}={path}: a run trained on all of it; no row is held out")
            start = max(used, default=0)
            held = read_jsonl(path)[start : start + margs.threshold_examples]
            if not held:
                raise ValueError(f"--threshold_file {task}={path}: no rows after the first {start} (trained on)")
            gold_yes(held, str(path))
            self.threshold_rows[task] = held
            logger.info("%s: threshold chosen on rows %d-%d of %s (no run trained on them)", task, start + 1,
                        start + len(held), path)
        self.passages = None
        if "general_nll" in names:
            self.passages = read_general_text(margs.general_text)[: margs.general_examples]
        self.kl_rows = {t: read_task(t, files[t], margs.kl_examples) for t in eval_args.task_names
                        if t != self.target} if "kl" in names else {}
        self.reference_path = next((p.model_path for p in plans if p.run_dir is None), plans[0].model_path)
        self.reference_template = eval_args.prompt_template or "raw"
        self._reference = None
        self._kl_pairs: dict[str, list] | None = None
        self.results: dict[str, list[dict]] = {}  # label -> each run's measures (rank 0)
        # the untuned backbone's hidden states: IMSM models read their frozen memory from it (scoring.FrozenMemo)
        self.memo = FrozenMemo()

    def _untuned(self, rank: int, world_size: int):
        """The untuned model and this rank's greedy pairs of every KL task, built once."""
        if self._reference is None:
            model, tokenizer, _ = load_backbone(self.reference_path, self.dtype, self.eval_args.attn_implementation,
                                                self.eval_args.trust_remote_code)
            self._reference = (model.to(self.device).eval(), tokenizer)
            template = build_template(self.reference_template, tokenizer, self.eval_args.system_prompt)
            self._kl_pairs = {}
            for task, rows in self.kl_rows.items():
                length = min(get_task(task).max_new_tokens, self.margs.kl_max_new_tokens)
                self._kl_pairs[task] = greedy_pairs(self._reference[0], tokenizer, template,
                                                    shard(rows, rank, world_size), self.eval_args.max_input_length,
                                                    length, self.eval_args.batch_size)
        return self._reference[0], self._kl_pairs

    def measure(self, plan, model, tokenizer, template, rank: int, world_size: int) -> None:
        """Every measure of one loaded model on this rank's shard; rank 0 gathers and writes its measures.json."""
        args, batch = self.eval_args, self.eval_args.batch_size
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: dict = {"label": plan.label, "folder": plan.folder, "untuned": plan.run_dir is None}

        def gathered(values: np.ndarray, total: int) -> list | None:
            return gather_shards(np.asarray(values).tolist(), total, rank, world_size)

        started = time.perf_counter()
        memo, record = self.memo, plan.run_dir is None  # the untuned model fills the memo, IMSM models read it
        memo.start_model()

        def progress(what: str, n: int) -> None:  # a line per measure: the long part of a study shows it is moving
            if rank == 0:
                logger.info("%s: %s on %d rows done (%.0f s for this model so far)", plan.folder, what, n,
                            time.perf_counter() - started)

        if self.rows:
            out["yes_no"] = {}
            for task, rows in self.rows.items():
                truncation = Truncation(f"task {task} (measures)")
                scores = yes_no_log_odds(model, template, shard(rows, rank, world_size), args.max_input_length, batch,
                                         truncation, memo, record)
                truncation.warn()
                entry = {"log_odds": gathered(scores, len(rows)), "gold_yes": gold_yes(rows).tolist()}
                if task in self.threshold_rows:
                    held = self.threshold_rows[task]
                    entry["train_log_odds"] = gathered(yes_no_log_odds(
                        model, template, shard(held, rank, world_size), args.max_input_length, batch, None, memo,
                        record), len(held))
                    entry["train_gold_yes"] = gold_yes(held).tolist()
                out["yes_no"][task] = entry
                progress(f"{task} yes/no log-odds", len(rows) + len(self.threshold_rows.get(task, ())))
        if self.passages is not None:
            pairs = general_text_pairs(tokenizer, shard(self.passages, rank, world_size),
                                       self.margs.general_prefix_tokens, args.max_input_length)
            out["general_nll"] = gathered(continuation_nll(model, pairs, batch, pad_id, memo, record),
                                          len(self.passages))
            progress("general-text NLL", len(self.passages))
        if self.kl_rows:
            reference, kl_pairs = self._untuned(rank, world_size)
            if plan.run_dir is None:  # the untuned model against itself: 0 at every position
                out["kl"] = {t: gathered(np.c_[np.zeros(len(p)), [len(y) for _, y in p]], len(self.kl_rows[t]))
                             for t, p in kl_pairs.items()}
            else:
                out["kl"] = {t: gathered(kl_to_reference(reference, model, p, batch, pad_id, memo),
                                         len(self.kl_rows[t])) for t, p in kl_pairs.items()}
            progress("KL to the untuned model", sum(len(rows) for rows in self.kl_rows.values()))
        if memo.reads:
            logger.info("%s: %d batches read their frozen memory from the untuned model's pass (rank %d)", plan.folder,
                        memo.reads, rank)
        if rank == 0:
            atomic_write_json(Path(args.output_dir) / plan.folder / MEASURES_FILE, out)
            self.results.setdefault(plan.label, []).append(out)

    def report(self, out_dir: str | Path, resamples: int, seed: int) -> dict[str, Path]:
        """measures.md (+ frontier.md/.png), the sections of summary.md and forgetting.md, stats.json's key."""
        return write_measures_report(self.results, self.target, self.margs, out_dir, resamples, seed)


# --------------------------------------------------------------------------------------------------- statistics


@dataclass
class Measure:
    """One label's measure on one task: ``fn(counts (B, n)) -> (runs, B)`` evaluates each run on drawn examples."""

    n: int
    fn: Callable[[np.ndarray], np.ndarray]
    seeded: bool

    def per_run(self) -> np.ndarray:
        return self.fn(np.ones((1, self.n)))[:, 0]


def _ratio(components: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """(runs, n, 2) (sum, count) -> pooled per-token value of each run on each draw."""
    return lambda c: np.stack([(c @ comp[:, 0]) / (c @ comp[:, 1]) for comp in components])


def _auroc(scores: np.ndarray, positive: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda c: np.stack([auroc_resampled(s, positive, c) for s in scores])


def _at_threshold(scores, positive, thresholds, metric) -> Callable[[np.ndarray], np.ndarray]:
    """MCC or balanced accuracy of each run at its own threshold, on drawn examples."""
    confusions = [confusion(s, positive, t) for s, t in zip(scores, thresholds, strict=True)]
    return lambda c: np.stack([metric(*(c @ conf).T) for conf in confusions])


def change(a: Measure, b: Measure, counts: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """value(a) − value(b) with the examples-only and method-level intervals (``imsm.evaluation.stats``)."""
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
    interval = method_interval(delta, float(np.nanvar(samples, ddof=1)), terms, confidence)
    out["method_low"], out["method_high"], out["p"] = (float(x) for x in interval)
    return out


MEASURE_KEYS = {"auroc": "yes_no", "general_nll": "general_nll", "kl": "kl"}  # --measures name -> measures.json key


def read_measures(out_dir: str | Path, folders: list[str] | None = None) -> dict[str, list[dict]]:
    """label -> its runs' saved measures (each model folder's ``measures.json``), in the order of ``folders`` (the
    report inputs' model folders) or else by label and run number; {} for a report evaluated without --measures."""
    out_dir = Path(out_dir)
    if folders is None:
        def order(path: Path) -> tuple:
            parts = path.relative_to(out_dir).parts
            return parts[0], int(parts[1].removeprefix("run")) if len(parts) == 3 else 0

        files = sorted([*out_dir.glob(f"*/{MEASURES_FILE}"), *out_dir.glob(f"*/run*/{MEASURES_FILE}")], key=order)
    else:
        files = [out_dir / folder / MEASURES_FILE for folder in folders]
        found = [path.is_file() for path in files]
        if any(found) and not all(found):
            missing = ", ".join(str(path) for path, ok in zip(files, found, strict=True) if not ok)
            raise FileNotFoundError(f"{out_dir}: the measures of some models are missing ({missing}); was the "
                                    "evaluation interrupted? Evaluate those models again")
        files = [path for path, ok in zip(files, found, strict=True) if ok]
    results: dict[str, list[dict]] = {}
    for path in files:
        record = read_json(path)
        results.setdefault(record["label"], []).append(record)
    return results


def measured_names(record: dict) -> list[str]:
    """The --measures a saved measures.json holds."""
    return [name for name, key in MEASURE_KEYS.items() if key in record]


def saved_measures(out_dir: str | Path, folders: list[str] | None,
                   frontier: str | None) -> tuple[dict[str, list[dict]], MeasureArguments] | None:
    """The measures an evaluation saved (``read_measures``) and the arguments that report them again with
    ``write_measures_report`` (``evaluate.py --report_only``); None for a report evaluated without --measures."""
    results = read_measures(out_dir, folders)
    if not results:
        if frontier:
            raise ValueError(f"--report_only {out_dir}: --frontier needs the models' measures, and the folder has "
                             "none (evaluated without --measures)")
        return None
    first = results["untuned" if "untuned" in results else next(iter(results))][0]
    return results, MeasureArguments(measures=",".join(measured_names(first)), general_text="(saved)",
                                     frontier=frontier)


def _label_measures(runs: list[dict], target: str) -> dict[str, dict[str, Measure]]:
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
        table["kl"][AVERAGE] = _average(list(table["kl"].values()))
    return table


def _average(measures: list[Measure]) -> Measure:
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


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_change(c: dict) -> str:
    text = f"{c['delta']:+.4f} [{c['examples_low']:+.4f}, {c['examples_high']:+.4f}]"
    if c["method_low"] is not None:
        text += f" [{c['method_low']:+.4f}, {c['method_high']:+.4f}] p={c['p']:.3g}"
    return text


def write_measures_report(results: dict[str, list[dict]], target: str, margs: MeasureArguments,
                          out_dir: str | Path, resamples: int, seed: int) -> dict[str, Path]:
    out_dir = Path(out_dir)
    if "untuned" not in results:
        raise ValueError("--measures reports changes against the untuned model: add --untuned")
    tables = {label: _label_measures(runs, target) for label, runs in results.items()}
    base = tables["untuned"]
    rng = np.random.default_rng(seed)
    counts = {(name, task): c for name, by_task in base.items()
              for task, c in task_counts(by_task, resamples, rng).items()}
    legend = ("Value: mean ± sd over a label's runs. Change against the untuned model: estimate [examples-only 95% "
              "interval] [method-level 95% interval] p (the method-level interval adds the seed variance; see "
              "docs/evaluation.md#measures).")
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
                c = change(m, by_task[task], counts[(name, task)])
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
                f"[method-level {_fmt(gap.method_low)}, {_fmt(gap.method_high)}] p = {_fmt(gap.p, 3)}; IMSM at "
                f"(gain {gap.imsm[0]:+.4f}, forgetting {gap.imsm[1]:+.4f}); curve "
                + ", ".join(f"({g:+.4f}, {f:+.4f})" for g, f in gap.curve)
                + ("; " + "; ".join(gap.notes) if gap.notes else ""), ""]
        stats["frontier"] = {k: v.to_dict() for k, v in frontier.items()}
    target_part = [line for k, v in sections.items() if k in TARGET_MEASURES for line in v]
    forgetting_part = [line for k, v in sections.items() if k not in TARGET_MEASURES for line in v]
    paths = {"measures_md": out_dir / "measures.md"}
    atomic_write_text(paths["measures_md"], "\n".join(["# Measures", "", legend, "", *target_part,
                                                        *forgetting_part]))
    # the target's measures beside the task metrics, the forgetting measures beside the forgetting table
    for name, part, title in (("summary.md", target_part, "Target learning without a threshold"),
                              ("forgetting.md", forgetting_part, "Forgetting without the answer format")):
        path = out_dir / name
        if part and path.is_file():
            atomic_write_text(path, path.read_text().rstrip("\n") + "\n\n" + "\n".join(
                [f"## {title} (--measures)", "", legend, "", *part]) + "\n")
    stats_path = out_dir / "stats.json"
    record = read_json(stats_path) if stats_path.is_file() else {}
    atomic_write_json(stats_path, record | {"measures": stats})
    if frontier:
        paths["frontier_png"] = plot_frontier(frontier, target, out_dir / "frontier.png")
    return paths


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


def plot_frontier(frontier: dict, target: str, path: Path) -> Path:
    """One panel per forgetting measure: the LoRA points, their lower curve, IMSM's point and its gap."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(frontier), 4.2))
    FigureCanvasAgg(fig)
    for ax, (measure, gap) in zip(np.atleast_1d(fig.subplots(1, len(frontier))), frontier.items(), strict=True):
        for label, (g, f) in gap.points.items():
            ax.scatter([g], [f], color="tab:blue", s=18)
            ax.annotate(label, (g, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if gap.curve:
            ax.plot(*zip(*gap.curve, strict=True), color="tab:blue", label="LoRA curve (lower frontier)")
        ax.scatter([gap.imsm[0]], [gap.imsm[1]], color="tab:red", marker="*", s=120, zorder=3,
                   label="IMSM" + ("" if gap.gap is None else f" (gap {gap.gap:+.3f})"))
        ax.set_xlabel(f"target gain: AUROC change on {target}")
        ax.set_ylabel({"general_nll": "general-text NLL change (nats/token)", "kl": "KL(untuned ‖ model)"}[measure])
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def free_reference(session: MeasureSession | None) -> None:
    """Drop the untuned model kept for KL."""
    if session is not None and session._reference is not None:
        session._reference = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
