"""evaluate.py --measures end to end on tiny saved runs: each model's measures match the measures computed directly
on the reloaded run, the threshold rows are training rows no run trained on, the report holds every measure."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, save_random_run

import evaluate
from imsm.evaluation.measures.measures import auroc, gold_yes, pooled, yes_no_log_odds
from imsm.loader import load_run
from imsm.templates import build_template

YES_NO = [{"input": f"Question: Is {i % 10} {w} odd ? Output:", "output": "yes" if i % 3 else "no"}
          for i, w in enumerate(["cat", "dog", "red", "blue", "big", "small"] * 4)]
QA = [{"input": f"Question: what is the big {w} ? Output:", "output": [w]} for w in ("cat", "dog", "red", "blue")]
TEXT = ["the cat is big and the dog is small and the answer is 7 .", "what is the number of the red dog ? 1 2 3",
        "a blue cat and a red dog is a big answer to the number 4 .", "is the answer 5 or 6 or 7 or 8 ? no ."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny matrices only."""


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("measures")
    for task, rows in (("mrpc", YES_NO), ("webq", QA)):
        (base / task).mkdir()
        (base / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = base / "mrpc" / "train.jsonl"
    train_rows = [{"input": f"Question: Is {i % 10} odd ? Output:", "output": "yes" if i % 2 else "no"}
                  for i in range(40)]
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (base / "general.jsonl").write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in TEXT))
    runs = []
    for k, gate in enumerate(["none", "none", "query_aware", "query_aware"]):
        run = save_random_run(tiny_model_dir, base / f"run{k}", gate, seed=k)
        (run / "run_args.json").write_text(json.dumps({"train_file": str(train), "max_train_examples": 10}))
        runs.append(run)
    return base, train, train_rows, runs


def _argv(model_dir, base, train, runs, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--data_dir", str(base), "--output_dir", str(out),
            "--untuned", "--run", *map(str, runs), "--labels", "untuned,LoRA,LoRA,IMSM-LoRA,IMSM-LoRA",
            "--tasks", "mrpc,webq", "--target", "mrpc", "--score", "likelihood", "--batch_size", "4",
            "--measures", "auroc,general_nll,kl", "--general_text", str(base / "general.jsonl"),
            "--general_prefix_tokens", "4", "--kl_max_new_tokens", "3", "--threshold_file", f"mrpc={train}",
            "--threshold_examples", "20", "--bootstrap_resamples", "1000", *extra]


def test_measures_end_to_end_match_the_reloaded_runs(tiny_model_dir, setup, tmp_path):
    base, train, train_rows, runs = setup
    out = tmp_path / "eval"
    evaluate.main(_argv(tiny_model_dir, base, train, runs, out, "--adapter_scale", "0.5,1",
                        "--frontier", "IMSM-LoRA:LoRA"))
    stats = json.loads((out / "stats.json").read_text())["measures"]
    imsm = json.loads((out / "IMSM-LoRA" / "run1" / "measures.json").read_text())

    model, tokenizer, _ = load_run(runs[2], str(tiny_model_dir))
    template = build_template("raw", tokenizer)
    direct = yes_no_log_odds(model, template, YES_NO, 1024)
    np.testing.assert_allclose(imsm["yes_no"]["mrpc"]["log_odds"], direct, atol=1e-5)
    # the threshold rows: rows 11-30 of the training file (the runs trained on its first 10), never test rows
    held = yes_no_log_odds(model, template, train_rows[10:30], 1024)
    np.testing.assert_allclose(imsm["yes_no"]["mrpc"]["train_log_odds"], held, atol=1e-5)
    assert imsm["yes_no"]["mrpc"]["train_gold_yes"] == gold_yes(train_rows[10:30]).tolist()

    per_run = stats["auroc"]["mrpc"]["IMSM-LoRA"]["per_run"]
    assert per_run[0] == pytest.approx(auroc(direct, gold_yes(YES_NO)))
    assert len(stats["mcc"]["mrpc"]["IMSM-LoRA"]["per_run"]) == 2
    nll = stats["general_nll"]["general text"]["IMSM-LoRA"]
    assert nll["per_run"][0] == pytest.approx(pooled(np.array(imsm["general_nll"])))
    untuned = json.loads((out / "untuned" / "measures.json").read_text())
    assert np.all(np.array(untuned["kl"]["webq"])[:, 0] == 0) and "mrpc" not in untuned["kl"]  # target: no KL
    assert np.all(np.array(imsm["kl"]["webq"])[:, 0] > 0)
    change = stats["kl"]["webq"]["IMSM-LoRA"]["change"]
    assert change["method_low"] <= change["delta"] <= change["method_high"]
    for label in ("LoRA@0.5", "LoRA@1"):
        assert label in stats["auroc"]["mrpc"]
    assert set(stats["frontier"]) == {"general_nll", "kl"}
    assert (out / "frontier.png").stat().st_size > 1000
    summary, forgetting = (out / "summary.md").read_text(), (out / "forgetting.md").read_text()
    assert "### auroc" in summary and "### mcc" in summary and "### kl" not in summary
    assert "### general_nll" in forgetting and "### kl" in forgetting and "LoRA's curve (kl)" in forgetting
    assert "### auroc" not in forgetting and "| IMSM-LoRA | 2 |" in forgetting  # the gap table's one row
    assert "### Frontier: both intervals of every gap" in (out / "measures.md").read_text()

    # --report_only writes the same report from the folder alone, the measures' sections and the frontier included
    written = {name: (out / name).read_text() for name in ("summary.md", "forgetting.md", "measures.md", "stats.json")}
    for name in written:
        (out / name).unlink()
    evaluate.main(["--report_only", str(out)])
    assert {name: (out / name).read_text() for name in written} == written
    # a model's measures missing: refused, naming it, before anything is rewritten
    (out / "IMSM-LoRA" / "run2" / "measures.json").unlink()
    with pytest.raises(FileNotFoundError, match="IMSM-LoRA/run2/measures.json"):
        evaluate.main(["--report_only", str(out)])
    assert (out / "measures.md").read_text() == written["measures.md"]


def test_bad_measure_inputs_fail_before_anything_is_written(tiny_model_dir, setup, tmp_path):
    base, train, _, runs = setup
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="test file"):
        evaluate.main(_argv(tiny_model_dir, base, train, runs, out, "--threshold_file",
                            f"mrpc={base / 'mrpc' / 'test.jsonl'}"))
    with pytest.raises(ValueError, match="needs --general_text"):
        evaluate.main(_argv(tiny_model_dir, base, train, runs, out)[:-14] + ["--measures", "general_nll"])
    without_untuned = [a.removeprefix("untuned,") for a in _argv(tiny_model_dir, base, train, runs, out)
                       if a != "--untuned"]
    with pytest.raises(ValueError, match="add --untuned"):
        evaluate.main(without_untuned)
    with pytest.raises(ValueError, match="unknown"):
        evaluate.main(_argv(tiny_model_dir, base, train, runs, out, "--measures", "perplexity"))
    # a --frontier label that is not evaluated: named, with the labels there are, before any model is measured
    with pytest.raises(ValueError, match=r"unknown label 'Nope'; the labels present: \['untuned', 'LoRA', "
                                         r"'IMSM-LoRA'\]"):
        evaluate.main(_argv(tiny_model_dir, base, train, runs, out, "--frontier", "IMSM-LoRA,Nope:LoRA"))
    trained_all = tmp_path / "all"
    run = save_random_run(tiny_model_dir, trained_all, "query_aware")
    (Path(run) / "run_args.json").write_text(json.dumps({"train_file": str(train), "max_train_examples": None}))
    with pytest.raises(ValueError, match="trained on all of it"):
        evaluate.main(_argv(tiny_model_dir, base, train, [*runs[:3], run], out))
    assert not out.exists()


def test_report_only_reads_every_method_against_the_curve_of_a_one_method_evaluation(tiny_model_dir, setup,
                                                                                     tmp_path):
    """An evaluation made with --frontier IMSM-LoRA:LoRA, rebuilt by --report_only --frontier all:LoRA from the saved
    measures alone: every method gets its row in the gap table (summary.md, forgetting.md, stats.json) and a point on
    frontier.png, the first method's record under the key "frontier" is unchanged, no model's saved measures are
    touched, and the cost column is each run's train_stats.json (from results.json for measures saved without it)."""
    import shutil

    base, train, _, runs = setup
    runs = [shutil.copytree(run, tmp_path / "runs" / run.name) for run in runs]  # the shared runs stay as they are
    for run, seconds in zip(runs, (60.0, 66.0, 90.0, None), strict=True):  # LoRA, LoRA, IMSM-LoRA, KL1-LoRA
        if seconds is not None:
            (run / "train_stats.json").write_text(json.dumps({"train_runtime_s": seconds, "optimizer_steps": 30}))
    out = tmp_path / "eval"
    argv = _argv(tiny_model_dir, base, train, runs, out, "--adapter_scale", "0.5,1", "--frontier", "IMSM-LoRA:LoRA")
    argv[argv.index("--labels") + 1] = "untuned,LoRA,LoRA,IMSM-LoRA,KL1-LoRA"
    evaluate.main(argv)
    before = json.loads((out / "stats.json").read_text())["measures"]
    assert list(before["frontier_methods"]) == ["IMSM-LoRA"]
    stripped = 0
    for path in out.glob("*/**/measures.json"):  # as an evaluation from before measures.json held the cost
        record = json.loads(path.read_text())
        stripped += "cost" in record
        record.pop("cost", None)
        path.write_text(json.dumps(record))
    assert stripped == 6  # LoRA@0.5 and LoRA@1 twice, IMSM-LoRA, KL1-LoRA (its cost None); the untuned model none
    saved = {path: path.read_bytes() for path in out.rglob("*") if path.name in ("measures.json", "results.json")
             or path.suffix == ".jsonl"}

    evaluate.main(["--report_only", str(out), "--frontier", "all:LoRA"])
    after = json.loads((out / "stats.json").read_text())["measures"]
    assert list(after["frontier_methods"]) == ["IMSM-LoRA", "KL1-LoRA"]  # every label but the curve's and untuned
    assert after["frontier"] == before["frontier"] == after["frontier_methods"]["IMSM-LoRA"]
    rows = {row["method"]: row for row in after["frontier_table"]}
    assert set(rows) == {"IMSM-LoRA", "KL1-LoRA"}
    assert rows["IMSM-LoRA"]["cost"]["ratio"] == pytest.approx((90 / 30) / ((60 / 30 + 66 / 30) / 2))
    assert rows["KL1-LoRA"]["cost"]["ratio"] is None  # no train_stats.json: unknown
    for row in rows.values():
        for measure in ("general_nll", "kl"):
            gap = after["frontier_methods"][row["method"]][measure]
            assert row[measure]["gap"] == gap["gap"] and row[measure]["draws"] == gap["draws"]
    for name in ("summary.md", "forgetting.md"):
        text = (out / name).read_text()
        assert "| IMSM-LoRA | 1 |" in text and "| 1.43× |" in text and "| KL1-LoRA | 1 |" in text, name
    assert {path: path.read_bytes() for path in saved} == saved  # nothing measured or scored again
    assert (out / "frontier.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown label 'OSF'"):
        evaluate.main(["--report_only", str(out), "--frontier", "OSF:LoRA"])


@pytest.fixture(scope="module")
def every_model(tiny_model_dir, setup, tmp_path_factory):
    """One evaluation of every run at scales 0.5 and 1 with IMSM-LoRA's frontier: what a merge must equal."""
    base, train, _, runs = setup
    out = tmp_path_factory.mktemp("every_model") / "all"
    evaluate.main(_argv(tiny_model_dir, base, train, runs, out, "--adapter_scale", "0.5,1", "--frontier",
                        "IMSM-LoRA:LoRA"))
    return out


def test_merged_reports_equal_one_evaluation_of_every_model(tiny_model_dir, setup, every_model, tmp_path):
    """LoRA at scale 0.5 evaluated later and merged (scripts/merge_measures.py) gives the measures and the frontier
    that one evaluation of every model gives; reports measured on other rows are refused."""
    base, train, _, runs = setup
    frontier = ["--frontier", "IMSM-LoRA:LoRA"]
    evaluate.main(_argv(tiny_model_dir, base, train, runs, tmp_path / "first", "--adapter_scale", "1", *frontier))
    later = _argv(tiny_model_dir, base, train, runs[:2], tmp_path / "later", "--adapter_scale", "0.5")
    later[later.index("--labels") + 1] = "untuned,LoRA,LoRA"
    evaluate.main(later)
    merge = load_script("merge_measures")
    assert merge.main([str(tmp_path / "first"), str(tmp_path / "later"), "--out", str(tmp_path / "merged"),
                       "--target", "mrpc", "--frontier", "IMSM-LoRA:LoRA", "--bootstrap_resamples", "1000"]) == 0
    one = json.loads((every_model / "stats.json").read_text())["measures"]
    merged = json.loads((tmp_path / "merged" / "stats.json").read_text())["measures"]
    for name in ("auroc", "mcc", "general_nll", "kl"):
        for task, labels in one[name].items():
            assert set(merged[name][task]) == set(labels)
            for label, entry in labels.items():
                np.testing.assert_allclose(merged[name][task][label]["per_run"], entry["per_run"], atol=1e-9)
                assert merged[name][task][label]["change"]["delta"] == pytest.approx(entry["change"]["delta"])
    for measure in ("general_nll", "kl"):
        a, b = one["frontier"][measure], merged["frontier"][measure]
        assert (a["gap"] is None) == (b["gap"] is None)
        if a["gap"] is not None:
            assert b["gap"] == pytest.approx(a["gap"])
        np.testing.assert_allclose(b["curve"], a["curve"])
    assert (tmp_path / "merged" / "frontier.png").stat().st_size > 1000
    # --out: an earlier merge is replaced whole (no frontier asked now: no stale chart kept); an evaluation's report
    # folder is refused and left as it was
    assert merge.main([str(tmp_path / "first"), str(tmp_path / "later"), "--out", str(tmp_path / "merged"),
                       "--target", "mrpc", "--bootstrap_resamples", "1000"]) == 0
    assert not (tmp_path / "merged" / "frontier.png").exists()
    assert "frontier" not in json.loads((tmp_path / "merged" / "stats.json").read_text())["measures"]
    report = {path: path.read_bytes() for path in (every_model).rglob("*") if path.is_file()}
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "first"), str(tmp_path / "later"), "--out", str(every_model), "--target",
                    "mrpc"])
    assert {path: path.read_bytes() for path in (every_model).rglob("*") if path.is_file()} == report

    other = list(later)
    other[other.index("--output_dir") + 1] = str(tmp_path / "other")
    other[other.index("--threshold_examples") + 1] = "15"
    evaluate.main(other)
    with pytest.raises(SystemExit, match="measured on different rows"):
        merge.main([str(tmp_path / "first"), str(tmp_path / "other"), "--out", str(tmp_path / "bad"), "--target",
                    "mrpc"])
    with pytest.raises(SystemExit, match="in two reports"):
        merge.main([str(tmp_path / "first"), str(every_model), "--out", str(tmp_path / "bad"), "--target",
                    "mrpc"])


def test_joined_seed_reports_equal_one_evaluation_of_every_seed(tiny_model_dir, setup, every_model, tmp_path):
    """Seed 1 evaluated first and seed 2 later, joined (merge_measures.py --join), give every label's runs in seed
    order and the method-level numbers one evaluation of both seeds gives; --labels keeps only the labels asked for
    (a name with its NAME@ variants); a label missing from one report, or asked for and in none, is refused by name,
    and so is one seed counted twice (a report given twice, or a copy of it)."""
    base, train, _, runs = setup
    frontier = ["--adapter_scale", "0.5,1", "--frontier", "IMSM-LoRA:LoRA"]
    for name, pair in (("seed1", [runs[0], runs[2]]), ("seed2", [runs[1], runs[3]])):
        argv = _argv(tiny_model_dir, base, train, pair, tmp_path / name, *frontier)
        argv[argv.index("--labels") + 1] = "untuned,LoRA,IMSM-LoRA"
        evaluate.main(argv)
    merge = load_script("merge_measures")
    seeds = [str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    with pytest.raises(SystemExit, match="--join"):  # without --join a label in two reports is refused
        merge.main([*seeds, "--out", str(tmp_path / "bad"), "--target", "mrpc"])
    assert merge.main([*seeds, "--join", "--out", str(tmp_path / "joined"), "--target", "mrpc", "--frontier",
                       "IMSM-LoRA:LoRA", "--bootstrap_resamples", "1000"]) == 0
    one = json.loads((every_model / "stats.json").read_text())["measures"]
    joined = json.loads((tmp_path / "joined" / "stats.json").read_text())["measures"]
    for name in ("auroc", "general_nll", "kl"):
        for task, labels in one[name].items():
            assert set(joined[name][task]) == set(labels)
            for label, entry in labels.items():
                assert len(entry["per_run"]) == 2
                np.testing.assert_allclose(joined[name][task][label]["per_run"], entry["per_run"], atol=1e-9)
                change, expected = joined[name][task][label]["change"], entry["change"]
                assert expected["method_low"] is not None  # the seeds' interval: both seeds counted
                assert change.keys() == expected.keys()
                for key, value in expected.items():
                    assert change[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    for measure in ("general_nll", "kl"):
        a, b = one["frontier"][measure], joined["frontier"][measure]
        assert (a["gap"] is None) == (b["gap"] is None)
        np.testing.assert_allclose(b["curve"], a["curve"])

    assert merge.main([*seeds, "--join", "--labels", "LoRA", "--out", str(tmp_path / "lora"),
                       "--target", "mrpc", "--bootstrap_resamples", "1000"]) == 0
    kept = json.loads((tmp_path / "lora" / "stats.json").read_text())["measures"]["general_nll"]
    assert set(next(iter(kept.values()))) == {"LoRA@0.5", "LoRA@1"}
    with pytest.raises(SystemExit, match="seed1 is given twice"):
        merge.main([seeds[0], seeds[0], "--join", "--out", str(tmp_path / "bad"), "--target", "mrpc"])
    shutil.copytree(seeds[0], tmp_path / "seed1_again")
    with pytest.raises(SystemExit, match=r"seed1_again/LoRA@0\.5 has the same measures as a run of .LoRA@0\.5."):
        merge.main([seeds[0], str(tmp_path / "seed1_again"), "--join", "--out", str(tmp_path / "bad"), "--target",
                    "mrpc"])
    with pytest.raises(SystemExit, match="Nope"):
        merge.main([*seeds, "--join", "--labels", "LoRA@1,Nope", "--out", str(tmp_path / "bad"), "--target", "mrpc"])

    lora_only = _argv(tiny_model_dir, base, train, [runs[1]], tmp_path / "lora_seed2", "--adapter_scale", "1")
    lora_only[lora_only.index("--labels") + 1] = "untuned,LoRA"
    evaluate.main(lora_only)
    with pytest.raises(SystemExit, match="lora_seed2 has no IMSM-LoRA"):
        merge.main([seeds[0], str(tmp_path / "lora_seed2"), "--join", "--out", str(tmp_path / "bad"), "--target",
                    "mrpc"])
    assert not (tmp_path / "bad").exists()
    assert merge.main([seeds[0], str(tmp_path / "lora_seed2"), "--join", "--labels", "LoRA@1", "--out",
                       str(tmp_path / "lora1"), "--target", "mrpc", "--bootstrap_resamples", "1000"]) == 0


def test_kl_average_is_the_mean_of_its_tasks_each_resampled_apart(tmp_path):
    """KL's `average` column: per run the mean of the tasks' pooled per-token KL (hand-computed), its draws each
    task's own draw of its examples (the frontier's average), and the per-task columns unchanged beside it."""
    from imsm.evaluation.arguments import MeasureArguments
    from imsm.evaluation.report.writer import write_measures_report
    from imsm.evaluation.stats import resample_counts

    untuned = {"label": "untuned", "untuned": True, "kl": {"a": [[0, 2], [0, 4]], "b": [[0, 1], [0, 3], [0, 1]]}}
    lora = [{"label": "LoRA", "untuned": False, "kl": {"a": [[1, 2], [3, 4]], "b": [[2, 1], [0, 3], [1, 1]]}},
            {"label": "LoRA", "untuned": False, "kl": {"a": [[0, 2], [1, 4]], "b": [[1, 1], [3, 3], [0, 1]]}}]
    write_measures_report({"untuned": [untuned], "LoRA": lora}, "mrpc", MeasureArguments(measures="kl"), tmp_path,
                          1000, 7)
    stats = json.loads((tmp_path / "stats.json").read_text())["measures"]["kl"]
    # run 1: a 4/6, b 3/5; run 2: a 1/6, b 4/5
    per_run = [(4 / 6 + 3 / 5) / 2, (1 / 6 + 4 / 5) / 2]
    assert stats["average"]["LoRA"]["per_run"] == pytest.approx(per_run)
    assert stats["a"]["LoRA"]["per_run"] == pytest.approx([4 / 6, 1 / 6])
    # the examples-only interval: the tasks drawn apart, in column order, from the report's seed
    rng = np.random.default_rng(7)
    ca, cb = resample_counts(2, 1000, rng), resample_counts(3, 1000, rng)
    a = np.array([[1, 2], [3, 4]]), np.array([[0, 2], [1, 4]])
    b = np.array([[2, 1], [0, 3], [1, 1]]), np.array([[1, 1], [3, 3], [0, 1]])
    def pooled_on(counts, comps):
        return (counts @ comps[:, 0]) / (counts @ comps[:, 1])

    draws = np.mean([(pooled_on(ca, x) + pooled_on(cb, y)) / 2 for x, y in zip(a, b, strict=True)], axis=0)
    change = stats["average"]["LoRA"]["change"]
    assert [change["examples_low"], change["examples_high"]] == pytest.approx(np.quantile(draws, [0.025, 0.975]))
    assert "| label | a | change | b | change | average | change |" in (tmp_path / "measures.md").read_text()
