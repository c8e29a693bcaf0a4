"""NumPy adapter: numpy's ufuncs are single correctly rounded IEEE operations.

NumPy is the reference backend: no fix is needed for the operations rules use
(``sqrt`` is the hardware's correctly rounded square root; scalars follow NEP 50
weak promotion, so a float32 array times an already-rounded float32 value stays a
float32 product). Floating-point warnings are silenced during an update, as
Julia does not warn on overflow or 0/0 either.

0-d arrays: a numpy ufunc applied to 0-d arrays returns a numpy *scalar*, which
the generic adapter would then hand on as a Python float (float64 arithmetic).
Every operation here gives a result of an array operand back as an array
(:func:`_nd`), so a 0-d parameter stays a 0-d array of its dtype ``T``.

Only ``numpy.ndarray`` and ``numpy.memmap`` are numpy arrays here: other
subclasses (``np.ma.MaskedArray``, ``np.matrix``, unit-carrying arrays) change
what the operations mean (masks, ``*`` as a matrix product), so they get no
adapter and ``setup`` refuses them, naming the key path; register an adapter
(:func:`agnosticopt.register_adapter`) for a subclass whose maths is numpy's.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np
from agnosticopt.adapters._base import Adapter

__all__ = ["NumpyAdapter", "adapter"]

_DTYPE_NAMES: dict[Any, str] = {}


def _nd(result: Any, *operands: Any) -> Any:
    """``result`` as an ndarray when an operand was one (ufuncs give 0-d scalars)."""
    if isinstance(result, np.generic) and any(
        isinstance(o, np.ndarray) for o in operands
    ):
        return np.asarray(result)
    return result


class NumpyAdapter(Adapter):
    """Adapter for ``numpy.ndarray`` (and ``numpy.memmap``)."""

    one_device = True

    def adapts_all(self, arrays: list[Any]) -> bool:
        """Whether :func:`adapter` of each of ``arrays`` is this adapter (one pass)."""
        return self is _ADAPTER and set(map(type, arrays)) <= _OWN

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
        return _nd(np.sign(a), a)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        return _nd(op(a, b), a, b)

    def negative(self, a: Any) -> Any:
        return _nd(-a, a)

    def sqrt(self, a: Any) -> Any:
        return _nd(np.sqrt(a), a)

    def abs(self, a: Any) -> Any:
        return _nd(np.abs(a), a)

    def _max(self, a: Any, b: Any) -> Any:
        return _nd(np.maximum(a, b), a, b)

    def _min(self, a: Any, b: Any) -> Any:
        return _nd(np.minimum(a, b), a, b)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        a, b = self._arrays(a, b)
        return _nd(np.where(cond, a, b), cond, a, b)

    def greater(self, a: Any, b: Any) -> Any:
        return _nd(super().greater(a, b), a)

    def less(self, a: Any, b: Any) -> Any:
        return _nd(super().less(a, b), a)

    def not_equal(self, a: Any, b: Any) -> Any:
        return _nd(super().not_equal(a, b), a)

    def pow(self, a: Any, q: Any) -> Any:
        return _nd(super().pow(a, q), a)

    def isfinite(self, a: Any) -> Any:
        return _nd(np.isfinite(a), a)

    def memory_key(self, x: Any) -> Any:
        """The id of the object owning ``x``'s memory (views share their owner's)."""
        if x.size == 0:
            return None
        root = x
        while isinstance(root.base, np.ndarray):
            root = root.base
        return id(root if root.base is None else root.base)

    def memory_span(self, x: Any) -> tuple[int, int] | None:
        from numpy.lib.array_utils import byte_bounds

        low, high = byte_bounds(x)
        return int(low), int(high)

    def overlaps(self, a: Any, b: Any) -> bool:
        """Exact: ``np.shares_memory`` (views of one buffer only, so rarely called)."""
        return bool(np.shares_memory(a, b))

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

        return _fast.plan(numpy_arrays(), items)

    def fast_replay(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        """The last fast plan again for the same leaves, or ``None`` (never a new plan)."""
        from agnosticopt.adapters import _fast

        return _fast.replay(numpy_arrays(), items)


_ADAPTER = NumpyAdapter()
_DTYPE = operator.attrgetter("dtype")
_C_CONTIGUOUS = operator.attrgetter("flags.c_contiguous")
_ALIGNED = operator.attrgetter("flags.aligned")


_OWN = frozenset((np.ndarray, np.memmap))


def adapter(x: Any) -> Adapter | None:
    """The numpy adapter for an ``ndarray`` or ``memmap`` (numpy scalars are not arrays).

    Other ndarray subclasses get none (see the module docstring).
    """
    kind = type(x)
    return _ADAPTER if kind is np.ndarray or kind is np.memmap else None


# -- the fast path's memory access ----------------------------------------------------------------


class NumpyArrays:
    """How the fast path (:mod:`agnosticopt.adapters._fast`) reads and writes numpy arrays."""

    name = "numpy"
    array_type: type = np.ndarray

    def __init__(self) -> None:
        self.dtypes = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}

    def dtype(self, a: Any) -> str | None:
        """The dtype of a plain, aligned, C-contiguous float32/float64 ndarray, else None."""
        if (
            type(a) is not np.ndarray
        ):  # subclasses (masked arrays...) have their own maths
            return None
        flags = a.flags
        if not (flags.c_contiguous and flags.aligned):
            return None
        return self.dtypes.get(a.dtype)

    def readable(self, arrays: list[Any], dtype: str) -> bool:
        """Whether :meth:`dtype` of each of ``arrays`` is ``dtype``: each test over
        all arrays at once (new gradient arrays at every step)."""
        names = map(self.dtypes.get, map(_DTYPE, arrays))  # (equal, not identical:
        return (  # an unpickled dtype is another object)
            all(map(operator.is_, map(type, arrays), itertools.repeat(np.ndarray)))
            and all(map(operator.eq, names, itertools.repeat(dtype)))
            and all(map(_C_CONTIGUOUS, arrays))
            and all(map(_ALIGNED, arrays))
        )

    def unchanged(self, arrays: list[Any], dtypes: list[Any]) -> bool:
        """Whether each of ``arrays`` still has its dtype of ``dtypes`` (``a.dtype =
        ...`` changes it in place). Its layout changes in place only by the
        ``strides`` setter, deprecated since numpy 2.4 and not asked here."""
        return all(map(operator.is_, map(_DTYPE, arrays), dtypes))

    def writeable(self, a: Any) -> bool:
        """Whether a kernel may write into ``a``."""
        return bool(a.flags.writeable)

    def still_writeable(self, arrays: list[Any]) -> Callable[[], bool]:
        """A test of whether a kernel may still write into each of ``arrays`` (the
        flag can be cleared at any time: asked of each array at each call)."""
        return lambda: all(a.flags.writeable for a in arrays)

    def address(self, a: Any) -> int:
        """The address of the first element (see :func:`_data_field`)."""
        return _address(a)

    def addresses(self, arrays: list[Any]) -> list[int]:
        """:meth:`address` of each of ``arrays``."""
        return list(map(_address, arrays))

    def written(self, arrays: list[Any]) -> None:
        """Called after kernels wrote into ``arrays`` (numpy keeps no version counter)."""

    def scaled(self, a: Any, factor: Any) -> Any:
        """A new C-contiguous array ``a * factor``: numpy's correctly rounded product."""
        return np.multiply(a, factor)

    def empty(self, size: int, dtype: str) -> Any:
        """A new 1-d array of ``size`` elements of ``dtype`` (a kernel's scratch)."""
        return np.empty(size, np.dtype(dtype))


def _interface_address(a: Any) -> int:
    return a.__array_interface__["data"][0]


def _data_field() -> Any:
    """The fastest exact reader of an ndarray's data address, checked here.

    numpy's ``__array_interface__`` builds a dict (about 1 µs an array, and the
    fast path reads each new gradient's address at every step). The C struct of
    an ndarray (``PyArrayObject_fields``, numpy's public ABI) holds the data
    pointer right after the object header; read there with ctypes, after checking
    on arrays of several sizes, views and dtypes that it gives
    ``__array_interface__``'s address. Where it does not (another object header,
    another build), and on interpreters other than CPython (where ``id`` is not
    an address), ``__array_interface__`` it is.
    """
    import ctypes
    import sys

    if sys.implementation.name != "cpython":  # id() is not an address elsewhere
        return _interface_address
    offset = object.__basicsize__  # the object header (PyObject_HEAD)
    read = ctypes.c_void_p.from_address
    probes = [np.empty(n, dtype) for n in (1, 7, 4096) for dtype in ("f4", "f8")]
    probes += [probes[-1][3:], probes[-1].reshape(64, 64)[1:, 1:].T]
    try:
        if all(read(id(a) + offset).value == _interface_address(a) for a in probes):
            ndarray = np.ndarray

            def fast(a: Any) -> int:
                if isinstance(a, ndarray):  # (every subclass has the same struct)
                    return read(id(a) + offset).value or 0  # (NULL: 0, as numpy)
                return _interface_address(a)

            return fast
    except (ValueError, OverflowError):  # pragma: no cover - an unreadable layout
        pass
    return _interface_address  # pragma: no cover - other builds


_address = _data_field()


_ARRAYS: list[NumpyArrays] = []


def numpy_arrays() -> NumpyArrays:
    """The numpy memory access of the fast path (one instance)."""
    if not _ARRAYS:
        _ARRAYS.append(NumpyArrays())
    return _ARRAYS[0]
