"""Build the general-text file that ``evaluate.py --measures general_nll --general_text FILE`` scores: natural
passages that no training file contains, one JSON object a line with the source of each.

    python scripts/build_general_text.py --data_dir /work/shared/data --out data/general_text.jsonl

No text corpus is reachable offline, but two benchmark test files hold real prose: the articles of ROPES
(``ropes/test.jsonl``: each prompt's ``Article:``, the dataset's background paragraph followed by its situation) and
the paragraphs of MultiRC (``multirc/test.jsonl``: each prompt's ``Content:``, news, fiction and science text). Each
distinct article or paragraph is cut at sentence ends into passages of at most ``--max_words`` words (a longer
sentence is a passage of its own), so that a long paragraph does not weigh as one unit. A passage is dropped when

* it has fewer than ``--min_words`` words (a stray fragment such as a heading),
* it repeats an earlier passage (compared lower-cased with whitespace folded), or
* it shares a run of ``--overlap_words`` consecutive words (lower-cased word characters) with any training file:
  every ``DATA_DIR/<task>/train.jsonl`` (inputs and outputs) and each ``--exclude FILE``, e.g. your own training
  set, so the measure reads text the tuned model was never trained on.

Each row is ``{"text", "source", "line", "chunk", "chunks"}``: the file (relative to ``--data_dir``), the 1-based line
of the first prompt holding the article or paragraph, and which of its passages this is. The file is written at run
time from the data folder and never copied into the repository. Too few passages (``--min_passages``) is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.atomic import atomic_write_jsonl
from imsm.data import jsonl_lines

logger = logging.getLogger("build_general_text")

# (task folder, the marker that opens the passage in a prompt, the marker that closes it)
SOURCES = (("ropes", "\nArticle: ", "\nQuestion:"), ("multirc", "\nContent: ", "\nAnswer:"))
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"\w+")


def extract(prompt: str, opening: str, closing: str) -> str | None:
    """The text between the first ``opening`` and the last ``closing`` of a prompt, whitespace folded; None without
    both markers."""
    start = prompt.find(opening)
    end = prompt.rfind(closing)
    if start < 0 or end < start + len(opening):
        return None
    return " ".join(prompt[start + len(opening) : end].split())


def chunks(text: str, max_words: int) -> list[str]:
    """``text`` cut at sentence ends into the fewest pieces of at most ``max_words`` words, of about equal length (a
    longer sentence stays whole): a cut comes after the sentence that reaches the even share, or before one that
    would overflow."""
    sentences = [s.split() for s in _SENTENCE_END.split(text) if s.strip()]
    total = sum(len(s) for s in sentences)
    share = total / max(1, -(-total // max_words))
    pieces, current = [], []
    for words in sentences:
        if current and len(current) + len(words) > max_words:
            pieces.append(" ".join(current))
            current = []
        current += words
        if len(current) >= share:
            pieces.append(" ".join(current))
            current = []
    if current:
        pieces.append(" ".join(current))
    return pieces


def shingles(text: str, n: int) -> Iterator[int]:
    """Hashes of every run of ``n`` consecutive lower-cased words of ``text``."""
    words = _WORD.findall(text.lower())
    for i in range(len(words) - n + 1):
        yield hash(tuple(words[i : i + n]))


def training_shingles(files: Iterable[Path], n: int) -> set[int]:
    seen: set[int] = set()
    for path in files:
        for _, row in jsonl_lines(path):
            outputs = row.get("output", []) if isinstance(row, dict) else []
            inputs = row.get("input", "") if isinstance(row, dict) else ""
            for text in [inputs, *(outputs if isinstance(outputs, list) else [outputs])]:
                seen.update(shingles(str(text), n))
    return seen


def build(data_dir: Path, exclude: list[Path], max_words: int, overlap_words: int,
          min_words: int = 8) -> tuple[list[dict], Counter]:
    """(passage rows, counts of what was kept and dropped per reason)."""
    train_files = sorted(data_dir.glob("*/train.jsonl")) + exclude
    for path in train_files:
        if not path.is_file():
            raise FileNotFoundError(f"--exclude {path}: no such file")
    trained = training_shingles(train_files, overlap_words)
    logger.info("excluding text shared with %d training files: %s", len(train_files),
                ", ".join(str(p) for p in train_files))
    rows, seen, counts = [], set(), Counter()
    for task, opening, closing in SOURCES:
        path = data_dir / task / "test.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--data_dir {data_dir}: no {task}/test.jsonl, a source of passages")
        first_line: dict[str, int] = {}
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    text = extract(json.loads(line)["input"], opening, closing)
                    if text:
                        first_line.setdefault(text, lineno)
        for text, lineno in first_line.items():
            pieces = chunks(text, max_words)
            for k, piece in enumerate(pieces, 1):
                key = piece.lower()
                if len(piece.split()) < min_words:
                    counts["shorter than --min_words"] += 1
                    continue
                if key in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(key)
                if any(h in trained for h in shingles(piece, overlap_words)):
                    counts["in a training file"] += 1
                    continue
                counts[f"kept from {task}"] += 1
                rows.append({"text": piece, "source": f"{task}/test.jsonl", "line": lineno, "chunk": k,
                             "chunks": len(pieces)})
    return rows, counts


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="Holds ropes/test.jsonl, multirc/test.jsonl "
                        "and the training files <task>/train.jsonl.")
    parser.add_argument("--out", type=Path, default=Path("data/general_text.jsonl"), help="The file to write.")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="Another training file whose text must not appear (repeatable).")
    parser.add_argument("--max_words", type=int, default=120, help="Longest passage, in words.")
    parser.add_argument("--min_words", type=int, default=8, help="Shorter passages are dropped.")
    parser.add_argument("--overlap_words", type=int, default=8,
                        help="A passage sharing this many consecutive words with a training file is dropped.")
    parser.add_argument("--min_passages", type=int, default=500, help="Fewer passages than this is an error.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.max_words < 1 or args.overlap_words < 1:
        raise SystemExit("--max_words and --overlap_words must be at least 1")
    rows, counts = build(args.data_dir, args.exclude, args.max_words, args.overlap_words, args.min_words)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    if len(rows) < args.min_passages:
        raise SystemExit(f"only {len(rows)} passages ({summary}); --min_passages is {args.min_passages}")
    atomic_write_jsonl(args.out, rows)
    print(f"{args.out}: {len(rows)} passages ({summary})")
    return args.out


if __name__ == "__main__":
    main()
