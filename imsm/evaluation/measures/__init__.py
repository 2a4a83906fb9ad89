"""Measures: the paper's task metrics, the threshold-free measures (yes/no AUROC, general-text NLL, KL to the
untuned model), the LoRA frontier, and the session that measures each model while it is loaded."""
