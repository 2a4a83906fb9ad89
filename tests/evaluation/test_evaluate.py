"""evaluate.py end to end on tiny saved runs: files, metrics, templates, every bad input, and a 2-process launch."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, save_random_run
from safetensors.torch import save_file

import evaluate
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.evaluation.decoding.scoring import answer_nll
from imsm.loader import load_run
from imsm.templates import build_template

ROOT = Path(__file__).resolve().parents[2]
TASK_ROWS = {
    "mrpc": [{"input": f"Question: Is {i} odd ? Output:", "output": "yes" if i % 2 else "no"} for i in range(7)],
    "gsm8k": [{"input": f"Question: what is {i} and {i} ? Output:", "output": f"The answer is {2 * i}."}
              for i in range(5)],
    "webq": [{"input": f"Question: what is the big {w} ? Output:", "output": [w, "a " + w]}
             for w in ("cat", "dog", "red", "blue")],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test here runs on tiny matrices."""


@pytest.fixture(scope="module")
def model_dir(chat_model_dir) -> Path:
    return chat_model_dir


_save_run = save_random_run


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {"imsm": _save_run(model_dir, base / "imsm", "query_aware"),
            "lora": _save_run(model_dir, base / "lora", "none", seed=1),
            "imsm_chat": _save_run(model_dir, base / "imsm_chat", "query_aware", template="chat", seed=2),
            "imsm_s2": _save_run(model_dir, base / "imsm_s2", "query_aware", seed=3),
            "lora_s2": _save_run(model_dir, base / "lora_s2", "none", seed=4),
            "equal": _save_run(model_dir, base / "equal", "equal", seed=5)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("data")
    for task, rows in TASK_ROWS.items():
        (base / task).mkdir()
        (base / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base


def _argv(model_dir, data_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_new_tokens", "4", "--batch_size", "3", *extra]


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_end_to_end_files_metrics_and_report(model_dir, data_dir, runs, tmp_path):
    out = tmp_path / "eval"
    paths = evaluate.main(_argv(model_dir, data_dir, out, "--run", str(runs["imsm"]), "--run", str(runs["lora"]),
                                "--untuned", "--tasks", "mrpc,gsm8k,webq", "--target", "gsm8k"))
    assert set(paths) == {"summary_md", "summary_csv", "forgetting_md", "forgetting_png", "comparisons_md",
                          "stats_json", "stats_csv", "tradeoff_png", "tradeoff_csv"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    for label in ("untuned", "IMSM-LoRA", "LoRA"):
        result = json.loads((out / label / "results.json").read_text())
        assert result["label"] == label and set(result["metrics"]) == {"mrpc", "gsm8k", "webq"}
        for task, rows in TASK_ROWS.items():
            preds = _predictions(out / label / task / "predictions.jsonl")
            assert [p["input"] for p in preds] == [r["input"] for r in rows]
            assert [p["gold"] for p in preds] == [r["output"] for r in rows]
            assert all(("gate_mean" in p) == (label == "IMSM-LoRA") for p in preds)
            assert all(1 <= p["num_tokens"] <= 4 for p in preds)
            metrics = json.loads((out / label / task / "metrics.json").read_text())
            assert metrics["template"] == "raw" and metrics["label"] == label and metrics["task"] == task
            assert metrics["metrics"]["n"] == len(rows) and metrics["metrics"] == result["metrics"][task]
            assert (metrics["gate_mean"] is not None) == (label == "IMSM-LoRA")
    assert set(json.loads((out / "IMSM-LoRA" / "mrpc" / "metrics.json").read_text())["metrics"]) == \
        {"accuracy", "yes_rate", "invalid_rate", "f1", "n", "answer_nll", "answer_nll_example_mean"}
    assert not (out / "INCOMPLETE").exists()
    assert "IMSM-LoRA" in (out / "summary.md").read_text()
    assert "| GSM8K |" in (out / "forgetting.md").read_text().splitlines()[2]
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_predictions_are_the_runs_own_decoding(model_dir, data_dir, runs, tmp_path):
    """Prompts are encoded with the recorded template and truncated as in training, then decoded greedily."""
    out = tmp_path / "eval"
    evaluate.main(_argv(model_dir, data_dir, out, "--run", str(runs["imsm_chat"]), "--tasks", "mrpc",
                        "--labels", "chat-run", "--max_input_length", "6"))
    model, tok, _ = load_run(runs["imsm_chat"])
    template = build_template("chat", tok)
    # "<s> user ... ? Output: </s> <s> assistant": 6 tokens keep the 5 of the template and the user's last word
    prompts = [(ids := template.encode_prompt(r["input"]))[:2] + ids[-4:] for r in TASK_ROWS["mrpc"]]
    assert tok.convert_ids_to_tokens(prompts[0]) == ["<s>", "<unk>", "Output:", "</s>", "<s>", "<unk>"]
    expected = generate(model, tok, prompts, DecodingConfig(max_new_tokens=4))
    preds = _predictions(out / "chat-run" / "mrpc" / "predictions.jsonl")
    assert [p["prediction"] for p in preds] == [g.text for g in expected]
    assert [p["gate_mean"] for p in preds] == pytest.approx([g.gate_mean for g in expected], abs=1e-6)
    assert json.loads((out / "chat-run" / "mrpc" / "metrics.json").read_text())["template"] == "chat"


@pytest.mark.parametrize("score", ["decode", "likelihood"])
def test_cut_prompts_are_counted_in_a_warning(model_dir, data_dir, tmp_path, caplog, score):
    with caplog.at_level(logging.WARNING):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "eval", "--tasks", "mrpc", "--max_input_length", "4",
                            "--untuned", "--score", score))
    cut = [r.getMessage() for r in caplog.records if "--max_input_length cut" in r.getMessage()]
    # "<s> Question: Is N odd ? Output:" is 7 tokens: 3 of each prompt's 6 words are cut
    n = len(TASK_ROWS["mrpc"])
    assert len(cut) == 1 and "mrpc" in cut[0] and f"{n} of {n} prompts ({3 * n} tokens" in cut[0]


def test_a_max_input_length_that_leaves_no_prompt_is_refused(model_dir, data_dir, runs, tmp_path):
    with pytest.raises(ValueError, match="--max_input_length 5: the chat template's own tokens take 5 tokens"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "eval", "--run", str(runs["imsm_chat"]), "--tasks",
                            "mrpc", "--max_input_length", "5"))


def test_recorded_template_is_used_and_an_override_warns(model_dir, data_dir, runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "a", "--run", str(runs["imsm_chat"]), "--tasks", "mrpc"))
    assert not [r for r in caplog.records if "prompt template" in r.getMessage()]
    assert json.loads((tmp_path / "a" / "IMSM-LoRA" / "mrpc" / "metrics.json").read_text())["template"] == "chat"

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "b", "--run", str(runs["imsm_chat"]), "--tasks", "mrpc",
                            "--prompt_template", "raw"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "prompt template" in r.getMessage()]
    assert len(warnings) == 1 and "'chat'" in warnings[0].getMessage() and "'raw'" in warnings[0].getMessage()
    assert json.loads((tmp_path / "b" / "IMSM-LoRA" / "mrpc" / "metrics.json").read_text())["template"] == "raw"
    raw = _predictions(tmp_path / "b" / "IMSM-LoRA" / "mrpc" / "predictions.jsonl")
    chat = _predictions(tmp_path / "a" / "IMSM-LoRA" / "mrpc" / "predictions.jsonl")
    assert [p["prediction"] for p in raw] != [p["prediction"] for p in chat]


def _broken_runs(runs, base: Path) -> dict[str, tuple[Path, str]]:
    """Damaged copies of the IMSM run, each with the file its error must name."""
    out = {}
    for name, damage in (("no_adapter", "adapter_model.safetensors"), ("no_gate", "gate.safetensors"),
                         ("bad_gate", "gate.safetensors"), ("cut_adapter", "adapter_model.safetensors"),
                         ("cut_gate", "gate.safetensors"), ("garbled_adapter", "adapter_model.safetensors"),
                         ("newer_format", "imsm_config.json")):
        run = base / name
        shutil.copytree(runs["imsm"], run)
        path = run / damage
        if name == "bad_gate":  # rank 3 where the settings say 4
            save_file({"w_a.weight": torch.zeros(3, 4 * 32), "w_b.weight": torch.zeros(32, 3)}, str(path))
        elif name.startswith("cut_"):  # a copy or save killed part-way
            path.write_bytes(path.read_bytes()[:-100])
        elif name == "garbled_adapter":
            path.write_bytes(path.read_bytes()[:8] + b"\x00garbage" + path.read_bytes()[18:])
        elif name == "newer_format":
            path.write_text(json.dumps(json.loads(path.read_text()) | {"format_version": 99}))
        else:
            path.unlink()
        out[name] = (run, damage)
    return out


def test_bad_inputs_fail_before_anything_is_written(model_dir, data_dir, runs, tmp_path):
    bad_data = tmp_path / "bad_data"
    shutil.copytree(data_dir, bad_data)
    bad_file = bad_data / "webq" / "test.jsonl"
    bad_file.write_text(bad_file.read_text() + json.dumps({"prompt": "no input here", "output": "x"}) + "\n")
    bad_gold = bad_data / "mrpc" / "test.jsonl"
    bad_gold.write_text(bad_gold.read_text() + json.dumps({"input": "Is it ?", "output": "maybe"}) + "\n")
    good = ["--run", str(runs["imsm"]), "--untuned"]
    cases = [(_argv(model_dir, data_dir, tmp_path / "o1", *good, "--tasks", "mrpc,squad"), ValueError, "squad"),
             (_argv(model_dir, bad_data, tmp_path / "o2", *good, "--tasks", "webq,mrpc"), ValueError,
              f"{bad_file}:5: missing field 'input'"),
             (_argv(model_dir, bad_data, tmp_path / "o4", *good, "--tasks", "gsm8k,mrpc"), ValueError,
              f"{bad_gold}: a yes/no task needs a single gold 'yes' or 'no', got 'maybe'"),
             (_argv(model_dir, data_dir, tmp_path / "o3", *good, "--tasks", "mrpc", "--task_file",
                    f"mrpc={tmp_path / 'absent.jsonl'}"), FileNotFoundError, str(tmp_path / "absent.jsonl"))]
    for i, (name, (run, damaged)) in enumerate(_broken_runs(runs, tmp_path).items()):
        error = FileNotFoundError if name.startswith("no_") else ValueError
        # the broken run comes after a good one: nothing may be decoded or written for the good one either
        message = f"{run}: incomplete run folder, {damaged}" if name.startswith("no_") else str(run / damaged)
        cases.append((_argv(model_dir, data_dir, tmp_path / f"r{i}", *good, "--run", str(run), "--tasks", "mrpc"),
                      error, message))
    for argv, error, message in cases:
        with pytest.raises(error) as info:
            evaluate.main(argv)
        assert message in str(info.value)
        out = Path(argv[argv.index("--output_dir") + 1])
        assert _files(out) == [], f"{argv}: files written before the error"


def test_argument_errors(model_dir, data_dir, runs, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "o", "--tasks", "mrpc"))
    with pytest.raises(ValueError, match="--labels has 1 names for 2 models"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "o", "--run", str(runs["imsm"]), "--untuned",
                            "--tasks", "mrpc", "--labels", "x"))
    with pytest.raises(ValueError, match="not seeds of one method.*prompt template 'raw'"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "o", "--run", str(runs["imsm"]), "--run",
                            str(runs["imsm_chat"]), "--tasks", "mrpc"))
    with pytest.raises(ValueError, match="at least 1"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "o", "--untuned", "--tasks", "mrpc", "--max_new_tokens",
                            "0"))
    assert _files(tmp_path / "o") == []


def test_the_published_yes_no_rule_is_an_option_recorded_in_the_report(model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(_argv(model_dir, data_dir, out, "--untuned", "--tasks", "mrpc,gsm8k", "--yes_no_rule", "anywhere"))
    preds = _predictions(out / "untuned" / "mrpc" / "predictions.jsonl")
    gold = [r["output"] for r in TASK_ROWS["mrpc"]]
    read = ["yes" if "yes" in p["prediction"].lower() else "no" for p in preds]
    metrics = json.loads((out / "untuned" / "mrpc" / "metrics.json").read_text())
    assert metrics["yes_no_rule"] == "anywhere" and metrics["metrics"]["invalid_rate"] == 0
    assert metrics["metrics"]["accuracy"] == pytest.approx(sum(r == g for r, g in zip(read, gold)) / len(gold))
    assert "yes_no_rule" not in json.loads((out / "untuned" / "gsm8k" / "metrics.json").read_text())
    assert "--yes_no_rule anywhere" in (out / "summary.md").read_text()
    with pytest.raises(ValueError, match="--yes_no_rule 'last': choose one of"):
        evaluate.main(_argv(model_dir, data_dir, tmp_path / "o", "--untuned", "--yes_no_rule", "last"))


@pytest.mark.launch
def test_two_processes_give_the_single_process_predictions(model_dir, data_dir, runs, tmp_path):
    # --run_dir, not its alias --run: torchrun's parser would take --run for its own --run-path
    args = _argv(model_dir, data_dir, tmp_path / "multi", "--run_dir", str(runs["imsm"]), "--untuned",
                 "--tasks", "mrpc,webq")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluate.main(_argv(model_dir, data_dir, tmp_path / "single", "--run", str(runs["imsm"]), "--untuned",
                        "--tasks", "mrpc,webq"))
    for label in ("untuned", "IMSM-LoRA"):
        for task in ("mrpc", "webq"):
            multi = _predictions(tmp_path / "multi" / label / task / "predictions.jsonl")
            single = _predictions(tmp_path / "single" / label / task / "predictions.jsonl")
            assert [p["input"] for p in multi] == [r["input"] for r in TASK_ROWS[task]]
            assert [p["prediction"] for p in multi] == [p["prediction"] for p in single]
            assert [p["answer_nll"] for p in multi] == pytest.approx([p["answer_nll"] for p in single], abs=1e-5)
            assert [p.get("gate_mean") for p in multi] == pytest.approx([p.get("gate_mean") for p in single],
                                                                        abs=1e-5)
    assert (tmp_path / "multi" / "summary.md").read_text() == (tmp_path / "single" / "summary.md").read_text()


@pytest.mark.parametrize("template", ["raw", "chat"])
def test_training_and_evaluation_feed_the_same_prompt_ids(model_dir, data_dir, tmp_path, monkeypatch, template):
    """The query of a training example is token for token what evaluate.py feeds the model for the same row."""
    import imsm.evaluation.decoding.runner
    import train

    rows = TASK_ROWS["mrpc"]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = train.main(["--model_name_or_path", str(model_dir), "--train_file", str(train_file),
                          "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_strategy", "no",
                          "--report_to", "none", "--prompt_template", template, "--max_input_length", "12"])
    trained = [ex["input_ids"][: ex["query_length"]] for ex in trainer.train_dataset.examples]
    seen = []
    real_generate = imsm.evaluation.decoding.runner.generate

    def spy(model, tokenizer, prompts, config, answers=None):
        seen.extend(list(p) for p in prompts)
        return real_generate(model, tokenizer, prompts, config, answers)

    monkeypatch.setattr(imsm.evaluation.decoding.runner, "generate", spy)
    evaluate.main(_argv(model_dir, data_dir, tmp_path / "eval", "--run", str(tmp_path / "run"), "--tasks", "mrpc",
                        "--max_input_length", "12"))
    assert seen == trained
    tokenizer = make_tokenizer()
    bos = tokenizer.bos_token_id
    assert all(ids[0] == bos and ids[1] != bos for ids in seen)  # one BOS, kept through the left cut
    assert all(len(ids) <= 12 for ids in seen)


def test_seeds_share_a_label_and_every_comparison_is_paired(model_dir, data_dir, runs, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(_argv(model_dir, data_dir, out, "--untuned", "--run", str(runs["lora"]), str(runs["lora_s2"]),
                        str(runs["imsm"]), str(runs["imsm_s2"]), "--labels", "untuned,LoRA,LoRA,IMSM,IMSM",
                        "--tasks", "mrpc,webq", "--target", "mrpc", "--compare", "IMSM:LoRA",
                        "--bootstrap_resamples", "1000"))
    stats = json.loads((out / "stats.json").read_text())
    for label, members in (("LoRA", ("lora", "lora_s2")), ("IMSM", ("imsm", "imsm_s2"))):
        assert stats["labels"][label]["runs"] == [str(runs[m]) for m in members]
        for k in (1, 2):
            per_run = json.loads((out / label / f"run{k}" / "results.json").read_text())["metrics"]
            for task in ("mrpc", "webq"):
                for metric in ("answer_nll", "accuracy" if task == "mrpc" else "contain"):
                    assert stats["labels"][label]["tasks"][task][metric]["per_run"][k - 1] == per_run[task][metric]
        # the per-example answer NLL is the run's own teacher-forced score of the gold (best of WebQ's golds)
        model, tokenizer, _ = load_run(runs[members[0]])
        expected = answer_nll(model, build_template("raw", tokenizer), TASK_ROWS["webq"], 1024)
        preds = _predictions(out / label / "run1" / "webq" / "predictions.jsonl")
        assert [p["answer_nll"] for p in preds] == pytest.approx([e.nll_mean for e in expected], abs=1e-5)
        assert [p["answer_tokens"] for p in preds] == [e.num_tokens for e in expected]
    pairs = {(c["a"], c["b"], c["measure"], c["column"]): c for c in stats["comparisons"]}
    imsm_vs_lora = pairs[("IMSM", "LoRA", "answer_nll", "webq")]
    mean = {lab: sum(stats["labels"][lab]["tasks"]["webq"]["answer_nll"]["per_run"]) / 2 for lab in ("IMSM", "LoRA")}
    assert imsm_vs_lora["delta"] == pytest.approx(mean["IMSM"] - mean["LoRA"])
    assert imsm_vs_lora["examples_low"] <= imsm_vs_lora["delta"] <= imsm_vs_lora["examples_high"]
    assert imsm_vs_lora["method_low"] <= imsm_vs_lora["delta"] <= imsm_vs_lora["method_high"]
    two_seeds = pairs[("IMSM", "LoRA", "primary", "mrpc")]  # two seeds each: tested at the method level, no vote
    assert two_seeds["test"] == "method-level t" and two_seeds["p"] is not None and two_seeds["method_low"] is not None
    assert ("LoRA", "untuned", "answer_nll", "general") in pairs
    summary = (out / "summary.md").read_text()
    assert "| LoRA | raw | 2 |" in summary and "±" in summary
    assert "IMSM − LoRA" in (out / "comparisons.md").read_text()
    assert (out / "tradeoff.png").is_file() and (out / "tradeoff.csv").read_text().count("\n") == 1 + 2 * 2 * 3


def test_likelihood_only_scores_without_decoding(model_dir, data_dir, runs, tmp_path, monkeypatch):
    import imsm.evaluation.decoding.runner

    monkeypatch.setattr(imsm.evaluation.decoding.runner, "generate",
                        lambda *a, **k: pytest.fail("decoded with --score likelihood"))
    out = tmp_path / "eval"
    lengths = tmp_path / "webq.jsonl"  # one-word and six-word answers: a pooled mean differs from a mean of means
    lengths.write_text("".join(json.dumps({"input": f"Question: what is {i} ? Output:", "output": [answer]}) + "\n"
                               for i, answer in enumerate(["cat", "is a cat , and a dog", "dog", "red"])))
    evaluate.main(_argv(model_dir, data_dir, out, "--run", str(runs["imsm"]), "--untuned", "--tasks",
                        "mrpc,gsm8k,webq", "--task_file", f"webq={lengths}", "--score", "likelihood"))
    webq = _predictions(out / "IMSM-LoRA" / "webq" / "predictions.jsonl")
    pooled = json.loads((out / "IMSM-LoRA" / "webq" / "metrics.json").read_text())["metrics"]
    # nats per answer token pooled over the task, not the mean of the examples' means
    assert pooled["answer_nll"] == pytest.approx(sum(p["answer_nll_sum"] for p in webq)
                                                 / sum(p["answer_tokens"] for p in webq))
    assert pooled["answer_nll_example_mean"] == pytest.approx(sum(p["answer_nll"] for p in webq) / len(webq))
    assert len({p["answer_tokens"] for p in webq}) > 1
    assert pooled["answer_nll"] != pytest.approx(pooled["answer_nll_example_mean"])
    preds = _predictions(out / "IMSM-LoRA" / "gsm8k" / "predictions.jsonl")
    assert all("prediction" not in p and p["answer_nll"] > 0 and "answer_gate_mean" in p for p in preds)
    metrics = json.loads((out / "IMSM-LoRA" / "gsm8k" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"answer_nll", "answer_nll_example_mean", "n"}
    assert "NLL" in (out / "summary.md").read_text() and "answer NLL" in (out / "forgetting.md").read_text()


def test_bad_groups_and_report_folders(model_dir, data_dir, runs, tmp_path):
    cases = [(("--run", str(runs["imsm"]), str(runs["equal"]), "--labels", "A,A"), "method"),
             (("--untuned", "--run", str(runs["imsm"]), "--labels", "A,A"), "untuned model and to runs"),
             (("--run", str(runs["imsm"]), "--labels", "summary.md"), "folder name"),
             (("--run", str(runs["imsm"]), "--compare", "IMSM-LoRA:LoRA"), "'LoRA', which is not a label"),
             (("--untuned", "--max_examples", "0"), "at least 1"),
             (("--untuned", "--score", "nll"), "--score"),
             (("--untuned", "--compare", "A"), "LABEL_A:LABEL_B")]
    for extra, message in cases:
        out = tmp_path / "o"
        with pytest.raises(ValueError, match=message):
            evaluate.main(_argv(model_dir, data_dir, out, "--tasks", "mrpc", *extra))
        assert _files(out) == []
    # a folder holding an earlier evaluation is refused, and replaced whole with --overwrite
    out = tmp_path / "eval"
    evaluate.main(_argv(model_dir, data_dir, out, "--run", str(runs["imsm"]), "--tasks", "mrpc,webq"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.main(_argv(model_dir, data_dir, out, "--untuned", "--tasks", "mrpc"))
    (out / ".summary.md.123.tmp").write_text("left by a killed evaluation")
    evaluate.main(_argv(model_dir, data_dir, out, "--untuned", "--tasks", "mrpc", "--overwrite"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["untuned"]
    assert not (out / "INCOMPLETE").exists() and not list(out.glob(".*"))
    assert "IMSM" not in (out / "summary.md").read_text()


def test_a_failed_report_keeps_the_predictions_and_is_rebuilt_without_decoding(model_dir, data_dir, runs, tmp_path,
                                                                               monkeypatch, caplog):
    argv = ("--untuned", "--run", str(runs["lora"]), str(runs["lora_s2"]), str(runs["imsm"]), "--labels",
            "untuned,LoRA,LoRA,IMSM", "--tasks", "mrpc,webq", "--target", "mrpc", "--compare", "IMSM:LoRA",
            "--bootstrap_resamples", "1000", "--bootstrap_seed", "3")
    whole = tmp_path / "whole"
    evaluate.main(_argv(model_dir, data_dir, whole, *argv))

    def crash(*args, **kwargs):
        raise OverflowError("the report broke")

    out = tmp_path / "crashed"
    monkeypatch.setattr(evaluate, "write_report", crash)
    with pytest.raises(OverflowError), caplog.at_level(logging.ERROR):
        evaluate.main(_argv(model_dir, data_dir, out, *argv))
    assert f"--report_only {out}" in caplog.text
    assert (out / "INCOMPLETE").exists() and not (out / "stats.json").exists()
    assert (out / "LoRA" / "run2" / "webq" / "predictions.jsonl").is_file()
    monkeypatch.undo()

    import imsm.evaluation.decoding.runner

    monkeypatch.setattr(imsm.evaluation.decoding.runner, "generate", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(imsm.evaluation.decoding.runner, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    paths = evaluate.main(["--report_only", str(out)])
    assert not (out / "INCOMPLETE").exists()
    for name in ("summary.md", "forgetting.md", "comparisons.md", "stats.csv", "tradeoff.csv"):
        assert (out / name).read_text() == (whole / name).read_text(), name
    assert json.loads(paths["stats_json"].read_text()) == json.loads((whole / "stats.json").read_text())
    # other pairs and bootstrap settings without decoding; a bad folder or an option of decoding is refused
    evaluate.main(["--report_only", str(out), "--compare", "LoRA:IMSM", "--bootstrap_seed", "4"])
    assert "LoRA − IMSM" in (out / "comparisons.md").read_text()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate.main(["--report_only", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="takes only --target, --compare.*not --batch_size 4"):
        evaluate.main(["--report_only", str(out), "--batch_size", "4"])
    # a folder written before report_inputs.json existed: rows in folder order, untuned first, the target given
    (whole / "report_inputs.json").unlink()
    with pytest.raises(ValueError, match="give --target"):
        evaluate.main(["--report_only", str(whole)])
    evaluate.main(["--report_only", str(whole), "--target", "mrpc", "--bootstrap_seed", "3"])
    assert list(json.loads((whole / "stats.json").read_text())["labels"]) == ["untuned", "IMSM", "LoRA"]


def test_calibration_notes_group_runs_that_skip_the_same_rows():
    from imsm.evaluation.planning import calibration_notes

    files = {"webq": Path("data/webq/test.jsonl"), "mrpc": Path("data/mrpc/test.jsonl")}
    skips = {"webq": {"seed1": [3, 4, 5, 9], "seed2": [3, 4, 5, 9], "seed3": [0]}, "mrpc": {"seed1": [7]}}
    assert calibration_notes(skips, files) == [
        "webq: rows 3-5, 9 of data/webq/test.jsonl not scored for any model (CorDA calibration rows of seed1, seed2)",
        "webq: rows 0 of data/webq/test.jsonl not scored for any model (CorDA calibration rows of seed3)",
        "mrpc: rows 7 of data/mrpc/test.jsonl not scored for any model (CorDA calibration rows of seed1)",
    ]
