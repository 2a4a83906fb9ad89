"""Several methods against one LoRA curve (--frontier A,B:LoRA, all:LoRA): a method alone gives the numbers the
one-method code gave (commit a50c979, a recorded synthetic study), several at once give each one's numbers alone,
gaps known by construction (points placed on a quadratic curve: gap 0; shifted by c: gap c), the gap table's rows,
order and cost column, and bad labels named with the labels present."""

import json
from pathlib import Path

import numpy as np
import pytest

from imsm.evaluation.arguments import MeasureArguments
from imsm.evaluation.measures.frontier import LabelRuns, frontier_gap, frontier_gaps
from imsm.evaluation.measures.measures import auroc
from imsm.evaluation.report.measure_tables import measure_sections
from imsm.evaluation.report.writer import write_measures_report

N_TARGET, N_TEXT, N_KL = 400, 150, 60
POSITIVE = np.arange(N_TARGET) % 2 == 1
KL_TASKS = ("webq", "freebaseqa")
METHODS = {  # label: (signal, NLL shift, KL level, seeds)
    "IMSM-LoRA": (1.5, 0.2, 0.10, 3), "KL1-LoRA": (1.2, 0.1, 0.05, 1), "OSF": (4.0, 0.1, 0.1, 3),
    "EAFT-LoRA": (1.0, 0.3, 0.20, 3), "MiCA-LoRA": (1.97, 0.45, 0.3, 3)}
RECORDED = Path(__file__).resolve().parents[2] / "data" / "frontier_single_a50c979.json"
ARGS = {"measures": "auroc,general_nll,kl", "general_text": "(synthetic)"}


def synthetic_study(seed: int = 0) -> dict[str, list[dict]]:
    """measures.json records (label -> runs) of the untuned model, LoRA at scales 0.25-1 (3 seeds; gain ~ scale,
    forgetting ~ scale²) and METHODS: yes/no log-odds = signal · gold + shared noise + run noise, general-text NLL
    per token 2 + shift + noise, KL per token ~ level. RECORDED holds, per method, stats.json's "frontier" that
    ``measure_sections`` wrote for --frontier METHOD:LoRA at commit a50c979 (the one-method code) on this study."""
    rng = np.random.default_rng(seed)
    noise_t = rng.normal(size=N_TARGET)
    tokens = rng.integers(20, 200, size=N_TEXT).astype(float)
    noise_f = rng.normal(scale=0.3, size=N_TEXT)
    kl_tokens = {t: rng.integers(1, 33, size=N_KL).astype(float) for t in KL_TASKS}

    def record(label, signal, shift, kl, untuned=False, sd=0.05):
        s = signal + (0.0 if untuned else rng.normal(scale=sd))
        log_odds = s * POSITIVE + noise_t + (0.0 if untuned else rng.normal(scale=0.3, size=N_TARGET))
        nll = tokens * (2.0 + shift + (0.0 if untuned else rng.normal(scale=sd)) + noise_f)
        kls = {t: np.stack([np.zeros(N_KL) if untuned else
                            c * np.abs(kl * (1 + rng.normal(scale=0.3, size=N_KL)) + rng.normal(scale=sd / 5)), c],
                           axis=1).tolist() for t, c in kl_tokens.items()}
        return {"label": label, "untuned": untuned,
                "yes_no": {"mrpc": {"log_odds": log_odds.tolist(), "gold_yes": POSITIVE.tolist()}},
                "general_nll": np.stack([nll, tokens], axis=1).tolist(), "kl": kls}

    results = {"untuned": [record("untuned", 0.0, 0.0, 0.0, untuned=True)]}
    for a in (0.25, 0.5, 0.75, 1.0):
        results[f"LoRA@{a:g}"] = [record(f"LoRA@{a:g}", 2.0 * a, 0.5 * a * a, 0.3 * a * a) for _ in range(3)]
    for label, (signal, shift, kl, seeds) in METHODS.items():
        results[label] = [record(label, signal, shift, kl) for _ in range(seeds)]
    return results


def _json(value):
    return json.loads(json.dumps(value))


def test_one_method_gives_the_one_method_codes_numbers_and_many_give_each_ones_alone():
    """Each method alone (--frontier M:LoRA) reproduces the recorded record of the one-method code to the bit (its
    notes now name the method, not "IMSM"), and --frontier all:LoRA gives every method that same record: one curve,
    one set of draws. The study covers a method with seeds, one with one seed, one beyond the curve (out of range)
    and one whose gain leaves the curve in 16 of 1000 draws."""
    study, recorded = synthetic_study(), json.loads(RECORDED.read_text())
    together = measure_sections(study, "mrpc", MeasureArguments(**ARGS, frontier="all:LoRA"), 1000, 0).stats
    assert list(together["frontier_methods"]) == list(METHODS)  # every label but the curve's and untuned, in order
    for method, old in recorded.items():
        alone = measure_sections(study, "mrpc", MeasureArguments(**ARGS, frontier=f"{method}:LoRA"), 1000, 0).stats
        for measure, record in old.items():
            record = record | {"notes": [n.replace("IMSM's", f"{method}'s") for n in record["notes"]]}
            for new in (alone["frontier"][measure], together["frontier_methods"][method][measure]):
                assert {k: v for k, v in _json(new).items() if k in record} == record, (method, measure)
    assert together["frontier"] == together["frontier_methods"]["IMSM-LoRA"]  # the key's layout: the first method
    kinds = {m: recorded[m]["kl"] for m in ("KL1-LoRA", "OSF", "MiCA-LoRA")}
    assert kinds["KL1-LoRA"]["method_low"] is None and kinds["KL1-LoRA"]["examples_low"] is not None
    assert kinds["OSF"]["gap"] is None and "16 of 1000" in kinds["MiCA-LoRA"]["notes"][0]
    assert together["frontier_methods"]["MiCA-LoRA"]["kl"]["draws_outside"] == 16


def _on_curve(signal: float, seed: int, a=0.1, b=2.0, shift=0.0, a_kl=0.05, b_kl=1.0, untuned=None):
    """One run placed exactly: log-odds signal · gold + noise; its NLL sums the untuned model's plus f · tokens,
    f = a·g + b·g² + shift at its own AUROC gain g (so its pooled NLL change is f); its KL a_kl·g + b_kl·g² + shift
    per token on every KL task."""
    rng = np.random.default_rng(seed)
    target = signal * POSITIVE + rng.normal(size=N_TARGET)
    if untuned is None:  # the untuned model: gain 0, its NLL the reference, KL 0
        tokens = rng.integers(20, 200, size=N_TEXT).astype(float)
        nll = np.stack([tokens * (2.0 + rng.normal(scale=0.3, size=N_TEXT)), tokens], axis=1)
        kl = [np.stack([np.zeros(N_KL), rng.integers(1, 33, size=N_KL).astype(float)], axis=1) for _ in KL_TASKS]
        return LabelRuns(target[None], [nll[None]]), LabelRuns(target[None], [k[None] for k in kl])
    (nll_base, kl_base), base_target = untuned, untuned[0].target[0]
    g = auroc(target, POSITIVE) - auroc(base_target, POSITIVE)
    f, f_kl = a * g + b * g * g + shift, a_kl * g + b_kl * g * g + shift
    sums, tokens = nll_base.forgetting[0][0].T
    nll = np.stack([sums + f * tokens, tokens], axis=1)
    kl = [np.stack([f_kl * k[0][:, 1], k[0][:, 1]], axis=1) for k in kl_base.forgetting]
    return LabelRuns(target[None], [nll[None]]), LabelRuns(target[None], [k[None] for k in kl])


def test_gaps_known_by_construction():
    """LoRA's points and two methods exactly on forgetting = a·g + b·g² (NLL) and a'·g + b'·g² (KL): the fit
    recovers the curve, a method on it has gap 0 and one shifted by +c (or −c) has gap c (−c), on both measures, read
    together or alone; a method beyond LoRA's highest gain is out of range."""
    untuned = _on_curve(0.0, 0)
    lora = {f"LoRA@{s:g}": _on_curve(2.0 * s, 10 + k, untuned=untuned) for k, s in enumerate((0.25, 0.5, 0.75, 1))}
    c = 0.03
    methods = {"on": _on_curve(1.0, 21, untuned=untuned), "above": _on_curve(0.8, 22, shift=c, untuned=untuned),
               "below": _on_curve(1.2, 23, shift=-c, untuned=untuned), "beyond": _on_curve(4.0, 24, untuned=untuned)}
    for i, measure in enumerate(("general_nll", "kl")):
        curve = {k: v[i] for k, v in lora.items()} | {"untuned (scale 0)": untuned[i]}
        gaps = frontier_gaps({k: v[i] for k, v in methods.items()}, curve, untuned[i], POSITIVE, resamples=300)
        assert gaps["on"].gap == pytest.approx(0.0, abs=1e-12), measure
        assert gaps["above"].gap == pytest.approx(c, abs=1e-12) and gaps["below"].gap == pytest.approx(-c, abs=1e-12)
        assert gaps["beyond"].gap is None and "not extrapolated" in gaps["beyond"].notes[0]
        assert gaps["beyond"].draws == 0 and gaps["on"].draws == 300
        for name in ("on", "above", "below"):  # one seed: the examples-only interval, no method-level one
            g = gaps[name]
            assert g.examples_low < g.gap < g.examples_high and g.method_low is None, (measure, name)
            alone = frontier_gap(methods[name][i], curve, untuned[i], POSITIVE, resamples=300)
            assert (alone.gap, alone.examples_low, alone.examples_high) == (g.gap, g.examples_low, g.examples_high)


def _records(runs_nll: LabelRuns, runs_kl: LabelRuns, label: str, cost: dict | None) -> list[dict]:
    """LabelRuns back as measures.json records (one per run)."""
    return [{"label": label, "untuned": label == "untuned", "cost": cost,
             "yes_no": {"mrpc": {"log_odds": runs_nll.target[r].tolist(), "gold_yes": POSITIVE.tolist()}},
             "general_nll": runs_nll.forgetting[0][r].tolist(),
             "kl": {t: runs_kl.forgetting[k][r].tolist() for k, t in enumerate(KL_TASKS)}}
            for r in range(runs_nll.runs)]


def test_the_gap_table_holds_every_method_sorted_by_the_nll_gap_with_its_cost(tmp_path):
    """Through the report: the table and stats.json's frontier_table hold one row per method, by NLL gap (out of
    range last), each gap as constructed, "out of range" written out, and the cost per optimizer step over LoRA's
    (LoRA's from its finished runs: the checkpoint's earlier rate is left out; — where a run's is unknown)."""
    untuned = _on_curve(0.0, 0)
    c = 0.03
    placed = {f"LoRA@{s:g}": _on_curve(2.0 * s, 10 + k, untuned=untuned) for k, s in enumerate((0.25, 0.5, 0.75, 1))}
    placed |= {"LoRA@step5": _on_curve(0.5, 30, shift=0.3, untuned=untuned),  # above the curve: dominated
               "on": _on_curve(1.0, 21, untuned=untuned), "above": _on_curve(0.8, 22, shift=c, untuned=untuned),
               "below": _on_curve(1.2, 23, shift=-c, untuned=untuned), "beyond": _on_curve(4.0, 24, untuned=untuned)}
    costs = {"LoRA@step5": {"train_runtime_s": 15.0, "optimizer_steps": 5},  # 3 s/step at the start: left out
             "on": {"train_runtime_s": 40.0, "optimizer_steps": 20}, "above": {"train_runtime_s": 30.0},
             "below": {"train_runtime_s": 25.0, "optimizer_steps": 20}}
    results = {"untuned": _records(*untuned, "untuned", None)}
    results |= {label: _records(*runs, label, costs.get(label, {"train_runtime_s": 20.0, "optimizer_steps": 20}))
                for label, runs in placed.items()}
    del results["untuned"][0]["cost"]
    paths = write_measures_report(results, "mrpc", MeasureArguments(**ARGS, frontier="all:LoRA"), tmp_path, 1000, 0)
    rows = json.loads((tmp_path / "stats.json").read_text())["measures"]["frontier_table"]
    assert [row["method"] for row in rows] == ["below", "on", "above", "beyond"]
    for row, gap in zip(rows, (-c, 0.0, c, None), strict=True):
        for measure in ("general_nll", "kl"):
            assert row[measure]["gap"] == (None if gap is None else pytest.approx(gap, abs=1e-12))
        assert row["gain"]["interval"] == "examples" and row["runs"] == 1
    assert [row["cost"]["ratio"] for row in rows] == [pytest.approx(1.25), pytest.approx(2.0), None, 1.0]
    for row in rows[:3]:  # LoRA's curve at the method's own gain, and the gap interval as a share of it
        g = row["gain"]["value"]
        for measure, (a, b) in (("general_nll", (0.1, 2.0)), ("kl", (0.05, 1.0))):
            cell = row[measure]
            curve = a * g + b * g * g
            assert cell["curve_at_gain"] == pytest.approx(curve, abs=1e-12)
            assert cell["share_of_lora"] == pytest.approx([(curve + cell["gap_low"]) / curve,
                                                           (curve + cell["gap_high"]) / curve])
            low, high = cell["share_of_lora"]
            assert low < (curve + cell["gap"]) / curve < high  # the method's own forgetting over LoRA's there
    assert rows[1]["kl"]["share_of_lora"][0] < 1 < rows[1]["kl"]["share_of_lora"][1]  # "on" the curve: 1 inside
    assert rows[-1]["kl"]["curve_at_gain"] is None and rows[-1]["kl"]["share_of_lora"] is None  # out of range
    assert rows[-1]["general_nll"]["out_of_range"] and not rows[0]["general_nll"]["out_of_range"]
    text = paths["measures_md"].read_text()
    section = text.split("### Frontier: each method's")[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|---")) + 1
    table = section[start : section.index("", start)]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == ["below", "on", "above", "beyond"]
    assert "out of range | – | out of range | – |" in table[-1] and table[-1].endswith("| 1.00× |")
    assert table[1].endswith("| 2.00× |") and table[2].endswith("| — |")
    assert "(ex)" in table[0] and "draws outside the curve (NLL, KL)" in text
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_bad_frontier_labels_are_named_with_the_labels_present():
    labels = ["untuned", "LoRA@0.5", "LoRA@1", "IMSM-LoRA", "OSF"]
    args = MeasureArguments(**ARGS, frontier="IMSM-LoRA,KL1-LoRA,Replay:LoRA")
    with pytest.raises(ValueError, match=r"unknown labels 'KL1-LoRA', 'Replay'; the labels present: \['untuned', "
                                         r"'LoRA@0.5', 'LoRA@1', 'IMSM-LoRA', 'OSF'\]"):
        args.frontier_groups(labels)
    assert MeasureArguments(**ARGS, frontier="OSF, IMSM-LoRA:LoRA").frontier_groups(labels) == (
        ["OSF", "IMSM-LoRA"], ["LoRA@0.5", "LoRA@1"])
    assert MeasureArguments(**ARGS, frontier="all:LoRA").frontier_groups(labels) == (["IMSM-LoRA", "OSF"],
                                                                                     ["LoRA@0.5", "LoRA@1"])
    with pytest.raises(ValueError, match="no label 'DoRA' or DoRA@"):
        MeasureArguments(**ARGS, frontier="OSF:DoRA").frontier_groups(labels)
    with pytest.raises(ValueError, match="'LoRA@1' is the untuned model or on LoRA's curve"):
        MeasureArguments(**ARGS, frontier="OSF,LoRA@1:LoRA").frontier_groups(labels)
    with pytest.raises(ValueError, match="name methods or write all, not both"):
        MeasureArguments(**ARGS, frontier="all,OSF:LoRA")
    for bad in ("OSF", "OSF,:LoRA", ":LoRA", "OSF:"):
        with pytest.raises(ValueError, match="expected METHOD"):
            MeasureArguments(**ARGS, frontier=bad)
    with pytest.raises(ValueError, match="unknown label 'Nope'"):  # the report refuses it too
        measure_sections(synthetic_study(), "mrpc", MeasureArguments(**ARGS, frontier="KL1-LoRA,Nope:LoRA"), 1000, 0)


def test_without_general_nll_the_table_reads_and_sorts_by_kl():
    study = synthetic_study()
    for runs in study.values():
        for record in runs:
            del record["general_nll"]
    sections = measure_sections(study, "mrpc", MeasureArguments(measures="auroc,kl", frontier="all:LoRA"), 1000, 0)
    rows = sections.stats["frontier_table"]
    gaps = [row["kl"]["gap"] for row in rows]
    assert all("general_nll" not in row for row in rows) and gaps[-1] is None  # OSF: out of range, last
    assert gaps[:-1] == sorted(gaps[:-1])
    recorded = json.loads(RECORDED.read_text())
    for row in rows:  # the KL gaps do not depend on whether the NLL was measured
        assert row["kl"]["gap"] == recorded[row["method"]]["kl"]["gap"]
    header = next(line for line in sections.frontier_part if line.startswith("| method"))
    assert "NLL" not in header and "draws outside the curve (KL)" in header
