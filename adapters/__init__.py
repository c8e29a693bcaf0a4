"""Backend adapters: the only place where backend-specific code lives.

Each submodule imports its backend at the top and is loaded only when an array of
that backend is first seen (``agnosticopt.adapter_for``) or on attribute access
here, so ``import agnosticopt`` imports no backend library.

Every submodule exposes ``adapter(x) -> Adapter | None``: the adapter for ``x``
when ``x`` is an array of that backend, else ``None``.
"""

from __future__ import annotations

import importlib
from typing import Any

SUBMODULES = frozenset({"array_api_strict", "cupy", "jax", "numpy", "torch"})

__all__ = ["array_api_strict", "cupy", "jax", "numpy", "torch"]


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(SUBMODULES | set(globals()))
