"""Metrics checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from imsm.evaluation.measures.metrics import (
    TASKS,
    TaskSpec,
    compute_metrics,
    extract_gsm8k_answer,
    get_task,
    normalize_answer,
    read_yes_no,
)


def test_task_table():
    assert set(TASKS) == {"gsm8k", "mrpc", "cola", "ropes", "webq", "freebaseqa", "multirc"}
    assert get_task("cola") == TaskSpec("cola", "yesno", 4, "mcc", "CoLA")
    assert (get_task("gsm8k").max_new_tokens, get_task("ropes").max_new_tokens, get_task("webq").max_new_tokens) == (
        256,
        16,
        24,
    )
    assert {t: s.primary for t, s in TASKS.items()} == {
        "gsm8k": "accuracy",
        "mrpc": "accuracy",
        "cola": "mcc",
        "ropes": "f1",
        "webq": "contain",
        "freebaseqa": "contain",
        "multirc": "accuracy",
    }
    assert [s.display for s in TASKS.values()] == ["GSM8K", "MRPC", "CoLA", "ROPES", "WebQ", "FreebaseQA", "MultiRC"]


def test_unknown_task_names_known_ones():
    with pytest.raises(ValueError, match=r"'boolq'.*gsm8k.*multirc"):
        get_task("boolq")
    with pytest.raises(ValueError, match="boolq"):
        compute_metrics("boolq", ["yes"], ["yes"])


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        compute_metrics("mrpc", ["yes", "no"], ["yes"])


def test_normalize_answer():
    assert normalize_answer("  The  Cat's, an APPLE!\n") == "cats apple"
    assert normalize_answer("Theater a") == "theater"  # articles only as whole words
    assert normalize_answer("") == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18.\nThe answer is 18.", "18"),
        ("The answer is 18.0", "18"),
        ("The answer is $1,000.", "1000"),
        ("#### 1,000", "1000"),
        ("We lose 5.\n#### -3", "-3"),
        ("The answer is -2.50 dollars", "-2.5"),
        ("The answer is 0.5", "0.5"),
        ("3 + 4 = 7 and then 7 * 2 = 14", "14"),  # no marker: last number
        ("The answer is 12. Then 13. The answer is 14.", "12"),  # first marker wins
        ("#### 5 then The answer is 6", "5"),
        ("The answer is unknown, maybe 8 or 9", "8"),  # first number after the marker
        ("x = 4. The answer is unclear", "4"),  # no number after the marker: last number overall
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_equal_numbers_give_equal_strings():
    assert extract_gsm8k_answer("18.0") == extract_gsm8k_answer("18") == extract_gsm8k_answer("The answer is 18.00")
    assert extract_gsm8k_answer("1,000") == extract_gsm8k_answer("1000")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("  NO", "no"),
        ("No, yes is wrong", "no"),
        ("yes\nno", "yes"),
        ('"Yes"', "yes"),
        ("**No**", "no"),
        ("The answer is yes", None),
        ("Yesterday", None),
        ("yes/no", None),
        ("", None),
        ("   ", None),
    ],
)
def test_read_yes_no(text, expected):
    assert read_yes_no(text) == expected


def test_gsm8k_accuracy():
    golds = ["... The answer is 18.", "#### 1,000", "The answer is 3.", "The answer is 7."]
    preds = ["so 18.0 in total. The answer is 18.", "The answer is 1000.", "", "I don't know"]
    m = compute_metrics("gsm8k", preds, golds)
    assert m == {"accuracy": 0.5, "n": 4}


def test_gsm8k_none_never_matches():
    assert compute_metrics("gsm8k", ["no number"], ["no number either"])["accuracy"] == 0.0


def test_mrpc_accuracy_f1_rates():
    golds = ["yes", "yes", "yes", "no", "no", "yes"]
    preds = ["Yes", "yes.", "no", "yes", "No", "maybe"]
    # tp=2 (rows 0,1), fp=1 (row 3), fn=2 (row 2 read no, row 5 invalid); correct = rows 0,1,4.
    m = compute_metrics("mrpc", preds, golds)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert m["yes_rate"] == pytest.approx(3 / 6)
    assert m["invalid_rate"] == pytest.approx(1 / 6)
    assert m["n"] == 6


def test_mrpc_no_positive_predictions_f1_zero():
    m = compute_metrics("mrpc", ["no", "no"], ["no", "no"])
    assert m["f1"] == 0.0 and m["accuracy"] == 1.0


def test_cola_mcc_by_hand():
    # tp=3, tn=2, fp=1, fn=1
    golds = ["yes"] * 3 + ["no"] * 2 + ["no"] + ["yes"]
    preds = ["yes"] * 3 + ["no"] * 2 + ["yes"] + ["no"]
    tp, tn, fp, fn = 3, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = compute_metrics("cola", preds, golds)
    assert m["mcc"] == pytest.approx(expected)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["yes_rate"] == pytest.approx(4 / 7)
    assert m["invalid_rate"] == 0.0


def test_cola_invalid_counts_as_wrong_class():
    # Row 6 is invalid with gold "no" -> scored as "yes" (fp); row 7 invalid with gold "yes" -> scored "no" (fn).
    golds = ["yes"] * 3 + ["no"] * 2 + ["no"] + ["yes"]
    preds = ["yes"] * 3 + ["no"] * 2 + ["", "The answer is yes"]
    tp, tn, fp, fn = 3, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = compute_metrics("cola", preds, golds)
    assert m["mcc"] == pytest.approx(expected)
    assert m["invalid_rate"] == pytest.approx(2 / 7)
    assert m["yes_rate"] == pytest.approx(3 / 7)  # invalid answers are not counted as yes


@pytest.mark.parametrize("pred", ["yes", "no"])
def test_cola_single_class_mcc_is_zero(pred):
    m = compute_metrics("cola", [pred] * 4, ["yes", "no", "yes", "yes"])
    assert m["mcc"] == 0.0
    assert not math.isnan(m["mcc"])


def test_cola_perfect_and_inverted():
    golds = ["yes", "no", "yes", "no"]
    assert compute_metrics("cola", golds, golds)["mcc"] == pytest.approx(1.0)
    flipped = ["no", "yes", "no", "yes"]
    assert compute_metrics("cola", flipped, golds)["mcc"] == pytest.approx(-1.0)


def test_multirc():
    m = compute_metrics("multirc", ["yes", "No.", "", "perhaps"], ["yes", "no", "no", "yes"])
    assert m == {"accuracy": 0.5, "yes_rate": 0.25, "invalid_rate": 0.5, "n": 4}
    assert "f1" not in m and "mcc" not in m


def test_yes_no_gold_must_be_yes_or_no():
    with pytest.raises(ValueError, match="gold"):
        compute_metrics("multirc", ["yes"], ["maybe"])


def test_ropes_em_and_token_f1():
    # pred tokens {group, b, is}; gold "Group B" -> {group, b}: common 2, F1 = 2*2/(3+2) = 0.8
    m = compute_metrics("ropes", ["Group B is", "the Group A.", ""], ["Group B", "group a", "Group A"])
    assert m["em"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["f1"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert m["n"] == 3


def test_ropes_max_over_golds():
    # vs "more rain": common {rain} -> 2*1/(2+2)=0.5 ; vs "heavy rain fall": common {heavy, rain} -> 2*2/(2+3)=0.8
    m = compute_metrics("ropes", ["heavy rain"], [["more rain", "heavy rain fall"]])
    assert m["f1"] == pytest.approx(0.8)
    assert m["em"] == 0.0


def test_ropes_repeated_tokens_counted_once_each():
    # "rain rain rain" vs "rain": common = min(3, 1) = 1 -> F1 = 2*1/(3+1) = 0.5
    assert compute_metrics("ropes", ["rain rain rain"], ["rain"])["f1"] == pytest.approx(0.5)


def test_qa_contain_and_em_with_list_golds():
    golds = [["Jamaican Creole English Language", "Jamaican English"], ["Lawyer"], "sandi toksvig", ["x"]]
    preds = ["They speak Jamaican English.", "a lawyer", "Sue Perkins", ""]
    m = compute_metrics("webq", preds, golds)
    assert m["contain"] == pytest.approx(2 / 4)
    assert m["em"] == pytest.approx(1 / 4)  # "a lawyer" normalizes to "lawyer"
    assert m["n"] == 4


def test_qa_empty_normalized_gold_never_counts():
    m = compute_metrics("freebaseqa", ["anything at all", "the"], ["the", ["!!", "a"]])
    assert m["contain"] == 0.0 and m["em"] == 0.0


def test_freebaseqa_contain_substring():
    m = compute_metrics("freebaseqa", ["Sandi Toksvig presents it", "Toksvig"], ["sandi toksvig", "sandi toksvig"])
    assert m["contain"] == pytest.approx(0.5)
    assert m["em"] == 0.0


@pytest.mark.parametrize("task", list(TASKS))
def test_empty_prediction_wrong_everywhere(task):
    gold = {"gsm8k": "The answer is 0.", "ropes": "Group B", "webq": ["Lawyer"], "freebaseqa": "spain"}.get(task, "no")
    m = compute_metrics(task, [""], [gold])
    for key, value in m.items():
        if key == "n":
            assert value == 1
        elif key in ("invalid_rate",):
            assert value == 1.0
        elif key == "mcc":
            assert value <= 0.0
        else:
            assert value == 0.0, (task, key)


@pytest.mark.parametrize("task", list(TASKS))
def test_empty_lists(task):
    m = compute_metrics(task, [], [])
    assert m["n"] == 0
    assert all(v == 0.0 for v in m.values())


# Hand-made answers: what each rule reads, stated independently of the code.
#   answer                     first_word   anywhere ("yes" as a substring, lower-cased, as the published code)
RULE_CASES = [
    ("Yes.", "yes", "yes"),
    ("no", "no", "no"),
    ("The answer is yes", None, "yes"),
    ("No, yes is wrong", "no", "yes"),
    ("Eyes closed", None, "yes"),
    ("maybe", None, "no"),
    ("", None, "no"),
]


@pytest.mark.parametrize("answer,first_word,anywhere", RULE_CASES)
def test_the_two_yes_no_rules_read_hand_made_answers(answer, first_word, anywhere):
    from imsm.evaluation.measures.metrics import YES_NO_RULES

    assert YES_NO_RULES["first_word"](answer) == first_word
    assert YES_NO_RULES["anywhere"](answer) == anywhere


def test_the_published_rule_scores_mrpc_and_cola_as_the_published_code():
    answers = [a for a, _, _ in RULE_CASES]
    golds = ["yes", "no", "yes", "no", "no", "no", "yes"]
    # anywhere: read yes, no, yes, yes, yes, no, no -> correct: 1, 1, 1, 0, 0, 1, 0; never invalid
    m = compute_metrics("mrpc", answers, golds, yes_no_rule="anywhere")
    assert m["accuracy"] == pytest.approx(4 / 7) and m["invalid_rate"] == 0 and m["yes_rate"] == pytest.approx(4 / 7)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # tp 2, fp 2 (rows 3, 4), fn 1 (row 6)
    tp, tn, fp, fn = 2, 2, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics("cola", answers, golds, yes_no_rule="anywhere")["mcc"] == pytest.approx(mcc)
    # first word: read yes, no, -, no, -, -, - -> correct: 1, 1, 0, 1, 0, 0, 0
    m = compute_metrics("mrpc", answers, golds)
    assert m["accuracy"] == pytest.approx(3 / 7) and m["invalid_rate"] == pytest.approx(4 / 7)


def test_an_unknown_yes_no_rule_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        compute_metrics("mrpc", ["yes"], ["yes"], yes_no_rule="last_word")
