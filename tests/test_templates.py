"""Prompt templates: raw and chat, the answer boundary, and the promised error for a tokenizer without a template."""

import pytest
from conftest import CHAT_TEMPLATE, make_tokenizer

from imsm.data import encode_example
from imsm.templates import build_template

pytestmark = pytest.mark.usefixtures("single_thread")



def _chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_chat_without_template_fails_with_clear_message():
    with pytest.raises(ValueError, match="has no chat template; use --prompt_template raw"):
        build_template("chat", make_tokenizer())


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        build_template("alpaca", make_tokenizer())


@pytest.mark.parametrize("name", ["raw", "chat"])
def test_training_example_is_prompt_then_answer_without_duplicated_bos(name):
    tok = _chat_tokenizer()
    template = build_template(name, tok)
    prompt = "Question: Is 3 odd ? Output:"
    ex = encode_example(template, prompt, "yes", 64, 8)
    prompt_ids = template.encode_prompt(prompt)
    assert ex["input_ids"][: ex["query_length"]] == prompt_ids
    assert prompt_ids.count(tok.bos_token_id) == (1 if name == "raw" else 2)  # chat: one per turn, none doubled
    answer = ex["input_ids"][ex["query_length"]:]
    assert answer == [tok.convert_tokens_to_ids("yes"), tok.eos_token_id]
    assert all(label == -100 for label in ex["labels"][: ex["query_length"]])


def test_chat_prompt_is_the_rendered_user_turn_and_generation_prompt():
    tok = _chat_tokenizer()
    ids = build_template("chat", tok).encode_prompt("Is 3 odd ?")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<unk>", "Is", "3", "odd", "?", "</s>", "<s>", "<unk>"]


def test_system_prompt_goes_first():
    tok = _chat_tokenizer()
    with_system = build_template("chat", tok, system_prompt="answer yes or no").encode_prompt("Is 3 odd ?")
    without = build_template("chat", tok).encode_prompt("Is 3 odd ?")
    assert with_system[-len(without):] == without and len(with_system) > len(without)


@pytest.mark.parametrize("name,system", [("raw", None), ("chat", None), ("chat", "answer yes or no")])
def test_a_prompt_splits_into_frame_and_the_users_text(name, system):
    tok = _chat_tokenizer()
    template = build_template(name, tok, system_prompt=system)
    prompt = "Question: Is 3 odd ? Output:"
    head, text, tail = template.prompt_parts(prompt)
    assert head + text + tail == template.encode_prompt(prompt)
    assert text == tok.convert_tokens_to_ids(prompt.split())  # exactly the user's words
    assert head[0] == tok.bos_token_id and (tail == [] if name == "raw" else len(tail) == 3)
