"""dask adapter: lazy, functional, the numpy adapter's exact kernels block by block.

Every elementwise operation is a ``map_blocks`` of the :mod:`numpy adapter
<agnosticopt.adapters.numpy>`'s own method, so each block gets numpy's bits
(numpy is the reference) and the result stays a lazy dask array: an update
builds a graph and computes nothing. Blocks of different arrays are aligned by
dask (``elemwise`` unifies chunks and broadcasts); a 0-d dask array (a clip factor) is
broadcast to every block.

Reductions (``ClipNorm``, ``ClipGlobalNorm``, ``norm``) use the library's
aligned-block tree (:mod:`agnosticopt._norm`): the array is rechunked along
its first axis only, so that every block is one contiguous range of the
flattened array; each block reduces the tree nodes inside its range in a task
of its own (:func:`~agnosticopt._norm.reduce_piece` with numpy), and the top of
the tree is combined from those few nodes. Only the nodes travel, never the
gradient; the bits are those of one numpy array, whatever the chunks (uneven
and empty ones included). The clip factor is a lazy 0-d dask array: no
computation happens until the caller computes the new parameters.
``ClipNorm(throw=True)`` therefore raises its ``FloatingPointError`` when the
result is computed, not at ``update``.

dask arrays cannot be written: :func:`agnosticopt.update_` refuses them
(naming the key path), :func:`agnosticopt.update` returns the new lazy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat.dask.array as xp_dask
import dask.array as da
import numpy as np
from agnosticopt.adapters._base import Adapter, _is_scalar, _py
from agnosticopt.adapters.numpy import NumpyAdapter
from dask._task_spec import Task, TaskRef
from dask.array.core import elemwise
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from agnosticopt._norm import piece_layout  # the nodes of a block (was defined here)

__all__ = ["DaskAdapter", "adapter", "piece_layout"]

_NP = NumpyAdapter()


class _OnBlocks:
    """A numpy adapter method applied to blocks, the non-array arguments fixed.

    A small picklable object with a cheap dask token (the method's name and
    the fixed arguments), not a closure that dask would have to pickle to name.
    """

    def __init__(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.method = method
        self.fixed = {i: a for i, a in enumerate(args) if not isinstance(a, da.Array)}
        self.count = len(args)
        self.kwargs = kwargs

    def __dask_tokenize__(self) -> Any:
        fixed = tuple(
            (i, getattr(a, "__name__", a)) for i, a in sorted(self.fixed.items())
        )
        return (self.method, fixed, self.count, tuple(sorted(self.kwargs.items())))

    def __call__(self, *blocks: Any) -> np.ndarray:
        given = iter(blocks)
        args = [
            self.fixed[i] if i in self.fixed else next(given) for i in range(self.count)
        ]
        return np.asarray(getattr(_NP, self.method)(*args, **self.kwargs))


class _BlockNodes:
    """The values of one block's tree nodes, concatenated (the function of a task).

    Holds the global offset of every block's first element, so that the task of
    block ``i`` reduces the nodes of ``[starts[i], starts[i] + length)``; its
    dask token is its fields (cheap, and the same for the same inputs).
    """

    def __init__(self, starts: tuple[int, ...], p: float, dtype: str | None) -> None:
        self.starts = starts
        self.p = p
        self.dtype = dtype

    def __dask_tokenize__(self) -> Any:
        return ("_BlockNodes", self.starts, self.p, self.dtype)

    def __call__(self, block: np.ndarray, index: int) -> np.ndarray:
        from agnosticopt._norm import norm_nodes

        with np.errstate(all="ignore"):
            nodes, _ = norm_nodes(_NP, block, self.p, self.starts[index], self.dtype)
        if not nodes:
            return np.empty(0, dtype=self.dtype or _NP.dtype_name(block))
        return np.concatenate([node.value for node in nodes])


def _pick(values: np.ndarray, k: int) -> np.ndarray:
    """Node ``k`` of a block's node values, as a one-element array (a dask task)."""
    return values[k : k + 1]


def _clip_factor(
    norm: np.ndarray, rule: Any, shape: tuple[int, ...], name: str
) -> np.ndarray:
    """ClipNorm's λ from the norm block (runs in a dask task, on the host)."""
    x = np.empty(0, dtype=name)
    real = _NP.scalar_type(x)
    try:
        lam = rule.factor(real(norm.reshape(-1)[0]), x, _NP)
    except FloatingPointError as exc:
        msg = str(exc).replace("shape (0,)", f"shape {shape}")
        raise FloatingPointError(msg) from None
    return np.asarray(lam)


class DaskAdapter(Adapter):
    """Adapter for ``dask.array.Array`` (lazy; never written in place)."""

    fixes: tuple[str, ...] = (
        "elementwise: the numpy adapter's kernels per block (map_blocks)",
        "reductions: aligned-block tree nodes per contiguous block, combined lazily",
    )

    one_device = True  # dask arrays have no device; the scheduler places blocks

    #: ClipNorm keeps λ lazy (:meth:`clip_factor`).
    lazy_clip = True

    #: Why ``update_`` cannot run here (:func:`agnosticopt.update_` raises it).
    refuses_in_place = (
        "dask arrays are immutable task graphs, so update_ cannot write into them: "
        "use new_tree, new_model = agnosticopt.update(tree, model, grads)"
    )

    def __init__(self) -> None:
        super().__init__(xp_dask, "dask")

    def dtype_name(self, x: Any) -> str:
        return str(np.dtype(x.dtype))

    def dtype(self, name: str) -> Any:
        return np.dtype(name)

    def astype(self, x: Any, name: str) -> Any:
        return self._map(_NP.astype, x, name=name)

    def copy(self, x: Any) -> Any:
        return x.copy()

    def device(self, x: Any) -> Any:
        return None

    def _map(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` (a numpy adapter method) block by block; scalars are passed as they are."""
        if not any(isinstance(a, da.Array) for a in args):
            return fn(*args, **kwargs)
        call = _OnBlocks(fn.__name__, args, kwargs)
        arrays = [a for a in args if isinstance(a, da.Array)]
        meta = call(*(np.empty((0,) * a.ndim, dtype=a.dtype) for a in arrays))
        name = f"{fn.__name__.strip('_')}-{tokenize(call, *arrays)}"
        return elemwise(call, *arrays, dtype=meta.dtype, name=name)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        return self._map(_NP._apply, op, a, b)

    def negative(self, a: Any) -> Any:
        return self._map(_NP.negative, a)

    def sqrt(self, a: Any) -> Any:
        return self._map(_NP.sqrt, a)

    def abs(self, a: Any) -> Any:
        return self._map(_NP.abs, a)

    def sign(self, a: Any) -> Any:
        return self._map(_NP.sign, a)

    def _max(self, a: Any, b: Any) -> Any:
        return self._map(_NP._max, a, b)

    def _min(self, a: Any, b: Any) -> Any:
        return self._map(_NP._min, a, b)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self._map(_NP.where, cond, _py(a), _py(b))

    def greater(self, a: Any, b: Any) -> Any:
        return self._map(_NP.greater, a, _py(b))

    def less(self, a: Any, b: Any) -> Any:
        return self._map(_NP.less, a, _py(b))

    def not_equal(self, a: Any, b: Any) -> Any:
        return self._map(_NP.not_equal, a, _py(b))

    def pow(self, a: Any, q: Any) -> Any:
        return self._map(_NP.pow, a, _py(q))

    def isfinite(self, a: Any) -> Any:
        return self._map(_NP.isfinite, a)

    def make_complex(self, re: Any, im: Any) -> Any:
        return self._map(_NP.make_complex, re, im)

    def count_nonzero(self, a: Any) -> int:
        return int(da.count_nonzero(a).compute())

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a.compute() if isinstance(a, da.Array) else a)

    def _zero_ties(self, r: Any, a: Any, b: Any, *, upper: bool) -> Any:
        if not (_is_scalar(a) or isinstance(a, da.Array)):
            a = np.asarray(a)
        return super()._zero_ties(r, a, b, upper=upper)

    # -- reductions by blocks ---------------------------------------------------------
    def norm_nodes(
        self, dx: Any, p: float, offset: int, dtype: str | None
    ) -> list[Any]:
        """The aligned-block tree nodes of ``dx`` (at global ``offset``), lazily.

        One task per block computes the values of the nodes inside the block's
        contiguous range (:class:`_BlockNodes`); each node's value is a lazy
        one-element dask array, a task that picks it from its block's values.

        The tasks are written out with explicit keys: ``norm-nodes-<token>``
        (one per block) and ``norm-node-<level>-<block>-<token>``, the token
        that of the input array's name, the blocks' global offsets, ``p`` and
        ``dtype``; the same inputs give the same keys and tasks, different
        ones different keys. No ``dask.delayed`` of the array: that packed an
        optimised copy of the input's graph into every step (its keys fused
        differently from the same keys elsewhere, distributed's "Detected
        different run_spec" warning, and the history recomputed by each copy).
        """
        from agnosticopt._norm import Node

        flat = _contiguous_blocks(dx)
        real = dtype or _real_name(self.dtype_name(dx))
        lengths = _block_lengths(flat)
        starts = tuple(offset + sum(lengths[:i]) for i in range(len(lengths)))
        layouts = [
            piece_layout(start, length)
            for start, length in zip(starts, lengths, strict=True)
        ]
        if not any(layouts):
            return []
        call = _BlockNodes(starts, p, dtype)
        token = tokenize(call, flat)
        name = f"norm-nodes-{token}"
        tasks: dict[Any, Any] = {
            (name, i): Task((name, i), call, TaskRef((flat.name, i)), i)
            for i in range(len(layouts))
        }
        values = da.Array(
            HighLevelGraph.from_collections(name, tasks, dependencies=[flat]),
            name,
            (tuple(len(layout) for layout in layouts),),
            dtype=np.dtype(real),
        )
        values_dep: Any = values
        nodes: list[Any] = []
        for i, layout in enumerate(layouts):
            for k, (level, j) in enumerate(layout):
                node = f"norm-node-{level}-{j}-{token}"
                task: dict[Any, Any] = {
                    (node, 0): Task((node, 0), _pick, TaskRef((name, i)), k)
                }
                graph = HighLevelGraph.from_collections(
                    node, task, dependencies=[values_dep]
                )
                nodes.append(
                    Node(level, j, da.Array(graph, node, ((1,),), dtype=values.dtype))
                )
        return nodes

    def clip_factor(self, rule: Any, norm: Any, x: Any) -> Any:
        """ClipNorm's λ as a lazy 0-d array: ``rule.factor`` run in a task."""
        name = self.dtype_name(x)
        real = np.dtype(_real_name(name))
        return da.map_blocks(
            _clip_factor,
            norm,
            rule,
            tuple(x.shape),
            name,
            dtype=real,
            drop_axis=0,
            meta=np.empty((), dtype=real),
        )


def _real_name(name: str) -> str:
    return {"complex64": "float32", "complex128": "float64"}.get(name, name)


def _contiguous_blocks(x: Any) -> Any:
    """``x`` with chunks along its first axis only, then as 1-d blocks (C order)."""
    if x.ndim == 0:
        return x.reshape((1,))
    if x.ndim > 1 and any(len(c) > 1 for c in x.chunks[1:]):
        x = x.rechunk(dict.fromkeys(range(1, x.ndim), -1))
    rows = math.prod(x.shape[1:])
    if x.ndim > 1:
        chunks = (tuple(c * rows for c in x.chunks[0]),)
        x = x.map_blocks(
            np.ravel, chunks=chunks, drop_axis=list(range(1, x.ndim)), dtype=x.dtype
        )
    return x


def _block_lengths(flat: Any) -> tuple[int, ...]:
    return tuple(int(c) for c in flat.chunks[0])


_ADAPTER: DaskAdapter | None = None


def adapter(x: Any) -> Adapter | None:
    """The dask adapter for a ``dask.array.Array`` whose blocks are numpy arrays."""
    global _ADAPTER
    if not isinstance(x, da.Array):
        return None
    if type(getattr(x, "_meta", None)) is not np.ndarray:  # cupy or sparse blocks
        return None
    if _ADAPTER is None:
        _ADAPTER = DaskAdapter()
    return _ADAPTER
