"""The paper's experiments as plans: which launcher runs to train, which evaluations to run, and the paper's own
numbers to put beside ours (``reproduce.py`` is the command line)."""
