"""evaluate.py and the lm-eval model never use the wrong model or delete what they did not write (issue 21): a final/
older than the newest complete checkpoint is refused (or, named explicitly, warned about), an interrupted checkpoint is
refused as a run, --overwrite replaces only an earlier evaluate.py report, and bad arguments and data are refused
before anything is written. Issue 30: a report is never rebuilt from emptied, short or damaged saved files (the error
names the file), one run is never two seeds, and a kill right after the marker does not block the folder."""

import json
import logging
from pathlib import Path

import pytest
from conftest import save_random_run

import evaluate
from imsm import run_folder
from imsm.evaluation.harness import IMSMLM
from imsm.evaluation.output_dir import EVALUATION_MARKER

ROWS = [{"input": f"Question: Is {i} odd ? Output:", "output": "yes" if i % 2 else "no"} for i in range(3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test here runs on tiny matrices."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("data")
    (base / "mrpc").mkdir()
    (base / "mrpc" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return base


def _run_at(model_dir, folder: Path, step: int | None, seed: int = 0, complete: bool = True) -> Path:
    save_random_run(model_dir, folder, "query_aware", seed=seed)
    if complete:
        run_folder.mark_complete(folder, step)
    return folder


@pytest.fixture(scope="module")
def stale_run(tiny_model_dir, tmp_path_factory) -> Path:
    """An output folder whose final/ holds step 8 while checkpoint-10 is complete: a kill while the step-10 final was
    staged, or a continued run still training."""
    out = tmp_path_factory.mktemp("stale")
    _run_at(tiny_model_dir, out / "checkpoint-8", 8, seed=1)
    _run_at(tiny_model_dir, out / "checkpoint-10", 10, seed=2)
    _run_at(tiny_model_dir, out / "final", 8, seed=1)
    return out


def _argv(model_dir, data_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--tasks", "mrpc", "--score", "likelihood", "--batch_size", "3", *extra]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- 1. a final/ older than the newest complete checkpoint -------------------------------------------------------
def test_a_stale_final_is_refused_as_the_run(tiny_model_dir, data_dir, stale_run, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"final holds step 8, but .*checkpoint-10 \(step 10\) is newer"):
        evaluate.main(_argv(tiny_model_dir, data_dir, out, "--run", str(stale_run)))
    assert _listing(out) == []
    with pytest.raises(ValueError, match=r"final.* step 8.*checkpoint-10"):
        IMSMLM(run=str(stale_run))


def test_a_stale_final_named_explicitly_is_used_with_a_warning(tiny_model_dir, data_dir, stale_run, tmp_path,
                                                              caplog):
    with caplog.at_level(logging.WARNING):
        evaluate.main(_argv(tiny_model_dir, data_dir, tmp_path / "eval", "--run", str(stale_run / "final")))
    assert "step 8" in caplog.text and "checkpoint-10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        IMSMLM(run=str(stale_run / "final"))
    assert "step 8" in caplog.text and "checkpoint-10" in caplog.text


def test_an_up_to_date_final_passes_without_a_word(tiny_model_dir, stale_run, tmp_path, caplog):
    out = tmp_path / "run"
    _run_at(tiny_model_dir, out / "checkpoint-10", 10)
    _run_at(tiny_model_dir, out / "final", 10)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_folder.resolve_for_evaluation(out) == out / "final"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---- 7. an interrupted checkpoint is not a run ----------------------------------------------------------------
def test_a_checkpoint_without_complete_is_refused(tiny_model_dir, data_dir, tmp_path):
    interrupted = _run_at(tiny_model_dir, tmp_path / "run" / "checkpoint-3", None, complete=False)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"checkpoint-3: an interrupted save \(no COMPLETE\)"):
        evaluate.main(_argv(tiny_model_dir, data_dir, out, "--run", str(interrupted)))
    assert _listing(out) == []
    with pytest.raises(ValueError, match=r"checkpoint-3: an interrupted save \(no COMPLETE\)"):
        IMSMLM(run=str(interrupted))


def test_a_folder_saved_from_python_without_complete_is_used_with_a_warning(tiny_model_dir, tmp_path, caplog):
    """save_run_files called directly (not train.py): nothing says whether it was saved whole."""
    folder = _run_at(tiny_model_dir, tmp_path / "exported", None, complete=False)
    with caplog.at_level(logging.WARNING):
        assert run_folder.resolve_for_evaluation(folder) == folder
    assert "has no COMPLETE" in caplog.text


# ---- 2. --overwrite replaces only an earlier report ----------------------------------------------------------------
def test_overwrite_never_empties_a_trained_run_or_another_folder(tiny_model_dir, data_dir, tmp_path):
    trained = tmp_path / "trained"
    _run_at(tiny_model_dir, trained / "checkpoint-2", 2)
    _run_at(tiny_model_dir, trained / "final", 2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for folder in (trained, other):
        before = _listing(folder)
        with pytest.raises(FileExistsError, match=f"--output_dir {folder} .*not an evaluate.py report"):
            evaluate.main(_argv(tiny_model_dir, data_dir, folder, "--untuned", "--overwrite"))
        assert _listing(folder) == before


def test_overwrite_replaces_an_earlier_report_recognised_by_its_marker(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(_argv(tiny_model_dir, data_dir, out, "--untuned"))
    marker = json.loads((out / EVALUATION_MARKER).read_text())
    assert "command" in marker
    (out / "stale.txt").write_text("left by the earlier evaluation")
    evaluate.main(_argv(tiny_model_dir, data_dir, out, "--untuned", "--labels", "base", "--overwrite"))
    assert not (out / "stale.txt").exists() and (out / "base").is_dir() and not (out / "untuned").exists()
    assert (out / EVALUATION_MARKER).is_file()


# ---- 5 and 7. bad arguments and data, before anything is written ----------------------------------------------
@pytest.mark.parametrize("extra,error,message", [
    (("--untuned", "--target", "gsm8k"), ValueError, r"--target gsm8k is not one of --tasks \(mrpc\)"),
    (("--untuned", "--labels", "line\nbreak"), ValueError, r"label 'line\\nbreak'.*control character"),
    (("--untuned", "--labels", "tab\there"), ValueError, r"control character"),
])
def test_bad_arguments_are_refused(tiny_model_dir, data_dir, tmp_path, extra, error, message):
    out = tmp_path / "eval"
    with pytest.raises(error, match=message):
        evaluate.main(_argv(tiny_model_dir, data_dir, out, *extra))
    assert _listing(out) == []


def test_a_non_utf8_task_file_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "mrpc.jsonl"
    bad.write_bytes(b'{"input": "Is 1 odd ?", "output": "yes"}\n{"input": "\xff", "output": "no"}\n')
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"mrpc\.jsonl:2: not UTF-8 text \(byte 0xff at column 12\)"):
        evaluate.main(["--model_name_or_path", str(tiny_model_dir), "--task_file", f"mrpc={bad}", "--tasks", "mrpc",
                       "--untuned", "--output_dir", str(out)])
    assert _listing(out) == []


# ---- issue 30: damaged or missing saved files, duplicate runs, a kill right after the marker ----------------------
@pytest.fixture(scope="module")
def report(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    """A finished report of the untuned model and one IMSM run (likelihood scoring on mrpc)."""
    base = tmp_path_factory.mktemp("report")
    run = _run_at(tiny_model_dir, base / "run", 4)
    out = base / "eval"
    evaluate.main(_argv(tiny_model_dir, data_dir, out, "--untuned", "--run", str(run), "--labels", "untuned,IMSM",
                        "--target", "mrpc"))
    return out


def _copy(report: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(report, tmp_path / "eval"))


def test_report_only_refuses_an_emptied_predictions_file_naming_it(report, tmp_path):
    """An empty predictions.jsonl rewrote the report with "-" cells, rc 0; a short one is refused the same way."""
    out = _copy(report, tmp_path)
    summary = (out / "summary.md").read_text()
    predictions = out / "IMSM" / "mrpc" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    for cut in ("", "".join(lines[:-1])):
        predictions.write_text(cut)
        with pytest.raises(ValueError, match=f"{predictions} holds {len(cut.splitlines())} prediction rows, but the "
                                             f"evaluation scored {len(ROWS)}"):
            evaluate.main(["--report_only", str(out)])
        assert (out / "summary.md").read_text() == summary


@pytest.mark.parametrize("damaged", ["IMSM/mrpc/metrics.json", "report_inputs.json", "IMSM/results.json",
                                     "IMSM/mrpc/predictions.jsonl"])
def test_damaged_json_names_the_file(report, tmp_path, damaged):
    out = _copy(report, tmp_path)
    path = out / damaged
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # cut mid-line, as a full disk or a kill leaves it
    with pytest.raises(ValueError, match=f"{path}(, line \\d+:)? (is damaged: )?not JSON"):
        evaluate.main(["--report_only", str(out)])


def test_a_damaged_or_missing_measures_json_is_named(tmp_path):
    """merge_measures dropped a model whose measures.json was missing (rc 0), and a damaged one gave a bare
    JSONDecodeError; --bootstrap_resamples 0 a TypeError."""
    from conftest import load_script

    merge_measures = load_script("merge_measures")
    folder = tmp_path / "eval_measures"
    for label in ("untuned", "LoRA"):
        (folder / label).mkdir(parents=True)
    (folder / EVALUATION_MARKER).write_text("{}")
    (folder / "report_inputs.json").write_text(json.dumps({"folders": ["untuned", "LoRA"], "target": "mrpc"}))
    (folder / "untuned" / "measures.json").write_text(json.dumps({"label": "untuned", "untuned": True}))
    with pytest.raises(SystemExit, match=f"{folder / 'LoRA' / 'measures.json'}"):
        merge_measures.read_report(folder)
    (folder / "LoRA" / "measures.json").write_text('{"label": "Lo')
    with pytest.raises(SystemExit, match=f"{folder / 'LoRA' / 'measures.json'} is damaged"):
        merge_measures.read_report(folder)
    with pytest.raises(SystemExit) as exit_info:
        merge_measures.main([str(folder), str(folder), "--out", str(tmp_path / "m"), "--target", "mrpc",
                             "--bootstrap_resamples", "0"])
    assert exit_info.value.code == 2


def test_one_run_twice_under_one_label_is_refused(tiny_model_dir, data_dir, tmp_path):
    """One run evaluated twice under one label counted as two seeds (sd 0, intervals too narrow)."""
    run = _run_at(tiny_model_dir, tmp_path / "run", 4)
    other = _run_at(tiny_model_dir, tmp_path / "other", 4, seed=1)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=f"label 'IMSM' holds the run {run} twice"):
        evaluate.main(_argv(tiny_model_dir, data_dir, out, "--run", str(run), str(other), str(run), "--labels",
                            "IMSM,IMSM,IMSM"))
    assert not out.exists()
    import reproduce

    with pytest.raises(SystemExit):
        reproduce.parse_args(["table2", "--seeds", "1,1"])


def test_an_evaluation_killed_right_after_its_marker_is_started_again(tiny_model_dir, data_dir, tmp_path):
    """Killed between writing imsm_evaluation.json and INCOMPLETE: every rerun said "already holds results; pass
    --overwrite" until the folder was deleted by hand."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / EVALUATION_MARKER).write_text('{"written_by": "imsm evaluate.py"}')
    evaluate.main(_argv(tiny_model_dir, data_dir, out, "--untuned"))
    assert (out / "untuned" / "mrpc" / "predictions.jsonl").is_file() and not (out / "INCOMPLETE").exists()
    # a live evaluation (its INCOMPLETE beside the marker) is still refused without --overwrite
    live = tmp_path / "live"
    live.mkdir()
    (live / EVALUATION_MARKER).write_text("{}")
    (live / "INCOMPLETE").write_text("under way")
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.main(_argv(tiny_model_dir, data_dir, live, "--untuned"))
