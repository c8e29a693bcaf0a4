"""PyTorch adapter: CPU and CUDA (other devices use the CUDA rules, unverified).

Every operation gives the IEEE-754 correctly rounded result in the tensor's dtype,
bit for bit the numpy adapter's (NaN: any NaN). What torch gets wrong, and the fix:

CPU
    * ``torch.sqrt`` of float32/float64 goes through MKL's vector math (about one
      ulp): on a million random float32 values ~17% differ from numpy, ~1% in
      float64. Fix: ``np.sqrt`` on the tensor's memory (zero copy both ways); it
      is also 3x faster than torch's on two cores. Tensors without memory of
      their own (``torch.func.vmap``, fake tensors) fall back to float64 ``sqrt``
      rounded to float32 (exact) and, in float64, to ``torch.sqrt`` (not exact).
      float16/bfloat16 ``sqrt`` (float32 hardware square root, one rounding) is
      exact and kept: the tests check all 65536 float16 inputs.
    * ``scalar / tensor`` is ``tensor.reciprocal() * scalar`` (two roundings,
      ``Tensor.__rtruediv__``). Fix: divide a 0-d tensor by the tensor.
Every device
    * complex ``+``/``-`` multiply the second operand by ``alpha = 1+0j``, so an
      inf or NaN in one part makes the other part NaN; complex negation returns
      ``+0`` for ``-(+0)``. Fix: operate on the ``view_as_real`` float views.
    * ``torch.sign(nan)`` is 0. Fix: NaN is kept.
    * float64 -> float16/bfloat16 casts round twice (through float32). Fix: round
      to float32 *to odd* first, which makes the second rounding exact.
    * Results carry no autograd history (inputs are detached) and in-place writes
      happen under ``torch.no_grad()``.
CUDA (from the source, not yet run on a GPU here)
    * Division by a CPU scalar is a multiplication by its reciprocal
      (``div_true_kernel_cuda``). Fix: Python-scalar divisors become 0-d tensors
      on the tensor's device, for which the kernel does a true division.
    * ``torch.sqrt`` compiles to IEEE ``sqrtf``/``sqrt`` (``-prec-sqrt=true``) and
      is kept. Fused ops (``add(alpha=)``, ``addcmul``, ``addcdiv``, ``lerp``,
      ``_foreach_*``, fused optimisers) use FMAs and are never called.

float16 arithmetic runs in float32 ("opmath") with one rounding to float16; as the
rules hand in scalars already rounded to float16, this is numpy's result (float32
has more than ``2*11 + 2`` bits, so the double rounding is innocuous). The same
holds for bfloat16, which only torch supports here: its reference is numpy with
``ml_dtypes.bfloat16`` (also float32 arithmetic, rounded once). bfloat16 host
scalars are always ``ml_dtypes.bfloat16`` (a dependency of the ``torch`` extra;
JAX ships it too), so hyperparameters are rounded to bfloat16 and host scalar
arithmetic is bfloat16 arithmetic. Without ml_dtypes a bfloat16 tensor raises
``ImportError`` rather than silently computing its scalars in float32.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from agnosticopt.adapters._base import Adapter, _py

from agnosticopt._containers import Node

__all__ = ["TorchAdapter", "TorchCudaAdapter", "adapter", "container_flattener"]

try:  # bfloat16 on the host: a dependency of the torch extra (JAX ships it too)
    import ml_dtypes

    _BFLOAT16: type | None = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - depends on the environment
    _BFLOAT16 = None


def _bfloat16() -> type:
    """``ml_dtypes.bfloat16``, the host scalar type of bfloat16 tensors."""
    if _BFLOAT16 is None:
        msg = (
            "bfloat16 tensors need the ml_dtypes package for exact bfloat16 host "
            "scalars (without it the results would differ): pip install ml_dtypes, "
            "or install agnosticopt[torch]"
        )
        raise ImportError(msg)
    return _BFLOAT16


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_NUMPY_SQRT = (torch.float32, torch.float64)
_NARROW = (torch.float16, torch.bfloat16)


def _d(value: Any) -> Any:
    """``value`` without autograd history (tensors only; scalars pass through)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.detach()
    return value


def _complex(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def _as_real(z: torch.Tensor) -> torch.Tensor:
    """The ``(..., 2)`` float view of complex ``z`` (conjugation resolved)."""
    return torch.view_as_real(z.resolve_conj())


def _to_float32_odd(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded to odd: an inexact result gets an odd last bit.

    Rounding that to float16 or bfloat16 (11 or 8 bits, both <= 24 - 2) then
    gives the correctly rounded float64 -> float16/bfloat16 conversion.
    """
    y = x.to(torch.float32)
    inexact = y.to(torch.float64) != x
    even = (y.view(torch.int32) & 1) == 0
    fix = inexact & even & torch.isfinite(y)  # NaN and overflow stay as they are
    toward = torch.where(x > y.to(torch.float64), torch.inf, -torch.inf).to(y.dtype)
    return torch.where(fix, torch.nextafter(y, toward), y)


class TorchAdapter(Adapter):
    """Adapter for CPU ``torch.Tensor`` (``nn.Parameter`` included)."""

    fixes: tuple[str, ...] = (
        "sqrt: float32/float64 through numpy (MKL sqrt is not correctly rounded)",
        "scalar/tensor: true division by a 0-d tensor (not reciprocal * scalar)",
        "complex +, - and negation on the real views (alpha=1+0j leaks NaN)",
        "sign: NaN stays NaN (torch gives 0)",
        "astype: float64 -> float16/bfloat16 rounded once (round to odd)",
        "no autograd history; in-place writes under no_grad",
    )

    #: Whether Python-scalar divisors must become 0-d tensors on the device.
    _scalar_divisor_as_tensor = False

    def __init__(self, name: str = "torch") -> None:
        super().__init__(xp_torch, name)

    def adapts_all(self, tensors: list[Any]) -> bool:
        """Whether :func:`adapter` of each of ``tensors`` is this adapter: for the
        CPU one and plain CPU tensors, one pass over their types and one over
        ``is_cpu``; otherwise tensor by tensor."""
        if self is _ADAPTERS["cpu"] and set(map(type, tensors)) <= _PLAIN:
            return all(map(_IS_CPU, tensors))
        return all(adapter(t) is self for t in tensors)

    # -- dtypes -------------------------------------------------------------
    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).rpartition(".")[2]

    def dtype(self, name: str) -> Any:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            msg = f"torch has no dtype {name!r}"
            raise TypeError(msg)
        return dtype

    def scalar_type(self, x: Any) -> type:
        if x.dtype == torch.bfloat16:
            return _bfloat16()
        return super().scalar_type(x)

    def astype(self, x: Any, name: str) -> Any:
        x, target = _d(x), self.dtype(name)
        if x.dtype == torch.float64 and target in _NARROW:
            x = _to_float32_odd(x)
        return x.to(target, copy=True)

    def astype_tracked(self, x: Any, name: str) -> Any:
        """The exact cast of :meth:`astype`, differentiable (``Tensor.to``'s gradient).

        The value is :meth:`astype`'s, written into ``x.to(dtype)`` under
        ``no_grad``: the cast's backward does not read its output.
        """
        target = self.dtype(name)
        out = x.to(target, copy=True)
        if x.dtype == torch.float64 and target in _NARROW:
            with torch.no_grad():
                out.copy_(self.astype(x, name))
        return out

    # -- creation -------------------------------------------------------------
    def zeros_like(self, x: Any) -> Any:
        return torch.zeros_like(x)

    def real_zeros_like(self, x: Any) -> Any:
        return torch.zeros_like(x, dtype=_REAL.get(x.dtype, x.dtype))

    def full_like(self, x: Any, value: Any, *, real: bool = False) -> Any:
        dtype = _REAL.get(x.dtype, x.dtype) if real else x.dtype
        return torch.full_like(x, _py(value), dtype=dtype, requires_grad=False)

    def copy(self, x: Any) -> Any:
        return x.detach().clone()

    # -- arithmetic -------------------------------------------------------------
    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        a, b = _d(a), _d(b)
        if op is operator.truediv:
            return self._divide(a, b)
        if op in (operator.add, operator.sub) and _complex(a) and _complex(b):
            # torch adds ``alpha * b`` with a complex alpha = 1+0j: inf*0 = NaN
            # leaks into the other part. Add the real views instead.
            return torch.view_as_complex(op(_as_real(a), _as_real(b)))
        return op(a, b)

    def _divide(self, a: Any, b: Any) -> Any:
        """True division: a Python scalar never ends up as a reciprocal factor."""
        if not isinstance(a, torch.Tensor):  # torch: s / t = t.reciprocal() * s
            a = b.new_full((), a)
        elif not isinstance(b, torch.Tensor) and self._scalar_divisor_as_tensor:
            b = a.new_full((), b)
        return torch.div(a, b)

    def negative(self, a: Any) -> Any:
        a = _d(a)
        if _complex(a):  # complex neg computes 0 - z: -(+0) gives +0, not -0
            return torch.view_as_complex(torch.neg(_as_real(a)))
        return torch.neg(a)

    def sqrt(self, a: Any) -> Any:
        a = _d(a)
        if a.dtype not in _NUMPY_SQRT or a.device.type != "cpu":
            return torch.sqrt(a)  # float16/bfloat16: float32 sqrt, one rounding
        try:
            values = a.resolve_conj().resolve_neg().numpy()
        except (RuntimeError, TypeError):  # no memory to share (vmap, fake tensors)
            if a.dtype == torch.float32:  # 53 >= 2*24 + 2: rounding twice is exact
                return torch.sqrt(a.to(torch.float64)).to(torch.float32)
            return torch.sqrt(a)  # float64 here: MKL's, not correctly rounded
        with np.errstate(invalid="ignore"):
            return torch.from_numpy(np.asarray(np.sqrt(values)))

    def abs(self, a: Any) -> Any:
        return torch.abs(_d(a))

    def sign(self, a: Any) -> Any:
        a = _d(a)
        return torch.where(torch.isnan(a), a, torch.sign(a))

    def _max(self, a: Any, b: Any) -> Any:
        a, b = _d(a), _d(b)
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)  # NaN in ``a`` propagates
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    def _min(self, a: Any, b: Any) -> Any:
        a, b = _d(a), _d(b)
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        a, b = self._arrays(_d(a), _d(b))
        return torch.where(cond, a, b)

    def greater(self, a: Any, b: Any) -> Any:
        return _d(a) > _py(_d(b))

    def less(self, a: Any, b: Any) -> Any:
        return _d(a) < _py(_d(b))

    def not_equal(self, a: Any, b: Any) -> Any:
        return _d(a) != _py(_d(b))

    def isfinite(self, a: Any) -> Any:
        return torch.isfinite(a)

    def make_complex(self, re: Any, im: Any) -> Any:
        return torch.complex(_d(re), _d(im))

    # -- shapes and the host ---------------------------------------------------------
    def flatten(self, a: Any) -> Any:
        return torch.reshape(_d(a), (-1,))

    def concat(self, arrays: list[Any]) -> Any:
        return torch.cat([_d(a) for a in arrays])

    def to_numpy(self, a: Any) -> np.ndarray:
        t = a.detach().cpu().resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_bfloat16()).copy()
        return t.numpy().copy()

    # -- writing --------------------------------------------------------------------
    def writeable(self, x: Any) -> bool:
        """Whether ``x`` can be updated in place.

        True for ordinary tensors, ``nn.Parameter`` and other leaves that require
        grad. False for inference tensors outside inference mode, non-leaf tensors
        that require grad (writing would corrupt their graph), non-strided layouts
        (sparse, ...) and expanded tensors whose elements share memory.
        """
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
            return False
        if x.is_inference() and not torch.is_inference_mode_enabled():
            return False
        if x.requires_grad and not x.is_leaf:
            return False
        return not any(
            stride == 0 and n > 1 for stride, n in zip(x.stride(), x.shape, strict=True)
        )

    def check_leaf(self, x: Any, path: str) -> None:
        """Raise for ``p.to_local()`` of a DTensor, a view that updates would not reach."""
        fn = getattr(x, "grad_fn", None)
        if fn is not None and type(fn).__name__ == "_ToTorchTensorBackward":
            msg = (
                f"the tensor at {path} is DTensor.to_local(), a view: an in-place update "
                "would not reach the DTensor and the rules would see only this shard "
                "(a norm would be the shard's). Give the DTensor parameter itself "
                "(see docs/scaling.md)"
            )
            raise TypeError(msg)

    def rewrap(self, old: Any, new: Any) -> Any:
        """``new`` as ``old``'s class: an ``nn.Parameter`` stays one, with ``requires_grad``."""
        if type(old) is torch.Tensor:
            return (
                new.requires_grad_(True) if old.requires_grad and new.is_leaf else new
            )
        if isinstance(old, torch.nn.Parameter):
            return torch.nn.Parameter(new, requires_grad=old.requires_grad)
        return new.as_subclass(type(old))

    def memory_key(self, x: Any) -> Any:
        """The address of the storage ``x`` views (None: empty, no storage)."""
        try:
            return x.untyped_storage().data_ptr() if x.numel() else None
        except (RuntimeError, NotImplementedError):  # sparse, vmap, fake tensors
            return None

    def memory_span(self, x: Any) -> tuple[int, int] | None:
        return _span(x) if x.layout == torch.strided else None

    def overlaps(self, a: Any, b: Any) -> bool:
        """Whether the element spans of ``a`` and ``b`` meet (exact on the CPU)."""
        if (
            a.device != b.device
            or a.layout != torch.strided
            or b.layout != torch.strided
        ):
            return a.device == b.device
        sa, sb = _span(a), _span(b)
        if sa[1] <= sb[0] or sb[1] <= sa[0]:
            return False
        if a.device.type != "cpu":
            return True  # interleaved views on a GPU: counted as overlapping
        try:
            return bool(np.shares_memory(_memory(a), _memory(b)))
        except (RuntimeError, TypeError):
            return True

    def subtract_(self, x: Any, step: Any) -> None:
        step = _d(step)
        with torch.no_grad():
            if x.is_conj() or x.is_neg():  # no real view: copy the exact difference
                x.copy_(self.subtract(x, step))
            elif _complex(x):  # see _apply: complex sub_ leaks NaN between parts
                torch.view_as_real(x).sub_(_as_real(step))
            else:
                x.sub_(step)  # alpha = 1: an exact negation, no FMA rounding

    def assign_(self, x: Any, value: Any) -> None:
        with torch.no_grad():
            x.copy_(_d(value))

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        with torch.no_grad(), np.errstate(all="ignore"):
            yield

    def fast_plan(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        """``update_``'s compiled fast path for CPU ``(rule, state, x, grad)`` leaves.

        See :mod:`agnosticopt.adapters._fast`: ``None`` without numba or off the CPU.
        """
        if self.name != "torch":
            return None
        from agnosticopt.adapters import _fast

        return _fast.plan(torch_arrays(self), items)

    def fast_replay(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        """The last fast plan again for the same leaves, or ``None`` (never a new plan)."""
        if self.name != "torch":
            return None
        from agnosticopt.adapters import _fast

        return _fast.replay(torch_arrays(self), items)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range from the first to one past the last element of ``t``."""
    start = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    return start, start + (last + 1) * t.element_size()


def _memory(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t``'s memory (conjugate and negative bits ignored)."""
    t = t.detach()
    if t.is_conj():
        t = t.conj()  # the conjugate of a conjugate view: the memory as stored
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.numpy()


class TorchCudaAdapter(TorchAdapter):
    """Adapter for ``torch.Tensor`` on CUDA (and, unverified, other accelerators).

    Written from PyTorch's CUDA source; the test suite checks it when a GPU is
    present. Python-scalar divisors become 0-d device tensors; ``torch.sqrt`` is
    the correctly rounded CUDA ``sqrt``.
    """

    fixes: tuple[str, ...] = (
        "divide: scalars as 0-d device tensors (not a reciprocal multiply)",
        "complex +, - and negation on the real views (alpha=1+0j leaks NaN)",
        "sign: NaN stays NaN (torch gives 0)",
        "astype: float64 -> float16/bfloat16 rounded once (round to odd)",
        "no autograd history; in-place writes under no_grad",
    )

    _scalar_divisor_as_tensor = True

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__(f"torch-{device_type}")
        self.device_type = device_type

    def sqrt(self, a: Any) -> Any:
        return torch.sqrt(_d(a))


_ADAPTERS: dict[str, TorchAdapter] = {"cpu": TorchAdapter()}
#: The tensor types whose adapter is that of their device (no DTensor test).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def adapter(x: Any) -> Adapter | None:
    """The torch adapter for the device type of tensor ``x``."""
    if not isinstance(x, torch.Tensor):
        return None
    cls = type(x)  # an nn.Parameter of a DTensor is of a DTensor class
    if cls is not torch.Tensor and cls is not _PARAMETER and _is_dtensor(x):
        from agnosticopt.adapters import dtensor

        return dtensor.adapter(x)
    # (is_cpu makes no device object; a subclass may have its own device property)
    plain = cls is torch.Tensor or cls is _PARAMETER
    kind = "cpu" if plain and x.is_cpu else x.device.type
    found = _ADAPTERS.get(kind)
    if found is None:
        found = _ADAPTERS[kind] = TorchCudaAdapter(kind)
    return found


_PARAMETER = torch.nn.Parameter


def _is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed otherwise)."""
    import sys

    found = sys.modules.get("torch.distributed.tensor")
    return found is not None and isinstance(x, found.DTensor)


def container_flattener(cls: type) -> Callable[[Any], Node] | None:
    """How the tree interface takes an ``nn.Module`` apart (None for other types).

    A module is a container of its ``named_parameters()`` (tied parameters
    once, under their first name; buffers are not parameters), keyed by their
    dotted names; without gradients given, their ``.grad`` are used.
    """
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return _module_node
    return None


def _module_node(module: Any) -> Node:
    pairs = list(module.named_parameters())
    params = tuple(p for _, p in pairs)
    return Node(
        module,
        "module",
        tuple(n for n, _ in pairs),
        params,
        grads=tuple(p.grad for p in params),
    )


def value_and_grad(
    fn: Callable[[list[Any]], Any], arrays: list[Any]
) -> tuple[Any, list[Any]]:
    """``fn(arrays)`` (a scalar tensor) and its gradients by autograd (``train_``).

    ``fn`` gets detached views of ``arrays`` that require grad, so the model's
    own tensors need not, and their ``.grad`` is left alone. An array that
    ``fn`` does not use gets ``None`` (no step).
    """
    leaves = [a.detach().requires_grad_(True) for a in arrays]
    with torch.enable_grad():
        value = fn(leaves)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            msg = f"train_: the loss must be a tensor with one element, got {value!r}"
            raise TypeError(msg)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), list(grads)


def value_and_grad_in_place(
    fn: Callable[[], Any], arrays: list[Any]
) -> tuple[Any, list[Any]]:
    """``fn()`` (a scalar tensor) and its gradients with respect to ``arrays`` themselves.

    For a model holding an ``nn.Module`` (``train_``), whose parameters cannot
    be swapped for detached copies: autograd runs through the parameters in
    place. Those that do not require grad are switched on for the call and back
    off after it; ``torch.autograd.grad`` leaves every ``.grad`` alone. An
    array that ``fn`` does not use gets ``None`` (no step).
    """
    for a in arrays:
        if a.grad_fn is not None:
            msg = (
                "train_: a model's tensors must be leaves of autograd (parameters), "
                f"got one computed by {type(a.grad_fn).__name__}"
            )
            raise TypeError(msg)
    switched = [a for a in arrays if not a.requires_grad]
    try:
        for a in switched:
            a.requires_grad_(True)
        with torch.enable_grad():
            value = fn()
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                msg = (
                    f"train_: the loss must be a tensor with one element, got {value!r}"
                )
                raise TypeError(msg)
            grads = torch.autograd.grad(value, arrays, allow_unused=True)
    finally:
        for a in switched:
            a.requires_grad_(False)
    return value.detach(), list(grads)


# -- the fast path's memory access ----------------------------------------------------------------


class TorchArrays:
    """How the fast path (:mod:`agnosticopt.adapters._fast`) reads and writes CPU tensors.

    ``nn.Parameter`` too. Tensors are accessed through their data pointers (zero
    copy). After the kernels, the version counter of every written tensor is
    bumped, as torch's in-place operations do, so that autograd still detects a
    stale saved tensor.
    """

    name = "torch"
    array_type: type = torch.Tensor

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.dtypes = {torch.float32: "float32", torch.float64: "float64"}

    def dtype(self, t: Any) -> str | None:
        """The dtype of a contiguous, dense, CPU float32/float64 tensor, else None.

        Only of a ``torch.Tensor`` or ``nn.Parameter``: a subclass's own
        ``__torch_function__`` or ``__torch_dispatch__`` would not see a kernel's
        writes (and a FakeTensor out of its mode says ``is_cpu`` with no memory).
        """
        if type(t) not in _PLAIN:
            return None
        name = self.dtypes.get(t.dtype)
        if name is None or not t.is_cpu or t.layout != torch.strided:
            return None
        if not t.is_contiguous() or t.is_neg() or t.is_conj():
            return None
        try:
            t.data_ptr()
        except (
            RuntimeError
        ):  # no storage (functorch's vmap/grad wrappers, fake tensors)
            return None
        return name

    def readable(self, tensors: list[Any], dtype: str) -> bool:
        """Whether :meth:`dtype` of each of ``tensors`` is ``dtype``: each test over
        all tensors at once (a gradient tensor is new at every step of a loop with
        ``zero_grad(set_to_none=True)``); whether each has storage is for
        :meth:`addresses` (``data_ptr`` raises without)."""
        if not set(map(type, tensors)) <= _PLAIN:
            return False  # (a subclass: see dtype)
        want = getattr(torch, dtype)
        tensor = torch.Tensor
        return (
            all(map(operator.is_, map(_DTYPE, tensors), itertools.repeat(want)))
            and all(map(_IS_CPU, tensors))
            and all(
                map(operator.is_, map(_LAYOUT, tensors), itertools.repeat(_STRIDED))
            )
            and all(map(tensor.is_contiguous, tensors))
            and not any(map(tensor.is_neg, tensors))
            and not any(map(tensor.is_conj, tensors))
        )

    def unchanged(self, tensors: list[Any], dtypes: list[Any]) -> bool:
        """Whether each of ``tensors`` still has its dtype of ``dtypes`` and is still
        contiguous: ``p.data = p.data.view(torch.int32)`` or ``p.data = p.data.T``
        (a square ``p``) keeps the object, the data address and the shape."""
        return all(map(operator.is_, map(_DTYPE, tensors), dtypes)) and all(
            map(torch.Tensor.is_contiguous, tensors)
        )

    def writeable(self, t: Any) -> bool:
        """The adapter's rule for in-place writes, for a contiguous CPU tensor.

        Not a non-leaf tensor that requires grad (its graph would be wrong), not
        an inference tensor outside inference mode; contiguous tensors have no
        expanded (stride 0) dimensions.
        """
        if t.requires_grad and not t.is_leaf:
            return False
        return not t.is_inference() or torch.is_inference_mode_enabled()

    def still_writeable(self, tensors: list[Any]) -> Callable[[], bool]:
        """A test of whether a kernel may still write into each of ``tensors``.

        :meth:`writeable` of each, with what cannot change asked once: whether a
        tensor is an inference tensor (then inference mode must be on at each
        call). A tensor that requires grad and is not a leaf is one with a
        ``grad_fn``, which an in-place operation can give a tensor at any time:
        asked of each at each call (one attribute read).
        """
        inference = any(t.is_inference() for t in tensors)
        grad_fns = operator.attrgetter("grad_fn")

        def test() -> bool:
            if inference and not torch.is_inference_mode_enabled():
                return False
            return not any(map(grad_fns, tensors))

        return test

    def address(self, t: Any) -> int:
        """The address of the first element."""
        return t.data_ptr()

    def addresses(self, tensors: list[Any]) -> list[int]:
        """:meth:`address` of each of ``tensors``."""
        return list(map(torch.Tensor.data_ptr, tensors))

    def written(self, tensors: list[Any]) -> None:
        """Bump the version counters of ``tensors``."""
        bump = torch.autograd.graph.increment_version
        try:
            bump(tensors)  # one call for all (torch >= 2.5)
        except TypeError:  # torch < 2.5 takes no list: one at a time
            for t in tensors:
                bump(t)

    def scaled(self, t: Any, factor: Any) -> Any:
        """A new contiguous CPU tensor ``t * factor``, numpy's correctly rounded product."""
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu")  # (not the default)
        np.multiply(t.detach().numpy(), factor, out=out.numpy())
        return out

    def empty(self, size: int, dtype: str) -> Any:
        """A new 1-d CPU tensor of ``size`` elements of ``dtype`` (a kernel's scratch)."""
        return torch.empty(size, dtype=getattr(torch, dtype), device="cpu")


_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_LAYOUT = operator.attrgetter("layout")
_STRIDED = torch.strided

_ARRAYS: dict[int, TorchArrays] = {}


def torch_arrays(adapter: Any) -> TorchArrays:
    """The CPU torch memory access of the fast path for ``adapter`` (one per adapter)."""
    found = _ARRAYS.get(id(adapter))
    if found is None or found.adapter is not adapter:
        found = _ARRAYS[id(adapter)] = TorchArrays(adapter)
    return found
