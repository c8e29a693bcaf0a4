"""Array backends under test, and converting numpy arrays to and from them.

numpy, a read-only numpy whose arrays refuse every write (it catches stray
in-place writes in the core), torch CPU, torch CUDA, array-api-strict, JAX and
CuPy. A backend that is not installed, or needs a GPU that is absent, is skipped
with that reason (``backend_params``).
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


class Backend(enum.Enum):
    """Array backends under test."""

    NUMPY = "numpy"
    NUMPY_READONLY = "numpy_readonly"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_CUDA = "torch_cuda"
    JAX = "jax"
    CUPY = "cupy"


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _cuda_missing() -> str | None:
    missing = _missing("torch")
    if missing:
        return missing
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _cupy_missing() -> str | None:
    missing = _missing("cupy")
    if missing:
        return missing
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (any failure means no usable GPU)
        return f"CuPy has no usable GPU: {type(exc).__name__}"
    return None


class BackendHelper:
    """Converts numpy arrays to one backend and back."""

    def __init__(self, kind: Backend) -> None:
        self.kind = kind
        self.name = kind.value

    def __repr__(self) -> str:
        return self.name

    def asarray(self, a: Any) -> Any:
        """``a`` (a numpy array or nested list) as an array of this backend."""
        a = np.asarray(a)
        if self.kind is Backend.NUMPY:
            return a.copy()
        if self.kind is Backend.NUMPY_READONLY:
            b = a.copy()
            b.flags.writeable = False
            return b
        if self.kind is Backend.ARRAY_API_STRICT:
            import array_api_strict

            return array_api_strict.asarray(a.copy())
        if self.kind in (Backend.TORCH, Backend.TORCH_CUDA):
            import torch

            t = torch.from_numpy(a.copy())
            return t.cuda() if self.kind is Backend.TORCH_CUDA else t
        if self.kind is Backend.JAX:
            import jax.numpy as jnp

            return jnp.asarray(a)
        import cupy

        return cupy.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A numpy copy of an array of this backend."""
        if self.kind in (Backend.TORCH, Backend.TORCH_CUDA):
            return a.detach().cpu().numpy().copy()  # type: ignore[no-any-return]
        if self.kind is Backend.CUPY:
            return a.get()  # type: ignore[no-any-return]
        return np.array(a, copy=True)

    def require(self, dtype: str) -> None:
        """Skip the running test when this backend has no ``dtype``."""
        if self.kind is Backend.ARRAY_API_STRICT and dtype == "float16":
            pytest.skip("array-api-strict has no float16 (the standard defines none)")

    @property
    def writeable(self) -> bool:
        """Whether ``update_`` may write into this backend's arrays."""
        return self.kind in (
            Backend.NUMPY, Backend.TORCH, Backend.TORCH_CUDA, Backend.CUPY
        )


_WHY_SKIP: dict[Backend, Callable[[], str | None]] = {
    Backend.NUMPY: lambda: None,
    Backend.NUMPY_READONLY: lambda: None,
    Backend.ARRAY_API_STRICT: lambda: _missing("array_api_strict"),
    Backend.TORCH: lambda: _missing("torch"),
    Backend.TORCH_CUDA: _cuda_missing,
    Backend.JAX: lambda: _missing("jax") or _adapter_missing("jax"),
    Backend.CUPY: lambda: _cupy_missing() or _adapter_missing("cupy"),
}


def _adapter_missing(name: str) -> str | None:
    if importlib.util.find_spec(f"agnosticopt.adapters.{name}") is None:
        return f"agnosticopt has no {name} adapter yet"
    return None


#: The backends of the core tests (issue 2); identity tests use ALL_BACKENDS.
CORE_BACKENDS = (
    Backend.NUMPY,
    Backend.NUMPY_READONLY,
    Backend.TORCH,
    Backend.ARRAY_API_STRICT,
)
ALL_BACKENDS = tuple(Backend)


def backend_params(kinds: tuple[Backend, ...]) -> list[Any]:
    """pytest params for ``kinds``, each skipped with a reason when unavailable."""
    params = []
    for kind in kinds:
        why = _WHY_SKIP[kind]()
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param(kind, id=kind.value, marks=marks))
    return params
