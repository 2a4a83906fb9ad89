"""The numbers the IMSM paper prints, stored once, each row with its source (table and row).

Source: Song, Xue, He, Liu, Lu, "Interweaving Memories of a Siamese Large Language Model", AAAI 2025
(arXiv:2412.17383v1). The PDF could not be read from this machine; the values were transcribed from a text rendering
of the paper found with the search tool (the arXiv HTML page and a Markdown conversion of the AAAI version). Its
tables were partly garbled (Table 1's Qwen1.5 and Llama3 blocks and Tables 2-3 had cells shifted between rows), so
every row below was placed by checking it against the paper's own Average column: each stored row reproduces its
printed average to the rounding (``tests/paper/test_paper.py``), and values printed in two tables agree. What the text
rendering could not give is not stored: Figure 3 (LoRAMoE, a bar chart) and Figure 4 (the ablation's forgetting, a
bar chart) have no numbers here, and reports say "not available" for them.

Values are percentages as printed (accuracy, F1, MCC × 100). Keys are ``task/metric`` with our metric names
(``imsm.evaluation.measures.metrics``): the paper's WebQ and Freebase columns are "contain" (the gold answer inside the
response), its MRPC columns accuracy and F1, CoLA MCC, ROPES EM and token F1, GSM8K and MultiRC accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER = "Song et al., AAAI 2025 (arXiv:2412.17383v1)"


@dataclass(frozen=True)
class PaperRow:
    """One printed row: ``values`` maps ``task/metric`` to the printed percentage; ``average`` is the printed Average
    column (None where the table has none), kept to check the transcription."""

    table: str
    backbone: str
    label: str  # our evaluate.py label for the row's model: untuned, LoRA, IMSM-LoRA, IMSM-token-LoRA, ...
    source: str
    values: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    params: str | None = None  # the printed trainable-parameter count, e.g. "6.980M"


# The forgetting columns that follow the target in Tables 2 and 3 and Figures 3 and 4.
_FORGETTING = [("webq/contain", "WebQ"), ("multirc/accuracy", "MultiRC"), ("mrpc/accuracy", "MRPC"),
               ("freebaseqa/contain", "Freebase"), ("avg", "Avg.")]
# The paper's column layout per table: (key, header). "avg" is the mean of the row's other columns, as printed.
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "table1": [("mrpc/accuracy", "MRPC Acc."), ("mrpc/f1", "MRPC F1"), ("cola/mcc", "CoLA Mcc."),
               ("ropes/em", "ROPES EM"), ("ropes/f1", "ROPES F1"), ("gsm8k/accuracy", "GSM8K Acc."),
               ("avg", "Average")],
    "table2": [("ropes/em", "ROPES"), *_FORGETTING],
    "table3": [("gsm8k/accuracy", "GSM8K"), *_FORGETTING],
    "table4": [("mrpc/accuracy", "MRPC Acc."), ("mrpc/f1", "MRPC F1"), ("cola/mcc", "CoLA"), ("ropes/em", "ROPES EM"),
               ("ropes/f1", "ROPES F1"), ("avg", "Avg.")],
    "table6": [("gsm8k/accuracy", "GSM8K"), ("webq/contain", "WebQ"), ("freebaseqa/contain", "Freebase")],
    "figure3": [("target", "target"), *_FORGETTING],
    # Figure 4: the ablation's forgetting (Table 4's variants on ChatGLM3-6B); a bar chart, no numbers stored
    "figure4": [("target", "target"), *_FORGETTING],
}
PARAMS_TABLES = ("table1", "table6")  # the layouts that print a Params column

# Rows of each task's test file as the authors publish it (data/<task>/data_test.json, the same counts as
# ../shared/data): an accuracy, EM or contain score over one evaluation is k/n of these for some integer k.
TEST_ROWS = {"gsm8k": 1319, "mrpc": 1725, "cola": 1043, "ropes": 1688, "webq": 2032, "freebaseqa": 3996,
             "multirc": 312}
_COUNTED = ("accuracy", "em", "contain")  # F1 and MCC are not fractions of examples

_T1 = LAYOUTS["table1"][:-1]
_FORGET_ROPES = LAYOUTS["table2"][:-1]
_FORGET_GSM8K = LAYOUTS["table3"][:-1]
_T4 = LAYOUTS["table4"][:-1]
_T6 = LAYOUTS["table6"]


def _row(table: str, backbone: str, label: str, source: str, layout: list[tuple[str, str]], numbers: list[float],
         average: float | None = None, params: str | None = None) -> PaperRow:
    if len(numbers) != len(layout):
        raise ValueError(f"{source}: {len(numbers)} numbers for {len(layout)} columns")
    return PaperRow(table, backbone, label, source, {key: v for (key, _), v in zip(layout, numbers)}, average, params)


def _table1(backbone: str, printed: str,
            rows: list[tuple[str, str, str | None, list[float], float]]) -> list[PaperRow]:
    return [_row("table1", backbone, label, f"Table 1, {printed} / {row}", _T1, nums, avg, params)
            for label, row, params, nums, avg in rows]


PAPER_ROWS: tuple[PaperRow, ...] = (
    *_table1("ChatGLM3-6B", "ChatGLM3", [
        ("untuned", "Original", None, [74.72, 82.88, 43.99, 58.47, 22.67, 45.79], 54.75),
        ("LoRA", "LoRA", "3.899M", [86.67, 90.10, 63.56, 74.38, 79.41, 44.50], 73.10),
        ("IMSM-LoRA", "IMSM (LoRA)", "4.063M", [87.13, 90.49, 65.21, 79.15, 81.28, 48.45], 75.29),
        ("IA3", "(IA)3", "0.513M", [86.96, 90.32, 62.12, 72.22, 76.36, 50.04], 73.00),
        ("IMSM-IA3", "IMSM ((IA)3)", "0.676M", [88.70, 91.66, 64.53, 73.34, 77.56, 52.46], 74.71),
        ("AdaLoRA", "AdaLoRA", "2.925M", [87.02, 90.35, 62.48, 75.14, 78.64, 49.36], 73.83),
        ("IMSM-AdaLoRA", "IMSM (AdaLoRA)", "3.089M", [87.77, 90.81, 65.57, 78.50, 82.23, 50.80], 75.95),
    ]),
    *_table1("Qwen1.5-4B", "Qwen1.5", [
        ("untuned", "Original", None, [74.20, 81.04, 46.50, 56.58, 38.58, 18.35], 52.54),
        ("LoRA", "LoRA", "3.277M", [86.41, 89.79, 65.23, 63.63, 69.56, 50.27], 70.82),
        ("IMSM-LoRA", "IMSM (LoRA)", "3.379M", [87.25, 90.48, 65.80, 65.64, 72.71, 52.69], 72.43),
        ("IA3", "(IA)3", "0.205M", [86.84, 90.16, 64.96, 56.46, 64.35, 51.33], 69.02),
        ("IMSM-IA3", "IMSM ((IA)3)", "0.307M", [87.13, 90.73, 69.13, 60.25, 67.62, 53.15], 71.34),
        ("AdaLoRA", "AdaLoRA", "2.458M", [86.73, 90.15, 65.63, 64.81, 68.62, 52.01], 71.33),
        ("IMSM-AdaLoRA", "IMSM (AdaLoRA)", "2.560M", [88.41, 91.32, 66.24, 67.18, 72.36, 51.86], 72.90),
    ]),
    *_table1("Llama3-8B", "Llama3", [
        ("untuned", "Original", None, [68.17, 79.83, 37.96, 49.23, 13.95, 3.23], 42.06),
        ("LoRA", "LoRA", "6.816M", [89.10, 91.88, 71.65, 87.26, 89.09, 59.59], 81.43),
        ("IMSM-LoRA", "IMSM (LoRA)", "6.980M", [89.04, 91.84, 72.05, 87.85, 90.42, 61.26], 82.08),
        ("IA3", "(IA)3", "0.524M", [87.71, 90.78, 68.16, 78.55, 82.86, 62.62], 78.45),
        ("IMSM-IA3", "IMSM ((IA)3)", "0.688M", [88.87, 91.77, 70.78, 81.58, 85.95, 61.33], 80.05),
        ("AdaLoRA", "AdaLoRA", "5.113M", [88.87, 91.72, 68.77, 87.21, 88.98, 55.42], 80.16),
        ("IMSM-AdaLoRA", "IMSM (AdaLoRA)", "5.276M", [89.22, 91.95, 71.55, 87.80, 89.05, 59.74], 81.55),
    ]),
    # Table 2: ChatGLM3-6B fine-tuned on ROPES (its column is ROPES EM, as in Table 1), forgetting on the others.
    *(_row("table2", "ChatGLM3-6B", label, f"Table 2, {printed}", _FORGET_ROPES, nums, avg)
      for label, printed, nums, avg in [
        ("untuned", "ChatGLM3", [58.47, 25.49, 71.74, 74.72, 36.81], 53.45),
        ("LoRA", "LoRA", [74.38, 20.47, 66.67, 70.32, 38.61], 54.09),
        ("IMSM-LoRA", "IMSM (LoRA)", [79.15, 21.11, 71.47, 71.83, 38.01], 56.31),
        ("IA3", "(IA)3", [72.22, 20.96, 70.83, 72.58, 37.34], 54.79),
        ("IMSM-IA3", "IMSM ((IA)3)", [73.34, 21.36, 73.72, 74.20, 37.74], 56.07),
        ("AdaLoRA", "AdaLoRA", [75.14, 19.98, 67.63, 70.20, 35.99], 53.79),
        ("IMSM-AdaLoRA", "IMSM (AdaLoRA)", [78.50, 22.88, 73.72, 74.96, 38.41], 57.69),
    ]),
    # Table 3: DoRA on GSM8K; the paper replaced Llama3 by Llama3.1-instruct here ("crashes when using DoRA").
    *(_row("table3", backbone, label, f"Table 3, {printed}", _FORGET_GSM8K, nums, avg)
      for backbone, label, printed, nums, avg in [
        ("ChatGLM3-6B", "untuned", "ChatGLM3", [45.79, 25.49, 71.74, 74.72, 36.81], 50.91),
        ("ChatGLM3-6B", "DoRA", "ChatGLM3 / DoRA", [45.34, 26.18, 71.47, 74.55, 33.26], 50.16),
        ("ChatGLM3-6B", "IMSM-DoRA", "ChatGLM3 / IMSM", [48.75, 25.49, 75.00, 75.19, 38.89], 52.66),
        ("Qwen1.5-4B", "untuned", "Qwen1.5", [18.35, 32.33, 66.99, 74.20, 47.12], 47.80),
        ("Qwen1.5-4B", "DoRA", "Qwen1.5 / DoRA", [51.33, 27.51, 66.03, 73.91, 41.19], 51.99),
        ("Qwen1.5-4B", "IMSM-DoRA", "Qwen1.5 / IMSM", [52.84, 28.94, 68.27, 74.26, 43.52], 53.57),
        ("Llama3.1-8B-Instruct", "untuned", "Llama3.1", [33.06, 41.78, 54.17, 42.43, 76.35], 49.56),
        ("Llama3.1-8B-Instruct", "DoRA", "Llama3.1 / DoRA", [72.71, 32.78, 58.65, 55.55, 65.92], 57.12),
        ("Llama3.1-8B-Instruct", "IMSM-DoRA", "Llama3.1 / IMSM", [73.77, 40.31, 66.90, 47.94, 75.45], 60.87),
    ]),
    # Table 4: the ablation on ChatGLM3-6B; "w/o query" is our --gate token, "w/o gate" our --gate equal.
    *(_row("table4", "ChatGLM3-6B", label, f"Table 4, {printed}", _T4, nums, avg) for label, printed, nums, avg in [
        ("LoRA", "LoRA", [86.67, 90.10, 63.56, 74.38, 79.41], 78.82),
        ("IMSM-LoRA", "LoRA / IMSM", [87.13, 90.49, 65.21, 79.15, 81.28], 80.65),
        ("IMSM-token-LoRA", "LoRA / w/o query", [87.62, 90.81, 64.92, 77.43, 80.38], 80.23),
        ("IMSM-equal-LoRA", "LoRA / w/o gate", [87.01, 90.31, 63.74, 76.54, 80.12], 79.54),
        ("IA3", "(IA)3", [86.96, 90.32, 62.12, 72.22, 76.36], 77.60),
        ("IMSM-IA3", "(IA)3 / IMSM", [88.70, 91.66, 64.53, 73.34, 77.56], 79.16),
        ("IMSM-token-IA3", "(IA)3 / w/o query", [87.77, 91.04, 63.49, 72.93, 76.73], 78.39),
        ("IMSM-equal-IA3", "(IA)3 / w/o gate", [87.04, 90.48, 62.94, 71.86, 76.77], 77.82),
        ("AdaLoRA", "AdaLoRA", [87.02, 90.35, 62.48, 75.14, 78.64], 78.73),
        ("IMSM-AdaLoRA", "AdaLoRA / IMSM", [87.77, 90.81, 65.57, 78.50, 82.23], 80.98),
        ("IMSM-token-AdaLoRA", "AdaLoRA / w/o query", [87.59, 90.68, 65.19, 75.41, 79.56], 79.69),
        ("IMSM-equal-AdaLoRA", "AdaLoRA / w/o gate", [87.30, 90.59, 64.94, 76.60, 80.07], 79.90),
    ]),
    # Table 6: gate rank on Llama3-8B tuned on GSM8K (no Average column); the Params column checks 5·d·r, d = 4096.
    *(_row("table6", "Llama3-8B", label, f"Table 6, {printed}", _T6, nums, params=params)
      for label, printed, params, nums in [
        ("IMSM-LoRA-r4", "LoRA / rank 4", "6.898M", [59.44, 40.55, 73.15]),
        ("IMSM-LoRA", "LoRA / rank 8", "6.980M", [61.26, 40.90, 73.72]),
        ("IMSM-LoRA-r16", "LoRA / rank 16", "7.143M", [59.21, 39.86, 75.23]),
        ("IMSM-IA3-r4", "(IA)3 / rank 4", "0.606M", [58.98, 37.80, 74.60]),
        ("IMSM-IA3", "(IA)3 / rank 8", "0.688M", [61.33, 38.58, 74.32]),
        ("IMSM-IA3-r16", "(IA)3 / rank 16", "0.852M", [61.26, 38.98, 75.90]),
        ("IMSM-AdaLoRA-r4", "AdaLoRA / rank 4", "5.194M", [59.67, 41.63, 73.97]),
        ("IMSM-AdaLoRA", "AdaLoRA / rank 8", "5.276M", [59.74, 40.94, 74.28]),
        ("IMSM-AdaLoRA-r16", "AdaLoRA / rank 16", "5.440M", [60.50, 42.72, 75.45]),
    ]),
)


def paper_row(table: str, backbone: str, label: str) -> PaperRow | None:
    """The printed row of ``table`` for this backbone and label; None where the paper prints none we could read."""
    for row in PAPER_ROWS:
        if (row.table, row.backbone, row.label) == (table, backbone, label):
            return row
    return None


def is_k_over_n(key: str, value: float) -> bool | None:
    """Whether a printed percentage ``value`` of ``task/metric`` is 100·k/n rounded to two decimals for some k, n
    the task's test rows; None for a metric that is not a count (F1, MCC). A counted cell that is not k/n cannot be
    one evaluation over the test file: most likely a mean over runs, which the paper does not state."""
    task, metric = key.split("/")
    if metric not in _COUNTED or task not in TEST_ROWS:
        return None
    n = TEST_ROWS[task]
    k = round(value * n / 100)
    return any(round(100 * j / n, 2) == round(value, 2) for j in (k - 1, k, k + 1) if 0 <= j <= n)
