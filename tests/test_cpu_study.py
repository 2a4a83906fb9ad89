"""The CPU study: run_scripts/cpu_study.sh, a thin wrapper that hands its environment to the scheduler
scripts/cpu_study.py, end to end at toy sizes on a tiny in-process model, one process at a time (its time estimate,
seeds of two methods, LoRA checkpoints, both evaluations with their scores, seeds grouped by label, paired intervals,
the frontier, the charts, and a resumed study that keeps finished runs), and the scheduler's parts on stand-in jobs
(the plan, JOBS at a time, a failed run, progress)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
# the benchmarks beside the checkout, as the study reads them by default; SHARED_DATA=... for a checkout elsewhere
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
PYTHON = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else shutil.which("python")

# a toy study takes about a minute on an idle 2-core machine; this only stops one that hangs
HUNG_SECONDS = 900

needs_the_data = pytest.mark.skipif(not (SHARED / "mrpc" / "train.jsonl").is_file(),
                                    reason=f"needs the task files in {SHARED} (or set SHARED_DATA)")


cpu_study = load_script("cpu_study")


def _toy_data(base: Path, rows: int = 6, train_rows: int | None = None) -> Path:
    data = base / "data"
    for task in ("mrpc", "webq", "freebaseqa", "multirc"):
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            if (SHARED / task / f"{split}.jsonl").is_file():
                n = train_rows if split == "train" and train_rows else rows
                lines = (SHARED / task / f"{split}.jsonl").read_text().splitlines()[:n]
                (data / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def _toy_general_text(base: Path) -> Path:
    path = base / "general_text.jsonl"
    texts = ["The river carries sand from the hills to the sea, and the delta grows a little every year.",
             "A plant that gets more light makes more sugar, so it grows taller than one kept in the shade."]
    path.write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts))
    return path


def _env(model: Path, data: Path, out: Path, **sizes) -> dict:
    """Toy sizes on the tiny model, one training and one evaluation process at a time on one thread."""
    return {**os.environ, "MODEL": str(model), "DATA_DIR": str(data), "OUTPUT_DIR": str(out), "STEPS": "2",
            "BATCH": "2", "TRAIN_EXAMPLES": "6", "EVAL_EXAMPLES": "5", "RESAMPLES": "1000", "JOBS": "1",
            "THREADS": "1", "EVAL_PROCS": "1", **sizes, "PY": PYTHON}


def _run_study(env: dict) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", "run_scripts/cpu_study.sh"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=HUNG_SECONDS, check=False)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the toy study hung: still running after {HUNG_SECONDS} s\n{str(hung.stdout)[-4000:]}")


@pytest.mark.launch
@needs_the_data
def test_cpu_study_at_toy_sizes(chat_model_dir, tmp_path):
    data = _toy_data(tmp_path, train_rows=10)
    out = tmp_path / "study"
    env = _env(chat_model_dir, data, out, SEEDS="2", THRESHOLD_EXAMPLES="4", KL_EXAMPLES="2", MEASURE_SCALES="0.5,1",
               CHECKPOINT_STEPS="1", GENERAL_TEXT=str(_toy_general_text(tmp_path)))
    proc = _run_study(env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "expected duration on this machine" in log and "total: ~" in log and "measures: the untuned model" in log
    # MODEL reaches every training run and both evaluations' untuned model
    for run in [out / m / f"seed{s}" for m in ("LoRA", "IMSM-LoRA") for s in (1, 2)]:
        assert json.loads((run / "final" / "imsm_config.json").read_text())["base_model"] == str(chat_model_dir)
    for evaluation in ("eval", "eval_measures"):
        untuned = json.loads((out / evaluation / "untuned" / "mrpc" / "metrics.json").read_text())
        assert untuned["model"] == str(chat_model_dir), evaluation
    # the measures: AUROC on the target, general-text NLL and KL, IMSM against the LoRA frontier of two scales
    measures = json.loads((out / "eval_measures" / "stats.json").read_text())["measures"]
    # LoRA's checkpoint-1 joins the curve at full scale, LoRA at each scale
    assert list(measures["auroc"]["mrpc"]) == ["LoRA@step1", "LoRA@0.5", "LoRA@1", "IMSM-LoRA"]
    assert set(measures["frontier"]["kl"]["points"]) == {"LoRA@step1", "LoRA@0.5", "LoRA@1", "untuned (scale 0)"}
    assert len(measures["auroc"]["mrpc"]["IMSM-LoRA"]["per_run"]) == 2
    assert set(measures["kl"]) == {"webq", "freebaseqa", "average"} and "general text" in measures["general_nll"]
    assert set(measures["frontier"]) == {"general_nll", "kl"}
    assert (out / "eval_measures" / "frontier.png").stat().st_size > 0
    untuned = json.loads((out / "eval_measures" / "untuned" / "measures.json").read_text())
    assert len(untuned["yes_no"]["mrpc"]["train_log_odds"]) == 4  # training rows 7-10: the runs trained on 1-6
    assert "Forgetting without the answer format" in log  # the printed report
    stats = json.loads((out / "eval" / "stats.json").read_text())
    assert list(stats["labels"]) == ["untuned", "LoRA", "IMSM-LoRA"]
    for label in ("LoRA", "IMSM-LoRA"):
        assert stats["labels"][label]["runs"] == [str(out / label / f"seed{s}" / "final") for s in (1, 2)]
        assert len(stats["labels"][label]["tasks"]["webq"]["answer_nll"]["per_run"]) == 2
    pairs = {(c["a"], c["b"], c["measure"], c["column"]) for c in stats["comparisons"]}
    assert ("IMSM-LoRA", "LoRA", "answer_nll", "general") in pairs and ("LoRA", "untuned", "primary", "mrpc") in pairs
    assert "IMSM-LoRA − LoRA" in log and "±" in log  # the printed tables
    assert (out / "eval" / "tradeoff.png").stat().st_size > 0
    # started again, it keeps the finished runs and only evaluates (here the likelihood alone, the cheap study)
    proc = _run_study({**env, "SCORE": "likelihood"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("done before, kept") == 4 and "training LoRA" not in proc.stdout
    assert "measures evaluation: done before with the same command, kept" in proc.stdout
    summary = (out / "eval" / "summary.md").read_text()
    assert "NLL" in summary and "(accuracy)" not in summary


@pytest.mark.launch
@needs_the_data
def test_cpu_study_baselines_share_the_harness(chat_model_dir, tmp_path):
    """BASELINES=1: LoRAMoE, CorDA-LoRA and PiSSA-LoRA beside LoRA and IMSM-LoRA, the LoRA-family runs at two adapter
    scales, CorDA's calibration rows left out of WebQ for every model, IMSM compared with each baseline."""
    data = _toy_data(tmp_path, rows=8)
    out = tmp_path / "study"
    env = _env(chat_model_dir, data, out, SEEDS="1", BASELINES="1", SCALES="0.5,1", CORDA_SKIP="6", CORDA_EXAMPLES="2",
               EVAL_EXAMPLES="8", SCORE="likelihood", EVALUATE="decoded")  # the measures are the toy study's
    proc = _run_study(env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    stats = json.loads((out / "eval" / "stats.json").read_text())
    assert list(stats["labels"]) == ["untuned", "LoRA@0.5", "LoRA@1", "IMSM-LoRA", "LoRAMoE", "CorDA-LoRA@0.5",
                                     "CorDA-LoRA@1", "PiSSA-LoRA@0.5", "PiSSA-LoRA@1"]
    pairs = {(c["a"], c["b"]) for c in stats["comparisons"] if c["measure"] == "answer_nll"}
    assert {("IMSM-LoRA", b) for b in ("LoRA@1", "LoRAMoE", "CorDA-LoRA@1", "PiSSA-LoRA@1")} <= pairs
    webq = [json.loads(line) for line in (out / "eval" / "untuned" / "webq" / "predictions.jsonl").read_text()
            .splitlines()]
    assert len(webq) == 6  # rows 6 and 7 calibrated CorDA, so no model is scored on them
    assert "CorDA calibration rows" in (out / "eval" / "summary.md").read_text()


# What the bash scheduler read from the environment, with its defaults: the wrapper still reads every one of them.
BASH_DEFAULTS = {"DATA_DIR": "../shared/data", "OUTPUT_DIR": "runs/cpu_study", "MODEL": None, "TARGET": "mrpc",
                 "TEMPLATE": "chat", "SEEDS": 3, "FIRST_SEED": 1, "ABLATIONS": 0, "BASELINES": 0, "FORGETTING": 0,
                 "METHODS": None, "REPLAY_EXAMPLES": 200, "SCALES": "0.5,1",
                 "CORDA_SKIP": 1000, "CORDA_EXAMPLES": 64, "TRAIN_EXAMPLES": 800, "STEPS": 60, "BATCH": 8,
                 "LR": "3e-4", "EVAL_EXAMPLES": 200, "SCORE": "both", "RESAMPLES": 2000, "JOBS": 2,
                 "EVALUATE": ["decoded", "measures"], "MEASURE_TASKS": "webq,freebaseqa", "MEASURE_SCALES": "0.5,1",
                 "CHECKPOINT_STEPS": "", "TARGET_ROWS": None, "THRESHOLD_EXAMPLES": 500, "GENERAL_EXAMPLES": 500,
                 "KL_EXAMPLES": 250, "GENERAL_TEXT": "data/general_text.jsonl"}
SET = {"DATA_DIR": "/d", "OUTPUT_DIR": "/o", "MODEL": "/m", "TARGET": "cola", "TEMPLATE": "raw", "SEEDS": 5,
       "FIRST_SEED": 2, "ABLATIONS": 1, "BASELINES": 1, "FORGETTING": 1, "METHODS": "LoRA,OSF", "REPLAY_EXAMPLES": 8,
       "SCALES": "1", "CORDA_SKIP": 7, "CORDA_EXAMPLES": 3, "TRAIN_EXAMPLES": 9,
       "STEPS": 4, "BATCH": 2, "LR": "1e-3", "EVAL_EXAMPLES": 11, "SCORE": "likelihood", "RESAMPLES": 100,
       "JOBS": 3, "THREADS": 1, "EVAL_PROCS": 4, "EVALUATE": "measures", "MEASURE_TASKS": "webq",
       "MEASURE_SCALES": "0.25,1", "CHECKPOINT_STEPS": "2", "TARGET_ROWS": 30, "THRESHOLD_EXAMPLES": 40,
       "GENERAL_EXAMPLES": 50, "KL_EXAMPLES": 60, "GENERAL_TEXT": "/g.jsonl"}
PARSED = {"EVALUATE": ["measures"]}  # the value the scheduler reads where it is not the string given


def _wrapper_options(tmp_path: Path, env: dict, *extra: str) -> Namespace:
    """What run_scripts/cpu_study.sh hands the scheduler, recorded by a stand-in PY and parsed by the scheduler."""
    record = tmp_path / "argv"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    stand_in.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in SET}
    done = subprocess.run(["bash", "run_scripts/cpu_study.sh", *extra], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, **env, "PY": str(stand_in)}, check=False)
    assert done.returncode == 0, done.stderr
    script, *argv = record.read_text().splitlines()
    assert script == "scripts/cpu_study.py"
    return cpu_study.parse_args(argv)


def test_the_wrapper_hands_every_environment_variable_to_the_scheduler(tmp_path):
    defaults = _wrapper_options(tmp_path, {})
    for name, value in BASH_DEFAULTS.items():
        assert getattr(defaults, name.lower()) == value, name
    assert defaults.threads is None and defaults.eval_procs is None and defaults.train_args == []
    options = _wrapper_options(tmp_path, {name: str(value) for name, value in SET.items()},
                               "--lora_dropout", "0.1", "--seed", "9")
    for name, value in SET.items():
        assert getattr(options, name.lower()) == PARSED.get(name, value), name
    assert options.train_args == ["--lora_dropout", "0.1", "--seed", "9"]
    assert _wrapper_options(tmp_path, {"SEEDS": "", "SCALES": ""}).seeds == 3  # empty means the default, as ${X:-3}


@pytest.mark.parametrize(("env", "message"), [
    ({"SEEDS": "0"}, "--seeds: must be a whole number of at least 1, got '0'"),
    ({"JOBS": "abc"}, "--jobs: must be a whole number of at least 1, got 'abc'"),
    ({"BASELINES": "yes"}, "--baselines"),
    ({"EVALUATE": "decoded,plots"}, "--evaluate: expected decoded and/or measures"),
    ({"CHECKPOINT_STEPS": "20,30"}, "every step must be a multiple of the first (20)"),
    ({"CHECKPOINT_STEPS": "60"}, "each must lie between 0 and --steps 60"),
    ({"DATA_DIR": "/nowhere"}, "cpu_study: /nowhere/mrpc/train.jsonl not found"),
    ({"FORGETTING": "1", "CORDA_SKIP": "100000"}, "test.jsonl has 0 rows past --corda_skip 100000; Replay-LoRA needs"),
])
def test_a_bad_setting_stops_the_study_before_anything_runs(env, message, tmp_path):
    done = subprocess.run(["bash", "run_scripts/cpu_study.sh"], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PY": PYTHON, "OUTPUT_DIR": str(tmp_path / "study"), **env})
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "study").exists()


def test_the_plan_of_each_study():
    """The methods, and IMSM-LoRA compared with each of them: the scaled ones at the last scale, printed as %g."""
    assert cpu_study.study_methods(False, False) == ["LoRA", "IMSM-LoRA"]
    assert cpu_study.comparisons(False, False, "0.5,1") == "IMSM-LoRA:LoRA"
    assert cpu_study.study_methods(True, False) == ["LoRA", "IMSM-LoRA", "IMSM-equal-LoRA", "IMSM-token-LoRA"]
    assert cpu_study.comparisons(True, False, "0.5,1") == \
        "IMSM-LoRA:LoRA,IMSM-LoRA:IMSM-equal-LoRA,IMSM-LoRA:IMSM-token-LoRA"
    assert cpu_study.study_methods(True, True)[4:] == ["LoRAMoE", "CorDA-LoRA", "PiSSA-LoRA"]
    assert cpu_study.comparisons(False, True, "0.5,1.0") == \
        "IMSM-LoRA:LoRA@1,IMSM-LoRA:LoRAMoE,IMSM-LoRA:CorDA-LoRA@1,IMSM-LoRA:PiSSA-LoRA@1"
    assert cpu_study.comparisons(True, True, "0.25") == ("IMSM-LoRA:LoRA@0.25,IMSM-LoRA:IMSM-equal-LoRA,"
                                                         "IMSM-LoRA:IMSM-token-LoRA,IMSM-LoRA:LoRAMoE,"
                                                         "IMSM-LoRA:CorDA-LoRA@0.25,IMSM-LoRA:PiSSA-LoRA@0.25")


def test_the_forgetting_study_plan():
    """FORGETTING=1 adds the options against forgetting after the gates; METHODS picks any set, LoRA (the curve)
    included, and names the unknown ones."""
    assert cpu_study.study_methods(False, False, True) == ["LoRA", "IMSM-LoRA", "KL0.1-LoRA", "KL1-LoRA", "EAFT-LoRA",
                                                           "Replay-LoRA", "MLP-LoRA", "MiCA-LoRA", "OSF"]
    assert cpu_study.study_methods(True, True, True, "LoRA,OSF,LoRA") == ["LoRA", "OSF"]
    with pytest.raises(SystemExit, match=r"unknown \['KL2-LoRA'\]"):
        cpu_study.study_methods(False, False, False, "LoRA,KL2-LoRA")
    with pytest.raises(SystemExit, match="LoRA is the reference curve"):
        cpu_study.study_methods(False, False, False, "IMSM-LoRA,OSF")
    assert cpu_study.study_methods(True, True, True) == list(cpu_study.ALL_METHODS)  # every method METHODS accepts
    args = cpu_study.parse_args([])
    for method in cpu_study.ALL_METHODS:  # ... has train.py arguments (Replay-LoRA's rows: the test below)
        assert method == "Replay-LoRA" or "--peft" in cpu_study.method_arguments(method, args), method


@needs_the_data
def test_each_forgetting_method_trains_with_its_one_option(tmp_path):
    """Each method is the LoRA run's command but for its one option; Replay-LoRA's rows are the WebQ and FreebaseQA
    test rows from --corda_skip on, half each, which no evaluation reads."""
    args = cpu_study.parse_args(["--output_dir", str(tmp_path), "--replay_examples", "5", "--corda_skip", "1000",
                                 "--data_dir", str(SHARED)])

    def options(method: str) -> dict:
        command = cpu_study.train_command(cpu_study.TrainingRun(method, 1, tmp_path / "run"), args)
        return dict(zip(command[2::2], command[3::2]))

    lora = options("LoRA")
    replay = str(tmp_path / "replay.jsonl")
    expected = {"KL0.1-LoRA": {"--kl_anchor": "0.1"}, "KL1-LoRA": {"--kl_anchor": "1"},
                "EAFT-LoRA": {"--eaft": "(switch)"},
                "Replay-LoRA": {"--knowledge_file": replay, "--knowledge_examples": "5"},
                "MLP-LoRA": {"--target_modules": "mlp"}, "MiCA-LoRA": {"--init_lora_weights": "mica"},
                "OSF": {"--peft": "osf", "--lora_r": None, "--lora_alpha": None}}
    for method, change in expected.items():
        command = cpu_study.train_command(cpu_study.TrainingRun(method, 1, tmp_path / "run"), args)
        if method == "EAFT-LoRA":  # a switch: the one token more
            command.remove("--eaft")
            command += ["--eaft", "(switch)"]
        got = dict(zip(command[2::2], command[3::2]))
        differing = {k for k in lora.keys() | got.keys() if lora.get(k) != got.get(k)}
        assert differing == set(change), method
        assert all(got.get(k) == v for k, v in change.items()), method
    rows = [json.loads(line) for line in Path(replay).read_text().splitlines()]
    webq = [json.loads(line) for line in (SHARED / "webq" / "test.jsonl").read_text().splitlines()[1000:1003]]
    freebase = [json.loads(line) for line in (SHARED / "freebaseqa/test.jsonl").read_text().splitlines()[1000:1002]]
    assert rows == webq + freebase
    # a second Replay seed's command leaves the file alone (a running seed may be reading it)
    before = Path(replay).stat().st_mtime_ns, Path(replay).stat().st_ino
    cpu_study.train_command(cpu_study.TrainingRun("Replay-LoRA", 2, tmp_path / "run2"), args)
    assert (Path(replay).stat().st_mtime_ns, Path(replay).stat().st_ino) == before


def test_more_seeds_of_an_earlier_study():
    """FIRST_SEED=2 SEEDS=2 plans seeds 2 and 3 of each method, in seed order, in their own seed folders (joined
    with seed 1's report by scripts/merge_measures.py --join)."""
    args = cpu_study.parse_args(["--methods", "LoRA,KL1-LoRA", "--first_seed", "2", "--seeds", "2"])
    runs = cpu_study.training_runs(args, Path("/o"))
    assert [(run.method, run.seed, run.out) for run in runs] == [
        ("LoRA", 2, Path("/o/LoRA/seed2")), ("LoRA", 3, Path("/o/LoRA/seed3")),
        ("KL1-LoRA", 2, Path("/o/KL1-LoRA/seed2")), ("KL1-LoRA", 3, Path("/o/KL1-LoRA/seed3"))]
    assert [run.seed for run in cpu_study.training_runs(cpu_study.parse_args([]), Path("/o"))] == [1, 2, 3] * 2
    assert "--seed 3" in " ".join(cpu_study.train_command(runs[1], args))
    with pytest.raises(SystemExit):
        cpu_study.parse_args(["--first_seed", "0"])


def test_the_training_command_of_a_run():
    args = cpu_study.parse_args(["--data_dir", "/d", "--target", "cola", "--corda_skip", "7", "--corda_examples", "3",
                                 "--steps", "4", "--", "--lora_dropout", "0.1"])
    run = cpu_study.TrainingRun("CorDA-LoRA", 2, Path("/o/CorDA-LoRA/seed2"))
    command = cpu_study.train_command(run, args)
    options = dict(zip(command[2::2], command[3::2]))  # after python train.py, --name value pairs
    assert command[1] == "train.py" and options["--train_file"] == "/d/cola/train.jsonl"
    assert (options["--seed"], options["--data_seed"], options["--max_steps"]) == ("2", "2", "4")
    assert (options["--init_lora_weights"], options["--corda_calibration_file"]) == ("corda", "/d/webq/test.jsonl")
    assert (options["--corda_calibration_skip"], options["--corda_calibration_examples"]) == ("7", "3")
    assert command[-2:] == ["--lora_dropout", "0.1"]  # the user's arguments come last, so they win


def test_the_measures_evaluation_command(tmp_path):
    """LoRA's checkpoints and final runs on the curve (every scale), IMSM-LoRA beside them, the threshold on training
    rows, KL on the general tasks; the command parses with evaluate.py's own parser, and a finished report of the
    same command is kept while a changed command runs again."""
    from transformers import HfArgumentParser

    from imsm.evaluation.arguments import EvalArguments, MeasureArguments

    general = tmp_path / "general.jsonl"
    general.write_text('{"text": "a passage"}\n')
    args = cpu_study.parse_args(["--data_dir", "/d", "--seeds", "2", "--checkpoint_steps", "20,40",
                                 "--general_text", str(general), "--target_rows", "100"])
    runs = [cpu_study.TrainingRun(m, s, tmp_path / m / f"seed{s}") for m in ("LoRA", "IMSM-LoRA") for s in (1, 2)]
    out, command = cpu_study.measures_evaluation(runs, args, tmp_path)
    assert out == tmp_path / "eval_measures" and command[0] == "evaluate.py"
    lora = [str(tmp_path / "LoRA" / f"seed{s}") for s in (1, 2)]
    lora_command, imsm_command = cpu_study.train_command(runs[0], args), cpu_study.train_command(runs[2], args)
    at = lora_command.index("--save_strategy")
    assert lora_command[at : at + 4] == ["--save_strategy", "steps", "--save_steps", "20"]  # 40 is its multiple
    assert imsm_command[imsm_command.index("--save_strategy") + 1] == "no"  # IMSM saves no checkpoint
    eval_args, measure_args = HfArgumentParser((EvalArguments, MeasureArguments)).parse_args_into_dataclasses(
        args=command[1:])
    assert eval_args.run_dir == [f"{r}/checkpoint-20" for r in lora] + [f"{r}/checkpoint-40" for r in lora] + lora + \
        [str(tmp_path / "IMSM-LoRA" / f"seed{s}") for s in (1, 2)]
    assert eval_args.labels.split(",") == ["untuned", *["LoRA@step20"] * 2, *["LoRA@step40"] * 2, "LoRA", "LoRA",
                                           "IMSM-LoRA", "IMSM-LoRA"]
    assert (eval_args.adapter_scale, eval_args.tasks, eval_args.score) == ("0.5,1", "mrpc,webq,freebaseqa",
                                                                           "likelihood")
    assert eval_args.full_scale == {"LoRA@step20", "LoRA@step40"}  # checkpoints at full scale, LoRA at each scale
    assert measure_args.names == ["auroc", "general_nll", "kl"] and measure_args.frontier_labels == ("IMSM-LoRA",
                                                                                                      "LoRA")
    assert measure_args.thresholds == {"mrpc": Path("/d/mrpc/train.jsonl")} and measure_args.threshold_examples == 500
    assert (measure_args.measure_max_examples, measure_args.general_examples, measure_args.kl_examples) == \
        (100, 500, 250)

    assert not cpu_study.evaluation_done(out, command)
    out.mkdir()
    (out / "imsm_evaluation.json").write_text(json.dumps({"command": command}))
    (out / "INCOMPLETE").write_text("")
    assert not cpu_study.evaluation_done(out, command)  # interrupted
    (out / "INCOMPLETE").unlink()
    assert cpu_study.evaluation_done(out, command)
    assert not cpu_study.evaluation_done(out, [*command[:-1], "--kl_examples", "9", command[-1]])


def test_the_forgetting_study_measures_every_method_at_full_scale(tmp_path):
    """LoRA at every scale is the curve; every other method one row as it trained (the vanilla LoRA-family ones named
    in --full_scale_labels, the gate and OSF unscaled anyway), each compared with LoRA at full scale; LoRA alone gets
    neither comparison nor frontier."""
    from transformers import HfArgumentParser

    from imsm.evaluation.arguments import EvalArguments, MeasureArguments

    general = tmp_path / "general.jsonl"
    general.write_text('{"text": "a passage"}\n')
    args = cpu_study.parse_args(["--data_dir", "/d", "--general_text", str(general), "--measure_scales", "0.25,0.5,1"])
    methods = cpu_study.study_methods(False, False, False, "LoRA,IMSM-LoRA,KL1-LoRA,MiCA-LoRA,OSF")
    runs = [cpu_study.TrainingRun(m, 1, tmp_path / m / "seed1") for m in methods]
    parser = HfArgumentParser((EvalArguments, MeasureArguments))
    eval_args, measure_args = parser.parse_args_into_dataclasses(
        args=cpu_study.measures_evaluation(runs, args, tmp_path)[1][1:])
    assert eval_args.labels.split(",") == ["untuned", *methods]
    assert eval_args.full_scale == {"KL1-LoRA", "MiCA-LoRA"} and eval_args.adapter_scale == "0.25,0.5,1"
    assert eval_args.compare == "IMSM-LoRA:LoRA@1,KL1-LoRA:LoRA@1,MiCA-LoRA:LoRA@1,OSF:LoRA@1"
    assert measure_args.frontier_methods == ["IMSM-LoRA", "KL1-LoRA", "MiCA-LoRA", "OSF"]
    assert measure_args.frontier_labels[1] == "LoRA"
    eval_args, measure_args = parser.parse_args_into_dataclasses(
        args=cpu_study.measures_evaluation(runs[:1], args, tmp_path)[1][1:])
    assert eval_args.compare is None and measure_args.frontier is None


def _job(tmp_path: Path, name: str, seconds: float, exit_code: int = 0, until_started: str | None = None) -> tuple:
    """A stand-in training run: notes that it started, sleeps ``seconds`` (or, with ``until_started``, until that
    job has started too, then ``seconds`` more), records when it ran and its OMP_NUM_THREADS, and finishes (or
    fails)."""
    run = cpu_study.TrainingRun("LoRA", int(name), tmp_path / "LoRA" / f"seed{name}")
    run.out.parent.mkdir(parents=True, exist_ok=True)
    partner = str(tmp_path / f"started{until_started}") if until_started else ""
    code = (f"import os, time, pathlib; start = time.time(); pathlib.Path({str(tmp_path)!r}, 'started{name}')"
            ".touch()\n"
            f"while {partner!r} and not os.path.exists({partner!r}) and time.time() < start + {HUNG_SECONDS}:\n"
            "    time.sleep(0.01)\n"
            f"time.sleep({seconds}); final = pathlib.Path({str(run.out)!r}) / 'final'; final.mkdir(parents=True)\n"
            f"(final / 'imsm_config.json').write_text('{{}}') if {exit_code} == 0 else None\n"
            f"print(start, time.time(), os.environ['OMP_NUM_THREADS']); raise SystemExit({exit_code})")
    return run, [sys.executable, "-c", code]


def test_jobs_run_side_by_side_but_never_more_than_jobs(tmp_path, monkeypatch):
    """Each stand-in job runs until the next one has started, so two side by side is certain however slow the
    machine, and three at once (jobs ignored) would overlap for the extra 0.3 s each job sleeps."""
    monkeypatch.setattr(cpu_study, "POLL_SECONDS", 0.05)
    trainer = cpu_study.Trainer(jobs=2, threads=3, output_dir=tmp_path)
    runs = []
    for seed in range(1, 5):
        run, command = _job(tmp_path, str(seed), 0.3, until_started=str(seed + 1) if seed < 4 else None)
        trainer.wait_for_a_free_slot()
        trainer.start(run, command)
        runs.append(run)
    trainer.wait_all()
    spans = []
    for run in runs:
        start, end, threads = Path(f"{run.out}.log").read_text().split()
        spans.append((float(start), float(end)))
        assert threads == "3" and run.done
    most_at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most_at_once == 2


def test_a_failed_run_stops_the_study_and_the_runs_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_study, "POLL_SECONDS", 0.05)
    trainer = cpu_study.Trainer(jobs=2, threads=1, output_dir=tmp_path)
    trainer.start(*_job(tmp_path, "1", HUNG_SECONDS))  # runs until stopped
    trainer.start(*_job(tmp_path, "2", 0.1, exit_code=3))
    beside = trainer.running[0][0]
    with pytest.raises(cpu_study.TrainingFailed, match=f"see {tmp_path / 'LoRA' / 'seed2'}.log"):
        trainer.wait_all()
    trainer.stop()
    assert beside.returncode == -signal.SIGTERM  # stopped by the study, not finished (0) after its sleep


def test_progress_shows_the_step_of_every_unfinished_run(tmp_path, caplog):
    (tmp_path / "LoRA").mkdir()
    bar = "\r 12%|#    | 7/60 [00:10<01:20,  1.5s/it]\r 13%|#    | 8/60 [00:12<01:18,  1.5s/it]"
    (tmp_path / "LoRA" / "seed1.log").write_text("loading\n" * 100 + bar)
    (tmp_path / "LoRA" / "seed2.log").write_text(bar)
    (tmp_path / "LoRA" / "seed2" / "final").mkdir(parents=True)
    (tmp_path / "LoRA" / "seed2" / "final" / "imsm_config.json").write_text("{}")  # finished: not shown
    with caplog.at_level("INFO", logger="cpu_study"):
        cpu_study._report_progress(tmp_path)
    assert [r.getMessage() for r in caplog.records] == ["    LoRA/seed1.log: step 8/60 [00:12<01:18 left]"]
