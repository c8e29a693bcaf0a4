"""The one list of array backends: names, libraries and adapter modules.

Every other list of backends is derived from :data:`BACKENDS`: the adapter
lookup (:mod:`agnosticopt._xp`), the adapters package's submodules, the
conformance suite's built-in backends and ``agnosticopt info``, and the tests'
backend parameters. Nothing here imports a backend library: entries name
modules as strings, imported only when an array of that library is met.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADAPTER_MODULES",
    "ADAPTER_ONLY",
    "ARRAY_MODULES",
    "BACKENDS",
    "BACKEND_NAMES",
    "BackendEntry",
    "backend_entry",
]


@dataclass(frozen=True)
class BackendEntry:
    """One built-in backend of the conformance suite and the tests.

    Attributes
    ----------
    name
        The backend's name in reports and on the command line (``"torch_cuda"``).
    library
        The top-level module of the array library (``"torch"``).
    adapter
        The submodule of ``agnosticopt.adapters`` that adapts its arrays.
    needs_gpu
        Whether the backend runs only where a GPU is present.
    """

    name: str
    library: str
    adapter: str
    needs_gpu: bool = False


#: The built-in backends, in report order.
BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry("numpy", "numpy", "numpy"),
    BackendEntry("numpy_readonly", "numpy", "numpy"),
    BackendEntry("torch", "torch", "torch"),
    BackendEntry("torch_cuda", "torch", "torch", needs_gpu=True),
    BackendEntry("array_api_strict", "array_api_strict", "array_api_strict"),
    BackendEntry("jax", "jax", "jax"),
    BackendEntry("cupy", "cupy", "cupy", needs_gpu=True),
)

#: The built-in backends' names, in report order.
BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)

#: Array libraries with an adapter but no built-in conformance backend yet:
#: top-level module -> adapter submodule.
ADAPTER_ONLY: dict[str, str] = {"dask": "dask"}

#: The submodules of ``agnosticopt.adapters`` that adapt a backend's arrays.
ADAPTER_MODULES: frozenset[str] = frozenset(
    [*(b.adapter for b in BACKENDS), *ADAPTER_ONLY.values()]
)

#: Top-level module of an array's type -> its adapter submodule (JAX's array
#: types live in ``jaxlib``).
ARRAY_MODULES: dict[str, str] = {
    **{b.library: b.adapter for b in BACKENDS},
    "jaxlib": "jax",
    **ADAPTER_ONLY,
}


def backend_entry(name: str) -> BackendEntry:
    """The built-in backend called ``name``.

    Raises
    ------
    KeyError
        If no built-in backend has that name (the message lists them).
    """
    for entry in BACKENDS:
        if entry.name == name:
            return entry
    msg = f"no built-in backend {name!r}: the built-in ones are {', '.join(BACKEND_NAMES)}"
    raise KeyError(msg)
