"""JSONL task data: reading with errors that name the file and line, tokenization with the prompt masked out of the
labels, truncation that keeps the template's frame and the answer's closing token and is counted (``Truncation``),
and the padding collator.

A line is ``{"input": PROMPT, "output": ANSWER}``; a list ``output`` (several acceptable answers) trains on its first
item. An optional ``"task_type"`` (``TYPE_FIELD``) gives the sample's type for LoRAMoE's balancing constraint, as the
LoRAMoE authors' data files do: 1 = world knowledge (e.g. closed-book QA), 0 = downstream task, the default when the
field is absent. A knowledge file (``--knowledge_file``) adds world-knowledge rows to the training set
(``SupervisedDataset``; ``knowledge_count`` says how many): they are type 1 whatever their own field says, and a row
there that says 0 is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from imsm.templates import PromptTemplate

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
TYPE_FIELD = "task_type"  # the field name of the LoRAMoE authors' build_dataset.py
TASK, WORLD_KNOWLEDGE = 0, 1


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-empty line of a JSONL file; a line that is not UTF-8 or not valid
    JSON raises ValueError naming the file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path, require_output: bool = True, only_type: int | None = None) -> list[dict]:
    """Read task rows; any line that is not UTF-8 or not valid JSON, a missing field or an empty file raises
    ValueError naming file and line, as does a ``task_type`` other than ``only_type`` when that is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows = []
    for lineno, row in jsonl_lines(path):
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
        kind = row.get(TYPE_FIELD)
        if TYPE_FIELD in row and (type(kind) is not int or kind not in (TASK, WORLD_KNOWLEDGE)):
            raise ValueError(f"{path}:{lineno}: {TYPE_FIELD!r} must be {WORLD_KNOWLEDGE} (world knowledge) or "
                             f"{TASK} (downstream task), got {kind!r}")
        if kind is not None and only_type is not None and kind != only_type:
            raise ValueError(f"{path}:{lineno}: {TYPE_FIELD!r} is {kind}, but every row of this file is type "
                             f"{only_type}; remove the field or the row")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file, no examples")
    return rows


def training_answer(output: str | list[str]) -> str:
    return output[0] if isinstance(output, list) else output


@dataclass
class Truncation:
    """What the length limits cut from one data file: how many prompts and answers, and how many of their tokens."""

    source: str
    examples: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    answers: int = 0
    answer_tokens: int = 0

    def warn(self) -> None:
        """One warning for the file, only if something was cut."""
        cuts = []
        if self.prompts:
            cuts.append(f"--max_input_length cut {self.prompts} of {self.examples} prompts ({self.prompt_tokens} "
                        "tokens, from the left of the user's text)")
        if self.answers:
            cuts.append(f"--max_output_length cut {self.answers} of {self.examples} answers ({self.answer_tokens} "
                        "tokens, the closing EOS kept)")
        if cuts:
            logger.warning("%s: %s", self.source, " and ".join(cuts))


def encode_prompt(template: PromptTemplate, prompt: str, max_input_length: int,
                  truncation: Truncation | None = None) -> list[int]:
    """The query token ids the model sees for ``prompt``, the same in training and in decoding.

    A prompt longer than ``max_input_length`` loses tokens from the left of the user's text; the template's frame
    (``PromptTemplate.prompt_parts``: BOS, system turn, user and assistant headers) stays whole. A length that
    leaves no token of the user's text is a ValueError naming the length needed.
    """
    head, text, tail = template.prompt_parts(prompt)
    keep = max_input_length - len(head) - len(tail)
    if keep < 1:
        raise ValueError(
            f"--max_input_length {max_input_length}: the {template.name} template's own tokens take "
            f"{len(head) + len(tail)} tokens, leaving no room for the prompt; use at least {len(head) + len(tail) + 1}"
        )
    if truncation is not None:
        truncation.examples += 1
        if len(text) > keep:
            truncation.prompts += 1
            truncation.prompt_tokens += len(text) - keep
    return head + text[len(text) - keep:] + tail if len(text) > keep else head + text + tail


def truncate_answer(answer_ids: list[int], max_output_length: int) -> list[int]:
    """The answer's first ``max_output_length - 1`` tokens and its closing token (EOS or end of turn), so a cut
    answer still teaches where an answer ends."""
    if len(answer_ids) <= max_output_length:
        return answer_ids
    return answer_ids[:max_output_length - 1] + answer_ids[-1:]


def encode_example(
    template: PromptTemplate, prompt: str, answer: str, max_input_length: int, max_output_length: int,
    truncation: Truncation | None = None,
) -> dict | None:
    """Token ids, labels (prompt masked) and the query length; None when no answer token is left.

    The answer is ``truncate_answer``'s, the prompt ``encode_prompt``'s; ``truncation`` counts what they cut.
    """
    full_answer = template.encode_answer(prompt, answer)
    if not full_answer:
        return None
    answer_ids = truncate_answer(full_answer, max_output_length)
    prompt_ids = encode_prompt(template, prompt, max_input_length, truncation)
    if truncation is not None and len(answer_ids) < len(full_answer):
        truncation.answers += 1
        truncation.answer_tokens += len(full_answer) - len(answer_ids)
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "query_length": len(prompt_ids),
    }


def truncate_prompt(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """Ids without a template (the harness's raw contexts) cut from the left, a leading BOS kept."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return [bos_id] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def knowledge_count(path: str | Path, rows: int, task_examples: int, examples: int | None = None,
                    share: float | None = None) -> int:
    """How many rows of the knowledge file ``path`` (which has ``rows``) join ``task_examples`` task examples:
    ``examples``, or the number making them ``share`` of the mixed set, round(share · n / (1 − share)), or all."""
    if examples is None and share is None:
        return rows
    wanted = examples if examples is not None else round(share * task_examples / (1 - share))
    what = f"--knowledge_examples {examples}" if examples is not None else \
        f"--knowledge_share {share} of {task_examples} task examples"
    if wanted > rows:
        raise ValueError(f"{what} needs {wanted} rows of --knowledge_file {path}, which has {rows}")
    if wanted < 1:
        raise ValueError(f"{what} gives no knowledge row; raise it or leave out --knowledge_file")
    return wanted


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized training examples of one JSONL file, optionally followed by the first rows of a knowledge file
    (type 1; ``knowledge_examples`` rows, or enough to make ``knowledge_share`` of the whole, or all).

    ``mix`` describes what it holds, for the run folder: the files and the examples of each type."""

    def __init__(
        self, path: str | Path, template: PromptTemplate, max_input_length: int, max_output_length: int,
        max_examples: int | None = None, knowledge_file: str | Path | None = None,
        knowledge_examples: int | None = None, knowledge_share: float | None = None,
    ) -> None:
        rows = read_jsonl(path)
        if max_examples is not None:
            rows = rows[:max_examples]
        lengths = (max_input_length, max_output_length)
        self.examples = _encode_rows(path, rows, template, *lengths, default_type=TASK)
        self.mix = {"train_file": str(path), "task_file_examples": len(self.examples)}
        if knowledge_file is not None:
            knowledge = read_jsonl(knowledge_file, only_type=WORLD_KNOWLEDGE)
            n = knowledge_count(knowledge_file, len(knowledge), len(self.examples), knowledge_examples,
                                knowledge_share)
            added = _encode_rows(knowledge_file, knowledge[:n], template, *lengths, default_type=WORLD_KNOWLEDGE)
            self.examples += added
            self.mix |= {"knowledge_file": str(knowledge_file), "knowledge_rows_taken": n,
                         "knowledge_file_examples": len(added)}
        self.mix["examples_by_type"] = examples_by_type(self)
        logger.info("%s: %d training examples (%s)", path, len(self.examples),
                    ", ".join(f"{k}: {v}" for k, v in self.mix["examples_by_type"].items()))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        # the index keys the frozen-memory cache (imsm/training/frozen_cache.py)
        return {**self.examples[i], "index": i}


def _encode_rows(path: str | Path, rows: list[dict], template: PromptTemplate, max_input_length: int,
                 max_output_length: int, default_type: int) -> list[dict]:
    """The rows' examples with their type; one warning for what was cut or dropped, an error when none is left."""
    examples, truncation = [], Truncation(str(path))
    for row in rows:
        ex = encode_example(template, row["input"], training_answer(row["output"]), max_input_length,
                            max_output_length, truncation)
        if ex is not None:
            examples.append({**ex, TYPE_FIELD: row.get(TYPE_FIELD, default_type)})
    truncation.warn()
    if len(examples) < len(rows):
        logger.warning("%s: dropped %d of %d examples with no answer token left", path, len(rows) - len(examples),
                       len(rows))
    if not examples:
        raise ValueError(f"{path}: no example has an answer token left")
    return examples


def examples_by_type(dataset: torch.utils.data.Dataset) -> dict[str, int]:
    """{"task": n0, "world_knowledge": n1}: the examples of each type (a ``Subset`` counts its own)."""
    types = [dataset[i][TYPE_FIELD] for i in range(len(dataset))]
    return {"task": types.count(TASK), "world_knowledge": types.count(WORLD_KNOWLEDGE)}


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
    """Right-pads a batch; ``query_mask`` marks the prompt tokens that the gate's query means average over.

    Examples that carry their dataset ``index`` also give ``example_index`` (B,), the frozen-memory cache's key;
    ``task_types`` (B,) is each example's type (0, task, when it has none), which LoRAMoE's constraint reads.
    """

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
        out["task_types"] = torch.tensor([ex.get(TYPE_FIELD, TASK) for ex in batch], dtype=torch.long)
        if all("index" in ex for ex in batch):
            out["example_index"] = torch.tensor([ex["index"] for ex in batch], dtype=torch.long)
        return out
