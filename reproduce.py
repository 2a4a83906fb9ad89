"""Reproduce one experiment of the IMSM paper with one command: train its runs through run_scripts/, evaluate them,
and write the paper's table with our numbers beside the paper's.

    python reproduce.py table2 --dry_run          # the plan, its GPU-hours (when measured) and disk
    python reproduce.py table2                    # in sequence here: finished runs skipped, interrupted resumed
    python reproduce.py table2 --slurm slurm/table2 --sbatch_option=--partition=gpu && bash slurm/table2/submit.sh

Plans: table1, table2, table3, table4 (with the ablation's forgetting, Figure 4), table5 (inference speed), table6,
figure3, all. The paper's backbones are the defaults; ``--model ID`` points every backbone of the plan at ID,
``--model ChatGLM3-6B=ID`` one. ``--seeds 42,43,44`` (the default) trains each run once per seed: the report's rows are
means over seeds with a spread, as a comparison with the paper's numbers needs; ``--seeds 42`` for one run each.
``GPUS``, ``NNODES``, ``PER_DEVICE_BATCH``, ``DS_CONFIG``, ``HOSTFILE`` reach the launchers from the environment. The
report is ``EVAL_DIR/<plan>.md``. A run that fails does not stop the plan: the rest go on, the report marks its cells,
and the command ends listing it (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from imsm.paper.compare import write_report
from imsm.paper.cost import describe, estimate
from imsm.paper.execute import (
    SlurmResources,
    bench_state,
    check_resources,
    eval_launcher,
    evaluate,
    evaluation_state,
    keep_backbones,
    remove_shared_caches,
    run_arguments,
    run_bench,
    run_state,
    train,
    train_all,
    write_slurm,
)
from imsm.paper.plans import DEFAULT_SEEDS, PLAN_NAMES, PlanOptions, build_plan, parse_model_overrides

logger = logging.getLogger("reproduce")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=[*PLAN_NAMES, "all"])
    p.add_argument("--dry_run", action="store_true", help="Print the plan, its cost and its commands; run nothing.")
    p.add_argument("--slurm", metavar="DIR", help="Write train.sbatch (job array), evaluate.sbatch and submit.sh.")
    p.add_argument("--sbatch_option", action="append", default=[], metavar="OPT",
                   help="An #SBATCH line for both scripts, e.g. --sbatch_option=--partition=gpu (repeatable).")
    p.add_argument("--train_index", type=int, help="Train only the plan's run with this index (a SLURM array task).")
    p.add_argument("--evaluate", action="store_true", help="Only the evaluations and the report.")
    p.add_argument("--report", action="store_true", help="Only the report, from the evaluations written so far.")
    p.add_argument("--model", action="append", default=[], metavar="ID|NAME=ID",
                   help="Backbone override: ID for every backbone of the plan, NAME=ID for one (repeatable).")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="Comma-separated training seeds (default: three, for a mean and spread over runs).")
    p.add_argument("--methods", default="", help="Only these labels, e.g. LoRA,IMSM-LoRA (default: all).")
    p.add_argument("--data_dir", default="data", help="Task files DATA_DIR/<task>/{train,test}.jsonl.")
    p.add_argument("--runs_dir", default="runs/paper", help="Training runs go to RUNS_DIR/<model>/<launcher>/seedN.")
    p.add_argument("--eval_dir", default="eval/paper", help="Evaluations and the reports go here.")
    p.add_argument("--backbones", default="", help="Only these backbones, e.g. Qwen1.5-4B,Llama3-8B (default: all).")
    p.add_argument("--gpus", type=int, default=int(os.environ.get("GPUS", "8")),
                   help="GPUs per node (the launchers' GPUS; evaluation runs one process per GPU).")
    p.add_argument("--nodes", type=int, default=int(os.environ.get("NNODES", "1")),
                   help="Nodes per training run (the launchers' NNODES; a run whose global batch cannot span them "
                   "trains on fewer). SLURM jobs set it from their allocation.")
    p.add_argument("--cpus_per_task", type=int, default=64, help="SLURM: CPUs per node for each job.")
    p.add_argument("--mem", default="0", help="SLURM: memory per node for each job (0: all of the node's).")
    p.add_argument("--keep_frozen_cache", action="store_true",
                   help="Keep the shared frozen-memory caches (RUNS_DIR/<model>/frozen_memory_cache) at the end.")
    p.add_argument("--peak_tflops", type=float, default=312.0,
                   help="Cost model: a GPU's peak bf16 TFLOP/s (312: A100/A800; 989: H100/H800).")
    p.add_argument("--utilisation", type=float, default=0.3,
                   help="Cost model: the share of the peak a run is assumed to reach (until a finished run measures "
                   "it).")
    p.add_argument("--train_args", default="", help="Arguments appended to every training run (one string).")
    p.add_argument("--eval_args", default="", help="Arguments appended to every evaluate.py call (one string).")
    p.add_argument("--python", default=sys.executable, help="Interpreter for evaluate.py and the SLURM jobs.")
    args = p.parse_args(argv)
    try:
        args.seed_list = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds {args.seeds!r}: a seed given twice would evaluate one run as two seeds; give each once")
    for name in ("gpus", "nodes", "cpus_per_task"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    if not 0 < args.utilisation <= 1 or args.peak_tflops <= 0:
        p.error("--utilisation must lie in (0, 1] and --peak_tflops be positive")
    if sum(bool(x) for x in (args.dry_run, args.slurm, args.train_index is not None, args.evaluate, args.report)) > 1:
        p.error("choose at most one of --dry_run, --slurm, --train_index, --evaluate, --report")
    return args


def _same_plan_args(args: argparse.Namespace) -> list[str]:
    """The arguments that rebuild this plan in another process (a SLURM job), with absolute folders."""
    out = [args.plan, "--seeds", args.seeds, "--data_dir", str(Path(args.data_dir).resolve()),
           "--runs_dir", str(Path(args.runs_dir).resolve()), "--eval_dir", str(Path(args.eval_dir).resolve()),
           "--python", args.python]
    out += [a for m in args.model for a in ("--model", m)]
    if args.keep_frozen_cache:
        out.append("--keep_frozen_cache")
    for name in ("methods", "backbones", "train_args", "eval_args"):
        if getattr(args, name):
            out += [f"--{name}", getattr(args, name)]
    return out


def dry_run(plan, args: argparse.Namespace) -> None:
    train_args = shlex.split(args.train_args)
    print(f"{plan.title}\n")
    print(f"Training runs ({len(plan.runs)}: {len(plan.runs) // len(plan.seeds)} per seed x {len(plan.seeds)} "
          f"seed(s); NNODES={args.nodes} x GPUS={args.gpus}, the launchers' global batch):")
    try:
        nodes = {i: n for n, indices in check_resources(plan, args.nodes, args.gpus).items() for i in indices}
    except ValueError as err:
        print(f"  cannot run as asked: {err}")
        nodes = dict.fromkeys(range(len(plan.runs)), args.nodes)
    for i, run in enumerate(plan.runs):
        fewer = f"NNODES={nodes[i]} " if nodes[i] != args.nodes else ""
        print(f"  [{i}] {run_state(run):7s} {fewer}{run.shell(args.data_dir, run_arguments(run, train_args))}")
    print(f"\nEvaluations ({len(plan.evaluations)}):")
    launcher = eval_launcher(args.gpus, "python")
    for ev in plan.evaluations:
        cmd = ev.command(args.data_dir, shlex.split(args.eval_args), launcher)
        print(f"  {evaluation_state(ev):7s} {shlex.join(cmd)}")
    if plan.benches:
        print(f"\nSpeed benches ({len(plan.benches)}, one GPU each):")
        for bench in plan.benches:
            print(f"  {bench_state(bench):7s} {shlex.join(bench.command(args.data_dir, 'python'))}")
    print("\nCost:")
    est = estimate(plan, Path(args.data_dir), Path(args.runs_dir), train_args, args.peak_tflops, args.utilisation)
    for line in describe(est, len(plan.runs)):
        print(f"  {line}")
    print(f"\nReport: {Path(args.eval_dir) / plan.name}.md (the paper's table, paper / ours [95% interval] / "
          "difference per cell)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    options = PlanOptions(runs_dir=Path(args.runs_dir), eval_dir=Path(args.eval_dir), seeds=args.seed_list,
                          models=parse_model_overrides(args.model),
                          methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    plan = build_plan(args.plan, options)
    if args.backbones:
        plan = keep_backbones(plan, tuple(b.strip() for b in args.backbones.split(",") if b.strip()))
    os.environ["GPUS"] = str(args.gpus)  # what the launchers read
    train_args, eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
    if args.dry_run:
        dry_run(plan, args)
        return
    if args.slurm:
        if not plan.runs:
            raise SystemExit(f"{args.plan} trains nothing (it only measures speed): run `python reproduce.py "
                             f"{args.plan}` on a GPU node instead of --slurm")
        resources = SlurmResources(args.nodes, args.gpus, args.cpus_per_task, args.mem, tuple(args.sbatch_option))
        try:
            paths = write_slurm(plan, Path(args.slurm), _same_plan_args(args), args.python, resources)
        except ValueError as err:
            raise SystemExit(f"nothing written: {err}") from None
        arrays = [str(path) for key, path in paths.items() if key.startswith("train")]
        print(f"Wrote {', '.join(arrays)} ({len(plan.runs)} array tasks), {paths['evaluate']}; submit with: "
              f"bash {paths['submit']}")
        return
    if args.train_index is not None:
        if not 0 <= args.train_index < len(plan.runs):
            raise SystemExit(f"--train_index {args.train_index}: the plan has runs 0..{len(plan.runs) - 1}")
        try:
            train(plan.runs[args.train_index], args.data_dir, train_args, args.nodes, args.gpus)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        return
    if not (args.evaluate or args.report):
        try:
            check_resources(plan, args.nodes, args.gpus)
        except ValueError as err:
            raise SystemExit(f"nothing trained: {err}") from None
        train_all(plan, args.data_dir, train_args, args.nodes, args.gpus)
    if not args.report:
        for ev in plan.evaluations:
            evaluate(ev, args.data_dir, eval_args, eval_launcher(args.gpus, args.python))
        for bench in plan.benches:
            run_bench(bench, args.data_dir, args.python)
        if not args.keep_frozen_cache:
            remove_shared_caches(plan)
    path = write_report(plan, Path(args.eval_dir))
    print(path.read_text())
    print(f"Report: {path}")
    failed = [run for run in plan.runs if run_state(run) != "done"]
    if failed:
        listing = "\n".join(f"  {run.output_dir}" for run in failed)
        raise SystemExit(f"{len(failed)} of {len(plan.runs)} runs did not finish (their cells read 'not trained'); "
                         f"rerun the same command to resume them:\n{listing}")


if __name__ == "__main__":
    main()
