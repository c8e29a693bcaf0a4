"""A p-norm that gives the same bits on every backend, thread count and sharding.

Backends reduce in different orders (numpy pairwise in blocks of 8, torch
cascade sums split by thread, CUB trees on GPUs), so their ``sum`` differs in
the last bits. Here the reduction is the library's own, the **aligned-block
tree** (numerics version 2, see ``docs/numerics.md``):

* the node ``(L, j)`` of the tree covers the index range ``[j·2^L, (j+1)·2^L)``
  of the flattened array (of the concatenation of every leaf, for a global
  norm); a leaf ``(0, j)`` is element ``j``;
* a node's value is ``combine(left child, right child)``, one correctly rounded
  elementwise operation; a node whose right child lies wholly past the end
  ``n`` takes its left child's value unchanged (so nothing is padded);
* the root is ``(ceil(log2 n), 0)``.

Every node covers an aligned contiguous range, so a contiguous piece of the
array (a shard, or one leaf of a model) reduces the nodes that lie wholly inside
it on its own (:func:`reduce_piece`: at most about ``2·log2(n)`` of them, each
with its level and index), and :func:`combine_nodes` finishes the top of the
tree from the nodes of all pieces. The result is fixed by the data alone: the
same bits for one process and for any cut into pieces, uneven and empty ones
included, on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from agnosticopt._protocols import RuleNamespace
from agnosticopt._xp import adapter_for

__all__ = [
    "NUMERICS_VERSION",
    "Node",
    "ShardNorm",
    "combine_nodes",
    "norm",
    "norm_at",
    "norm_nodes",
    "pairwise_reduce",
    "piece_layout",
    "reduce_piece",
    "shard_norm_finish",
    "shard_norm_nodes",
    "shard_of",
    "tree_reduce",
]

#: Version of the numerics contract. 1: ClipNorm reduced with a power-of-two
#: padded tree that added element ``i`` to ``i + n/2``. 2: the aligned-block tree
#: (this module), whose subtrees are contiguous, so that shards reduce locally.
NUMERICS_VERSION = 2

Combine = Callable[[Any, Any], Any]


class Node(NamedTuple):
    """A node of the aligned-block tree: ``value`` reduces ``[block·2^level, (block+1)·2^level)``.

    ``value`` is a one-element array of the piece's backend.
    """

    level: int
    block: int
    value: Any


def reduce_piece(
    xp: RuleNamespace,
    piece: Any,
    offset: int,
    combine: Combine,
    total: int | None = None,
) -> list[Node]:
    """The tree nodes that lie wholly inside one contiguous piece of an array.

    Parameters
    ----------
    xp
        The adapter of ``piece``.
    piece
        The elements ``[offset, offset + size)`` of the whole (flattened) array;
        flattened in C order.
    offset
        Where the piece starts in the whole array (the global index of its first
        element).
    combine
        An elementwise binary operation of ``xp`` (``xp.add``, ``xp.maximum``,
        ``xp.minimum``).
    total
        The length of the whole array, to check that the piece lies inside it
        (optional: the nodes do not depend on it).

    Returns
    -------
    list of Node
        The maximal aligned blocks of ``[offset, offset + size)``, reduced, at most
        about ``2·log2(size)`` (none for an empty piece). Hand the nodes of all
        pieces to :func:`combine_nodes`.

    Notes
    -----
    One elementwise ``combine`` per level over the piece (``log2(size)`` calls
    in all), on the halves ``a[0::2]`` and ``a[1::2]``.
    """
    n = xp.size(piece)
    if offset < 0 or (total is not None and offset + n > total):
        msg = f"a piece of {n} elements at offset {offset} is not inside [0, {total})"
        raise ValueError(msg)
    nodes: list[Node] = []
    if n == 0:
        return nodes
    flat = xp.flatten(piece)
    # The nodes [lo, hi) of this level are in flat. No slice is ever empty: JAX
    # cannot build an empty slice of an explicitly sharded array outside
    # ``jax.set_mesh`` ("Length of device assignment 1 is not equal to the size
    # of the mesh"), so a piece that is used up ends the loop before slicing.
    lo, hi, level = offset, offset + n, 0
    while True:
        if lo & 1:  # its left sibling is in another piece: a finished node
            nodes.append(Node(level, lo, flat[0:1]))
            lo += 1
            if lo == hi:
                break
            flat = flat[1:]
        if hi & 1:  # the last node's right sibling is not here
            m = hi - lo
            nodes.append(Node(level, hi - 1, flat[m - 1 : m]))
            hi -= 1
            if lo == hi:
                break
            flat = flat[: m - 1]
        flat = combine(flat[0::2], flat[1::2])
        lo, hi, level = lo >> 1, hi >> 1, level + 1
    return nodes


def piece_layout(offset: int, size: int) -> list[tuple[int, int]]:
    """``(level, block)`` of each node :func:`reduce_piece` gives, in its order.

    The same walk as :func:`reduce_piece` on the index range
    ``[offset, offset + size)``, without the data: an adapter that reduces the
    pieces on the devices (JAX's shards, in one ``shard_map``) labels the
    values it gets back with it.
    """
    layout: list[tuple[int, int]] = []
    if size == 0:
        return layout
    lo, hi, level = offset, offset + size, 0
    while True:
        if lo & 1:
            layout.append((level, lo))
            lo += 1
            if lo == hi:
                break
        if hi & 1:
            layout.append((level, hi - 1))
            hi -= 1
            if lo == hi:
                break
        lo, hi, level = lo >> 1, hi >> 1, level + 1
    return layout


def combine_nodes(nodes: Iterable[Node], total: int, combine: Combine) -> Any:
    """The root of the aligned-block tree of a ``total``-element array.

    Parameters
    ----------
    nodes
        The nodes of every piece (:func:`reduce_piece`), in any order; together
        the pieces must cover ``[0, total)`` once.
    total
        The length of the whole array (at least 1).
    combine
        The operation the nodes were reduced with.

    Returns
    -------
    value
        A one-element array: the reduction of the whole array.

    Raises
    ------
    ValueError
        If the nodes do not cover ``[0, total)`` exactly once.
    """
    if total < 1:
        msg = "combine_nodes needs at least one element"
        raise ValueError(msg)
    top = (total - 1).bit_length()
    levels: list[dict[int, Any]] = [{} for _ in range(top + 1)]
    for node in nodes:
        if not (0 <= node.level <= top) or node.block in levels[node.level]:
            msg = (
                f"node {node.level, node.block} is out of range or given twice: "
                f"the pieces do not cover [0, {total}) exactly once"
            )
            raise ValueError(msg)
        levels[node.level][node.block] = node.value
    for level in range(top):
        here, up = levels[level], levels[level + 1]
        for j in sorted(here):
            if j not in here:  # consumed as a right sibling
                continue
            value = here.pop(j)
            if j & 1:
                msg = (
                    f"node {level, j} has no left sibling: the pieces do not cover "
                    f"[0, {total}) exactly once"
                )
                raise ValueError(msg)
            if (j + 1) << level >= total:  # the right sibling is past the end
                merged = value
            elif j + 1 in here:
                merged = combine(value, here.pop(j + 1))
            else:
                msg = (
                    f"node {level, j + 1} is missing: the pieces do not cover "
                    f"[0, {total}) exactly once"
                )
                raise ValueError(msg)
            if j >> 1 in up:
                msg = (
                    f"node {level + 1, j >> 1} is given twice: the pieces do not cover "
                    f"[0, {total}) exactly once"
                )
                raise ValueError(msg)
            up[j >> 1] = merged
    root = levels[top]
    if list(root) != [0]:
        msg = f"the pieces do not cover [0, {total}) exactly once"
        raise ValueError(msg)
    return root[0]


def tree_reduce(xp: RuleNamespace, a: Any, combine: Combine) -> Any:
    """Reduce all of ``a`` by the aligned-block tree; a one-element array.

    Raises
    ------
    ValueError
        If ``a`` is empty.
    """
    n = xp.size(a)
    return combine_nodes(reduce_piece(xp, a, 0, combine), n, combine)


def pairwise_reduce(
    xp: RuleNamespace, a: Any, combine: Combine, identity: Any = None
) -> Any:
    """Reduce ``a`` to a 0-d array by the aligned-block tree of ``combine`` calls.

    Parameters
    ----------
    xp
        The adapter of ``a``.
    a
        Any array; it is flattened in C order.
    combine
        An elementwise binary operation of ``xp`` (e.g. ``xp.add``).
    identity
        Unused (kept for callers of numerics version 1, which padded with it):
        the aligned-block tree pads nothing.
    """
    if xp.size(a) == 0:
        msg = "pairwise_reduce needs at least one element"
        raise ValueError(msg)
    return tree_reduce(xp, a, combine)[0]


def _terms(xp: RuleNamespace, dx: Any, p: float) -> tuple[Any, Combine]:
    """The elementwise terms of the p-norm (p = 2, 1, ±inf) and how they combine."""
    if p == 2:
        return xp.abs2(dx), xp.add
    mag = _magnitude(xp, dx)
    if p == 1:
        return mag, xp.add
    if p == math.inf:
        return mag, xp.maximum
    if p == -math.inf:
        return mag, xp.minimum
    msg = f"the exact norms are p = 2, 1, inf and -inf, not {p!r}"
    raise ValueError(msg)


def _combine_of(xp: RuleNamespace, p: float) -> Combine:
    """How the terms of the p-norm (p = 2, 1, ±inf) combine."""
    if p in (1, 2):
        return xp.add
    if p in (math.inf, -math.inf):
        return xp.maximum if p > 0 else xp.minimum
    msg = f"the exact norms are p = 2, 1, inf and -inf, not {p!r}"
    raise ValueError(msg)


def norm_nodes(
    xp: RuleNamespace, dx: Any, p: float, offset: int, dtype: str | None = None
) -> tuple[list[Node], Combine]:
    """The tree nodes of one piece's p-norm terms (p = 2, 1, ±inf).

    Parameters
    ----------
    xp, dx
        A piece of the whole array (a shard, or a leaf of a model), any shape.
    p
        2 (terms ``|g|²``, summed), 1 (``|g|``, summed), ``inf`` (maximum) or
        ``-inf`` (minimum).
    offset
        The global index of the piece's first element.
    dtype
        Real dtype to reduce in: the terms are computed in the piece's (real)
        dtype, then converted to ``dtype`` (exactly, when it is wider).

    Returns
    -------
    nodes, combine
        For :func:`combine_nodes`; finish with :func:`finish_norm`.
    """
    by_blocks = getattr(
        xp, "norm_nodes", None
    )  # an adapter that reduces block by block (None: not this array)
    if by_blocks is not None:
        found = by_blocks(dx, p, offset, dtype)
        if found is not None:
            return found, _combine_of(xp, p)
    terms, combine = _terms(xp, dx, p)
    if dtype is not None and xp.dtype_name(terms) != dtype:
        terms = xp.astype(terms, dtype)
    return reduce_piece(xp, terms, offset, combine), combine


def finish_norm(xp: RuleNamespace, value: Any, p: float) -> Any:
    """The norm from the combined root ``value`` (``sqrt`` for ``p = 2``)."""
    return xp.sqrt(value) if p == 2 else value


def norm(dx: Any, p: float = 2.0) -> Any:
    """The p-norm of array ``dx`` as a host scalar in its real dtype.

    Parameters
    ----------
    dx
        A floating-point or complex array of any backend with an adapter. An
        integer or bool array is converted to float64 first (as Julia's
        ``norm`` of integers is a ``Float64``; integers beyond 2**53 round), and
        the result is a float64.
    p
        2, 1, ``inf``, ``-inf`` and 0 (the count of non-zeros) are exact and
        identical on every backend. Other ``p`` use ``pow``, whose rounding
        varies by backend and CPU (up to a few ulp): same bits are not promised.

    Notes
    -----
    Sums and extrema are reduced by the library's aligned-block tree (see the
    module docstring and ``docs/numerics.md``), so the result is the same
    however the array is split into shards. For complex arrays ``|z|`` is
    ``sqrt(re² + im²)`` with a correctly rounded square root (not ``hypot``),
    so it overflows where ``hypot`` would not. An empty array has norm 0 (and
    ``inf`` for ``p = -inf``).
    """
    xp = adapter_for(dx)
    if xp is None:
        msg = f"norm expects an array, got {type(dx).__name__}"
        raise TypeError(msg)
    if not xp.is_trainable(dx):
        dx = _as_float64(xp, dx)
    real = xp.scalar_type(dx)
    if xp.size(dx) == 0:
        return real(math.inf) if p == -math.inf else real(0)
    if p == 0:
        return real(xp.count_nonzero(dx))
    if p == 2:
        nodes, combine = norm_nodes(xp, dx, p, 0)
        total = combine_nodes(nodes, xp.size(dx), combine)[0]
        return _sqrt(real(xp.to_host(total)))
    if p in (1, math.inf, -math.inf):
        nodes, combine = norm_nodes(xp, dx, p, 0)
        return real(xp.to_host(combine_nodes(nodes, xp.size(dx), combine)[0]))
    q = real(p)
    mag = _magnitude(xp, dx)
    total = real(xp.to_host(tree_reduce(xp, xp.pow(mag, q), xp.add)[0]))
    return total ** (real(1) / q)


def shard_of(x: Any) -> Any:
    """The shard description of a local shard (``None`` for a whole array).

    An adapter of a sharded engine (``adapters/dtensor.py``) marks the local
    shards it hands to the rules with an object with ``offset`` and ``total``
    (where the shard lies in the flattened whole array), ``contributes`` (False
    on ranks holding a replica they do not reduce), ``check(what)`` (raise if
    the shard is not one contiguous range), ``gather(nodes, width)`` (the nodes
    of every rank, one collective), optionally ``gather_many(pieces)`` (the same
    for a list of ``(nodes, width)``, one collective for all; without it each
    piece takes its own ``gather``) and ``all_true``/``sum_count``.
    """
    return getattr(x, "_agnosticopt_shard", None)


def node_width(total: int) -> int:
    """A bound on the number of nodes :func:`reduce_piece` gives for a piece of ``total``."""
    return 2 * (max(total, 1).bit_length() + 1)


def norm_at(x: Any, dx: Any, p: float = 2.0) -> Any:
    """:func:`norm` of ``dx``, the step of parameter ``x``, which may be a local shard.

    For a shard (see :func:`shard_of`) the norm is that of the whole array, the
    same bits as :func:`norm` of it in one process: each rank reduces the tree
    nodes of its index range and one all-gather exchanges them
    (:func:`shard_norm_nodes`, then :func:`shard_norm_finish`).
    """
    shard = shard_of(x)
    if shard is None:
        return norm(dx, p)
    planned = shard_norm_nodes(shard, dx, p)
    if not isinstance(planned, ShardNorm):
        return planned
    found = shard.gather(planned.nodes, node_width(shard.total))
    return shard_norm_finish(planned, found)


class ShardNorm(NamedTuple):
    """A local shard's part of a p-norm, before the exchange: see :func:`shard_norm_nodes`."""

    nodes: list[Node]
    total: int
    combine: Combine
    p: float
    xp: Any
    real: Any


def shard_norm_nodes(shard: Any, dx: Any, p: float) -> Any:
    """The tree nodes of a local shard's p-norm terms, or the norm if it needs none.

    Returns a host scalar (the norm) when no node exchange is needed (an empty
    array; ``p = 0``, which counts with one all-reduce), else a
    :class:`ShardNorm` whose ``nodes`` (none on a rank that does not
    contribute) the ranks exchange, ``node_width(shard.total)`` rows per rank;
    hand the nodes of every rank to :func:`shard_norm_finish`.
    """
    shard.check(f"a {p}-norm")
    xp = adapter_for(dx)
    real = xp.scalar_type(dx)
    if shard.total == 0:
        return real(math.inf) if p == -math.inf else real(0)
    if p == 0:
        return real(shard.sum_count(int(xp.count_nonzero(dx))))
    if p in (2, 1, math.inf, -math.inf):
        terms, combine = _terms(xp, dx, p)
    else:
        terms, combine = xp.pow(_magnitude(xp, dx), real(p)), xp.add
    nodes = reduce_piece(xp, terms, shard.offset, combine) if shard.contributes else []
    return ShardNorm(nodes, shard.total, combine, p, xp, real)


def shard_norm_finish(planned: ShardNorm, found: list[Node]) -> Any:
    """The norm (a host scalar) from the nodes ``found`` of every rank."""
    p, xp, real = planned.p, planned.xp, planned.real
    total = real(xp.to_host(combine_nodes(found, planned.total, planned.combine)[0]))
    if p == 2:
        return _sqrt(total)
    if p in (1, math.inf, -math.inf):
        return total
    return total ** (real(1) / real(p))


def _as_float64(xp: RuleNamespace, dx: Any) -> Any:
    name = xp.dtype_name(dx)
    if not (name.startswith(("int", "uint")) or name == "bool"):
        msg = (
            f"norm expects a floating-point, complex, integer or bool array, got {name}"
        )
        raise TypeError(msg)
    out = xp.astype(dx, "float64")
    if xp.dtype_name(out) != "float64":
        msg = (
            f"norm of a {xp.name} {name} array computes in float64, which this backend "
            f"does not have here (it gave {xp.dtype_name(out)}); convert the array first"
        )
        raise TypeError(msg)
    return out


def _magnitude(xp: RuleNamespace, dx: Any) -> Any:
    return xp.sqrt(xp.abs2(dx)) if xp.is_complex(dx) else xp.abs(dx)


def _sqrt(value: Any) -> Any:
    import numpy as np

    return np.sqrt(value)
