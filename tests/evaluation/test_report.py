"""Report tables and plot from hand-made results."""

from __future__ import annotations

import csv
import io

import pytest

from imsm.evaluation.report import RunResult, forgetting_table, plot_forgetting, summary_table, write_report

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
    assert paths["forgetting_md"].read_text().endswith(forgetting_table([_untuned(), _lora()], "cola"))
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
