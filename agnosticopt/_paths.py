"""Per-path rules: a different rule for each part of a model, chosen by key path.

``opt.setup(opt.by_path({...}), model)`` gives each trainable array the rule of
the first pattern that matches its key path::

    tree = opt.setup(opt.by_path({
        "*.bias": opt.AdamW(1e-3, lambda_=0.0),    # no weight decay on biases
        "*norm*": opt.AdamW(1e-3, lambda_=0.0),    # nor on norms
        "embed.*": opt.Adam(1e-2),                 # another rule for embeddings
        "*": opt.AdamW(1e-3, lambda_=1e-2),
    }), model)

The result is an ordinary state tree (each Leaf holds its rule), so
``update_``, ``freeze_``, ``adjust_`` and checkpoints work on it unchanged.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from agnosticopt._containers import KeyPath, flatten, format_path
from agnosticopt._setup import _Setup

__all__ = ["ByPath", "by_path"]

Chooser = Callable[[KeyPath, Any], Any]


def _is_rule(rule: Any) -> bool:
    return callable(getattr(rule, "init", None)) and callable(
        getattr(rule, "apply", None)
    )


def joined(path: KeyPath, sep: str) -> str:
    """A key path as one string, keys joined by ``sep``: ``('layers', 0, 'w')`` -> ``layers.0.w``."""
    return sep.join(str(k) for k in path)


class ByPath:
    """Chooses each array's rule by its key path; made by :func:`by_path`.

    Not a rule itself: pass it to :func:`agnosticopt.setup`, which asks it for
    the rule of every trainable array (:meth:`rule_for`).
    """

    def __init__(self, rules: Mapping[str, Any] | Chooser, default: Any = None) -> None:
        self.patterns: tuple[tuple[str, Any], ...] = ()
        self.function: Chooser | None = None
        if isinstance(rules, Mapping):
            for pattern, rule in rules.items():
                if not isinstance(pattern, str):
                    msg = f"by_path: patterns must be strings, got {pattern!r}"
                    raise TypeError(msg)
                if not _is_rule(rule):
                    msg = f"by_path: the value of pattern {pattern!r} must be a rule, got {rule!r}"
                    raise TypeError(msg)
            self.patterns = tuple(rules.items())
        elif callable(rules):
            self.function = rules
        else:
            msg = (
                "by_path expects a mapping of glob patterns to rules, or a function "
                f"(path, array) -> rule, got {type(rules).__name__}"
            )
            raise TypeError(msg)
        if default is not None and not _is_rule(default):
            msg = f"by_path: default must be a rule or None, got {default!r}"
            raise TypeError(msg)
        self.default = default

    def __repr__(self) -> str:
        what = dict(self.patterns) if self.function is None else self.function
        extra = "" if self.default is None else f", default={self.default!r}"
        return f"by_path({what!r}{extra})"

    def match(self, path: KeyPath) -> tuple[str | None, Any]:
        """The first pattern matching ``path`` and its rule, or ``(None, None)``.

        A pattern containing ``/`` is matched against the keys joined by ``/``,
        any other against the keys joined by ``.`` (:func:`fnmatch.fnmatchcase`:
        ``*`` matches across separators, matching is case sensitive).
        """
        dotted, slashed = joined(path, "."), joined(path, "/")
        for pattern, rule in self.patterns:
            if fnmatch.fnmatchcase(slashed if "/" in pattern else dotted, pattern):
                return pattern, rule
        return None, None

    def rule_for(self, path: KeyPath, x: Any) -> Any:
        """The rule of the array ``x`` at ``path``.

        Raises
        ------
        ValueError
            If nothing matches and there is no default, naming the path.
        TypeError
            If the function returns something that is not a rule.
        """
        if self.function is not None:
            rule = self.function(path, x)
            if rule is None:
                rule = self.default
            if rule is None:
                msg = (
                    f"by_path: the function gave no rule (None) for the array at "
                    f"{format_path(path)} and there is no default"
                )
                raise ValueError(msg)
            if not _is_rule(rule):
                msg = (
                    f"by_path: the function must return a rule for the array at "
                    f"{format_path(path)}, got {rule!r}"
                )
                raise TypeError(msg)
            return rule
        _, rule = self.match(path)
        if rule is None:
            rule = self.default
        if rule is None:
            msg = (
                f"by_path: no pattern matches the array at {format_path(path)} "
                f"(as a string: {joined(path, '.')!r}); patterns: "
                f"{[p for p, _ in self.patterns]!r}. Add a '*' pattern last, or a default"
            )
            raise ValueError(msg)
        return rule

    def setup_tree(self, model: Any) -> Any:
        """The state tree of ``model``: what ``opt.setup(self, model)`` returns."""
        builder = _PathSetup(self)
        tree = builder.tree_of(model, stacklevel=4)
        unused = [p for p, _ in self.patterns if p not in builder.used]
        if unused and builder.count:
            warnings.warn(
                f"by_path: the patterns {unused!r} matched no trainable array "
                "(each array takes the first pattern that matches)",
                UserWarning,
                stacklevel=3,
            )
        return tree


def by_path(rules: Mapping[str, Any] | Chooser, default: Any = None) -> ByPath:
    """Choose each trainable array's rule by its key path, for :func:`setup`.

    Parameters
    ----------
    rules
        Either a mapping from glob patterns to rules, tried in order (the first
        match wins, so put specific patterns first and ``"*"`` last), matched
        against the key path joined by ``.`` (or by ``/`` for a pattern that
        contains ``/``): ``('layers', 0, 'bias')`` is ``"layers.0.bias"``, and
        a torch state-dict key ``"fc1.bias"`` is ``"fc1.bias"`` too. Or a
        function ``(path, array) -> rule`` (``None`` for the default), with
        ``path`` the tuple of keys.
    default
        The rule of arrays that no pattern matches; without it they raise.

    Returns
    -------
    ByPath
        Pass it to :func:`agnosticopt.setup` in place of a rule.

    Notes
    -----
    A tied array (one array at several paths) has one Leaf, so one rule: every
    path of the tie must choose the same rule (``==``), else ``setup`` raises
    naming both paths. A pattern that matches no trainable array warns.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> model = {"fc": {"weight": np.ones(2), "bias": np.zeros(2)}}
    >>> tree = opt.setup(opt.by_path({"*.bias": opt.AdamW(lambda_=0.0),
    ...                               "*": opt.AdamW(lambda_=1e-2)}), model)
    >>> tree["fc"]["bias"].rule.lambda_, tree["fc"]["weight"].rule.lambda_
    (0.0, 0.01)
    """
    return ByPath(rules, default)


class _PathSetup(_Setup):
    """``setup``'s walk with a rule per path; checks that ties agree."""

    def __init__(self, chooser: ByPath) -> None:
        super().__init__(None)
        self.chooser = chooser
        self.chosen: dict[
            int, tuple[KeyPath, Any]
        ] = {}  # id(array) -> first path, rule
        self.used: set[str] = set()

    def rule_for(self, x: Any, path: KeyPath) -> Any:
        if self.chooser.function is None:
            pattern, _ = self.chooser.match(path)
            if pattern is not None:
                self.used.add(pattern)
        rule = self.chooser.rule_for(path, x)
        first = self.chosen.get(id(x))
        if first is None:
            self.chosen[id(x)] = (path, rule)
        elif not (first[1] is rule or first[1] == rule):
            msg = (
                f"by_path: the array at {format_path(path)} is tied to the one at "
                f"{format_path(first[0])}, but the two paths choose different rules "
                f"({rule!r} and {first[1]!r}); a tied array has one rule: make the "
                "patterns agree"
            )
            raise ValueError(msg)
        return rule

    def met_again(self, x: Any, path: KeyPath) -> None:
        """A part met again (a tie): its arrays must choose the same rules here."""
        node = flatten(x)
        if node is None:
            if id(x) in self.chosen:
                self.rule_for(x, path)
            return
        for key, child in zip(node.keys, node.children, strict=True):
            if key not in node.untrainable:
                self.met_again(child, (*path, key))
