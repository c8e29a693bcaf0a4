"""A conformance backend of dask arrays in uneven chunks, an empty chunk among them.

:class:`DaskBackend` cuts every array along its first axis into chunks that do
not divide it, with a chunk of 0 rows among them (the suite's 131,089-element
parameter becomes chunks of 43,713 + 0 + 43,694 + 43,682 elements), so the
suite checks that lazy, block-wise steps, norm clips included, give numpy's
bits. ``to_numpy`` computes (on the default scheduler: a
``distributed.Client``'s cluster when one is active; ``tests/test_conformance_sharded.py``
runs the trajectories on a LocalCluster of 2 worker processes).

dask arrays are immutable, so :func:`agnosticopt.update_` refuses them by
design: the backend is functional-only (``in_place = False``), its trajectories
take :func:`agnosticopt.update`, and the checks of ``update_`` are skipped with
that reason. Use it as ``--backend agnosticopt.conformance._dask:DaskBackend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend, missing_module

__all__ = ["DaskBackend", "uneven_chunks"]


def uneven_chunks(rows: int) -> tuple[int, ...]:
    """Chunks of ``rows`` along the first axis: uneven, with an empty one.

    A third plus 7 rows (rounded down), then 0, then the rest in two unequal
    parts; fewer rows than 4 give one chunk and an empty one.
    """
    if rows < 4:
        return (rows, 0)
    first = min(rows // 3 + 7, rows - 2)
    rest = rows - first
    second = rest // 2 + 6 if rest > 12 else rest // 2
    return (first, 0, second, rest - second)


class DaskBackend(Backend):
    """dask arrays of numpy blocks, chunked unevenly on the first axis."""

    in_place = False
    in_place_refused = "dask arrays are immutable: update_ is refused by design"

    def __init__(self) -> None:
        super().__init__("dask")

    def unavailable(self) -> str | None:
        return missing_module("dask")

    def asarray(self, a: np.ndarray) -> Any:
        import dask.array as da

        a = np.array(a, copy=True)
        if a.ndim == 0:
            return da.from_array(a, chunks=())
        chunks = (uneven_chunks(a.shape[0]), *((n,) for n in a.shape[1:]))
        return da.from_array(a, chunks=chunks)

    def to_numpy(self, a: Any) -> np.ndarray:
        import dask.array as da

        return np.array(a.compute() if isinstance(a, da.Array) else a, copy=True)

    def device(self, a: Any) -> Any:
        return "cpu"  # the scheduler places blocks; dask arrays have no device
