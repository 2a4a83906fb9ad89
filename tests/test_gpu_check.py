"""The GPU check's CPU mode (``--device cpu --tiny``): every step runs the code paths the GPU run takes, through
scripts/gpu_check.sh, and its report holds what each step must have measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check


def _check(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    empty = tmp_path / "no_wheels"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(empty)}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--device", "cpu", "--tiny", *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return proc, report


def _rows(report: dict, step: str, what: str) -> list[dict]:
    return [r for r in report["steps"][step]["records"] if r["what"] == what]


def test_cpu_mode_runs_every_step_and_reports_what_each_measured(tmp_path):
    proc, report = _check(tmp_path, "--steps", "correctness,training,decoding,export")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no wheels in" in proc.stdout  # gpu_check.sh ran on the installed packages
    assert {s: r["status"] for s, r in report["steps"].items()} == dict.fromkeys(
        ["correctness", "training", "decoding", "export"], "ok")
    assert report["environment"]["torch"] and report["environment"]["transformers"]

    (grads,) = _rows(report, "correctness", "loss and gradients vs float32 on CPU")
    assert grads["ok"] and grads["grad_cosine"] > 0.99
    (gate,) = _rows(report, "correctness", "gate dtype in the forward")
    assert gate["gate_dtype"] == "torch.float32"
    kernels = _rows(report, "correctness", "SDPA kernel")
    assert [k["batch"] for k in kernels] == ["unpadded", "right-padded"]
    assert all(k["kernels"] and all(n.startswith("aten::") for n in k["kernels"]) for k in kernels)

    steps = _rows(report, "training", "train step")
    assert [(r["checkpointing"], r["run"]) for r in steps] == [
        (c, run) for c in (False, True) for run in ("LoRA", "IMSM", "IMSM, cache epoch 2")]
    plan = gpu_check.TINY
    for r in steps:
        assert r["tokens_per_s"] == pytest.approx(plan.batch_size * plan.seq_len / r["step_s"])
        assert r["flops_per_token"] == ("8N" if r["run"] == "IMSM" else "6N")  # the frozen pass is 2N more
        assert r["mfu"] is None  # no peak for a CPU
    for c in (False, True):
        lora, imsm, cached = (r for r in steps if r["checkpointing"] == c)
        assert imsm["time_vs_lora"] == pytest.approx(imsm["step_s"] / lora["step_s"])
        # epoch 2 read every batch from the cache instead of running the frozen pass
        assert cached["cache_hits"] == plan.warmup + plan.steps

    decoding = _rows(report, "decoding", "decoding")
    assert [(r["batch"], r["run"]) for r in decoding] == [
        (b, run) for b in plan.decode_batches for run in ("vanilla PEFT", "IMSM")]
    for vanilla, imsm in zip(decoding[::2], decoding[1::2], strict=True):
        assert imsm["decode_vs_vanilla"] == pytest.approx(imsm["decode_tokens_per_s"] /
                                                          vanilla["decode_tokens_per_s"])

    (export,) = _rows(report, "export", "exported generate() vs ours")
    # float32 on CPU: the exported folder's generate() decodes exactly our greedy tokens
    assert export["identical_rows"] == f"{plan.export_prompts}/{plan.export_prompts}"

    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for step in ("correctness", "training", "decoding", "export"):
        assert f"## {step}: ok" in md


def test_a_step_past_its_budget_is_stopped_and_the_rest_still_reported(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu", "--tiny"])
    tmp_path.mkdir(exist_ok=True)
    status, wall, _ = gpu_check.run_step(args, "training", budget=0.5)  # importing torch alone takes longer
    assert status == "stopped at its time budget" and wall < 30
    assert (tmp_path / "logs" / "training.log").is_file()


def test_a_cut_last_line_is_dropped_and_the_lines_before_it_kept(tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "training.jsonl").write_text('{"what": "model", "a": 1}\n{"what": "train st')
    assert gpu_check.read_records(tmp_path, "training") == [{"what": "model", "a": 1}]


def test_unknown_step_is_refused_by_name():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--steps", "training,warp"])


def test_peak_flops_come_from_the_table_by_device_name():
    args = gpu_check.parse_args(["--out", "x"])
    assert gpu_check.peak_tflops(args, "NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops(args, "NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops(args, "NVIDIA A800-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops(args, "NVIDIA GH200 480GB") == 989.0
    assert gpu_check.peak_tflops(args, "Some New Accelerator") is None
    assert gpu_check.peak_tflops(gpu_check.parse_args(["--out", "x", "--peak_tflops", "100"]), "cpu") == 100.0


def test_n_counts_every_weight_but_the_input_embedding():
    model = make_llama(vocab_size=50, hidden=32, layers=2)  # 4 heads of 8, 2 key-value heads, MLP 64
    d, kv, mlp, vocab = 32, 2 * 8, 64, 50
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * mlp + 2 * d  # q, k and v, o, gate/up/down, two norms
    assert gpu_check.non_embedding_params(model) == 2 * per_layer + d + vocab * d  # final norm, LM head


@pytest.mark.launch
@pytest.mark.slow
def test_cpu_mode_deepspeed_step_runs_zero2_and_zero3_through_train_py(tmp_path):
    proc, report = _check(tmp_path, "--steps", "deepspeed", "--budget_s", "2000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(report, "deepspeed", "train.py under deepspeed")
    assert [r["config"] for r in rows] == ["zero2.json", "zero3.json"]
    assert all(r["rc"] == 0 and r["final_reloads"] for r in rows)
    assert rows[0]["ops_compiled"] == ["deepspeed_shm_comm"]  # gloo's shared-memory op, on CPU only
