"""Build the IMSM benchmark files in the paper's prompt format: ``OUT/<task>/<split>.jsonl`` of
``{"input", "output"}``.

    python scripts/prepare_data.py --out_dir data --from_authors IMSM              # the authors' files, as published
    python scripts/prepare_data.py --out_dir data                                  # all tasks, from the Hub
    python scripts/prepare_data.py --tasks gsm8k cola --out_dir data --local_dir raw  # Hub unreachable

``--from_authors DIR`` reads the files published with the paper's code (github.com/ECNU-Text-Computing/IMSM, a clone
of it or its ``data/`` folder): ``data/<folder>/data_{train,test}.json``, one ``{"input", "output"}`` object a line,
already in the paper's prompt format (folders ``GSM8K``, ``cola``, ``mrpc``, ``ropes``, ``webq``, ``freebase``,
``multirc``; training splits for GSM8K, CoLA, MRPC and ROPES). They are checked and copied, never re-prompted: the
route that gives the authors' exact rows, the ROPES training split included.

The prompts reproduce the files published with the paper's code character for character (including MRPC's "Ouput:"
typo and CoLA's leading space). Each task reads a public Hugging Face dataset with ``datasets.load_dataset``, or, with
``--local_dir DIR``, the files ``DIR/<task>/<source split>.{jsonl,json,csv,parquet}`` (Hub shards such as
``validation-00000-of-00001.parquet`` are read too) in the raw dataset's own columns. The source split behind each
output split is in ``SOURCES``: e.g. CoLA's ``test`` is GLUE's validation split and ROPES's ``test`` its validation
split, as in the published files. GSM8K, CoLA, MRPC, WebQ and FreebaseQA rows are reproduced exactly; ROPES's article
join and MultiRC's choice of questions are inferred (see their converters), so those two files may differ from the
published ones (``--from_authors`` has them as published).

The Hub ids are ones ``datasets`` 4 and later load without a loading script (those versions refuse scripts):
parquet repositories (``openai/gsm8k``, ``nyu-mll/glue``, ``allenai/ropes``, ``stanfordnlp/web_questions``), and, for
the two whose repository is still a loading script (``kelvin-jiang/freebase-qa``, ``aps/super_glue``), the Hub's own
parquet export (``revision="refs/convert/parquet"``, one folder per configuration: ``data_dir``). What each needs is
in ``SOURCES`` (``revision``, ``data_dir``); a repository that turns out to hold a script is an error that names the
task and the other routes.

Converters are pure functions from raw rows to prompt rows, so each can be checked against a hand-written row.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import string
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.atomic import atomic_write_jsonl

logger = logging.getLogger(__name__)

Row = dict[str, Any]

GSM8K_PREFIX = (
    "You are an expert in math.\n"
    "Below is a math question.\n"
    "Write a response that appropriately answers the question.\n"
    "Your final answer should be an integer at the end of your response, formatted as: The answer is {answer}.\n"
)
COLA_PREFIX = " Given a sentence, judge the grammatical acceptability of the sentence with yes or no.\n"
MRPC_PREFIX = "Determine if the following two sentences are semantically equivalent and output yes or no.\n"
ROPES_PREFIX = (
    "Given an article and a corresponding question about the article, answer the question accurately based on the "
    "provided context in the articles.\n"
)
QA_PREFIX = "Please provide a concise answer to the following question using one or a few words.\n"
MULTIRC_PREFIX = "Please answer the question according to the contents just with yes or no.\n"

_CALCULATOR = re.compile(r"<<.*?>>")
_MULTIRC_SENT_TAG = re.compile(r"<b>Sent \d+: </b>")
_MULTIRC_SENTENCE_GAP = "    "  # sentences of a published MultiRC "Content:" are separated by four spaces


def _yes_no_label(value: Any) -> str | None:
    """GLUE label 1 -> ``"yes"``, 0 -> ``"no"``, -1 (unlabelled test row) -> ``None``; CSV strings accepted."""
    label = int(value)
    if label == -1:
        return None
    if label not in (0, 1):
        raise ValueError(f"expected a 0/1 label, got {value!r}")
    return "yes" if label == 1 else "no"


def convert_gsm8k(row: Row) -> Row:
    """GSM8K ``{question, answer}``: the instruction prefix, then the question; the solution without its calculator
    annotations ``<<...>>`` and with the final ``#### N`` written as ``The answer is N.`` (N verbatim, commas kept)."""
    body, marker, final = row["answer"].rpartition("####")
    if not marker:
        raise ValueError(f"GSM8K answer without a '####' line: {row['answer'][-80:]!r}")
    reasoning = _CALCULATOR.sub("", body.rstrip("\n"))
    return {"input": GSM8K_PREFIX + row["question"], "output": f"{reasoning}\nThe answer is {final.strip()}."}


def convert_cola(row: Row) -> Row | None:
    """GLUE CoLA ``{sentence, label}``; label 1 (acceptable) is ``yes``. Unlabelled rows give ``None``."""
    output = _yes_no_label(row["label"])
    if output is None:
        return None
    return {"input": f"{COLA_PREFIX}Sentence:{row['sentence']}\nOutput:", "output": output}


def convert_mrpc(row: Row) -> Row | None:
    """GLUE MRPC ``{sentence1, sentence2, label}``; label 1 (equivalent) is ``yes``. Unlabelled rows give ``None``."""
    output = _yes_no_label(row["label"])
    if output is None:
        return None
    prompt = f"{MRPC_PREFIX}Sentence1: {row['sentence1']}\nSentence2: {row['sentence2']}\nOuput:"
    return {"input": prompt, "output": output}


def _answer_texts(value: Any) -> list[str]:
    """Answers as a list of strings from ``{"text": [...]}``, a list, or a (JSON-encoded) string."""
    if isinstance(value, dict):
        value = value["text"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        return _answer_texts(value)
    return [str(v) for v in value]


def convert_ropes(row: Row) -> Row:
    """ROPES ``{background, situation, question, answers: {text: [...]}}``; the first answer is the output.

    Assumed: the article is the background and the situation joined by one space, each kept verbatim (the published
    file keeps the texts' own trailing spaces, e.g. "supply. \\nQuestion:").
    """
    article = f"{row['background']} {row['situation']}"
    prompt = f"{ROPES_PREFIX}Article: {article}\nQuestion:{row['question']} \nAnswer:"
    return {"input": prompt, "output": _answer_texts(row["answers"])[0]}


def convert_webq(row: Row) -> Row:
    """WebQuestions ``{question, answers: [...]}``; the output is the whole list of acceptable answers."""
    return {"input": f"{QA_PREFIX}Question: {row['question']}\nAnswer:", "output": _answer_texts(row["answers"])}


def _first_under(obj: Any, key: str) -> Any:
    """Depth-first, in order: the first value stored under ``key`` in nested dicts/lists, else None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple):
        children = obj
    else:
        return None
    for child in children:
        found = _first_under(child, key)
        if found is not None:
            return found
    return None


def _first_string(obj: Any) -> str | None:
    """Depth-first, in order: the first string in nested dicts/lists, else None."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if not isinstance(obj, list | tuple):
        return None
    for child in obj:
        found = _first_string(child)
        if found is not None:
            return found
    return None


def convert_freebaseqa(row: Row) -> Row:
    """FreebaseQA ``{RawQuestion, Parses}``: the raw (cased) question; the output is the first answer name of the
    first parse. ``Parses`` may be the release's list of parses or the Hub's dict of lists; both are searched in
    order."""
    name = _first_string(_first_under(row["Parses"], "AnswersName"))
    if name is None:
        raise ValueError(f"FreebaseQA row without an answer name: {row.get('Question-ID', row['RawQuestion'])!r}")
    return {"input": f"{QA_PREFIX}Question:{row['RawQuestion']}\nAnswer:", "output": name}


def clean_multirc_paragraph(text: str) -> str:
    """Drop MultiRC's ``<b>Sent k: </b>`` tags and separate sentences (``<br>``) by four spaces."""
    return _MULTIRC_SENT_TAG.sub("", text).replace("<br>", _MULTIRC_SENTENCE_GAP)


def _yes_no_text(text: str) -> str | None:
    word = text.strip().strip(string.punctuation + " ").lower()
    return word if word in ("yes", "no") else None


def convert_multirc_question(paragraph: str, question: str, answers: list[tuple[str, int]]) -> Row | None:
    """One MultiRC question with its candidate answers ``(text, label)`` -> a yes/no row, or ``None``.

    Assumed (the published file of 312 rows does not say how it was built): a question is kept when its correct
    candidates include "yes" or "no" (case and punctuation ignored) and those agree; that word is the output. The
    question is asked as written, the paragraph cleaned by ``clean_multirc_paragraph``.
    """
    correct = {_yes_no_text(text) for text, label in answers if int(label) == 1} - {None}
    if len(correct) != 1:
        return None
    prompt = f"{MULTIRC_PREFIX}Question: {question} \nContent: {clean_multirc_paragraph(paragraph)} \nAnswer:"
    return {"input": prompt, "output": correct.pop()}


def _flatten_superglue_multirc(row: Row) -> list[Row]:
    """The SuperGLUE release's nested row ``{passage: {text, questions: [{question, answers}]}}`` as Hub rows."""
    passage = row["passage"]
    return [
        {
            "paragraph": passage["text"],
            "question": q["question"],
            "answer": a["text"],
            "label": a.get("label", -1),
            "idx": {"paragraph": row.get("idx"), "question": q.get("idx", qi)},
        }
        for qi, q in enumerate(passage["questions"])
        for a in q["answers"]
    ]


def convert_multirc(rows: list[Row]) -> list[Row]:
    """SuperGLUE MultiRC rows (one per candidate answer: ``{paragraph, question, answer, label, idx}``, or the
    release's nested passages) grouped by question, in order, and converted by ``convert_multirc_question``."""
    flat = [r for row in rows for r in (_flatten_superglue_multirc(row) if "passage" in row else [row])]
    groups: dict[Any, tuple[str, str, list[tuple[str, int]]]] = {}
    for row in flat:
        idx = row.get("idx")
        key = (idx["paragraph"], idx["question"]) if isinstance(idx, dict) else (row["paragraph"], row["question"])
        groups.setdefault(key, (row["paragraph"], row["question"], []))[2].append((row["answer"], int(row["label"])))
    converted = (convert_multirc_question(p, q, answers) for p, q, answers in groups.values())
    return [row for row in converted if row is not None]


def _per_row(convert: Callable[[Row], Row | None]) -> Callable[[list[Row]], list[Row]]:
    def convert_all(rows: list[Row]) -> list[Row]:
        out = [convert(row) for row in rows]
        if skipped := sum(r is None for r in out):
            logger.warning("%s: skipped %d unlabelled rows", convert.__name__, skipped)
        return [r for r in out if r is not None]

    return convert_all


@dataclass(frozen=True)
class Source:
    """Where a task's raw data lives and how it becomes prompt rows."""

    hub_path: str
    hub_config: str | None
    splits: dict[str, str]  # output split -> source split
    convert: Callable[[list[Row]], list[Row]]
    revision: str | None = None  # "refs/convert/parquet": the Hub's parquet export of a loading-script repository
    data_dir: str | None = None  # the configuration's folder in that export


PARQUET_EXPORT = "refs/convert/parquet"

SOURCES: dict[str, Source] = {
    "gsm8k": Source("openai/gsm8k", "main", {"train": "train", "test": "test"}, _per_row(convert_gsm8k)),
    "cola": Source("nyu-mll/glue", "cola", {"train": "train", "test": "validation"}, _per_row(convert_cola)),
    "mrpc": Source("nyu-mll/glue", "mrpc", {"train": "train", "test": "test"}, _per_row(convert_mrpc)),
    "ropes": Source("allenai/ropes", None, {"train": "train", "test": "validation"}, _per_row(convert_ropes)),
    "webq": Source("stanfordnlp/web_questions", None, {"test": "test"}, _per_row(convert_webq)),
    "freebaseqa": Source("kelvin-jiang/freebase-qa", None, {"test": "test"}, _per_row(convert_freebaseqa),
                         revision=PARQUET_EXPORT, data_dir="default"),
    "multirc": Source("aps/super_glue", None, {"test": "validation"}, convert_multirc, revision=PARQUET_EXPORT,
                      data_dir="multirc"),
}

# The authors' folder of each task (github.com/ECNU-Text-Computing/IMSM, data/<folder>/data_{train,test}.json); they
# publish the same output splits as SOURCES builds.
AUTHORS_FOLDERS = {"gsm8k": "GSM8K", "cola": "cola", "mrpc": "mrpc", "ropes": "ropes", "webq": "webq",
                   "freebaseqa": "freebase", "multirc": "multirc"}

LOCAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def get_source(task: str) -> Source:
    """The source of ``task``; unknown names raise ``ValueError`` listing the known tasks."""
    try:
        return SOURCES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(SOURCES)}") from None


def _read_json_lines(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> list[Row]:
    """A JSON list of rows, an object holding one list of rows (e.g. FreebaseQA's ``Questions``), or JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _read_json_lines(path)
    if isinstance(data, dict):
        tables = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(tables) != 1:
            raise ValueError(f"{path}: expected a list of rows, or an object holding exactly one list of rows")
        data = tables[0]
    if not isinstance(data, list):
        raise TypeError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return data


def read_local_file(path: Path) -> list[Row]:
    """Rows of one raw file: JSON lines, JSON, CSV (every value a string) or parquet."""
    if path.suffix == ".jsonl":
        return _read_json_lines(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_EXTENSIONS)}")


def local_split_files(local_dir: Path, task: str, split: str) -> list[Path]:
    """Files of ``split`` under ``local_dir/task``: ``<split>.<ext>`` or Hub shards ``<split>-*.<ext>``, sorted."""
    folder = local_dir / task
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in LOCAL_EXTENSIONS and (p.stem == split or p.stem.startswith(f"{split}-"))
    )


def load_raw(task: str, source_split: str, local_dir: Path | None) -> list[Row]:
    """Raw rows of one split, from ``local_dir`` when given, else from the Hugging Face Hub."""
    source = get_source(task)
    if local_dir is not None:
        files = local_split_files(local_dir, task, source_split)
        if not files:
            raise FileNotFoundError(
                f"{task}: no raw file for split {source_split!r} in {local_dir / task} "
                f"(expected {source_split}.<ext> or {source_split}-*.<ext>, ext in {', '.join(LOCAL_EXTENSIONS)})"
            )
        return [row for path in files for row in read_local_file(path)]
    import datasets

    try:
        rows = datasets.load_dataset(source.hub_path, source.hub_config, split=source_split,
                                     revision=source.revision, data_dir=source.data_dir)
    except RuntimeError as err:
        if "scripts are no longer supported" not in str(err):
            raise
        raise RuntimeError(f"{task}: the Hub repository {source.hub_path} holds a loading script, which datasets "
                           f"{datasets.__version__} refuses ({err}); use --from_authors DIR (the authors' files) or "
                           "--local_dir DIR (raw files)") from None
    return rows.to_list()


def _authors_folder(root: Path, task: str) -> Path:
    """``root`` may be a clone of the authors' repository or its ``data/`` folder."""
    name = AUTHORS_FOLDERS[task]
    return root / "data" / name if (root / "data" / name).is_dir() else root / name


def read_authors_file(path: Path, task: str) -> list[Row]:
    """One of the authors' files: a JSON object a line with a string ``input`` and a string ``output`` (a list of
    strings for WebQ); anything else is an error naming the file and line."""
    text = path.read_text(encoding="utf-8")
    if text.startswith("version https://git-lfs"):
        raise ValueError(f"{path}: a Git LFS pointer, not the data; fetch the file itself (git lfs pull)")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        output = row.get("output") if isinstance(row, dict) else None
        answers_ok = isinstance(output, str) or (task == "webq" and isinstance(output, list) and output
                                                 and all(isinstance(a, str) for a in output))
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not answers_ok:
            kind = "a string, or a list of strings" if task == "webq" else "a string"
            raise ValueError(f'{path}:{number}: expected {{"input": a string, "output": {kind}}}, got '
                             f"{line[:120]!r}")
        rows.append({"input": row["input"], "output": output})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prepare_from_authors(task: str, root: Path, out_dir: Path, splits: list[str] | None = None) -> list[Path]:
    """Check and copy the authors' ``data_<split>.json`` of ``task`` to ``out_dir/<task>/<split>.jsonl``."""
    folder = _authors_folder(root, task)
    wanted = [s for s in SOURCES[task].splits if splits is None or s in splits]
    written = []
    for split in wanted:
        path = folder / f"data_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{task}: {path} not found; --from_authors takes a clone of "
                                    "github.com/ECNU-Text-Computing/IMSM (or its data/ folder), which holds "
                                    f"data/{AUTHORS_FOLDERS[task]}/data_{split}.json")
        rows = read_authors_file(path, task)
        target = out_dir / task / f"{split}.jsonl"
        atomic_write_jsonl(target, rows)
        logger.info("%s/%s: %d rows from %s -> %s", task, split, len(rows), path, target)
        written.append(target)
    return written


def prepare_task(
    task: str, out_dir: Path, local_dir: Path | None = None, splits: list[str] | None = None
) -> list[Path]:
    """Convert and write ``out_dir/<task>/<split>.jsonl`` for every split of ``task`` (or only ``splits``)."""
    source = get_source(task)
    wanted = list(source.splits) if splits is None else [s for s in splits if s in source.splits]
    if splits is not None and len(wanted) < len(splits):
        logger.warning(
            "%s has no split(s) %s; it has %s", task, sorted(set(splits) - set(wanted)), list(source.splits)
        )
    written = []
    for split in wanted:
        rows = source.convert(load_raw(task, source.splits[split], local_dir))
        path = out_dir / task / f"{split}.jsonl"
        atomic_write_jsonl(path, rows)
        logger.info("%s/%s: %d rows -> %s", task, split, len(rows), path)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=list(SOURCES), help=f"tasks to build (default all: {list(SOURCES)})"
    )
    parser.add_argument(
        "--out_dir", type=Path, required=True, help="output root; files go to OUT/<task>/<split>.jsonl"
    )
    parser.add_argument(
        "--local_dir", type=Path, default=None, help="read raw files from DIR/<task>/<source split>.<ext> (no Hub)"
    )
    parser.add_argument(
        "--from_authors", type=Path, default=None,
        help="the authors' repository (or its data/ folder): copy data/<task>/data_{train,test}.json as published",
    )
    parser.add_argument("--splits", nargs="+", default=None, help="only these output splits, e.g. test")
    args = parser.parse_args(argv)
    if args.from_authors is not None and args.local_dir is not None:
        parser.error("choose one of --from_authors and --local_dir")
    unknown = [t for t in args.tasks if t not in SOURCES]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(SOURCES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for task in args.tasks:
        if args.from_authors is not None:
            prepare_from_authors(task, args.from_authors, args.out_dir, args.splits)
        else:
            prepare_task(task, args.out_dir, args.local_dir, args.splits)


if __name__ == "__main__":
    main()
