"""Data: errors that name the file and line, the masked prompt, truncation that keeps the answer."""

import json
import logging

import pytest
from conftest import make_tokenizer

from imsm.data import IGNORE_INDEX, SupervisedCollator, SupervisedDataset, encode_example, read_jsonl
from imsm.templates import build_template

pytestmark = pytest.mark.usefixtures("single_thread")


def _write(tmp_path, text, name="d.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ('{"input": "a", "output": "b"}\n{"input": "a", "output": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"input": "a", "output": "b"}\n{"output": "b"}\n', r"d\.jsonl:2: missing field 'input'"),
    ('{"input": "a"}\n', r"d\.jsonl:1: missing field 'output'"),
    ('["a", "b"]\n', r"d\.jsonl:1: expected a JSON object"),
    ('{"input": "a", "output": 3}\n', r"d\.jsonl:1: 'output' must be a string"),
    ('{"input": "a", "output": []}\n', r"d\.jsonl:1: 'output' list must hold"),
    ("\n\n", r"d\.jsonl: empty file"),
])
def test_bad_input_names_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_jsonl(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_prompt_masked_and_eos_closes_answer():
    tok = make_tokenizer()
    template = build_template("raw", tok)
    ex = encode_example(template, "Question: Is 3 odd ? Output:", "yes", 64, 8)
    prompt_ids = tok("Question: Is 3 odd ? Output:")["input_ids"]
    assert ex["input_ids"] == prompt_ids + [tok.convert_tokens_to_ids("yes"), tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + [tok.convert_tokens_to_ids("yes"), tok.eos_token_id]
    assert ex["query_length"] == len(prompt_ids)


def test_truncation_cuts_prompt_from_left_and_keeps_bos_and_answer():
    tok = make_tokenizer()
    template = build_template("raw", tok)
    ex = encode_example(template, "cat dog red blue big small", "yes no yes no", max_input_length=3,
                        max_output_length=2)
    ids = tok.convert_tokens_to_ids
    assert ex["input_ids"] == [tok.bos_token_id, ids("big"), ids("small"), ids("yes"), ids("no")]
    assert ex["query_length"] == 3


def test_list_output_trains_on_first_and_empty_answers_dropped(tmp_path, caplog):
    rows = [{"input": "Is 1 odd ?", "output": ["yes", "true"]}, {"input": "Is 2 odd ?", "output": "  "}]
    path = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tokenizer()
    with caplog.at_level(logging.WARNING):
        ds = SupervisedDataset(path, build_template("raw", tok), 64, 8)
    assert len(ds) == 1 and ds[0]["input_ids"][-2] == tok.convert_tokens_to_ids("yes")
    assert "dropped 1 of 2 examples" in caplog.text and "d.jsonl" in caplog.text


def test_collator_pads_right_and_marks_query():
    batch = SupervisedCollator(pad_token_id=3)([
        {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7], "query_length": 2},
        {"input_ids": [1, 5], "labels": [-100, 5], "query_length": 1},
    ])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 5, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["query_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 5, -100, -100]]
