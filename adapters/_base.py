"""The generic adapter: the namespace that rules see, written over the array API.

Every backend adapter derives from :class:`Adapter` and overrides only what its
backend gets wrong (an inexact ``sqrt``, division by a scalar as a reciprocal
multiply, ...) or can do faster. A rule's ``xp`` is the backend's whole
array-API namespace (``xp.mean``, ``xp.linalg.vector_norm``, ``xp.zeros``, ...:
any name not defined here is the namespace's), with the operations of the table
``agnosticopt._ops.OPS`` overriding it: those are bit-identical on every backend;
anything else is identical only if the backends agree.

Conventions
-----------
* Scalars handed in by rules are host numpy scalars already rounded to the
  parameter dtype ``T``; they are passed to the backend as Python numbers, whose
  exact value the backend then uses in ``T`` (weak scalar promotion).
* Complex arrays: second moments are real, so a rule may combine a complex array
  with a real array or scalar. Such mixed ``+ - * /`` operate on the real and
  imaginary parts separately (as Julia's ``Complex`` methods do), never by
  promoting the real operand to complex.
* Every real ``+ - * /`` goes through :meth:`Adapter._apply` (the componentwise
  complex path and ``abs2`` included), so a backend fixes an operation in one place.
* NaN: any NaN is as good as any other (backends differ in the sign and payload
  of the NaN they produce); all other results are exact bits, signed zeros included.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["Adapter"]

_REAL_NAMES = {"complex64": "float32", "complex128": "float64"}


class Adapter:
    """Elementwise operations in one backend, and how to write into its arrays.

    Parameters
    ----------
    xp
        The backend's array-API namespace (e.g. ``array_api_compat.numpy``).
    name
        A short name for messages and reports (``"numpy"``, ``"torch"``, ...).
    """

    #: Exactness fixes this adapter applies (reported by ``agnosticopt info``).
    fixes: tuple[str, ...] = ()

    #: Whether all arrays of this adapter are on one device (no device check).
    one_device: bool = False

    def __init__(self, xp: Any, name: str) -> None:
        self.xp = xp
        self.name = name

    def __repr__(self) -> str:
        return f"<agnosticopt adapter {self.name!r}>"

    def __getattr__(self, name: str) -> Any:
        """Any other name is the backend namespace's (``xp.mean``, ``xp.linalg``, ...).

        Only reached for names the adapter does not define; those of the
        operation table (``agnosticopt._ops.OPS``) always are. Results are
        identical across backends only if the backends agree.
        """
        if name.startswith("_") or name == "xp":  # private names, unpickling
            raise AttributeError(name)
        try:
            return getattr(self.xp, name)
        except AttributeError:
            msg = (
                f"{self.name}: neither the adapter nor its array-API namespace "
                f"{getattr(self.xp, '__name__', self.xp)!r} has {name!r}"
            )
            raise AttributeError(msg) from None

    # -- dtypes ---------------------------------------------------------------
    def dtype_name(self, x: Any) -> str:
        """The dtype of ``x`` as a numpy-style name (``"float32"``, ...)."""
        return str(x.dtype).rsplit(".", 1)[-1]

    def dtype(self, name: str) -> Any:
        """The backend dtype object called ``name``."""
        return getattr(self.xp, name)

    def is_trainable(self, x: Any) -> bool:
        """Floating-point and complex arrays are trainable; others are not."""
        return self.dtype_name(x) in {
            "float16",
            "bfloat16",
            "float32",
            "float64",
            "complex64",
            "complex128",
        }

    def is_complex(self, x: Any) -> bool:
        """Whether ``x`` is a complex array."""
        return self.dtype_name(x).startswith("complex")

    def scalar_type(self, x: Any) -> type:
        """The numpy scalar type of the real dtype of ``x``: host scalars use it."""
        name = self.dtype_name(x)
        return np.dtype(_REAL_NAMES.get(name, name)).type

    def astype(self, x: Any, name: str) -> Any:
        """``x`` converted to the dtype called ``name`` (a new array)."""
        return self.xp.astype(x, self.dtype(name), copy=True)

    def astype_tracked(self, x: Any, name: str) -> Any:
        """:meth:`astype` keeping the backend's autograd history (``Restructure``).

        Rules never need it (their results carry no history); the default is
        :meth:`astype`, which the namespace differentiates where it can.
        """
        return self.astype(x, name)

    def shape(self, x: Any) -> tuple[int, ...]:
        """The shape of ``x`` as a tuple of ints."""
        return tuple(x.shape)

    def size(self, x: Any) -> int:
        """The number of elements of ``x``."""
        return math.prod(self.shape(x))

    # -- creation ---------------------------------------------------------------
    def zeros_like(self, x: Any) -> Any:
        """Zeros of the shape, dtype and device of ``x``."""
        return self.xp.zeros_like(x)

    def real_zeros_like(self, x: Any) -> Any:
        """Zeros of the shape and device of ``x`` in its real dtype."""
        if not self.is_complex(x):
            return self.xp.zeros_like(x)
        real = self.dtype(_REAL_NAMES[self.dtype_name(x)])
        return self.xp.zeros_like(x, dtype=real)

    def full_like(self, x: Any, value: Any, *, real: bool = False) -> Any:
        """An array like ``x`` (in its real dtype if ``real``) filled with ``value``."""
        dtype = None
        if real and self.is_complex(x):
            dtype = self.dtype(_REAL_NAMES[self.dtype_name(x)])
        return self.xp.full_like(x, _py(value), dtype=dtype)

    def copy(self, x: Any) -> Any:
        """A new array equal to ``x``."""
        return self.xp.asarray(x, copy=True)

    # -- elementwise arithmetic ---------------------------------------------------
    def add(self, a: Any, b: Any) -> Any:
        """``a + b``, one correctly rounded operation."""
        return self._binary(operator.add, a, b)

    def subtract(self, a: Any, b: Any) -> Any:
        """``a - b``, one correctly rounded operation."""
        return self._binary(operator.sub, a, b)

    def multiply(self, a: Any, b: Any) -> Any:
        """``a * b``, one correctly rounded operation."""
        return self._binary(operator.mul, a, b)

    def divide(self, a: Any, b: Any) -> Any:
        """``a / b``, a true division (never a multiplication by ``1/b``)."""
        return self._binary(operator.truediv, a, b)

    def negative(self, a: Any) -> Any:
        """``-a``."""
        return -a

    def sqrt(self, a: Any) -> Any:
        """Correctly rounded square root of a real array."""
        return self.xp.sqrt(a)

    def abs(self, a: Any) -> Any:
        """``|a|`` of a real array."""
        return self.xp.abs(a)

    def abs2(self, a: Any) -> Any:
        """``a*a`` for reals, ``re*re + im*im`` for complex (a real array)."""
        mul = operator.mul
        if self.is_complex(a):
            re, im = self.xp.real(a), self.xp.imag(a)
            return self._apply(
                operator.add, self._apply(mul, re, re), self._apply(mul, im, im)
            )
        return self._apply(mul, a, a)

    def sign(self, a: Any) -> Any:
        """``sign(a)``: -1, +0 or 1; ``sign(-0.0)`` is ``+0.0``; NaN stays NaN.

        This is numpy's convention, the reference; Julia's ``sign(-0.0)`` is
        ``-0.0`` (it differs only for a parameter at ``-0.0``).
        """
        return self.xp.sign(a)

    def maximum(self, a: Any, b: Any) -> Any:
        """IEEE 754-2019 ``maximum`` (Julia's ``max``): NaN wins, ``+0 > -0``.

        Backends break the tie between ``+0`` and ``-0`` arbitrarily (numpy
        returns the first operand in float16 and the second in float32/64, torch
        depends on the element's position), so ties are settled here.
        """
        a, b = self._arrays(a, b)
        return self._zero_ties(self._max(a, b), a, b, upper=True)

    def minimum(self, a: Any, b: Any) -> Any:
        """IEEE 754-2019 ``minimum`` (Julia's ``min``): NaN wins, ``-0 < +0``."""
        a, b = self._arrays(a, b)
        return self._zero_ties(self._min(a, b), a, b, upper=False)

    def clip(self, a: Any, lo: Any, hi: Any) -> Any:
        """``min(max(a, lo), hi)`` with NaN passed through (Julia's ``clamp``)."""
        return self.minimum(self.maximum(a, lo), hi)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """``a`` where ``cond`` else ``b``."""
        return self.xp.where(cond, *self._arrays(a, b))

    def greater(self, a: Any, b: Any) -> Any:
        """``a > b`` (boolean array)."""
        return a > _py(b)

    def less(self, a: Any, b: Any) -> Any:
        """``a < b`` (boolean array)."""
        return a < _py(b)

    def not_equal(self, a: Any, b: Any) -> Any:
        """``a != b`` (boolean array)."""
        return a != _py(b)

    def pow(self, a: Any, q: Any) -> Any:
        """``a ** q`` (not correctly rounded on every backend: norms only)."""
        return self.xp.pow(a, _py(q))

    def count_nonzero(self, a: Any) -> int:
        """The number of non-zero elements of ``a`` (NaN counts), exactly."""
        return int(self.xp.count_nonzero(a))

    def isfinite(self, a: Any) -> Any:
        """Elementwise finiteness test."""
        return self.xp.isfinite(a)

    # -- shapes, for the library's own reductions ----------------------------------
    def flatten(self, a: Any) -> Any:
        """``a`` as a one-dimensional array (C order)."""
        return self.xp.reshape(a, (-1,))

    def concat(self, arrays: list[Any]) -> Any:
        """One-dimensional arrays joined end to end."""
        return self.xp.concat(arrays)

    def to_host(self, a: Any) -> Any:
        """A 0-d array's value as a host numpy scalar of its dtype (a sync)."""
        return np.asarray(self.to_numpy(a))[()]

    def to_numpy(self, a: Any) -> np.ndarray:
        """A numpy copy of ``a`` (for tests, reports and checkpoints)."""
        return np.asarray(a)

    def device(self, x: Any) -> Any:
        """The device of ``x`` (compared with ``==``; ``None`` if it has none)."""
        return getattr(x, "device", None)

    def rewrap(self, old: Any, new: Any) -> Any:
        """``new``, a new value of parameter ``old``, as the same kind of array.

        ``update`` calls it on each new parameter; the torch adapter keeps an
        ``nn.Parameter`` a Parameter (and ``requires_grad``). Here: ``new``.
        """
        return new

    # -- memory ---------------------------------------------------------------------
    def memory_key(self, x: Any) -> Any:
        """A hashable naming the buffer that ``x`` views, or ``None`` (not checked).

        Arrays with different keys never share memory; ``update_`` compares the
        arrays of one key with :meth:`overlaps`. ``None`` (the default: arrays
        that are never written in place) means no overlap check.
        """
        return None

    def memory_span(self, x: Any) -> tuple[int, int] | None:
        """The byte range ``[start, end)`` that ``x``'s elements lie in, or ``None``."""
        return None

    def overlaps(self, a: Any, b: Any) -> bool:
        """Whether ``a`` and ``b`` (of one :meth:`memory_key`) share an element."""
        return True

    # -- writing --------------------------------------------------------------------
    def writeable(self, x: Any) -> bool:
        """Whether ``x`` can be updated in place."""
        return False

    def subtract_(self, x: Any, step: Any) -> None:
        """``x <- x - step`` in place; only called when ``writeable(x)``."""
        raise TypeError(f"{self.name} arrays cannot be written in place")

    def assign_(self, x: Any, value: Any) -> None:
        """``x <- value`` in place; only called when ``writeable(x)``."""
        raise TypeError(f"{self.name} arrays cannot be written in place")

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Context entered around a whole update.

        Host scalars are numpy scalars, so numpy's floating-point warnings are
        silenced here (Julia does not warn on overflow or 0/0 either).
        """
        with np.errstate(all="ignore"):
            yield

    # -- helpers --------------------------------------------------------------------
    def _arrays(self, a: Any, b: Any) -> tuple[Any, Any]:
        return _py(a), _py(b)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        """One real (or same-kind complex) ``+ - * /``; backends override this."""
        return op(a, b)

    def _max(self, a: Any, b: Any) -> Any:
        """The backend's NaN-propagating maximum (any tie-break between zeros)."""
        return self.xp.maximum(a, b)

    def _min(self, a: Any, b: Any) -> Any:
        """The backend's NaN-propagating minimum (any tie-break between zeros)."""
        return self.xp.minimum(a, b)

    def _zero_ties(self, r: Any, a: Any, b: Any, *, upper: bool) -> Any:
        """``r`` with the signed zero of ``max``/``min`` where ``a``, ``b`` are zeros."""
        if (_is_scalar(a) and a != 0) or (_is_scalar(b) and b != 0):
            return r
        if _is_scalar(a):
            both = b == 0
        elif _is_scalar(b):
            both = a == 0
        else:
            both = self.xp.logical_and(a == 0, b == 0)
        if upper:  # +0 unless both are -0: (-0) + (-0) = -0, any other sum is +0
            tie = self._apply(operator.add, a, b)
        else:  # -0 unless both are +0: -((-a) - b)
            tie = self.negative(self._apply(operator.sub, self.negative(a), b))
        return self.where(both, tie, r)

    def _binary(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        a, b = _py(a), _py(b)
        if self._mixed_complex(a, b):
            return self._componentwise(op, a, b)
        return self._apply(op, a, b)

    def _mixed_complex(self, a: Any, b: Any) -> bool:
        ca = not _is_scalar(a) and self.is_complex(a)
        cb = not _is_scalar(b) and self.is_complex(b)
        return ca != cb

    def _componentwise(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        """A complex array combined with a real one, part by part."""
        if _is_scalar(a) or not self.is_complex(a):
            if op in (operator.add, operator.mul):
                return self._componentwise(op, b, a)
            if op is operator.sub:  # r - z = (r - re) + (-im)i
                return self.make_complex(
                    self._apply(op, a, self.xp.real(b)), self.negative(self.xp.imag(b))
                )
            msg = "dividing a real by a complex array is not an operation of any rule"
            raise TypeError(msg)
        re, im = self.xp.real(a), self.xp.imag(a)
        if op in (operator.add, operator.sub):
            return self.make_complex(self._apply(op, re, b), im)
        return self.make_complex(self._apply(op, re, b), self._apply(op, im, b))

    def make_complex(self, re: Any, im: Any) -> Any:
        """The complex array ``re + im*i`` with both parts kept exactly."""
        return (
            self.xp.complex(re, im)
            if hasattr(self.xp, "complex")
            else _no_complex(self)
        )


def _no_complex(adapter: Adapter) -> Any:
    msg = f"{adapter.name}: this adapter cannot build complex arrays from parts"
    raise TypeError(msg)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, complex))


def _py(value: Any) -> Any:
    """A host numpy scalar as the Python number of the same value."""
    if isinstance(value, np.generic):
        return value.item()
    return value
