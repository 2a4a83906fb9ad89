"""scripts/estimate_time.py, the up-front estimate of the CPU demo: it said nothing for 27 minutes on a loaded
machine (issue 30). Every phase now prints a numbered progress line to stderr before it starts."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import load_script

from imsm.loader import load_backbone


class Recorder:
    """The estimate's lines on stderr (not the libraries' own progress bars) as events, in order with the work done
    between them."""

    def __init__(self, events: list) -> None:
        self.events = events

    def write(self, text: str) -> int:
        self.events += [("line", line) for line in text.splitlines() if line.startswith("estimate")]
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(("decoded", "trained", "phases"), [("1", False, 5), ("0", False, 3), ("0", True, 1)])
def test_every_phase_of_the_estimate_shows_progress_before_it_runs(decoded, trained, phases, tiny_model_dir, tmp_path,
                                                                   monkeypatch, capsys, single_thread):
    """Numbered progress before each phase; a study without the decoded evaluation (EVALUATE=measures) spends no time
    decoding for it, and a resumed study whose runs are all trained times no training step."""
    estimate = load_script("estimate_time")
    rows = [{"input": f"Question: Is {i} odd ? Output:", "output": "yes" if i % 2 else "no"} for i in range(10)]
    for split in ("train", "test"):
        (tmp_path / "mrpc").mkdir(exist_ok=True)
        (tmp_path / "mrpc" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events: list = []

    def tiny_backbone(_name):
        events.append(("work", "load"))
        return load_backbone(str(tiny_model_dir), attn_implementation="sdpa")

    monkeypatch.setattr(estimate, "load_backbone", tiny_backbone)
    real_steps = estimate._time_steps
    monkeypatch.setattr(estimate, "_time_steps", lambda *a: (events.append(("work", "steps")), real_steps(*a))[1])
    monkeypatch.setattr(sys, "stderr", Recorder(events))
    monkeypatch.setattr(sys, "argv", ["estimate_time.py", "--data_dir", str(tmp_path), "--target", "mrpc", "--tasks",
                                      "mrpc", "--template", "raw", "--runs", "LoRA:1", "IMSM-LoRA:1", "--steps", "2",
                                      "--batch", "2", "--eval_examples", "4", "--score", "decode",
                                      "--decoded", decoded, "--skip_done_in", str(tmp_path / "study")])
    for run in ("LoRA", "IMSM-LoRA"):
        if trained:
            (tmp_path / "study" / run / "seed1" / "final").mkdir(parents=True)
            (tmp_path / "study" / run / "seed1" / "final" / "imsm_config.json").write_text("{}")
    estimate.main()
    lines = [text for kind, text in events if kind == "line"]
    numbered = [re.match(r"estimate \[(\d+)/(\d+)\] (.+) \(\d+ s so far\)$", line) for line in lines]
    assert all(numbered), lines
    assert [int(m[1]) for m in numbered] == list(range(1, len(lines) + 1))
    assert {int(m[2]) for m in numbered} == {len(lines)} == {phases}  # load, 2 x training steps, 2 x decoding (1 task)
    assert any("timing evaluation" in line for line in lines) == (decoded == "1")
    kinds = [kind if kind == "work" else text.split("] ")[1].split(" (")[0] for kind, text in events]
    assert kinds[:2] == ["loading the model", "work"]  # announced before it runs
    assert ("timing training steps: LoRA, batch 2" in kinds) != trained
    if not trained:
        assert kinds.index("timing training steps: LoRA, batch 2") < kinds.index("work", 2)
    out = capsys.readouterr().out
    assert "total: ~" in out and ("all 2 run(s) done before" in out) == trained
