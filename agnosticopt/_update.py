"""One optimisation step over a state tree: ``update`` (functional) and ``update_`` (in place).

Both check everything and apply every rule before anything is written
(:mod:`agnosticopt._plan`, :mod:`agnosticopt._commit`), so an update that
raises has changed nothing.
"""

from __future__ import annotations

from typing import Any

from agnosticopt._commit import _commit, _compute
from agnosticopt._containers import flatten
from agnosticopt._leaf import Leaf, _copy_leaf, _map_leaves
from agnosticopt._plan import _collect, _tree_children
from agnosticopt._replay import remember, replay

__all__ = ["update", "update_"]


def _rebuild_model(tree: Any, model: Any, new: dict[int, Any], *, reuse: bool) -> Any:
    """The model with each Leaf's array replaced by ``new[id(leaf)]``.

    Containers are rebuilt (a container met twice is rebuilt once); with
    ``reuse``, a container none of whose children changed is returned as is.
    """
    memo: dict[tuple[int, int], Any] = {}

    def walk(t: Any, x: Any) -> Any:
        if isinstance(t, Leaf):
            return new.get(id(t), x)
        if t is None:
            return x
        key = (id(t), id(x))
        if key in memo:
            return memo[key]
        node = flatten(x)
        assert node is not None  # checked by _Plan
        olds = node.children
        pairs = zip(_tree_children(t, node, ()), olds, strict=True)
        news = [walk(s, c) for s, c in pairs]
        same = reuse and all(a is b for a, b in zip(news, olds, strict=True))
        out = x if same else node.unflatten(news)
        memo[key] = out
        return out

    return walk(tree, model)


def update(tree: Any, model: Any, grads: Any) -> tuple[Any, Any]:
    """Take one optimisation step, without modifying anything given.

    Parameters
    ----------
    tree
        The state tree from :func:`setup` (or from an earlier update).
    model
        The model whose parameters the tree describes.
    grads
        Gradients mirroring the model: arrays at the trainable places, ``None``
        (or a missing mapping key) for no gradient. For namedtuple, dataclass and
        registered containers a ``Mapping`` keyed by field name also works.

    Returns
    -------
    tree, model
        A new state tree (new Leaf objects; state arrays that did not change are
        shared with the old tree) and a new model. Ties are kept in both.

    Raises
    ------
    TypeError, ValueError
        If the tree, the model and the gradients do not match, naming the key
        path: a gradient that is not an array of the parameter's backend, of
        another shape, a container of another kind or with other keys.

    Notes
    -----
    A gradient whose dtype differs from its parameter's is first cast to the
    parameter dtype (Optimisers.jl computes in the promoted type instead).
    Parameters that take no step (``None`` gradient, frozen leaf) are the same
    array objects in the new model as in the old one: do not write into the old
    model's arrays while the new one is in use.
    """
    entries = _collect(tree, model, grads)
    _compute(entries, in_place=False)
    leaves = {id(e.owner): Leaf(e.leaf.rule, e.state, e.leaf.frozen) for e in entries}
    new_tree = _map_leaves(tree, lambda leaf: leaves.get(id(leaf)) or _copy_leaf(leaf))
    new_model = _rebuild_model(
        tree, model, {id(e.owner): e.new_x for e in entries}, reuse=False
    )
    return new_tree, new_model


def update_(tree: Any, model: Any, grads: Any) -> tuple[Any, Any]:
    """Take one optimisation step, in place where the backend allows it.

    The same step as :func:`update`, bit for bit, but each Leaf's ``state`` is
    replaced in place and each parameter is overwritten in place when its
    adapter says it is writeable (numpy, torch); otherwise (read-only arrays,
    immutable backends) the new array goes into the returned model.

    With numba installed, float32/float64 numpy arrays and CPU torch tensors
    take a compiled fast path (see :func:`agnosticopt.set_fast_path`): one loop
    per rule over all leaves, which also writes the new moments into the
    leaf's existing state arrays, as Optimisers.jl's ``update!`` does. A tree
    that shares state arrays with this one (from :func:`adjust` or
    :func:`update`) then sees them change; copy it first to keep both.

    Parameters
    ----------
    tree, model, grads
        As for :func:`update`.

    Returns
    -------
    tree, model
        The same ``tree`` object, and the model to use from now on. Containers
        whose parameters were all written in place are returned unchanged.

    Raises
    ------
    TypeError, ValueError
        As for :func:`update`. Everything is checked and every rule applied
        before anything is written, so when ``update_`` raises (a bad gradient,
        or a rule that raises such as ``ClipNorm`` on a non-finite norm), no
        state and no parameter has changed.
    """
    if replay(tree, model, grads):  # the last update again: see agnosticopt/_replay.py
        return tree, model
    entries = _collect(tree, model, grads)
    plans = _compute(entries, in_place=True)
    _commit(entries, plans)
    remember(tree, model, grads, entries, plans)
    new_model = _rebuild_model(
        tree, model, {id(e.owner): e.new_x for e in entries}, reuse=True
    )
    return tree, new_model
