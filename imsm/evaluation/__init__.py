"""Evaluation, in rooms: ``decoding/`` (generation, answer likelihood, adapter scaling, sharding, the per-model
runner), ``measures/`` (the paper's metrics, the threshold-free measures, the LoRA frontier, the measuring session),
``report/`` (saved results, comparisons, tables, charts and the one writer of every report file), ``stats.py`` (every
interval and test); at the top evaluate.py's arguments, planning and output folder, and the lm-evaluation-harness
model (``harness``)."""
