"""Evaluation: batched decoding, answer likelihood, the paper's metrics, statistics, reports and the
lm-evaluation-harness model."""
