"""Bitwise comparison of snapshots (parameters and state), with ulp distances.

A *snapshot* is an ordered mapping from a path (``"x"``, ``"state.m"``,
``"state[1].v"``) to a numpy array or a host scalar. Two snapshots are identical
when they have the same paths, every array has the same dtype, shape and bits,
and every host scalar the same type and value. NaNs compare equal whatever their
sign and payload (backends differ in the default NaN); every other bit pattern,
the sign of zero included, must match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Comparison", "Difference", "compare", "hexfloat", "ulp_distance"]

Snapshot = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Difference:
    """How one entry of a snapshot differs from the reference.

    Attributes
    ----------
    path
        The entry (``"x"`` is the parameter, ``"state..."`` the state).
    count, size
        Differing elements, and the number of elements.
    index
        The first differing element (an index into the flattened array), or
        ``None`` when the entries cannot be compared element by element.
    got, want
        The values there (the entries themselves for host scalars).
    max_ulp
        The largest distance in units in the last place (``inf`` when a NaN
        meets a number or the dtypes differ; ``-0`` and ``+0`` are 1 apart).
    reason
        Set when the entries cannot be compared element by element.
    """

    path: str
    count: int
    size: int
    index: int | None
    got: Any
    want: Any
    max_ulp: float
    reason: str = ""

    def describe(self) -> str:
        """One line: where, how many, and the first differing element."""
        if self.reason:
            return f"{self.path}: {self.reason}"
        where = "" if self.index is None else f" at [{self.index}]"
        return (
            f"{self.path}: {self.count} of {self.size} elements differ "
            f"(max {format_ulp(self.max_ulp)}); first{where}: got {_show(self.got)}, "
            f"want {_show(self.want)}"
        )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The differences between a snapshot and its reference (empty: identical)."""

    differences: tuple[Difference, ...]

    @property
    def identical(self) -> bool:
        """Whether every entry has the same bits."""
        return not self.differences

    @property
    def max_ulp(self) -> float:
        """The largest ulp distance over all entries (0 when identical)."""
        return max((d.max_ulp for d in self.differences), default=0.0)

    @property
    def first(self) -> Difference | None:
        """The first differing entry, in snapshot order (parameter first)."""
        return self.differences[0] if self.differences else None

    def describe(self) -> str:
        """Every difference, one per line."""
        return "\n".join(d.describe() for d in self.differences) or "identical"


def format_ulp(ulp: float) -> str:
    """``"3 ulp"``, or ``"NaN/inf or dtype"`` for an infinite distance."""
    if math.isinf(ulp):
        return "inf ulp"
    return f"{ulp:.0f} ulp"


def hexfloat(value: Any) -> str:
    """The bits of a float or complex scalar in hex (``0x3f800000``)."""
    a = np.asarray(value)
    if a.dtype.kind == "c":
        return "(" + ", ".join(hexfloat(part) for part in (a.real, a.imag)) + ")"
    if a.dtype.kind != "f":
        return repr(value)
    width = a.dtype.itemsize
    return f"0x{int(a.reshape(()).view(f'u{width}')):0{2 * width}x}"


def _show(value: Any) -> str:
    if isinstance(value, (np.floating, np.complexfloating)):
        return f"{value!r} ({hexfloat(value)})"
    return repr(value)


def _canonical(a: np.ndarray) -> np.ndarray:
    """``a`` as real floats (complex split into parts), every NaN the same NaN."""
    a = np.array(a, copy=True).reshape(-1)  # 1-d: a 0-d complex array has no view
    if a.dtype.kind == "c":
        a = a.view(a.real.dtype)
    if a.dtype.kind == "f":
        a[np.isnan(a)] = np.nan
    return a


def _ordered(a: np.ndarray) -> np.ndarray:
    """Float bits mapped to int64 so that consecutive floats are consecutive.

    ``+0`` maps to 0 and ``-0`` to -1, so the two zeros are 1 ulp apart.
    """
    width = a.dtype.itemsize
    signed = a.view(f"i{width}").astype(np.int64)
    magnitude = signed & np.int64((1 << (8 * width - 1)) - 1)
    return np.where(signed < 0, -magnitude - 1, magnitude)


def ulp_distance(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Elementwise distance in ulps of two float arrays of one dtype (as float64).

    Complex arrays count each part (the result has twice the elements). Two
    NaNs are 0 apart, a NaN and a number ``inf``. Distances below 2**53 are
    exact.
    """
    g, w = _canonical(got), _canonical(want)
    og, ow = _ordered(g), _ordered(w)
    same_side = (og < 0) == (ow < 0)
    # same sign: the int64 difference cannot overflow; else it may, so use floats
    exact = np.abs(np.where(same_side, og - np.where(same_side, ow, og), 0))
    dist = np.where(
        same_side,
        exact.astype(np.float64),
        np.abs(og.astype(np.float64) - ow.astype(np.float64)),
    )
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    dist[nan_g & nan_w] = 0.0
    dist[nan_g != nan_w] = np.inf
    return dist


def _compare_arrays(path: str, got: Any, want: np.ndarray) -> Difference | None:
    if not isinstance(got, np.ndarray):
        return Difference(
            path,
            1,
            want.size,
            None,
            got,
            want,
            math.inf,
            f"expected an array, got {type(got).__name__}",
        )
    if got.dtype != want.dtype or got.shape != want.shape:
        return Difference(
            path,
            want.size,
            want.size,
            None,
            got.dtype,
            want.dtype,
            math.inf,
            f"got {got.dtype} {got.shape}, want {want.dtype} {want.shape}",
        )
    if want.dtype.kind not in "fc":
        diff = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        if diff.size == 0:
            return None
        i = int(diff[0])
        return Difference(
            path,
            diff.size,
            want.size,
            i,
            got.reshape(-1)[i],
            want.reshape(-1)[i],
            math.inf,
        )
    g, w = _canonical(got), _canonical(want)
    width = g.dtype.itemsize
    differ = (g.view(f"u{width}") != w.view(f"u{width}")).reshape(-1)
    if want.dtype.kind == "c":  # one flag per complex element
        differ = differ.reshape(-1, 2).any(axis=1)
    found = np.flatnonzero(differ)
    if found.size == 0:
        return None
    i = int(found[0])
    return Difference(
        path,
        int(found.size),
        int(want.size),
        i,
        got.reshape(-1)[i],
        want.reshape(-1)[i],
        float(ulp_distance(got, want).max()),
    )


def _compare_scalars(path: str, got: Any, want: Any) -> Difference | None:
    if type(got) is not type(want):
        return Difference(
            path,
            1,
            1,
            None,
            got,
            want,
            math.inf,
            f"got {type(got).__name__} {got!r}, want {type(want).__name__} {want!r}",
        )
    if isinstance(want, (float, complex, np.floating, np.complexfloating)):
        # bits, not ==: -0.0 differs from 0.0 and NaN matches NaN, as in arrays
        found = _compare_arrays(path, np.asarray(got), np.asarray(want))
        if found is None:
            return None
        return dataclasses.replace(found, index=None, got=got, want=want, size=1)
    if got == want:
        return None
    return Difference(path, 1, 1, None, got, want, math.inf)


def compare(got: Snapshot, want: Snapshot) -> Comparison:
    """Compare snapshot ``got`` with the reference ``want``, entry by entry.

    Parameters
    ----------
    got, want
        Mappings from path to numpy array or host scalar, as made by
        :func:`agnosticopt.conformance.snapshot`.

    Returns
    -------
    Comparison
        One :class:`Difference` per differing entry, in ``want``'s order; a path
        present in only one of them is a difference too.
    """
    found: list[Difference] = []
    for path, w in want.items():
        if path not in got:
            found.append(
                Difference(
                    path,
                    1,
                    1,
                    None,
                    None,
                    w,
                    math.inf,
                    "missing: the state structure differs",
                )
            )
            continue
        g = got[path]
        if isinstance(w, np.ndarray):
            diff = _compare_arrays(path, g, w)
        else:
            diff = _compare_scalars(path, g, w)
        if diff is not None:
            found.append(diff)
    found.extend(
        Difference(
            path,
            1,
            1,
            None,
            g,
            None,
            math.inf,
            "unexpected: the state structure differs",
        )
        for path, g in got.items()
        if path not in want
    )
    return Comparison(tuple(found))
