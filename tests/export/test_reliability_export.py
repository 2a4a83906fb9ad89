"""export.py as a careless or unlucky user meets it (issue 30): --overwrite onto the run or another program's folder,
an interrupted checkpoint, kill -9 in the middle, and the exported folder as a Hub user loads it."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, make_llama, make_tokenizer
from test_export import MAX_NEW, generated_ids, left_padded, prompts, run_child, save_method_run

import export as export_script
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.export.folder import export_run
from imsm.loader import load_run
from imsm.run_folder import mark_complete

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test here runs on tiny matrices."""


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A trained run's output folder as train.py leaves it: final/ (COMPLETE) and an output marker."""
    out = tmp_path_factory.mktemp("run") / "run"
    save_method_run(tiny_model_dir, out / "final", "lora", seed=3)
    mark_complete(out / "final", 8)
    (out / "imsm_output.json").write_text('{"written_by": "imsm train.py"}')
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_the_run_or_another_folder(lora_run, tmp_path, capsys):
    """--overwrite onto the run, its final/, an evaluation report, a data folder or a file: refused, nothing
    changes; it replaces an earlier export only."""
    report = tmp_path / "eval"
    report.mkdir()
    (report / "imsm_evaluation.json").write_text("{}")
    (report / "summary.md").write_text("| model |")
    data = tmp_path / "data"
    (data / "mrpc").mkdir(parents=True)
    (data / "mrpc" / "train.jsonl").write_text('{"input": "a", "output": "b"}\n')
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    before = {p: tree(p) for p in (lora_run, report, data)}
    for target in (lora_run, lora_run / "final", report, data, a_file, lora_run.parent):
        assert export_script.main([str(lora_run), str(target), "--overwrite"]) == 2, target
        assert "export.py:" in capsys.readouterr().err
    assert {p: tree(p) for p in (lora_run, report, data)} == before
    assert a_file.read_text() == "mine"
    out = tmp_path / "exported"
    assert export_script.main([str(lora_run), str(out)]) == 0
    (out / "stale.txt").write_text("from an earlier export")
    assert export_script.main([str(lora_run), str(out), "--overwrite"]) == 0
    assert (out / "modeling_imsm.py").is_file() and not (out / "stale.txt").exists()


def test_export_inside_the_run_folder_warns_and_inside_a_checkpoint_is_refused(lora_run, tmp_path, caplog):
    caplog.set_level("WARNING")
    inside = export_run(lora_run, lora_run / "exported")
    assert (inside / "config.json").is_file()
    assert any("inside the run's output folder" in r.getMessage() for r in caplog.records)
    assert export_script.main([str(lora_run), str(lora_run / "final" / "exported")]) == 2
    assert not (lora_run / "final" / "exported").exists()


def test_interrupted_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys):
    """A checkpoint-N without COMPLETE is an interrupted save: every entry point refuses it, export.py too."""
    checkpoint = save_method_run(tiny_model_dir, tmp_path / "run" / "checkpoint-8", "lora")
    assert export_script.main([str(checkpoint), str(tmp_path / "out")]) == 2
    assert "interrupted save" in capsys.readouterr().err and not (tmp_path / "out").exists()
    mark_complete(checkpoint, 8)
    assert export_script.main([str(checkpoint), str(tmp_path / "out")]) == 0


KILLER = """
import os, signal, sys
import export
from imsm.export import folder
when = sys.argv[3]
if when == "staging":  # killed while the model files are written into the staging folder
    real = folder.shutil.copyfile
    def copy_then_die(src, dst, *a, **k):
        real(src, dst, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    folder.shutil.copyfile = copy_then_die
else:  # killed between --overwrite's two renames: the old export moved aside, the new one not yet in place
    import imsm.atomic
    real = imsm.atomic.os.replace
    def replace_then_die(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    imsm.atomic.os.replace = replace_then_die
export.main([sys.argv[1], sys.argv[2], "--overwrite"])
"""


def kill_export(run: Path, out: Path, when: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run), str(out), when], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_kill_9_during_export_leaves_nothing_a_rerun_does_not_repair(lora_run, tmp_path):
    out = tmp_path / "exported"
    export_run(lora_run, out)
    earlier = tree(out)
    kill_export(lora_run, out, "staging")
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name], "the kill left no staging folder"
    assert tree(out) == earlier  # the earlier export is untouched
    kill_export(lora_run, out, "rename")
    assert not out.exists() and (tmp_path / ".exported.old").is_dir()  # the state a kill there leaves
    assert export_script.main([str(lora_run), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert tree(out) == earlier  # the same run exports to the same bytes


def test_folder_mode_and_no_local_paths(lora_run, tmp_path, monkeypatch):
    """The folder reads like any other (755 under umask 022), and its files name the base model by a Hub id or a
    folder name and the data by file name: no path of this machine."""
    old = os.umask(0o022)
    try:
        out = export_run(lora_run, tmp_path / "exported", base_model_id="someone/tiny-llama")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    for name in ("README.md", "config.json", "generation_config.json", "tokenizer_config.json"):
        text = (out / name).read_text()
        assert str(tmp_path.parent.parent) not in text and "/tmp" not in text, name
    card = (out / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card and "| train_file | `train.jsonl` |" in card
    assert json.loads((out / "config.json").read_text())["text_config"]["_name_or_path"] == "someone/tiny-llama"
    plain = export_run(lora_run, tmp_path / "plain")  # a local base model without --base_model_id
    assert "base_model:" not in (plain / "README.md").read_text()


def test_card_harness_line_applies_the_chat_template_for_chat_runs(tmp_path):
    model_dir = tmp_path / "chat_model"
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    make_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from conftest import save_random_run

    chat = export_run(save_random_run(model_dir, tmp_path / "chat", "query_aware", template="chat"), tmp_path / "c")
    raw = export_run(save_random_run(model_dir, tmp_path / "raw", "query_aware"), tmp_path / "r")
    assert "--apply_chat_template" in (chat / "README.md").read_text()
    assert "--apply_chat_template" not in (raw / "README.md").read_text()
    assert "lm_eval --model hf" in (raw / "README.md").read_text()


def run_in_terminal(code: str, cwd: Path, timeout: float = 120.0) -> str:
    """``python -c code`` with a terminal as stdin and stdout (where transformers asks "[y/N]"); its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    out, start = b"", time.monotonic()
    while time.monotonic() - start < timeout and b"[y/N]" not in out:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    if b"[y/N]" in out:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    return out.decode(errors="replace")


def test_the_cards_tokenizer_line_loads_without_a_prompt(lora_run, tmp_path):
    out = export_run(lora_run, tmp_path / "exported")
    line = next(x for x in (out / "README.md").read_text().splitlines() if "AutoTokenizer.from_pretrained(" in x)
    code = f"from transformers import AutoTokenizer\n{line.strip()}\nprint('LOADED', tokenizer.padding_side)"
    output = run_in_terminal(code, tmp_path)
    assert "[y/N]" not in output and "LOADED left" in output, output[-2000:]


def test_generate_without_cache_equals_the_decoder_and_static_cache_is_refused(lora_run, tmp_path):
    """use_cache=False reruns prompt + generated tokens at every step: the query means must still cover the prompt
    only, so tokens equal the project's decoder and every step's logits the cached generate()'s."""
    folder = export_run(lora_run, tmp_path / "exported")
    model, tokenizer, _ = load_run(lora_run, dtype=torch.float32, attn_implementation="sdpa")
    asked = prompts(len(tokenizer), bos=tokenizer.bos_token_id)
    gen_ids, gen_mask = left_padded(asked, tokenizer.pad_token_id)
    common = {"input_ids": gen_ids, "attention_mask": gen_mask, "logits": True}
    spec = {"generate": [{"name": "cached", "kwargs": {"max_new_tokens": MAX_NEW, "do_sample": False}, **common},
                         {"name": "uncached", **common,
                          "kwargs": {"max_new_tokens": MAX_NEW, "do_sample": False, "use_cache": False}},
                         {"name": "static", **common,
                          "kwargs": {"max_new_tokens": 2, "cache_implementation": "static"}}]}
    info, tensors = run_child(folder, tmp_path, **spec)
    ours = generate(model, tokenizer, asked, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=len(asked)))
    eos = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    width = len(gen_ids[0])
    assert generated_ids(tensors["generate.uncached"], width, eos) == [g.token_ids for g in ours]
    torch.testing.assert_close(tensors["logits.uncached"], tensors["logits.cached"], atol=1e-5, rtol=0)
    assert "cache_implementation='static' is not supported" in info["error.static"]
