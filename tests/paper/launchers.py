"""What the paper's tests share: a plan's run through its real launcher with a stand-in ``deepspeed``."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAPTURE_DEEPSPEED = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CAPTURE"\n'


def launch_args(run, tmp_path: Path) -> list[str]:
    """The arguments the run's launcher hands train.py, through a stand-in deepspeed that records them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text(CAPTURE_DEEPSPEED)
    (bin_dir / "deepspeed").chmod(0o755)
    capture = tmp_path / "args"
    env = {**os.environ, **run.environment("DATA"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "CAPTURE": str(capture), "GPUS": "8"}
    done = subprocess.run(run.command(), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    args = capture.read_text().splitlines()
    return args[args.index("train.py") + 1:]
