"""JAX adapter: functional (arrays are never written in place).

Measured on CPU (jax 0.10), against the numpy adapter, a million values each:

* ``x / python_scalar`` and ``x / 0-d array`` are multiplications by the
  reciprocal (26% of float32 quotients differ). Fix: the divisor is broadcast to
  the full shape, which XLA divides truly. Under ``jax.jit`` XLA also rewrites
  division by a broadcast constant, so a traced divisor is passed through
  ``lax.optimization_barrier`` first.
* ``jnp.sign(-0.0)`` is ``-0.0`` (numpy: ``+0.0``). Fix: zeros give ``+0``.
* float64 -> float16/bfloat16 casts round twice (through float32). Fix: round to
  float32 *to odd* first, which makes the second rounding exact.
* Deviation, not fixable: XLA on CPU runs with the x86 DAZ and FTZ flags and no
  switch turns them off (jax-ml/jax#16200). In the dtypes named by
  :attr:`JaxAdapter.flushes_subnormals`, arithmetic, ``sqrt``, comparisons,
  ``sign``, ``maximum``/``minimum`` and casts read a subnormal input as a zero of
  the same sign and flush a subnormal result to a zero of the same sign; bit
  operations (``abs``, negation, ``where``, copies, ``real``/``imag``) keep
  subnormals. float16 is not affected: XLA computes it in float32, where every
  float16 subnormal is normal. Outside the subnormal range JAX gives numpy's bits.

Not promised: bits under ``jax.jit``. The adapter works there (no host syncs in
elementwise operations), but XLA contracts ``a*b + c`` into fused multiply-adds
when it compiles a whole update (jax-ml/jax#18507) and nothing turns that off.

float64 needs JAX's 64-bit mode, which the adapter does not switch on for you
(it is a global setting): ``jax.config.update("jax_enable_x64", True)`` or the
environment variable ``JAX_ENABLE_X64=1`` before JAX is imported. Without it
JAX has no float64 arrays.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from agnosticopt.adapters._base import Adapter, _is_scalar
from jax import lax

__all__ = ["JaxAdapter", "adapter"]

_NARROW = ("float16", "bfloat16")


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _to_float32_odd(x: Any) -> Any:
    """float64 -> float32 rounded to odd (an inexact result gets an odd last bit)."""
    y = x.astype(jnp.float32)
    wide = y.astype(jnp.float64)
    even = (lax.bitcast_convert_type(y, jnp.int32) & 1) == 0
    fix = (wide != x) & even & jnp.isfinite(y)
    toward = jnp.where(x > wide, jnp.inf, -jnp.inf).astype(jnp.float32)
    return jnp.where(fix, jnp.nextafter(y, toward), y)


class JaxAdapter(Adapter):
    """Adapter for ``jax.Array`` (and tracers of one, inside ``jax.jit``)."""

    fixes: tuple[str, ...] = (
        "divide: divisor broadcast to full size (not a reciprocal multiply)",
        "divide under jit: divisor behind lax.optimization_barrier",
        "sign: sign(-0.0) is +0.0, as numpy's",
        "astype: float64 -> float16/bfloat16 rounded once (round to odd)",
    )

    #: dtypes whose subnormals XLA reads as zero and flushes to zero, on CPU.
    flushes_subnormals: tuple[str, ...] = (
        "bfloat16", "float32", "float64", "complex64", "complex128",
    )

    def __init__(self, platform: str = "cpu") -> None:
        super().__init__(jnp, "jax" if platform == "cpu" else f"jax-{platform}")
        self.platform = platform
        if platform != "cpu":  # XLA's GPU default is ``xla_gpu_ftz=false``
            self.flushes_subnormals = ()

    def dtype_name(self, x: Any) -> str:
        return str(jnp.dtype(x.dtype))

    def dtype(self, name: str) -> Any:
        return jnp.dtype(name)

    def astype(self, x: Any, name: str) -> Any:
        if x.dtype == jnp.float64 and name in _NARROW:
            x = _to_float32_odd(x)
        return x.astype(self.dtype(name))

    def copy(self, x: Any) -> Any:
        return jnp.array(x, copy=True)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        if op is not operator.truediv:
            return op(a, b)
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
        if _is_scalar(b):
            b = jnp.full(shape, b, dtype=jnp.result_type(a))
        elif jnp.shape(b) != shape:
            b = jnp.broadcast_to(b, shape)
        if _traced(a) or _traced(b):
            b = lax.optimization_barrier(b)
        return jnp.divide(a, b)

    def sign(self, a: Any) -> Any:
        return jnp.where(a == 0, 0, jnp.sign(a))

    def make_complex(self, re: Any, im: Any) -> Any:
        return lax.complex(re, im)

    def flatten(self, a: Any) -> Any:
        return jnp.reshape(a, (-1,))

    def concat(self, arrays: list[Any]) -> Any:
        return jnp.concatenate(arrays)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)


_ADAPTERS: dict[str, JaxAdapter] = {}


def _platform(x: Any) -> str:
    if _traced(x):
        return jax.default_backend()
    return str(next(iter(x.devices())).platform)


def adapter(x: Any) -> Adapter | None:
    """The JAX adapter for a ``jax.Array`` or a tracer, by device platform."""
    if not isinstance(x, (jax.Array, jax.core.Tracer)):
        return None
    platform = _platform(x)
    found = _ADAPTERS.get(platform)
    if found is None:
        found = _ADAPTERS[platform] = JaxAdapter(platform)
    return found


def value_and_grad(fn: Callable[[list[Any]], Any], arrays: list[Any]) -> tuple[Any, list[Any]]:
    """``fn(arrays)`` (a scalar) and its gradients by ``jax.value_and_grad`` (``train_``)."""
    value, grads = jax.value_and_grad(lambda leaves: fn(list(leaves)))(list(arrays))
    return value, list(grads)
