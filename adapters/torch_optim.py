"""``TorchOptimizer``: any agnosticopt rule as a real ``torch.optim.Optimizer``.

The drop-in for ``torch.optim``: ``torch.optim.AdamW(model.parameters(), lr=1e-3,
weight_decay=1e-2)`` becomes ``TorchOptimizer(model.parameters(), opt.AdamW(),
lr=1e-3, weight_decay=1e-2)``, and schedulers, ``GradScaler``, hooks and
checkpoints keep working. What it does, and how:

* **State**: one state tree (a list per parameter group of :class:`~agnosticopt.Leaf`),
  made once by :func:`~agnosticopt.setup`; :meth:`TorchOptimizer.step` is one
  :func:`~agnosticopt.update_` over every group with the parameters' ``.grad``, so it
  takes the compiled fast path and gives the bits of the functional API.
* **Hyperparameters**: each group holds its ``rule`` and, under torch's names, the
  rule's hyperparameters that torch has a name for (``lr`` = ``eta``, ``betas`` =
  ``beta``, ``eps`` = ``epsilon``, ``weight_decay`` = ``lambda_`` of ``AdamW`` and
  ``WeightDecay``, ``momentum`` = ``rho`` of ``Momentum``/``Nesterov``, ``alpha`` =
  ``rho`` of ``RMSProp``, ``rho`` of ``AdaDelta``, ``etas``/``step_sizes`` = ``ell``/
  ``gamma`` of ``Rprop``; inside chains too). A scheduler writes them; the next step
  (or ``state_dict``) adjusts the rule, keeping the state. Replacing ``group["rule"]``
  by a rule of the same kind (``rule.adjust(...)``) works too.
* **GradScaler** needs nothing special: it unscales ``.grad`` in place through
  ``param_groups`` and skips :meth:`~TorchOptimizer.step` when it finds inf/NaN.
* **Checkpoints**: :meth:`~TorchOptimizer.state_dict` has torch's structure
  (``state`` keyed by index, ``param_groups`` with ``params`` indices) of tensors,
  numbers, strings, tuples, lists and dicts only (``torch.load(weights_only=True)``
  reads it), plus each group's rule description and, given ``named_parameters()``,
  the parameter names: :meth:`~TorchOptimizer.load_state_dict` then matches by name,
  so a model whose parameter order changed loads it. Loading checks everything
  (missing, extra, mis-shaped, mis-typed entries) before changing anything.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import agnosticopt as opt
from agnosticopt._checkpoint import (
    describe_rule,
    leaf_entries,
    leaf_from_entries,
    rule_from_description,
)
from agnosticopt._rule import Rule

__all__ = ["TORCH_NAMES", "TorchOptimizer", "param_entries"]

#: torch's name -> the rule field, for every rule with such a field (by field name).
_BY_FIELD = {"eta": "lr", "beta": "betas", "epsilon": "eps"}

#: torch's names of other fields, per rule class: {class name: {torch name: field}}.
_BY_RULE: dict[str, dict[str, str]] = {
    "AdamW": {"weight_decay": "lambda_"},
    "WeightDecay": {"weight_decay": "lambda_"},
    "Momentum": {"momentum": "rho"},
    "Nesterov": {"momentum": "rho"},
    "RMSProp": {"alpha": "rho"},
    "AdaDelta": {"rho": "rho"},
    "Rprop": {"etas": "ell", "step_sizes": "gamma"},
}

#: Every torch name this front end knows; the tuple-valued ones are the pairs.
TORCH_NAMES = frozenset(
    {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum",
        "alpha",
        "rho",
        "etas",
        "step_sizes",
    }
)
_PAIRS = frozenset({"betas", "etas", "step_sizes"})


# -- rules: torch names, reading and writing them -------------------------------------------------


def _parts(rule: Any) -> list[Any]:
    """The rules of ``rule`` that hold hyperparameters: chains and wrappers opened."""
    if isinstance(rule, opt.OptimiserChain):
        return [part for inner in rule.opts for part in _parts(inner)]
    if isinstance(rule, opt.MixedPrecision):
        return _parts(rule.rule)
    return [rule]


def _fields(rule: Any) -> dict[str, str]:
    """torch name -> field of one (non-chain) rule."""
    if not dataclasses.is_dataclass(rule):
        return {}
    names = {f.name for f in dataclasses.fields(rule)}
    found = {torch_name: f for f, torch_name in _BY_FIELD.items() if f in names}
    found.update(_BY_RULE.get(type(rule).__name__, {}))
    return found


def _values(rule: Any, where: str) -> dict[str, Any]:
    """The rule's hyperparameters under their torch names (chains: one value each)."""
    values: dict[str, Any] = {}
    for part in _parts(rule):
        for torch_name, field in _fields(part).items():
            value = getattr(part, field)
            if torch_name in values and values[torch_name] != value:
                msg = (
                    f"{where}: the rule {rule!r} has {torch_name!r} at two places with "
                    f"different values ({values[torch_name]!r} and {value!r}); one torch "
                    f"name cannot stand for both: give them one value"
                )
                raise ValueError(msg)
            values[torch_name] = value
    return values


def _normal(torch_name: str, value: Any, where: str) -> Any:
    """A group's value (float, 0-d tensor, tuple, list) as the rule's field type."""
    try:
        if torch_name in _PAIRS:
            if isinstance(value, (str, bytes)):
                raise TypeError
            return tuple(_real(v) for v in value)
        return _real(value)
    except (TypeError, ValueError, RuntimeError):
        kind = "a pair of real numbers" if torch_name in _PAIRS else "a real number"
        msg = f"{where}: {torch_name!r} must be {kind}, got {value!r}"
        raise TypeError(msg) from None


def _real(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    return float(value)


def _with_values(rule: Any, changes: Mapping[str, Any]) -> Any:
    """``rule`` with the hyperparameters of torch names ``changes`` set (new rule)."""
    if isinstance(rule, opt.OptimiserChain):
        inner = [_with_values(r, changes) for r in rule.opts]
        same = all(a is b for a, b in zip(inner, rule.opts, strict=True))
        return rule if same else opt.OptimiserChain(*inner)
    if isinstance(rule, opt.MixedPrecision):
        new = _with_values(rule.rule, changes)
        return rule if new is rule.rule else opt.MixedPrecision(rule.dtype, new)
    mine = {
        field: changes[name] for name, field in _fields(rule).items() if name in changes
    }
    return rule.adjust(**mine) if mine else rule


def _shape(rule: Any) -> Any:
    """What a rule's state depends on: its kind, nesting and fixed fields."""
    if isinstance(rule, opt.OptimiserChain):
        return ("OptimiserChain", tuple(_shape(r) for r in rule.opts))
    if isinstance(rule, opt.MixedPrecision):
        return ("MixedPrecision", rule.dtype, _shape(rule.rule))
    fixed = tuple(
        sorted((f, getattr(rule, f, None)) for f in getattr(rule, "fixed_fields", ()))
    )
    return (type(rule), fixed)


# -- a Leaf's entries in a state dict (agnosticopt's checkpoint format) ------------------------------


def param_entries(leaf: Any) -> dict[str, Any]:
    """One parameter's entry of ``state_dict()["state"]``: :func:`leaf_entries` less ``rule``.

    ``{"state.m": tensor, "state.beta_t.0": 0.9, ..., "frozen": False}``: the
    live state tensors (as torch's ``state_dict``), host scalars as Python
    numbers; the rule is described once per group instead.
    """
    entries = leaf_entries(leaf)
    del entries["rule"]
    return entries


def _restored_rule(current: Any, saved: Any, where: str) -> Any:
    """The rule a saved group describes; its kind, nesting and fixed fields: ``current``'s."""
    rule = rule_from_description(saved, like=current, where=where)
    if _shape(rule) != _shape(current):
        msg = f"{where}: the state dict is for {rule!r}, this optimizer's rule is {current!r}"
        raise ValueError(msg)
    return rule


# -- the optimizer ------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Group:
    """What a param group's rule was when last synchronised with the group dict."""

    rule: Any
    values: dict[str, Any]
    leaves: list[Any]
    shape: Any


class _States(Mapping[torch.Tensor, Mapping[str, Any]]):
    """``optimizer.state``: parameter -> its Leaf's entries, read-only (a snapshot of
    which parameters there are; the values are read on access)."""

    def __init__(self, owner: TorchOptimizer) -> None:
        self._leaves: dict[int, tuple[torch.Tensor, Any]] = {}
        for group, info in zip(owner.param_groups, owner._groups, strict=True):
            for p, leaf in zip(group["params"], info.leaves, strict=True):
                if leaf is not None:
                    self._leaves[id(p)] = (p, leaf)

    def __getitem__(self, p: torch.Tensor) -> Mapping[str, Any]:
        found = self._leaves.get(id(p))
        if found is None or found[0] is not p:
            raise KeyError(p)
        return types.MappingProxyType(param_entries(found[1]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, _ in self._leaves.values())

    def __len__(self) -> int:
        return len(self._leaves)

    def __contains__(self, p: object) -> bool:
        found = self._leaves.get(id(p))
        return found is not None and found[0] is p

    def __repr__(self) -> str:
        return f"<state of {len(self)} parameters>"


class TorchOptimizer(torch.optim.Optimizer):
    """An agnosticopt rule as a ``torch.optim.Optimizer``.

    Parameters
    ----------
    params
        ``model.parameters()``, ``model.named_parameters()`` (then checkpoints
        are matched by name), or param groups: dicts with ``"params"`` and
        optionally ``"rule"`` (that group's rule) and torch-named
        hyperparameters (``"lr"``, ...) that override the rule's.
    rule
        The rule of every group that gives none (e.g. ``opt.AdamW()``).
    **hyperparameters
        torch-named hyperparameters for every group (``lr=1e-3``,
        ``weight_decay=1e-2``, ...): they set the rule's fields.

    Raises
    ------
    TypeError, ValueError
        If a group has no rule, a torch name its rule does not have, a value
        of the wrong kind, or a parameter twice.

    Notes
    -----
    ``step()`` is :func:`agnosticopt.update_` over all groups: the same bits as
    the functional API on the same gradients. A parameter with ``.grad is None``
    takes no step and keeps its state. See ``docs/torch.md``.
    """

    def __init__(
        self, params: Iterable[Any], rule: Rule | None = None, **hyperparameters: Any
    ) -> None:
        unknown = sorted(set(hyperparameters) - TORCH_NAMES)
        if unknown:
            msg = (
                f"TorchOptimizer: unknown hyperparameters {unknown}; torch names "
                f"known: {sorted(TORCH_NAMES)} (other fields: set them on the rule)"
            )
            raise TypeError(msg)
        if rule is not None:
            _check_rule(rule, "TorchOptimizer")
            _check_names(rule, hyperparameters, "TorchOptimizer")
            rule = _with_values(
                rule,
                {
                    k: _normal(k, v, "TorchOptimizer")
                    for k, v in hyperparameters.items()
                },
            )
            defaults: dict[str, Any] = {"rule": rule, **_values(rule, "TorchOptimizer")}
        elif hyperparameters:
            msg = "TorchOptimizer: hyperparameters given, but no rule to give them to"
            raise TypeError(msg)
        else:
            defaults = {}
        self._groups: list[_Group] = []
        self._tree: list[list[Any]] = []
        super().__init__(params, defaults)
        for group in self.param_groups:  # schedulers look for "betas"/"momentum" here
            for name in _values(group["rule"], "TorchOptimizer"):
                self.defaults.setdefault(name, group[name])

    # -- torch.optim.Optimizer's state, as a view of the Leaves ----------------------------
    @property  # type: ignore[override]
    def state(self) -> Mapping[torch.Tensor, Mapping[str, Any]]:
        """Parameter -> its state as a read-only dict (live tensors; see param_entries)."""
        return _States(self)

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns one
        pass

    def __getstate__(self) -> dict[str, Any]:
        hooks = {
            k
            for k in self.__dict__
            if k.startswith("_optimizer_") and k.endswith("hooks")
        }
        return {k: v for k, v in self.__dict__.items() if k not in hooks}

    # -- param groups ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch's semantics); its rule's state is set up at once."""
        if not isinstance(param_group, dict):
            msg = f"param_group must be a dict, but got {type(param_group).__name__}"
            raise TypeError(msg)
        k = len(self.param_groups)
        where = f"param group {k}"
        rule = param_group.get("rule", self.defaults.get("rule"))
        if rule is None:
            msg = f"{where} has no 'rule', and the optimizer was given no default rule"
            raise TypeError(msg)
        _check_rule(rule, where)
        given = {n: param_group[n] for n in TORCH_NAMES if n in param_group}
        _check_names(rule, given, where)
        rule = _with_values(rule, {n: _normal(n, v, where) for n, v in given.items()})
        values = _values(rule, where)
        param_group.update(values)
        param_group["rule"] = rule
        given_params = param_group.get("params")
        if isinstance(given_params, torch.Tensor):
            given_params = [given_params]
        elif given_params is not None and not isinstance(given_params, set):
            given_params = list(given_params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in given_params]
            if len({id(p) for p in tensors}) != len(tensors):
                msg = f"{where} has a parameter twice (its gradient would count twice)"
                raise ValueError(msg)
        param_group["params"] = given_params
        super().add_param_group(param_group)
        for name in TORCH_NAMES - set(values):  # a default of another group's rule
            if name not in given:
                param_group.pop(name, None)
        params = param_group["params"]
        for p in params:
            if p.layout != torch.strided:
                self.param_groups.pop()
                msg = f"{where}: {p.layout} parameters are not supported"
                raise TypeError(msg)
        try:
            tree = (
                opt.setup(rule, list(params))
                if _any_trainable(params)
                else [None] * len(params)
            )
        except BaseException:
            self.param_groups.pop()
            raise
        self._tree.append(tree)
        self._groups.append(
            _Group(rule, _normal_values(values, where), tree, _shape(rule))
        )

    def _sync(self) -> None:
        """Give the rules the hyperparameters the group dicts now hold.

        Everything is checked before any rule changes.
        """
        new: list[tuple[int, Any, dict[str, Any]]] = []
        for k, (group, info) in enumerate(
            zip(self.param_groups, self._groups, strict=True)
        ):
            where = f"param group {k}"
            rule = group.get("rule")
            if rule is not info.rule:  # replaced by the user: same kind, new values
                _check_rule(rule, where)
                if _shape(rule) != info.shape:
                    msg = (
                        f"{where}: 'rule' was replaced by {rule!r}, whose state differs "
                        f"from that of {info.rule!r}; make a new optimizer instead"
                    )
                    raise ValueError(msg)
                values = _normal_values(_values(rule, where), where)
                new.append((k, rule, values))
                continue
            values = {
                n: _normal(n, group[n], where) if n in group else None
                for n in info.values
            }
            missing = [n for n, v in values.items() if v is None]
            if missing:
                msg = f"{where} lost its {missing} (needed by its rule {rule!r})"
                raise KeyError(msg)
            changes = {n: v for n, v in values.items() if v != info.values[n]}
            if changes:
                new.append((k, _with_values(rule, changes), values))
        for k, rule, values in new:
            group, info = self.param_groups[k], self._groups[k]
            if group.get("rule") is rule:  # a replaced rule: its values into the group
                group.update(_values(rule, ""))
            group["rule"] = rule
            info.rule, info.values = rule, values
            for leaf in info.leaves:
                if leaf is not None:
                    leaf.rule = rule

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One :func:`agnosticopt.update_` of every group with the ``.grad`` tensors.

        Parameters
        ----------
        closure
            Re-evaluates the model and returns the loss (called with grad enabled).

        Returns
        -------
        The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        model = [group["params"] for group in self.param_groups]
        grads = []
        for group in model:
            row = [p.grad for p in group]
            for g in row:
                if g is not None and g.layout != torch.strided:
                    msg = "TorchOptimizer: sparse gradients are not supported"
                    raise TypeError(msg)
            grads.append(row)
        _, new_model = opt.update_(self._tree, model, grads)
        if new_model is not model:  # pragma: no cover - parameters are writeable leaves
            msg = "TorchOptimizer: a parameter could not be written in place"
            raise RuntimeError(msg)
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in torch's structure, with names and rules.

        Returns
        -------
        dict
            ``{"state": {index: {"state.m": tensor, "state.beta_t.0": 0.9, ...}},
            "param_groups": [{"lr": ..., "rule": {...}, "params": [indices],
            "param_names": [...] (given named_parameters())}, ...]}``: tensors
            (the live state tensors, as torch's), numbers, strings, tuples, lists
            and dicts. ``torch.save`` it; ``torch.load(weights_only=True)`` reads it.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync()
        state: dict[int, dict[str, Any]] = {}
        groups = []
        start = 0
        for group, info in zip(self.param_groups, self._groups, strict=True):
            packed = {k: v for k, v in group.items() if k not in ("params", "rule")}
            packed["rule"] = describe_rule(info.rule)
            packed["params"] = list(range(start, start + len(group["params"])))
            for i, leaf in enumerate(info.leaves, start):
                if leaf is not None:
                    state[i] = param_entries(leaf)
            start += len(group["params"])
            groups.append(packed)
        state_dict: dict[str, Any] = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`: by parameter name when both sides have names.

        Everything is checked first; on an error nothing has changed.

        Raises
        ------
        ValueError
            Naming each problem: another number of groups or parameters, names
            that do not match, another rule, missing, extra, mis-shaped or
            mis-typed state entries.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups, saved_state = (
            state_dict.get("param_groups"),
            state_dict.get("state"),
        )
        if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
            msg = "load_state_dict: expected a dict with 'state' and 'param_groups'"
            raise TypeError(msg)
        if len(saved_groups) != len(self.param_groups):
            msg = (
                f"load_state_dict: the state dict has {len(saved_groups)} param groups, "
                f"this optimizer {len(self.param_groups)}"
            )
            raise ValueError(msg)
        self._sync()
        errors: list[str] = []
        plans = []
        for k, (group, info, saved) in enumerate(
            zip(self.param_groups, self._groups, saved_groups, strict=True)
        ):
            plans.append(self._load_group(k, group, info, saved, saved_state, errors))
        if errors:
            msg = "load_state_dict: the state dict does not fit:\n  " + "\n  ".join(
                errors
            )
            raise ValueError(msg)
        for (rule, states, packed), group, info in zip(
            plans, self.param_groups, self._groups, strict=True
        ):
            for leaf, new in zip(info.leaves, states, strict=True):
                if leaf is not None:
                    leaf.rule, leaf.state, leaf.frozen = rule, new.state, new.frozen
            keep: dict[str, Any] = {
                k: group[k] for k in ("params", "param_names") if k in group
            }
            group.clear()
            group.update(packed)
            group.update(keep)
            group["rule"] = rule
            group.update(_values(rule, ""))
            info.rule = rule
            info.values = _normal_values(_values(rule, ""), "")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_group(
        self,
        k: int,
        group: dict[str, Any],
        info: _Group,
        saved: Any,
        saved_state: Mapping[Any, Any],
        errors: list[str],
    ) -> Any:
        where = f"param group {k}"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
            errors.append(f"{where}: not a param group with 'params'")
            return None, [], {}
        ids, params = saved["params"], group["params"]
        if len(ids) != len(params):
            errors.append(
                f"{where}: {len(ids)} parameters in the state dict, {len(params)} here"
            )
            return None, [], {}
        names, saved_names = group.get("param_names"), saved.get("param_names")
        labels = (
            [repr(n) for n in names] if names else [f"#{i}" for i in range(len(params))]
        )
        order = list(ids)
        if names and isinstance(saved_names, list) and len(saved_names) == len(ids):
            position = dict(zip(saved_names, ids, strict=True))
            missing = [n for n in names if n not in position]
            extra = [n for n in saved_names if n not in set(names)]
            if missing or extra:
                errors.append(
                    f"{where}: parameter names differ: missing {missing}, "
                    f"unexpected {extra}"
                )
                return None, [], {}
            order = [position[n] for n in names]
        rule = None
        if "rule" not in saved:
            errors.append(f"{where}: no 'rule' (not a TorchOptimizer state dict?)")
        else:
            try:
                rule = _restored_rule(info.rule, saved["rule"], where)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        states: list[Any] = []
        for label, sid, leaf in zip(labels, order, info.leaves, strict=True):
            if leaf is None:
                states.append(None)
                continue
            entries = saved_state.get(sid)
            if not isinstance(entries, Mapping):
                errors.append(f"{where}, parameter {label}: no state (index {sid!r})")
                states.append(leaf)
                continue
            states.append(
                leaf_from_entries(
                    leaf,
                    entries,
                    f"{where}, parameter {label}",
                    problems=errors,
                    rule=leaf.rule if rule is None else rule,
                )
            )
        packed = {
            key: v
            for key, v in saved.items()
            if key not in ("params", "param_names", "rule")
        }
        return rule, states, packed


def _check_rule(rule: Any, where: str) -> None:
    if not (
        callable(getattr(rule, "init", None)) and callable(getattr(rule, "apply", None))
    ):
        msg = f"{where}: the rule must be an agnosticopt rule such as opt.AdamW(), got {rule!r}"
        raise TypeError(msg)


def _check_names(rule: Any, given: Mapping[str, Any], where: str) -> None:
    have = set(_values(rule, where))
    unknown = sorted(set(given) - have)
    if unknown:
        msg = (
            f"{where}: the rule {rule!r} has no hyperparameter called {unknown} "
            f"(its torch names: {sorted(have)})"
        )
        raise ValueError(msg)


def _normal_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {n: _normal(n, v, where) for n, v in values.items()}


def _any_trainable(params: Iterable[torch.Tensor]) -> bool:
    return any(p.is_floating_point() or p.is_complex() for p in params)
