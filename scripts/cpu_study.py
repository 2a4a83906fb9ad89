"""Schedule the CPU forgetting study on the embedded SmolLM2-135M-Instruct (or --model); cpu_study.sh runs it.

SEEDS seeds of vanilla LoRA and of IMSM-LoRA (--ablations 1 adds the `equal` and `token` gates; --baselines 1 adds
LoRAMoE, CorDA-LoRA and PiSSA-LoRA and evaluates every vanilla LoRA-family run at the adapter scales --scales) are
tuned on --target, --jobs at a time, each on --threads threads; then ONE evaluation of the untuned model and every run
on the target and the general benchmarks (WebQ, FreebaseQA, MultiRC, MRPC) with decoded metrics and answer
likelihood, seeds grouped by label, paired bootstrap intervals and the learning-forgetting chart.

It prints its expected duration first (measured on this machine by scripts/estimate_time.py), each run as it starts
and ends, and once a minute the step of every running training. A finished run (its final/imsm_config.json) is kept
and skipped when the study is started again, so an interrupted study resumes with the next run. Arguments after `--`
go to every train.py run:

    .venv/bin/python scripts/cpu_study.py --seeds 2 --jobs 2 -- --lora_dropout 0.1
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.atomic import atomic_write_text

logger = logging.getLogger("cpu_study")

ROOT = Path(__file__).resolve().parents[1]
GENERAL_TASKS = ("webq", "freebaseqa", "multirc", "mrpc")
LORA = ["--peft", "lora", "--lora_r", "16", "--lora_alpha", "16"]
SCALED_METHODS = ("LoRA", "CorDA-LoRA", "PiSSA-LoRA")  # vanilla LoRA-family runs: one row per --adapter_scale
# the vanilla LoRA-family methods besides LoRA that evaluate.py would scale: the measures read them at full scale
SCALABLE_OTHERS = ("CorDA-LoRA", "PiSSA-LoRA", "KL0.1-LoRA", "KL1-LoRA", "EAFT-LoRA", "Replay-LoRA", "MLP-LoRA",
                   "MiCA-LoRA")
# --forgetting 1: what a LLaMA-Factory, axolotl, TRL or peft user can switch on against forgetting (issue 29), each a
# vanilla LoRA r 16 but for the one option; measured as they trained, at full scale, against LoRA's scaling curve
FORGETTING_METHODS = ("KL0.1-LoRA", "KL1-LoRA", "EAFT-LoRA", "Replay-LoRA", "MLP-LoRA", "MiCA-LoRA", "OSF")
MAIN_METHODS = ("LoRA", "IMSM-LoRA")
ABLATION_METHODS = ("IMSM-equal-LoRA", "IMSM-token-LoRA")
BASELINE_METHODS = ("LoRAMoE", "CorDA-LoRA", "PiSSA-LoRA")
ALL_METHODS = (*MAIN_METHODS, *ABLATION_METHODS, *BASELINE_METHODS, *FORGETTING_METHODS)  # method_arguments' table
# tqdm's progress bar as train.py leaves it in its log: "12/60 [00:10<00:40"
PROGRESS = re.compile(r"[0-9]*/[0-9]* \[[0-9:]*<[0-9:?]*")
POLL_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class TrainingRun:
    method: str
    seed: int
    out: Path

    @property
    def done(self) -> bool:
        return (self.out / "final" / "imsm_config.json").is_file()


def _count(least: int):
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, got {text!r}")
        return int(text)

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's sizes; run_scripts/cpu_study.sh passes each environment variable as the option of its name."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="../shared/data", help="task folders, each with train.jsonl and test.jsonl")
    p.add_argument("--output_dir", default="runs/cpu_study", help="METHOD/seedN/ per run and eval/")
    p.add_argument("--target", default="mrpc", help="the task every run is tuned on")
    p.add_argument("--template", default="chat", help="--prompt_template of training and evaluation")
    p.add_argument("--model", default=None,
                   help="--model_name_or_path of every run, the untuned model and the estimate (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seeds", type=_count(1), default=3, help="how many seeds of each method: FIRST_SEED.. on")
    p.add_argument("--first_seed", type=_count(1), default=1,
                   help="the first seed: 2 with --seeds 2 adds seeds 2 and 3 to a study whose seed 1 was evaluated "
                        "before (join the two reports with scripts/merge_measures.py --join)")
    p.add_argument("--ablations", type=int, choices=(0, 1), default=0, help="1 adds the `equal` and `token` gates")
    p.add_argument("--baselines", type=int, choices=(0, 1), default=0,
                   help="1 adds LoRAMoE, CorDA-LoRA and PiSSA-LoRA, and evaluates the LoRA family at --scales")
    p.add_argument("--forgetting", type=int, choices=(0, 1), default=0,
                   help="1 adds the options against forgetting: the KL anchor (beta 0.1 and 1), EAFT, replay of "
                        "--replay_examples general QA rows, MLP-only LoRA, MiCA and OSF")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to train, instead of the ones --ablations/--baselines/--forgetting "
                        "choose (LoRA first: the curve; e.g. LoRA,IMSM-LoRA,KL1-LoRA)")
    p.add_argument("--replay_examples", type=_count(1), default=200,
                   help="Replay-LoRA's general rows: WebQ and FreebaseQA test rows from --corda_skip on (no "
                        "evaluation reads them), half each")
    p.add_argument("--scales", default="0.5,1",
                   help="adapter scales of the vanilla LoRA-family runs with --baselines 1; IMSM is compared with "
                        "each baseline at the last one")
    p.add_argument("--corda_skip", type=_count(0), default=1000,
                   help="CorDA calibrates on WebQ test prompts from this row on (evaluate.py skips them for every "
                        "model)")
    p.add_argument("--corda_examples", type=_count(1), default=64, help="CorDA's calibration prompts")
    p.add_argument("--train_examples", type=_count(1), default=800)
    p.add_argument("--steps", type=_count(1), default=60)
    p.add_argument("--batch", type=_count(1), default=8)
    p.add_argument("--lr", default="3e-4")
    p.add_argument("--eval_examples", type=_count(1), default=200, help="first test examples of every task")
    p.add_argument("--score", default="both", choices=("both", "decode", "likelihood"))
    p.add_argument("--resamples", type=_count(1), default=2000, help="paired bootstrap resamples")
    p.add_argument("--jobs", type=_count(1), default=2, help="training runs side by side")
    p.add_argument("--threads", type=_count(1), default=None,
                   help="OpenMP threads of each training run (default: cores / jobs, at least 1)")
    p.add_argument("--eval_procs", type=_count(1), default=None,
                   help="one-thread evaluation processes sharing every task under torchrun (default: the cores; "
                        "1: evaluate.py alone, no launcher)")
    p.add_argument("--evaluate", default="decoded,measures", type=_evaluations,
                   help="the evaluations, in this order: 'decoded' (eval/: the task metrics on --eval_examples rows) "
                        "and 'measures' (eval_measures/: evaluate.py --measures and the LoRA frontier)")
    p.add_argument("--measure_tasks", default="webq,freebaseqa",
                   help="general tasks whose prompts KL is read on (the target's rows give AUROC)")
    p.add_argument("--measure_scales", default="0.5,1",
                   help="adapter scales of the LoRA runs on the frontier curve (the untuned model is scale 0)")
    p.add_argument("--checkpoint_steps", default="",
                   help="comma-separated steps: LoRA runs also save checkpoint-N, evaluated as LoRA@stepN on the "
                        "curve (at full scale: the other way for LoRA to learn less)")
    p.add_argument("--target_rows", type=_count(1), default=None,
                   help="the target's test rows scored for AUROC (default: all)")
    p.add_argument("--threshold_examples", type=_count(1), default=500,
                   help="held-out training rows of the target that choose the MCC threshold")
    p.add_argument("--general_examples", type=_count(1), default=500, help="passages of the general-text NLL")
    p.add_argument("--kl_examples", type=_count(1), default=250, help="prompts per --measure_tasks task for KL")
    p.add_argument("--general_text", default="data/general_text.jsonl",
                   help="built from --data_dir by scripts/build_general_text.py when missing")
    p.add_argument("train_args", nargs="*", help="after `--`: extra arguments for every train.py run")
    return p.parse_args(argv)


def _evaluations(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - {"decoded", "measures"})
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected decoded and/or measures, each once, got {text!r}")
    return names


def checkpoint_steps(args: argparse.Namespace) -> list[int]:
    steps = [int(s) for s in args.checkpoint_steps.split(",") if s.strip()]
    bad = [s for s in steps if not 0 < s < args.steps]
    if bad:
        raise SystemExit(f"cpu_study: --checkpoint_steps {bad}: each must lie between 0 and --steps {args.steps}")
    steps = sorted(set(steps))
    if any(s % steps[0] for s in steps):
        raise SystemExit(f"cpu_study: --checkpoint_steps {args.checkpoint_steps}: the Trainer saves every N steps, "
                         f"so every step must be a multiple of the first ({steps[0]})")
    return steps


def study_methods(ablations: bool, baselines: bool, forgetting: bool = False, chosen: str | None = None) -> list[str]:
    if chosen:
        methods = [m.strip() for m in chosen.split(",") if m.strip()]
        if unknown := [m for m in methods if m not in ALL_METHODS]:
            raise SystemExit(f"cpu_study: --methods {chosen}: unknown {unknown}; choose from {list(ALL_METHODS)}")
        if "LoRA" not in methods:
            raise SystemExit(f"cpu_study: --methods {chosen}: LoRA is the reference curve; include it")
        return list(dict.fromkeys(methods))
    methods = list(MAIN_METHODS)
    if ablations:
        methods += ABLATION_METHODS
    if baselines:
        methods += BASELINE_METHODS
    if forgetting:
        methods += FORGETTING_METHODS
    return methods


def replay_file(args: argparse.Namespace) -> Path:
    """Replay-LoRA's general rows: --replay_examples WebQ and FreebaseQA test rows, half each, from row --corda_skip
    on, where no evaluation reads (the measures read the first --kl_examples, decoding the first --eval_examples)."""
    out = Path(args.output_dir) / "replay.jsonl"
    half = (args.replay_examples + 1) // 2
    rows = []
    for task, n in (("webq", half), ("freebaseqa", args.replay_examples - half)):
        with (Path(args.data_dir) / task / "test.jsonl").open() as f:
            lines = [line for line in f if line.strip()][args.corda_skip:args.corda_skip + n]
        if len(lines) < n:
            raise SystemExit(f"cpu_study: {args.data_dir}/{task}/test.jsonl has {len(lines)} rows past "
                             f"--corda_skip {args.corda_skip}; Replay-LoRA needs {n}")
        rows += lines
    text = "".join(rows)
    if not out.is_file() or out.read_text() != text:  # never rewritten under a Replay run that is reading it
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    return out


def method_arguments(method: str, args: argparse.Namespace) -> list[str]:
    """The train.py arguments that make ``method``."""
    table = {
        "LoRA": [*LORA, "--gate", "none"],
        "IMSM-LoRA": [*LORA, "--gate", "query_aware", "--gate_rank", "8", "--gate_dropout", "0.1"],
        "IMSM-equal-LoRA": [*LORA, "--gate", "equal"],
        "IMSM-token-LoRA": [*LORA, "--gate", "token", "--gate_rank", "8", "--gate_dropout", "0.1"],
        "LoRAMoE": ["--peft", "loramoe", "--gate", "none"],
        # CorDA's calibration prompts lie past the evaluated WebQ rows by default; evaluate.py skips them anyway
        "CorDA-LoRA": [*LORA, "--gate", "none", "--init_lora_weights", "corda",
                       "--corda_calibration_file", f"{args.data_dir}/webq/test.jsonl",
                       "--corda_calibration_skip", str(args.corda_skip),
                       "--corda_calibration_examples", str(args.corda_examples)],
        "PiSSA-LoRA": [*LORA, "--gate", "none", "--init_lora_weights", "pissa"],
        "KL0.1-LoRA": [*LORA, "--gate", "none", "--kl_anchor", "0.1"],
        "KL1-LoRA": [*LORA, "--gate", "none", "--kl_anchor", "1"],
        "EAFT-LoRA": [*LORA, "--gate", "none", "--eaft"],
        "Replay-LoRA": [*LORA, "--gate", "none"],  # + its rows, below
        "MLP-LoRA": [*LORA, "--gate", "none", "--target_modules", "mlp"],
        "MiCA-LoRA": [*LORA, "--gate", "none", "--init_lora_weights", "mica"],
        "OSF": ["--peft", "osf", "--gate", "none"],
    }
    if method == "Replay-LoRA":
        return [*table[method], "--knowledge_file", str(replay_file(args)), "--knowledge_examples",
                str(args.replay_examples)]
    return table[method]


def comparisons(ablations: bool, baselines: bool, scales: str) -> str:
    """evaluate.py's --compare: IMSM-LoRA against each other method, the scaled ones at the last scale."""
    reference = f"@{float(scales.split(',')[-1]):g}" if baselines else ""  # normally @1
    pairs = [f"IMSM-LoRA:LoRA{reference}"]
    if ablations:
        pairs += ["IMSM-LoRA:IMSM-equal-LoRA", "IMSM-LoRA:IMSM-token-LoRA"]
    if baselines:
        pairs += ["IMSM-LoRA:LoRAMoE", f"IMSM-LoRA:CorDA-LoRA{reference}", f"IMSM-LoRA:PiSSA-LoRA{reference}"]
    return ",".join(pairs)


def _model_option(args: argparse.Namespace) -> list[str]:
    """--model_name_or_path when --model is given (train.py, evaluate.py and the estimate share one backbone)."""
    return ["--model_name_or_path", args.model] if args.model else []


def train_command(run: TrainingRun, args: argparse.Namespace) -> list[str]:
    steps = checkpoint_steps(args)
    saving = ["--save_strategy", "no"]
    if steps and run.method == "LoRA":  # checkpoint-N at the first step asked; the others are its multiples
        saving = ["--save_strategy", "steps", "--save_steps", str(steps[0])]
    return [
        sys.executable, "train.py", *_model_option(args), "--train_file", f"{args.data_dir}/{args.target}/train.jsonl",
        "--max_train_examples", str(args.train_examples), "--output_dir", str(run.out),
        *method_arguments(run.method, args),
        "--prompt_template", args.template, "--learning_rate", args.lr, "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.03", "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
        "--max_input_length", "256", "--max_output_length", "8", *saving, "--logging_steps", "10",
        "--report_to", "none", "--seed", str(run.seed), "--data_seed", str(run.seed), "--disable_tqdm", "false",
        *args.train_args,
    ]


def _clock() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def _cores() -> int:
    """The cores this process may use (what `nproc` counts)."""
    return len(os.sched_getaffinity(0))


def _report_progress(output_dir: Path) -> None:
    """The last progress-bar state of every unfinished run's log."""
    for log in sorted(output_dir.glob("*/seed*.log")):
        if (log.with_suffix("") / "final" / "imsm_config.json").is_file():
            continue
        with log.open("rb") as f:
            f.seek(max(log.stat().st_size - 400, 0))
            steps = PROGRESS.findall(f.read().decode(errors="replace"))
        if steps:
            logger.info("    %s: step %s left]", log.relative_to(output_dir), steps[-1])


class TrainingFailed(RuntimeError):
    pass


class Trainer:
    """Runs the training jobs, ``jobs`` at a time, each on ``threads`` OpenMP threads with its output in RUN.log.

    Several one-thread jobs side by side, not one job on every core: a process of 2 OpenMP threads slows down
    several-fold as soon as anything else wants a core, one of 1 thread does not.
    """

    def __init__(self, jobs: int, threads: int, output_dir: Path):
        self.jobs, self.output_dir = jobs, output_dir
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.running: list[tuple[subprocess.Popen, TrainingRun, float]] = []
        self.last_report = time.monotonic()

    def wait_for_a_free_slot(self) -> None:
        while len(self.running) >= self.jobs:
            self.wait_for_one()

    def start(self, run: TrainingRun, command: list[str]) -> None:
        with open(f"{run.out}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.running.append((process, run, time.monotonic()))

    def wait_for_one(self) -> None:
        """Wait until a job ends, printing every minute how far each running one is. A failed job raises
        TrainingFailed (the caller stops the others: a started study resumes from the finished runs)."""
        while True:
            for entry in self.running:
                process, run, started = entry
                if process.poll() is None:
                    continue
                self.running.remove(entry)
                if process.returncode != 0:
                    raise TrainingFailed(f"training failed, see {run.out}.log")
                logger.info("    %s seed %d finished in %d s (%s)", run.method, run.seed,
                            time.monotonic() - started, _clock())
                return
            time.sleep(POLL_SECONDS)
            if time.monotonic() - self.last_report >= PROGRESS_EVERY_SECONDS:
                self.last_report = time.monotonic()
                _report_progress(self.output_dir)

    def wait_all(self) -> None:
        while self.running:
            self.wait_for_one()

    def stop(self) -> None:
        for process, run, _ in self.running:
            logger.warning("cpu_study: stopping %s seed %d", run.method, run.seed)
            process.terminate()
        for process, _, _ in self.running:
            process.wait()
        self.running.clear()


def _setup_logging() -> None:
    """Progress to stdout, warnings and errors to stderr, as plain lines (the user reads them as they come)."""
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[to_stdout, to_stderr])


def training_runs(args: argparse.Namespace, output_dir: Path) -> list[TrainingRun]:
    """Every run of the study, method by method, seeds --first_seed .. --first_seed + --seeds - 1
    (``<method>/seed<k>``), so a later study of more seeds lists its runs in seed order and never names an earlier
    study's folders."""
    return [TrainingRun(method, seed, output_dir / method / f"seed{seed}")
            for method in study_methods(args.ablations, args.baselines, args.forgetting, args.methods)
            for seed in range(args.first_seed, args.first_seed + args.seeds)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    os.chdir(ROOT)  # train.py, evaluate.py and the default paths are relative to the repository
    train_file = Path(args.data_dir) / args.target / "train.jsonl"
    if not train_file.is_file():
        logger.error("cpu_study: %s not found; build the task files with '.venv/bin/python scripts/prepare_data.py "
                     "--out_dir data' and run with DATA_DIR=data", train_file)
        return 1
    checkpoint_steps(args)  # a bad list fails before anything runs
    output_dir = Path(args.output_dir)
    tasks = ",".join([args.target, *GENERAL_TASKS])
    runs = training_runs(args, output_dir)
    if any(run.method == "Replay-LoRA" for run in runs):
        replay_file(args)  # too few rows stop the study now, not when its Replay run comes up hours later

    estimate = [
        sys.executable, "scripts/estimate_time.py", "--label", "cpu_study", "--data_dir", args.data_dir,
        "--target", args.target, "--tasks", tasks, "--template", args.template,
        "--train_examples", str(args.train_examples), "--batch", str(args.batch), "--steps", str(args.steps),
        "--eval_examples", str(args.eval_examples), "--score", args.score, *_model_option(args),
        "--runs", *(f"{run.method}:{run.seed}" for run in runs), "--jobs", str(args.jobs),
        "--skip_done_in", str(output_dir), "--scales", args.scales if args.baselines else "",
        "--decoded", str(int("decoded" in args.evaluate)),
    ]
    if "measures" in args.evaluate:
        build_general_text(args)
        n_scales = len([s for s in args.measure_scales.split(",") if s.strip()])
        # single-pass models: LoRA at every scale and checkpoint, every other vanilla method once; two-pass: the gates
        imsm = sum(run.method.startswith("IMSM") for run in runs)
        plain = sum(run.method == "LoRA" for run in runs) * (n_scales + len(checkpoint_steps(args))) + \
            sum(run.method != "LoRA" and not run.method.startswith("IMSM") for run in runs)
        with (Path(args.data_dir) / args.target / "test.jsonl").open() as f:
            target_rows = sum(1 for line in f if line.strip())
        target_rows = min(args.target_rows or target_rows, target_rows)
        estimate += ["--measure_models", f"{plain},{imsm}", "--general_text", args.general_text,
                     "--measure_rows", f"{args.target}={target_rows + args.threshold_examples}",
                     "--measure_likelihood_tasks", measure_tasks(args), "--general_examples",
                     str(args.general_examples), "--kl_tasks", args.measure_tasks, "--kl_examples",
                     str(args.kl_examples)]
    if done := subprocess.run(estimate, check=False).returncode:
        return done

    cores = _cores()
    trainer = Trainer(args.jobs, args.threads or max(cores // args.jobs, 1), output_dir)
    try:
        for i, run in enumerate(runs, 1):
            if run.done:
                logger.info("[%d/%d] %s seed %d: done before, kept (%s)", i, len(runs), run.method, run.seed, run.out)
                continue
            run.out.parent.mkdir(parents=True, exist_ok=True)
            trainer.wait_for_a_free_slot()
            logger.info("[%d/%d] training %s seed %d -> %s (%s; progress in %s.log)", i, len(runs), run.method,
                        run.seed, run.out, _clock(), run.out)
            trainer.start(run, train_command(run, args))
        trainer.wait_all()
    except TrainingFailed as failed:
        trainer.stop()
        logger.error("cpu_study: %s", failed)
        return 1
    except BaseException:  # Ctrl-C: no training is left running behind the user's back
        trainer.stop()
        raise
    for run in runs:
        if not run.done:
            logger.error("cpu_study: %s did not finish", run.out)
            return 1

    eval_procs = args.eval_procs or cores
    for name in args.evaluate:
        out, command = (decoded_evaluation if name == "decoded" else measures_evaluation)(runs, args, output_dir)
        if evaluation_done(out, command):
            logger.info("%s evaluation: done before with the same command, kept (%s)", name, out)
            continue
        logger.info("%s evaluation -> %s, %d processes (%s)", name, out, eval_procs, _clock())
        # evaluate.py shards every task over one-thread processes and gathers in input order; one runs on its own
        launch = [sys.executable]
        if eval_procs > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(eval_procs)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // eval_procs, 1))}
        if code := subprocess.run([*launch, *command], env=env, check=False).returncode:
            return code
    return 0


def evaluation_done(out: Path, command: list[str]) -> bool:
    """A finished report (its marker, no INCOMPLETE) of this very evaluate.py command."""
    marker = out / "imsm_evaluation.json"
    if not marker.is_file() or (out / "INCOMPLETE").exists():
        return False
    return json.loads(marker.read_text()).get("command", [])[1:] == command[1:]


def decoded_evaluation(runs: list[TrainingRun], args: argparse.Namespace, output_dir: Path) -> tuple[Path, list]:
    """The untuned model and every run on the target and the general tasks: decoded metrics and answer likelihood on
    the first --eval_examples rows, seeds grouped by label."""
    tasks = ",".join([args.target, *GENERAL_TASKS])
    labels = ["untuned", *(run.method for run in runs)]  # one label per run: evaluate.py groups the seeds
    scale_args = ["--adapter_scale", args.scales] if args.baselines else []  # LoRA@0.5, LoRA@1, ...: one row each
    out = output_dir / "eval"
    return out, [
        "evaluate.py", "--untuned", *_model_option(args), "--run_dir", *(str(run.out) for run in runs),
        "--labels", ",".join(labels),
        "--prompt_template", args.template, "--target", args.target, "--tasks", tasks, "--data_dir", args.data_dir,
        "--max_examples", str(args.eval_examples), "--score", args.score,
        "--compare", comparisons(args.ablations, args.baselines, args.scales), *scale_args,
        "--bootstrap_resamples", str(args.resamples), "--output_dir", str(out), "--overwrite",
    ]


def build_general_text(args: argparse.Namespace) -> Path:
    """--general_text, built from --data_dir by scripts/build_general_text.py when it is missing."""
    general_text = Path(args.general_text)
    if not general_text.is_file():
        logger.info("building %s from %s (scripts/build_general_text.py)", general_text, args.data_dir)
        subprocess.run([sys.executable, "scripts/build_general_text.py", "--data_dir", args.data_dir, "--out",
                        str(general_text)], check=True)
    return general_text


def measure_tasks(args: argparse.Namespace) -> str:
    return ",".join(dict.fromkeys([args.target, *(t for t in args.measure_tasks.split(",") if t)]))


def measures_evaluation(runs: list[TrainingRun], args: argparse.Namespace, output_dir: Path) -> tuple[Path, list]:
    """evaluate.py --measures on the untuned model, LoRA at --measure_scales (and its checkpoints) and IMSM-LoRA:
    the target's AUROC (all test rows unless --target_rows) with an MCC threshold from held-out training rows, the
    general-text NLL and KL on --measure_tasks, and IMSM against the LoRA frontier (docs/evaluation.md#measures)."""
    general_text = build_general_text(args)
    lora = [run for run in runs if run.method == "LoRA"]
    others = [run for run in runs if run.method != "LoRA"]
    models = [(f"LoRA@step{step}", run.out / f"checkpoint-{step}") for step in checkpoint_steps(args) for run in lora]
    # at full scale: LoRA's checkpoints and every vanilla method but LoRA (the IMSM gates and OSF are not scaled)
    steps = list(dict.fromkeys(label for label, _ in models))
    full_scale = steps + list(dict.fromkeys(run.method for run in others if run.method in SCALABLE_OTHERS))
    models += [("LoRA", run.out) for run in lora] + [(run.method, run.out) for run in others]
    tasks = measure_tasks(args)
    train_file = Path(args.data_dir) / args.target / "train.jsonl"
    target_rows = ["--measure_max_examples", str(args.target_rows)] if args.target_rows else []
    out = output_dir / "eval_measures"
    reference = f"LoRA@{float(args.measure_scales.split(',')[-1]):g}"  # normally LoRA@1
    methods = list(dict.fromkeys(run.method for run in others))
    compare = ["--compare", ",".join(f"{method}:{reference}" for method in methods)] if methods else []
    # every method against LoRA's curve, IMSM-LoRA first (stats.json's `frontier` record is the first method's); LoRA
    # alone (METHODS=LoRA: how much a target is learned) has no method to read against it
    methods.sort(key=lambda method: method != "IMSM-LoRA")
    frontier = ["--frontier", f"{','.join(methods)}:LoRA"] if methods else []
    return out, [
        "evaluate.py", "--untuned", *_model_option(args), "--run_dir", *(str(path) for _, path in models),
        "--labels", ",".join(["untuned", *(label for label, _ in models)]), "--adapter_scale", args.measure_scales,
        *(["--full_scale_labels", ",".join(full_scale)] if full_scale else []),
        "--prompt_template", args.template, "--target", args.target, "--tasks", tasks, "--data_dir", args.data_dir,
        "--max_examples", str(args.eval_examples), "--score", "likelihood",
        *compare,
        "--measures", "auroc,general_nll,kl", "--general_text", str(general_text), *target_rows,
        "--threshold_file", f"{args.target}={train_file}", "--threshold_examples", str(args.threshold_examples),
        "--general_examples", str(args.general_examples), "--kl_examples", str(args.kl_examples),
        *frontier, "--bootstrap_resamples", str(args.resamples), "--output_dir", str(out),
        "--overwrite",
    ]

if __name__ == "__main__":
    sys.exit(main())
