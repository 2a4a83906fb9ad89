"""The table of PEFT methods by name; ``imsm.method.adapters`` fills it by importing every method's file."""

from __future__ import annotations

from imsm.method.adapters.base import MethodSpec

METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` available under ``spec.name`` (``--peft NAME``); a name can be registered once."""
    if spec.name in METHODS:
        raise ValueError(f"PEFT method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str, source: str = "--peft") -> MethodSpec:
    """The method registered as ``name``; ``source`` (an option or a file) names where the name came from."""
    if name not in METHODS:
        raise ValueError(f"{source} {name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name]


def methods_reading(option: str) -> list[str]:
    """The methods whose options include ``option`` (a field name such as ``lora_r``)."""
    return sorted(name for name, spec in METHODS.items() if option in spec.option_names())
