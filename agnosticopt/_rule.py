"""The rule contract shared by every optimisation rule.

A rule is a frozen dataclass of hyperparameters with two methods:

* ``init(x, xp) -> state`` builds the per-array state;
* ``apply(state, x, dx, xp) -> (state, step)`` returns the new state and the
  step that the caller subtracts from the parameter: ``x <- x - step``.

``xp`` is the adapter of the parameter's backend (see :mod:`agnosticopt.adapters`):
rules call only its elementwise operations, so each adapter can make every one
of them an IEEE-754 correctly rounded operation in the parameter dtype ``T``.
Hyperparameters are rounded to ``T`` on the host (numpy scalar types) before use,
and host-scalar expressions are evaluated in ``T`` in Optimisers.jl's order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import numbers
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

from agnosticopt._protocols import RuleNamespace

__all__ = [
    "DECAY",
    "NONNEGATIVE",
    "NONNEGATIVE_OR_INF",
    "Range",
    "Replace",
    "Rule",
    "check_precision",
    "eps",
    "hyper",
    "hyperparameter",
]


class Replace(NamedTuple):
    """A step that replaces the parameter by ``value`` instead of being subtracted.

    Returned by :class:`~agnosticopt.MixedPrecision`, whose master copy is rounded
    back to the parameter dtype.
    """

    value: Any


def refuse_unknown_hyperparameters(
    who: str, names: Iterable[str], known: Iterable[str]
) -> None:
    """Raise a ValueError for the ``names`` that are not adjustable hyperparameters.

    Parameters
    ----------
    who : str
        The start of the message, up to the names (e.g. ``"Scheduled: Adam has no
        adjustable hyperparameter"``).
    names, known : iterable of str
        The names asked for, and the adjustable hyperparameters there are.
    """
    known = sorted(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        msg = f"{who} {', '.join(map(repr, unknown))} (adjustable: {', '.join(known)})"
        raise ValueError(msg)


def hyper(xp: RuleNamespace, x: Any, *values: float) -> tuple[Any, ...]:
    """Round hyperparameters to the (real) dtype of the parameter ``x``.

    Returns numpy scalars, so that host arithmetic on them stays in ``T``.
    """
    t = xp.scalar_type(x)
    return tuple(
        t(v)
        if type(v) is float or isinstance(v, numbers.Number)
        else _on_device(xp, t, v)
        for v in values
    )


def _on_device(xp: RuleNamespace, t: type, value: Any) -> Any:
    """A hyperparameter that is a 0-d array (a schedule's value under ``jax.jit``),
    rounded to the dtype ``t`` by the backend's ``astype``."""
    return xp.astype(value, t.__name__)


def eps(xp: RuleNamespace, x: Any, epsilon: float) -> Any:
    """Optimisers.jl's ``_eps``: ``T(epsilon)``, floored at ``1e-7`` in float16.

    In float16, ``epsilon == 0`` stays 0; otherwise the value is
    ``max(float16(1e-7), float16(epsilon))`` so that ``v + eps`` cannot be 0.
    """
    t = xp.scalar_type(x)
    if type(epsilon) is not float and not _is_real(epsilon):
        msg = "epsilon cannot follow a schedule under jax.jit (its float16 floor is a host max)"
        raise TypeError(msg)
    value = t(epsilon)
    if t.__name__ == "float16" and epsilon != 0:
        return max(t(1e-7), value)
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real)


# -- declared hyperparameter ranges --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values, as field metadata.

    ``Range(0, 1, hi_open=True)`` is ``[0, 1)``. NaN is never in a range.
    ``also`` lists single values allowed outside the interval (``-inf`` for
    :class:`~agnosticopt.ClipNorm`'s ``p``).
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, value: object) -> bool:
        v = float(value)  # type: ignore[arg-type]
        if v in self.also:
            return True
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        text = (
            f"{'(' if self.lo_open else '['}{_num(self.lo)}, "
            f"{_num(self.hi)}{')' if self.hi_open else ']'}"
        )
        return " or ".join([text, *map(_num, self.also)])


def _num(v: float) -> str:
    return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"


#: A learning rate, weight decay, ε: finite and non-negative (torch.optim's ranges).
NONNEGATIVE = Range(0, math.inf, hi_open=True)
#: A bound that may be infinite (no clipping): ClipGrad's δ, ClipNorm's ω.
NONNEGATIVE_OR_INF = Range(0, math.inf)
#: A decay factor β or ρ: torch.optim's ``[0, 1)``.
DECAY = Range(0, 1, hi_open=True)

#: What rounding a hyperparameter to the parameter dtype must keep (see ``hyperparameter``).
PRECISION_KINDS = ("below_one", "nonzero", "exact")


def hyperparameter(
    default: Any,
    valid: Range | tuple[Range, ...] | None = None,
    *,
    precision: str | tuple[str | None, ...] | None = None,
    ordered: bool = False,
    kw_only: bool = False,
) -> Any:
    """A rule field with its allowed values, declared once.

    Parameters
    ----------
    default
        The default value.
    valid
        The allowed range; for a tuple field one range for every element, or a
        tuple of ranges, one per element.
    precision
        What rounding the value to the parameter dtype ``T`` must keep, checked
        by ``init`` and ``apply`` (for a tuple: one kind for all elements or one
        per element, ``None`` for none): ``"below_one"`` -- a value below 1
        stays below 1, so ``1 - value`` is not 0 (decay factors);
        ``"nonzero"`` -- a non-zero value stays non-zero and finite (learning
        rates, penalties); ``"exact"`` -- the value is exact in ``T`` (counts).
    ordered
        For a tuple field: the elements must be non-decreasing (``(min, max)``).
    kw_only
        Keyword-only field.
    """
    for kind in precision if isinstance(precision, tuple) else (precision,):
        if kind is not None and kind not in PRECISION_KINDS:
            msg = f"precision must be one of {PRECISION_KINDS}, got {kind!r}"
            raise ValueError(msg)
    meta = {"valid": valid, "precision": precision, "ordered": ordered}
    return dataclasses.field(default=default, kw_only=kw_only, metadata=meta)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a rule class (strings under PEP 563 included)."""
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001  (a name only a type checker sees: check the rest)
            hints = _hints_one_by_one(cls)
        _HINTS[cls] = hints
    return hints


def _hints_one_by_one(cls: type) -> dict[str, Any]:
    """Each field's annotation that resolves on its own; the others are unchecked."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules.get(klass.__module__, types.ModuleType("_")))
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            holder = types.SimpleNamespace(__annotations__={name: annotation})
            try:
                hints[name] = typing.get_type_hints(holder, namespace)[name]
            except Exception:  # noqa: BLE001
                hints[name] = Any
    return hints


def _check_value(where: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp``; ints become floats for floats."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return value
        members = [a for a in args if a is not type(None)]
        errors = []
        for member in members:
            try:
                return _check_value(where, member, value)
            except TypeError as exc:
                errors.append(str(exc))
        msg = errors[0] if len(errors) == 1 else f"{where} must be {tp}, got {value!r}"
        raise TypeError(msg)
    if origin is typing.Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            choices = ", ".join(map(repr, args))
            msg = f"{where} must be one of {choices}, got {value!r}"
            raise TypeError(msg)
        return value
    if tp is float:
        if isinstance(value, bool) or not _is_real(value):
            msg = f"{where} must be a real number, got {value!r}"
            raise TypeError(msg)
        return float(value) if isinstance(value, numbers.Integral) else value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            msg = f"{where} must be an integer, got {value!r}"
            raise TypeError(msg)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            msg = f"{where} must be a bool, got {value!r}"
            raise TypeError(msg)
        return value
    if origin is tuple or tp is tuple:
        return _check_tuple(where, args, value)
    if isinstance(tp, type) and tp is not object and not isinstance(value, tp):
        msg = f"{where} must be {tp.__name__}, got {value!r}"
        raise TypeError(msg)
    return value


def _check_tuple(where: str, args: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
    """A tuple field: ``tuple[X, Y]`` has exactly two items, ``tuple[X, ...]`` any."""
    variadic = len(args) == 2 and args[1] is Ellipsis
    members = args[:1] if variadic else args
    real = " of real numbers" if members and all(a is float for a in members) else ""
    if not isinstance(value, tuple):
        msg = f"{where} must be a tuple{real}, got {value!r}"
        raise TypeError(msg)
    if not args:
        return value
    items = members * len(value) if variadic else members
    if len(value) != len(items):
        what = "real numbers" if real else "items"
        msg = f"{where} must be a tuple of {len(items)} {what}, got {value!r}"
        raise TypeError(msg)
    return tuple(
        _check_value(f"{where}[{i}]", a, v)
        for i, (a, v) in enumerate(zip(items, value, strict=True))
    )


def _check_range(where: str, field: dataclasses.Field[Any], value: Any) -> None:
    valid = field.metadata.get("valid")
    if valid is None or value is None:
        return
    if isinstance(value, tuple):
        ranges = valid if isinstance(valid, tuple) else (valid,) * len(value)
        for i, (allowed, item) in enumerate(zip(ranges, value, strict=True)):
            if item not in allowed:
                msg = f"{where}[{i}] must be in {allowed}, got {item!r}"
                raise ValueError(msg)
        if field.metadata.get("ordered") and any(
            a > b for a, b in itertools.pairwise(value)
        ):
            msg = f"{where} must be in increasing order (min, max), got {value!r}"
            raise ValueError(msg)
    elif value not in valid:
        msg = f"{where} must be in {valid}, got {value!r}"
        raise ValueError(msg)


def _check_field(rule: str, field: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
    where = f"{rule}.{field.name}"
    checked = _check_value(where, tp, value)
    _check_range(where, field, checked)
    return checked


# -- precision: what rounding to the parameter dtype must keep -----------------------------


_PLANS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _precision_plan(cls: type) -> tuple[tuple[str, Any], ...]:
    """The fields of ``cls`` with a precision check, and their kinds."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = tuple(
            (f.name, f.metadata["precision"])
            for f in dataclasses.fields(cls)
            if f.metadata.get("precision") is not None
        )
    return plan


def _degenerate(kind: str, value: Any, rounded: Any) -> str | None:
    """Why ``rounded`` (``value`` in ``T``) breaks the rule, or None."""
    v, r = float(value), float(rounded)
    if kind == "below_one" and v < 1 <= r:
        return f"{_num(r)}, so 1 - {{name}} is 0"
    if kind == "nonzero" and v != 0 and (r == 0 or not math.isfinite(r)):
        return f"{_num(r)}"
    if kind == "exact" and r != v:
        return f"{_num(r)}, not exactly {{name}}"
    return None


#: (id(rule), scalar type) -> rule, for rules that passed (bounded; cleared when full).
_PASSED: dict[tuple[int, type], Any] = {}


#: Set while :class:`~agnosticopt.Scheduled` applies a rule whose scheduled
#: hyperparameters are traced 0-d arrays (``jax.jit``): they cannot be checked on
#: the host, so construction and precision checks are skipped for that rule.
_TRACED_HYPERPARAMETERS = contextvars.ContextVar(
    "traced_hyperparameters", default=False
)


@contextlib.contextmanager
def traced_hyperparameters() -> Iterator[None]:
    """Build and apply rules holding traced hyperparameters (no host checks)."""
    token = _TRACED_HYPERPARAMETERS.set(True)
    try:
        yield
    finally:
        _TRACED_HYPERPARAMETERS.reset(token)


def check_precision(rule: Rule, xp: RuleNamespace, x: Any) -> None:
    """Raise if a hyperparameter of ``rule`` degenerates in the dtype of ``x``.

    Run by every rule's ``init`` and ``apply`` (so at :func:`setup`, and at the
    first update after :func:`adjust`, before anything is written). See
    :func:`hyperparameter` for the kinds of checks.

    Raises
    ------
    ValueError
        Naming the rule, the field, the dtype, and the remedy.
    """
    plan = _precision_plan(type(rule))
    if not plan or _TRACED_HYPERPARAMETERS.get():
        return
    t = xp.scalar_type(x)
    key = (id(rule), t)
    if _PASSED.get(key) is rule:  # checked before (the rule is kept, so its id is too)
        return
    for name, kinds in plan:
        value = getattr(rule, name)
        if isinstance(value, tuple):
            per = kinds if isinstance(kinds, tuple) else (kinds,) * len(value)
            items: list[tuple[str, str | None, Any]] = [
                (f"{name}[{i}]", k, v)
                for i, (k, v) in enumerate(zip(per, value, strict=True))
            ]
        else:
            items = [(name, kinds, value)]
        for label, kind, item in items:
            if kind is None:
                continue
            why = _degenerate(kind, item, t(item))
            if why is not None:
                rule_name, dtype = type(rule).__name__, t.__name__
                msg = (
                    f"{rule_name}.{label} = {item!r} rounds to {why.format(name=label)} "
                    f"in {dtype} (the parameter dtype), so {rule_name} cannot run in "
                    f"{dtype}: wrap the rule as MixedPrecision('float32', rule) to step "
                    f"a float32 master copy, or change {label}"
                )
                raise ValueError(msg)
    if len(_PASSED) >= 4096:
        _PASSED.clear()
    _PASSED[key] = rule


def _checking_init(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def init(self: Rule, x: Any, xp: RuleNamespace) -> Any:
        check_precision(self, xp, x)
        return fn(self, x, xp)

    init.__agnosticopt_checked__ = True  # type: ignore[attr-defined]
    return init


def _checking_apply(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def apply(self: Rule, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> Any:
        check_precision(self, xp, x)
        return fn(self, state, x, dx, xp)

    apply.__agnosticopt_checked__ = True  # type: ignore[attr-defined]
    return apply


#: Called with every new subclass of :class:`Rule`; JAX's adapter, once loaded,
#: adds the hook that makes each one a static pytree (a rule has no leaves).
NEW_RULE_CLASS_HOOKS: list[Callable[[type], None]] = []


def _load_jax_pytrees() -> None:
    """Load JAX's adapter (it makes rules and ``Leaf`` pytrees) if JAX is imported.

    Called when a rule is made, so that ``jax.eval_shape(opt.setup, rule, params)``
    works in a program that imported JAX after agnosticopt: JAX flattens the
    rule before ``setup`` runs. Never imports JAX itself.
    """
    if (
        "jax" in sys.modules
        and "agnosticopt.adapters.jax" not in sys.modules
        and getattr(sys.modules.get("agnosticopt"), "__version__", None) is not None
    ):
        import importlib

        importlib.import_module("agnosticopt.adapters.jax")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of every rule: validation, ``adjust`` and the contract.

    Subclasses are frozen dataclasses whose fields are the hyperparameters, in
    Optimisers.jl's positional order. Field annotations (resolved with
    :func:`typing.get_type_hints`) drive type checks: ``float`` fields take any
    real number (ints become floats), ``tuple[float, float]`` exactly two reals,
    ``tuple[float, ...]`` any number, ``Optional[X]`` (or ``X | None``) also
    ``None``, ``Literal[...]`` one of its values, ``bool`` a bool, ``int`` an
    integer, any other class an instance of it. Ranges and precision checks are declared once per
    field with :func:`hyperparameter` and run at construction and in
    ``adjust``; NaN is never in range.

    Every ``init`` and ``apply`` first checks that the hyperparameters survive
    rounding to the parameter dtype (see :func:`check_precision`): for example
    β2 = 0.999 is 1 in bfloat16, where Adam would divide 0 by 0, so Adam on
    bfloat16 parameters raises and names ``MixedPrecision('float32', ...)``.
    """

    #: Fields that ``adjust`` must refuse to change (e.g. RMSProp's ``centred``).
    fixed_fields: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrap in (("init", _checking_init), ("apply", _checking_apply)):
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "__agnosticopt_checked__", False):
                setattr(cls, name, wrap(fn))
        for hook in NEW_RULE_CLASS_HOOKS:
            hook(cls)

    def __post_init__(self) -> None:
        _load_jax_pytrees()
        if _TRACED_HYPERPARAMETERS.get():
            return
        hints = _hints(type(self))
        rule = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check_field(rule, field, hints.get(field.name, Any), value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)

    # -- the contract ------------------------------------------------------
    def init(self, x: Any, xp: RuleNamespace) -> Any:
        """Return the initial state for parameter ``x``."""
        raise NotImplementedError

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        """Return ``(new_state, step)``; the caller does ``x <- x - step``."""
        raise NotImplementedError

    # -- hyperparameters ---------------------------------------------------
    def hyperparameter_names(self) -> frozenset[str]:
        """Names that ``adjust`` can change in this rule (or its inner rules)."""
        return frozenset(f.name for f in dataclasses.fields(self)) - self.fixed_fields

    def adjust(self, eta: float | None = None, **changes: Any) -> Rule:
        """Return a copy with some hyperparameters changed.

        ``adjust(eta)`` sets the learning rate; keywords set any field. Names the
        rule does not have are ignored, as in Optimisers.jl, so that one call can
        adjust a whole tree of different rules.
        """
        if eta is not None:
            changes = {"eta": eta, **changes}
        if not changes:
            msg = "adjust needs a learning rate or at least one keyword"
            raise TypeError(msg)
        return self._adjust(changes)

    def _adjust(self, changes: Mapping[str, Any]) -> Rule:
        refused = self.fixed_fields & changes.keys()
        if refused:
            msg = (
                f"{type(self).__name__}: {sorted(refused)} cannot be adjusted, "
                "because the state depends on it; make a new rule and setup again"
            )
            raise ValueError(msg)
        names = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in changes.items() if k in names}
        return dataclasses.replace(self, **mine) if mine else self
