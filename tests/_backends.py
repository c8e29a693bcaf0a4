"""Array backends under test, as pytest parameters over the conformance backends.

The backends themselves (how to convert numpy arrays to each, and why one is
unavailable here) are the public ones of :mod:`agnosticopt.conformance`:
numpy, a read-only numpy whose arrays refuse every write (it catches stray
in-place writes in the core), torch CPU, torch CUDA, array-api-strict (on its
non-default device), JAX and CuPy. A backend that is not installed, or needs a
GPU that is absent, is skipped with that reason (``backend_params``).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt
from agnosticopt import conformance
from agnosticopt._backends import BACKEND_NAMES

#: Array backends under test, one member per entry of the registry
#: (``agnosticopt._backends``): ``BackendKind.TORCH_CUDA.value == "torch_cuda"``.
BackendKind = enum.Enum(  # type: ignore[misc]  (members from the registry)
    "BackendKind", {name.upper(): name for name in BACKEND_NAMES}
)


class BackendHelper:
    """Converts numpy arrays to one backend and back (tests' short-hand)."""

    def __init__(self, kind: BackendKind) -> None:
        self.kind = kind
        self.name = kind.value
        #: The public conformance backend doing the work.
        self.conformance = conformance.get_backend(kind.value)

    def __repr__(self) -> str:
        return self.name

    def asarray(self, a: Any) -> Any:
        """``a`` (a numpy array or nested list) as an array of this backend."""
        return self.conformance.asarray(np.asarray(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        """A numpy copy of an array of this backend."""
        return self.conformance.to_numpy(a)

    def require(self, dtype: str) -> None:
        """Skip the running test when this backend has no ``dtype``."""
        reason = self.conformance.unsupported(dtype)
        if reason:
            pytest.skip(reason)

    @property
    def writeable(self) -> bool:
        """Whether ``update_`` may write into this backend's arrays."""
        return self.conformance.writeable


#: The backends of the core tests (issue 2); identity tests use ALL_BACKENDS.
CORE_BACKENDS = (
    BackendKind.NUMPY,
    BackendKind.NUMPY_READONLY,
    BackendKind.TORCH,
    BackendKind.ARRAY_API_STRICT,
)
ALL_BACKENDS = tuple(BackendKind)


def backend_params(kinds: tuple[BackendKind, ...]) -> list[Any]:
    """pytest params for ``kinds``, each skipped with a reason when unavailable."""
    params = []
    for kind in kinds:
        why = conformance.get_backend(kind.value).unavailable()
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param(kind, id=kind.value, marks=marks))
    return params


@contextlib.contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    """Run the block with ``update_``'s compiled fast path on or off, then restore it."""
    previous = opt.set_fast_path(enabled)
    try:
        yield
    finally:
        opt.set_fast_path(previous)


def host_copy(a: Any) -> np.ndarray:
    """A numpy copy of a numpy or torch array (to compare bits)."""
    if type(a).__module__.startswith("torch"):
        return a.detach().numpy().copy()
    return np.array(a, copy=True)


def state_leaves(state: Any) -> Iterator[Any]:
    """The arrays (as numpy copies) and host scalars of a rule state, in order."""
    if isinstance(state, (tuple, list)):
        for item in state:
            yield from state_leaves(item)
    elif state is None or isinstance(state, (int, float, np.generic)):
        yield state
    else:
        yield host_copy(state)
