"""Task table and scoring for the seven IMSM benchmarks.

A task is chosen by name through ``TASKS``; its ``kind`` picks the scorer:

* ``yesno`` (MRPC, CoLA, MultiRC): the answer is the prediction's first word, read as ``yes``/``no``; anything else is
  *invalid* and counts as wrong (``yes_no_rule="first_word"``, the default). ``yes_no_rule="anywhere"`` is the
  published code's rule (metric_evaluation.py): ``yes`` when "yes" occurs anywhere in the lower-cased prediction, else
  ``no``, never invalid - so "The answer is yes" and "Eyes closed" both read as yes; use it to reproduce the paper's
  numbers. Besides accuracy, ``yes_rate`` and ``invalid_rate`` make a majority-class collapse
  visible. MRPC adds F1 of the ``yes`` class, ``F1 = 2TP / (2TP + FP + FN)``; CoLA adds the Matthews correlation

  ``MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, defined as 0 when any factor is 0,

  where an invalid prediction is taken as the class opposite to the gold one.
* ``gsm8k``: accuracy of the final number (``extract_gsm8k_answer`` on prediction and gold).
* ``span`` (ROPES): SQuAD exact match and token F1 after ``normalize_answer``; with ``P`` and ``G`` the prediction and
  gold token multisets and ``c = |P ∩ G|``, ``F1 = 2c / (|P| + |G|)``; maximum over the golds.
* ``qa`` (WebQ, FreebaseQA): ``contain`` is 1 when some normalized gold occurs as a substring of the normalized
  prediction (an empty normalized gold never counts), plus exact match; maximum over the golds.

Every metric is a fraction in [0, 1] (MCC in [-1, 1]); an empty prediction is wrong under every metric.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np

YES, NO = "yes", "no"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: how to score it, how long an answer may be, and what a summary table shows."""

    name: str
    kind: str  # "yesno" | "gsm8k" | "span" | "qa"
    max_new_tokens: int
    primary: str  # metric key shown in summary tables
    display: str  # name shown in tables and plots


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("gsm8k", "gsm8k", 256, "accuracy", "GSM8K"),
        TaskSpec("mrpc", "yesno", 4, "accuracy", "MRPC"),
        TaskSpec("cola", "yesno", 4, "mcc", "CoLA"),
        TaskSpec("ropes", "span", 16, "f1", "ROPES"),
        TaskSpec("webq", "qa", 24, "contain", "WebQ"),
        TaskSpec("freebaseqa", "qa", 24, "contain", "FreebaseQA"),
        TaskSpec("multirc", "yesno", 4, "accuracy", "MultiRC"),
    )
}

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A number with optional sign, thousands separators and decimals; "18." at a sentence end reads as 18.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_GSM8K_MARKER = re.compile(r"The answer is|####", re.IGNORECASE)
# Punctuation stripped around the first word, including typographic quotes and markdown emphasis.
_WORD_STRIP = string.punctuation + "“”‘’«»"


def get_task(name: str) -> TaskSpec:
    """Return the task registered under ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop the articles a/an/the, fold whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _canonical_number(token: str) -> str | None:
    """``"1,000"`` -> ``"1000"``, ``"18.0"`` -> ``"18"``, ``"-0.50"`` -> ``"-0.5"``: equal numbers, equal strings."""
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K solution, in canonical form, or ``None`` when the text has no number.

    The first number after the first marker (``The answer is`` or ``####``) wins; without a marker, or with no number
    after it, the last number in the text is taken.
    """
    marker = _GSM8K_MARKER.search(text)
    if marker is not None:
        after = _NUMBER.search(text, marker.end())
        if after is not None:
            return _canonical_number(after.group())
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def read_yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"`` when the first whitespace-separated word (punctuation stripped) is one, else ``None``.

    Only the first word counts, so ``"No, yes is wrong"`` reads as no and ``"The answer is yes"`` is invalid.
    """
    words = text.split()
    if not words:
        return None
    word = words[0].strip(_WORD_STRIP).lower()
    return word if word in (YES, NO) else None


def read_yes_anywhere(text: str) -> str:
    """The published code's rule: ``"yes"`` when "yes" occurs anywhere in the lower-cased text, else ``"no"``."""
    return YES if YES in text.lower() else NO


YES_NO_RULES: dict[str, Callable[[str], str | None]] = {"first_word": read_yes_no, "anywhere": read_yes_anywhere}


def get_yes_no_rule(name: str) -> Callable[[str], str | None]:
    if name not in YES_NO_RULES:
        raise ValueError(f"--yes_no_rule {name!r}: choose one of {list(YES_NO_RULES)}")
    return YES_NO_RULES[name]


def _golds_list(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def _single_gold_yes_no(gold: str | Sequence[str]) -> str:
    golds = _golds_list(gold)
    label = read_yes_no(golds[0]) if len(golds) == 1 else None
    if label is None:
        raise ValueError(f"a yes/no task needs a single gold 'yes' or 'no', got {gold!r}")
    return label


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return 0.0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    return 2.0 * common / (len(pred_tokens) + len(gold_tokens))


def _exact_match(prediction: str, gold: str) -> float:
    pred = normalize_answer(prediction)
    return float(bool(pred) and pred == normalize_answer(gold))


def _contains(prediction: str, gold: str) -> float:
    norm_gold = normalize_answer(gold)
    return float(bool(norm_gold) and norm_gold in normalize_answer(prediction))


def _f1_from_means(tp, fp, fn):
    """F1 of the positive class from the (mean) counts; 0 where the denominator is 0. Works on arrays too."""
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom != 0)


def _mcc_from_means(tp, tn, fp, fn):
    """Matthews correlation from the (mean) confusion counts; 0 where any factor is 0. Works on arrays too."""
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(denom, dtype=float), where=denom != 0)


# A metric is f(mean over examples of a per-example component vector): a plain mean for accuracy-type metrics, the
# confusion counts for F1 and MCC (both are unchanged when every count is divided by n). Resampling examples then only
# means re-averaging the components (``imsm.evaluation.stats``), and a seed group averages f over its runs. "ratio"
# is a pooled ratio, e.g. (NLL sum, token count) -> nats per token over all examples.
METRIC_FUNCTIONS = {
    "f1_counts": lambda m: _f1_from_means(m[..., 0], m[..., 1], m[..., 2]),
    "mcc_counts": lambda m: _mcc_from_means(m[..., 0], m[..., 1], m[..., 2], m[..., 3]),
    "mean": lambda m: m[..., 0],
    "ratio": lambda m: m[..., 0] / m[..., 1],
}
# Metrics whose per-example component is a single 0/1 outcome: McNemar's test applies to them.
BINARY_METRICS = ("accuracy", "contain", "em")


@dataclass
class ExampleScores:
    """Per-example components of every metric of a task: ``metric -> (function name, array (n, c))``."""

    components: dict[str, tuple[str, np.ndarray]]

    def value(self, metric: str, rows: np.ndarray | None = None) -> float:
        kind, comp = self.components[metric]
        comp = comp if rows is None else comp[rows]
        return float(METRIC_FUNCTIONS[kind](comp.mean(0))) if len(comp) else 0.0


def _column(values) -> tuple[str, np.ndarray]:
    return "mean", np.asarray(values, dtype=float).reshape(-1, 1)


def _yes_no_components(task: str, predictions: Sequence[str], golds: Sequence[str | Sequence[str]],
                       yes_no_rule: str = "first_word"):
    rule = get_yes_no_rule(yes_no_rule)
    read = [rule(p) for p in predictions]
    gold = [_single_gold_yes_no(g) for g in golds]
    comps = {
        "accuracy": _column([p == g for p, g in zip(read, gold, strict=True)]),
        "yes_rate": _column([p == YES for p in read]),
        "invalid_rate": _column([p is None for p in read]),
    }
    if task == "mrpc":  # tp, fp, fn of the "yes" class; an invalid answer is a miss of a gold yes
        comps["f1"] = ("f1_counts", np.array([[p == YES and g == YES, p == YES and g == NO, p != YES and g == YES]
                                              for p, g in zip(read, gold, strict=True)], dtype=float).reshape(-1, 3))
    if task == "cola":
        # An invalid answer is scored as the wrong class, so it can only lower the correlation.
        effective = [p if p is not None else (NO if g == YES else YES) for p, g in zip(read, gold, strict=True)]
        comps["mcc"] = ("mcc_counts", np.array(
            [[p == YES and g == YES, p == NO and g == NO, p == YES and g == NO, p == NO and g == YES]
             for p, g in zip(effective, gold, strict=True)], dtype=float).reshape(-1, 4))
    return comps


def example_scores(task: str, predictions: Sequence[str], golds: Sequence[str | Sequence[str]],
                   yes_no_rule: str = "first_word") -> ExampleScores:
    """The per-example components of every metric of ``task`` (see ``METRIC_FUNCTIONS``); a yes/no task reads its
    predictions with ``YES_NO_RULES[yes_no_rule]``."""
    spec = get_task(task)
    if len(predictions) != len(golds):
        raise ValueError(f"{task}: {len(predictions)} predictions but {len(golds)} golds")
    if spec.kind == "yesno":
        return ExampleScores(_yes_no_components(task, predictions, golds, yes_no_rule))
    if spec.kind == "gsm8k":
        hits = []
        for pred, gold in zip(predictions, golds, strict=True):
            extracted = extract_gsm8k_answer(pred)
            gold_answers = {extract_gsm8k_answer(g) for g in _golds_list(gold)} - {None}
            hits.append(extracted is not None and extracted in gold_answers)
        return ExampleScores({"accuracy": _column(hits)})
    pairs = [(p, _golds_list(g)) for p, g in zip(predictions, golds, strict=True)]
    if spec.kind == "span":
        return ExampleScores({
            "em": _column([max((_exact_match(p, g) for g in gs), default=0.0) for p, gs in pairs]),
            "f1": _column([max((_token_f1(p, g) for g in gs), default=0.0) for p, gs in pairs]),
        })
    if spec.kind == "qa":
        return ExampleScores({
            "contain": _column([max((_contains(p, g) for g in gs), default=0.0) for p, gs in pairs]),
            "em": _column([max((_exact_match(p, g) for g in gs), default=0.0) for p, gs in pairs]),
        })
    raise AssertionError(f"task {task!r} has unsupported kind {spec.kind!r}")  # a TaskSpec no scorer handles


def compute_metrics(task: str, predictions: list[str], golds: list[str | list[str]],
                    yes_no_rule: str = "first_word") -> dict[str, float]:
    """Score ``predictions`` against ``golds`` for ``task``; see the module docstring for each metric and rule.

    ``golds[i]`` may be one answer or a list of acceptable answers (scores take the maximum over the list). The result
    always holds ``n``, the number of scored rows.
    """
    scores = example_scores(task, predictions, golds, yes_no_rule)
    metrics = {name: scores.value(name) for name in scores.components}
    metrics["n"] = len(predictions)
    return metrics
