"""Data: errors that name the file and line, the masked prompt, truncation that keeps the answer, sample types and
the knowledge file's mix."""

import json
import logging

import pytest
from conftest import make_tokenizer

from imsm.args import DataArguments
from imsm.data import (
    IGNORE_INDEX,
    SupervisedCollator,
    SupervisedDataset,
    encode_example,
    encode_prompt,
    knowledge_count,
    read_jsonl,
)
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


def test_truncation_cuts_prompt_from_left_and_keeps_bos_and_the_answers_eos():
    tok = make_tokenizer()
    template = build_template("raw", tok)
    ex = encode_example(template, "cat dog red blue big small", "yes no yes no", max_input_length=3,
                        max_output_length=3)
    ids = tok.convert_tokens_to_ids
    # the answer keeps its first tokens and its closing EOS, so the model still learns where an answer ends
    assert ex["input_ids"] == [tok.bos_token_id, ids("big"), ids("small"), ids("yes"), ids("no"), tok.eos_token_id]
    assert ex["query_length"] == 3


def _chat_tokenizer():
    from conftest import CHAT_TEMPLATE

    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_a_cut_chat_prompt_keeps_the_templates_header_and_assistant_turn():
    """The template renders "<s> user TEXT </s> <s> assistant": a cut takes the user's text from its left only."""
    tok = _chat_tokenizer()
    ids = tok.convert_tokens_to_ids
    frame_head, frame_tail = [ids("<s>"), tok.unk_token_id], [ids("</s>"), ids("<s>"), tok.unk_token_id]
    template = build_template("chat", tok)
    prompt = "cat dog red blue big small"
    assert encode_prompt(template, prompt, 1024) == frame_head + ids(prompt.split()) + frame_tail
    assert encode_prompt(template, prompt, 7) == frame_head + ids(["big", "small"]) + frame_tail
    ex = encode_example(template, prompt, "yes", max_input_length=6, max_output_length=8)
    assert ex["input_ids"][:ex["query_length"]] == frame_head + [ids("small")] + frame_tail


def test_a_system_turn_is_part_of_the_frame_and_kept():
    tok = _chat_tokenizer()
    ids = tok.convert_tokens_to_ids
    template = build_template("chat", tok, system_prompt="answer yes or no")
    # "<s> system answer yes or no </s>": "system" and "or" are not in the test vocabulary
    system = [ids("<s>"), tok.unk_token_id, ids("answer"), ids("yes"), tok.unk_token_id, ids("no"), ids("</s>")]
    head, tail = system + [ids("<s>"), tok.unk_token_id], [ids("</s>"), ids("<s>"), tok.unk_token_id]
    assert encode_prompt(template, "cat dog red", len(head) + len(tail) + 1) == head + [ids("red")] + tail


@pytest.mark.parametrize("name,frame", [("raw", 1), ("chat", 5)])
def test_a_max_input_length_without_room_for_the_users_text_is_refused(name, frame):
    tok = _chat_tokenizer()
    template = build_template(name, tok)
    encode_prompt(template, "cat dog red", frame + 1)
    with pytest.raises(ValueError, match=f"--max_input_length {frame}: .*{frame} tokens.* at least {frame + 1}"):
        encode_prompt(template, "cat dog red", frame)


def test_truncations_are_counted_in_one_warning_per_file(tmp_path, caplog):
    rows = [{"input": "cat dog red blue", "output": "yes no yes"},  # prompt cut by 2, answer by 2
            {"input": "cat dog", "output": "yes no yes no"},  # answer cut by 3
            {"input": "cat", "output": "yes"}]  # nothing cut
    path = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        SupervisedDataset(path, build_template("raw", make_tokenizer()), max_input_length=3, max_output_length=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "d.jsonl" in warnings[0]
    assert "1 of 3 prompts (2 tokens," in warnings[0] and "2 of 3 answers (5 tokens," in warnings[0]


def test_nothing_cut_no_warning(tmp_path, caplog):
    path = _write(tmp_path, json.dumps({"input": "cat", "output": "yes"}) + "\n")
    with caplog.at_level(logging.WARNING):
        SupervisedDataset(path, build_template("raw", make_tokenizer()), 64, 8)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


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


def _rows(tmp_path, name, rows):
    return _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), name)


@pytest.mark.parametrize("value", [2, -1, "1", True, None, 1.0])
def test_a_bad_task_type_names_file_and_line(tmp_path, value):
    path = _rows(tmp_path, "d.jsonl", [{"input": "cat", "output": "yes"},
                                       {"input": "dog", "output": "no", "task_type": value}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: 'task_type' must be 1 \(world knowledge\) or 0"):
        read_jsonl(path)


def test_types_come_from_the_field_or_default_to_task_and_reach_the_batch(tmp_path):
    path = _rows(tmp_path, "d.jsonl", [{"input": "cat", "output": "yes", "task_type": 1},
                                       {"input": "dog", "output": "no"},
                                       {"input": "red", "output": "no", "task_type": 0}])
    ds = SupervisedDataset(path, build_template("raw", make_tokenizer()), 64, 8)
    assert [ds[i]["task_type"] for i in range(3)] == [1, 0, 0]
    assert ds.mix["examples_by_type"] == {"task": 2, "world_knowledge": 1} and "knowledge_file" not in ds.mix
    batch = SupervisedCollator(pad_token_id=3)([ds[i] for i in range(3)])
    assert batch["task_types"].tolist() == [1, 0, 0]
    untyped = SupervisedCollator(pad_token_id=3)([{"input_ids": [1, 5], "labels": [-100, 5], "query_length": 1}])
    assert untyped["task_types"].tolist() == [0]


@pytest.mark.parametrize("examples,share,taken", [(None, None, 10), (3, None, 3), (None, 0.2, 2), (None, 0.5, 8)])
def test_a_knowledge_file_adds_its_first_rows_as_type_1(tmp_path, examples, share, taken):
    tasks = _rows(tmp_path, "task.jsonl", [{"input": f"Is {i} odd ?", "output": "yes"} for i in range(8)])
    knowledge = _rows(tmp_path, "k.jsonl", [{"input": f"the {w} is", "output": w}
                                            for w in ("cat", "dog", "red", "blue", "big", "small", "true", "false",
                                                      "yes", "no")])
    tok = make_tokenizer()
    ds = SupervisedDataset(tasks, build_template("raw", tok), 64, 8, knowledge_file=knowledge,
                           knowledge_examples=examples, knowledge_share=share)
    # a share s of the whole: round(s * 8 / (1 - s)) rows join the 8 task examples (0.2 -> 2, 0.5 -> 8)
    assert len(ds) == 8 + taken
    assert [ds[i]["task_type"] for i in range(len(ds))] == [0] * 8 + [1] * taken
    assert ds[8]["input_ids"][-2] == tok.convert_tokens_to_ids("cat")  # the file's first rows, in order
    assert ds.mix == {"train_file": str(tasks), "task_file_examples": 8, "knowledge_file": str(knowledge),
                      "knowledge_rows_taken": taken, "knowledge_file_examples": taken,
                      "examples_by_type": {"task": 8, "world_knowledge": taken}}


def test_knowledge_file_errors_name_the_file_and_what_to_change(tmp_path):
    tasks = _rows(tmp_path, "task.jsonl", [{"input": f"Is {i} odd ?", "output": "yes"} for i in range(8)])
    knowledge = _rows(tmp_path, "k.jsonl", [{"input": "the cat is", "output": "cat"},
                                            {"input": "the dog is", "output": "dog", "task_type": 0}])
    template = build_template("raw", make_tokenizer())
    with pytest.raises(ValueError, match=r"k\.jsonl:2: 'task_type' is 0, but every row of this file is type 1"):
        SupervisedDataset(tasks, template, 64, 8, knowledge_file=knowledge)
    knowledge = _rows(tmp_path, "k.jsonl", [{"input": "the cat is", "output": "cat"}] * 3)
    with pytest.raises(ValueError, match=r"--knowledge_examples 4 needs 4 rows of --knowledge_file .*k\.jsonl, "
                                         r"which has 3"):
        SupervisedDataset(tasks, template, 64, 8, knowledge_file=knowledge, knowledge_examples=4)
    with pytest.raises(ValueError, match=r"--knowledge_share 0\.5 of 8 task examples needs 8 rows"):
        SupervisedDataset(tasks, template, 64, 8, knowledge_file=knowledge, knowledge_share=0.5)
    with pytest.raises(ValueError, match=r"--knowledge_share 0\.01 of 8 task examples gives no knowledge row"):
        knowledge_count(knowledge, 3, 8, share=0.01)


@pytest.mark.parametrize("kw,match", [
    ({"knowledge_share": 0.1}, "need --knowledge_file"),
    ({"knowledge_examples": 3}, "need --knowledge_file"),
    ({"knowledge_file": "k", "knowledge_examples": 3, "knowledge_share": 0.1}, "not both"),
    ({"knowledge_file": "k", "knowledge_examples": 0}, "--knowledge_examples 0: must be at least 1"),
    ({"knowledge_file": "k", "knowledge_share": 1.0}, r"--knowledge_share 1\.0: must be in \(0, 1\)"),
])
def test_bad_knowledge_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DataArguments(**kw)
