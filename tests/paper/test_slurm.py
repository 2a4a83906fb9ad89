"""reproduce.py on a cluster: the SLURM files through stand-in sbatch/srun/scontrol on two nodes with a failed array
task, the sequential route going on past a failed run, the run lock, the global batch that cannot span the nodes,
the --backbones filter and the shared frozen-memory cache's removal. Every training run is a stand-in `deepspeed`
that records how it was launched and writes a finished run folder (or fails); evaluate.py is a stand-in that writes
the stats.json the report reads."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imsm.paper.execute import SlurmResources, check_resources, keep_backbones, nodes_for, train, write_slurm
from imsm.paper.plans import PlanOptions, build_plan

ROOT = Path(__file__).resolve().parents[2]

STAND_INS = {
    # sbatch: runs the script at once with the SLURM variables of its allocation (an array: every index in turn;
    # nodes gpu01..gpuN), whatever the dependency, and records how it was submitted and whether it failed
    "sbatch": r"""#!/usr/bin/env bash
dependency=""
while [ $# -gt 1 ]; do case "$1" in --dependency=*) dependency=${1#--dependency=} ;; esac; shift; done
script=$1
id=$(( $(cat "$SLURM_LOG.count" 2>/dev/null || echo 100) + 1 )); echo $id > "$SLURM_LOG.count"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
cpus=$(sed -n 's/^#SBATCH --cpus-per-task=//p' "$script")
mem=$(sed -n 's/^#SBATCH --mem=//p' "$script")
echo "submit $id $(basename "$script") dependency=$dependency nodes=$nodes cpus=$cpus mem=$mem" >> "$SLURM_LOG"
list=$(seq -f "gpu%02g" 1 "$nodes" | paste -sd,)
export SLURM_JOB_ID=$id SLURM_JOB_NUM_NODES=$nodes SLURM_CPUS_PER_TASK=$cpus SLURM_JOB_NODELIST="[$list]"
range=$(sed -n 's/^#SBATCH --array=//p' "$script")
if [ -n "$range" ]; then
    for i in $(seq ${range%-*} ${range#*-}); do
        SLURM_ARRAY_TASK_ID=$i bash "$script" >> "$SLURM_LOG.out" 2>&1 || echo "task $id.$i failed" >> "$SLURM_LOG"
    done
else
    bash "$script" >> "$SLURM_LOG.out" 2>&1 || echo "job $id failed" >> "$SLURM_LOG"
fi
echo "$id"
""",
    "srun": r"""#!/usr/bin/env bash
opts=(); while [ $# -gt 0 ] && [[ "$1" == --* ]]; do opts+=("$1"); shift; done
echo "srun ${opts[*]} SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK-} NNODES=${NNODES-} GPUS=${GPUS-}" >> "$SLURM_LOG"
exec "$@"
""",
    "scontrol": r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$SLURM_LOG"
[ "$1 $2" = "show hostnames" ] && echo "$3" | tr -d '[]' | tr , '\n'
""",
    # deepspeed: records its node options and hostfile, then fails (OUTPUT_DIR matching $FAIL) or writes a finished
    # run folder, and fills the frozen-memory cache it was given
    "deepspeed": r"""#!/usr/bin/env bash
record="deepspeed"; out=""; cache=""; hostfile=""
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile) hostfile=$2; record+=" --hostfile $2"; shift 2 ;;
        --num_nodes|--num_gpus) record+=" $1 $2"; shift 2 ;;
        --output_dir) out=$2; shift 2 ;;
        --frozen_memory_cache) cache=$2; shift 2 ;;
        *) shift ;;
    esac
done
[ -n "$hostfile" ] && record+=" hostfile=[$(paste -sd, "$hostfile")]"
echo "$record output_dir=$out cache=$cache" >> "$SLURM_LOG"
[ -n "$cache" ] && mkdir -p "$cache" && touch "$cache/rank0-0.safetensors"
if [ -n "${FAIL-}" ] && [[ "$out" == *"$FAIL"* ]]; then echo "stand-in failure" >&2; exit 3; fi
mkdir -p "$out/final"
echo '{"global_step": 1}' > "$out/final/COMPLETE"
""",
    # the interpreter given as --python: evaluate.py (also under torch.distributed.run) writes a stats.json with the
    # labels it was given; anything else is the real interpreter
    "python": r"""#!/usr/bin/env bash
for a in "$@"; do
    if [ "$a" = evaluate.py ]; then
        echo "evaluate $*" >> "$SLURM_LOG"
        exec "$REAL_PYTHON" -c '
import json, pathlib, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
labels = args[args.index("--labels") + 1].split(",")
out.mkdir(parents=True, exist_ok=True)
value = {"value": 0.5}
stats = {"baseline": "untuned", "notes": [], "comparisons": [],
         "labels": {label: {"tasks": {"ropes": {"em": value, "f1": value}}} for label in labels}}
(out / "stats.json").write_text(json.dumps(stats))
' "$@"
    fi
done
exec "$REAL_PYTHON" "$@"
""",
}


@pytest.fixture
def cluster(tmp_path):
    """PATH with the stand-ins, the log they write, and the environment a command runs in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_LOG": str(log),
           "REAL_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    for name in ("HOSTFILE", "NNODES", "GPUS", "PER_DEVICE_BATCH", "FAIL"):
        env.pop(name, None)
    return bin_dir, log, env


def _plan_args(tmp_path: Path, bin_dir: Path) -> list[str]:
    return ["table2", "--methods", "LoRA,IMSM-LoRA,IA3", "--seeds", "42", "--data_dir", str(tmp_path / "data"),
            "--runs_dir", str(tmp_path / "runs"), "--eval_dir", str(tmp_path / "eval"),
            "--python", str(bin_dir / "python")]


def _reproduce(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "reproduce.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)


def _row(report: str, label: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| ChatGLM3-6B | {label} |"))


@pytest.mark.slow  # eight reproduce.py processes
def test_two_node_slurm_plan_with_a_failed_array_task(tmp_path, cluster):
    """Two nodes x 8 GPUs, per-device batch 1: LoRA and IMSM-LoRA (global batch 16) span both nodes through a
    hostfile built from the allocation, (IA)3 (global batch 8) gets a one-node array; IMSM-LoRA fails, the
    evaluation still starts (afterany), scores the rest, marks the failed run's cells and names it. Rerunning the
    failed task and the evaluation completes the report and removes the shared frozen-memory cache."""
    bin_dir, log, env = cluster
    env = {**env, "PER_DEVICE_BATCH": "1", "FAIL": "imsm_lora_ropes"}
    plan_args = _plan_args(tmp_path, bin_dir)
    slurm = tmp_path / "slurm"
    done = _reproduce([*plan_args, "--nodes", "2", "--gpus", "8", "--cpus_per_task", "32", "--mem", "400G",
                       "--slurm", str(slurm), "--sbatch_option=--partition=gpu"], env)
    assert done.returncode == 0, done.stderr
    two, one = (slurm / "train.sbatch").read_text(), (slurm / "train-1node.sbatch").read_text()
    assert "#SBATCH --nodes=2" in two and "#SBATCH --array=0-1" in two and "RUNS=(0 1)" in two
    assert "#SBATCH --nodes=1" in one and "#SBATCH --array=0-0" in one and "RUNS=(2)" in one
    assert "#SBATCH --partition=gpu" in two and "#SBATCH --cpus-per-task=32" in one
    assert "export PER_DEVICE_BATCH=1" in two  # the batch the runs were grouped by, whatever the submitting shell

    submitted = subprocess.run(["bash", str(slurm / "submit.sh")], env=env, capture_output=True, text=True,
                               check=False)
    assert submitted.returncode == 0, submitted.stderr
    lines = log.read_text().splitlines()
    assert "submit 101 train.sbatch dependency= nodes=2 cpus=32 mem=400G" in lines
    assert "submit 102 train-1node.sbatch dependency= nodes=1 cpus=32 mem=400G" in lines
    assert "submit 103 evaluate.sbatch dependency=afterany:101:102 nodes=1 cpus=32 mem=400G" in lines
    assert "scontrol show hostnames [gpu01,gpu02]" in lines
    sruns = [line for line in lines if line.startswith("srun")]
    assert len(sruns) == 4 and all("--nodes=1 --ntasks=1 SRUN_CPUS_PER_TASK=32" in line for line in sruns)
    assert sruns[0].endswith("NNODES=2 GPUS=8") and sruns[2].endswith("NNODES=1 GPUS=8")
    launches = [line for line in lines if line.startswith("deepspeed")]
    hostfile = slurm.resolve() / "logs" / "hostfile-101"
    runs = tmp_path / "runs" / "THUDM--chatglm3-6b"
    two_nodes = f"deepspeed --hostfile {hostfile} --num_nodes 2 --num_gpus 8 hostfile=[gpu01 slots=8,gpu02 slots=8]"
    assert launches == [
        f"{two_nodes} output_dir={runs}/lora_ropes/seed42 cache=",
        f"{two_nodes} output_dir={runs}/imsm_lora_ropes/seed42 cache={runs}/frozen_memory_cache/ropes",
        f"deepspeed --num_nodes 1 --num_gpus 8 output_dir={runs}/ia3_ropes/seed42 cache=",
    ]
    assert "task 101.1 failed" in lines and "job 103 failed" in lines  # the evaluation ran, and says a run failed
    evaluate = next(line for line in lines if line.startswith("evaluate"))
    assert "--nproc_per_node 8" in evaluate and "--labels untuned,LoRA,IA3 " in evaluate
    job_output = Path(f"{log}.out").read_text()
    assert "1 of 3 runs did not finish" in job_output and f"{runs}/imsm_lora_ropes/seed42" in job_output
    report = (tmp_path / "eval" / "table2.md").read_text()
    assert "not trained" in _row(report, "IMSM-LoRA") and "not trained" not in _row(report, "LoRA")
    assert "50.00" in _row(report, "LoRA")  # ROPES EM from the stand-in's stats.json
    assert (runs / "frozen_memory_cache" / "ropes").is_dir()  # its IMSM run has not finished: kept

    # the failed task rerun, then the evaluation: the run is evaluated now, the cache removed
    env = {**env, "FAIL": "", "NNODES": "2", "GPUS": "8"}
    for step in (["--train_index", "1"], ["--evaluate"]):
        done = _reproduce([*plan_args, *step], env)
        assert done.returncode == 0, done.stderr[-3000:]
    evaluate = [line for line in log.read_text().splitlines() if line.startswith("evaluate")][-1]
    assert "--labels untuned,LoRA,IMSM-LoRA,IA3 " in evaluate and "--overwrite" in evaluate
    report = (tmp_path / "eval" / "table2.md").read_text()
    assert "not trained" not in _row(report, "IMSM-LoRA") and "50.00" in _row(report, "IMSM-LoRA")
    assert not (runs / "frozen_memory_cache" / "ropes").exists()


def test_a_failed_run_does_not_stop_a_sequential_plan(tmp_path, cluster):
    bin_dir, log, env = cluster
    done = _reproduce([*_plan_args(tmp_path, bin_dir), "--gpus", "1", "--keep_frozen_cache"],
                      {**env, "FAIL": "imsm_lora_ropes"})
    assert done.returncode == 1
    assert "1 of 3 runs did not finish" in done.stderr and "imsm_lora_ropes/seed42" in done.stderr
    launches = [line.split("output_dir=")[1].split()[0] for line in log.read_text().splitlines()
                if line.startswith("deepspeed")]
    assert [Path(p).parent.name for p in launches] == ["lora_ropes", "imsm_lora_ropes", "ia3_ropes"]
    report = (tmp_path / "eval" / "table2.md").read_text()
    assert "not trained" in _row(report, "IMSM-LoRA") and "50.00" in _row(report, "IA3")
    assert (tmp_path / "runs" / "THUDM--chatglm3-6b" / "frozen_memory_cache").is_dir()  # --keep_frozen_cache


def test_a_run_locked_by_another_process_is_waited_for_then_skipped(tmp_path, cluster):
    """A second plan reaching a run another process is training waits for the lock, then finds it finished and
    does not train it again."""
    _, log, env = cluster
    plan = build_plan("table2", PlanOptions(runs_dir=tmp_path / "runs", methods=("LoRA",)))
    (run,) = plan.runs
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from imsm.paper.execute import run_lock; from imsm.paper.plans import build_plan, "
            "PlanOptions; from pathlib import Path\n"
            f"run = build_plan('table2', PlanOptions(runs_dir=Path({str(tmp_path / 'runs')!r}), "
            "methods=('LoRA',))).runs[0]\n"
            "with run_lock(run):\n"
            "    print('locked', flush=True); sys.stdin.readline()\n"
            "    (run.output_dir / 'final').mkdir(parents=True)\n"
            "    (run.output_dir / 'final' / 'COMPLETE').write_text('{}')\n")],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.environ["PATH"], saved = env["PATH"], os.environ["PATH"]
    try:
        worker = threading.Thread(target=train, args=(run, tmp_path / "data", []), kwargs={"gpus": 1})
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting for the lock
        holder.stdin.write("go\n")
        holder.stdin.flush()
        worker.join(timeout=60)
    finally:
        os.environ["PATH"] = saved
    assert holder.wait(timeout=60) == 0 and not worker.is_alive()
    assert not log.exists()  # never launched: finished by the lock's holder


def test_a_global_batch_that_cannot_span_the_nodes(tmp_path, monkeypatch):
    plan = build_plan("table1", PlanOptions(runs_dir=tmp_path, methods=("LoRA", "IA3")))
    lora, ia3 = plan.runs[0], plan.runs[1]
    monkeypatch.setenv("PER_DEVICE_BATCH", "1")
    assert (nodes_for(lora, 2, 8), nodes_for(ia3, 2, 8)) == (2, 1)  # 16 over 2 x 8 x 1; 8 only over 1 x 8 x 1
    monkeypatch.delenv("PER_DEVICE_BATCH")
    assert nodes_for(lora, 2, 8) == 1  # the launcher's per-device batch 2: 2 x 8 x 2 = 32 > 16
    assert check_resources(plan, 2, 4) == {2: list(range(len(plan.runs)))}  # 2 x 4 x 2 = 16; (IA)3 2 x 4 x 1 = 8
    with pytest.raises(ValueError, match=r"global batch 8 cannot be split over even one node of GPUS=16"):
        nodes_for(ia3, 1, 16)
    with pytest.raises(ValueError, match="lora_mrpc.sh.*global batch 16 cannot be split"):
        write_slurm(plan, tmp_path / "slurm", ["table1"], "python", SlurmResources(nodes=1, gpus=16))
    assert not (tmp_path / "slurm").exists()  # nothing written


def test_backbones_filter_keeps_their_runs_and_evaluations():
    plan = keep_backbones(build_plan("all"), ("Qwen1.5-4B",))
    assert {run.backbone.name for run in plan.runs} == {"Qwen1.5-4B"} and len(plan.runs) == 24 + 2
    assert {ev.backbone.name for ev in plan.evaluations} == {"Qwen1.5-4B"} and len(plan.evaluations) == 4 + 1
    with pytest.raises(ValueError, match="not among the paper's backbones"):
        keep_backbones(plan, ("Qwen2-7B",))
    with pytest.raises(ValueError, match="leaves no run"):
        keep_backbones(build_plan("table2"), ("Qwen1.5-4B",))


def test_all_dry_run_lists_108_runs_and_the_nodes_each_gets(tmp_path, cluster):
    _, _, env = cluster
    done = _reproduce(["all", "--dry_run", "--seeds", "42", "--nodes", "2", "--data_dir", str(tmp_path / "data"),
                       "--runs_dir", str(tmp_path / "runs")], {**env, "PER_DEVICE_BATCH": "1"})
    assert done.returncode == 0, done.stderr
    runs = [line for line in done.stdout.splitlines() if line.startswith("  [")]
    assert len(runs) == 108
    one_node = [line for line in runs if " NNODES=1 " in line]
    assert one_node and all("ia3_" in line for line in one_node)
    assert len(one_node) == sum("ia3_" in line for line in runs)


def test_imsm_runs_of_a_backbone_and_task_share_one_cache_that_train_py_accepts(tmp_path):
    """Every IMSM run of Table 4 (the ablation's token and equal gates included) gets the one cache of its backbone
    and task after the launcher's own --frozen_memory_cache on, and train.py's parser takes it; vanilla runs get
    none; the user's --frozen_memory_cache off still wins."""
    from imsm.args import parse_train_args
    from imsm.paper.execute import run_arguments

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CAPTURE"\n')
    (bin_dir / "deepspeed").chmod(0o755)
    caches = {}
    for run in build_plan("table4", PlanOptions(runs_dir=tmp_path / "runs")).runs:
        env = {**os.environ, **run.environment("DATA"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "CAPTURE": str(tmp_path / "args"), "GPUS": "8"}
        subprocess.run(run.command(run_arguments(run)), cwd=ROOT, env=env, check=True, capture_output=True)
        args = (tmp_path / "args").read_text().splitlines()
        _, _, imsm, _ = parse_train_args([*args[args.index("train.py") + 1:], "--bf16", "false"])
        if run.label.startswith("IMSM-"):
            caches.setdefault(run.task, set()).add(imsm.frozen_memory_cache)
        else:
            assert "--frozen_memory_cache" not in run_arguments(run)
    assert caches == {task: {str(tmp_path / "runs" / "THUDM--chatglm3-6b" / "frozen_memory_cache" / task)}
                      for task in ("mrpc", "cola", "ropes")}
    run = next(r for r in build_plan("table4").runs if r.label == "IMSM-LoRA")
    assert run_arguments(run, ["--frozen_memory_cache", "off"])[-2:] == ["--frozen_memory_cache", "off"]
