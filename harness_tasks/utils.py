"""Per-document scores of the local harness tasks, computed by imsm/evaluation/metrics.py."""

from imsm.evaluation.metrics import compute_metrics


def process_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """WebQ's contain and exact match for one generated answer, against every acceptable gold."""
    metrics = compute_metrics("webq", [results[0]], [doc["output"]])
    return {"contain": metrics["contain"], "em": metrics["em"]}
