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


# ---- the authors' files (--from_authors) ----------------------------------------------------------------------------

AUTHORS_LAYOUT = {"GSM8K": "gsm8k", "cola": "cola", "mrpc": "mrpc", "ropes": "ropes", "webq": "webq",
                  "freebase": "freebaseqa", "multirc": "multirc"}  # as in github.com/ECNU-Text-Computing/IMSM data/


def _authors_repo(root: Path) -> dict[tuple[str, str], list[dict]]:
    """A stand-in clone: data/<folder>/data_{train,test}.json, one object a line as the authors write them (compact
    separators in GSM8K, ", " elsewhere), training splits for the four target tasks."""
    rows = {}
    for folder, task in AUTHORS_LAYOUT.items():
        for split in ("train", "test") if task in ("gsm8k", "cola", "mrpc", "ropes") else ("test",):
            sample = [{"input": f"{task} {split} prompt {i}\nAnswer:", "output": ["a", "b"] if task == "webq" else
                       f"answer {i}"} for i in range(3)]
            separators = (",", ":") if folder == "GSM8K" else (", ", ": ")
            path = root / "data" / folder / f"data_{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, separators=separators) + "\n" for r in sample))
            rows[task, split] = sample
    return rows


@pytest.mark.parametrize("from_data_folder", [False, True])
def test_from_authors_copies_every_published_split(tmp_path, from_data_folder):
    rows = _authors_repo(tmp_path / "IMSM")
    out = tmp_path / "out"
    pd.main(["--out_dir", str(out), "--from_authors", str(tmp_path / "IMSM" / ("data" if from_data_folder else ""))])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.jsonl"))
    assert written == sorted(f"{task}/{split}.jsonl" for task, split in rows)
    for (task, split), expected in rows.items():
        assert [json.loads(line) for line in (out / task / f"{split}.jsonl").read_text().splitlines()] == expected
    assert (out / "ropes" / "train.jsonl").is_file()  # the authors publish ROPES's training split


def test_from_authors_reproduces_the_shared_published_files(tmp_path):
    """The shared test files are the authors' files (data/README.md): copied through --from_authors they come back
    row for row."""
    if not (SHARED_DATA / "mrpc" / "test.jsonl").exists():
        pytest.skip("shared data not available")
    folder = tmp_path / "data" / "mrpc"
    folder.mkdir(parents=True)
    (folder / "data_test.json").write_bytes((SHARED_DATA / "mrpc" / "test.jsonl").read_bytes())
    (folder / "data_train.json").write_bytes((SHARED_DATA / "mrpc" / "train.jsonl").read_bytes())
    pd.main(["--tasks", "mrpc", "--out_dir", str(tmp_path / "out"), "--from_authors", str(tmp_path)])
    for split in ("train", "test"):
        ours = (tmp_path / "out" / "mrpc" / f"{split}.jsonl").read_text().splitlines()
        published = (SHARED_DATA / "mrpc" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in ours] == [json.loads(line) for line in published]


def test_from_authors_errors_name_the_file_and_line(tmp_path):
    _authors_repo(tmp_path)
    (tmp_path / "data" / "ropes" / "data_train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ropes: .*data/ropes/data_train.json not found"):
        pd.prepare_from_authors("ropes", tmp_path, tmp_path / "out")
    path = tmp_path / "data" / "cola" / "data_test.json"
    path.write_text('{"input": "p", "output": "yes"}\n{"input": "p", "label": 1}\n')
    with pytest.raises(ValueError, match=r"cola/data_test.json:2: expected \{\"input\": a string, \"output\""):
        pd.prepare_from_authors("cola", tmp_path, tmp_path / "out", ["test"])
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        pd.prepare_from_authors("cola", tmp_path, tmp_path / "out", ["test"])
    with pytest.raises(SystemExit):
        pd.parse_args(["--out_dir", "o", "--from_authors", "a", "--local_dir", "b"])


# ---- the Hub route under datasets 5 (no loading scripts), on a stand-in Hub ---------------------------------------

ROPES_RAW = {"id": "1", "background": "Lead causes brain damage.", "situation": "Group B drinks lead.",
             "question": "Which group?", "answers": {"text": ["Group B"]}}
MULTIRC_RAW = [{"paragraph": "P.", "question": "Is it?", "answer": "Yes", "label": 1,
                "idx": {"paragraph": 0, "question": 0, "answer": 0}},
               {"paragraph": "P.", "question": "Is it?", "answer": "No", "label": 0,
                "idx": {"paragraph": 0, "question": 0, "answer": 1}}]


def _configs_card(configs: dict[str, dict[str, str]], default: str | None = None) -> str:
    """A dataset card declaring configurations and their files, as the Hub's parquet repositories do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}"] + (["  default: true"] if name == default else []) + ["  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern}" for split, pattern in splits.items()]
    return "\n".join([*lines, "---", ""])


def _stand_in_hub(hub: Path) -> None:
    """Each repository as the Hub holds it: parquet with a card naming its configurations; the two loading-script
    repositories (a ``<name>.py`` on main) with the Hub's parquet export under ``refs/convert/parquet``
    (``<config>/<split>/0000.parquet``)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def put(repo: str, path: str, rows: list[dict]) -> None:
        target = hub / repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), target)

    for split in ("train", "test"):
        put("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", [GSM8K_RAW])
    (hub / "openai/gsm8k/README.md").write_text(_configs_card(
        {"main": {"train": "main/train-*", "test": "main/test-*"}}))
    for config, raw in (("cola", COLA_RAW), ("mrpc", MRPC_RAW)):
        for split in ("train", "validation", "test"):
            put("nyu-mll/glue", f"{config}/{split}-00000-of-00001.parquet", [raw])
    (hub / "nyu-mll/glue/README.md").write_text(_configs_card(
        {c: {s: f"{c}/{s}-*" for s in ("train", "validation", "test")} for c in ("cola", "mrpc")}))
    for split in ("train", "validation"):
        put("allenai/ropes", f"plain_text/{split}-00000-of-00001.parquet", [ROPES_RAW])
    (hub / "allenai/ropes/README.md").write_text(_configs_card(
        {"plain_text": {s: f"plain_text/{s}-*" for s in ("train", "validation")}}, default="plain_text"))
    for split in ("train", "test"):
        put("stanfordnlp/web_questions", f"data/{split}-00000-of-00001.parquet", [WEBQ_RAW])
    for repo, script, config, split, rows in (
            ("kelvin-jiang/freebase-qa", "freebase-qa.py", "default", "test", [FREEBASEQA_RAW]),
            ("aps/super_glue", "super_glue.py", "multirc", "validation", MULTIRC_RAW)):
        (hub / repo).mkdir(parents=True)
        (hub / repo / script).write_text("import datasets  # a loading script\n")
        put(f"{repo}@refs/convert/parquet", f"{config}/{split}/0000.parquet", rows)


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    """datasets.load_dataset itself (5.x), pointed at the stand-in Hub's folder for the repository and revision."""
    datasets = pytest.importorskip("datasets")
    hub = tmp_path / "hub"
    _stand_in_hub(hub)
    real = datasets.load_dataset

    def load_dataset(path, name=None, *, split=None, revision=None, data_dir=None):
        folder = hub / (f"{path}@{revision}" if revision else path)
        assert folder.is_dir(), f"{path} (revision {revision}) is not on the Hub"
        return real(str(folder), name, split=split, data_dir=data_dir, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub


def test_every_hub_id_loads_without_a_loading_script(tmp_path, stand_in_hub):
    out = tmp_path / "out"
    for task in pd.SOURCES:
        pd.prepare_task(task, out)
    first = {f"{task}/{split}": json.loads((out / task / f"{split}.jsonl").read_text().splitlines()[0])
             for task, source in pd.SOURCES.items() for split in source.splits}
    assert len(first) == 11
    for task, raw in (("gsm8k", GSM8K_RAW), ("cola", COLA_RAW), ("mrpc", MRPC_RAW), ("webq", WEBQ_RAW),
                      ("freebaseqa", FREEBASEQA_RAW)):
        if (SHARED_DATA / task / "test.jsonl").exists():
            assert first[f"{task}/test"] == _shared_first_row(task)  # the published row, through the Hub route
    assert first["ropes/train"]["output"] == "Group B" and first["multirc/test"]["output"] == "yes"


def test_a_loading_script_repository_is_a_clear_error(tmp_path, stand_in_hub, monkeypatch):
    """Without the parquet export's revision, FreebaseQA's repository is its loading script, which datasets 5
    refuses: the error names the task and the routes that work."""
    monkeypatch.setitem(pd.SOURCES, "freebaseqa", pd.Source("kelvin-jiang/freebase-qa", None, {"test": "test"},
                                                            pd.SOURCES["freebaseqa"].convert))
    with pytest.raises(RuntimeError, match=r"freebaseqa: .*holds a loading script.*--from_authors"):
        pd.prepare_task("freebaseqa", tmp_path / "out")
