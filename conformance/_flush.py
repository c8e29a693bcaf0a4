"""numpy with subnormals flushed: the reference for a declared ``flushes_subnormals``.

A backend that declares ``flushes_subnormals`` (JAX on CPU: XLA runs with the
x86 FTZ and DAZ flags) may differ from numpy only as a run *with subnormals
flushed* differs. This module makes that run: :class:`FlushingAdapter` is the
numpy adapter with XLA's CPU semantics, as ``adapters/jax.py`` documents them:

* **DAZ**: arithmetic (``+ - * /``, ``sqrt``, ``pow``), comparisons, ``sign``,
  ``maximum``/``minimum``, ``count_nonzero`` and casts read a subnormal input
  (an array element or a host scalar, in the array's dtype) as a zero of the
  same sign;
* **FTZ**: a subnormal result of those operations becomes a zero of the same
  sign;
* bit operations (``abs``, negation, ``where``, copies, creation, reshapes,
  ``real``/``imag``, building a complex array from its parts) keep subnormals;
* float16 is not flushed (XLA computes it in float32, where every float16
  subnormal is normal), nor is host arithmetic on numpy scalars.

A complex product or quotient of two complex arrays is flushed on its parts'
inputs and outputs only, not inside (numpy and XLA need not share the
intermediate steps); no rule of agnosticopt multiplies two complex arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from agnosticopt.adapters.numpy import NumpyAdapter
from agnosticopt.conformance._backends import Backend

import agnosticopt as opt

__all__ = ["FlushedBackend", "FlushingAdapter", "flushed_backend"]

#: dtypes whose subnormals are flushed (XLA on CPU: every one but float16).
FLUSHED = frozenset({"float32", "float64", "complex64", "complex128"})


class FlushedArray(np.ndarray):
    """An ndarray whose operations the flushing adapter runs."""


def _tiny(dtype: np.dtype[Any]) -> Any:
    return np.finfo(dtype).tiny


class FlushingAdapter(NumpyAdapter):
    """The numpy adapter with FTZ and DAZ, as XLA runs on CPU.

    Parameters
    ----------
    name
        Name in reports.
    array_type
        The ndarray subclass it serves (its results are views of that type).
    """

    #: The dtypes it flushes.
    dtypes: frozenset[str] = FLUSHED

    def __init__(
        self, name: str = "numpy-flushed", array_type: type = FlushedArray
    ) -> None:
        super().__init__()
        self.name = name
        self.array_type = array_type

    def fast_plan(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        """No compiled fast path: one flushed numpy operation at a time."""
        return None

    # -- flushing ---------------------------------------------------------------------
    def _wrap(self, r: Any) -> Any:
        return r.view(self.array_type) if isinstance(r, np.ndarray) else r

    def flush(self, v: Any, like: Any = None) -> Any:
        """``v`` with subnormals replaced by zeros of the same sign.

        Arrays are flushed in their dtype; a host scalar in the dtype of the
        array ``like`` (the other operand), as XLA sees it after conversion.
        """
        if isinstance(v, np.ndarray):
            if v.dtype.name not in self.dtypes:
                return v
            if v.dtype.kind == "c":
                out = np.empty(v.shape, v.dtype)
                out.real, out.imag = self.flush(v.real), self.flush(v.imag)
                return self._wrap(out)
            small = np.abs(np.asarray(v)) < _tiny(v.dtype)
            if not small.any():
                return v
            return self._wrap(np.where(small, np.copysign(v.dtype.type(0), v), v))
        dtype = getattr(like if like is not None else v, "dtype", None)
        if dtype is None or dtype.name not in self.dtypes:
            return v
        real = np.finfo(dtype).dtype
        if isinstance(v, complex):
            return complex(self.flush(v.real, like), self.flush(v.imag, like))
        if isinstance(v, (float, np.floating)) and v != 0 and abs(v) < _tiny(real):
            return type(v)(math.copysign(0.0, float(v)))
        return v

    def _daz2(self, a: Any, b: Any) -> tuple[Any, Any]:
        like = a if isinstance(a, np.ndarray) else b
        return self.flush(a, like), self.flush(b, like)

    # -- arithmetic: inputs and results flushed ----------------------------------------
    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        a, b = self._daz2(a, b)
        return self.flush(self._wrap(super()._apply(op, a, b)))

    def sqrt(self, a: Any) -> Any:
        return self.flush(self._wrap(super().sqrt(self.flush(a))))

    def pow(self, a: Any, q: Any) -> Any:
        a, q = self._daz2(a, q)
        return self.flush(self._wrap(super().pow(a, q)))

    def astype(self, x: Any, name: str) -> Any:
        return self.flush(self._wrap(super().astype(self.flush(x), name)))

    # -- reads: inputs flushed -----------------------------------------------------------
    def sign(self, a: Any) -> Any:
        return self._wrap(super().sign(self.flush(a)))

    def maximum(self, a: Any, b: Any) -> Any:
        return self._wrap(super().maximum(*self._daz2(a, b)))

    def minimum(self, a: Any, b: Any) -> Any:
        return self._wrap(super().minimum(*self._daz2(a, b)))

    def greater(self, a: Any, b: Any) -> Any:
        return super().greater(*self._daz2(a, b))

    def less(self, a: Any, b: Any) -> Any:
        return super().less(*self._daz2(a, b))

    def not_equal(self, a: Any, b: Any) -> Any:
        return super().not_equal(*self._daz2(a, b))

    def count_nonzero(self, a: Any) -> int:
        return super().count_nonzero(self.flush(a))

    # -- bit operations: kept, as views of the array type ------------------------------
    def copy(self, x: Any) -> Any:
        return self._wrap(np.array(x, copy=True))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self._wrap(np.asarray(super().where(cond, a, b)))

    def make_complex(self, re: Any, im: Any) -> Any:
        return self._wrap(super().make_complex(re, im))

    def writeable(self, x: Any) -> bool:
        return False  # as JAX: every update makes new arrays


class FlushedBackend(Backend):
    """numpy arrays whose every operation flushes subnormals (see the module)."""

    writeable = False

    def __init__(
        self,
        name: str = "numpy-flushed",
        adapter_type: type[FlushingAdapter] = FlushingAdapter,
    ) -> None:
        super().__init__(name)
        self.array_type: type = type(
            f"{adapter_type.__name__}Array", (FlushedArray,), {}
        )
        self.flushing = adapter_type(name, self.array_type)
        array_type, flushing = self.array_type, self.flushing
        opt.register_adapter(lambda x: flushing if type(x) is array_type else None)

    def asarray(self, a: np.ndarray) -> Any:
        return np.array(a, copy=True).view(self.array_type)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def device(self, a: Any) -> Any:
        return "cpu"


_MADE: list[FlushedBackend] = []


def flushed_backend() -> FlushedBackend:
    """The one flushing reference backend (made, and its adapter registered, once)."""
    if not _MADE:
        _MADE.append(FlushedBackend())
    return _MADE[0]
