"""Deterministic test data: parameters and gradient pools, built from bits.

The values are assembled field by field (sign, exponent, mantissa) from a
counter-based hash (SplitMix64 in numpy ``uint64`` arithmetic), never from
numpy's random distributions or ``exp``/``log``: the same inputs come out on
every platform and numpy version, which the committed golden trajectories
need.

Data sets
---------
``normal``
    Gradients ``±m·2^e`` with ``e`` uniform in ``[-12, 3]``: mixed magnitudes,
    every mantissa bit random.
``special``
    The same, and also ``+0``, ``-0``, values whose squares are subnormal or
    zero (about 1e-20 and 1e-30 in float32), subnormal values, and huge values
    whose squares overflow. Each special kind holds about 1/400 of the elements
    in every gradient of the pool (so moments settle in the subnormal range)
    and another 1/400 in single gradients; huge values hold 1/4000. Rare enough
    that the CPUs' slow subnormal arithmetic does not dominate the run time.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = [
    "DATASETS",
    "POOL",
    "bit_values",
    "gradient_pool",
    "initial_parameter",
    "real_dtype",
]

#: The gradient data sets.
DATASETS = ("normal", "special")

#: Number of distinct gradients, cycled (7 is prime to AccumGrad's periods).
POOL = 7

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

#: Bits of each real float dtype.
_BITS = {"float16": 16, "float32": 32, "float64": 64}

#: Exponent of "tiny" values: their squares underflow to subnormal or zero.
_TINY_EXP = {"float16": -13, "float32": -66, "float64": -531}

#: Exponent of "huge" values: their squares overflow.
_HUGE_EXP = {"float16": 14, "float32": 100, "float64": 996}


def real_dtype(dtype: str) -> str:
    """The real dtype of ``dtype`` (``complex64`` -> ``float32``)."""
    return {"complex64": "float32", "complex128": "float64"}.get(dtype, dtype)


def _hash(seed: int, n: int) -> np.ndarray:
    """``n`` 64-bit words of SplitMix64 from ``seed`` (exactly reproducible)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    z = (np.arange(1, n + 1, dtype=np.uint64) * golden + np.uint64(seed)) & _MASK64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Bits:
    """A stream of independent random words, drawn ``n`` at a time."""

    def __init__(self, label: str) -> None:
        self.seed = zlib.crc32(label.encode())
        self.calls = 0

    def words(self, n: int) -> np.ndarray:
        self.calls += 1
        return _hash(self.seed * 7919 + self.calls * 1_000_003, n)

    def uniform_int(self, n: int, lo: int, hi: int) -> np.ndarray:
        """Integers uniform in ``[lo, hi]`` (modulo bias is negligible here)."""
        span = np.uint64(hi - lo + 1)
        return (self.words(n) % span).astype(np.int64) + lo


def _assemble(
    dtype: str, sign: np.ndarray, exponent: np.ndarray, mantissa: np.ndarray
) -> np.ndarray:
    """``(-1)^sign · 1.mantissa · 2^exponent`` built in float64, rounded to ``dtype``.

    The float64 value is exact (any exponent in float64's normal range); the
    conversion to ``dtype`` is one correctly rounded cast.
    """
    field = (exponent + 1023).astype(np.uint64)
    word = (sign.astype(np.uint64) << np.uint64(63)) | (field << np.uint64(52))
    word |= mantissa & np.uint64((1 << 52) - 1)
    return word.view(np.float64).astype(dtype)


def _real(
    dtype: str, dataset: str, n: int, stream: _Bits, exponents: tuple[int, int]
) -> np.ndarray:
    sign = stream.words(n) & np.uint64(1)
    values = _assemble(dtype, sign, stream.uniform_int(n, *exponents), stream.words(n))
    if dataset == "normal":
        return values
    if dataset != "special":
        msg = f"unknown data set {dataset!r}; expected one of {DATASETS}"
        raise ValueError(msg)
    bits = _BITS[dtype]
    # kinds 0..4 (each 1/400): fixed per element for the whole pool, so state
    # settles in the subnormal and zero ranges; as many more vary per gradient
    fixed = _Bits(f"kinds-{dtype}-{n}")
    kind = fixed.uniform_int(n, 0, 399)
    kind = np.where(kind < 5, kind, stream.uniform_int(n, 0, 399))
    rare = fixed.uniform_int(n, 0, 3999) == 0
    tiny = _TINY_EXP[dtype]
    mant = stream.words(n)
    scaled = {
        2: _assemble(dtype, sign, stream.uniform_int(n, tiny - 3, tiny + 3), mant),
        3: _assemble(
            dtype, sign, stream.uniform_int(n, 3 * tiny // 2 - 3, 3 * tiny // 2), mant
        ),
        5: _assemble(dtype, sign, np.full(n, _HUGE_EXP[dtype]), mant),
    }
    values = np.where(kind == 2, scaled[2], values)
    values = np.where(kind == 3, scaled[3], values)
    subnormal = (sign << np.uint64(bits - 1)) | (mant & np.uint64(1023)) | np.uint64(1)
    subnormal = subnormal.astype(np.dtype(f"u{bits // 8}")).view(dtype)
    values = np.where(kind == 4, subnormal, values)
    values = np.where(kind == 0, np.zeros((), dtype), values)
    values = np.where(kind == 1, -np.zeros((), dtype), values)
    values = np.where(rare, scaled[5], values)
    return values.astype(dtype)


def _array(
    dtype: str, dataset: str, n: int, label: str, exponents: tuple[int, int]
) -> np.ndarray:
    stream = _Bits(f"{label}-{dtype}-{dataset}-{n}")
    real = real_dtype(dtype)
    re = _real(real, dataset, n, stream, exponents)
    if real == dtype:
        return re
    out = np.empty(n, dtype=dtype)
    out.real = re
    out.imag = _real(real, dataset, n, stream, exponents)
    return out


def bit_values(
    dtype: str, size: int, label: str, exponents: tuple[int, int]
) -> np.ndarray:
    """``size`` values ``±m·2^e``, ``e`` uniform in ``exponents``, from ``label``'s stream.

    The same label gives the same values on every platform.
    """
    return _array(dtype, "normal", size, label, exponents)


def _tiled(make: np.ndarray, size: int) -> np.ndarray:
    return make if make.size == size else np.resize(make, size)


def initial_parameter(dtype: str, size: int, period: int | None = None) -> np.ndarray:
    """The starting parameter: ``size`` values ``±m·2^e``, ``e`` in ``[-3, 1]``.

    With ``period``, the first ``period`` values repeat to fill ``size``
    (the golden files use this to compress; every element is still computed).
    """
    n = size if period is None else min(size, period)
    return _tiled(_array(dtype, "normal", n, "parameter", (-3, 1)), size)


def gradient_pool(
    dtype: str, dataset: str, size: int, period: int | None = None
) -> list[np.ndarray]:
    """:data:`POOL` gradients of ``size`` elements from data set ``dataset``.

    ``period`` repeats values as in :func:`initial_parameter`.
    """
    n = size if period is None else min(size, period)
    return [
        _tiled(_array(dtype, dataset, n, f"gradient{k}", (-12, 3)), size)
        for k in range(POOL)
    ]
