"""A p-norm that gives the same bits on every backend and any thread count.

Backends reduce in different orders (numpy pairwise in blocks of 8, torch
cascade sums split by thread, CUB trees on GPUs), so their ``sum`` differs in
the last bits. Here the reduction is the library's own: the flattened array is
padded to a power of two with the operation's identity, then halves are added
(or maxed) elementwise until one element is left. Each level is one correctly
rounded elementwise operation, so the result is fixed by the data alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from agnosticopt._xp import adapter_for

__all__ = ["norm", "pairwise_reduce"]


def pairwise_reduce(
    xp: Any, a: Any, combine: Callable[[Any, Any], Any], identity: Any
) -> Any:
    """Reduce ``a`` to a 0-d array by a fixed binary tree of ``combine`` calls.

    Parameters
    ----------
    xp
        The adapter of ``a``.
    a
        Any array; it is flattened in C order.
    combine
        An elementwise binary operation of ``xp`` (e.g. ``xp.add``).
    identity
        The value padding uses (0 for sums and maxima of ``|g|``, ``inf`` for
        minima).
    """
    flat = xp.flatten(a)
    n = xp.size(flat)
    if n == 0:
        msg = "pairwise_reduce needs at least one element"
        raise ValueError(msg)
    width = 1 << (n - 1).bit_length()
    if width > n:
        flat = xp.concat([flat, xp.full_like(flat[: width - n], identity)])
    while width > 1:
        width //= 2
        flat = combine(flat[:width], flat[width:])
    return flat[0]


def norm(dx: Any, p: float = 2.0) -> Any:
    """The p-norm of array ``dx`` as a host scalar in its real dtype.

    Parameters
    ----------
    dx
        A floating-point or complex array of any backend with an adapter. An
        integer or bool array is converted to float64 first (as Julia's
        ``norm`` of integers is a ``Float64``; integers beyond 2**53 round), and
        the result is a float64.
    p
        2, 1, ``inf``, ``-inf`` and 0 (the count of non-zeros) are exact and
        identical on every backend. Other ``p`` use ``pow``, whose rounding
        varies by backend and CPU (up to a few ulp): same bits are not promised.

    Notes
    -----
    For complex arrays ``|z|`` is ``sqrt(re² + im²)`` with a correctly rounded
    square root (not ``hypot``), so it overflows where ``hypot`` would not.
    An empty array has norm 0 (and ``inf`` for ``p = -inf``).
    """
    xp = adapter_for(dx)
    if xp is None:
        msg = f"norm expects an array, got {type(dx).__name__}"
        raise TypeError(msg)
    if not xp.is_trainable(dx):
        dx = _as_float64(xp, dx)
    real = xp.scalar_type(dx)
    if xp.size(dx) == 0:
        return real(math.inf) if p == -math.inf else real(0)
    if p == 0:
        return real(xp.count_nonzero(dx))
    if p == 2:
        total = pairwise_reduce(xp, xp.abs2(dx), xp.add, 0)
        return _sqrt(real(xp.to_host(total)))
    mag = _magnitude(xp, dx)
    if p == 1:
        return real(xp.to_host(pairwise_reduce(xp, mag, xp.add, 0)))
    if p == math.inf:
        return real(xp.to_host(pairwise_reduce(xp, mag, xp.maximum, 0)))
    if p == -math.inf:
        return real(xp.to_host(pairwise_reduce(xp, mag, xp.minimum, math.inf)))
    q = real(p)
    total = real(xp.to_host(pairwise_reduce(xp, xp.pow(mag, q), xp.add, 0)))
    return total ** (real(1) / q)


def _as_float64(xp: Any, dx: Any) -> Any:
    name = xp.dtype_name(dx)
    if not (name.startswith(("int", "uint")) or name == "bool"):
        msg = f"norm expects a floating-point, complex, integer or bool array, got {name}"
        raise TypeError(msg)
    out = xp.astype(dx, "float64")
    if xp.dtype_name(out) != "float64":
        msg = (
            f"norm of a {xp.name} {name} array computes in float64, which this backend "
            f"does not have here (it gave {xp.dtype_name(out)}); convert the array first"
        )
        raise TypeError(msg)
    return out


def _magnitude(xp: Any, dx: Any) -> Any:
    return xp.sqrt(xp.abs2(dx)) if xp.is_complex(dx) else xp.abs(dx)


def _sqrt(value: Any) -> Any:
    import numpy as np

    return np.sqrt(value)
