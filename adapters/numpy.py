"""NumPy adapter: numpy's ufuncs are single correctly rounded IEEE operations.

NumPy is the reference backend: no fix is needed for the operations rules use
(``sqrt`` is the hardware's correctly rounded square root; scalars follow NEP 50
weak promotion, so a float32 array times an already-rounded float32 value stays a
float32 product). Floating-point warnings are silenced during an update, as
Julia does not warn on overflow or 0/0 either.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np
from agnosticopt.adapters._base import Adapter

__all__ = ["NumpyAdapter", "adapter"]

_DTYPE_NAMES: dict[Any, str] = {}


class NumpyAdapter(Adapter):
    """Adapter for ``numpy.ndarray``."""

    def __init__(self) -> None:
        super().__init__(xp_numpy, "numpy")

    def dtype_name(self, x: Any) -> str:
        dtype = x.dtype
        try:
            return _DTYPE_NAMES[dtype]
        except KeyError:  # numpy's dtype.name is Python code: 1.5 us, per leaf and step
            name = _DTYPE_NAMES[dtype] = str(dtype.name)
            return name

    def dtype(self, name: str) -> Any:
        return np.dtype(name)

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True)

    def sign(self, a: Any) -> Any:
        return np.sign(a)

    def writeable(self, x: Any) -> bool:
        return bool(x.flags.writeable)

    def subtract_(self, x: Any, step: Any) -> None:
        np.subtract(x, step, out=x)

    def assign_(self, x: Any, value: Any) -> None:
        np.copyto(x, value)

    def make_complex(self, re: Any, im: Any) -> Any:
        out = np.empty(np.shape(re), dtype=np.result_type(re, np.complex64))
        out.real = re
        out.imag = im
        return out

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def fast_plan(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        """``update_``'s compiled fast path for ``(rule, state, x, grad)`` leaves.

        See :mod:`agnosticopt.adapters._fast`: ``None`` without numba.
        """
        from agnosticopt.adapters import _fast

        return _fast.plan(_fast.numpy_arrays(), items)


_ADAPTER = NumpyAdapter()


def adapter(x: Any) -> Adapter | None:
    """The numpy adapter for an ``ndarray`` (numpy scalars are not arrays)."""
    return _ADAPTER if isinstance(x, np.ndarray) else None
