"""array-api-strict adapter: the standard, and nothing but the standard.

array-api-strict wraps numpy, so every operation is numpy's correctly rounded
one and the generic :class:`~agnosticopt.adapters._base.Adapter` needs no fix;
the tests check each primitive bit for bit against the numpy adapter. Using this
backend proves that the rules call nothing outside the standard.

The standard has no function that builds a complex array from two real ones, and
``re + 1j * im`` is not exact (``1j * inf`` has a NaN real part), so
:meth:`ArrayApiStrictAdapter.make_complex` assembles the array in numpy (through
DLPack, which the standard defines) and hands it back on the same device.

Arrays are not written in place: the standard discourages mutation, so
``update_`` returns new arrays as it does for JAX.
"""

from __future__ import annotations

from typing import Any

import array_api_strict as xp_strict
import numpy as np
from agnosticopt.adapters._base import Adapter

__all__ = ["ArrayApiStrictAdapter", "adapter"]


class ArrayApiStrictAdapter(Adapter):
    """Adapter for ``array_api_strict`` arrays (any of its devices)."""

    def __init__(self) -> None:
        super().__init__(xp_strict, "array_api_strict")

    def make_complex(self, re: Any, im: Any) -> Any:
        real = np.from_dlpack(re)
        out = np.empty(real.shape, dtype=np.result_type(real.dtype, np.complex64))
        out.real = real
        out.imag = np.from_dlpack(im)
        return xp_strict.asarray(out, device=re.device)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.from_dlpack(a).copy()


_ADAPTER = ArrayApiStrictAdapter()
#: The array class (not exported by array-api-strict under a public name).
_ARRAY = type(xp_strict.asarray(0.0))


def adapter(x: Any) -> Adapter | None:
    """The array-api-strict adapter for an array of that library."""
    return _ADAPTER if isinstance(x, _ARRAY) else None
