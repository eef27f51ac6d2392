"""Lazy public APIs: a package names what it exports and where it lives, and nothing is imported
until first use, so ``import lns_surgery`` and ``lns-surgery --help`` stay fast."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, api: dict[str, str], namespace: dict):
    """``__getattr__`` and ``__dir__`` for a package whose names ``api`` maps to their modules."""

    def __getattr__(name):
        if name in api:
            value = getattr(importlib.import_module(api[name]), name)
            namespace[name] = value  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(api))

    return __getattr__, __dir__
