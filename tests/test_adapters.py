"""Every adapter primitive, bit for bit against the numpy adapter.

Each backend and dtype runs every operation the rules use on arrays of more than
a million elements: random values of every magnitude, random bit patterns (NaN
payloads, subnormals, infinities), subnormals, values near the smallest normal
and near 1, and every pair of special values (NaN, ±0, ±inf, ±1, ±max, ±tiny,
±smallest subnormal, ...). Results are compared as unsigned integers; the only
freedom is NaN, where any NaN matches any NaN (backends differ in the sign and
payload of the NaNs they produce, GPUs always give one canonical NaN).

JAX on CPU reads and writes float32/float64 subnormals as zero: that named
deviation (``JaxAdapter.flushes_subnormals``) is checked exactly against a model
(numpy with every subnormal input and result of a primitive set to ±0), and
identity is checked on data whose inputs and results stay normal.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import subprocess
import sys
import textwrap
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from agnosticopt.adapters import numpy as numpy_adapters
from agnosticopt.adapters._base import Adapter

NP = numpy_adapters.NumpyAdapter()
N = 1_050_000  # elements per array: above a million
UINT: dict[int, Any] = {2: np.uint16, 4: np.uint32, 8: np.uint64}
REAL = {"complex64": "float32", "complex128": "float64"}
FLOATS = ("float16", "float32", "float64")


# -- data ---------------------------------------------------------------------------
def _specials(name: str) -> np.ndarray:
    t = np.dtype(name).type
    f = np.finfo(name)
    tiny, sub, big = float(f.tiny), float(f.smallest_subnormal), float(f.max)
    values = [
        np.nan,
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        1.0,
        -1.0,
        big,
        -big,
        tiny,
        -tiny,
        sub,
        -sub,
        tiny - sub,
        -(tiny - sub),
        3 * sub,
        tiny * 1.5,
        1 + float(f.eps),
        1 - float(f.eps) / 2,
        big / 2,
        0.9,
        -0.9,
        1e-3,
    ]
    values += {
        "float16": [1e-7, -6e-8, 6e4],
        "float32": [1e-40, -1e-40, 1e-39, 3e38],
        "float64": [1e-310, -1e-310, 1e-300, 1e300],
    }[name]
    out = np.array(values, dtype=name)
    out = np.concatenate([out, -out[:1]])  # -NaN as well
    assert out.dtype.type is t
    return out


@functools.cache
def real_data(name: str, seed: int, normal_range: bool = False) -> np.ndarray:
    """A read-only array of ``N`` values of dtype ``name``.

    It starts with every pair of special values (the first element of each pair
    for seed 1, the second for seed 2, so binary operations see all pairs), then
    random blocks, shuffled by ``seed``. ``normal_range``: nonzero finite
    magnitudes in ``[2**-7, 2**7]`` (float16) or ``[2**-20, 2**20]``, so no input
    and no ``+ - * / sqrt`` result is subnormal.
    """
    dtype = np.dtype(name)
    rng = np.random.default_rng(seed)
    spec = _specials(name)
    if normal_range:
        spec = spec[~np.isfinite(spec) | (spec == 0) | (np.abs(spec) == 1)]
    pairs = np.repeat(spec, len(spec)) if seed % 2 else np.tile(spec, len(spec))
    k = (N - len(pairs)) // 6
    if normal_range:
        e = 7 if name == "float16" else 20
        mag = np.exp2(rng.uniform(-e, e, 5 * k)) * rng.choice([-1.0, 1.0], 5 * k)
        blocks = [mag.astype(name), 1 + rng.standard_normal(k).astype(name) / 64]
    else:
        f = np.finfo(name)
        u = UINT[dtype.itemsize]
        span = {"float16": 10, "float32": 87, "float64": 700}[name]
        wide = np.exp(rng.uniform(-span, span, k)) * rng.choice([-1.0, 1.0], k)
        mant = rng.integers(1, 1 << f.nmant, k, dtype=np.int64).astype(u)
        subnormal = mant.view(dtype) * rng.choice(np.array([-1, 1], dtype=name), k)
        blocks = [
            rng.standard_normal(k).astype(name),
            (1 + rng.standard_normal(k) * 1e-3).astype(name),
            np.clip(wide, -float(f.max), float(f.max)).astype(name),
            rng.integers(0, np.iinfo(u).max, k, dtype=u, endpoint=True).view(dtype),
            subnormal,
            (float(f.tiny) * rng.uniform(0.25, 4, k)).astype(name),
        ]
    rest = np.concatenate(blocks)
    rest = np.resize(rest, N - len(pairs))
    rng.shuffle(rest)
    out = np.concatenate([pairs, rest]).astype(name)
    out.flags.writeable = False
    return out


@functools.cache
def data(name: str, seed: int, normal_range: bool = False) -> np.ndarray:
    """Like :func:`real_data`; complex dtypes combine two real arrays."""
    if name not in REAL:
        return real_data(name, seed, normal_range)
    out = np.empty(N, dtype=name)
    out.real = real_data(REAL[name], seed, normal_range)
    out.imag = real_data(REAL[name], seed + 10, normal_range)
    out.flags.writeable = False
    return out


def operands(name: str, normal_range: bool = False) -> dict[str, Any]:
    """Arrays ``a``, ``b`` (of ``name``), ``ra``, ``rb`` (its real dtype) and scalars."""
    real = REAL.get(name, name)
    t = np.dtype(real).type
    return {
        "a": data(name, 1, normal_range),
        "b": data(name, 2, normal_range),
        "ra": data(real, 3, normal_range),
        "rb": data(real, 4, normal_range),
        "s": t(0.9),
        "t": t(1e-3),
        "z": t(-0.0),
        "sub": t(np.finfo(real).smallest_subnormal),
    }


# -- comparing -----------------------------------------------------------------------
def canonical_bits(x: np.ndarray) -> np.ndarray:
    """The bits of ``x`` as unsigned integers, every NaN the same."""
    x = np.asarray(x)
    if x.dtype.kind == "c":
        return np.stack([canonical_bits(x.real), canonical_bits(x.imag)])
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        return x
    x = np.where(np.isnan(x), np.array(np.nan, dtype=x.dtype), x)
    return x.view(UINT[x.dtype.itemsize])


def count_differences(expected: Any, got: Any) -> int | str:
    """The number of elements whose bits differ (a message if dtype or shape do)."""
    expected, got = np.asarray(expected), np.asarray(got)
    if expected.dtype != got.dtype or expected.shape != got.shape:
        return f"got {got.dtype}{got.shape}, expected {expected.dtype}{expected.shape}"
    return int(np.count_nonzero(canonical_bits(expected) != canonical_bits(got)))


def differing(expected: Any, got: Any) -> int:
    """:func:`count_differences` of arrays of the same dtype and shape."""
    count = count_differences(expected, got)
    assert isinstance(count, int), count
    return count


# -- the operations rules use ----------------------------------------------------------
Op = Callable[[Adapter, dict[str, Any]], Any]


def _subtract_in_place(x: Adapter, o: dict[str, Any]) -> Any:
    y = x.copy(o["a"])
    x.subtract_(y, o["b"])
    return y


def _assign_in_place(x: Adapter, o: dict[str, Any]) -> Any:
    y = x.zeros_like(o["a"])
    x.assign_(y, o["a"])
    return y


def _call(method: str, *keys: str) -> Op:
    return lambda x, o: getattr(x, method)(*(o[k] for k in keys))


def _cast(key: str, target: str) -> Op:
    return lambda x, o: x.astype(o[key], target)


def operations(name: str, writeable: bool, casts: tuple[str, ...]) -> dict[str, Op]:
    """Every primitive rules use, as ``op(adapter, operands) -> array``."""
    ops: dict[str, Op] = {}
    arith = {
        "add": "add",
        "subtract": "subtract",
        "multiply": "multiply",
        "divide": "divide",
    }
    cplx = name in REAL
    for label, method in arith.items():
        ops[f"{label}(a,b)"] = _call(method, "a", "b")
        ops[f"{label}(a,s)"] = _call(method, "a", "s")
        ops[f"{label}(a,sub)"] = _call(method, "a", "sub")
        if not (cplx and label == "divide"):  # real / complex: no rule does it
            ops[f"{label}(s,a)"] = _call(method, "s", "a")
        if cplx:
            ops[f"{label}(a,ra)"] = _call(method, "a", "ra")
    if cplx:  # complex x complex and complex / complex are no rule's operations
        del ops["multiply(a,b)"], ops["divide(a,b)"]
        ops["make_complex(ra,rb)"] = lambda x, o: x.make_complex(o["ra"], o["rb"])
    ops |= {
        "negative(a)": lambda x, o: x.negative(o["a"]),
        "abs2(a)": lambda x, o: x.abs2(o["a"]),
        "sqrt(ra)": lambda x, o: x.sqrt(o["ra"]),
        "sqrt(abs(ra))": lambda x, o: x.sqrt(x.abs(o["ra"])),
        "abs(ra)": lambda x, o: x.abs(o["ra"]),
        "sign(ra)": lambda x, o: x.sign(o["ra"]),
        "maximum(ra,rb)": lambda x, o: x.maximum(o["ra"], o["rb"]),
        "minimum(ra,rb)": lambda x, o: x.minimum(o["ra"], o["rb"]),
        "maximum(ra,t)": lambda x, o: x.maximum(o["ra"], o["t"]),
        "maximum(ra,-0)": lambda x, o: x.maximum(o["ra"], o["z"]),
        "minimum(ra,+0)": lambda x, o: x.minimum(o["ra"], -o["z"]),
        "maximum(s,ra)": lambda x, o: x.maximum(o["s"], o["ra"]),
        "clip(ra,-s,s)": lambda x, o: x.clip(o["ra"], -o["s"], o["s"]),
        "clip(ra,-0,+0)": lambda x, o: x.clip(o["ra"], o["z"], -o["z"]),
        "where(ra>rb,a,b)": lambda x, o: x.where(
            x.greater(o["ra"], o["rb"]), o["a"], o["b"]
        ),
        "where(ra<t,ra,s)": lambda x, o: x.where(
            x.less(o["ra"], o["t"]), o["ra"], o["s"]
        ),
        "greater(ra,rb)": lambda x, o: x.greater(o["ra"], o["rb"]),
        "less(ra,rb)": lambda x, o: x.less(o["ra"], o["rb"]),
        "not_equal(ra,rb)": lambda x, o: x.not_equal(o["ra"], o["rb"]),
        "greater(ra,sub)": lambda x, o: x.greater(o["ra"], o["sub"]),
        "less(ra,-0)": lambda x, o: x.less(o["ra"], o["z"]),
        "not_equal(ra,s)": lambda x, o: x.not_equal(o["ra"], o["s"]),
        "isfinite(ra)": lambda x, o: x.isfinite(o["ra"]),
        "zeros_like(a)": lambda x, o: x.zeros_like(o["a"]),
        "real_zeros_like(a)": lambda x, o: x.real_zeros_like(o["a"]),
        "full_like(a,s)": lambda x, o: x.full_like(o["a"], o["s"]),
        "full_like(a,s,real)": lambda x, o: x.full_like(o["a"], o["s"], real=True),
        "full_like(ra,sub)": lambda x, o: x.full_like(o["ra"], o["sub"]),
        "copy(a)": lambda x, o: x.copy(o["a"]),
        "flatten(a)": lambda x, o: x.flatten(o["a"]),
        "concat(ra,rb)": lambda x, o: x.concat([o["ra"], o["rb"]]),
    }
    for target in casts:
        source = "a" if cplx else "ra"
        ops[f"astype({source},{target})"] = _cast(source, target)
    if writeable:
        ops["subtract_(a,b)"] = _subtract_in_place
        ops["assign_(a)"] = _assign_in_place
    return ops


def run_all(
    ops: dict[str, Op],
    reference: Adapter,
    ref_operands: dict[str, Any],
    adapter: Adapter,
    backend_operands: dict[str, Any],
) -> dict[str, int | str]:
    """The number of differing elements of every operation (0 = identical)."""
    result = {}
    for label, op in ops.items():
        with reference.computing():
            expected = reference.to_numpy(op(reference, ref_operands))
        with adapter.computing():
            got = adapter.to_numpy(op(adapter, backend_operands))
        result[label] = count_differences(expected, got)
    return result


def assert_identical(counts: dict[str, int | str]) -> None:
    bad = {k: v for k, v in counts.items() if v != 0}
    assert not bad, f"bits differ from the reference in {bad}"


# -- backends -------------------------------------------------------------------------
def _no_gpu(module: str, check: Callable[[], Any]) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"no GPU: {module} is not installed"
    try:
        return None if check() else "no GPU: CUDA is not available"
    except Exception as exc:  # noqa: BLE001  (any failure means no usable GPU)
        return f"no GPU: {type(exc).__name__}: {exc}"


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cupy_gpu() -> bool:
    import cupy

    return bool(cupy.cuda.runtime.getDeviceCount() > 0)


def _x64() -> bool:
    import jax

    return bool(jax.config.read("jax_enable_x64"))


class ArrayConverter:
    """How to move numpy data to one backend."""

    def __init__(
        self, name: str, dtypes: tuple[str, ...], casts: tuple[str, ...]
    ) -> None:
        self.name, self.dtypes, self.casts = name, dtypes, casts

    def convert(self, a: np.ndarray) -> Any:
        a = np.array(a, copy=True)
        if self.name in ("torch", "torch_cuda"):
            import torch

            t = torch.from_numpy(a)
            return t.cuda() if self.name == "torch_cuda" else t
        if self.name == "array_api_strict":
            import array_api_strict

            return array_api_strict.asarray(a)
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        import cupy

        return cupy.asarray(a)

    def operands(self, o: dict[str, Any]) -> dict[str, Any]:
        return {
            k: self.convert(v) if isinstance(v, np.ndarray) else v for k, v in o.items()
        }

    def adapter(self, o: dict[str, Any]) -> Adapter:
        from agnosticopt import adapter_for

        found = adapter_for(o["a"])
        assert isinstance(found, Adapter)
        return found


ALL = ("float16", "float32", "float64", "complex64", "complex128")
BACKENDS = {
    "torch": (ArrayConverter("torch", ALL, FLOATS), lambda: _missing("torch")),
    "torch_cuda": (
        ArrayConverter("torch_cuda", ALL, FLOATS),
        lambda: _no_gpu("torch", _torch_cuda),
    ),
    "array_api_strict": (
        ArrayConverter("array_api_strict", ALL[1:], ("float32", "float64")),
        lambda: _missing("array_api_strict"),
    ),
    "cupy": (ArrayConverter("cupy", ALL, FLOATS), lambda: _no_gpu("cupy", _cupy_gpu)),
}


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _params(names: tuple[str, ...]) -> list[Any]:
    params = []
    for name in names:
        backend, why = BACKENDS[name]
        reason = why()
        for dtype in backend.dtypes:
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(
                pytest.param(backend, dtype, id=f"{name}-{dtype}", marks=marks)
            )
    return params


# -- identity: torch, torch CUDA, array-api-strict, CuPy ---------------------------------
@pytest.mark.parametrize(
    ("backend", "dtype"), _params(("torch", "torch_cuda", "array_api_strict", "cupy"))
)
def test_every_primitive_is_bitwise_numpy(backend: ArrayConverter, dtype: str) -> None:
    ref = operands(dtype)
    got = backend.operands(ref)
    adapter = backend.adapter(got)
    casts = tuple(c for c in backend.casts if c != REAL.get(dtype, dtype))
    if dtype in REAL:
        casts = tuple(c for c in ("complex64", "complex128") if c != dtype)
    ops = operations(dtype, adapter.writeable(got["a"]), casts)
    assert_identical(run_all(ops, NP, ref, adapter, got))


# -- JAX: identity on normal-range data, and the named subnormal deviation ------------------
def _jax_reason(dtype: str) -> str | None:
    missing = _missing("jax")
    if missing:
        return missing
    if dtype in ("float64", "complex128") and not _x64():
        return "JAX 64-bit mode is off (JAX_ENABLE_X64=1 turns it on)"
    return None


JAX = ArrayConverter("jax", ALL, FLOATS)


def _jax_params() -> list[Any]:
    params = []
    for dtype in ALL:
        reason = _jax_reason(dtype)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(dtype, id=f"jax-{dtype}", marks=marks))
    return params


def _jax_casts(dtype: str) -> tuple[str, ...]:
    if dtype in REAL:
        return tuple(c for c in ("complex64", "complex128") if c != dtype)
    return tuple(c for c in FLOATS if c != dtype)


@pytest.mark.parametrize("dtype", _jax_params())
def test_jax_is_bitwise_numpy_on_normal_range_data(dtype: str) -> None:
    ref = operands(dtype, normal_range=True)
    got = JAX.operands(ref)
    adapter = JAX.adapter(got)
    ops = operations(dtype, False, _jax_casts(dtype))
    del ops["full_like(ra,sub)"], ops["add(a,sub)"], ops["subtract(a,sub)"]
    del ops["multiply(a,sub)"], ops["divide(a,sub)"], ops["greater(ra,sub)"]
    assert_identical(run_all(ops, NP, ref, adapter, got))


class FlushingNumpy(numpy_adapters.NumpyAdapter):
    """numpy with x86 DAZ+FTZ in the dtypes ``flushed``: the JAX-on-CPU model.

    Every arithmetic primitive, comparison and cast reads a subnormal input as
    a zero of the same sign and writes a result whose exact value is below the
    smallest normal as a zero of the same sign (x86 detects this before
    rounding: ``tiny * (1 - eps/2)`` rounds up to ``tiny`` and is still
    flushed); bit operations (negation, abs, where, copies, fills) are unchanged.
    """

    def __init__(self, flushed: tuple[str, ...]) -> None:
        super().__init__()
        self.flushed = flushed

    def flush(self, x: Any, like: Any = None) -> Any:
        """``x`` with subnormals set to ±0 (Python scalars in the dtype of ``like``)."""
        if isinstance(x, (int, float)):
            if like is None:
                return x
            return float(self.flush(np.asarray(x, dtype=np.asarray(like).real.dtype)))
        x = np.asarray(x)
        if x.dtype.kind == "c" and x.dtype.name in self.flushed:
            out = np.empty_like(x)
            out.real, out.imag = self.flush(x.real), self.flush(x.imag)
            return out
        if x.dtype.kind != "f" or x.dtype.name not in self.flushed:
            return x
        tiny = np.finfo(x.dtype).tiny
        return np.where(np.abs(x) < tiny, np.copysign(x.dtype.type(0), x), x)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        like = b if isinstance(a, (int, float)) else a
        a, b = self.flush(a, like), self.flush(b, like)
        r = self.flush(super()._apply(op, a, b))
        if r.dtype.name in self.flushed and op in (operator.mul, operator.truediv):
            r = self._tiny_before_rounding(op, a, b, r)
        return r

    def _tiny_before_rounding(
        self, op: Callable[[Any, Any], Any], a: Any, b: Any, r: np.ndarray
    ) -> np.ndarray:
        """Flush the results rounded up to ``±tiny`` from an exact value below it."""
        tiny = np.finfo(r.dtype).tiny
        where = np.flatnonzero(np.abs(r) == tiny)
        if not len(where):
            return r
        a, b = np.broadcast_to(a, r.shape), np.broadcast_to(b, r.shape)
        r = r.copy()
        for i in where:
            exact = op(Fraction(float(a.flat[i])), Fraction(float(b.flat[i])))
            if abs(exact) < Fraction(float(tiny)):
                r.flat[i] = np.copysign(r.dtype.type(0), r.flat[i])
        return r

    def sqrt(self, a: Any) -> Any:
        return self.flush(super().sqrt(self.flush(a)))

    def sign(self, a: Any) -> Any:
        return super().sign(self.flush(a))

    def maximum(self, a: Any, b: Any) -> Any:
        return super().maximum(self.flush(a), self.flush(b))

    def minimum(self, a: Any, b: Any) -> Any:
        return super().minimum(self.flush(a), self.flush(b))

    def greater(self, a: Any, b: Any) -> Any:
        return super().greater(self.flush(a), self.flush(b))

    def less(self, a: Any, b: Any) -> Any:
        return super().less(self.flush(a), self.flush(b))

    def not_equal(self, a: Any, b: Any) -> Any:
        return super().not_equal(self.flush(a), self.flush(b))

    def astype(self, x: Any, name: str) -> Any:
        return self.flush(super().astype(self.flush(x), name))


@pytest.mark.parametrize("dtype", _jax_params())
def test_jax_subnormals_follow_the_named_deviation(dtype: str) -> None:
    ref = operands(dtype)
    got = JAX.operands(ref)
    adapter = JAX.adapter(got)
    flushed: tuple[str, ...] = adapter.flushes_subnormals  # type: ignore[attr-defined]
    if adapter.platform == "cpu":  # type: ignore[attr-defined]
        assert set(flushed) == {
            "bfloat16",
            "float32",
            "float64",
            "complex64",
            "complex128",
        }
    ops = operations(dtype, False, _jax_casts(dtype))
    # Exactly the model: flushed where numpy has a subnormal input or result.
    assert_identical(run_all(ops, FlushingNumpy(flushed), ref, adapter, got))
    vs_numpy = run_all(ops, NP, ref, adapter, got)
    if dtype in flushed:  # the deviation is real, not a silent pass
        assert sum(v for v in vs_numpy.values() if isinstance(v, int)) > 0
        assert vs_numpy["multiply(a,sub)"] != 0
    else:  # float16 is computed in float32, where its subnormals are normal
        assert_identical(vs_numpy)


def test_jax_division_is_true_division_under_jit() -> None:
    if _missing("jax"):
        pytest.skip("jax is not installed")
    import jax
    import jax.numpy as jnp

    a = data("float32", 1, normal_range=True)
    s = np.float32(0.9)
    x = JAX.adapter({"a": jnp.asarray(a)})
    jitted = jax.jit(lambda v: x.divide(v, s))(jnp.asarray(a))
    assert differing(a / s, np.asarray(jitted)) == 0
    signs = jax.jit(x.sign)(
        jnp.asarray(np.array([-0.0, 0.0, -2.0, np.nan], np.float32))
    )
    assert differing(np.array([0.0, 0.0, -1.0, np.nan], np.float32), signs) == 0
    assert x.writeable(jnp.asarray(a)) is False


# -- bfloat16 (torch only): against numpy float32 arithmetic rounded once ---------------------
def test_torch_bfloat16_against_float32_rounded_once() -> None:
    torch = pytest.importorskip("torch")
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(7)
    every = np.arange(1 << 16, dtype=np.uint16)  # every bfloat16, in random pairs
    a_bits = np.concatenate(
        [every, rng.permutation(every), rng.integers(0, 1 << 16, N, dtype=np.uint16)]
    )
    b_bits = np.concatenate(
        [rng.permutation(every), every, rng.integers(0, 1 << 16, N, dtype=np.uint16)]
    )
    a32, b32 = (bits.astype(np.uint32) << 16 for bits in (a_bits, b_bits))
    a, b = a32.view(np.float32), b32.view(np.float32)  # exact bfloat16 values
    x = ArrayConverter("torch", (), ()).adapter(
        {"a": torch.ones(1, dtype=torch.bfloat16)}
    )
    ta = torch.from_numpy(a_bits.view(np.int16)).view(torch.bfloat16)
    tb = torch.from_numpy(b_bits.view(np.int16)).view(torch.bfloat16)
    s = np.float32(bf16(0.9))
    sb = x.scalar_type(ta)(0.9)
    assert float(sb) == float(s)
    np_errors = np.seterr(all="ignore")
    cases: dict[str, tuple[Any, Any]] = {
        "add": (np.add(a, b), x.add(ta, tb)),
        "subtract": (np.subtract(a, b), x.subtract(ta, tb)),
        "multiply": (np.multiply(a, b), x.multiply(ta, tb)),
        "divide": (np.divide(a, b), x.divide(ta, tb)),
        "divide(s,a)": (np.divide(s, a), x.divide(sb, ta)),
        "multiply(a,s)": (np.multiply(a, s), x.multiply(ta, sb)),
        "sqrt": (np.sqrt(a), x.sqrt(ta)),
        "abs": (np.abs(a), x.abs(ta)),
        "sign": (np.sign(a), x.sign(ta)),
        "maximum": (NP.maximum(a, b), x.maximum(ta, tb)),
        "minimum": (NP.minimum(a, b), x.minimum(ta, tb)),
        "astype(float32)": (a, x.astype(ta, "float32")),
        "astype(float16)": (a.astype(np.float16), x.astype(ta, "float16")),
    }
    np.seterr(**np_errors)
    counts = {}
    with np.errstate(all="ignore"), x.computing():
        for label, (expected, got) in cases.items():
            want = expected.astype(bf16) if label != "astype(float16)" else expected
            counts[label] = count_differences(
                want if label != "astype(float32)" else a, x.to_numpy(got)
            )
        counts["greater"] = count_differences(a > b, x.to_numpy(x.greater(ta, tb)))
    assert_identical(counts)


# -- casts that round twice unless fixed -------------------------------------------------
def midpoint_data() -> np.ndarray:
    """float64 values just off float16 and bfloat16 rounding midpoints.

    Rounding them to float32 first lands exactly on the midpoint, and the tie
    then goes to even: the wrong way for every other value.
    """
    h = np.arange(0x0001, 0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid16 = (h[:-1] + h[1:]) / 2
    b = (np.arange(0x0081, 0x7F7F, dtype=np.uint32) << 16).view(np.float32)
    b64 = b.astype(np.float64)
    mid_bf16 = (b64[:-1] + b64[1:]) / 2
    mids = np.concatenate([mid16, mid_bf16])
    nudge = np.ldexp(1.0, -40)
    out = np.concatenate([mids * (1 + nudge), mids * (1 - nudge)])
    return np.concatenate([out, -out])


def bfloat16_rounding(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 rounded once (normal range), as float32 values."""
    bits = x.view(np.uint64)
    shift = np.uint64(52 - 7)
    odd = (bits >> shift) & np.uint64(1)
    rounded = bits + (np.uint64(1) << (shift - np.uint64(1))) - np.uint64(1) + odd
    rounded = (rounded >> shift) << shift
    return rounded.view(np.float64).astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_float64_to_narrow_casts_round_once(backend: str) -> None:
    if _missing(backend) or (backend == "jax" and not _x64()):
        pytest.skip(f"{backend} (with float64) is not available")
    x64 = midpoint_data()
    conv = ArrayConverter(backend, (), ())
    arr = conv.convert(x64)
    adapter = conv.adapter({"a": arr})
    got = adapter.to_numpy(adapter.astype(arr, "float16"))
    with np.errstate(over="ignore"):
        want16 = x64.astype(np.float16)
    assert differing(want16, got) == 0
    if backend == "torch":
        import torch

        raw = arr.to(torch.float16).numpy()  # the bug the fix removes
        assert differing(want16, raw) > 0
        want = bfloat16_rounding(x64)
        bf = adapter.astype(arr, "bfloat16").to(torch.float32).numpy()
        assert differing(want, bf) == 0
        assert differing(want, arr.to(torch.bfloat16).float().numpy()) > 0


# -- the fixes matter: the raw backends really differ on such data --------------------------
def test_raw_torch_differs_where_the_adapter_fixes_it() -> None:
    torch = pytest.importorskip("torch")
    for name in ("float32", "float64"):
        a = np.abs(data(name, 3))
        with np.errstate(invalid="ignore"):
            assert differing(np.sqrt(a), torch.sqrt(torch.from_numpy(a.copy()))) > 0
    a = data("float32", 1)
    s = np.float32(0.9)
    with np.errstate(all="ignore"):
        assert differing(s / a, (float(s) / torch.from_numpy(a.copy())).numpy()) > 0
    assert torch.sign(torch.tensor(float("nan"))).item() == 0
    a, b = data("complex64", 1), data("complex64", 2)
    raw = (torch.from_numpy(a.copy()) + torch.from_numpy(b.copy())).numpy()
    with np.errstate(all="ignore"):  # alpha = 1+0j: inf * 0 leaks NaN across parts
        assert differing(a + b, raw) > 0


def test_raw_backends_break_zero_ties_differently() -> None:
    """numpy itself: float16 keeps the first operand, float32 the second."""
    pos, neg = np.array([0.0]), np.array([-0.0])
    first = np.signbit(np.maximum(pos.astype(np.float16), neg.astype(np.float16)))
    second = np.signbit(np.maximum(pos.astype(np.float32), neg.astype(np.float32)))
    assert first[0] != second[0]
    for name in FLOATS:
        p, n = pos.astype(name), neg.astype(name)
        assert not np.signbit(NP.maximum(p, n)[0])
        assert not np.signbit(NP.maximum(n, p)[0])
        assert np.signbit(NP.minimum(p, n)[0])
        assert np.signbit(NP.minimum(n, p)[0])


def test_raw_jax_division_is_a_reciprocal_multiply() -> None:
    if _missing("jax"):
        pytest.skip("jax is not installed")
    import jax.numpy as jnp

    a = data("float32", 1, normal_range=True)
    s = np.float32(0.9)
    assert differing(a / s, np.asarray(jnp.asarray(a) / float(s))) > 0
    assert np.signbit(np.asarray(jnp.sign(jnp.asarray(-0.0))))


# -- exhaustive float16 unary operations ---------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_every_float16_value(backend: str) -> None:
    if _missing(backend):
        pytest.skip(f"{backend} is not installed")
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    a = np.concatenate([every[1:], every])  # vector bodies and scalar tails
    conv = ArrayConverter(backend, (), ())
    t = conv.convert(a)
    x = conv.adapter({"a": t})
    ops: dict[str, Callable[[Adapter, Any], Any]] = {
        "sqrt": lambda z, v: z.sqrt(v),
        "abs": lambda z, v: z.abs(v),
        "sign": lambda z, v: z.sign(v),
        "negative": lambda z, v: z.negative(v),
        "astype(float32)": lambda z, v: z.astype(v, "float32"),
        "multiply(v,v)": lambda z, v: z.multiply(v, v),
        "divide(1,v)": lambda z, v: z.divide(np.float16(1), v),
    }
    counts = {}
    for label, op in ops.items():
        with NP.computing():
            expected = op(NP, a)
        counts[label] = count_differences(expected, x.to_numpy(op(x, t)))
    assert_identical(counts)


# -- torch: writing in place, no autograd history ------------------------------------------
def test_torch_writeable_and_no_autograd_history() -> None:
    torch = pytest.importorskip("torch")
    x = ArrayConverter("torch", (), ()).adapter({"a": torch.zeros(1)})
    p = torch.nn.Parameter(torch.arange(4.0))
    assert x.writeable(p)
    assert x.writeable(torch.zeros(3, requires_grad=True))
    assert not x.writeable(p * 2)  # a non-leaf in a graph
    assert not x.writeable(torch.zeros(1).expand(3))
    with torch.inference_mode():
        inference = torch.zeros(3)
    assert not x.writeable(inference)
    results = [
        x.add(p, p),
        x.multiply(p, np.float32(2)),
        x.divide(np.float32(1), p),
        x.sqrt(p),
        x.sign(p),
        x.abs(p),
        x.maximum(p, p),
        x.where(p > 1, p, 0.0),
        x.copy(p),
        x.astype(p, "float64"),
        x.abs2(p),
        x.negative(p),
        x.make_complex(p, p),
        x.flatten(p),
        x.concat([p, p]),
    ]
    assert not any(r.requires_grad for r in results)
    x.subtract_(p, torch.ones(4))
    x.assign_(p, x.add(p, 1.0))
    assert p.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert p.grad is None
    assert p.requires_grad


def test_adapters_are_found_and_describe_their_fixes() -> None:
    from agnosticopt import adapter_for

    found = []
    if not _missing("torch"):
        import torch

        found.append(adapter_for(torch.nn.Parameter(torch.zeros(2))))
        assert adapter_for(torch.zeros(2)) is found[-1]
        assert found[-1].scalar_type(torch.zeros(1, dtype=torch.bfloat16)).__name__ in (
            "bfloat16",
            "float32",
        )
    if not _missing("jax"):
        import jax.numpy as jnp

        found.append(adapter_for(jnp.zeros(2)))
    if not _missing("array_api_strict"):
        import array_api_strict

        strict = adapter_for(array_api_strict.asarray([1.0]))
        assert strict is not None
        assert not strict.writeable(array_api_strict.asarray([1.0]))
        device = array_api_strict.Device("device1")
        re = array_api_strict.asarray([1.0, -0.0], device=device)
        z = strict.make_complex(re, re)
        assert z.device == device
        assert (
            differing(np.array([1 + 1j, complex(-0.0, -0.0)]), strict.to_numpy(z)) == 0
        )
    for adapter in found:
        assert adapter.fixes
        assert all(isinstance(f, str) and f for f in adapter.fixes)


# -- importing the package imports no backend ------------------------------------------------
def test_import_loads_no_backend_and_no_top_level_adapters(tmp_path: Any) -> None:
    code = textwrap.dedent(
        """
        import importlib, importlib.util, sys
        import numpy as np
        import agnosticopt as opt

        backends = ("torch", "jax", "cupy")
        assert not [m for m in backends + ("adapters",) if m in sys.modules]
        tree = opt.setup(opt.Adam(), {"w": np.ones(3)})
        tree, model = opt.update(tree, {"w": np.ones(3)}, {"w": np.ones(3)})
        assert not [m for m in backends + ("adapters",) if m in sys.modules]
        for name in ("torch", "jax", "array_api_strict"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(f"agnosticopt.adapters.{name}")
        assert not [m for m in sys.modules if m.partition(".")[0] == "adapters"]
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,  # not the checkout, whose agnosticopt/ lacks adapters
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_cupy_adapter_import_fails_cleanly_without_cupy(tmp_path: Any) -> None:
    if not _missing("cupy"):
        pytest.skip("cupy is installed: nothing to check")
    code = "import agnosticopt.adapters.cupy"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,  # not the checkout, whose agnosticopt/ lacks adapters
    )
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("ModuleNotFoundError: No module named 'cupy'")
    )


def test_torch_float32_sqrt_is_exact_under_vmap() -> None:
    """Without memory to share with numpy, float32 goes through float64 ``sqrt``."""
    torch = pytest.importorskip("torch")
    a = np.abs(data("float32", 3)).reshape(-1, 50)
    x = ArrayConverter("torch", (), ()).adapter({"a": torch.zeros(1)})
    got = torch.func.vmap(x.sqrt)(torch.from_numpy(a.copy())).numpy()
    with np.errstate(invalid="ignore"):  # signalling NaNs
        assert differing(np.sqrt(a), got) == 0


# -- the one registry of backends ----------------------------------------------------
def test_every_registered_backend_has_an_adapter_module_and_a_conformance_backend() -> (
    None
):
    import importlib.util

    from agnosticopt import adapters, conformance
    from agnosticopt._backends import (
        ARRAY_MODULES,
        BACKEND_NAMES,
        BACKENDS,
        backend_entry,
    )

    assert tuple(conformance.BUILTIN_BACKENDS) == BACKEND_NAMES
    assert (
        adapters.SUBMODULES
        == set(ARRAY_MODULES.values())
        >= {b.adapter for b in BACKENDS}
    )
    for entry in BACKENDS:
        assert (
            importlib.util.find_spec(f"agnosticopt.adapters.{entry.adapter}")
            is not None
        )
        assert ARRAY_MODULES[entry.library] == entry.adapter
        made = conformance.get_backend(entry.name)
        assert made.name == entry.name
        assert backend_entry(entry.name) is entry
    with pytest.raises(
        KeyError, match=r"no built-in backend 'mlx'.*numpy, numpy_readonly"
    ):
        backend_entry("mlx")
