"""scripts/build_general_text.py: passages cut at sentence ends, deduplicated, none sharing a run of words with a
training file, each with its source; and the file built from the shared benchmark data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_script

SHARED_DATA = Path("/work/shared/data")
bgt = load_script("build_general_text")

BACKGROUND = "Plants need light to grow. Light gives them energy."
ARTICLE = BACKGROUND + " A farmer planted corn in two fields. Field A was in the sun all day. Field B was in shade."
OTHER_ARTICLE = BACKGROUND + " A gardener kept one pot in a dark cellar for a month."  # the same background
PARAGRAPH = ("The ship left the harbour at dawn.    Its crew had waited three weeks for the storm to pass.    "
             "Nobody on board had sailed that far north before.    They reached the island after nine days.")


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    def ropes(article, question):
        return {"input": f"Given an article ...\nArticle: {article} \nQuestion:{question} \nAnswer:", "output": "A"}

    _write(tmp_path / "ropes" / "test.jsonl", [ropes(ARTICLE, "Which field grew more?"),
                                               ropes(ARTICLE, "Which field is shaded?"),
                                               ropes(OTHER_ARTICLE, "Does the pot grow?")])
    _write(tmp_path / "multirc" / "test.jsonl", [
        {"input": f"Please answer ...\nQuestion: Is it true? \nContent: {PARAGRAPH} \nAnswer:", "output": "yes"}])
    # a training prompt holding the paragraph's second sentence
    _write(tmp_path / "mrpc" / "train.jsonl", [
        {"input": "Sentence1: Its crew had waited three weeks for the storm to pass .\nOuput:", "output": "yes"}])
    return tmp_path


def test_chunks_cut_at_sentence_ends_into_even_pieces():
    text = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen fourteen."
    assert bgt.chunks(text, 100) == [text]
    # 14 words, at most 8 a piece: two pieces, the cut after the sentence that reaches 7 words
    assert bgt.chunks(text, 8) == ["One two three. Four five six seven.",
                                   "Eight nine. Ten eleven twelve thirteen fourteen."]
    assert bgt.chunks("A very long sentence of nine words in it. Short.", 4) == [
        "A very long sentence of nine words in it.", "Short."]  # a longer sentence stays whole


def test_passages_are_deduplicated_sourced_and_never_in_a_training_file(data_dir, tmp_path):
    rows, counts = bgt.build(data_dir, [], max_words=10, overlap_words=6, min_words=3)
    texts = [r["text"] for r in rows]
    assert texts.count(BACKGROUND) == 1 and counts["duplicate"] == 1  # the background both articles start with
    assert counts["in a training file"] == 1
    assert not any("three weeks" in t for t in texts)
    assert "They reached the island after nine days." in " ".join(texts)
    ropes = [r for r in rows if r["source"] == "ropes/test.jsonl" and r["line"] == 1]  # the first article's passages
    assert " ".join(r["text"] for r in ropes) == ARTICLE
    assert [r["chunk"] for r in ropes] == list(range(1, ropes[0]["chunks"] + 1))
    # --exclude adds a training file of the user's own
    own = tmp_path / "own.jsonl"
    _write(own, [{"input": "x", "output": "A farmer planted corn in two fields today"}])
    excluded, _ = bgt.build(data_dir, [own], max_words=10, overlap_words=6, min_words=3)
    assert not any("planted corn" in r["text"] for r in excluded)


def test_too_few_passages_is_an_error_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "general.jsonl"
    with pytest.raises(SystemExit, match="only .* passages"):
        bgt.main(["--data_dir", str(data_dir), "--out", str(out)])
    assert not out.exists()
    bgt.main(["--data_dir", str(data_dir), "--out", str(out), "--min_passages", "2", "--max_words", "10"])
    assert len(out.read_text().splitlines()) >= 2


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared benchmark data")
def test_the_shared_data_gives_500_passages_none_in_a_training_file(tmp_path):
    out = bgt.main(["--data_dir", str(SHARED_DATA), "--out", str(tmp_path / "g.jsonl")])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 500
    assert len({r["text"].lower() for r in rows}) == len(rows)
    training = " ".join(" ".join(re.findall(r"\w+", line.lower()))
                        for path in sorted(SHARED_DATA.glob("*/train.jsonl")) for line in path.open())
    for row in rows[::25]:  # a sample, checked by plain substring search: no 8-word run of it in a training file
        words = re.findall(r"\w+", row["text"].lower())
        assert not any(" ".join(words[i : i + 8]) in training for i in range(len(words) - 7))
        source = (SHARED_DATA / row["source"]).read_text().splitlines()[row["line"] - 1]
        assert " ".join(row["text"].split()[:6]) in " ".join(json.loads(source)["input"].split())
