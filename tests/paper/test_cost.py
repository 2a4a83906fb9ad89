"""imsm/paper/cost.py against a hand computation: the FLOPs model before any run (IMSM's frozen pass once per
backbone and task through the shared cache, or every epoch without it), a measured rate and a measured utilisation
replacing it as runs finish, the launcher's epochs and the user's overrides, and the shared cache's disk counted
once."""

import json
import math
from dataclasses import replace

import pytest

from imsm.paper.cost import PARAMETERS, describe, estimate, schedule
from imsm.paper.plans import PlanOptions, build_plan

N = PARAMETERS["Llama3-8B"]
PEAK = 312e12
# two training rows at 2.656 characters per token: 531 characters -> 200 tokens, "q" -> 1, "yes" -> 2; plus EOS
ROWS = [{"input": "q" * 531, "output": "x" * 531}, {"input": "q", "output": "yes"}]
TOKENS = (200 + 200 + 1) + (1 + 2 + 1)  # one epoch over both rows
ANSWER_TOKENS = (200 + 1) + (2 + 1)


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data" / "gsm8k"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path / "data"


def _hours(flops: float, utilisation: float) -> float:
    return flops / (PEAK * utilisation) / 3600


def test_before_any_run_the_flops_model_with_one_frozen_pass_per_backbone_and_task(tmp_path, data):
    plan = build_plan("table6", PlanOptions(runs_dir=tmp_path / "runs"))  # 9 IMSM runs, Llama3-8B, GSM8K, 3 epochs
    est = estimate(plan, data, tmp_path / "runs", peak_tflops=312, utilisation=0.3)
    assert est.modelled_runs == 9 and est.measured_runs == 0 and not est.unestimated
    # 9 tuned passes of 6 N per token over 3 epochs, and one frozen pass of 2 N per token over epoch 1
    assert est.gpu_hours == pytest.approx(_hours(9 * 6 * N * TOKENS * 3 + 2 * N * TOKENS, 0.3))
    assert est.shared_caches == 1 and est.cache_bytes == 4096 * (ANSWER_TOKENS + 2) * 2  # once, not 9 times
    lines = describe(est, 9)
    assert any("Llama3-8B 30% assumed" in line and "312 TFLOP/s" in line for line in lines)
    # without the cache every IMSM run pays the frozen pass every epoch, and there is no cache on disk
    off = estimate(plan, data, tmp_path / "runs", ["--frozen_memory_cache", "off"], 312, 0.3)
    assert off.gpu_hours == pytest.approx(_hours(9 * (6 + 2) * N * TOKENS * 3, 0.3))
    assert off.shared_caches == 0


def test_a_vanilla_run_pays_no_frozen_pass_and_epochs_follow_the_overrides(tmp_path, data):
    plan = build_plan("table1", PlanOptions(runs_dir=tmp_path / "runs", methods=("LoRA",)))
    run = next(r for r in plan.runs if r.task == "gsm8k" and r.backbone.name == "Llama3-8B")
    assert schedule(run).epochs == 3 and not schedule(run).frozen_cache  # the launcher's, not its header comment
    assert schedule(run, ["--num_train_epochs", "1"]).epochs == 1
    one = replace(plan, runs=[run])
    assert estimate(one, data, tmp_path / "runs").gpu_hours == pytest.approx(_hours(6 * N * TOKENS * 3, 0.3))
    # --max_steps 5 at the launcher's global batch 16: 80 examples = 40 epochs of the two rows
    assert estimate(one, data, tmp_path / "runs", ["--max_steps", "5"]).gpu_hours == pytest.approx(
        _hours(6 * N * TOKENS * 40, 0.3))


def _finish(run, runtime_s: float, steps: int, world: int, per_device: int, accumulation: int) -> None:
    final = run.output_dir / "final"
    final.mkdir(parents=True)
    (final / "train_stats.json").write_text(json.dumps({
        "train_runtime_s": runtime_s, "optimizer_steps": steps, "world_size": world,
        "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}))
    (final / "run_args.json").write_text(json.dumps({
        "model_name_or_path": run.backbone.model_id, "train_file": f"data/{run.task}/train.jsonl", "peft": "lora",
        "gate": "query_aware"}))
    (final / "COMPLETE").write_text("")
    (final / "adapter_model.safetensors").write_bytes(b"\0" * 1000)


def test_finished_runs_replace_the_model_rate_and_utilisation(tmp_path, data):
    plan = build_plan("table6", PlanOptions(runs_dir=tmp_path / "runs"))
    rank8 = next(run for run in plan.runs if run.label == "IMSM-LoRA")
    _finish(rank8, runtime_s=3600, steps=100, world=8, per_device=2, accumulation=1)  # 1600 examples, 28800 GPU-s
    est = estimate(plan, data, tmp_path / "runs", peak_tflops=312, utilisation=0.3)
    assert est.remaining == 8
    # IMSM-LoRA rank 4 and 16: the same backbone, task and method, at 18 GPU-seconds per example
    assert est.measured_runs == 2
    assert est.gpu_hours_measured == pytest.approx(2 * 18 * 2 * 3 / 3600)
    # the six IMSM-(IA)3 and IMSM-AdaLoRA runs: the model at the utilisation the finished run reached (its 800
    # epochs of tuned pass and one frozen pass over 28800 GPU-seconds); the rank-4 LoRA run claimed the frozen pass
    utilisation = (6 * N * TOKENS * 800 + 2 * N * TOKENS) / (28800 * PEAK)
    assert est.modelled_runs == 6
    assert est.gpu_hours_model == pytest.approx(_hours(6 * 6 * N * TOKENS * 3, utilisation))
    assert est.utilisation["Llama3-8B"] == (pytest.approx(utilisation), "measured")
    measured = sum(p.stat().st_size for p in (rank8.output_dir / "final").iterdir())
    assert est.checkpoint_unmeasured == 6 and est.checkpoint_bytes == 2 * measured  # imsm_lora rank 4 and 16
    lines = describe(est, 9)
    assert any("for 2 runs measured on a finished run" in line for line in lines)
    assert any(f"Llama3-8B {utilisation:.0%} measured" in line for line in lines)


def test_an_overridden_model_without_a_parameter_count_is_not_estimated(tmp_path, data):
    plan = build_plan("table6", PlanOptions(runs_dir=tmp_path / "runs", models={"*": "my/model"}))
    est = estimate(plan, data, tmp_path / "runs")
    assert len(est.unestimated) == 9 and est.gpu_hours == 0 and not math.isnan(est.gpu_hours)
    assert any("not estimated for 9 runs" in line for line in describe(est, 9))
