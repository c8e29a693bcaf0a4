"""CuPy adapter (CUDA): every operation is one IEEE-754 operation in inline PTX.

Not yet run on a GPU: written from CuPy's and PTX's documentation; the test suite
checks it bit for bit against numpy when CuPy and a GPU are present.

Why not CuPy's own ufuncs: CuPy compiles every kernel with ``-ftz=true``
*appended after* the caller's options (``cupy/cuda/compiler.py``,
``_compile_with_cache_cuda``), so float32 arithmetic, comparisons, ``abs``,
negation and float32<->float64 conversions flush subnormal inputs and results
to zero (cupy#8382). Passing ``options=("-ftz=false",)`` to an
``ElementwiseKernel`` does not win over the appended flag according to
third-party measurements (and newer NVRTC reportedly rejects the duplicated
option, so it is not passed); it is unverified here, and so is the report that
even ``__fadd_rn`` flushes under ``-ftz=true``. What the appended flag cannot reach is inline PTX written without
the ``.ftz`` modifier. So each operation here is an ``ElementwiseKernel`` whose
body calls one PTX instruction: ``add/sub/mul/div/sqrt.rn.f32`` (and ``.f64``),
``setp`` comparisons, ``cvt`` conversions; no ``.ftz``, nothing for the compiler
to contract into an FMA (``--fmad=false`` is passed as well, for the C around
it). Selections, ``abs`` and negation work on the bit patterns.

float16 arrays are handed to the kernels as ``uint16`` views, converted to
float32 with ``cvt.f32.f16`` (exact), computed with one float32 instruction and
rounded back once with ``cvt.rn.f16.f32``; float32 has more than ``2*11 + 2``
bits, so this double rounding is innocuous: numpy's float16 result.

Same-dtype copies (``copy``, ``concatenate``, ``reshape``) are taken to be plain
loads and stores, which no flag flushes; ``assign_`` and ``make_complex`` copy
unsigned-integer views to be sure. HIP/ROCm builds are not supported (the
kernels are PTX). ``cupy.fuse`` and CuPy's reductions are never used.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
from agnosticopt.adapters._base import Adapter, _py

__all__ = ["CupyAdapter", "adapter"]

_OPTIONS = ("--fmad=false",)

# One PTX instruction per operation, overloaded for float (f32), double (f64)
# and unsigned short (the bits of a float16, computed through float32).
_PREAMBLE = r"""
#define AGN_BIN(NAME, OP)                                                      \
__device__ __forceinline__ float NAME(float a, float b) {                      \
    float r; asm(OP ".f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; } \
__device__ __forceinline__ double NAME(double a, double b) {                   \
    double r; asm(OP ".f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b)); return r; }
AGN_BIN(agn_add, "add.rn")
AGN_BIN(agn_sub, "sub.rn")
AGN_BIN(agn_mul, "mul.rn")
AGN_BIN(agn_div, "div.rn")

__device__ __forceinline__ float agn_sqrt(float a) {
    float r; asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }
__device__ __forceinline__ double agn_sqrt(double a) {
    double r; asm("sqrt.rn.f64 %0, %1;" : "=d"(r) : "d"(a)); return r; }

#define AGN_CMP(NAME, OP)                                                      \
__device__ __forceinline__ bool NAME(float a, float b) {                       \
    unsigned int r;                                                            \
    asm("{ .reg .pred p; setp." OP ".f32 p, %1, %2; selp.u32 %0, 1, 0, p; }"   \
        : "=r"(r) : "f"(a), "f"(b));                                           \
    return r != 0; }                                                           \
__device__ __forceinline__ bool NAME(double a, double b) {                     \
    unsigned int r;                                                            \
    asm("{ .reg .pred p; setp." OP ".f64 p, %1, %2; selp.u32 %0, 1, 0, p; }"   \
        : "=r"(r) : "d"(a), "d"(b));                                           \
    return r != 0; }
AGN_CMP(agn_gt, "gt")
AGN_CMP(agn_lt, "lt")
AGN_CMP(agn_ne, "neu")
AGN_CMP(agn_unordered, "nan")

__device__ __forceinline__ float agn_h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short agn_f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ double agn_h2d(unsigned short h) {
    double d; asm("cvt.f64.f16 %0, %1;" : "=d"(d) : "h"(h)); return d; }
__device__ __forceinline__ unsigned short agn_d2h(double d) {
    unsigned short h; asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(d)); return h; }
__device__ __forceinline__ double agn_f2d(float f) {
    double d; asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(f)); return d; }
__device__ __forceinline__ float agn_d2f(double d) {
    float f; asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(d)); return f; }

#define AGN_HBIN(NAME)                                                         \
__device__ __forceinline__ unsigned short NAME(unsigned short a, unsigned short b) { \
    return agn_f2h(NAME(agn_h2f(a), agn_h2f(b))); }
AGN_HBIN(agn_add)
AGN_HBIN(agn_sub)
AGN_HBIN(agn_mul)
AGN_HBIN(agn_div)
__device__ __forceinline__ unsigned short agn_sqrt(unsigned short a) {
    return agn_f2h(agn_sqrt(agn_h2f(a))); }
#define AGN_HCMP(NAME)                                                         \
__device__ __forceinline__ bool NAME(unsigned short a, unsigned short b) {     \
    return NAME(agn_h2f(a), agn_h2f(b)); }
AGN_HCMP(agn_gt)
AGN_HCMP(agn_lt)
AGN_HCMP(agn_ne)
AGN_HCMP(agn_unordered)

__device__ __forceinline__ unsigned int agn_bits(float a) { return __float_as_uint(a); }
__device__ __forceinline__ unsigned long long agn_bits(double a) {
    return (unsigned long long)__double_as_longlong(a); }
__device__ __forceinline__ unsigned short agn_bits(unsigned short a) { return a; }
__device__ __forceinline__ float agn_from(float, unsigned int b) { return __uint_as_float(b); }
__device__ __forceinline__ double agn_from(double, unsigned long long b) {
    return __longlong_as_double((long long)b); }
__device__ __forceinline__ unsigned short agn_from(unsigned short, unsigned short b) {
    return b; }

/* IEEE 754-2019 maximum/minimum: NaN wins; for equal operands (+0 and -0
   included) the AND (max) or OR (min) of the bits gives +0 > -0. */
template <typename T> __device__ __forceinline__ T agn_max(T a, T b) {
    if (agn_unordered(a, b)) return agn_unordered(a, a) ? a : b;
    if (agn_gt(a, b)) return a;
    if (agn_lt(a, b)) return b;
    return agn_from(a, agn_bits(a) & agn_bits(b));
}
template <typename T> __device__ __forceinline__ T agn_min(T a, T b) {
    if (agn_unordered(a, b)) return agn_unordered(a, a) ? a : b;
    if (agn_lt(a, b)) return a;
    if (agn_gt(a, b)) return b;
    return agn_from(a, agn_bits(a) | agn_bits(b));
}
/* numpy's sign: NaN stays NaN, sign(+-0) = +0. */
__device__ __forceinline__ float agn_sign(float a) {
    if (agn_unordered(a, a)) return a;
    return agn_gt(a, 0.0f) ? 1.0f : (agn_lt(a, 0.0f) ? -1.0f : 0.0f); }
__device__ __forceinline__ double agn_sign(double a) {
    if (agn_unordered(a, a)) return a;
    return agn_gt(a, 0.0) ? 1.0 : (agn_lt(a, 0.0) ? -1.0 : 0.0); }
__device__ __forceinline__ unsigned short agn_sign(unsigned short a) {
    float f = agn_h2f(a);
    if (agn_unordered(f, f)) return a;
    return agn_gt(f, 0.0f) ? 0x3c00 : (agn_lt(f, 0.0f) ? 0xbc00 : 0); }
"""


def _kernel(name: str, params_in: str, params_out: str, body: str) -> Any:
    return cupy.ElementwiseKernel(
        params_in,
        params_out,
        body,
        f"agnosticopt_{name}",
        preamble=_PREAMBLE,
        options=_OPTIONS,
    )


_BINARY = {
    operator.add: _kernel("add", "T x, T y", "T z", "z = agn_add(x, y)"),
    operator.sub: _kernel("sub", "T x, T y", "T z", "z = agn_sub(x, y)"),
    operator.mul: _kernel("mul", "T x, T y", "T z", "z = agn_mul(x, y)"),
    operator.truediv: _kernel("div", "T x, T y", "T z", "z = agn_div(x, y)"),
}
_MAX = _kernel("max", "T x, T y", "T z", "z = agn_max(x, y)")
_MIN = _kernel("min", "T x, T y", "T z", "z = agn_min(x, y)")
_SQRT = _kernel("sqrt", "T x", "T z", "z = agn_sqrt(x)")
_SIGN = _kernel("sign", "T x", "T z", "z = agn_sign(x)")
_GREATER = _kernel("greater", "T x, T y", "bool z", "z = agn_gt(x, y)")
_LESS = _kernel("less", "T x, T y", "bool z", "z = agn_lt(x, y)")
_NOT_EQUAL = _kernel("not_equal", "T x, T y", "bool z", "z = agn_ne(x, y)")
# On unsigned views of the bits:
_AND = _kernel("and", "U x, U m", "U z", "z = x & m")
_XOR = _kernel("xor", "U x, U m", "U z", "z = x ^ m")
_SELECT = _kernel("select", "bool c, U x, U y", "U z", "z = c ? x : y")
_CASTS = {
    ("float16", "float32"): ("uint16", "float32", "agn_h2f(x)"),
    ("float16", "float64"): ("uint16", "float64", "agn_h2d(x)"),
    ("float32", "float16"): ("float32", "uint16", "agn_f2h(x)"),
    ("float32", "float64"): ("float32", "float64", "agn_f2d(x)"),
    ("float64", "float16"): ("float64", "uint16", "agn_d2h(x)"),
    ("float64", "float32"): ("float64", "float32", "agn_d2f(x)"),
}
_CAST_KERNELS = {
    pair: _kernel(f"cast_{pair[0]}_{pair[1]}", f"{a} x", f"{b} z", f"z = {body}")
    for pair, (a, b, body) in _CASTS.items()
}

_UINT: dict[int, np.dtype[Any]] = {
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}
_REAL = {"complex64": "float32", "complex128": "float64"}


def _bits(x: Any) -> Any:
    """The unsigned-integer view of a float array (same memory)."""
    return x.view(_UINT[x.dtype.itemsize])


def _sign_bit(dtype: np.dtype) -> Any:
    return _UINT[dtype.itemsize].type(1 << (8 * dtype.itemsize - 1))


def _complex(v: Any) -> bool:
    return isinstance(v, complex) or (
        isinstance(v, cupy.ndarray) and v.dtype.kind == "c"
    )


def _part(v: Any, *, real: bool) -> Any:
    """The real or imaginary part of a complex (or real) array or scalar."""
    if isinstance(v, cupy.ndarray):
        if v.dtype.kind != "c":
            return v if real else cupy.zeros_like(v)
        return v.real if real else v.imag
    value = complex(v)
    return value.real if real else value.imag


class CupyAdapter(Adapter):
    """Adapter for ``cupy.ndarray`` (CUDA)."""

    fixes: tuple[str, ...] = (
        "one inline-PTX instruction per operation, no .ftz (CuPy adds -ftz=true)",
        "no FMA contraction (one instruction per kernel, --fmad=false)",
        "float16 through float32 with one rounding (cvt.rn.f16.f32)",
        "abs, negation and where on the bit patterns",
        "maximum/minimum: NaN wins, +0 > -0; sign: NaN stays NaN",
    )

    def __init__(self) -> None:
        super().__init__(cupy, "cupy")

    # -- dtypes and creation ------------------------------------------------------
    def dtype_name(self, x: Any) -> str:
        return str(x.dtype.name)

    def dtype(self, name: str) -> Any:
        return np.dtype(name)

    def astype(self, x: Any, name: str) -> Any:
        src = x.dtype.name
        if src == name:
            return x.copy()
        if src in _REAL and name in _REAL:
            return self.make_complex(
                self.astype(x.real, _REAL[name]), self.astype(x.imag, _REAL[name])
            )
        kernel = _CAST_KERNELS.get((src, name))
        if kernel is None:  # integer and bool conversions are exact
            return x.astype(name)
        out = kernel(_bits(x) if src == "float16" else x)
        return out.view(np.float16) if name == "float16" else out

    def copy(self, x: Any) -> Any:
        return x.copy()

    def real_zeros_like(self, x: Any) -> Any:
        return cupy.zeros_like(x, dtype=_REAL.get(x.dtype.name, x.dtype))

    def full_like(self, x: Any, value: Any, *, real: bool = False) -> Any:
        dtype = np.dtype(_REAL.get(x.dtype.name, x.dtype)) if real else x.dtype
        if dtype.kind == "c":
            re = self.full_like(x, np.real(value), real=True)
            return self.make_complex(re, self.full_like(x, np.imag(value), real=True))
        # Fill with the bit pattern: no float conversion on the device.
        bits = np.asarray(_py(value), dtype=dtype).view(_UINT[dtype.itemsize])
        return cupy.full(x.shape, bits[()], dtype=bits.dtype).view(dtype)

    def make_complex(self, re: Any, im: Any) -> Any:
        if re.dtype not in (np.float32, np.float64) or im.dtype != re.dtype:
            msg = f"cupy adapter: no complex type for parts {re.dtype}, {im.dtype}"
            raise TypeError(msg)
        complex_dtype = np.result_type(re.dtype, np.complex64)
        out = cupy.empty(cupy.broadcast(re, im).shape, dtype=complex_dtype)
        cupy.copyto(_bits(out.real), _bits(re))  # same-dtype copies move bits
        cupy.copyto(_bits(out.imag), _bits(im))
        return out

    # -- arithmetic -----------------------------------------------------------------
    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        # Mixed complex/real operands were split into parts by the base class.
        if _complex(a) or _complex(b):
            if op in (operator.add, operator.sub):  # part by part
                re = self._apply(op, _part(a, real=True), _part(b, real=True))
                im = self._apply(op, _part(a, real=False), _part(b, real=False))
                return self.make_complex(re, im)
            return op(a, b)  # complex x complex: not an operation of any rule
        return self._run(_BINARY[op], a, b)

    def negative(self, a: Any) -> Any:
        if a.dtype.kind == "c":
            return self.make_complex(self.negative(a.real), self.negative(a.imag))
        return _XOR(_bits(a), _sign_bit(a.dtype)).view(a.dtype)

    def sqrt(self, a: Any) -> Any:
        return self._run(_SQRT, a)

    def abs(self, a: Any) -> Any:
        mask = _UINT[a.dtype.itemsize].type(int(_sign_bit(a.dtype)) - 1)
        return _AND(_bits(a), mask).view(a.dtype)

    def sign(self, a: Any) -> Any:
        return self._run(_SIGN, a)

    def maximum(self, a: Any, b: Any) -> Any:
        return self._run(_MAX, _py(a), _py(b))

    def minimum(self, a: Any, b: Any) -> Any:
        return self._run(_MIN, _py(a), _py(b))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        a, b = _py(a), _py(b)
        like = a if isinstance(a, cupy.ndarray) else b
        dtype = like.dtype
        out = _SELECT(cond, self._bit_operand(a, dtype), self._bit_operand(b, dtype))
        return out.view(dtype)

    def greater(self, a: Any, b: Any) -> Any:
        return self._run(_GREATER, a, _py(b), keep=True)

    def less(self, a: Any, b: Any) -> Any:
        return self._run(_LESS, a, _py(b), keep=True)

    def not_equal(self, a: Any, b: Any) -> Any:
        return self._run(_NOT_EQUAL, a, _py(b), keep=True)

    def isfinite(self, a: Any) -> Any:
        return cupy.isfinite(a)  # exponent test: subnormals are finite either way

    # -- shapes and the host -------------------------------------------------------
    def flatten(self, a: Any) -> Any:
        return cupy.reshape(a, (-1,))

    def concat(self, arrays: list[Any]) -> Any:
        return cupy.concatenate(arrays)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(cupy.asnumpy(a))

    # -- writing ---------------------------------------------------------------------
    def writeable(self, x: Any) -> bool:
        """CuPy arrays are writeable, except broadcast views sharing elements."""
        return isinstance(x, cupy.ndarray) and not any(
            stride == 0 and n > 1 for stride, n in zip(x.strides, x.shape, strict=True)
        )

    def subtract_(self, x: Any, step: Any) -> None:
        if x.dtype.kind == "c":
            self.subtract_(x.real, _part(step, real=True))
            self.subtract_(x.imag, _part(step, real=False))
            return
        view = _bits(x) if x.dtype == np.float16 else x
        _BINARY[operator.sub](view, self._operand(step, x.dtype), view)

    def assign_(self, x: Any, value: Any) -> None:
        if x.dtype.kind == "c":
            self.assign_(x.real, _part(value, real=True))
            self.assign_(x.imag, _part(value, real=False))
        elif x.dtype.kind == "f" and isinstance(value, cupy.ndarray):
            cupy.copyto(_bits(x), _bits(value))  # integer copies move bits
        else:
            cupy.copyto(x, value)

    # -- helpers -----------------------------------------------------------------------
    def _operand(self, v: Any, dtype: np.dtype) -> Any:
        """An array as the kernels see it (float16 as bits), or a typed scalar."""
        if isinstance(v, cupy.ndarray):
            return _bits(v) if v.dtype == np.float16 else v
        if dtype == np.float16:
            return np.asarray(v, dtype=np.float16).view(np.uint16)[()]
        return dtype.type(v)

    def _bit_operand(self, v: Any, dtype: np.dtype) -> Any:
        if isinstance(v, cupy.ndarray):
            return _bits(v)
        return np.asarray(v, dtype=dtype).view(_UINT[dtype.itemsize])[()]

    def _run(self, kernel: Any, *args: Any, keep: bool = False) -> Any:
        """Call ``kernel`` on float16 bits or floats; ``keep``: bool result."""
        arrays = [v for v in args if isinstance(v, cupy.ndarray)]
        dtype = arrays[0].dtype
        for v in arrays[1:]:
            if v.dtype != dtype:
                msg = f"cupy adapter: mixed dtypes {dtype} and {v.dtype}"
                raise TypeError(msg)
        out = kernel(*(self._operand(v, dtype) for v in args))
        if keep or dtype != np.float16:
            return out
        return out.view(np.float16)


_ADAPTER = CupyAdapter()


def adapter(x: Any) -> Adapter | None:
    """The CuPy adapter for a ``cupy.ndarray``."""
    return _ADAPTER if isinstance(x, cupy.ndarray) else None
