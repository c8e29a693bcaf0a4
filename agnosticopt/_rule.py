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

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

__all__ = ["Replace", "Rule", "eps", "hyper"]


class Replace(NamedTuple):
    """A step that replaces the parameter by ``value`` instead of being subtracted.

    Returned by :class:`~agnosticopt.MixedPrecision`, whose master copy is rounded
    back to the parameter dtype.
    """

    value: Any


def hyper(xp: Any, x: Any, *values: float) -> tuple[Any, ...]:
    """Round hyperparameters to the (real) dtype of the parameter ``x``.

    Returns numpy scalars, so that host arithmetic on them stays in ``T``.
    """
    t = xp.scalar_type(x)
    return tuple(t(v) for v in values)


def eps(xp: Any, x: Any, epsilon: float) -> Any:
    """Optimisers.jl's ``_eps``: ``T(epsilon)``, floored at ``1e-7`` in float16.

    In float16, ``epsilon == 0`` stays 0; otherwise the value is
    ``max(float16(1e-7), float16(epsilon))`` so that ``v + eps`` cannot be 0.
    """
    t = xp.scalar_type(x)
    value = t(epsilon)
    if t.__name__ == "float16" and epsilon != 0:
        return max(t(1e-7), value)
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of every rule: validation, ``adjust`` and the contract.

    Subclasses are frozen dataclasses whose fields are the hyperparameters, in
    Optimisers.jl's positional order. Field annotations drive validation:
    ``float`` fields take any real number (ints become floats), ``tuple`` fields
    take a tuple of reals, ``bool`` fields a bool, ``int`` fields an integer.
    """

    #: Fields that ``adjust`` must refuse to change (e.g. RMSProp's ``centred``).
    fixed_fields: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check_field(type(self).__name__, field, value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        eta = getattr(self, "eta", 0.0)
        if _is_real(eta) and eta < 0:
            msg = f"{type(self).__name__}: eta must be >= 0, got {eta!r}"
            raise ValueError(msg)

    # -- the contract ------------------------------------------------------
    def init(self, x: Any, xp: Any) -> Any:
        """Return the initial state for parameter ``x``."""
        raise NotImplementedError

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
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


def _check_field(rule: str, field: dataclasses.Field[Any], value: Any) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    where = f"{rule}.{field.name}"
    if kind.startswith("float"):
        if isinstance(value, bool) or not _is_real(value):
            msg = f"{where} must be a real number, got {value!r}"
            raise TypeError(msg)
        return float(value) if isinstance(value, numbers.Integral) else value
    if kind.startswith("tuple"):
        if not isinstance(value, tuple):
            msg = f"{where} must be a tuple of real numbers, got {value!r}"
            raise TypeError(msg)
        for item in value:
            if isinstance(item, bool) or not _is_real(item):
                msg = f"{where} must be a tuple of real numbers, got {value!r}"
                raise TypeError(msg)
        return tuple(float(v) if isinstance(v, numbers.Integral) else v for v in value)
    if kind == "bool" and not isinstance(value, bool):
        msg = f"{where} must be a bool, got {value!r}"
        raise TypeError(msg)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        msg = f"{where} must be an integer, got {value!r}"
        raise TypeError(msg)
    return value
