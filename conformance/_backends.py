"""Backends under test: how to move numpy data to a backend's arrays and back.

A :class:`Backend` is all the conformance suite needs from an array library:
``asarray`` (numpy in, backend array out), ``to_numpy`` (back), a ``name`` and
``unavailable()`` (``None`` when usable, else the reason). The adapter that the
rules then run on is whatever :func:`agnosticopt.adapter_for` finds for the
backend's arrays, so a third party tests its adapter by registering it
(:func:`agnosticopt.register_adapter`) and passing its own ``Backend``.

The built-in backends (array-api-extra's list): ``numpy``, ``numpy_readonly``
(arrays refuse every write: catches in-place writes into inputs), ``torch``,
``torch_cuda``, ``array_api_strict`` (on its non-default ``device1``, so state
created on the default device is caught), ``jax`` and ``cupy``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from agnosticopt._backends import BACKEND_NAMES

__all__ = [
    "BUILTIN_BACKENDS",
    "ArrayApiStrictBackend",
    "Backend",
    "CupyBackend",
    "JaxBackend",
    "NumpyBackend",
    "NumpyReadonlyBackend",
    "TorchBackend",
    "as_backend",
    "get_backend",
]


class Backend:
    """An array library under test; subclass it for your own.

    Parameters
    ----------
    name
        A short name for reports (``"numpy"``, ``"mlx"``, ...).

    Notes
    -----
    Override :meth:`asarray` and :meth:`to_numpy`; override
    :meth:`unavailable` when the library or its device may be missing and
    :meth:`unsupported` for dtypes it lacks. Set :attr:`writeable` when
    :func:`agnosticopt.update_` writes into its arrays in place.
    """

    #: Whether ``update_`` updates this backend's arrays in place.
    writeable: bool = False

    #: Whether ``update_`` runs at all; ``False`` for a functional-only backend
    #: (dask: immutable arrays), whose trajectories take ``update`` and whose
    #: checks of ``update_`` are skipped with :attr:`in_place_refused`.
    in_place: bool = True

    #: Why ``update_`` is refused, when :attr:`in_place` is ``False``.
    in_place_refused: str = "update_ is refused on this backend"

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<conformance backend {self.name!r}>"

    def unavailable(self) -> str | None:
        """``None`` if the backend can run here, else why not."""
        return None

    def unsupported(self, dtype: str) -> str | None:
        """``None`` if the backend has arrays of ``dtype``, else why not."""
        return None

    def asarray(self, a: np.ndarray) -> Any:
        """A new array of this backend with the values, dtype and shape of ``a``."""
        raise NotImplementedError

    def to_numpy(self, a: Any) -> np.ndarray:
        """A numpy copy of an array of this backend."""
        raise NotImplementedError

    def device(self, a: Any) -> Any:
        """The device of array ``a`` (array API ``device``)."""
        import array_api_compat

        return array_api_compat.device(a)

    def adapter(self) -> Any:
        """The agnosticopt adapter that runs on this backend's float32 arrays."""
        from agnosticopt import adapter_for

        return adapter_for(self.asarray(np.zeros(2, dtype=np.float32)))

    def deviation(self, dtype: str, dataset: str) -> str | None:
        """The named deviation the adapter declares for this data, if any.

        An adapter lists the dtypes in which its backend flushes subnormals to
        zero in ``flushes_subnormals`` (JAX on CPU). The checks accept the
        deviation only where it explains the difference: the backend's result
        must then equal numpy's run with subnormals flushed, bit for bit (see
        ``_flush.py``), on any data set (the ``special`` one holds subnormals;
        normal data can reach them too, e.g. AdaGrad with ``epsilon=0``).
        """
        adapter = self.adapter()
        if dtype in getattr(adapter, "flushes_subnormals", ()):
            return (
                f"named deviation: {adapter.name} flushes {dtype} subnormals to zero "
                "(adapter attribute flushes_subnormals)"
            )
        return None


def missing_module(module: str) -> str | None:
    """``"<module> is not installed"``, or ``None`` if it is importable."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _adapter_missing(name: str) -> str | None:
    if importlib.util.find_spec(f"agnosticopt.adapters.{name}") is None:
        return f"agnosticopt has no {name} adapter"
    return None


class NumpyBackend(Backend):
    """numpy: the reference."""

    writeable = True

    def __init__(self, name: str = "numpy") -> None:
        super().__init__(name)

    def asarray(self, a: np.ndarray) -> Any:
        return np.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)


class NumpyReadonlyBackend(NumpyBackend):
    """numpy arrays whose ``writeable`` flag is off: any write into them fails."""

    writeable = False

    def __init__(self) -> None:
        super().__init__("numpy_readonly")

    def asarray(self, a: np.ndarray) -> Any:
        out = np.array(a, copy=True)
        out.flags.writeable = False
        return out


class TorchBackend(Backend):
    """torch tensors on one device type (``"cpu"`` or ``"cuda"``)."""

    writeable = True

    def __init__(self, device: str = "cpu") -> None:
        super().__init__("torch" if device == "cpu" else f"torch_{device}")
        self.device_type = device

    def unavailable(self) -> str | None:
        missing = missing_module("torch")
        if missing or self.device_type == "cpu":
            return missing
        import torch

        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU on this machine"
        return None

    def asarray(self, a: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(np.array(a, copy=True))
        return t if self.device_type == "cpu" else t.to(self.device_type)

    def to_numpy(self, a: Any) -> np.ndarray:
        from agnosticopt import adapter_for

        return adapter_for(a).to_numpy(a)

    def device(self, a: Any) -> Any:
        return a.device


class ArrayApiStrictBackend(Backend):
    """array-api-strict arrays, by default on its non-default ``device1``."""

    def __init__(self, device: str = "device1") -> None:
        super().__init__("array_api_strict")
        self.device_name = device

    def unavailable(self) -> str | None:
        return missing_module("array_api_strict")

    def unsupported(self, dtype: str) -> str | None:
        if dtype == "float16":
            return "array-api-strict has no float16 (the standard defines none)"
        return None

    def asarray(self, a: np.ndarray) -> Any:
        import array_api_strict

        device = array_api_strict.Device(self.device_name)
        return array_api_strict.asarray(np.array(a, copy=True), device=device)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.from_dlpack(a).copy()

    def device(self, a: Any) -> Any:
        return a.device


class JaxBackend(Backend):
    """JAX arrays on the default device.

    float64 needs JAX's 64-bit mode (``JAX_ENABLE_X64=1`` before JAX is
    imported, or ``jax.config.update("jax_enable_x64", True)``); without it the
    64-bit dtypes are reported unsupported. ``agnosticopt conformance`` and the
    pytest entry point switch it on.
    """

    def __init__(self) -> None:
        super().__init__("jax")

    def unavailable(self) -> str | None:
        return missing_module("jax") or _adapter_missing("jax")

    def unsupported(self, dtype: str) -> str | None:
        import jax

        if dtype in ("float64", "complex128") and not jax.config.read("jax_enable_x64"):
            return "JAX 64-bit mode is off (JAX_ENABLE_X64=1 turns it on)"
        return None

    def asarray(self, a: np.ndarray) -> Any:
        import jax.numpy as jnp

        return jnp.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def device(self, a: Any) -> Any:
        return next(iter(a.devices()))


class CupyBackend(Backend):
    """CuPy arrays on the current GPU."""

    writeable = True

    def __init__(self) -> None:
        super().__init__("cupy")

    def unavailable(self) -> str | None:
        missing = missing_module("cupy") or _adapter_missing("cupy")
        if missing:
            return missing
        try:
            import cupy

            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001  (any failure means no usable GPU)
            return f"CuPy has no usable GPU: {type(exc).__name__}"
        return None if count > 0 else "CuPy sees no GPU"

    def asarray(self, a: np.ndarray) -> Any:
        import cupy

        return cupy.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.get()

    def device(self, a: Any) -> Any:
        return a.device


#: How to make each backend of the registry (``agnosticopt._backends``).
_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": NumpyBackend,
    "numpy_readonly": NumpyReadonlyBackend,
    "torch": TorchBackend,
    "torch_cuda": lambda: TorchBackend("cuda"),
    "array_api_strict": ArrayApiStrictBackend,
    "jax": JaxBackend,
    "cupy": CupyBackend,
}

#: The built-in backends, by name, as factories: one per entry of the registry
#: (``agnosticopt._backends.BACKENDS``), in its order; a registry entry without a
#: factory fails here, at import.
BUILTIN_BACKENDS: dict[str, Callable[[], Backend]] = {
    name: _FACTORIES[name] for name in BACKEND_NAMES
}


def get_backend(spec: str | Backend) -> Backend:
    """A backend from a built-in name or ``"package.module:attribute"``.

    Parameters
    ----------
    spec
        A :class:`Backend` (returned as is), the name of a built-in backend
        (:data:`BUILTIN_BACKENDS`), or ``"module:attr"`` where ``attr`` is a
        backend object or a callable returning one (a third party's backend).

    Raises
    ------
    ValueError
        If ``spec`` names no built-in backend and has no ``:``.
    TypeError
        If the attribute is not a backend (has no ``asarray`` and ``to_numpy``).
    """
    if not isinstance(spec, str):
        return spec
    factory = BUILTIN_BACKENDS.get(spec.replace("-", "_"))
    if factory is not None:
        return factory()
    module_name, sep, attr = spec.partition(":")
    if not sep:
        names = ", ".join(BUILTIN_BACKENDS)
        msg = f"unknown backend {spec!r}: use one of {names}, or 'module:attribute'"
        raise ValueError(msg)
    found: Any = getattr(importlib.import_module(module_name), attr)
    if isinstance(found, type) or (callable(found) and not hasattr(found, "asarray")):
        found = found()
    return as_backend(found)


def as_backend(obj: Any) -> Backend:
    """``obj`` as a :class:`Backend`.

    An object that is not a ``Backend`` subclass but has ``asarray`` and
    ``to_numpy`` (and optionally ``name``, ``unavailable``, ``unsupported``,
    ``writeable``, ``device``) is wrapped, so any duck-typed backend works.

    Raises
    ------
    TypeError
        If ``obj`` has no ``asarray`` or no ``to_numpy``.
    """
    if isinstance(obj, Backend):
        return obj
    if not (
        callable(getattr(obj, "asarray", None))
        and callable(getattr(obj, "to_numpy", None))
    ):
        msg = f"{obj!r} is not a conformance backend (it needs asarray and to_numpy)"
        raise TypeError(msg)
    return _Duck(obj)


class _Duck(Backend):
    """A backend given as any object with ``asarray`` and ``to_numpy``."""

    def __init__(self, obj: Any) -> None:
        super().__init__(str(getattr(obj, "name", type(obj).__name__)))
        self.obj = obj
        self.writeable = bool(getattr(obj, "writeable", False))
        self.in_place = bool(getattr(obj, "in_place", True))
        self.in_place_refused = str(
            getattr(obj, "in_place_refused", self.in_place_refused)
        )

    def unavailable(self) -> str | None:
        method = getattr(self.obj, "unavailable", None)
        return method() if callable(method) else None

    def unsupported(self, dtype: str) -> str | None:
        method = getattr(self.obj, "unsupported", None)
        return method(dtype) if callable(method) else None

    def asarray(self, a: np.ndarray) -> Any:
        return self.obj.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(self.obj.to_numpy(a))

    def device(self, a: Any) -> Any:
        method = getattr(self.obj, "device", None)
        return method(a) if callable(method) else super().device(a)
