"""JSONL task data: reading with errors that name the file and line, tokenization with the prompt masked out of the
labels, truncation that keeps the answer, and the padding collator.

A line is ``{"input": PROMPT, "output": ANSWER}``; a list ``output`` (several acceptable answers) trains on its first
item.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from imsm.templates import PromptTemplate

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def read_jsonl(path: str | Path, require_output: bool = True) -> list[dict]:
    """Read task rows; any malformed line, missing field or empty file raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'input' and 'output'")  # noqa: TRY004
            fields = ("input", "output") if require_output else ("input",)
            for key in fields:
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {key!r}")
            if not isinstance(row["input"], str):
                raise ValueError(f"{path}:{lineno}: 'input' must be a string")  # noqa: TRY004
            if require_output:
                out = row["output"]
                if isinstance(out, list):
                    if not out or not all(isinstance(o, str) for o in out):
                        raise ValueError(f"{path}:{lineno}: 'output' list must hold at least one string")
                elif not isinstance(out, str):
                    raise ValueError(f"{path}:{lineno}: 'output' must be a string or a list of strings")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file, no examples")
    return rows


def training_answer(output: str | list[str]) -> str:
    return output[0] if isinstance(output, list) else output


def encode_prompt(template: PromptTemplate, prompt: str, max_input_length: int) -> list[int]:
    """The query token ids the model sees for ``prompt``, the same in training and in decoding.

    The templated prompt is cut from the left to ``max_input_length`` tokens, keeping a leading BOS so the model
    still sees a sequence start.
    """
    return truncate_prompt(template.encode_prompt(prompt), max_input_length, template.tokenizer.bos_token_id)


def encode_example(
    template: PromptTemplate, prompt: str, answer: str, max_input_length: int, max_output_length: int
) -> dict | None:
    """Token ids, labels (prompt masked) and the query length; None when no answer token is left.

    The answer keeps its first ``max_output_length`` tokens; the prompt is ``encode_prompt``'s.
    """
    answer_ids = template.encode_answer(prompt, answer)[:max_output_length]
    if not answer_ids:
        return None
    prompt_ids = encode_prompt(template, prompt, max_input_length)
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "query_length": len(prompt_ids),
    }


def truncate_prompt(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return [bos_id] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized training examples of one JSONL file."""

    def __init__(
        self, path: str | Path, template: PromptTemplate, max_input_length: int, max_output_length: int,
        max_examples: int | None = None,
    ) -> None:
        rows = read_jsonl(path)
        if max_examples is not None:
            rows = rows[:max_examples]
        self.examples, dropped = [], 0
        for row in rows:
            ex = encode_example(template, row["input"], training_answer(row["output"]), max_input_length,
                                max_output_length)
            if ex is None:
                dropped += 1
            else:
                self.examples.append(ex)
        if dropped:
            logger.warning("%s: dropped %d of %d examples with no answer token left", path, dropped, len(rows))
        if not self.examples:
            raise ValueError(f"{path}: no example has an answer token left")
        logger.info("%s: %d training examples", path, len(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def split_validation(dataset: torch.utils.data.Dataset, fraction: float, seed: int):
    """(training part, validation part): ``round(fraction · n)`` examples (at least one) drawn by a seeded
    permutation; both keep the dataset's own example indices."""
    n = len(dataset)
    held = max(1, round(fraction * n))
    if held >= n:
        raise ValueError(f"--validation_fraction {fraction} leaves no training example of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return (torch.utils.data.Subset(dataset, sorted(order[held:])),
            torch.utils.data.Subset(dataset, sorted(order[:held])))


@dataclass
class SupervisedCollator:
    """Right-pads a batch; ``query_mask`` marks the prompt tokens that the gate's query means average over."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        out = {k: torch.full((len(batch), width), v, dtype=torch.long) for k, v in
               (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0), ("query_mask", 0))}
        for i, ex in enumerate(batch):
            n, q = len(ex["input_ids"]), ex["query_length"]
            out["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
            out["labels"][i, :n] = torch.tensor(ex["labels"])
            out["attention_mask"][i, :n] = 1
            out["query_mask"][i, :q] = 1
        return out
