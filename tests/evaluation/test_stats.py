"""Paired bootstrap intervals, McNemar's exact test and seed groups against hand-made cases and synthetic data; the
report's interval cells, comparisons, stats files and learning-forgetting chart."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import load_script
from scipy import stats as scipy_stats

from imsm.evaluation.measures.metrics import ExampleScores, compute_metrics, example_scores
from imsm.evaluation.report.comparisons import headline_interval
from imsm.evaluation.report.results import RunResult
from imsm.evaluation.report.tables import comparison_table, forgetting_table
from imsm.evaluation.report.writer import write_report
from imsm.evaluation.stats import P_BELOW, LabelScores, mcnemar, mcnemar_exact, paired_difference, resample_counts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def significant(p: float | str | None, alpha: float = 0.05) -> bool:
    """Whether a reported p-value (``stats.reported_p``) lies below ``alpha`` (``"<1e-4"`` does)."""
    return p is not None and (p == P_BELOW or float(p) < alpha)


def _mean_scores(*runs) -> LabelScores:
    return LabelScores("mean", np.asarray(runs, dtype=float)[:, :, None])


def test_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.random(50)
    diff = paired_difference([(_mean_scores(b + 0.1), _mean_scores(b))], [resample_counts(50, 2000, rng)])
    assert diff.delta == pytest.approx(0.1)
    assert diff.examples_low == pytest.approx(0.1) and diff.examples_high == pytest.approx(0.1)


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
    assert (diff.examples_high - diff.examples_low) / 2 == pytest.approx(half_width, rel=0.1)
    assert diff.examples_low > 0  # a 30-example discordance imbalance out of 70 is no noise


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
    # seed groups are never put to a vote: McNemar compares two single models only
    group = _mean_scores([1, 1, 0], [1, 0, 0], [0, 1, 0])
    with pytest.raises(ValueError, match="method-level"):
        mcnemar(group, _mean_scores([0, 0, 0]))


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


# ------------------------------------------------------------------------------------- method-level intervals


def _seeded_study(rng, n, tasks, seeds, sigma, tau=1.5, shift=0.3):
    """3 (``seeds``) runs of A and of B per task: example difficulty ~ N(0, tau²) logit, each run a seed effect
    ~ N(0, sigma²) logit shared by every task it is scored on, A ``shift`` logit better than B."""
    effect_a, effect_b = rng.normal(0, sigma, seeds), rng.normal(0, sigma, seeds)
    pairs = []
    for _ in range(tasks):
        x = rng.normal(0, tau, n)
        a = rng.random((seeds, n)) < _expit(x + shift + effect_a[:, None])
        b = rng.random((seeds, n)) < _expit(x + effect_b[:, None])
        pairs.append((_mean_scores(*a), _mean_scores(*b)))
    return pairs


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _method_truth(sigma, tau=1.5, shift=0.3):
    """E over examples and seeds of A's accuracy minus B's, by Gauss-Hermite quadrature over both normals."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    logit = tau * nodes[:, None] + sigma * nodes[None, :]
    both = weights[:, None] * weights[None, :]
    return float(np.sum(both * (_expit(logit + shift) - _expit(logit))))


@pytest.mark.parametrize("tasks,trials", [(1, 300), (3, 150)])
def test_method_level_interval_covers_the_method_truth_across_seeds(tasks, trials):
    """3 vs 3 seeds, n = 1,000, a seed effect of 0.2 logit (about 3 points of seed SD): the method-level 95%
    interval covers the method-level truth at least 93% of the time, for one task and for a 3-task average whose
    seeds are shared; the examples-only interval, which holds the runs fixed, covers it far less often."""
    rng = np.random.default_rng(16)
    truth = _method_truth(0.2)
    method = examples = 0
    for _ in range(trials):
        pairs = _seeded_study(rng, 1000, tasks, 3, 0.2)
        diff = paired_difference(pairs, [resample_counts(1000, 400, rng) for _ in pairs])
        method += diff.method_covers(truth)
        examples += diff.covers(truth)
        assert diff.test == "method-level t" and diff.p is not None
    assert method / trials >= 0.93
    assert examples / trials <= 0.80


def test_method_level_interval_is_welchs_t_when_examples_add_no_variance():
    """Runs whose every example scores the run's value: the examples-only interval has zero width, and the
    method-level interval and p are Welch's t-test on the per-run values (scipy as the reference)."""
    a_runs, b_runs = [0.61, 0.55, 0.66], [0.52, 0.50, 0.57, 0.49]
    a = LabelScores("mean", np.full((3, 40, 1), 0.0) + np.asarray(a_runs)[:, None, None])
    b = LabelScores("mean", np.full((4, 40, 1), 0.0) + np.asarray(b_runs)[:, None, None])
    diff = paired_difference([(a, b)], [resample_counts(40, 1000, np.random.default_rng(0))])
    welch = scipy_stats.ttest_ind(a_runs, b_runs, equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert diff.examples_low == pytest.approx(diff.examples_high)
    assert (diff.method_low, diff.method_high) == (pytest.approx(low), pytest.approx(high))
    assert diff.p == pytest.approx(welch.pvalue)


def test_one_seed_has_no_method_level_interval_and_the_untuned_model_has_no_seed():
    rng = np.random.default_rng(2)
    one = _mean_scores(rng.random(30) < 0.6)
    three = _mean_scores(*(rng.random((3, 30)) < 0.6))
    untuned = LabelScores("mean", (rng.random((1, 30)) < 0.4)[:, :, None], seeded=False)
    counts = [resample_counts(30, 1000, rng)]
    for a, b in ((one, untuned), (three, one), (one, one)):
        diff = paired_difference([(a, b)], counts)
        assert diff.method_low is None and diff.method_note == "not estimable from one seed" and diff.p is None
        assert diff.headline == (diff.examples_low, diff.examples_high)
    diff = paired_difference([(three, untuned)], counts)  # only A's seeds vary: df = k_A − 1 when examples add none
    assert diff.method_low < diff.examples_low <= diff.examples_high < diff.method_high and diff.p is not None


def test_the_p_value_tests_the_seed_mean_not_a_vote():
    """The issue's case: 2 seeds each on 200 examples, A's seeds right on different examples (70% each), B's on the
    same 60%. The seed mean gains 10 points for A, while the seeds' majority vote (a tie counted wrong) favours B by 20
    examples to 60; the p-value beside the change must be the method-level one, agreeing with its interval."""
    n = 200
    a = np.zeros((2, n))
    a[0, :140], a[1, 60:] = 1, 1
    b = np.zeros((2, n))
    b[:, :120] = 1
    right_a, right_b = a.mean(0) > 0.5, b.mean(0) > 0.5
    assert (np.sum(right_a & ~right_b), np.sum(~right_a & right_b)) == (20, 60)  # the vote says B
    diff = paired_difference([(_mean_scores(*a), _mean_scores(*b))],
                             [resample_counts(n, 2000, np.random.default_rng(3))])
    assert diff.delta == pytest.approx(0.10)
    assert diff.test == "method-level t" and diff.p < 0.05 and diff.method_low > 0
    rng = np.random.default_rng(4)
    for _ in range(40):  # p < 0.05 exactly when the method-level interval leaves out 0, on the side of the change
        pairs = _seeded_study(rng, 150, int(rng.integers(1, 4)), int(rng.integers(2, 5)), 0.3, shift=0.4)
        diff = paired_difference(pairs, [resample_counts(150, 500, rng) for _ in pairs])
        outside = diff.method_low > 0 or diff.method_high < 0
        assert (diff.p < 0.05) == outside
        assert not outside or (diff.method_low > 0) == (diff.delta > 0)


@pytest.mark.parametrize("b,c", [(1024, 0), (600, 600), (1500, 1712), (3, 4000), (0, 1)])
def test_mcnemar_survives_thousands_of_discordant_pairs(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9,
                                                abs=1e-300)


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
    assert row[1] == "+0.0 [+0.0, +0.0] ex[+0.0, +0.0] p=1"  # both always right on MRPC: identical
    assert "p=" in row[2] and row[2].count("[") == 2  # WebQ: method-level and examples-only intervals
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
    assert pair[0]["delta"] == pytest.approx(expected)
    rec = pair[0]
    assert rec["method_low"] < rec["examples_low"] < expected < rec["examples_high"] < rec["method_high"]
    assert pair[0]["test"] == "method-level t" and pair[0]["method_note"] is None
    assert pair[0]["p"] == "<1e-4" or 1e-4 <= pair[0]["p"] <= 1
    assert "pooled" in records["definitions"]["answer_nll"] and "examples" in records["intervals"]
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


def test_restating_an_old_stats_file_gives_the_method_level_interval_of_its_predictions(study, tmp_path):
    """A stats.json in the old form (examples-only interval, McNemar on the vote) restated from its stored numbers
    gives about the method-level interval computed from the per-example scores themselves."""
    new = json.loads(write_report(study, "mrpc", tmp_path, pairs=[("IMSM-LoRA", "LoRA")])["stats_json"].read_text())
    old = {k: new[k] for k in ("target", "baseline", "confidence", "bootstrap_resamples", "bootstrap_seed", "labels")}
    old["labels"] = json.loads(json.dumps(old["labels"]))
    for label in old["labels"].values():
        for metrics in label["tasks"].values():
            if "answer_nll" in metrics:
                metrics["answer_nll_per_token"] = metrics["answer_nll"]
    old["comparisons"] = [{k: rec[k] for k in ("a", "b", "measure", "metric", "column", "delta")}
                          | {"low": rec["examples_low"], "high": rec["examples_high"], "p_mcnemar": 0.5}
                          for rec in new["comparisons"]]
    restated = load_script("restate_stats").restate(json.loads(json.dumps(old)))
    assert restated["labels"]["LoRA"]["tasks"]["webq"]["answer_nll"] == new["labels"]["LoRA"]["tasks"]["webq"][
        "answer_nll"]
    for got, want in zip(restated["comparisons"], new["comparisons"], strict=True):
        assert (got["a"], got["b"], got["column"], got["test"]) == (want["a"], want["b"], want["column"], want["test"])
        width = want["method_high"] - want["method_low"]
        assert got["method_low"] == pytest.approx(want["method_low"], abs=0.15 * width)
        assert got["method_high"] == pytest.approx(want["method_high"], abs=0.15 * width)
    with pytest.raises(ValueError, match="already restated"):
        load_script("restate_stats").restate(restated)
    # the redrawn chart's numbers: every run's own change is the report's (decoded metric), label means the same
    drawn = {(p["label"], p["run"]): p for p in load_script("restate_stats").tradeoff_points(restated)
             if p["measure"] == "primary"}
    report = {(p["label"], p["run"]): p for p in csv.DictReader((tmp_path / "tradeoff.csv").open())
              if p["measure"] == "primary"}
    assert drawn.keys() == report.keys()
    for key, point in drawn.items():
        assert point["x"] == pytest.approx(float(report[key]["x"]))
        assert point["y"] == pytest.approx(float(report[key]["y"]))


@pytest.mark.parametrize("name", ["cpu_study_stats.json", "cpu_baselines3_stats.json", "cpu_baselines_stats.json"])
def test_the_published_stats_carry_both_interval_kinds(name):
    from pathlib import Path

    records = json.loads((Path(__file__).resolve().parents[2] / "docs" / name).read_text())
    for rec in records["comparisons"]:
        runs = [len(records["labels"][rec[side]]["runs"]) for side in ("a", "b")]
        trained = [records["labels"][rec[side]]["runs"] != [None] for side in ("a", "b")]
        assert rec["examples_low"] <= rec["delta"] <= rec["examples_high"]
        if all(k > 1 or not t for k, t in zip(runs, trained, strict=True)):
            assert rec["test"] == "method-level t" and rec["method_low"] <= rec["delta"] <= rec["method_high"]
            assert significant(rec["p"]) == (rec["method_low"] > 0 or rec["method_high"] < 0)
        else:
            assert rec["method_low"] is None and rec["method_note"] == "not estimable from one seed"


def test_the_headline_interval_of_a_record_prefers_the_method_level_one():
    both = {"examples_low": -1.0, "examples_high": 1.0, "method_low": -3.0, "method_high": 3.0}
    assert headline_interval(both) == (-3.0, 3.0)
    assert headline_interval(both | {"method_low": None, "method_high": None}) == (-1.0, 1.0)
    assert headline_interval({"low": -2.0, "high": 2.0}) == (-2.0, 2.0)  # a stats.json from before


def test_a_p_below_1e4_is_reported_as_below_never_as_its_digits_or_zero():
    """A t of 30 on Welch's df ≈ 200 has p ≈ 1e-58, on df 2 about 1e-3: so far out the digits are the approximation's;
    an underflowed tail is exactly 0.0. Both are reported "<1e-4"; p at or above 1e-4 keeps its value."""
    from scipy import stats as scipy_stats

    from imsm.evaluation.stats import format_p, method_interval, reported_p

    far = 2.0 * scipy_stats.t.sf(30.0, 200)
    assert far < 1e-50 and 2.0 * scipy_stats.t.sf(30.0, 2) > 1e-4  # the df decides the digits
    _, _, p = method_interval(40.0, 1.0, [(0.0, 1)])  # normal tail of z = 40: underflows to 0.0
    assert p == 0.0
    assert reported_p(p) == reported_p(far) == "<1e-4" and format_p(p) == format_p(far) == "<1e-4"
    assert reported_p(0.0123) == 0.0123 and format_p(0.0123) == "0.0123" and reported_p(None) is None
    assert reported_p(1e-4) == 1e-4 and significant("<1e-4") and significant(0.01) and not significant(0.2)


def test_kl_against_the_untuned_model_gets_intervals_but_no_p_value(two_seed_measure_sections):
    sections = two_seed_measure_sections
    kl = sections.stats["kl"]["webq"]["LoRA"]["change"]
    assert kl["p"] is None and "null of no change cannot hold" in kl["p_note"] and kl["method_low"] is not None
    assert sections.stats["auroc"]["mrpc"]["LoRA"]["change"]["p"] is not None  # AUROC keeps its test
    kl_lines = [line for line in sections.forgetting_part if line.startswith("| LoRA |")]
    assert kl_lines and "p=" not in kl_lines[0]


@pytest.mark.parametrize("name", ["cpu_study_stats.json", "cpu_baselines3_stats.json", "cpu_baselines_stats.json",
                                  "cpu_study_measures.json"])
def test_no_published_p_value_is_zero_or_below_the_floor(name):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / name).read_text()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "p" and value is not None:
                    assert value == "<1e-4" or value >= 1e-4, f"{name}: p = {value}"
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    records = json.loads(text)
    walk(records.get("comparisons", records.get("measures")))  # the records (the legend's "p" is a sentence)
