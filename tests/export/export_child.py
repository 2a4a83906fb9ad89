"""Run in a fresh interpreter by tests/export/test_export.py: load an exported folder with only torch + transformers
(any ``import imsm`` fails here), run the requested checks, write the results as safetensors + JSON (a generate()
that raises records its message as ``error.NAME``).

    python tests/export/export_child.py SPEC.json

SPEC: {"folder", "out", "logits": {input_ids, attention_mask, prompt_length} | null,
       "generate": [{name, input_ids, attention_mask, kwargs, logits: bool}], "roundtrip": bool, "bfloat16": bool,
       "beam_search": bool}
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys


class _NoImsm(importlib.abc.MetaPathFinder):
    """The exported model must not need this project."""

    def find_spec(self, name, path=None, target=None):
        if name == "imsm" or name.startswith("imsm."):
            raise ImportError(f"{name}: the exported model may not import imsm")


def main() -> None:
    sys.meta_path.insert(0, _NoImsm())
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    folder = spec["folder"]
    tensors, info = {}, {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    info["padding_side"] = tokenizer.padding_side
    info["class"] = type(model).__name__
    if spec.get("logits"):
        args = {k: torch.tensor(v) for k, v in spec["logits"].items()}
        with torch.no_grad():
            tensors["logits"] = model(**args).logits.float().contiguous()
    for gen in spec.get("generate", []):
        torch.manual_seed(0)
        per_step = {"output_logits": True, "return_dict_in_generate": True} if gen.get("logits") else {}
        kwargs = gen["kwargs"] | per_step
        try:
            out = model.generate(input_ids=torch.tensor(gen["input_ids"]),
                                 attention_mask=torch.tensor(gen["attention_mask"]), **kwargs)
        except Exception as e:  # noqa: BLE001 - the message is what the test reads
            info[f"error.{gen['name']}"] = f"{type(e).__name__}: {e}"
            continue
        if gen.get("logits"):
            tensors[f"logits.{gen['name']}"] = torch.stack(out.logits, dim=1).float().contiguous()
            out = out.sequences
        tensors[f"generate.{gen['name']}"] = out.contiguous()
    if spec.get("roundtrip"):
        again = os.path.join(spec["out"] + ".roundtrip")
        model.save_pretrained(again)
        reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True).eval()
        mine, theirs = model.state_dict(), reloaded.state_dict()
        info["roundtrip_same_keys"] = sorted(mine) == sorted(theirs)
        info["roundtrip_max_diff"] = max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine)
        info["roundtrip_files"] = sorted(os.listdir(again))
    if spec.get("bfloat16"):
        half = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
        gen = spec["generate"][0]
        out = half.generate(input_ids=torch.tensor(gen["input_ids"]),
                            attention_mask=torch.tensor(gen["attention_mask"]), max_new_tokens=4, do_sample=False)
        tensors["bfloat16.generate"] = out.contiguous()
        info["bfloat16_backbone"] = str(half.lm_head.weight.dtype)
        info["bfloat16_gate"] = sorted({str(p.dtype) for p in half.imsm_gate.parameters()})
    if spec.get("beam_search"):
        gen = spec["generate"][0]
        try:
            model.generate(input_ids=torch.tensor(gen["input_ids"]), max_new_tokens=2, num_beams=2)
            info["beam_search"] = "ran"
        except ValueError as e:
            info["beam_search"] = str(e)
    info["imsm_imported"] = any(m == "imsm" or m.startswith("imsm.") for m in sys.modules)
    if tensors:
        save_file(tensors, spec["out"] + ".safetensors")
    with open(spec["out"] + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
