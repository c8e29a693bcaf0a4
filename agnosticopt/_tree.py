"""The tree interface: a state tree that mirrors the model, and its updates.

``setup(rule, model)`` puts a :class:`Leaf` (rule, state, frozen flag) at every
trainable array of a model; ``update``/``update_`` walk the tree, the model and
the gradients together and apply each leaf's rule. As in Optimisers.jl:

* trainable means a floating-point or complex array; integer and bool arrays,
  numbers, strings and functions keep their place and get ``None`` in the tree;
* an array that appears at several places (``is``) is *tied*: it has one Leaf,
  its gradients are summed, it is updated once, and the tie is kept;
* a ``None`` gradient, anywhere, means no step and no state change below it.

Key paths in error messages are tuples of keys from the top of the model, such
as ``('layers', 1, 'w')``: the same form :func:`agnosticopt.trainables` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agnosticopt._containers import KeyPath, Node, flatten, format_path
from agnosticopt._global import cross_leaf_plain, run_stages
from agnosticopt._rule import Replace, Rule
from agnosticopt._speed import fast_path_enabled
from agnosticopt._validate import (
    Written,
    check_state,
    check_step,
    overlapping_parameters,
)
from agnosticopt._xp import adapter_for

__all__ = [
    "Leaf",
    "adjust",
    "adjust_",
    "freeze_",
    "setup",
    "thaw_",
    "trainable_adapter",
    "update",
    "update_",
]


@dataclasses.dataclass(eq=False)
class Leaf:
    """The optimiser state of one trainable array.

    Parameters
    ----------
    rule
        The rule that updates the array.
    state
        What ``rule.init`` returned, then what each ``rule.apply`` returned.
    frozen
        A frozen leaf takes no step and keeps its state (see :func:`freeze_`).

    Notes
    -----
    Leaves are mutable and compare by identity: one Leaf object shared by
    several places of a tree is how a tied array is represented.
    ``update_``, ``adjust_``, ``freeze_`` and ``thaw_`` change leaves in place;
    ``update`` and ``adjust`` return a tree of new leaves.
    """

    rule: Any
    state: Any
    frozen: bool = False

    def __repr__(self) -> str:
        parts = [repr(self.rule), _summary(self.state)]
        if self.frozen:
            parts.append("frozen=True")
        return f"Leaf({', '.join(parts)})"


def trainable_adapter(x: Any) -> Any:
    """The adapter of ``x`` if ``x`` is a trainable (float or complex) array, else None."""
    xp = adapter_for(x)
    if xp is not None and xp.is_trainable(x):
        return xp
    return None


# -- setup --------------------------------------------------------------------


def setup(rule: Rule, model: Any) -> Any:
    """Make the state tree for optimising ``model`` with ``rule``.

    Parameters
    ----------
    rule
        The rule of every trainable array (one shared object), or a
        :func:`agnosticopt.by_path` choice of a rule per key path.
    model
        Nested containers (dict, list, tuple, namedtuple, dataclass, registered
        types) of arrays and other objects.

    Returns
    -------
    tree
        The model's structure with a :class:`Leaf` at each trainable array and
        ``None`` at everything else. Lists, tuples and namedtuples are mirrored by
        the same type; mappings, dataclasses and registered containers by a
        ``dict`` of their keys. A bare array gives a bare Leaf. Tied arrays share
        one Leaf.

    Warns
    -----
    UserWarning
        If the model holds no trainable array.

    Raises
    ------
    TypeError
        If ``rule`` is not a rule (has no ``init`` and ``apply``; a rule class
        such as ``Adam`` instead of ``Adam()``), or if the model holds an
        array-like object of a floating-point (or unknown) dtype that no adapter
        handles (a dask array, an ``np.ma.MaskedArray``...), naming its key path.
    ValueError
        If the model contains itself, or is nested more than :data:`MAX_DEPTH`
        containers deep.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> tree = opt.setup(opt.Momentum(0.1), {"w": np.zeros(2), "n": 3})
    >>> tree["n"] is None, tree["w"].state
    (True, array([0., 0.]))
    """
    if isinstance(rule, type):
        msg = (
            f"setup(rule, model): the first argument is the class {rule.__name__}, "
            f"not a rule; did you mean {rule.__name__}()?"
        )
        raise TypeError(msg)
    setup_tree = getattr(rule, "setup_tree", None)  # a chooser of rules, e.g. by_path
    if callable(setup_tree):
        return setup_tree(model)
    if not (callable(getattr(rule, "init", None)) and callable(getattr(rule, "apply", None))):
        msg = (
            "setup(rule, model): the first argument must be a rule, "
            f"got {_describe(rule)}"
        )
        raise TypeError(msg)
    builder = _Setup(rule)
    tree = builder.walk(model, ())
    if builder.count == 0:
        warnings.warn(
            "setup found no trainable parameters in this model", UserWarning, stacklevel=2
        )
    return tree


class _Setup:
    """One walk of ``setup``; tied arrays and containers are cached by ``id``."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.count = 0
        self.cache: dict[int, tuple[Any, Any]] = {}  # id -> (object kept alive, result)
        self.open: set[int] = set()

    def walk(self, x: Any, path: KeyPath) -> Any:
        hit = self.cache.get(id(x))
        if hit is not None:
            self.met_again(x, path)
            return hit[1]
        node = flatten(x)
        if node is not None:
            _check_depth(path, "setup")
            out = self.container(node, path)
        else:
            xp = trainable_adapter(x)
            if xp is None:
                if adapter_for(x) is None and _foreign_array(x):
                    raise TypeError(_foreign_message(x, path))
                return None
            rule = self.rule_for(x, path)
            out = Leaf(rule, rule.init(x, xp))
            self.count += 1
        self.cache[id(x)] = (x, out)
        return out

    def rule_for(self, x: Any, path: KeyPath) -> Any:
        """The rule of the trainable array ``x`` (one rule here; see ``_paths``)."""
        return self.rule

    def met_again(self, x: Any, path: KeyPath) -> None:
        """``x`` (an array or container) was met before: a tie (see ``_paths``)."""

    def container(self, node: Node, path: KeyPath) -> Any:
        if id(node.obj) in self.open:
            msg = f"setup: the model contains itself at {format_path(path)}"
            raise ValueError(msg)
        self.open.add(id(node.obj))
        pairs = zip(node.keys, node.children, strict=True)
        children = [None if k in node.untrainable else self.walk(c, (*path, k))
                    for k, c in pairs]
        self.open.discard(id(node.obj))
        return node.mirror(children)


#: The deepest nest of containers that the tree functions walk (they recurse).
MAX_DEPTH = 200


def _check_depth(path: KeyPath, caller: str) -> None:
    if len(path) >= MAX_DEPTH:
        head, tail = format_path(path[:3])[:-1], format_path(path[-2:])[1:]
        msg = (
            f"{caller}: the model is nested more than {MAX_DEPTH} containers deep "
            f"(at {head}, ..., {tail}, {len(path)} keys); agnosticopt walks nests "
            f"recursively, up to agnosticopt._tree.MAX_DEPTH levels"
        )
        raise ValueError(msg)


def _foreign_array(x: Any) -> bool:
    """Whether ``x`` looks like a trainable array that no adapter handles.

    An object with ``__array_namespace__``, ``__dlpack__``, ``__array__`` or both
    ``shape`` and ``dtype``, whose dtype is floating-point, complex or absent.
    Numbers (numpy scalars included) are not arrays.
    """
    if isinstance(x, (int, float, complex, str, bytes)):
        return False
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.generic):
        return False
    try:
        like = (hasattr(x, "__array_namespace__") or hasattr(x, "__dlpack__")
                or hasattr(x, "__array__") or (hasattr(x, "shape") and hasattr(x, "dtype")))
        if not like:
            return False
        dtype = getattr(x, "dtype", None)
    except Exception:  # noqa: BLE001  (an attribute that raises: not an array)
        return False
    name = str(dtype)
    return dtype is None or "float" in name or "complex" in name


def _foreign_message(x: Any, path: KeyPath) -> str:
    cls = type(x)
    kind = f"{cls.__module__}.{cls.__qualname__}"
    hint = ""
    if cls.__module__.startswith("numpy"):
        hint = (
            " (numpy subclasses such as MaskedArray and matrix change what the "
            "arithmetic means: pass a plain ndarray, e.g. np.asarray(x) or x.data)"
        )
    return (
        f"setup: the model has a {kind} at {format_path(path)}, an array that no "
        f"agnosticopt adapter handles{hint}, so it would never be trained; convert "
        "it to a supported array (numpy, torch, JAX, CuPy, array-api-strict) or "
        "register an adapter with agnosticopt.register_adapter"
    )


# -- update: check and collect ------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Entry:
    """One Leaf met in the walk: its array, the summed gradient, and the outcome."""

    leaf: Leaf
    x: Any
    xp: Any
    path: KeyPath
    grad: Any = None
    state: Any = None
    new_x: Any = None
    write: Any = None  # a step (or Replace) still to be written into x by update_
    fast: bool = False  # updated by the adapter's compiled fast path (update_ only)


class _Plan:
    """Walks tree, model and gradients together; checks all; sums tied gradients."""

    def __init__(self) -> None:
        self.entries: dict[int, _Entry] = {}  # id(leaf) -> entry
        self.owners: dict[int, _Entry] = {}  # id(array) -> entry

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
        g = _checked_grad(entry.xp, x, g, path)
        if entry.grad is None:
            entry.grad = g
        else:
            with entry.xp.computing():  # a sum may overflow: no warning, as in a step
                entry.grad = entry.xp.add(entry.grad, g)

    def entry(self, leaf: Leaf, x: Any, path: KeyPath) -> _Entry:
        entry = self.entries.get(id(leaf))
        if entry is not None:
            if entry.x is not x:
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
        entry = _Entry(leaf, x, xp, path)
        self.entries[id(leaf)] = entry
        self.owners[id(x)] = entry
        return entry


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
        f"at {where} the model has {node.describe()} but the gradient is "
        f"{_describe(g)}"
    )
    raise TypeError(msg)


def _checked_grad(xp: Any, x: Any, g: Any, path: KeyPath) -> Any:
    """``g`` checked against parameter ``x``, and cast to its dtype."""
    gxp = adapter_for(g)
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


# -- update: compute and commit ------------------------------------------------------


def _compute(entries: list[_Entry], *, in_place: bool) -> list[tuple[Any, list[_Entry]]]:
    """Check and apply every rule, writing nothing: fills ``state``, ``new_x``, ``write``.

    Every leaf that takes a step has its state checked against its parameter
    first, every step is checked after its rule (:mod:`agnosticopt._validate`);
    with ``in_place``, parameters that share memory raise, and a step that shares
    memory with a parameter to be written is copied. Leaves whose adapter has a
    fast path are planned by it (after the state checks); returns those plans,
    whose kernels :func:`_commit` runs.
    """
    stepping = [e for e in entries if e.grad is not None and not e.leaf.frozen]
    for entry in stepping:
        check_state(entry.leaf, entry.x, entry.xp, entry.path)
    written = Written()
    if in_place:
        writes = [e.grad is not None and not e.leaf.frozen and e.xp.writeable(e.x)
                  for e in entries]
        overlapping_parameters([(e.x, e.xp, e.path, w)
                                for e, w in zip(entries, writes, strict=True)])
        for e, w in zip(entries, writes, strict=True):
            if w:
                written.add(e.x, e.xp)
    plans = _fast_plans(entries) if in_place and fast_path_enabled() else []
    staged = _cross_leaf_steps(entries)
    for entry in entries:
        leaf, x, xp = entry.leaf, entry.x, entry.xp
        entry.new_x = x
        if entry.fast:
            continue
        entry.state = leaf.state
        if entry.grad is None or leaf.frozen:
            continue
        with xp.computing():
            try:
                found = staged.get(id(entry))
                entry.state, step = (found if found is not None
                                     else leaf.rule.apply(leaf.state, x, entry.grad, xp))
            except Exception as exc:
                _add_note(exc, f"while updating the parameter at {format_path(entry.path)}")
                raise
            if step is None:
                continue
            value = step.value if isinstance(step, Replace) else step
            check_step(value, x, xp, entry.path, leaf.rule)
            if in_place and xp.writeable(x):
                if written.overlaps(value, xp):  # e.g. a step that is (a view of) a
                    value = xp.copy(value)  # parameter: written before it is read
                    step = Replace(value) if isinstance(step, Replace) else value
                entry.write = step
            else:
                entry.new_x = _stepped(xp, x, step)
    return plans


def _cross_leaf_steps(entries: list[_Entry]) -> dict[int, tuple[Any, Any]]:
    """``id(entry) -> (state, step)`` for the leaves whose rule reduces over every
    leaf (global-norm clipping, non-finite skip): see ``agnosticopt/_global.py``."""
    return run_stages([e for e in entries
                       if not e.fast and e.grad is not None and not e.leaf.frozen])


def _fast_plans(entries: list[_Entry]) -> list[tuple[Any, list[_Entry]]]:
    """Offer the leaves to take a step to their adapter's ``fast_plan``, if any.

    ``fast_plan(items)`` takes ``(rule, state, x, grad)`` per leaf and returns
    ``None`` or a plan with ``handled`` and ``states`` (one per item) and a
    ``run()`` that writes the new state arrays and parameters in place. Planning
    writes nothing and computes the new states, so that an ``update_`` that
    raises later still changes nothing (see ``adapters/_fast.py``).
    """
    by_adapter: dict[int, tuple[Any, list[_Entry]]] = {}
    plain = cross_leaf_plain(entries)  # a reduction over leaves of several adapters
    for entry in entries:
        if entry.grad is None or entry.leaf.frozen or id(entry) in plain:
            continue
        if getattr(entry.xp, "fast_plan", None) is not None:
            by_adapter.setdefault(id(entry.xp), (entry.xp, []))[1].append(entry)
    plans = []
    for xp, group in by_adapter.values():
        items = [(e.leaf.rule, e.leaf.state, e.x, e.grad) for e in group]
        with xp.computing():
            plan = xp.fast_plan(items)
        if plan is None:
            continue
        taken = []
        for entry, handled, state in zip(group, plan.handled, plan.states, strict=True):
            if handled:
                entry.fast, entry.state = True, state
                taken.append(entry)
        plans.append((plan, taken))
    return plans


def _stepped(xp: Any, x: Any, step: Any) -> Any:
    """A new array ``x - step`` (or the ``Replace`` value) in the dtype and class of ``x``."""
    new = xp.copy(step.value) if isinstance(step, Replace) else xp.subtract(x, step)
    if xp.dtype_name(new) != xp.dtype_name(x):
        new = xp.astype(new, xp.dtype_name(x))
    return xp.rewrap(x, new)


def _commit(entries: list[_Entry], plans: list[tuple[Any, list[_Entry]]]) -> None:
    """``update_``'s second phase: run the fast plans, write, store the states.

    Everything written here was checked by :func:`_compute`. A Ctrl-C during
    the commit is held back until it ends (:func:`_interrupts_deferred`), so an
    interrupted ``update_`` has either not started writing or finished. Each
    leaf's parameter is written before its state is replaced, and a plan's leaves
    get their new state right after its kernels: should a write still fail (out
    of memory), the leaves before it are updated and the others untouched, and
    no leaf has a new state with an old parameter.
    """
    with _interrupts_deferred():
        for plan, taken in plans:
            plan.run()
            for entry in taken:
                entry.leaf.state = entry.state
        for entry in entries:
            if entry.write is not None:
                xp = entry.xp
                with xp.computing():
                    if isinstance(entry.write, Replace):
                        xp.assign_(entry.x, entry.write.value)
                    else:
                        xp.subtract_(entry.x, entry.write)
            entry.leaf.state = entry.state


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) back until the block ends, then raise KeyboardInterrupt.

    Only in the main thread (where Python runs signal handlers) and only when
    SIGINT has Python's default handler; otherwise the block runs as it is.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    except ValueError:  # not the main interpreter: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python >= 3.11
    if add_note is not None:
        add_note(note)


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


def _plan(tree: Any, model: Any, grads: Any) -> list[_Entry]:
    plan = _Plan()
    plan.walk(tree, model, grads, ())
    return list(plan.entries.values())


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
    entries = _plan(tree, model, grads)
    _compute(entries, in_place=False)
    leaves = {id(e.leaf): Leaf(e.leaf.rule, e.state, e.leaf.frozen) for e in entries}
    new_tree = _map_leaves(tree, lambda leaf: leaves.get(id(leaf)) or _copy_leaf(leaf))
    new_model = _rebuild_model(tree, model, {id(e.leaf): e.new_x for e in entries},
                               reuse=False)
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
    entries = _plan(tree, model, grads)
    plans = _compute(entries, in_place=True)
    _commit(entries, plans)
    new_model = _rebuild_model(tree, model, {id(e.leaf): e.new_x for e in entries},
                               reuse=True)
    return tree, new_model


# -- walking state trees ---------------------------------------------------------------


def _leaves(tree: Any) -> list[Leaf]:
    """Every distinct Leaf in ``tree``, depth first."""
    found: dict[int, Leaf] = {}
    seen: set[int] = set()

    def walk(t: Any, path: KeyPath) -> None:
        if isinstance(t, Leaf):
            found.setdefault(id(t), t)
            return
        if id(t) in seen:
            return
        node = flatten(t)
        if node is not None:
            _check_depth(path, "a state tree walk")
            seen.add(id(t))
            for key, child in zip(node.keys, node.children, strict=True):
                walk(child, (*path, key))

    walk(tree, ())
    return list(found.values())


def _map_leaves(tree: Any, fn: Callable[[Leaf], Leaf]) -> Any:
    """A copy of ``tree``'s structure with ``fn(leaf)`` at each Leaf; ties kept."""
    memo: dict[int, Any] = {}

    def walk(t: Any) -> Any:
        if t is None:
            return None
        if id(t) in memo:
            return memo[id(t)]
        if isinstance(t, Leaf):
            out = fn(t)
        else:
            node = flatten(t)
            out = t if node is None else node.unflatten([walk(c) for c in node.children])
        memo[id(t)] = out
        return out

    return walk(tree)


def _copy_leaf(leaf: Leaf) -> Leaf:
    return Leaf(leaf.rule, leaf.state, leaf.frozen)


def _tree_leaves(tree: Any, caller: str) -> list[Leaf]:
    leaves = _leaves(tree)
    if not leaves:
        msg = (
            f"{caller} expects a state tree made by setup, or a part of one, but "
            f"got {_describe(tree)}, which contains no Leaf"
        )
        raise TypeError(msg)
    return leaves


# -- adjust, freeze, thaw ----------------------------------------------------------------


def adjust(tree: Any, eta: float | None = None, **changes: Any) -> Any:
    """A copy of the state tree with some hyperparameters changed; state kept.

    Parameters
    ----------
    tree
        A state tree (or a part of one), or a bare rule.
    eta
        The new learning rate, for every rule that has one; rules without
        ``eta`` (``ClipGrad``, ``WeightDecay``, ...) ignore it.
    **changes
        Other hyperparameters by name, e.g. ``beta=(0.8, 0.99)``. Each rule
        changes the ones it has.

    Returns
    -------
    tree
        A new tree of new leaves holding the adjusted rules and the same state
        (state arrays are shared: rules never write into them, but the fast path
        of :func:`update_` does). For a rule, the adjusted rule.

    Raises
    ------
    ValueError
        If a keyword is a hyperparameter of no rule in the tree (Optimisers.jl
        silently ignores it), or if a rule refuses the change.
    TypeError
        If neither ``eta`` nor a keyword is given, or ``tree`` holds no Leaf.
    """
    if isinstance(tree, Rule):  # checked as a tree is: an unknown keyword raises
        return _adjusted_rules([Leaf(tree, None)], eta, changes)[id(tree)]
    rules = _adjusted_rules(_tree_leaves(tree, "adjust"), eta, changes)
    return _map_leaves(tree, lambda leaf: Leaf(rules[id(leaf.rule)], leaf.state, leaf.frozen))


def adjust_(tree: Any, eta: float | None = None, **changes: Any) -> Any:
    """Change hyperparameters of every Leaf in ``tree`` in place; state kept.

    Parameters
    ----------
    tree
        A state tree or a part of one (e.g. ``tree["encoder"]``).
    eta, **changes
        As for :func:`adjust`.

    Returns
    -------
    None
        For a tree. A rule is immutable, so for a bare rule the adjusted copy is
        returned, as :func:`adjust` does.

    Raises
    ------
    ValueError, TypeError
        As for :func:`adjust`; then no Leaf has changed.
    """
    if isinstance(tree, Rule):
        return _adjusted_rules([Leaf(tree, None)], eta, changes)[id(tree)]
    leaves = _tree_leaves(tree, "adjust_")
    rules = _adjusted_rules(leaves, eta, changes)
    for leaf in leaves:
        leaf.rule = rules[id(leaf.rule)]
    return None


def _adjusted_rules(leaves: list[Leaf], eta: float | None,
                    changes: dict[str, Any]) -> dict[int, Any]:
    """Each distinct rule of ``leaves`` (by id) -> its adjusted copy."""
    if eta is None and not changes:
        msg = "adjust needs a learning rate or at least one keyword"
        raise TypeError(msg)
    rules = {id(leaf.rule): leaf.rule for leaf in leaves}
    known: set[str] = set()
    for rule in rules.values():
        known |= _hyperparameter_names(rule)
    unknown = sorted(set(changes) - known)
    if unknown:
        msg = (
            f"adjust: no rule in this tree has an adjustable hyperparameter named "
            f"{', '.join(map(repr, unknown))} (adjustable: {', '.join(sorted(known))})"
        )
        raise ValueError(msg)
    return {key: rule.adjust(eta, **changes) for key, rule in rules.items()}


def _hyperparameter_names(rule: Any) -> frozenset[str]:
    names = getattr(rule, "hyperparameter_names", None)
    if callable(names):
        return frozenset(names())
    if dataclasses.is_dataclass(rule):
        return frozenset(f.name for f in dataclasses.fields(rule))
    return frozenset()


def freeze_(tree: Any) -> None:
    """Freeze every Leaf in ``tree``: no step and no state change until thawed.

    Parameters
    ----------
    tree
        A state tree or a part of one, e.g. ``freeze_(tree["encoder"])``.

    Raises
    ------
    TypeError
        If ``tree`` holds no Leaf (e.g. a model array was passed).
    """
    for leaf in _tree_leaves(tree, "freeze_"):
        leaf.frozen = True


def thaw_(tree: Any) -> None:
    """Undo :func:`freeze_` for every Leaf in ``tree``.

    Raises
    ------
    TypeError
        If ``tree`` holds no Leaf.
    """
    for leaf in _tree_leaves(tree, "thaw_"):
        leaf.frozen = False


# -- descriptions ----------------------------------------------------------------------


def _describe(x: Any) -> str:
    """``x`` in a few words, for error messages."""
    if x is None:
        return "None"
    if isinstance(x, Leaf):
        return "a Leaf"
    xp = adapter_for(x)
    if xp is not None:
        return f"a {xp.name} {xp.dtype_name(x)} array of shape {xp.shape(x)}"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _summary(state: Any) -> str:
    """A short description of a Leaf's state: array shapes, not their values."""
    fields = getattr(type(state), "_fields", None)
    if isinstance(state, tuple) and fields is not None:
        pairs = zip(fields, state, strict=True)
        inner = ", ".join(f"{f}={_summary(s)}" for f, s in pairs)
        return f"{type(state).__name__}({inner})"
    if isinstance(state, tuple):
        inner = ", ".join(_summary(s) for s in state)
        return f"({inner},)" if len(state) == 1 else f"({inner})"
    if isinstance(state, list):
        return "[" + ", ".join(_summary(s) for s in state) + "]"
    if isinstance(state, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v)}" for k, v in state.items()) + "}"
    xp = adapter_for(state)
    if xp is not None:
        shape = ", ".join(map(str, xp.shape(state)))
        return f"<{xp.name} {xp.dtype_name(state)}[{shape}]>"
    if type(state).__module__ == "numpy":
        return str(state)  # a numpy scalar: its value
    return repr(state)
