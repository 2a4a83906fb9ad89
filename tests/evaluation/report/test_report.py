"""Report tables and plot from hand-made results."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from imsm.evaluation.measures.metrics import ExampleScores
from imsm.evaluation.report.charts import plot_forgetting
from imsm.evaluation.report.results import RunResult, score_records
from imsm.evaluation.report.tables import forgetting_table, summary_table
from imsm.evaluation.report.writer import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _untuned() -> RunResult:
    return RunResult(
        label="untuned",
        template="raw",
        metrics={
            "cola": {"mcc": 0.10, "accuracy": 0.6, "yes_rate": 0.95, "invalid_rate": 0.0, "n": 10},
            "webq": {"contain": 0.40, "em": 0.1, "n": 10},
            "multirc": {"accuracy": 0.70, "yes_rate": 0.5, "invalid_rate": 0.0, "n": 10},
            "mrpc": {"accuracy": 0.60, "f1": 0.7, "yes_rate": 0.8, "invalid_rate": 0.0, "n": 10},
            "freebaseqa": {"contain": 0.50, "em": 0.2, "n": 10},
        },
    )


def _lora() -> RunResult:
    return RunResult(
        label="LoRA",
        template="raw",
        metrics={
            "cola": {"mcc": 0.55, "accuracy": 0.8, "yes_rate": 0.7, "invalid_rate": 0.0, "n": 10},
            "webq": {"contain": 0.35, "em": 0.1, "n": 10},
            "multirc": {"accuracy": 0.62, "yes_rate": 0.4, "invalid_rate": 0.1, "n": 10},
            "mrpc": {"accuracy": 0.50, "f1": 0.6, "yes_rate": 1.0, "invalid_rate": 0.0, "n": 10},
            # freebaseqa missing
        },
    )


def _rows(markdown: str) -> list[list[str]]:
    lines = markdown.strip().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_summary_table_values_and_yes_rate():
    gsm = RunResult("IMSM-LoRA", "chat", {"gsm8k": {"accuracy": 0.4123, "n": 5}})
    md, csv_text = summary_table([_untuned(), _lora(), gsm])
    header, *rows = _rows(md)
    assert header == [
        "Run",
        "Template",
        "GSM8K (accuracy)",
        "MRPC (accuracy)",
        "MRPC yes%",
        "CoLA (mcc)",
        "CoLA yes%",
        "WebQ (contain)",
        "FreebaseQA (contain)",
        "MultiRC (accuracy)",
        "MultiRC yes%",
    ]
    assert rows[0] == ["untuned", "raw", "-", "60.0", "80.0", "10.0", "95.0", "40.0", "50.0", "70.0", "50.0"]
    assert rows[1] == ["LoRA", "raw", "-", "50.0", "100.0", "55.0", "70.0", "35.0", "-", "62.0", "40.0"]
    assert rows[2] == ["IMSM-LoRA", "chat", "41.2"] + ["-"] * 8
    csv_rows = list(csv.reader(io.StringIO(csv_text)))
    assert csv_rows[0] == header
    assert csv_rows[1:] == rows


def test_summary_table_unknown_task():
    with pytest.raises(ValueError, match="boolq"):
        summary_table([RunResult("x", "raw", {"boolq": {"accuracy": 1.0}})])


def test_forgetting_table_cells_deltas_and_average():
    md = forgetting_table([_untuned(), _lora()], "cola")
    header, base, lora = _rows(md)
    assert header == ["Run", "Template", "CoLA", "WebQ", "MultiRC", "MRPC", "FreebaseQA", "Avg (general)"]
    # untuned general: 40, 70, 60, 50 -> 55.0
    assert base == ["untuned", "raw", "10.0", "40.0", "70.0", "60.0", "50.0", "55.0"]
    # LoRA general: 35, 62, 50 (FreebaseQA missing, excluded) -> 49.0, vs 55.0 -> -6.0
    assert lora == [
        "LoRA",
        "raw",
        "55.0 (+45.0)",
        "35.0 (-5.0)",
        "62.0 (-8.0)",
        "50.0 (-10.0)",
        "-",
        "49.0 (-6.0)",
    ]


def test_forgetting_table_mrpc_target_not_repeated():
    md = forgetting_table([_untuned(), _lora()], "mrpc")
    header, base, lora = _rows(md)
    assert header == ["Run", "Template", "MRPC", "WebQ", "MultiRC", "FreebaseQA", "Avg (general)"]
    assert header.count("MRPC") == 1
    # general: 40, 70, 50 -> 53.3
    assert base == ["untuned", "raw", "60.0", "40.0", "70.0", "50.0", "53.3"]
    # LoRA general: 35, 62 -> 48.5, delta 48.5 - 53.3 = -4.8
    assert lora[2] == "50.0 (-10.0)"
    assert lora[-1] == "48.5 (-4.8)"


def test_forgetting_table_delta_vs_baseline_of_same_template():
    chat_base = RunResult("untuned", "chat", {"gsm8k": {"accuracy": 0.30}, "webq": {"contain": 0.20}})
    raw_base = RunResult("untuned", "raw", {"gsm8k": {"accuracy": 0.10}, "webq": {"contain": 0.50}})
    tuned = RunResult("IMSM-LoRA", "chat", {"gsm8k": {"accuracy": 0.412}, "webq": {"contain": 0.25}})
    _, _, _, row = _rows(forgetting_table([raw_base, chat_base, tuned], "gsm8k"))
    assert row[2] == "41.2 (+11.2)"
    assert row[3] == "25.0 (+5.0)"
    assert row[4:7] == ["-", "-", "-"]
    assert row[7] == "25.0 (+5.0)"


def test_forgetting_table_without_baseline_shows_no_deltas():
    _, row = _rows(forgetting_table([_lora()], "cola"))
    assert row[2] == "55.0" and "(" not in "".join(row)


def test_forgetting_table_zero_delta_has_no_minus_sign():
    a = RunResult("untuned", "raw", {"cola": {"mcc": 0.1234}})
    b = RunResult("LoRA", "raw", {"cola": {"mcc": 0.1231}})
    _, _, row = _rows(forgetting_table([a, b], "cola"))
    assert row[2] == "12.3 (+0.0)"
    assert row[-1] == "-"


def test_forgetting_unknown_target():
    with pytest.raises(ValueError, match="nope"):
        forgetting_table([_untuned()], "nope")


def test_plot_forgetting_png(tmp_path):
    path = plot_forgetting([_untuned(), _lora()], "cola", tmp_path / "plots" / "forgetting.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["forgetting.png"]


def test_write_report(tmp_path):
    out = tmp_path / "report"
    paths = write_report([_untuned(), _lora()], "cola", out)
    names = ["comparisons.md", "forgetting.md", "forgetting.png", "stats.csv", "stats.json", "summary.csv",
             "summary.md", "tradeoff.csv", "tradeoff.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert sorted(p.name for p in paths.values()) == names
    assert paths["forgetting_png"].read_bytes().startswith(PNG_SIGNATURE)
    table = forgetting_table([_untuned(), _lora()], "cola")
    assert paths["forgetting_md"].read_text().startswith("### Forgetting: decoded metric\n\n" + table + "\n[a, b]: ")
    md, csv_text = summary_table([_untuned(), _lora()])
    assert paths["summary_md"].read_text() == md
    assert paths["summary_csv"].read_text() == csv_text


def test_run_result_from_dict():
    run = RunResult.from_dict({"label": "LoRA", "template": "chat", "metrics": {"webq": {"contain": 0.5}}})
    assert run == RunResult("LoRA", "chat", {"webq": {"contain": 0.5}})


def test_summary_shows_what_training_cost():
    lora = _lora()
    lora.cost = {"train_runtime_s": 248.4, "optimizer_steps": 60, "tokens_seen": 91234}
    md, _ = summary_table([_untuned(), lora])
    header, base, row = _rows(md)
    assert header[-3:] == ["Train s", "Steps", "Tokens"]
    assert row[-3:] == ["248", "60", "91234"] and base[-3:] == ["-", "-", "-"]


def _scored(label, hits, run=None, tasks=("mrpc",)):
    """A run with the same per-example 0/1 outcomes on every task of ``tasks`` (accuracy-scored tasks)."""
    scores = ExampleScores({"accuracy": ("mean", np.asarray(hits, float)[:, None])})
    return RunResult(label, "raw", {t: {"accuracy": scores.value("accuracy")} for t in tasks},
                     {t: scores for t in tasks}, run)


def test_a_paper_size_report_is_written(tmp_path):
    """4,000 rows with a 68-point change (2,720 discordant pairs, beyond 2.0**1024): McNemar's tail in log space."""
    n = 4000
    untuned = _scored("untuned", np.arange(n) < 600)
    tuned = _scored("LoRA", np.arange(n) < 3320, run="runs/lora")
    paths = write_report([untuned, tuned], "mrpc", tmp_path, resamples=1000)
    records = json.loads(paths["stats_json"].read_text())
    (rec,) = [r for r in records["comparisons"] if r["column"] == "mrpc"]
    assert rec["delta"] == pytest.approx(0.68) and rec["test"] == "McNemar exact" and rec["p"] == "<1e-4"
    assert rec["method_low"] is None and rec["method_note"] == "not estimable from one seed"
    assert "LoRA | raw | 83.0 (+68.0 ex[" in paths["forgetting_md"].read_text()


def test_seeds_get_a_method_level_interval_and_one_seed_says_why_not(tmp_path):
    rng = np.random.default_rng(5)
    n = 300
    both = ("mrpc", "multirc")
    untuned = _scored("untuned", rng.random(n) < 0.5, tasks=both)
    seeds = [_scored("IMSM", rng.random(n) < p, f"imsm/{i}", both) for i, p in enumerate((0.6, 0.7, 0.65))]
    single = _scored("LoRA", rng.random(n) < 0.6, "lora/0", both)
    paths = write_report([untuned, *seeds, single], "mrpc", tmp_path, pairs=[("IMSM", "LoRA")], resamples=1000)
    comparisons = paths["comparisons_md"].read_text()
    assert "[not estimable from one seed] ex[" in comparisons and "method-level" in comparisons
    forgetting = paths["forgetting_md"].read_text()
    imsm_cell = next(line for line in forgetting.splitlines() if line.startswith("| IMSM"))
    assert " [" in imsm_cell and "ex[" not in imsm_cell  # several seeds: the method-level interval
    records = json.loads(paths["stats_json"].read_text())
    imsm = next(r for r in records["comparisons"] if (r["a"], r["b"], r["column"]) == ("IMSM", "untuned", "mrpc"))
    assert imsm["test"] == "method-level t" and imsm["method_low"] < imsm["examples_low"]
    points = list(csv.DictReader(paths["tradeoff_csv"].open()))
    assert {(p["label"], p["interval"]) for p in points if p["run"] == "mean" and p["measure"] == "primary"} == \
        {("IMSM", "method"), ("LoRA", "examples")}


def test_answer_nll_is_pooled_per_token_and_named_so(tmp_path):
    """Two examples: 7.0 nats over 2 tokens and 16.0 over 4: pooled 23/6 = 3.833 nats per token (the mean of the
    per-example means would be 3.75); the report shows the pooled value, names it, and keeps the other."""
    records = [{"input": "a", "gold": "x", "answer_nll": 3.5, "answer_nll_sum": 7.0, "answer_tokens": 2},
               {"input": "b", "gold": "y", "answer_nll": 4.0, "answer_nll_sum": 16.0, "answer_tokens": 4}]
    scores, metrics = score_records("webq", records)
    assert metrics == {"answer_nll": pytest.approx(23 / 6), "answer_nll_example_mean": pytest.approx(3.75), "n": 2}
    run = RunResult("untuned", "raw", {"webq": metrics}, {"webq": scores})
    md, _ = summary_table([run])
    assert _rows(md)[0][-1] == "WebQ NLL/token" and _rows(md)[1][-1] == "3.833"
    paths = write_report([run], "webq", tmp_path)
    assert "pooled" in paths["forgetting_md"].read_text()
    assert "pooled" in json.loads(paths["stats_json"].read_text())["definitions"]["answer_nll"]


def test_the_measures_sections_are_written_once_by_the_one_writer(tmp_path, two_seed_measure_sections):
    """With --measures the writer puts the measures' sections into summary.md and forgetting.md and their record into
    stats.json as it writes them, reading nothing back: the files equal the tables plus one section each, and writing
    the report again (as --report_only does) gives the same bytes, not a second section."""
    sections = two_seed_measure_sections
    runs = [_untuned(), _lora()]
    paths = write_report(runs, "cola", tmp_path, measures=sections)
    md, _ = summary_table(runs)
    summary = paths["summary_md"].read_text()
    assert summary.startswith(md.rstrip("\n") + "\n\n## Target learning without a threshold (--measures)\n")
    assert summary.count("(--measures)") == 1 and "### auroc" in summary and "### kl" not in summary
    forgetting = paths["forgetting_md"].read_text()
    assert forgetting.count("## Forgetting without the answer format (--measures)") == 1
    assert "### kl" in forgetting and "### auroc" not in forgetting
    assert paths["measures_md"].read_text() == sections.measures_md()
    stats = json.loads(paths["stats_json"].read_text())
    assert stats["measures"]["auroc"]["mrpc"]["LoRA"]["per_run"] == pytest.approx([1.0, 0.75])  # hand-counted pairs
    assert stats["target"] == "cola" and set(stats["labels"]) == {"untuned", "LoRA"}  # the report's own records kept
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".png"}
    write_report(runs, "cola", tmp_path, measures=sections)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".png"} == written
