"""reproduce.py and imsm/paper: the paper's numbers as stored, every plan's commands against train.py's and
evaluate.py's own parsers, and one plan end to end on a tiny model (kill, resume, SLURM
array through stand-in sbatch/srun, the report with the paper's column)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from imsm.args import parse_train_args
from imsm.evaluation.arguments import EvalArguments
from imsm.paper.compare import our_value, render
from imsm.paper.numbers import LAYOUTS, PAPER_ROWS, paper_row
from imsm.paper.plans import PAPER_BACKBONES, PLAN_NAMES, PlanOptions, build_plan, parse_model_overrides
from tests.paper.launchers import launch_args

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent.parent / "shared" / "data" if (ROOT.parent.parent / "shared").is_dir() else \
    Path("/work/shared/data")


# ---- the paper's numbers ------------------------------------------------------------------------------------------


def test_every_stored_row_reproduces_the_average_the_paper_prints():
    """The text rendering shifted cells between rows; a row placed wrongly would miss its printed average."""
    checked = 0
    for row in PAPER_ROWS:
        if row.average is None:
            continue
        mean = sum(row.values.values()) / len(row.values)
        assert abs(mean - row.average) <= 0.0051, (row.source, mean, row.average)
        checked += 1
    assert checked == 49


def test_values_printed_in_two_tables_agree():
    """A tuned model's score on its own target, and the untuned model's scores, appear in Table 1 too."""
    target = {"table2": "ropes", "table3": "gsm8k", "table6": "gsm8k", "table4": None}  # table4: every column
    same = 0
    for row in PAPER_ROWS:
        if row.table == "table1":
            continue
        first = paper_row("table1", row.backbone, row.label)
        for key, value in row.values.items():
            if first is not None and key in first.values and (
                    row.label == "untuned" or target[row.table] in (None, key.split("/")[0])):
                assert first.values[key] == value, (row.source, key)
                same += 1
    assert same == 7 + 1 + 4 + 6 * 5 + 3  # Table 2: ROPES, untuned MRPC; Table 3: 2 untuned rows; Table 4; Table 6


def test_table6_params_grow_by_the_gate_five_d_r():
    """The gate has 5·d·r parameters (W_A 4d×r, W_B r×d), d = 4096 for Llama3-8B."""
    for peft in ("LoRA", "IA3", "AdaLoRA"):
        base = float(paper_row("table6", "Llama3-8B", f"IMSM-{peft}").params.rstrip("M"))
        for rank in (4, 16):
            params = float(paper_row("table6", "Llama3-8B", f"IMSM-{peft}-r{rank}").params.rstrip("M"))
            assert params - base == pytest.approx(5 * 4096 * (rank - 8) / 1e6, abs=0.002)


def test_every_paper_row_names_a_layout_column_and_a_source():
    for row in PAPER_ROWS:
        assert set(row.values) <= {key for key, _ in LAYOUTS[row.table]}
        assert row.source.startswith(row.table.replace("table", "Table "))


# ---- plans ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_every_plan_expands_to_commands_that_train_py_and_evaluate_py_accept(name, tmp_path):
    plan = build_plan(name)
    for run in plan.runs:
        args = launch_args(run, tmp_path)
        model, data, imsm, training = parse_train_args([*args, "--bf16", "false"])  # train.py's own parsing
        assert model.model_name_or_path == run.backbone.model_id
        assert not model.trust_remote_code  # ChatGLM3 is converted to the native glm: no remote code runs
        assert training.output_dir == str(run.output_dir) and training.seed == 42
        assert data.train_file == f"DATA/{run.task}/train.jsonl"
        gate = "token" if "-token-" in run.label else "equal" if "-equal-" in run.label else \
            "query_aware" if run.label.startswith("IMSM-") else "none"
        assert imsm.gate == gate
        rank = re.search(r"-r(\d+)$", run.label)
        assert imsm.gate_rank == (int(rank.group(1)) if rank else 8)
        name = re.sub(r"-r\d+$", "", run.label).split("-")[-1]
        assert imsm.peft == {"LoRA": "lora", "IA3": "ia3", "AdaLoRA": "adalora", "DoRA": "dora",
                             "LoRAMoE": "loramoe"}[name]
    eval_parser = HfArgumentParser(EvalArguments)
    for evaluation in plan.evaluations:
        cmd = evaluation.command("DATA")
        (args,) = eval_parser.parse_args_into_dataclasses(args=cmd[cmd.index("evaluate.py") + 1:])
        assert args.untuned and args.yes_no_rule == "anywhere" and args.target in args.task_names
        assert args.run_dir == [str(run.output_dir) for run in evaluation.runs]
        assert args.labels.split(",") == ["untuned"] + [run.label for run in evaluation.runs]
        assert all(a.startswith("IMSM-") for a, _ in args.pairs)


def test_plan_sizes_and_shared_runs():
    sizes = {name: len(build_plan(name).runs) for name in PLAN_NAMES}
    assert sizes == {"table1": 72, "table2": 6, "table3": 6, "table4": 36, "table5": 0, "table6": 9, "figure3": 6}
    # trained once: Table 2's runs are Table 1's ChatGLM3 ROPES runs, Table 4's vanilla and IMSM runs Table 1's, Table
    # 6's rank-8 runs Table 1's Llama3 GSM8K IMSM runs
    assert len(build_plan("all").runs) == 72 + 0 + 6 + (36 - 18) + (9 - 3) + 6
    t1 = {run.output_dir for run in build_plan("table1").runs}
    assert {run.output_dir for run in build_plan("table2").runs} <= t1


def test_model_seed_and_method_overrides():
    plan = build_plan("table3", PlanOptions(models=parse_model_overrides(["my/model"]), seeds=(1, 2)))
    assert {run.backbone.model_id for run in plan.runs} == {"my/model"}
    assert len(plan.runs) == 2 * 2  # the three backbones collapse onto one model; DoRA, IMSM-DoRA x 2 seeds
    plan = build_plan("table3", PlanOptions(models=parse_model_overrides(["Qwen1.5-4B=my/qwen"])))
    assert {run.backbone.model_id for run in plan.runs} == {"THUDM/chatglm3-6b", "my/qwen",
                                                             PAPER_BACKBONES["Llama3.1-8B-Instruct"].model_id}
    with pytest.raises(ValueError, match="not one of the paper's backbones"):
        parse_model_overrides(["Qwen2=my/qwen"])
    with pytest.raises(ValueError, match="leaves no run"):
        build_plan("table2", PlanOptions(methods=("DoRA",)))


# ---- the report -----------------------------------------------------------------------------------------------------


def _stats(value: float, base: float, low: float, high: float) -> dict:
    return {"baseline": "untuned", "notes": ["mrpc scored with --yes_no_rule anywhere"],
            "labels": {"untuned": {"tasks": {"ropes": {"em": {"value": 0.5}, "f1": {"value": base}}}},
                       "LoRA": {"tasks": {"ropes": {"em": {"value": 0.7}, "f1": {"value": value}}}}},
            "comparisons": [{"a": "LoRA", "b": "untuned", "measure": "primary", "column": "ropes", "metric": "f1",
                             "delta": value - base, "low": low, "high": high}]}


def test_our_value_carries_the_interval_of_its_change_against_the_untuned_model():
    stats = _stats(0.8, 0.6, 0.15, 0.25)
    ours = our_value(stats, "LoRA", "ropes", "f1")
    assert (ours.value, ours.low, ours.high) == pytest.approx((80.0, 75.0, 85.0))
    em = our_value(stats, "LoRA", "ropes", "em")
    assert em.value == pytest.approx(70.0) and em.low is None  # no comparison record: no interval
    assert our_value(stats, "IMSM-LoRA", "ropes", "f1") is None


def test_report_puts_paper_ours_and_difference_in_each_cell(tmp_path):
    plan = build_plan("table2", PlanOptions(eval_dir=tmp_path, methods=("LoRA",)))
    out = plan.evaluations[0].output_dir
    out.mkdir(parents=True)
    (out / "stats.json").write_text(json.dumps(_stats(0.8, 0.6, 0.15, 0.25)))
    text = render(plan)
    lora = next(line for line in text.splitlines() if line.startswith("| ChatGLM3-6B | LoRA |"))
    assert "74.38† / 70.00 / -4.38" in lora  # ROPES EM: paper (not k/n: †), ours (no interval for EM), difference
    assert "Table 2, LoRA" in lora and "20.47 / — / —" in lora  # WebQ not evaluated in this stand-in
    assert "yes_no_rule anywhere" in text and "What cannot match" in text
    figure = build_plan("figure3", PlanOptions(eval_dir=tmp_path))
    assert "not available / — / —" in render(figure)


# ---- end to end -----------------------------------------------------------------------------------------------------

STAND_IN_DEEPSPEED = """#!/usr/bin/env bash
# deepspeed stand-in: drop the launcher's node/GPU options and the DeepSpeed config, run train.py in one process
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile|--num_nodes|--num_gpus|--deepspeed) shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
exec "$PYTHON" "${args[@]}"
"""
STAND_IN_SBATCH = """#!/usr/bin/env bash
# sbatch stand-in: runs the script at once (an array: every index in turn), records how it was submitted
dependency=""
while [ $# -gt 1 ]; do case "$1" in --dependency=*) dependency=${1#--dependency=} ;; esac; shift; done
script=$1
id=$(( $(cat "$SLURM_LOG.count" 2>/dev/null || echo 100) + 1 )); echo $id > "$SLURM_LOG.count"
echo "submit $id $script dependency=$dependency" >> "$SLURM_LOG"
export SLURM_JOB_ID=$id SLURM_JOB_NUM_NODES=1 SLURM_CPUS_PER_TASK=2 SLURM_JOB_NODELIST=node1
range=$(sed -n 's/^#SBATCH --array=//p' "$script")
if [ -n "$range" ]; then
    for i in $(seq ${range%-*} ${range#*-}); do
        SLURM_ARRAY_TASK_ID=$i bash "$script" >> "$SLURM_LOG.out" 2>&1 || echo "task $i failed" >> "$SLURM_LOG"
    done
else
    bash "$script" >> "$SLURM_LOG.out" 2>&1 || echo "job $id failed" >> "$SLURM_LOG"
fi
echo "$id"
"""
STAND_IN_SRUN = """#!/usr/bin/env bash
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
echo "srun $*" >> "$SLURM_LOG"
exec "$@"
"""


def _toy_data(folder: Path) -> Path:
    for task in ("ropes", "webq", "multirc", "mrpc", "freebaseqa"):
        (folder / task).mkdir(parents=True)
        rows = (SHARED_DATA / task / "test.jsonl").read_text().splitlines()
        (folder / task / "test.jsonl").write_text("\n".join(rows[:4]) + "\n")
        if task == "ropes":  # the shared folder has no ROPES training split: train on other test rows
            (folder / task / "train.jsonl").write_text("\n".join(rows[100:132]) + "\n")
    return folder


@pytest.mark.slow
def test_table2_end_to_end_on_a_tiny_model_killed_resumed_and_finished_by_a_slurm_array(tmp_path, tiny_model_dir):
    """Table 2's LoRA and IMSM-LoRA runs through their launchers (MODEL overridden to a tiny Llama): the sequential
    run is killed once the IMSM run has a complete checkpoint; the SLURM array (stand-in sbatch/srun) then skips the
    finished LoRA run, resumes the IMSM run, and its dependent evaluation job writes the report with the paper's
    column."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("deepspeed", STAND_IN_DEEPSPEED), ("sbatch", STAND_IN_SBATCH), ("srun", STAND_IN_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_LOG": str(log),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["table2", "--model", str(tiny_model_dir), "--methods", "LoRA,IMSM-LoRA", "--gpus", "1", "--seeds", "42",
              "--data_dir", str(_toy_data(tmp_path / "data")), "--runs_dir", str(tmp_path / "runs"),
              "--eval_dir", str(tmp_path / "eval"),
              "--train_args", ("--max_steps 20 --save_strategy steps --save_steps 1 --save_total_limit 2 "
                              "--per_device_train_batch_size 2 --gradient_accumulation_steps 1 --bf16 false "
                              "--gradient_checkpointing false --max_input_length 64 --max_output_length 8 "
                              "--report_to none --logging_steps 10 --frozen_memory_cache off"),
              "--eval_args", "--max_examples 4 --batch_size 4 --score decode --bootstrap_resamples 1000"]
    plan = build_plan("table2", PlanOptions(runs_dir=tmp_path / "runs", methods=("LoRA", "IMSM-LoRA"),
                                            models={"*": str(tiny_model_dir)}))
    lora, imsm = plan.runs
    # 1. in sequence on this node, killed once the IMSM run has saved a complete checkpoint
    proc = subprocess.Popen([sys.executable, "reproduce.py", *common], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (imsm.output_dir / "checkpoint-1" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the plan stopped before the IMSM checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (lora.output_dir / "final" / "COMPLETE").exists() and not (imsm.output_dir / "final").exists()
    lora_mtime = (lora.output_dir / "final" / "COMPLETE").stat().st_mtime
    # 2. the SLURM route: one array task per run, the evaluation after the array
    subprocess.run([sys.executable, "reproduce.py", *common, "--slurm", str(tmp_path / "slurm")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    assert "#SBATCH --array=0-1" in (tmp_path / "slurm" / "train.sbatch").read_text()
    subprocess.run(["bash", str(tmp_path / "slurm" / "submit.sh")], env=env, check=True, capture_output=True)
    submitted = log.read_text()
    assert "failed" not in submitted, (log.with_suffix(".log.out")).read_text()[-3000:]
    assert "submit 101 train.sbatch dependency=\n" in submitted
    assert "submit 102 evaluate.sbatch dependency=afterany:101" in submitted
    assert submitted.count("--train_index") == 2 and "--evaluate" in submitted
    job_output = Path(f"{log}.out").read_text()
    assert "finished (final/ complete), skipped" in job_output  # the LoRA run
    assert "resuming from its newest complete checkpoint" in job_output  # the IMSM run
    assert re.search(r"Resuming training from checkpoint with epoch \d+ and global step [1-9]", job_output)
    assert (lora.output_dir / "final" / "COMPLETE").stat().st_mtime == lora_mtime
    assert (imsm.output_dir / "final" / "COMPLETE").exists()
    stats = json.loads((tmp_path / "eval" / "table2" / tiny_model_dir.name / "stats.json").read_text())
    assert set(stats["labels"]) == {"untuned", "LoRA", "IMSM-LoRA"}
    report = (tmp_path / "eval" / "table2.md").read_text()
    row = next(line for line in report.splitlines()
               if line.startswith(f"| ChatGLM3-6B (ran {tiny_model_dir}) | IMSM-LoRA |"))
    assert row.count(" / ") == 2 * 6 and "79.15 / " in row and "Table 2, IMSM (LoRA)" in row
    assert "—" not in row.split("|")[3]  # ours filled in for ROPES
