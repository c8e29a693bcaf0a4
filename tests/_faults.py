"""Deliberately broken adapters: each plants one known numerical fault.

Each fault is a subclass of the numpy adapter that serves its own ndarray
subclass (registered with :func:`agnosticopt.register_adapter`), and a
conformance backend that makes such arrays. The conformance suite must report
every fault, naming rule, dtype and first differing element
(``test_conformance.py``). The faults are the traps real backends have:

* ``sqrt_backend``: ``sqrt`` one ulp high on some elements (torch CPU's MKL sqrt);
* ``fma_backend``: ``a*b + c`` contracted into a fused multiply-add (CuPy, XLA);
* ``reciprocal_backend``: ``x / s`` computed as ``x * (1/s)`` (JAX, torch CUDA);
* ``ftz_backend``: float32 subnormal results flushed to zero (XLA CPU, CuPy);
* ``declared_ftz_backend``: float32 subnormals flushed exactly as XLA on CPU does
  (inputs and results), declared as a named deviation;
* ``declared_ftz_sqrt_backend``: that, plus the sqrt fault (which FTZ does not explain).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from agnosticopt.adapters.numpy import NumpyAdapter
from agnosticopt.conformance import Backend
from agnosticopt.conformance._flush import FlushedBackend, FlushingAdapter

import agnosticopt as opt

_WIDE = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.longdouble}


class FaultyAdapter(NumpyAdapter):
    """The numpy adapter, for arrays of one ndarray subclass, with one fault."""

    def __init__(self, name: str, array_type: type) -> None:
        super().__init__()
        self.name = name
        self.array_type = array_type

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True).view(self.array_type)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.asarray(super().where(cond, a, b)).view(self.array_type)


class SqrtUlpAdapter(FaultyAdapter):
    """``sqrt`` rounded up by one ulp where the input's low bits are ``0 mod 5``."""

    def sqrt(self, a: Any) -> Any:
        r = super().sqrt(a)
        width = r.dtype.itemsize
        low = np.asarray(a).view(f"u{width}") % 5 == 0
        return np.where(low, np.nextafter(r, np.inf), r)


class FmaAdapter(FaultyAdapter):
    """``multiply`` tags its result; ``add`` of a tagged product is fused.

    The fused value is computed in a wider type (float64 for float32, the x87
    long double for float64) and rounded once, as a hardware FMA would.
    """

    def __init__(self, name: str, array_type: type) -> None:
        super().__init__(name, array_type)
        self.products: OrderedDict[int, tuple[Any, Any, Any]] = OrderedDict()

    def multiply(self, a: Any, b: Any) -> Any:
        r = super().multiply(a, b)
        if isinstance(r, np.ndarray) and r.dtype in _WIDE:
            self.products[id(r)] = (r, a, b)
            while len(self.products) > 64:
                self.products.popitem(last=False)
        return r

    def _factors(self, value: Any) -> tuple[Any, Any] | None:
        found = self.products.get(id(value))
        if found is None or found[0] is not value:
            return None
        return found[1], found[2]

    def add(self, a: Any, b: Any) -> Any:
        factors, other = self._factors(a), b
        if factors is None:
            factors, other = self._factors(b), a
        if factors is None:
            return super().add(a, b)
        dtype = np.result_type(factors[0], factors[1])
        wide = _WIDE[dtype]
        p, q = (np.asarray(f, dtype=wide) for f in factors)
        fused = (p * q + np.asarray(other, dtype=wide)).astype(dtype)
        return np.asarray(fused).view(self.array_type)


class ReciprocalDivideAdapter(FaultyAdapter):
    """Division by a scalar as multiplication by its (rounded) reciprocal."""

    def divide(self, a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and np.ndim(b) == 0:
            t = a.dtype.type
            return super().multiply(a, t(1) / t(b))
        return super().divide(a, b)


class FlushSubnormalsAdapter(FaultyAdapter):
    """Every float32 arithmetic and ``sqrt`` result that is subnormal becomes ±0."""

    @staticmethod
    def _flush(r: Any) -> Any:
        if not (isinstance(r, np.ndarray) and r.dtype == np.float32):
            return r
        tiny = np.finfo(np.float32).tiny
        return np.where(np.abs(r) < tiny, np.copysign(np.float32(0), r), r)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        return self._flush(super()._apply(op, a, b))

    def sqrt(self, a: Any) -> Any:
        return self._flush(super().sqrt(a))


class DeclaredFlushAdapter(FlushingAdapter):
    """float32 subnormals flushed exactly as XLA on CPU does (FTZ and DAZ), declared."""

    dtypes = frozenset({"float32"})
    flushes_subnormals: tuple[str, ...] = ("float32",)


class DeclaredFlushSqrtAdapter(DeclaredFlushAdapter):
    """The declared flushing adapter with a fault FTZ does not explain: sqrt one ulp high."""

    def sqrt(self, a: Any) -> Any:
        r = super().sqrt(a)
        low = np.asarray(a).view(f"u{r.dtype.itemsize}") % 5 == 0
        return self._wrap(np.where(low, np.nextafter(r, np.inf), r))


class FaultyBackend(Backend):
    """Arrays of a fresh ndarray subclass, served by ``adapter_type``."""

    writeable = True

    def __init__(self, name: str, adapter_type: type[FaultyAdapter]) -> None:
        super().__init__(name)
        self.array_type = type(f"{adapter_type.__name__}Array", (np.ndarray,), {})
        self.faulty = adapter_type(name, self.array_type)
        array_type, faulty = self.array_type, self.faulty
        opt.register_adapter(lambda x: faulty if type(x) is array_type else None)

    def asarray(self, a: np.ndarray) -> Any:
        return np.array(a, copy=True).view(self.array_type)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def device(self, a: Any) -> Any:
        return "cpu"


def _cached(
    name: str, adapter_type: type[FaultyAdapter]
) -> Callable[[], FaultyBackend]:
    made: list[FaultyBackend] = []

    def factory() -> FaultyBackend:
        if not made:
            made.append(FaultyBackend(name, adapter_type))
        return made[0]

    return factory


# One backend per fault, made on first use (each registers one adapter lookup).
sqrt_backend = _cached("numpy-sqrt-ulp", SqrtUlpAdapter)
fma_backend = _cached("numpy-fma", FmaAdapter)
reciprocal_backend = _cached("numpy-reciprocal-divide", ReciprocalDivideAdapter)
ftz_backend = _cached("numpy-ftz", FlushSubnormalsAdapter)


def _flushing(
    name: str, adapter_type: type[FlushingAdapter]
) -> Callable[[], FlushedBackend]:
    made: list[FlushedBackend] = []

    def factory() -> FlushedBackend:
        if not made:
            made.append(FlushedBackend(name, adapter_type))
        return made[0]

    return factory


declared_ftz_backend = _flushing("numpy-ftz-declared", DeclaredFlushAdapter)
declared_ftz_sqrt_backend = _flushing(
    "numpy-ftz-declared-sqrt", DeclaredFlushSqrtAdapter
)

FAULTS = {
    "sqrt off by one ulp": sqrt_backend,
    "fused multiply-add": fma_backend,
    "reciprocal division": reciprocal_backend,
    "float32 subnormals flushed": ftz_backend,
}

__all__ = [
    "FAULTS",
    "declared_ftz_backend",
    "declared_ftz_sqrt_backend",
    "fma_backend",
    "ftz_backend",
    "reciprocal_backend",
    "sqrt_backend",
]
