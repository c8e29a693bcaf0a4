"""The containers that the tree interface walks into, and how to rebuild them.

A model is a nest of containers whose leaves are arrays (and other objects that
are not parameters). Built in are:

* every :class:`~collections.abc.Mapping` (``dict``, ``OrderedDict``,
  ``defaultdict``, ...), keyed by its keys in their order;
* ``list`` and ``tuple``, keyed by position;
* namedtuples, keyed by field name;
* dataclass instances, keyed by the names of their ``init`` fields.

Other types become containers through :func:`register_container`. Anything else
is a leaf: arrays, numbers, strings, functions, and also subclasses of ``list``
and of plain ``tuple`` (``torch.Size`` is a tuple subclass, and a leaf).

Each container has a *mirror* in a state tree: a list mirrors a list, a tuple a
tuple, a namedtuple the same namedtuple type, and every other container a
``dict`` keyed like the container.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping
from typing import Any

__all__ = ["Node", "flatten", "register_container"]

#: A key path: the keys from the top of a model down to one of its parts.
KeyPath = tuple[Hashable, ...]

Flattener = Callable[[Any], tuple[Iterable[Hashable], Iterable[Any]]]
Unflattener = Callable[[Any, list[Any]], Any]
#: Which keys of a registered container are trainable: the keys, or a function of it.
Trainable = Iterable[Hashable] | Callable[[Any], Iterable[Hashable]] | None

_REGISTRY: dict[type, tuple[Flattener, Unflattener, Trainable]] = {}

#: Kinds whose children are found by key in a ``Mapping`` gradient or state tree.
_NAMED_KINDS = frozenset({"mapping", "namedtuple", "dataclass", "registered", "module"})

#: Top-level module of a base class -> adapter whose ``container_flattener(cls)``
#: says how to take its instances apart (``torch.nn.Module``: its named parameters).
_CONTAINER_BACKENDS = {"torch": "torch"}
_BACKEND_FLATTENERS: dict[type, Callable[[Any], Node] | None] = {}


def register_container(
    cls: type,
    flatten: Flattener,
    unflatten: Unflattener,
    *,
    trainable: Trainable = None,
) -> None:
    """Make instances of ``cls`` (and of its subclasses) containers.

    Parameters
    ----------
    cls
        The container type. A registration takes precedence over the built-in
        handling, so a ``dict`` subclass, for example, can be registered too.
    flatten
        ``flatten(obj) -> (keys, children)``: the keys (hashable, distinct; they
        name the children in key paths, in error messages and in the state tree,
        which mirrors a registered container by a ``dict`` of these keys) and the
        children, in the same order.
    unflatten
        ``unflatten(obj, children) -> new_obj``: a new container like ``obj``
        whose children are ``children`` (a list in the order of ``keys``).
        ``obj`` is the original container, for whatever is not a child. It must
        not modify ``obj``.
    trainable
        Keyword only: the keys whose children are trained (Optimisers.jl's
        ``trainable``), as a collection of keys or a function ``obj -> keys``;
        ``None`` (default) means all. The other children keep their place in the
        model and get ``None`` in the state tree; nothing looks into them
        (``setup``, ``update``, ``trainables``, ``destructure``), and a gradient
        may carry them: it is ignored there.

    Raises
    ------
    TypeError
        If ``cls`` is not a class or ``flatten``/``unflatten`` are not callable.
    ValueError
        When the container is taken apart, if ``trainable`` names a key that
        ``flatten`` did not return.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> class Linear:
    ...     def __init__(self, w, b):
    ...         self.w, self.b = w, b
    >>> opt.register_container(
    ...     Linear,
    ...     lambda layer: (("w", "b"), (layer.w, layer.b)),
    ...     lambda layer, children: Linear(*children),
    ... )
    >>> tree = opt.setup(opt.Descent(0.5), Linear(np.ones(2), np.zeros(1)))
    >>> sorted(tree)
    ['b', 'w']
    """
    if not isinstance(cls, type):
        msg = f"register_container: cls must be a class, got {cls!r}"
        raise TypeError(msg)
    if not callable(flatten) or not callable(unflatten):
        msg = "register_container: flatten and unflatten must be callable"
        raise TypeError(msg)
    if trainable is not None and not callable(trainable):
        trainable = frozenset(trainable)
    _REGISTRY[cls] = (flatten, unflatten, trainable)


@dataclasses.dataclass(frozen=True)
class Node:
    """One container, taken apart.

    Attributes
    ----------
    obj
        The container itself.
    kind
        ``"mapping"``, ``"list"``, ``"tuple"``, ``"namedtuple"``, ``"dataclass"``
        or ``"registered"``.
    keys
        The keys of the children: mapping keys, positions, field names, or the
        keys a registered ``flatten`` returned.
    children
        The children, in the order of ``keys``.
    grads
        The gradients to use when none are given, or None (no step): a
        backend container's own, such as the ``.grad`` of a module's parameters.
    untrainable
        Keys whose children are not trained (see ``register_container``'s
        ``trainable``): walks skip them, the state tree has ``None`` there.
    """

    obj: Any
    kind: str
    keys: tuple[Hashable, ...]
    children: tuple[Any, ...]
    grads: tuple[Any, ...] | None = None
    untrainable: frozenset[Hashable] = frozenset()

    @property
    def named(self) -> bool:
        """Whether children are matched by key (a ``Mapping`` may stand for it)."""
        return self.kind in _NAMED_KINDS

    def describe(self) -> str:
        """A short description for error messages, such as ``"a dict"``."""
        return f"a {type(self.obj).__name__}"

    def unflatten(self, children: list[Any]) -> Any:
        """A new container like :attr:`obj` with ``children`` in place of its own."""
        obj = self.obj
        if self.kind == "list":
            return list(children)
        if self.kind == "tuple":
            return tuple(children)
        if self.kind == "namedtuple":
            return type(obj)._make(children)
        if self.kind == "dataclass":
            fields = {str(k): c for k, c in zip(self.keys, children, strict=True)}
            return dataclasses.replace(obj, **fields)
        if self.kind == "mapping":
            return _rebuild_mapping(obj, self.keys, children)
        if self.kind == "module":
            msg = (
                f"cannot make a new {type(obj).__name__} with new parameters: use "
                "update_ (it writes a module's parameters in place), or give "
                "dict(module.named_parameters()) to update"
            )
            raise TypeError(msg)
        _, unflatten, _ = _registered(type(obj))  # type: ignore[misc]
        return unflatten(obj, list(children))

    def mirror(self, children: list[Any]) -> Any:
        """The state-tree counterpart of this container, holding ``children``."""
        if self.kind == "list":
            return list(children)
        if self.kind == "tuple":
            return tuple(children)
        if self.kind == "namedtuple":
            return type(self.obj)._make(children)
        return dict(zip(self.keys, children, strict=True))


def flatten(obj: Any) -> Node | None:
    """Take ``obj`` apart if it is a container, else return ``None`` (a leaf).

    Raises
    ------
    ValueError
        If a registered ``flatten`` returns keys and children of different
        lengths, or repeated keys.
    """
    entry = _registered(type(obj))
    if entry is not None:
        return _flatten_registered(obj, entry[0], entry[2])
    if isinstance(obj, Mapping):
        keys = tuple(obj.keys())
        return Node(obj, "mapping", keys, tuple(obj[k] for k in keys))
    cls = type(obj)
    if cls is list or cls is tuple:
        return Node(obj, cls.__name__, tuple(range(len(obj))), tuple(obj))
    if isinstance(obj, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make"):
        return Node(obj, "namedtuple", tuple(cls._fields), tuple(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = tuple(f.name for f in dataclasses.fields(obj) if f.init)
        return Node(obj, "dataclass", names, tuple(getattr(obj, n) for n in names))
    try:
        backend = _BACKEND_FLATTENERS[cls]
    except KeyError:
        backend = _BACKEND_FLATTENERS[cls] = _backend_flattener(cls)
    return None if backend is None else backend(obj)


def _backend_flattener(cls: type) -> Callable[[Any], Node] | None:
    """The adapter's flattener for a backend's container type (``nn.Module``), if any.

    Asked once per type; the adapter is imported only for types whose class or a
    base class comes from that backend, so no backend is imported up front.
    """
    for base in cls.__mro__:
        name = _CONTAINER_BACKENDS.get(
            (getattr(base, "__module__", None) or "").partition(".")[0]
        )
        if name is not None:
            adapter = importlib.import_module(f"agnosticopt.adapters.{name}")
            found = getattr(adapter, "container_flattener", None)
            return found(cls) if found is not None else None
    return None


def format_path(path: KeyPath) -> str:
    """A key path as it appears in error messages: the tuple of keys."""
    return repr(tuple(path))


def builtins_are_plain() -> bool:
    """Whether lists, tuples and dicts are taken apart as such (none registered)."""
    return not _REGISTRY or all(_registered(c) is None for c in (list, tuple, dict))


def _registered(cls: type) -> tuple[Flattener, Unflattener, Trainable] | None:
    if not _REGISTRY:
        return None
    for base in cls.__mro__:
        entry = _REGISTRY.get(base)
        if entry is not None:
            return entry
    return None


def _flatten_registered(obj: Any, flattener: Flattener, trainable: Trainable) -> Node:
    raw_keys, raw_children = flattener(obj)
    keys, children = tuple(raw_keys), tuple(raw_children)
    name = type(obj).__name__
    if len(keys) != len(children):
        msg = (
            f"the registered flatten of {name} returned {len(keys)} keys "
            f"but {len(children)} children"
        )
        raise ValueError(msg)
    if len(set(keys)) != len(keys):
        msg = f"the registered flatten of {name} returned repeated keys {keys!r}"
        raise ValueError(msg)
    if trainable is None:
        return Node(obj, "registered", keys, children)
    wanted = frozenset(trainable(obj) if callable(trainable) else trainable)
    unknown = wanted - set(keys)
    if unknown:
        msg = (
            f"the trainable keys of {name} include {sorted(map(repr, unknown))}, which its "
            f"registered flatten did not return (keys: {keys!r})"
        )
        raise ValueError(msg)
    return Node(obj, "registered", keys, children, untrainable=frozenset(keys) - wanted)


def _rebuild_mapping(
    obj: Mapping[Any, Any], keys: tuple[Hashable, ...], children: list[Any]
) -> Any:
    if type(obj) is dict:
        return dict(zip(keys, children, strict=True))
    if isinstance(obj, MutableMapping):
        new = copy.copy(obj)  # keeps e.g. a defaultdict's factory
        for key, child in zip(keys, children, strict=True):
            new[key] = child
        return new
    return type(obj)(dict(zip(keys, children, strict=True)))  # type: ignore[call-arg]
