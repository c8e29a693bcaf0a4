"""Backend adapters: the only place where backend-specific code lives.

Each submodule imports its backend at the top and is loaded only when an array of
that backend is first seen (``agnosticopt.adapter_for``) or on attribute access
here, so ``import agnosticopt`` imports no backend library.

Every submodule exposes ``adapter(x) -> Adapter | None``: the adapter for ``x``
when ``x`` is an array of that backend, else ``None``.

:class:`Adapter` (backend-free: numpy and the array API only) is the base class
a third party's adapter subclasses; see ``docs/writing-an-adapter.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from agnosticopt.adapters._base import Adapter

from agnosticopt._backends import ADAPTER_MODULES

#: The backend submodules (from the one registry, ``agnosticopt._backends``).
SUBMODULES = ADAPTER_MODULES

__all__ = ["Adapter", *sorted(SUBMODULES)]  # noqa: PLE0604  (derived from the registry)


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(SUBMODULES | set(globals()))
