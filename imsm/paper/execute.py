"""Running a plan where the GPUs are: in sequence on this node, or as a SLURM job array.

In sequence, a run whose ``final/`` is complete is skipped and any other is started with
``--resume_from_checkpoint latest`` (train.py starts fresh when its folder holds no complete checkpoint), so a plan
stopped anywhere continues where it stopped. The SLURM route writes an ``sbatch`` script whose array task i runs
exactly that for the plan's run i, and an evaluation script submitted with ``--dependency=afterok`` on the array.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from imsm import run_folder
from imsm.evaluation.output_dir import INCOMPLETE
from imsm.paper.plans import Bench, Evaluation, Plan, TrainRun

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def run_state(run: TrainRun) -> str:
    """``done`` (final/ complete), ``partial`` (a folder an interrupted run left) or ``new``."""
    out = run.output_dir
    if out.is_dir():
        run_folder.recover_final(out)  # a crash between final/'s two renames leaves the new one beside it
    if run_folder.is_complete(out / "final"):
        return "done"
    return "partial" if out.is_dir() and any(out.iterdir()) else "new"


def evaluation_state(evaluation: Evaluation) -> str:
    out = evaluation.output_dir
    if (out / INCOMPLETE).exists():
        return "partial"
    return "done" if (out / "stats.json").is_file() else "new"


def train(run: TrainRun, data_dir: str | Path, train_args: list[str]) -> None:
    """Train one run through its launcher, resuming it when it was interrupted; a finished run is left alone."""
    state = run_state(run)
    if state == "done":
        logger.info("%s: finished (final/ complete), skipped", run.output_dir)
        return
    args = [*train_args, "--resume_from_checkpoint", "latest"] if state == "partial" else list(train_args)
    if state == "partial":
        logger.info("%s: interrupted earlier, resuming from its newest complete checkpoint", run.output_dir)
    cmd = run.command(args)
    logger.info("training %s: %s", run.output_dir, " ".join(f"{k}={v}" for k, v in run.environment(data_dir).items())
                + " " + shlex.join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **run.environment(data_dir)}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training {run.output_dir} failed (exit {done.returncode}): {shlex.join(cmd)}; rerun "
                           "the same command to resume it")


def evaluate(evaluation: Evaluation, data_dir: str | Path, eval_args: list[str], launcher: tuple[str, ...]) -> None:
    state = evaluation_state(evaluation)
    if state == "done":
        logger.info("%s: evaluated already, skipped", evaluation.output_dir)
        return
    missing = [str(run.output_dir) for run in evaluation.runs if run_state(run) != "done"]
    if missing:
        raise RuntimeError(f"evaluation {evaluation.name} needs runs that are not finished: {missing}")
    extra = [*eval_args, "--overwrite"] if state == "partial" else list(eval_args)  # an interrupted evaluation
    cmd = evaluation.command(data_dir, extra, launcher)
    logger.info("evaluating %s: %s", evaluation.name, shlex.join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"evaluation {evaluation.name} failed (exit {done.returncode}): {shlex.join(cmd)}")


def bench_state(bench: Bench) -> str:
    return "done" if bench.output_file.is_file() else "new"


def run_bench(bench: Bench, data_dir: str | Path, python: str) -> None:
    """Table 5's speed measurement on one backbone (one process, one GPU); a measured one is skipped."""
    if bench_state(bench) == "done":
        logger.info("%s: measured already, skipped", bench.output_file)
        return
    bench.output_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = bench.command(data_dir, python)
    logger.info("benchmarking %s: %s", bench.name, shlex.join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench {bench.name} failed (exit {done.returncode}): {shlex.join(cmd)}")


def eval_launcher(gpus: int, python: str = sys.executable) -> tuple[str, ...]:
    """evaluate.py on one process, or one per GPU under torchrun (each decodes a shard)."""
    if gpus <= 1:
        return (python,)
    return (python, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus))


def write_slurm(plan: Plan, folder: Path, reproduce_args: list[str], python: str, gpus: int,
                sbatch_options: list[str]) -> dict[str, Path]:
    """Write ``train.sbatch`` (a job array, one task per training run), ``evaluate.sbatch`` and ``submit.sh``
    (submits both, the evaluation after every array task succeeded). ``reproduce_args`` recreate this plan (same
    plan name, models, seeds, folders) inside each job."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    again = shlex.join([python, "reproduce.py", *reproduce_args])
    header = ["#!/bin/bash", "#SBATCH --nodes=1", f"#SBATCH --gpus-per-node={gpus}", "#SBATCH --ntasks-per-node=1",
              *(f"#SBATCH {opt}" for opt in sbatch_options)]
    listing = [f"#   {i}: {run.output_dir} ({run.label}, {run.task}, seed {run.seed}, {run.backbone.model_id})"
               for i, run in enumerate(plan.runs)]
    train_script = "\n".join([
        *header, f"#SBATCH --job-name=imsm-{plan.name}-train", f"#SBATCH --array=0-{len(plan.runs) - 1}",
        "#SBATCH --requeue", f"#SBATCH --output={folder.resolve()}/logs/train-%A_%a.out",
        "# One array task per training run of the plan; a finished run is skipped and an interrupted (or requeued)",
        "# one resumes from its newest complete checkpoint. Runs by index:", *listing,
        "set -euo pipefail", f"cd {shlex.quote(str(ROOT))}",
        f"export GPUS={gpus}",
        f'srun --ntasks=1 {again} --train_index "$SLURM_ARRAY_TASK_ID"', ""])
    eval_script = "\n".join([
        *header, f"#SBATCH --job-name=imsm-{plan.name}-evaluate",
        f"#SBATCH --output={folder.resolve()}/logs/evaluate-%j.out",
        "# Every evaluation of the plan (each skipped when done), then the report beside the paper's numbers.",
        "set -euo pipefail", f"cd {shlex.quote(str(ROOT))}", f"export GPUS={gpus}",
        f"srun --ntasks=1 {again} --evaluate", ""])
    submit = "\n".join([
        "#!/bin/bash", f"# Submit {plan.name}: {len(plan.runs)} training runs as one job array, then the evaluation.",
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        "train=$(sbatch --parsable train.sbatch)",
        'train=${train%%;*}  # --parsable prints "jobid[;cluster]"',
        'evaluate=$(sbatch --parsable --dependency=afterok:"$train" evaluate.sbatch)',
        'echo "training array $train, evaluation ${evaluate%%;*} (after the array succeeds)"', ""])
    paths = {"train": folder / "train.sbatch", "evaluate": folder / "evaluate.sbatch", "submit": folder / "submit.sh"}
    for key, text in (("train", train_script), ("evaluate", eval_script), ("submit", submit)):
        paths[key].write_text(text)
        paths[key].chmod(0o755)
    return paths
