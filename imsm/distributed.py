"""Process-group setup that the Trainer cannot do by itself on a machine without an accelerator."""

from __future__ import annotations

import os

import torch


def configure_cpu_deepspeed(argv: list[str]) -> list[str]:
    """Make a ``deepspeed`` launch on CPU-only machines (CI, laptops) a real multi-process run.

    On such a machine accelerate finds no device backend for DeepSpeed, so the Trainer reads a world size of 1: every
    rank would see all the data and write every file, and DeepSpeed's "auto" batch size would not match its own
    world size. Configuring the distributed state with gloo first, and telling the Trainer to use it, fixes both.
    Nothing changes where CUDA is available.
    """
    launched = os.environ.get("LOCAL_RANK") is not None
    if torch.cuda.is_available() or not launched or "--deepspeed" not in argv:
        return argv
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return argv + ["--accelerator_config", '{"use_configured_state": true}']
