"""The first phase of an update: walk tree, model and gradients together and check them.

:func:`_collect` gives one :class:`_Entry` per Leaf met (tied arrays once, their
gradients summed), after checking that the tree matches the model and that each
gradient is an array of its parameter's backend and shape (cast to its dtype).
Nothing is computed or written here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agnosticopt._containers import KeyPath, Node, flatten, format_path
from agnosticopt._leaf import Leaf, _check_depth, _describe, trainable_adapter
from agnosticopt._protocols import ArrayAdapter
from agnosticopt._xp import adapter_for


@dataclasses.dataclass(eq=False)
class _Entry:
    """One Leaf met in the walk: its array, the summed gradient, and the outcome."""

    leaf: Leaf
    x: Any
    xp: ArrayAdapter
    path: KeyPath
    grad: Any = None
    state: Any = None
    new_x: Any = None
    write: Any = None  # a step (or Replace) still to be written into x by update_
    fast: bool = False  # updated by the adapter's compiled fast path (update_ only)
    plain_rule: Any = None  # applied instead of leaf.rule: a fast plan did its stage
    outer: Any = None  # a DTensor whose local shard ``x`` is (see adapters/dtensor.py)
    outer_xp: Any = None
    home: Any = None  # the tree's Leaf when ``leaf`` is a view of it on local shards

    @property
    def owner(self) -> Leaf:
        """The Leaf of the state tree (``leaf`` itself unless it is a local view)."""
        return self.home if self.home is not None else self.leaf


class _Plan:
    """Walks tree, model and gradients together; checks all; sums tied gradients."""

    def __init__(self) -> None:
        self.entries: dict[int, _Entry] = {}  # id(leaf) -> entry
        self.owners: dict[int, _Entry] = {}  # id(array) -> entry
        #: The adapters' hooks, asked once per adapter and update (:func:`asked_hook`).
        self.asked: dict[tuple[int, str], tuple[Any, Any]] = {}

    def walk(self, tree: Any, x: Any, g: Any, path: KeyPath) -> None:
        if isinstance(tree, Leaf):
            self.leaf(tree, x, g, path)
        elif tree is None:
            _check_untracked(x, path)
        else:
            node = flatten(x)
            if node is None:
                msg = (
                    f"at {format_path(path)} the state tree has {_describe(tree)} "
                    f"but the model has {_describe(x)}"
                )
                raise ValueError(msg)
            _check_depth(path, "update")
            subtrees = _tree_children(tree, node, path)
            grads = _grad_children(g, node, path)
            parts = zip(node.keys, subtrees, node.children, grads, strict=True)
            for key, t, c, gc in parts:
                if key not in node.untrainable:  # not trained: gradient ignored
                    self.walk(t, c, gc, (*path, key))

    def leaf(self, leaf: Leaf, x: Any, g: Any, path: KeyPath) -> None:
        entry = self.entry(leaf, x, path)
        if g is None:
            return
        if entry.outer is not None:  # a DTensor: its local shard
            g = _checked_grad(
                adapter_for(entry.x),
                entry.x,
                entry.outer_xp.local_grad(x, g, path),
                path,
            )
        else:
            g = _checked_grad(entry.xp, x, g, path)
        if entry.grad is None:
            entry.grad = g
        else:
            with entry.xp.computing():  # a sum may overflow: no warning, as in a step
                entry.grad = entry.xp.add(entry.grad, g)

    def entry(self, leaf: Leaf, x: Any, path: KeyPath) -> _Entry:
        entry = self.entries.get(id(leaf))
        if entry is not None:
            if (entry.x if entry.outer is None else entry.outer) is not x:
                msg = (
                    f"the Leaf at {format_path(path)} is shared with "
                    f"{format_path(entry.path)}, but the model has different arrays "
                    "there; a shared Leaf needs the same (tied) array at both places"
                )
                raise ValueError(msg)
            return entry
        xp = trainable_adapter(x)
        if xp is None:
            msg = (
                f"at {format_path(path)} the state tree has a Leaf but the model has "
                f"{_describe(x)}; a Leaf needs a floating-point or complex array"
            )
            raise TypeError(msg)
        other = self.owners.get(id(x))
        if other is not None:
            msg = (
                f"the array at {format_path(path)} is tied to the one at "
                f"{format_path(other.path)}, but the state tree has different Leaf "
                "objects there; make the tree with setup so that ties share one Leaf"
            )
            raise ValueError(msg)
        check = asked_hook(xp, "check_leaf", self.asked)
        if check is not None:
            check(x, format_path(path))
        entry = _Entry(leaf, x, xp, path)
        if asked_hook(xp, "local_adapter", self.asked) is not None:  # local shards
            local = xp.local(x)
            view = Leaf(leaf.rule, xp.local_state(x, leaf.state), leaf.frozen)
            entry = _Entry(
                view, local, xp.local_adapter, path, outer=x, outer_xp=xp, home=leaf
            )
        self.entries[id(leaf)] = entry
        self.owners[id(x)] = entry
        return entry


#: Whether an adapter class defines an attribute, by ``(class, name)``.
_DEFINED: dict[tuple[type, str], bool] = {}


def hook(xp: Any, name: str) -> Any:
    """The adapter's optional attribute ``name`` (``check_leaf``...), or ``None``.

    As ``getattr(xp, name, None)``, without asking the backend namespace (an
    adapter's ``__getattr__`` looks a missing name up there, and raising that
    miss costs more than the rest of a leaf's checks).
    """
    kind = type(xp)
    defined = _DEFINED.get((kind, name))
    if defined is None:
        defined = _DEFINED[(kind, name)] = any(name in vars(c) for c in kind.__mro__)
    if defined or name in getattr(xp, "__dict__", ()):
        return getattr(xp, name, None)
    return None


def asked_hook(
    xp: Any, name: str, asked: dict[tuple[int, str], tuple[Any, Any]]
) -> Any:
    """:func:`hook`, asked once per adapter and name in one update (``asked``)."""
    found = asked.get((id(xp), name))
    if found is None or found[0] is not xp:
        found = asked[id(xp), name] = (xp, hook(xp, name))
    return found[1]


def _check_untracked(x: Any, path: KeyPath) -> None:
    """The tree has ``None`` here: the model must hold no trainable array here."""
    found = _first_trainable(x, path)
    if found is not None:
        where, array = found
        msg = (
            f"at {format_path(path)} the state tree has None but the model has "
            f"{_describe(array)} at {format_path(where)}; was the tree made by "
            "setup for this model?"
        )
        raise ValueError(msg)


def _first_trainable(x: Any, path: KeyPath) -> tuple[KeyPath, Any] | None:
    node = flatten(x)
    if node is None:
        return (path, x) if trainable_adapter(x) is not None else None
    for key, child in zip(node.keys, node.children, strict=True):
        if key in node.untrainable:
            continue
        found = _first_trainable(child, (*path, key))
        if found is not None:
            return found
    return None


def _tree_children(tree: Any, node: Node, path: KeyPath) -> list[Any]:
    """The subtrees matching the children of the model container ``node``."""
    where = format_path(path)
    if node.kind in ("list", "tuple", "namedtuple"):
        wanted = list if node.kind == "list" else tuple
        if not isinstance(tree, wanted):
            msg = (
                f"at {where} the model has {node.describe()} but the state tree "
                f"has {_describe(tree)}"
            )
            raise TypeError(msg)
        if len(tree) != len(node.keys):
            msg = (
                f"at {where} the model has {len(node.keys)} entries but the state "
                f"tree has {len(tree)}"
            )
            raise ValueError(msg)
        return list(tree)
    if not isinstance(tree, Mapping):
        msg = (
            f"at {where} the model has {node.describe()}, so the state tree should "
            f"have a dict, but it has {_describe(tree)}"
        )
        raise TypeError(msg)
    _check_keys(node, tree, where, "state tree")
    return [tree[k] for k in node.keys]


def _check_keys(node: Node, other: Mapping[Any, Any], where: str, what: str) -> None:
    keys = set(node.keys)
    extra = [k for k in other if k not in keys]
    if extra:
        msg = f"at {where} the {what} has keys {extra!r} that the model does not have"
        raise ValueError(msg)
    if what == "state tree":
        missing = [k for k in node.keys if k not in other]
        if missing:
            msg = f"at {where} the state tree has no entry for the model's keys {missing!r}"
            raise ValueError(msg)


def _grad_children(g: Any, node: Node, path: KeyPath) -> list[Any]:
    """The gradients of the children of ``node``; ``None`` where there is none."""
    if g is None:  # a backend container may have its own (a module's .grad)
        return list(node.grads) if node.grads is not None else [None] * len(node.keys)
    where = format_path(path)
    if node.named and isinstance(g, Mapping):
        _check_keys(node, g, where, "gradient")
        return [g.get(k) for k in node.keys]
    if node.kind in ("list", "tuple", "namedtuple") and isinstance(g, (list, tuple)):
        if len(g) != len(node.keys):
            msg = (
                f"at {where} the model has {len(node.keys)} entries but the "
                f"gradient has {len(g)}"
            )
            raise ValueError(msg)
        return list(g)
    if node.kind in ("dataclass", "registered") and isinstance(g, type(node.obj)):
        gnode = flatten(g)
        if gnode is not None and gnode.keys == node.keys:
            return list(gnode.children)
    msg = (
        f"at {where} the model has {node.describe()} but the gradient is {_describe(g)}"
    )
    raise TypeError(msg)


def _checked_grad(xp: ArrayAdapter, x: Any, g: Any, path: KeyPath) -> Any:
    """``g`` checked against parameter ``x``, and cast to its dtype."""
    gxp = adapter_for(g)
    if gxp is xp and g.dtype is x.dtype and g.shape == x.shape:
        return g  # the usual gradient: the checks below, all passed, in one line
    if gxp is None:
        msg = f"the gradient at {format_path(path)} must be an array or None, got {_describe(g)}"
        raise TypeError(msg)
    if gxp.name != xp.name:
        msg = (
            f"the gradient at {format_path(path)} is a {gxp.name} array, but the "
            f"parameter is a {xp.name} array"
        )
        raise TypeError(msg)
    if gxp.shape(g) != xp.shape(x):
        msg = (
            f"the gradient at {format_path(path)} has shape {gxp.shape(g)}, but the "
            f"parameter has shape {xp.shape(x)}"
        )
        raise ValueError(msg)
    g_dtype, x_dtype = gxp.dtype_name(g), xp.dtype_name(x)
    if g_dtype == x_dtype:
        return g
    if gxp.is_complex(g) and not xp.is_complex(x):
        msg = (
            f"the gradient at {format_path(path)} is complex ({g_dtype}), but the "
            f"parameter is real ({x_dtype})"
        )
        raise TypeError(msg)
    with xp.computing():  # a cast may overflow: no warning, as in a step
        return xp.astype(g, x_dtype)


def _collect(tree: Any, model: Any, grads: Any) -> list[_Entry]:
    """The checked entries of one update, one per Leaf met (gradients summed)."""
    plan = _Plan()
    plan.walk(tree, model, grads, ())
    return list(plan.entries.values())
