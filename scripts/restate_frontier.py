"""The committed CPU study's frontier restated from its committed record alone: the point gap on the fitted curve
(``imsm.evaluation.measures.frontier.fit_curve``) beside the chord's, and what each stored interval allows as a share
of LoRA's forgetting at IMSM's gain. Intervals on the fitted curve need the per-example records, which are not in the
repository: rerun ``evaluate.py --report_only`` on the study's folder for them.

    python scripts/restate_frontier.py docs/cpu_study_measures.json docs/cpu_study_frontier_restated.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.atomic import atomic_write_json
from imsm.evaluation.measures.frontier import fit_curve, lower_frontier

TWO_SCALES = ("LoRA@0.5", "LoRA@1")  # the curve before the 0.75 scale was measured


def _chord(curve: list[tuple[float, float]], gain: float) -> float:
    gains, values = zip(*curve, strict=True)
    return float(np.interp(gain, gains, values))


def restate(record: dict) -> dict:
    """Per forgetting measure: the chord's and the fitted curve's value and gap at IMSM's gain, both also on the two
    scales measured first (with the origin), and the stored intervals as shares of LoRA's forgetting there (IMSM's
    forgetting = curve + gap)."""
    out = {}
    for measure, gap in record["measures"]["frontier"].items():
        gain, forgetting = gap["imsm"]
        two = lower_frontier([(0.0, 0.0), *(tuple(gap["points"][label]) for label in TWO_SCALES)])
        a2, b2 = fit_curve(two)
        chord = forgetting - gap["gap"]
        a, b = fit_curve([tuple(p) for p in gap["curve"]])
        fitted = a * gain + b * gain * gain
        out[measure] = {
            "imsm": gap["imsm"], "chord_curve": chord, "chord_gap": gap["gap"], "fit": [a, b], "fitted_curve": fitted,
            "fitted_gap": forgetting - fitted,
            "share_of_lora_method_level": [(chord + gap["method_low"]) / chord, (chord + gap["method_high"]) / chord],
            "share_of_lora_examples_only": [(chord + gap["examples_low"]) / chord,
                                            (chord + gap["examples_high"]) / chord],
            "two_scales": {"labels": list(TWO_SCALES), "chord_gap": forgetting - _chord(two, gain),
                           "fitted_gap": forgetting - (a2 * gain + b2 * gain * gain)},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measures_json")
    parser.add_argument("out")
    args = parser.parse_args()
    atomic_write_json(Path(args.out), restate(json.loads(Path(args.measures_json).read_text())))


if __name__ == "__main__":
    main()
