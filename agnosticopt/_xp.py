"""Finding the adapter of an array, without importing any backend up front."""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable
from itertools import repeat
from typing import Any

from agnosticopt._backends import ARRAY_MODULES

__all__ = ["adapted_by", "adapter_for", "register_adapter"]


_REGISTERED: list[Callable[[Any], Any]] = []
#: The built-in adapters' ``adapter(x)`` per array type already met.
_LOOKUPS: dict[type, Callable[[Any], Any]] = {}


def register_adapter(lookup: Callable[[Any], Any]) -> None:
    """Register ``lookup(x) -> Adapter | None`` for a third-party array type.

    Registered lookups are asked first, newest first, so they can also replace
    a built-in adapter.
    """
    _REGISTERED.insert(0, lookup)


def adapter_for(x: Any) -> Any:
    """The adapter for array ``x``, or ``None`` when ``x`` is not an array.

    Arrays of an unknown library that implement ``__array_namespace__`` get the
    generic array-API adapter, which makes no exactness promise.
    """
    for lookup in _REGISTERED:
        found = lookup(x)
        if found is not None:
            return found
    kind = type(x)
    known = _LOOKUPS.get(kind)
    if known is not None:  # an array type seen before: its adapter module's lookup
        return known(x)
    name = None
    for cls in kind.__mro__[:-1]:  # a subclass (of torch.Tensor...) made elsewhere
        name = ARRAY_MODULES.get(cls.__module__.partition(".")[0])
        if name is not None:
            break
    if name is not None:
        module_lookup = importlib.import_module(f"agnosticopt.adapters.{name}").adapter
        _LOOKUPS[kind] = module_lookup
        return module_lookup(x)
    if hasattr(x, "__array_namespace__") and hasattr(x, "dtype"):
        from agnosticopt.adapters._base import Adapter

        return Adapter(x.__array_namespace__(), type(x).__module__)
    return None


def adapted_by(arrays: list[Any], xp: Any) -> bool:
    """Whether :func:`adapter_for` of each of ``arrays`` is ``xp``.

    In one call where the adapter tells it for many arrays at once
    (``xp.adapts_all``, asked only while no lookup is registered, since those
    come first): a training loop's new gradients at every step, on torch.
    """
    bulk = None if _REGISTERED else getattr(xp, "adapts_all", None)
    if bulk is not None:
        return bool(bulk(arrays))
    return all(map(operator.is_, map(adapter_for, arrays), repeat(xp)))
