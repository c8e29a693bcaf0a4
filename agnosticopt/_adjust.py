"""Changing a state tree's rules without losing their state: adjust, freeze, thaw."""

from __future__ import annotations

import dataclasses
from typing import Any

from agnosticopt._leaf import Leaf, _map_leaves, _tree_leaves
from agnosticopt._rule import Rule, refuse_unknown_hyperparameters

__all__ = ["adjust", "adjust_", "freeze_", "thaw_"]


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
    return _map_leaves(
        tree, lambda leaf: Leaf(rules[id(leaf.rule)], leaf.state, leaf.frozen)
    )


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


def _adjusted_rules(
    leaves: list[Leaf], eta: float | None, changes: dict[str, Any]
) -> dict[int, Any]:
    """Each distinct rule of ``leaves`` (by id) -> its adjusted copy."""
    if eta is None and not changes:
        msg = "adjust needs a learning rate or at least one keyword"
        raise TypeError(msg)
    rules = {id(leaf.rule): leaf.rule for leaf in leaves}
    known: set[str] = set()
    for rule in rules.values():
        known |= _hyperparameter_names(rule)
    refuse_unknown_hyperparameters(
        "adjust: no rule in this tree has an adjustable hyperparameter named",
        changes,
        known,
    )
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
