"""Running a plan where the GPUs are: in sequence on this node, or as SLURM job arrays.

In sequence, a run whose ``final/`` is complete is skipped and any other is started with
``--resume_from_checkpoint latest`` (train.py starts fresh when its folder holds no complete checkpoint), so a plan
stopped anywhere continues where it stopped. A run that fails is logged and the plan goes on; the failures are
listed at the end, each evaluation scores the runs that finished, and the report marks the failed runs' cells.

Two processes never train one run folder at once: ``train`` holds an exclusive lock (``flock``) on a file beside the
folder, so two plans that share a run (Table 1's and Table 4's) take turns, and the second finds it finished.

The SLURM route writes one job array per node count (task i runs exactly the sequential step for one run), and an
evaluation job submitted with ``--dependency=afterany`` on every array: it starts even when a task failed, scores
what finished and reports what did not. Each job asks for CPUs and memory and hands them to ``srun``
(``SRUN_CPUS_PER_TASK``: since Slurm 22.05 ``srun`` does not inherit ``--cpus-per-task``). Several nodes: the array
task writes a DeepSpeed hostfile (``host slots=GPUS``) from ``scontrol show hostnames $SLURM_JOB_NODELIST`` and
exports ``NNODES`` and ``HOSTFILE``; the launcher's ``deepspeed`` then starts the other nodes over ssh (pdsh), as
DeepSpeed's multi-node launch does.

A launcher's global batch must split evenly over NNODES x GPUS x PER_DEVICE_BATCH. A run whose global batch cannot
span the nodes asked for ((IA)3's 8 on 2 nodes x 8 GPUs) runs on the most nodes that divide it (one, for (IA)3) with
the same global batch, in its own array; a run no node count can hold stops the plan before anything is submitted.

IMSM runs of one backbone and task share one frozen-memory cache, ``RUNS_DIR/<model>/frozen_memory_cache/<task>``
(their frozen memory is the same: same backbone, data file, template and lengths; the cache's fingerprint checks
it), so a plan pays the frozen pass once per (backbone, task). ``remove_shared_caches`` deletes them at the plan's
end, once every IMSM run using them has finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from imsm import run_folder
from imsm.evaluation.output_dir import INCOMPLETE
from imsm.locks import held
from imsm.paper.plans import PAPER_BACKBONES, Bench, Evaluation, Plan, TrainRun

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SHARED_CACHE_DIR = "frozen_memory_cache"


class RunFailed(RuntimeError):
    """A training run exited with an error; the plan continues without it."""


# ---- a run's state, lock and resources ----------------------------------------------------------------------------


def run_state(run: TrainRun) -> str:
    """``done`` (final/ complete), ``partial`` (a folder an interrupted run left) or ``new``."""
    out = run.output_dir
    if out.is_dir():
        run_folder.recover_final(out)  # a crash between final/'s two renames leaves the new one beside it
    if run_folder.is_complete(out / "final"):
        return "done"
    return "partial" if out.is_dir() and any(out.iterdir()) else "new"


def lock_path(run: TrainRun) -> Path:
    """Beside the run folder, not in it (train.py refuses a folder holding files that are not a run's)."""
    return run.output_dir.with_name(f".{run.output_dir.name}.lock")


@contextlib.contextmanager
def run_lock(run: TrainRun) -> Iterator[None]:
    """Hold the run's lock; wait (saying who holds it) while another process trains the same folder."""
    with held(lock_path(run), f"{run.output_dir} (being trained)"):
        yield


@dataclass(frozen=True)
class LauncherBatch:
    global_batch: int
    per_device: int


def launcher_batch(run: TrainRun) -> LauncherBatch:
    """The launcher's global batch and per-device batch (``PER_DEVICE_BATCH`` from the environment wins, as in the
    launcher)."""
    text = (ROOT / run.launcher).read_text()
    global_batch = re.search(r"^GLOBAL_BATCH=(\d+)$", text, re.MULTILINE)
    per_device = re.search(r"^PER_DEVICE_BATCH=\$\{PER_DEVICE_BATCH:-(\d+)\}$", text, re.MULTILINE)
    if not global_batch or not per_device:
        raise ValueError(f"{run.launcher}: no GLOBAL_BATCH=N or PER_DEVICE_BATCH=${{PER_DEVICE_BATCH:-N}} line")
    return LauncherBatch(int(global_batch.group(1)), int(os.environ.get("PER_DEVICE_BATCH") or per_device.group(1)))


def nodes_for(run: TrainRun, nodes: int, gpus: int) -> int:
    """The most nodes, up to ``nodes``, over which the run's global batch splits evenly (GPUS per node)."""
    batch = launcher_batch(run)
    for n in range(nodes, 0, -1):
        if batch.global_batch % (n * gpus * batch.per_device) == 0:
            return n
    raise ValueError(f"{run.output_dir} ({run.launcher}): its global batch {batch.global_batch} cannot be split "
                     f"over even one node of GPUS={gpus} x PER_DEVICE_BATCH={batch.per_device}; lower --gpus or "
                     "PER_DEVICE_BATCH, or leave the run out (--methods)")


def check_resources(plan: Plan, nodes: int, gpus: int) -> dict[int, list[int]]:
    """Node count -> the plan's run indices that train on that many nodes; raises before anything runs when a run
    fits no node count."""
    groups: dict[int, list[int]] = {}
    for i, run in enumerate(plan.runs):
        groups.setdefault(nodes_for(run, nodes, gpus), []).append(i)
    return dict(sorted(groups.items(), reverse=True))


# ---- the shared frozen-memory cache -------------------------------------------------------------------------------


def shared_cache_dir(run: TrainRun) -> Path | None:
    """RUNS_DIR/<model>/frozen_memory_cache/<task> for an IMSM run (a mixing gate), None for vanilla PEFT."""
    if not run.label.startswith("IMSM-"):
        return None
    return run.output_dir.parent.parent / SHARED_CACHE_DIR / run.task


def run_arguments(run: TrainRun, train_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The arguments after the launcher's: the shared cache for an IMSM run, then the user's (which win)."""
    cache = shared_cache_dir(run)
    return (["--frozen_memory_cache", str(cache)] if cache else []) + list(train_args)


def remove_shared_caches(plan: Plan) -> list[Path]:
    """Delete each shared cache whose IMSM runs in this plan have all finished; the ones removed."""
    users: dict[Path, list[TrainRun]] = {}
    for run in plan.runs:
        if (cache := shared_cache_dir(run)) is not None:
            users.setdefault(cache, []).append(run)
    removed = []
    for cache, runs in users.items():
        if cache.exists() and all(run_state(run) == "done" for run in runs):
            shutil.rmtree(cache)
            logger.info("removed the shared frozen-memory cache %s (its %d IMSM runs have finished)", cache,
                        len(runs))
            removed.append(cache)
    return removed


# ---- training and evaluation ----------------------------------------------------------------------------------------


def train(run: TrainRun, data_dir: str | Path, train_args: list[str], nodes: int = 1, gpus: int = 8) -> None:
    """Train one run through its launcher, resuming it when it was interrupted; a finished run is left alone. The
    run's lock is held throughout; a failure raises ``RunFailed``."""
    run_nodes = nodes_for(run, nodes, gpus)
    with run_lock(run):
        state = run_state(run)
        if state == "done":
            logger.info("%s: finished (final/ complete), skipped", run.output_dir)
            return
        args = run_arguments(run, train_args)
        if state == "partial":
            args += ["--resume_from_checkpoint", "latest"]
            logger.info("%s: interrupted earlier, resuming from its newest complete checkpoint", run.output_dir)
        if run_nodes < nodes:
            logger.info("%s: global batch %d does not split over %d nodes x %d GPUs; training on %d node(s)",
                        run.output_dir, launcher_batch(run).global_batch, nodes, gpus, run_nodes)
        cmd = run.command(args)
        env = {**run.environment(data_dir), "NNODES": str(run_nodes), "GPUS": str(gpus)}
        logger.info("training %s: %s", run.output_dir, " ".join(f"{k}={v}" for k, v in env.items())
                    + " " + shlex.join(cmd))
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        raise RunFailed(f"training {run.output_dir} failed (exit {done.returncode}): {shlex.join(cmd)}; rerun the "
                        "same command to resume it")


def train_all(plan: Plan, data_dir: str | Path, train_args: list[str], nodes: int, gpus: int) -> list[TrainRun]:
    """Every run in order; a failed run is logged and skipped. Returns the failed runs."""
    failed = []
    for i, run in enumerate(plan.runs):
        logger.info("run %d/%d: %s", i + 1, len(plan.runs), run.output_dir)
        try:
            train(run, data_dir, train_args, nodes, gpus)
        except RunFailed as err:
            logger.error("%s; going on with the rest of the plan", err)
            failed.append(run)
    return failed


def _stats_labels(evaluation: Evaluation) -> set[str] | None:
    path = evaluation.output_dir / "stats.json"
    try:
        return set(json.loads(path.read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluation_state(evaluation: Evaluation) -> str:
    """``done`` (stats.json holds every finished run's label), ``partial`` (interrupted, or a run that had failed
    has finished since: evaluated again) or ``new``."""
    out = evaluation.output_dir
    if (out / INCOMPLETE).exists():
        return "partial"
    labels = _stats_labels(evaluation)
    if labels is None:
        return "new"
    finished = {run.label for run in evaluation.runs if run_state(run) == "done"}
    return "done" if finished <= labels else "partial"


def evaluate(evaluation: Evaluation, data_dir: str | Path, eval_args: list[str], launcher: tuple[str, ...]) -> None:
    """One evaluate.py call over the evaluation's finished runs (a run that failed is left out, and named)."""
    state = evaluation_state(evaluation)
    if state == "done":
        logger.info("%s: evaluated already, skipped", evaluation.output_dir)
        return
    unfinished = [run for run in evaluation.runs if run_state(run) != "done"]
    if unfinished:
        logger.warning("evaluation %s: leaving out runs that did not finish: %s", evaluation.name,
                       [str(run.output_dir) for run in unfinished])
        evaluation = replace(evaluation, runs=tuple(run for run in evaluation.runs if run not in unfinished))
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


def keep_backbones(plan: Plan, names: tuple[str, ...]) -> Plan:
    """The plan with only the runs and evaluations of these backbones (the paper's names)."""
    unknown = sorted(set(names) - set(PAPER_BACKBONES))
    if unknown:
        raise ValueError(f"--backbones {','.join(unknown)}: not among the paper's backbones {sorted(PAPER_BACKBONES)}")
    runs = [run for run in plan.runs if run.backbone.name in names]
    if not runs and not any(bench.backbone.name in names for bench in plan.benches):
        raise ValueError(f"--backbones {','.join(names)} leaves no run in {plan.name}; its backbones: "
                         f"{sorted({run.backbone.name for run in plan.runs})}")
    return replace(plan, runs=runs, evaluations=[ev for ev in plan.evaluations if ev.backbone.name in names],
                   benches=[bench for bench in plan.benches if bench.backbone.name in names])


# ---- SLURM ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmResources:
    """What each job asks for: nodes (the most; a run whose global batch cannot span them gets fewer), GPUs per
    node, CPUs per task (one task per node: the DeepSpeed launcher and its GPU workers) and memory per node."""

    nodes: int = 1
    gpus: int = 8
    cpus_per_task: int = 64
    mem: str = "0"  # Slurm's "all the memory of each node"
    options: tuple[str, ...] = ()  # further #SBATCH lines, e.g. --partition=gpu


_HOSTFILE = """\
unset HOSTFILE  # one exported in the submitting shell must not reach a job on other nodes
if (( NNODES > 1 )); then
    # DeepSpeed's hostfile from the allocation: one "host slots=GPUS" line per node, the first node leading
    export HOSTFILE={logs}/hostfile-"$SLURM_JOB_ID"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots=$GPUS/" > "$HOSTFILE"
fi"""


def _header(res: SlurmResources, nodes: int) -> list[str]:
    return ["#!/bin/bash", f"#SBATCH --nodes={nodes}", f"#SBATCH --gpus-per-node={res.gpus}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={res.cpus_per_task}", f"#SBATCH --mem={res.mem}",
            *(f"#SBATCH {opt}" for opt in res.options)]


def _environment(res: SlurmResources) -> list[str]:
    per_device = os.environ.get("PER_DEVICE_BATCH")  # the runs were grouped by nodes with it: the jobs keep it
    return ["set -euo pipefail", f"cd {shlex.quote(str(ROOT))}",
            'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun no longer inherits --cpus-per-task',
            f'export GPUS={res.gpus} NNODES="$SLURM_JOB_NUM_NODES"',
            *([f"export PER_DEVICE_BATCH={shlex.quote(per_device)}"] if per_device else [])]


def write_slurm(plan: Plan, folder: Path, reproduce_args: list[str], python: str,
                resources: SlurmResources) -> dict[str, Path]:
    """Write one job array per node count (``train.sbatch`` for the nodes asked for, ``train-<n>node.sbatch`` for
    runs on fewer), ``evaluate.sbatch`` and ``submit.sh`` (submits them all, the evaluation after every array task
    has ended, failed or not). ``reproduce_args`` recreate this plan (same plan name, models, seeds, folders) inside
    each job. Raises before writing when a run fits no node count."""
    groups = check_resources(plan, resources.nodes, resources.gpus)
    folder.mkdir(parents=True, exist_ok=True)
    logs = folder.resolve() / "logs"
    logs.mkdir(exist_ok=True)
    again = shlex.join([python, "reproduce.py", *reproduce_args])
    paths: dict[str, Path] = {}
    for nodes, indices in groups.items():
        key = "train" if nodes == resources.nodes else f"train-{nodes}node"
        listing = [f"#   {k} -> run {i}: {plan.runs[i].output_dir} ({plan.runs[i].label}, {plan.runs[i].task}, "
                   f"seed {plan.runs[i].seed}, {plan.runs[i].backbone.model_id})" for k, i in enumerate(indices)]
        paths[key] = folder / f"{key}.sbatch"
        paths[key].write_text("\n".join([
            *_header(resources, nodes), f"#SBATCH --job-name=imsm-{plan.name}-{key}",
            f"#SBATCH --array=0-{len(indices) - 1}", "#SBATCH --requeue", f"#SBATCH --output={logs}/{key}-%A_%a.out",
            f"# One array task per training run on {nodes} node(s); a finished run is skipped and an interrupted (or",
            "# requeued) one resumes from its newest complete checkpoint. Array index -> the plan's run:", *listing,
            *_environment(resources), _HOSTFILE.format(logs=shlex.quote(str(logs))),
            f"RUNS=({' '.join(map(str, indices))})",
            f'srun --nodes=1 --ntasks=1 {again} --train_index "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"', ""]))
    paths["evaluate"] = folder / "evaluate.sbatch"
    paths["evaluate"].write_text("\n".join([
        *_header(resources, 1), f"#SBATCH --job-name=imsm-{plan.name}-evaluate",
        f"#SBATCH --output={logs}/evaluate-%j.out",
        "# Every evaluation of the plan over the runs that finished (each skipped when done), then the report; it",
        "# names the runs that failed, marks their cells, and exits non-zero when there are any.",
        *_environment(resources), f"srun --nodes=1 --ntasks=1 {again} --evaluate", ""]))
    arrays = [key for key in paths if key != "evaluate"]
    submit = [
        "#!/bin/bash", f"# Submit {plan.name}: {len(plan.runs)} training runs as {len(arrays)} job array(s), then",
        "# the evaluation once every array task has ended (afterany: a failed run does not hold it back).",
        "set -euo pipefail", 'cd "$(dirname "$0")"', "ids=()"]
    for key in arrays:
        submit += [f"id=$(sbatch --parsable {key}.sbatch)", 'ids+=("${id%%;*}")  # --parsable: "jobid[;cluster]"']
    submit += ['after=$(IFS=:; echo "${ids[*]}")',
               'evaluate=$(sbatch --parsable --dependency=afterany:"$after" evaluate.sbatch)',
               'echo "training arrays ${ids[*]}, evaluation ${evaluate%%;*} (after every array task has ended)"', ""]
    paths["submit"] = folder / "submit.sh"
    paths["submit"].write_text("\n".join(submit))
    for path in paths.values():
        path.chmod(0o755)
    return paths
