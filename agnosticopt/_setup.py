"""The tree interface's first step: ``setup`` makes a state tree that mirrors the model.

``setup(rule, model)`` puts a :class:`~agnosticopt.Leaf` (rule, state, frozen
flag) at every trainable array of a model; :func:`agnosticopt.update` and
:func:`agnosticopt.update_` then walk the tree, the model and the gradients
together and apply each leaf's rule. As in Optimisers.jl:

* trainable means a floating-point or complex array; integer and bool arrays,
  numbers, strings and functions keep their place and get ``None`` in the tree;
* an array that appears at several places (``is``) is *tied*: it has one Leaf,
  its gradients are summed, it is updated once, and the tie is kept;
* a ``None`` gradient, anywhere, means no step and no state change below it.

Key paths in error messages are tuples of keys from the top of the model, such
as ``('layers', 1, 'w')``: the same form :func:`agnosticopt.trainables` returns.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from agnosticopt._containers import KeyPath, Node, flatten, format_path
from agnosticopt._leaf import Leaf, _check_depth, _describe, trainable_adapter
from agnosticopt._rule import Rule
from agnosticopt._xp import adapter_for

__all__ = ["setup"]


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
    if not (
        callable(getattr(rule, "init", None)) and callable(getattr(rule, "apply", None))
    ):
        msg = (
            "setup(rule, model): the first argument must be a rule, "
            f"got {_describe(rule)}"
        )
        raise TypeError(msg)
    return _Setup(rule).tree_of(model, stacklevel=3)


def _init(rule: Any, x: Any, xp: Any) -> Any:
    """``rule.init`` of ``x``; a DTensor's state is made on its local shard and wrapped."""
    if getattr(xp, "local_adapter", None) is None:
        return rule.init(x, xp)
    local = xp.local(x)
    return xp.wrap_state(x, local, rule.init(local, xp.local_adapter))


class _Setup:
    """One walk of ``setup``; tied arrays and containers are cached by ``id``."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.count = 0
        self.cache: dict[int, tuple[Any, Any]] = {}  # id -> (object kept alive, result)
        self.open: set[int] = set()

    def tree_of(self, model: Any, *, stacklevel: int) -> Any:
        """The state tree of ``model``; warns (at ``stacklevel``) if nothing trains."""
        tree = self.walk(model, ())
        if self.count == 0:
            warnings.warn(
                "setup found no trainable parameters in this model",
                UserWarning,
                stacklevel=stacklevel,
            )
        return tree

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
            check = getattr(xp, "check_leaf", None)
            if check is not None:
                check(x, format_path(path))
            rule = self.rule_for(x, path)
            out = Leaf(rule, _init(rule, x, xp))
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
        children = [
            None if k in node.untrainable else self.walk(c, (*path, k))
            for k, c in pairs
        ]
        self.open.discard(id(node.obj))
        return node.mirror(children)


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
        like = (
            hasattr(x, "__array_namespace__")
            or hasattr(x, "__dlpack__")
            or hasattr(x, "__array__")
            or (hasattr(x, "shape") and hasattr(x, "dtype"))
        )
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
