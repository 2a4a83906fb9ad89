"""Export a trained IMSM run as a self-contained Hugging Face model folder (loads with only torch + transformers).

    python export.py runs/imsm_lora_gsm8k exported/imsm_lora_gsm8k
    python export.py runs/imsm_lora_gsm8k/checkpoint-500 exported/ckpt500 --dtype bfloat16 --overwrite

and then, anywhere:

    model = AutoModelForCausalLM.from_pretrained("exported/imsm_lora_gsm8k", trust_remote_code=True)

    tokenizer = AutoTokenizer.from_pretrained("exported/imsm_lora_gsm8k", trust_remote_code=True)

A run with a query_aware, token or equal gate exports when its method's update merges into the weight
(``MethodSpec.scalable``, the methods adapter scaling takes, e.g. LoRA); a vanilla run (--gate none) is refused with
the PEFT merge to use instead, and so is a method that does not merge (the error lists those that do), and a
checkpoint without COMPLETE (an interrupted save), as evaluate.py refuses it. --overwrite replaces only an earlier
export, never the run or any other folder; a killed export leaves nothing the next one does not clean up. What the
folder holds: imsm/export/folder.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from imsm.export.folder import ExportRefused, export_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="A run folder: train.py's output folder, its final/ or a checkpoint-N.")
    parser.add_argument("out_dir", help="The Hugging Face folder to write (refused if it exists, see --overwrite).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="Weights' dtype (the gate stays float32); bfloat16 halves the folder.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model; default: the run's recorded one.")
    parser.add_argument("--base_model_id", default=None,
                        help="The base model's Hub id for the model card and config, when the run recorded a local "
                             "folder (a Hub name or the embedded model is found by itself).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace out_dir if it is an earlier export (swapped in whole); any other folder is "
                             "refused.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout,
                        level=logging.INFO)
    try:
        out = export_run(args.run, args.out_dir, DTYPES[args.dtype], args.model_name_or_path, args.overwrite,
                         args.base_model_id)
    except (ExportRefused, FileExistsError, FileNotFoundError) as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    print(f"Exported {args.run} to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True) and AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
