"""State-tree leaves: a rule, its state and a frozen flag, and walks over state trees.

A state tree (:func:`agnosticopt.setup`) mirrors the model, with a :class:`Leaf`
at every trainable array and ``None`` elsewhere; one Leaf shared by several
places is a tied array. Also here: which arrays are trainable, the depth limit of
the recursive walks, and the few-word descriptions used in error messages.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agnosticopt._containers import KeyPath, flatten, format_path
from agnosticopt._protocols import ArrayAdapter
from agnosticopt._xp import adapter_for

if TYPE_CHECKING:
    from agnosticopt._rule import Rule

__all__ = ["MAX_DEPTH", "Leaf", "trainable_adapter"]


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

    rule: Rule
    state: Any
    frozen: bool = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickling: refused for states an adapter says cannot be pickled (sharded ones)."""
        _check_picklable(self.state)
        return dict(self.__dict__)

    def __copy__(self) -> Leaf:
        return Leaf(self.rule, self.state, self.frozen)

    def __deepcopy__(self, memo: dict[int, Any]) -> Leaf:
        new = Leaf.__new__(Leaf)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __repr__(self) -> str:
        parts = [repr(self.rule), _summary(self.state)]
        if self.frozen:
            parts.append("frozen=True")
        return f"Leaf({', '.join(parts)})"


def _check_picklable(state: Any) -> None:
    """Ask the adapter of every array of ``state`` whether it may be pickled."""
    if isinstance(state, (tuple, list)):
        for s in state:
            _check_picklable(s)
    elif isinstance(state, dict):
        for s in state.values():
            _check_picklable(s)
    elif state is not None and not isinstance(state, (int, float, complex, str, bool)):
        check = getattr(adapter_for(state), "check_pickle", None)
        if check is not None:
            check(state)


def trainable_adapter(x: Any) -> ArrayAdapter | None:
    """The adapter of ``x`` if ``x`` is a trainable (float or complex) array, else None."""
    xp: ArrayAdapter | None = adapter_for(x)
    if xp is not None and xp.is_trainable(x):
        return xp
    return None


#: The deepest nest of containers that the tree functions walk (they recurse).
MAX_DEPTH = 200


def _check_depth(path: KeyPath, caller: str) -> None:
    if len(path) >= MAX_DEPTH:
        head, tail = format_path(path[:3])[:-1], format_path(path[-2:])[1:]
        msg = (
            f"{caller}: the model is nested more than {MAX_DEPTH} containers deep "
            f"(at {head}, ..., {tail}, {len(path)} keys); agnosticopt walks nests "
            f"recursively, up to agnosticopt._leaf.MAX_DEPTH levels"
        )
        raise ValueError(msg)


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
            out = (
                t if node is None else node.unflatten([walk(c) for c in node.children])
            )
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
