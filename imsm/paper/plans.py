"""One plan per experiment of the paper: the training runs (through the launchers in ``run_scripts/``, so every
hyperparameter stays where users fork it) and the evaluate.py calls that score them.

A training run is a launcher, the backbone it is pointed at (``MODEL``), its output folder (``OUTPUT_DIR``) and the
few arguments that make the experiment's variant, appended after the launcher's own (``"$@"``: the last one wins):
``--seed``, ``--gate token`` (the paper's "w/o query"), ``--gate equal`` ("w/o gate"), ``--gate_rank 4|16``.
Runs are identified by their output folder, so a run two tables share (Table 1's ChatGLM3 ROPES runs are Table 2's)
is trained once.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from imsm.args import ImsmArguments

ROOT = Path(__file__).resolve().parents[2]
FORGETTING_TASKS = ("webq", "multirc", "mrpc", "freebaseqa")  # the paper's general-knowledge benchmarks
PLAN_NAMES = ("table1", "table2", "table3", "table4", "table5", "table6", "figure3")
DEFAULT_SEEDS = (42, 43, 44)  # a mean and a spread over runs: what comparing with the paper's numbers needs


@dataclass(frozen=True)
class Backbone:
    """A backbone as the paper names it, and the Hugging Face id we run it from."""

    name: str
    model_id: str
    hidden_size: int | None  # for the frozen-memory cache's disk estimate; None when unknown (an override)


PAPER_BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("ChatGLM3-6B", "THUDM/chatglm3-6b", 4096),
    Backbone("Qwen1.5-4B", "Qwen/Qwen1.5-4B", 2560),
    Backbone("Llama3-8B", "meta-llama/Meta-Llama-3-8B", 4096),
    # Table 3: "Due to crashes when using DoRA for fine-tuning Llama3, we opt for Llama3.1-instruct instead."
    Backbone("Llama3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", 4096),
    Backbone("Llama2-7B", "meta-llama/Llama-2-7b-hf", 4096),  # Figure 3, LoRAMoE's own backbone
)}

# evaluate.py label -> launcher prefix (run_scripts/<prefix>_<task>.sh)
LAUNCHERS = {"LoRA": "lora", "IMSM-LoRA": "imsm_lora", "IA3": "ia3", "IMSM-IA3": "imsm_ia3", "AdaLoRA": "adalora",
             "IMSM-AdaLoRA": "imsm_adalora", "DoRA": "dora", "IMSM-DoRA": "imsm_dora", "LoRAMoE": "loramoe"}
CLASSIC = ("LoRA", "IMSM-LoRA", "IA3", "IMSM-IA3", "AdaLoRA", "IMSM-AdaLoRA")  # Table 1's methods

# Where the authors' published code (github.com/ECNU-Text-Computing/IMSM) adapts other modules on a backbone than our
# method tables' defaults for its ``model_type``: (backbone, --peft) -> --target_modules, appended to the run.
# Table 1's Params column is what these give (tests/paper/test_params.py counts them at full shape).
PAPER_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    # train.py and baseline/ia3/ia3.py: qwen -> q_proj, v_proj and no feed-forward module (0.205M; ours k,v,down)
    ("Qwen1.5-4B", "ia3"): ("q_proj", "v_proj"),
    # baseline/dora/dora.py and train.py's dora leave target_modules None: PEFT's default for qwen2 is q_proj, v_proj
    ("Qwen1.5-4B", "dora"): ("q_proj", "v_proj"),
    # ... and for chatglm the fused query_key_value (on the native glm layout: q_proj, k_proj, v_proj with one shared
    # lora_A, imsm/models/chatglm3.py)
    ("ChatGLM3-6B", "dora"): ("query_key_value",),
    # train.py: "llama-2" in the path -> gate_proj, down_proj, up_proj for LoRA (LoRAMoE's modules), for both the
    # vanilla LoRA and IMSM-LoRA of Figure 3
    ("Llama2-7B", "lora"): ("gate_proj", "up_proj", "down_proj"),
}

# Where the paper is silent and the published code departs from our launchers: (--peft, IMSM run?) -> arguments
# appended to the run, so the run trains as the authors' did. What we keep different is listed in
# imsm.paper.compare.CANNOT_MATCH.
PUBLISHED_TRAIN_ARGS: dict[tuple[str, bool], tuple[str, ...]] = {
    # train.py's configs ("Recommended parameters/*.json": lora_dropout 0.1) and baseline/lora/lora.py (default 0.1);
    # the baselines' Trainer JSONs (baseline/lora/lora.json) set no weight decay: the Trainer's 0.0
    ("lora", True): ("--lora_dropout", "0.1"),
    ("lora", False): ("--lora_dropout", "0.1", "--weight_decay", "0.0"),
    # train.py's config and baseline/adalora/adalora.py (default 0.1); baseline/adalora/adalora.json: weight_decay 0.0
    ("adalora", True): ("--lora_dropout", "0.1"),
    ("adalora", False): ("--lora_dropout", "0.1", "--weight_decay", "0.0"),
    # baseline/dora/dora.json: linear schedule, no weight decay (dropout 0.05, the launcher's, in dora.py too)
    ("dora", False): ("--lr_scheduler_type", "linear", "--weight_decay", "0.0"),
    # baseline/ia3/ia3.json: warmup_ratio 0.06 and Adafactor (the launcher's optimizer); the IMSM (IA)3 config
    # ("Recommended parameters/llama3_ia3_GSM8K.json": optimizer adamw, warmup 0.03) trains with AdamW
    ("ia3", False): ("--warmup_steps", "0.06"),
    ("ia3", True): ("--optim", "adamw_torch"),
}
_GATE_DEFAULTS = {f.name: f.default for f in fields(ImsmArguments) if f.name in ("gate_rank", "gate_dropout",
                                                                                 "gate_learning_rate")}


@dataclass(frozen=True)
class Variant:
    """How an experiment's run departs from the launcher: a label and the arguments appended after it."""

    label: str
    launcher_label: str  # the LAUNCHERS key whose script runs it
    suffix: str = ""  # appended to the launcher's name to make the run folder's name
    args: tuple[str, ...] = ()

    @property
    def peft(self) -> str:
        """The launcher's --peft (imsm_ia3 -> ia3)."""
        return LAUNCHERS[self.launcher_label].removeprefix("imsm_")


def method(label: str) -> Variant:
    return Variant(label, label)


def ablation(peft_label: str, gate: str) -> Variant:
    """The paper's "w/o query" (``token``: the gate without the query means) or "w/o gate" (``equal``: 0.5/0.5)."""
    args: tuple[str, ...] = ("--gate", gate)
    if gate == "equal":
        # --gate equal reads no gate option, and an option it would ignore is an error (OPTION_APPLIES_TO): put the
        # launcher's gate options back to their defaults (IMSM-(IA)3's launcher sets --gate_dropout 0.0).
        args += tuple(a for name, value in _GATE_DEFAULTS.items() for a in (f"--{name}", str(value)))
    return Variant(f"IMSM-{gate}-{peft_label}", f"IMSM-{peft_label}", f"-gate_{gate}", args)


def gate_rank(peft_label: str, rank: int) -> Variant:
    if rank == _GATE_DEFAULTS["gate_rank"]:
        return method(f"IMSM-{peft_label}")  # the launcher's own rank: the very run Table 1 trains
    return Variant(f"IMSM-{peft_label}-r{rank}", f"IMSM-{peft_label}", f"-rank{rank}", ("--gate_rank", str(rank)))


@dataclass(frozen=True)
class TrainRun:
    backbone: Backbone
    variant: Variant
    task: str
    seed: int
    output_dir: Path

    @property
    def label(self) -> str:
        return self.variant.label

    @property
    def launcher(self) -> Path:
        return Path("run_scripts") / f"{LAUNCHERS[self.variant.launcher_label]}_{self.task}.sh"

    @property
    def published_args(self) -> tuple[str, ...]:
        """The published code's settings where the paper is silent (``PUBLISHED_TRAIN_ARGS``)."""
        return PUBLISHED_TRAIN_ARGS.get((self.variant.peft, self.label.startswith("IMSM-")), ())

    @property
    def targets(self) -> tuple[str, ...]:
        """The published code's target modules for this backbone and method, where they differ from our defaults."""
        return PAPER_TARGETS.get((self.backbone.name, self.variant.peft), ())

    def command(self, train_args: list[str] | tuple[str, ...] = ()) -> list[str]:
        """``bash run_scripts/X.sh ARGS``: the launcher's arguments, then the published code's settings, the
        variant's, the backbone's target modules, the seed and the user's."""
        targets = ["--target_modules", *self.targets] if self.targets else []
        return ["bash", str(self.launcher), *self.published_args, *self.variant.args, *targets,
                "--seed", str(self.seed), *train_args]

    def max_output_length(self) -> int:
        """The launcher's --max_output_length: the published code decodes a run's test sets up to its training
        answer length (model_inference.py's max_target_length = the run's max_output_length)."""
        found = re.findall(r"--max_output_length (\d+)", (ROOT / self.launcher).read_text())
        if len(found) != 1:
            raise ValueError(f"{self.launcher}: expected one --max_output_length, found {found}")
        return int(found[0])

    def environment(self, data_dir: str | Path) -> dict[str, str]:
        """What the launcher reads from the environment (GPUS, NNODES, ... come from the caller's)."""
        return {"MODEL": self.backbone.model_id, "OUTPUT_DIR": str(self.output_dir), "DATA_DIR": str(data_dir)}

    def shell(self, data_dir: str | Path, train_args: list[str] | tuple[str, ...] = ()) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.environment(data_dir).items())
        return f"{env} {shlex.join(self.command(train_args))}"


@dataclass(frozen=True)
class Evaluation:
    """One evaluate.py call: the untuned backbone and ``runs`` on ``tasks``, compared with the untuned model and in
    the ``compare`` pairs (IMSM - its vanilla PEFT). It fills the cells of one paper layout (``table``) and, where a
    layout shows several evaluations of the same rows side by side (Figure 3's ROPES and GSM8K panels), one
    ``panel`` of it: a report reads each cell from the evaluation it belongs to, never from another table's."""

    name: str
    backbone: Backbone
    runs: tuple[TrainRun, ...]
    tasks: tuple[str, ...]
    target: str
    output_dir: Path
    compare: tuple[tuple[str, str], ...] = ()
    table: str = ""
    panel: str = ""

    @property
    def max_new_tokens(self) -> int:
        """As the published code decodes: every test set up to the runs' training answer length."""
        return max(run.max_output_length() for run in self.runs)

    def command(self, data_dir: str | Path, eval_args: list[str] | tuple[str, ...] = (),
                launcher: tuple[str, ...] = ("python",)) -> list[str]:
        labels = ["untuned"] + [run.label for run in self.runs]
        cmd = [*launcher, "evaluate.py", "--untuned", "--model_name_or_path", self.backbone.model_id]
        for run in self.runs:
            cmd += ["--run_dir", str(run.output_dir)]
        cmd += ["--labels", ",".join(labels), "--tasks", ",".join(self.tasks), "--target", self.target,
                "--data_dir", str(data_dir), "--output_dir", str(self.output_dir),
                # the published code's reading of yes/no answers ('yes' anywhere), to compare with its numbers
                "--yes_no_rule", "anywhere",
                # and its answer length: the runs' --max_output_length on every task (not each task's default)
                "--max_new_tokens", str(self.max_new_tokens)]
        pairs = [f"{a}:{b}" for a, b in self.compare if a in labels and b in labels]
        if pairs:
            cmd += ["--compare", ",".join(pairs)]
        return cmd + list(eval_args)


@dataclass(frozen=True)
class Bench:
    """One ``bench/bench_decode.py`` call (Table 5, inference speed): IMSM's decoding against vanilla PEFT's on the
    same backbone, adapter and prompts, its result written as JSON to ``output_file``."""

    name: str
    backbone: Backbone
    prompts_task: str
    new_tokens: int
    output_file: Path

    def command(self, data_dir: str | Path, python: str = "python") -> list[str]:
        return [python, "bench/bench_decode.py", "--model_name_or_path", self.backbone.model_id,
                "--data_file", str(Path(data_dir) / self.prompts_task / "test.jsonl"),
                "--new_tokens", str(self.new_tokens), "--baseline_new_tokens", str(self.new_tokens),
                "--output_file", str(self.output_file)]


@dataclass
class Plan:
    name: str
    title: str
    tables: tuple[str, ...]  # the paper layouts this plan fills (imsm.paper.numbers.LAYOUTS keys)
    runs: list[TrainRun] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    seeds: tuple[int, ...] = (42,)
    benches: list[Bench] = field(default_factory=list)


@dataclass
class PlanOptions:
    runs_dir: Path = Path("runs/paper")
    eval_dir: Path = Path("eval/paper")
    seeds: tuple[int, ...] = (42,)  # reproduce.py's default is DEFAULT_SEEDS; one seed keeps a plan's runs countable
    models: dict[str, str] = field(default_factory=dict)  # backbone name (or "*" for all) -> model id
    methods: tuple[str, ...] = ()  # keep only these labels (empty: all)


def parse_model_overrides(items: list[str]) -> dict[str, str]:
    """``ID`` (every backbone of the plan) or ``NAME=ID`` (one of the paper's backbones)."""
    out = {}
    for item in items:
        name, sep, model_id = item.partition("=")
        if not sep:
            name, model_id = "*", item
        if name != "*" and name not in PAPER_BACKBONES:
            raise ValueError(f"--model {item!r}: {name!r} is not one of the paper's backbones "
                             f"{sorted(PAPER_BACKBONES)}")
        if not model_id:
            raise ValueError(f"--model {item!r}: no model id")
        out[name] = model_id
    return out


def _hidden_size(model_id: str) -> int | None:
    config = Path(model_id) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("hidden_size") or data.get("d_model")


def _backbone(name: str, options: PlanOptions) -> Backbone:
    paper = PAPER_BACKBONES[name]
    model_id = options.models.get(name) or options.models.get("*")
    if not model_id or model_id == paper.model_id:
        return paper
    return Backbone(name, model_id, _hidden_size(model_id))


def _slug(model_id: str) -> str:
    return Path(model_id).name if Path(model_id).exists() else model_id.strip("/").replace("/", "--")


class _Builder:
    """Collects a plan's runs, one per output folder, in the order they are first asked for."""

    def __init__(self, name: str, title: str, tables: tuple[str, ...], options: PlanOptions):
        self.options = options
        self.plan = Plan(name, title, tables, seeds=options.seeds)
        self._runs: dict[Path, TrainRun] = {}

    def runs(self, backbone: Backbone, variants: list[Variant], task: str) -> list[TrainRun]:
        out = []
        for variant in variants:
            if self.options.methods and variant.label not in self.options.methods:
                continue
            for seed in self.options.seeds:
                folder = (self.options.runs_dir / _slug(backbone.model_id)
                          / f"{LAUNCHERS[variant.launcher_label]}_{task}{variant.suffix}" / f"seed{seed}")
                run = self._runs.setdefault(folder, TrainRun(backbone, variant, task, seed, folder))
                out.append(run)
        return out

    def evaluate(self, name: str, backbone: Backbone, runs: list[TrainRun], tasks: tuple[str, ...],
                 target: str, table: str, panel: str = "") -> None:
        if not runs:
            return
        labels = {run.label for run in runs}
        pairs = tuple((label, vanilla) for label in sorted(labels) if label.startswith("IMSM-")
                      and (vanilla := _vanilla_of(label)) in labels)
        self.plan.evaluations.append(Evaluation(name, backbone, tuple(runs), tasks, target,
                                                self.options.eval_dir / self.plan.name / name, pairs, table, panel))

    def bench(self, backbone: Backbone, task: str, new_tokens: int) -> None:
        name = _slug(backbone.model_id)
        self.plan.benches.append(Bench(name, backbone, task, new_tokens,
                                       self.options.eval_dir / self.plan.name / f"{name}.json"))

    def done(self) -> Plan:
        self.plan.runs = list(self._runs.values())
        return self.plan


def _vanilla_of(label: str) -> str:
    """IMSM-LoRA, IMSM-token-LoRA, IMSM-LoRA-r4 -> LoRA."""
    core = label.removeprefix("IMSM-").removeprefix("token-").removeprefix("equal-")
    return core.rsplit("-r", 1)[0] if core.rsplit("-r", 1)[-1].isdigit() else core


def _table1(b: _Builder) -> None:
    for name in ("ChatGLM3-6B", "Qwen1.5-4B", "Llama3-8B"):
        backbone = _backbone(name, b.options)
        for task in ("mrpc", "cola", "ropes", "gsm8k"):
            runs = b.runs(backbone, [method(label) for label in CLASSIC], task)
            b.evaluate(f"{_slug(backbone.model_id)}/{task}", backbone, runs, (task,), task, "table1")


def _table2(b: _Builder) -> None:
    backbone = _backbone("ChatGLM3-6B", b.options)
    runs = b.runs(backbone, [method(label) for label in CLASSIC], "ropes")
    b.evaluate(_slug(backbone.model_id), backbone, runs, ("ropes", *FORGETTING_TASKS), "ropes", "table2")


def _table3(b: _Builder) -> None:
    for name in ("ChatGLM3-6B", "Qwen1.5-4B", "Llama3.1-8B-Instruct"):
        backbone = _backbone(name, b.options)
        runs = b.runs(backbone, [method("DoRA"), method("IMSM-DoRA")], "gsm8k")
        b.evaluate(_slug(backbone.model_id), backbone, runs, ("gsm8k", *FORGETTING_TASKS), "gsm8k", "table3")


def _table4(b: _Builder) -> None:
    backbone = _backbone("ChatGLM3-6B", b.options)
    variants = [v for peft in ("LoRA", "IA3", "AdaLoRA") for v in (
        method(peft), method(f"IMSM-{peft}"), ablation(peft, "token"), ablation(peft, "equal"))]
    for task in ("mrpc", "cola", "ropes"):
        runs = b.runs(backbone, variants, task)
        b.evaluate(f"{_slug(backbone.model_id)}/{task}", backbone, runs, (task,), task, "table4")
    # Figure 4 (the ablation's forgetting) does not say which target its runs were tuned on; ROPES, as Table 2.
    runs = b.runs(backbone, variants, "ropes")
    b.evaluate(f"{_slug(backbone.model_id)}/forgetting", backbone, runs, ("ropes", *FORGETTING_TASKS), "ropes",
               "figure4")


def _table5(b: _Builder) -> None:
    # Inference speed: IMSM's decoding against vanilla PEFT's on each of Table 1's backbones, GSM8K's test prompts at
    # GSM8K's answer length (its launchers' --max_output_length 512 is the published code's decoding budget; 256
    # forced tokens measure the steady rate without running every row to 512).
    for name in ("ChatGLM3-6B", "Qwen1.5-4B", "Llama3-8B"):
        b.bench(_backbone(name, b.options), "gsm8k", 256)


def _table6(b: _Builder) -> None:
    backbone = _backbone("Llama3-8B", b.options)
    variants = [gate_rank(peft, rank) for peft in ("LoRA", "IA3", "AdaLoRA") for rank in (4, 8, 16)]
    runs = b.runs(backbone, variants, "gsm8k")
    b.evaluate(_slug(backbone.model_id), backbone, runs, ("gsm8k", "webq", "freebaseqa"), "gsm8k", "table6")


def _figure3(b: _Builder) -> None:
    backbone = _backbone("Llama2-7B", b.options)
    for task in ("ropes", "gsm8k"):
        runs = b.runs(backbone, [method("LoRA"), method("LoRAMoE"), method("IMSM-LoRA")], task)
        b.evaluate(f"{_slug(backbone.model_id)}/{task}", backbone, runs, (task, *FORGETTING_TASKS), task, "figure3",
                   f"tuned on {task}")


_BUILDERS = {
    "table1": ("Table 1: three backbones x LoRA/(IA)3/AdaLoRA, vanilla and IMSM, on MRPC, CoLA, ROPES, GSM8K",
               ("table1",), _table1),
    "table2": ("Table 2: ChatGLM3-6B tuned on ROPES, forgetting on WebQ, MultiRC, MRPC, FreebaseQA",
               ("table2",), _table2),
    "table3": ("Table 3: DoRA and IMSM-DoRA tuned on GSM8K, forgetting", ("table3",), _table3),
    "table4": (("Table 4 and Figure 4: the gate ablation on ChatGLM3-6B (w/o query = --gate token, "
               "w/o gate = --gate equal)"), ("table4", "figure4"), _table4),
    "table5": ("Table 5: inference speed, IMSM's decoding against vanilla PEFT's (bench/bench_decode.py)",
               ("table5",), _table5),
    "table6": ("Table 6: gate rank 4/8/16 on Llama3-8B tuned on GSM8K", ("table6",), _table6),
    "figure3": ("Figure 3: LoRA, LoRAMoE and IMSM-LoRA on Llama2-7B tuned on ROPES and GSM8K", ("figure3",),
                _figure3),
}


def build_plan(name: str, options: PlanOptions | None = None) -> Plan:
    """The plan of one experiment (``table1`` ... ``figure3``) or of all of them (``all``)."""
    options = options or PlanOptions()
    if name != "all" and name not in _BUILDERS:
        raise ValueError(f"unknown plan {name!r}: choose one of {[*PLAN_NAMES, 'all']}")
    if not options.seeds:
        raise ValueError("--seeds is empty: give at least one seed")
    names = PLAN_NAMES if name == "all" else (name,)
    title = "Every experiment of the paper" if name == "all" else _BUILDERS[name][0]
    tables = tuple(t for n in names for t in _BUILDERS[n][1])
    builder = _Builder(name, title, tables, options)
    for n in names:
        if name == "all":  # each experiment's evaluations keep their own folder
            builder.plan = replace(builder.plan, name=n)
        _BUILDERS[n][2](builder)
    plan = builder.done()
    plan.name, plan.title, plan.tables = name, title, tables
    if not plan.runs and not plan.benches:
        raise ValueError(f"--methods {','.join(options.methods)} leaves no run in {name}; its labels: "
                         f"{sorted({v for n in names for v in _labels_of(n)})}")
    return plan


def _labels_of(name: str) -> set[str]:
    plan = build_plan(name, PlanOptions())
    return {run.label for run in plan.runs}
