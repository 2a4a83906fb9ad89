"""IMSM: Interweaving Memories of a Siamese Large Language Model (AAAI 2025).

One backbone, two passes: the frozen memory (PEFT adapter off) and the tuned memory (adapter on) are mixed per token
by a query-aware gate before the backbone's own LM head.
"""

__version__ = "0.1.0"
