"""Shared fixtures: a tiny random Llama and a word-level tokenizer built in-process, saved as a model folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py imported as module ``name`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


WORDS = (
    "is", "odd", "even", "yes", "no", "the", "answer", "number", "what", "a", "of", "and", "to", "Output:",
    "Question:", "Is", "?", ".", ",", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "cat", "dog", "red", "blue",
    "big", "small", "true", "false",
)

# A minimal chat template over the word-level vocabulary: "<s> role content </s>" per turn.
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def imsm_args(**kw):
    """``ImsmArguments`` (with its method's options) from one set of tiny hyperparameters for any method: the options
    that the chosen --peft does not read, and the gate options the chosen --gate does not read, are left out (both
    are refused)."""
    from imsm.args import GATE_OPTIONS, ImsmArguments
    from imsm.method.adapters import get_method

    peft, gate = kw.get("peft", "lora"), kw.get("gate", "query_aware")
    common = {f.name for f in dataclasses.fields(ImsmArguments) if f.init}
    own = get_method(peft).option_names()

    def read(option: str) -> bool:
        if option in GATE_OPTIONS:
            return gate in GATE_OPTIONS[option]
        return option in common or option in own

    return ImsmArguments.create(**{k: v for k, v in kw.items() if read(k)})


def make_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def pytest_collection_modifyitems(config, items):
    """A process launch or a real-model run is also ``slow``; a ``gpu`` test is skipped, with the reason, on CPU."""
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("launch") or item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matrices gain nothing from threads, and spinning OpenMP threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder usable as --model_name_or_path."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"input": f"Question: Is {i % 10} odd ? Output:", "output": "yes" if i % 2 else "no"} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama whose tokenizer has ``CHAT_TEMPLATE``, usable as --model_name_or_path."""
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    make_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_run(model_dir, out: Path, gate: str, template: str = "raw", seed: int = 0,
                    system_prompt: str | None = None) -> Path:
    """A run folder as train.py writes it (LoRA r=4, gate rank 4), with random non-zero adapter and gate weights."""
    from imsm.args import DataArguments
    from imsm.loader import build_imsm_model, load_backbone, make_run_config, save_run_files

    backbone, _, path = load_backbone(str(model_dir), attn_implementation="sdpa")
    run_args = imsm_args(gate=gate, gate_dropout=0.0, lora_dropout=0.0, lora_r=4, gate_rank=4)
    model = build_imsm_model(backbone, run_args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    data_args = DataArguments(prompt_template=template, system_prompt=system_prompt)
    config = make_run_config(run_args, data_args, path, backbone.config.hidden_size)
    save_run_files(model, out, config, None, True)
    return out


@pytest.fixture
def two_seed_measure_sections():
    """The --measures sections of an untuned model and two LoRA seeds on four MRPC rows (AUROC) and two WebQ answers
    (KL, as per-token [sum, count] pairs), small enough to check by hand."""
    from imsm.evaluation.arguments import MeasureArguments  # late: the package is not imported by every test
    from imsm.evaluation.report.measure_tables import measure_sections

    yes_no = {"gold_yes": [True, False, True, False]}
    untuned = {"label": "untuned", "untuned": True, "yes_no": {"mrpc": yes_no | {"log_odds": [0.1, 0.2, 0.3, 0.0]}},
               "kl": {"webq": [[0, 2], [0, 3]]}}
    lora = [{"label": "LoRA", "untuned": False, "yes_no": {"mrpc": yes_no | {"log_odds": [1.0, -1.0, 0.5, 0.2]}},
             "kl": {"webq": [[1, 2], [2, 3]]}},
            {"label": "LoRA", "untuned": False, "yes_no": {"mrpc": yes_no | {"log_odds": [0.4, 0.1, 0.9, 0.5]}},
             "kl": {"webq": [[2, 2], [1, 3]]}}]
    return measure_sections({"untuned": [untuned], "LoRA": lora}, "mrpc", MeasureArguments(measures="auroc,kl"),
                            1000, 0)
