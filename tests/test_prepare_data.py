"""Converters of scripts/prepare_data.py against literal prompts in the paper's format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script

SHARED_DATA = Path("/work/shared/data")
pd = load_script("prepare_data")

GSM8K_RAW = {
    "question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
    "duck egg. How much in dollars does she make every day at the farmers' market?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at "
    "the farmer’s market.\n#### 18",
}
COLA_RAW = {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}
MRPC_RAW = {
    "sentence1": "PCCW 's chief operating officer , Mike Butcher , and Alex Arena , the chief financial officer , "
    "will report directly to Mr So .",
    "sentence2": "Current Chief Operating Officer Mike Butcher and Group Chief Financial Officer Alex Arena will "
    "report to So .",
    "label": 1,
    "idx": 0,
}
WEBQ_RAW = {
    "url": "http://www.freebase.com/view/en/jamaica",
    "question": "what does jamaican people speak?",
    "answers": ["Jamaican Creole English Language", "Jamaican English"],
}
FREEBASEQA_RAW = {
    "Question-ID": "FreebaseQA-eval-0",
    "RawQuestion": "Who is the female presenter of the Channel 4 quiz show '1001 things you should know'?",
    "ProcessedQuestion": "who is the female presenter of the channel 4 quiz show '1001 things you should know'",
    "Parses": {
        "Parse-Id": ["FreebaseQA-eval-0.P0"],
        "Answers": [{"AnswersMid": ["m.0216y_"], "AnswersName": [["sandi toksvig"]]}],
    },
}


def test_gsm8k():
    row = pd.convert_gsm8k(GSM8K_RAW)
    assert row["input"] == (
        "You are an expert in math.\nBelow is a math question.\nWrite a response that appropriately answers the "
        "question.\nYour final answer should be an integer at the end of your response, formatted as: The answer is "
        "{answer}.\n" + GSM8K_RAW["question"]
    )
    assert row["output"] == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s market.\n"
        "The answer is 18."
    )


def test_gsm8k_keeps_commas_of_final_answer():
    row = pd.convert_gsm8k({"question": "Q?", "answer": "It is 1,000 + 1,125 = <<1000+1125=2125>>2,125\n#### 2,125"})
    assert row["output"] == "It is 1,000 + 1,125 = 2,125\nThe answer is 2,125."


def test_gsm8k_without_final_line():
    with pytest.raises(ValueError, match="####"):
        pd.convert_gsm8k({"question": "Q?", "answer": "no final line"})


def test_cola():
    assert pd.convert_cola(COLA_RAW) == {
        "input": " Given a sentence, judge the grammatical acceptability of the sentence with yes or no.\n"
        "Sentence:The sailors rode the breeze clear of the rocks.\nOutput:",
        "output": "yes",
    }
    assert pd.convert_cola({"sentence": "Bad.", "label": "0"})["output"] == "no"  # CSV gives strings
    assert pd.convert_cola({"sentence": "Unlabelled.", "label": -1}) is None


def test_mrpc():
    assert pd.convert_mrpc(MRPC_RAW) == {
        "input": "Determine if the following two sentences are semantically equivalent and output yes or no.\n"
        "Sentence1: PCCW 's chief operating officer , Mike Butcher , and Alex Arena , the chief financial officer , "
        "will report directly to Mr So .\nSentence2: Current Chief Operating Officer Mike Butcher and Group Chief "
        "Financial Officer Alex Arena will report to So .\nOuput:",
        "output": "yes",
    }
    assert pd.convert_mrpc({"sentence1": "a", "sentence2": "b", "label": 0})["output"] == "no"
    with pytest.raises(ValueError, match="0/1"):
        pd.convert_mrpc({"sentence1": "a", "sentence2": "b", "label": 3})


def test_ropes():
    raw = {
        "id": "1",
        "background": "Lead causes brain damage.",
        "situation": "Group B drinks water with lead.",
        "question": "Which group has a higher likely hood of brain damage?",
        "answers": {"text": ["Group B"]},
    }
    assert pd.convert_ropes(raw) == {
        "input": "Given an article and a corresponding question about the article, answer the question accurately "
        "based on the provided context in the articles.\nArticle: Lead causes brain damage. Group B drinks water with "
        "lead.\nQuestion:Which group has a higher likely hood of brain damage? \nAnswer:",
        "output": "Group B",
    }
    assert pd.convert_ropes({**raw, "answers": ["Group A"]})["output"] == "Group A"


def test_webq():
    assert pd.convert_webq(WEBQ_RAW) == {
        "input": "Please provide a concise answer to the following question using one or a few words.\n"
        "Question: what does jamaican people speak?\nAnswer:",
        "output": ["Jamaican Creole English Language", "Jamaican English"],
    }
    assert pd.convert_webq({"question": "q?", "answers": '["a", "b"]'})["output"] == ["a", "b"]  # CSV cell


def test_freebaseqa_hub_and_release_layouts():
    expected = {
        "input": "Please provide a concise answer to the following question using one or a few words.\n"
        "Question:Who is the female presenter of the Channel 4 quiz show '1001 things you should know'?\nAnswer:",
        "output": "sandi toksvig",
    }
    assert pd.convert_freebaseqa(FREEBASEQA_RAW) == expected
    release = {
        **FREEBASEQA_RAW,
        "Parses": [
            {"Parse-Id": "P0", "Answers": [{"AnswersMid": "m.1", "AnswersName": ["sandi toksvig"]}]},
            {"Parse-Id": "P1", "Answers": [{"AnswersMid": "m.2", "AnswersName": ["someone else"]}]},
        ],
    }
    assert pd.convert_freebaseqa(release) == expected


def test_multirc_question():
    paragraph = "<b>Sent 1: </b>The crash occurred about 6:45 p.m.<br><b>Sent 2: </b>Five were injured."
    row = pd.convert_multirc_question(paragraph, "Was anyone injured?", [("Yes", 1), ("No", 0), ("Five people", 1)])
    assert row == {
        "input": "Please answer the question according to the contents just with yes or no.\n"
        "Question: Was anyone injured? \nContent: The crash occurred about 6:45 p.m.    Five were injured. \nAnswer:",
        "output": "yes",
    }
    assert pd.convert_multirc_question("P.", "Who?", [("Bob", 1), ("Yes", 0)]) is None  # not a yes/no question
    assert pd.convert_multirc_question("P.", "Q?", [("yes", 1), ("No.", 1)]) is None  # contradictory labels


def test_multirc_groups_candidates_per_question():
    rows = [
        {"paragraph": "P1", "question": "Q1?", "answer": "No", "label": 1, "idx": {"paragraph": 0, "question": 0}},
        {"paragraph": "P1", "question": "Q1?", "answer": "Yes", "label": 0, "idx": {"paragraph": 0, "question": 0}},
        {"paragraph": "P1", "question": "Who?", "answer": "Ann", "label": 1, "idx": {"paragraph": 0, "question": 1}},
        {"paragraph": "P2", "question": "Q2?", "answer": "yes.", "label": 1, "idx": {"paragraph": 1, "question": 2}},
    ]
    out = pd.convert_multirc(rows)
    assert [r["output"] for r in out] == ["no", "yes"]
    assert out[1]["input"].endswith("Question: Q2? \nContent: P2 \nAnswer:")
    nested = {
        "idx": 0,
        "passage": {"text": "P1", "questions": [{"question": "Q1?", "answers": [{"text": "No", "label": 1}]}]},
    }
    assert pd.convert_multirc([nested]) == out[:1]


def test_unknown_task(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"'boolq'.*gsm8k"):
        pd.get_source("boolq")
    with pytest.raises(SystemExit):
        pd.parse_args(["--tasks", "boolq", "--out_dir", str(tmp_path)])
    assert "unknown task(s) boolq" in capsys.readouterr().err


def test_cli_local_dir_writes_prompt_files(tmp_path):
    raw = tmp_path / "raw"
    (raw / "gsm8k").mkdir(parents=True)
    (raw / "gsm8k" / "test.jsonl").write_text(json.dumps(GSM8K_RAW) + "\n")
    (raw / "mrpc").mkdir()
    with (raw / "mrpc" / "test.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MRPC_RAW))
        writer.writeheader()
        writer.writerow(MRPC_RAW)
    (raw / "freebaseqa").mkdir()
    (raw / "freebaseqa" / "test.json").write_text(json.dumps({"Dataset": "eval", "Questions": [FREEBASEQA_RAW]}))
    out = tmp_path / "out"
    pd.main(
        ["--tasks", "gsm8k", "mrpc", "freebaseqa", "--out_dir", str(out), "--local_dir", str(raw), "--splits", "test"]
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "freebaseqa/test.jsonl",
        "gsm8k/test.jsonl",
        "mrpc/test.jsonl",
    ]
    line = (out / "gsm8k" / "test.jsonl").read_text()
    assert json.loads(line) == pd.convert_gsm8k(GSM8K_RAW)
    assert line == json.dumps(pd.convert_gsm8k(GSM8K_RAW), ensure_ascii=False) + "\n"
    assert json.loads((out / "mrpc" / "test.jsonl").read_text()) == pd.convert_mrpc(MRPC_RAW)


def test_local_parquet_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "cola").mkdir()
    pq.write_table(pa.Table.from_pylist([COLA_RAW]), tmp_path / "cola" / "validation-00000-of-00001.parquet")
    rows = pd.load_raw("cola", "validation", tmp_path)
    assert rows == [COLA_RAW]


def test_local_missing_split_is_a_clear_error(tmp_path):
    (tmp_path / "cola").mkdir()
    with pytest.raises(FileNotFoundError, match="validation"):
        pd.prepare_task("cola", tmp_path / "out", tmp_path, ["test"])


def _shared_first_row(task: str) -> dict:
    path = SHARED_DATA / task / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not available")
    with path.open(encoding="utf-8") as f:
        return json.loads(f.readline())


@pytest.mark.parametrize(
    ("task", "convert", "raw"),
    [
        ("gsm8k", "convert_gsm8k", GSM8K_RAW),
        ("cola", "convert_cola", COLA_RAW),
        ("mrpc", "convert_mrpc", MRPC_RAW),
        ("webq", "convert_webq", WEBQ_RAW),
        ("freebaseqa", "convert_freebaseqa", FREEBASEQA_RAW),
    ],
)
def test_reproduces_first_row_of_shared_file(task, convert, raw):
    assert getattr(pd, convert)(raw) == _shared_first_row(task)
