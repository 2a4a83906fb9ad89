"""Data and per-document scores of the local harness tasks (``lm_eval --include_path harness_tasks``).

The data is read from ``$IMSM_DATA_DIR/<task>/test.jsonl``, by default ``<repository>/../shared/data``: found from
this file's own location, so the harness may run in any directory. Scores come from
imsm/evaluation/measures/metrics.py, the functions evaluate.py uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imsm.evaluation.measures.metrics import compute_metrics

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_file(task: str) -> Path:
    root = Path(os.environ.get("IMSM_DATA_DIR") or DEFAULT_DATA_DIR)
    path = root / task / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no test file for harness task imsm_{task}; set IMSM_DATA_DIR to the folder "
                                "that holds <task>/test.jsonl for the seven benchmarks")
    return path


def _load(task: str) -> dict:
    import datasets

    with data_file(task).open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # WebQ's output is a list of answers, the others a string: keep each column's own type
    return {"test": datasets.Dataset.from_list(rows)}


def load_gsm8k(**kwargs) -> dict:
    return _load("gsm8k")


def load_cola(**kwargs) -> dict:
    return _load("cola")


def load_mrpc(**kwargs) -> dict:
    return _load("mrpc")


def load_ropes(**kwargs) -> dict:
    return _load("ropes")


def load_webq(**kwargs) -> dict:
    return _load("webq")


def load_freebaseqa(**kwargs) -> dict:
    return _load("freebaseqa")


def load_multirc(**kwargs) -> dict:
    return _load("multirc")


def _scores(task: str, doc: dict, results: list[str], keys: tuple[str, ...]) -> dict[str, float]:
    metrics = compute_metrics(task, [results[0]], [doc["output"]])
    return {k: metrics[k] for k in keys}


def process_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """WebQ's contain and exact match for one generated answer, against every acceptable gold."""
    return _scores("webq", doc, results, ("contain", "em"))


def process_freebaseqa(doc: dict, results: list[str]) -> dict[str, float]:
    return _scores("freebaseqa", doc, results, ("contain", "em"))


def process_ropes(doc: dict, results: list[str]) -> dict[str, float]:
    return _scores("ropes", doc, results, ("em", "f1"))


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    """The final number of the generated solution against the gold's ("The answer is N.")."""
    return _scores("gsm8k", doc, results, ("accuracy",))
