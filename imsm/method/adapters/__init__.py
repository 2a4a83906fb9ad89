"""PEFT methods by name, one file each in this package (peft's ``register_peft_method`` idea).

Each module here defines a ``MethodSpec`` subclass (``base.py`` says what a method provides: its typed options with
help strings, how it builds, attaches, loads and saves its adapter, what it saves beyond its trainable parameters,
the files it writes, whether its update merges (scaling, export) or runs in one mixed-adapter batch, its settings on
a model card, its extra loss and its callbacks) and registers an instance with ``register_method``
(``registry.py``). Every module of the package is imported when the package is, so adding a method is adding one
file; everything else (the command line, training, the run folder, evaluation, export, the tests' case table) looks
methods up here by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from imsm.method.adapters.base import ExtraLoss, MethodSpec
from imsm.method.adapters.registry import METHODS, get_method, methods_reading, register_method

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "ExtraLoss", "MethodSpec", "get_method", "methods_reading", "register_method"]
