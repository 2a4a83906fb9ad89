"""The paper report compares like with like: each cell read from the evaluation of its own table and panel, the
Params and speed tables, the cells the paper cannot have measured once, and the runs and evaluations set as the
published code ran them (github.com/ECNU-Text-Computing/IMSM), every remaining difference named."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from imsm.args import parse_train_args
from imsm.evaluation.arguments import EvalArguments
from imsm.paper.compare import CANNOT_MATCH, render
from imsm.paper.numbers import PAPER_ROWS, TEST_ROWS
from imsm.paper.plans import DEFAULT_SEEDS, PlanOptions, build_plan
from tests.paper.launchers import launch_args

ROOT = Path(__file__).resolve().parents[2]


def _write_stats(evaluation, values: dict[str, dict[str, float]]) -> None:
    """A stats.json whose labels score ``values`` ({label: {"task/metric": fraction}}); no comparisons."""
    labels = {}
    for label, cells in values.items():
        tasks: dict = {}
        for key, value in cells.items():
            task, metric = key.split("/")
            tasks.setdefault(task, {})[metric] = {"value": value}
        labels[label] = {"tasks": tasks}
    evaluation.output_dir.mkdir(parents=True, exist_ok=True)
    (evaluation.output_dir / "stats.json").write_text(json.dumps({"baseline": "untuned", "labels": labels,
                                                                  "comparisons": [], "notes": []}))


def _section(text: str, heading: str) -> list[str]:
    """The table rows under ``## heading`` up to the next heading."""
    lines = text.splitlines()
    start = lines.index(f"## {heading}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| ") and not line.startswith("| Backbone")]


def _row(rows: list[str], backbone: str, label: str) -> list[str]:
    (line,) = [r for r in rows if r.startswith(f"| {backbone} | {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


# ---- item 3: each cell from its own evaluation -----------------------------------------------------------------


def test_figure3_keeps_its_gsm8k_panel(tmp_path):
    plan = build_plan("figure3", PlanOptions(eval_dir=tmp_path))
    ropes, gsm8k = plan.evaluations
    _write_stats(ropes, {"LoRA": {"ropes/f1": 0.60, "webq/contain": 0.21}})
    _write_stats(gsm8k, {"LoRA": {"gsm8k/accuracy": 0.30, "webq/contain": 0.17}})
    text = render(plan)
    ropes_row = _row(_section(text, "Figure 3 (tuned on ropes)"), "Llama2-7B", "LoRA")
    gsm8k_row = _row(_section(text, "Figure 3 (tuned on gsm8k)"), "Llama2-7B", "LoRA")
    assert ropes_row[2:4] == ["not available / 60.00 / —", "not available / 21.00 / —"]
    assert gsm8k_row[2:4] == ["not available / 30.00 / —", "not available / 17.00 / —"]


def test_all_reads_table2s_mrpc_from_the_ropes_tuned_runs_and_gives_each_table_its_own_rows(tmp_path):
    plan = build_plan("all", PlanOptions(eval_dir=tmp_path))
    by_name = {(ev.table, ev.name): ev for ev in plan.evaluations}
    mrpc_tuned = by_name[("table1", "THUDM--chatglm3-6b/mrpc")]
    ropes_tuned = by_name[("table2", "THUDM--chatglm3-6b")]
    _write_stats(mrpc_tuned, {"LoRA": {"mrpc/accuracy": 0.87, "mrpc/f1": 0.9}})
    _write_stats(ropes_tuned, {"LoRA": {"mrpc/accuracy": 0.70, "ropes/em": 0.74}})
    text = render(plan)
    table1 = _section(text, "Table 1")
    table2 = _section(text, "Table 2")
    assert _row(table1, "ChatGLM3-6B", "LoRA")[2] == "86.67 / 87.00 / +0.33"  # MRPC Acc. of the MRPC-tuned run
    assert _row(table2, "ChatGLM3-6B", "LoRA")[5] == "70.32 / 70.00 / -0.32"  # MRPC of the ROPES-tuned run
    assert _row(table2, "ChatGLM3-6B", "LoRA")[2] == "74.38† / 74.00 / -0.38"
    # rows: the untuned model and the plan's labels of that table only (Table 1: 3 backbones x 7)
    assert len(table1) == 21 and len(table2) == 7 and len(_section(text, "Table 3")) == 9
    assert len(_section(text, "Table 4")) == 12 + 1 and len(_section(text, "Table 6")) == 9 + 1
    assert len(_section(text, "Figure 4")) == 12 + 1 and len(_section(text, "Figure 3 (tuned on ropes)")) == 4


def test_two_evaluations_of_one_cell_are_refused(tmp_path):
    plan = build_plan("table2", PlanOptions(eval_dir=tmp_path))
    plan.evaluations.append(plan.evaluations[0])
    with pytest.raises(ValueError, match="scored by two evaluations"):
        render(plan)


def test_params_column_shows_the_papers_and_the_finished_runs(tmp_path):
    plan = build_plan("table6", PlanOptions(runs_dir=tmp_path / "runs", eval_dir=tmp_path / "eval"))
    run = next(r for r in plan.runs if r.label == "IMSM-IA3-r16")
    (run.output_dir / "final").mkdir(parents=True)
    (run.output_dir / "final" / "train_stats.json").write_text(json.dumps({"trainable_parameters": 851_968}))
    rows = _section(render(plan), "Table 6")
    assert _row(rows, "Llama3-8B", "IMSM-IA3-r16")[-2] == "0.852M / 0.852M"
    assert _row(rows, "Llama3-8B", "IMSM-IA3")[-2] == "0.688M / —"


def test_table5_is_a_plan_over_bench_decode_and_its_report_reads_the_bench(tmp_path):
    plan = build_plan("table5", PlanOptions(eval_dir=tmp_path))
    assert not plan.runs and [b.backbone.name for b in plan.benches] == ["ChatGLM3-6B", "Qwen1.5-4B", "Llama3-8B"]
    bench = plan.benches[2]
    cmd = bench.command("DATA", sys.executable)
    assert cmd[1:4] == ["bench/bench_decode.py", "--model_name_or_path", "meta-llama/Meta-Llama-3-8B"]
    # the real bench on a tiny random Llama, its --output_file read back by the report
    tiny = [sys.executable, "bench/bench_decode.py", "--tiny", "--num_prompts", "2", "--prompt_len", "8",
            "--new_tokens", "3", "--baseline_prompts", "1", "--baseline_new_tokens", "2", "--repeats", "1",
            "--batch_size", "2", "--threads", "1", "--output_file", str(bench.output_file)]
    done = subprocess.run(tiny, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(bench.output_file.read_text())
    (row,) = [r for r in _section(render(plan), "Table 5 (inference speed)") if r.startswith("| Llama3-8B")]
    ratio = result["imsm_over_vanilla_decoding"]["IMSM (mixed LoRA batch)"]
    assert f"not available / {ratio:.3f}" in row
    assert _row(_section(render(plan), "Table 5 (inference speed)"), "Qwen1.5-4B", "not available / —")


# ---- item 4: as the authors ran it, or a named difference ---------------------------------------------------------


def test_the_twenty_cells_that_are_not_k_over_n_are_marked_once_each():
    marked = re.findall(r"(\d+\.\d\d)† /", render(build_plan("all")))
    # independently, by brute force: a counted cell (accuracy, EM, contain) is 100·k/n of its test rows for some k
    expected = [f"{value:.2f}" for row in PAPER_ROWS for key, value in row.values.items()
                if key.split("/")[1] in ("accuracy", "em", "contain")
                and not any(abs(100 * k / TEST_ROWS[key.split("/")[0]] - value) < 0.005 + 1e-9
                            for k in range(TEST_ROWS[key.split("/")[0]] + 1))]
    assert len(expected) == 20 and sorted(marked) == sorted(expected)


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "figure3"])
def test_evaluations_decode_up_to_the_runs_training_answer_length(name, tmp_path):
    """The published model_inference.py decodes every test set of a run up to its max_output_length."""
    parser = HfArgumentParser(EvalArguments)
    for evaluation in build_plan(name).evaluations:
        lengths = set()
        for run in evaluation.runs:
            args = launch_args(run, tmp_path)
            lengths.add(int(args[args.index("--max_output_length") + 1]))
        cmd = evaluation.command("DATA")
        (parsed,) = parser.parse_args_into_dataclasses(args=cmd[cmd.index("evaluate.py") + 1:])
        assert parsed.max_new_tokens == max(lengths)
        assert parsed.max_new_tokens == {"gsm8k": 512, "ropes": 32, "mrpc": 8, "cola": 8}[evaluation.target]


def test_runs_take_the_published_codes_settings_where_the_paper_is_silent(tmp_path):
    plan = build_plan("all")
    seen = set()
    for run in plan.runs:
        key = (run.variant.peft, run.label.startswith("IMSM-"))
        if key in seen:
            continue
        seen.add(key)
        _, _, imsm, training = parse_train_args([*launch_args(run, tmp_path), "--bf16", "false"])
        if run.variant.peft in ("lora", "adalora"):
            assert imsm.options.lora_dropout == 0.1  # train.py's configs, baseline/{lora,adalora}.py
        if not run.label.startswith("IMSM-") and run.variant.peft in ("lora", "adalora", "dora"):
            assert training.weight_decay == 0.0  # the baselines' Trainer JSONs set none
        if (run.variant.peft, run.label.startswith("IMSM-")) == ("dora", False):
            assert training.lr_scheduler_type == "linear"  # baseline/dora/dora.json
        if (run.variant.peft, run.label.startswith("IMSM-")) == ("ia3", False):
            assert training.warmup_steps == 0.06  # baseline/ia3/ia3.json
        if run.variant.peft == "ia3":  # baseline/ia3/ia3.json: adafactor; the IMSM (IA)3 config: adamw
            assert training.optim == ("adamw_torch" if run.label.startswith("IMSM-") else "adafactor")
    assert len(seen) == 9  # 4 PEFT x vanilla/IMSM + LoRAMoE


def test_what_cannot_match_names_every_kept_difference():
    text = " ".join(CANNOT_MATCH)
    for words in ("Yes/no Acc.", "GSM8K", "'####'", "fp16", "update_and_allocate", "Gate initialisation",
                  "Seeds", "not k/n", "DoRA dropout", "Decoding", "Lengths"):
        assert words in text, words


def test_reproduce_defaults_to_seeds_a_comparison_needs():
    sys.path.insert(0, str(ROOT))
    import reproduce

    args = reproduce.parse_args(["table2"])
    assert args.seed_list == DEFAULT_SEEDS and len(DEFAULT_SEEDS) >= 3
