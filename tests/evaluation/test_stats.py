"""Paired bootstrap intervals, McNemar's exact test and seed groups against hand-made cases and synthetic data; the
report's interval cells, comparisons, stats files and learning-forgetting chart."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from imsm.evaluation.metrics import ExampleScores, compute_metrics, example_scores
from imsm.evaluation.report import RunResult, comparison_table, forgetting_table, write_report
from imsm.evaluation.stats import LabelScores, mcnemar, mcnemar_exact, paired_difference, resample_counts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mean_scores(*runs) -> LabelScores:
    return LabelScores("mean", np.asarray(runs, dtype=float)[:, :, None])


def test_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.random(50)
    diff = paired_difference([(_mean_scores(b + 0.1), _mean_scores(b))], [resample_counts(50, 2000, rng)])
    assert diff.delta == pytest.approx(0.1)
    assert diff.low == pytest.approx(0.1) and diff.high == pytest.approx(0.1)


def test_hand_made_interval_contains_the_mean_and_has_the_normal_width():
    # 200 paired outcomes: A right on 120, B right on 90; 50 discordant in A's favour, 20 in B's
    a = np.array([1] * 70 + [1] * 50 + [0] * 20 + [0] * 60, dtype=float)
    b = np.array([1] * 70 + [0] * 50 + [1] * 20 + [0] * 60, dtype=float)
    diff = paired_difference([(_mean_scores(a), _mean_scores(b))],
                             [resample_counts(200, 4000, np.random.default_rng(1))])
    assert diff.delta == pytest.approx(0.15)
    assert diff.covers(0.15)
    d = a - b
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # the normal-approximation half width, 0.0535
    assert (diff.high - diff.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert diff.low > 0  # a 30-example discordance imbalance out of 70 is no noise


def test_mcnemar_on_hand_counted_tables():
    # b = 1, c = 8: p = 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512
    assert mcnemar_exact(1, 8) == pytest.approx(20 / 512)
    assert mcnemar_exact(8, 1) == pytest.approx(20 / 512)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # b = 0, c = 6: 2 / 64
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    a = _mean_scores([1, 1, 0, 0, 1, 1, 1])
    b = _mean_scores([1, 0, 1, 1, 1, 1, 1])
    assert mcnemar(a, b) == pytest.approx(mcnemar_exact(1, 2))
    # seed groups: an example counts as right when more than half of the runs get it right
    group = _mean_scores([1, 1, 0], [1, 0, 0], [0, 1, 0])  # majority right: yes, yes, no
    single = _mean_scores([0, 0, 0])
    assert mcnemar(group, single) == pytest.approx(mcnemar_exact(2, 0))


@pytest.mark.parametrize("confidence,low,high", [(0.95, 0.915, 0.985), (0.5, 0.40, 0.60)])
def test_coverage_on_synthetic_paired_data(confidence, low, high):
    """300 synthetic studies of 120 paired 0/1 outcomes with a known mean difference: about 95% of the 95% intervals
    contain it (and about half of the 50% intervals, so the tolerance cannot pass by accident)."""
    rng = np.random.default_rng(7)
    p_both, p_a_only, p_b_only = 0.45, 0.20, 0.10  # P(A right) - P(B right) = 0.10
    truth = p_a_only - p_b_only
    covered = 0
    trials = 300
    for _ in range(trials):
        u = rng.random(120)
        a = (u < p_both + p_a_only).astype(float)
        b = ((u < p_both) | ((u >= p_both + p_a_only) & (u < p_both + p_a_only + p_b_only))).astype(float)
        diff = paired_difference([(_mean_scores(a), _mean_scores(b))], [resample_counts(120, 1000, rng)],
                                 confidence)
        covered += diff.covers(truth)
    assert low <= covered / trials <= high


def test_seed_group_value_spread_and_resampling():
    runs = [[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    group = _mean_scores(*runs)
    assert group.per_run().tolist() == [0.75, 0.5, 1.0]
    assert group.value() == pytest.approx(0.75)
    assert group.spread() == pytest.approx(np.std([0.75, 0.5, 1.0], ddof=1))
    # a resample that draws every example once is the original data
    assert group.resampled(np.ones((1, 4))) == pytest.approx([0.75])
    # one that draws examples 1 and 2 twice each: the runs score 1/2, 1/2 and 1 -> 2/3
    assert group.resampled(np.array([[0, 2, 2, 0]])) == pytest.approx([2 / 3])


def test_mcc_and_f1_components_reproduce_the_metrics():
    preds = ["yes", "no", "yes", "maybe", "no", "yes", "no", "yes"]
    golds = ["yes", "no", "no", "yes", "yes", "yes", "no", "no"]
    for task in ("cola", "mrpc", "multirc"):
        metrics = compute_metrics(task, preds, golds)
        scores = example_scores(task, preds, golds)
        for name, (kind, comp) in scores.components.items():
            whole = LabelScores(kind, comp[None])
            assert whole.value() == pytest.approx(metrics[name])
            assert whole.resampled(np.ones((1, len(preds)))) == pytest.approx([metrics[name]])
            rows = np.array([0, 2, 4, 6])
            assert scores.value(name, rows) == pytest.approx(
                compute_metrics(task, [preds[i] for i in rows], [golds[i] for i in rows])[name])


# ------------------------------------------------------------------------------------------------------- report


def _run(label, hits_webq, hits_mrpc, nll_webq, run=None, template="chat"):
    scores = {
        "webq": ExampleScores({"contain": ("mean", np.asarray(hits_webq, float)[:, None]),
                               "answer_nll": ("mean", np.asarray(nll_webq, float)[:, None])}),
        "mrpc": ExampleScores({"accuracy": ("mean", np.asarray(hits_mrpc, float)[:, None]),
                               "answer_nll": ("mean", 1.0 - 0.5 * np.asarray(hits_mrpc, float)[:, None])}),
    }
    metrics = {task: {name: s.value(name) for name in s.components} for task, s in scores.items()}
    return RunResult(label, template, metrics, scores, run)


def _rows(markdown):
    lines = markdown.strip().splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


@pytest.fixture
def study():
    rng = np.random.default_rng(3)
    n = 60
    base_w, base_m = rng.random(n) < 0.5, rng.random(n) < 0.4
    untuned = _run("untuned", base_w, base_m, rng.random(n) + 2.0)
    lora = [_run("LoRA", base_w & (rng.random(n) < 0.6), np.ones(n), rng.random(n) + 2.5, f"lora/{s}")
            for s in range(3)]
    imsm = [_run("IMSM-LoRA", base_w & (rng.random(n) < 0.9), np.ones(n), rng.random(n) + 2.1, f"imsm/{s}")
            for s in range(3)]
    return [untuned, *lora, *imsm]


def test_forgetting_cells_carry_seed_spread_and_paired_intervals(study):
    md = forgetting_table(study, "mrpc")
    header, base, lora, _ = _rows(md)
    assert header == ["Run", "Template", "MRPC", "WebQ", "MultiRC", "FreebaseQA", "Avg (general)"]
    webq = [100 * r.metrics["webq"]["contain"] for r in study[1:4]]
    mean, sd = np.mean(webq), np.std(webq, ddof=1)
    delta = mean - 100 * study[0].metrics["webq"]["contain"]
    cell = lora[3]
    assert cell.startswith(f"{mean:.1f}±{sd:.1f} ({delta:+.1f} [")
    low, high = (float(x) for x in cell.split("[")[1].rstrip("])").split(","))
    assert low <= round(delta, 1) <= high and low < high
    assert lora[4] == "-" and base[3] == f"{100 * study[0].metrics['webq']['contain']:.1f}"


def test_comparison_table_and_stats_files(study, tmp_path):
    md = comparison_table(study, "mrpc", [("IMSM-LoRA", "LoRA")])
    (row,) = _rows(md)[1:]
    assert row[0] == "IMSM-LoRA − LoRA"
    assert row[1].startswith("+0.0 [+0.0, +0.0] p=1")  # both always right on MRPC: identical, no discordance
    assert "p=" in row[2]
    with pytest.raises(ValueError, match="nope"):
        comparison_table(study, "mrpc", [("IMSM-LoRA", "nope")])

    paths = write_report(study, "mrpc", tmp_path, pairs=[("IMSM-LoRA", "LoRA")], resamples=500, seed=1)
    records = json.loads(paths["stats_json"].read_text())
    assert records["bootstrap_resamples"] == 500 and records["labels"]["LoRA"]["runs"] == ["lora/0", "lora/1",
                                                                                         "lora/2"]
    per_run = records["labels"]["LoRA"]["tasks"]["webq"]["contain"]["per_run"]
    assert per_run == [r.metrics["webq"]["contain"] for r in study[1:4]]  # unrounded
    pair = [r for r in records["comparisons"] if (r["a"], r["b"], r["measure"], r["column"])
            == ("IMSM-LoRA", "LoRA", "answer_nll", "webq")]
    expected = np.mean([r.metrics["webq"]["answer_nll"] for r in study[4:]]) - np.mean(
        [r.metrics["webq"]["answer_nll"] for r in study[1:4]])
    assert pair[0]["delta"] == pytest.approx(expected) and pair[0]["low"] < expected < pair[0]["high"]
    assert pair[0]["p_mcnemar"] is None
    assert len(list(csv.reader(paths["stats_csv"].open()))) == 1 + len(records["comparisons"])
    # the chart's numbers: a mean point per label and measure with intervals, a small point per run
    points = list(csv.DictReader(paths["tradeoff_csv"].open()))
    means = [p for p in points if p["run"] == "mean"]
    assert {(p["label"], p["measure"]) for p in means} == {(lab, m) for lab in ("LoRA", "IMSM-LoRA")
                                                          for m in ("primary", "answer_nll")}
    assert sum(p["run"] != "mean" for p in points) == 2 * 3 * 2
    nll_lora = next(p for p in means if p["label"] == "LoRA" and p["measure"] == "answer_nll")
    # NLL rose for LoRA on WebQ (the only general task here): plotted negated, so it sits below zero
    assert float(nll_lora["y"]) < 0 and float(nll_lora["y_low"]) <= float(nll_lora["y"]) <= float(nll_lora["y_high"])
    assert paths["tradeoff_png"].read_bytes().startswith(PNG_SIGNATURE)
    assert "IMSM-LoRA − LoRA" in paths["comparisons_md"].read_text()


def test_paired_scores_must_cover_the_same_examples(study):
    short = _run("short", [1, 0], [1, 1], [2.0, 2.0])
    with pytest.raises(ValueError, match="different numbers of examples"):
        forgetting_table(study + [short], "mrpc")
