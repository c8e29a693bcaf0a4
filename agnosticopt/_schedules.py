"""Schedules for any hyperparameter, and the rule that applies them: Scheduled.

A schedule is a frozen dataclass called on the step count ``t`` (0 for the
first update, as in optax) that returns a Python float::

    >>> from agnosticopt import schedules
    >>> s = schedules.warmup_cosine(peak=1e-3, warmup=10, steps=100)
    >>> s(0), s(10), s(100)
    (0.0, 0.001, 0.0)

:class:`Scheduled` wraps any rule (a chain too) and sets some of its
hyperparameters from schedules at every step::

    opt.Scheduled(opt.OptimiserChain(opt.ClipGrad(1), opt.AdamW(1e-3)),
                  eta=schedules.warmup_cosine(1e-3, 100, 10_000),
                  lambda_=schedules.Linear(1e-2, 0.0, 10_000))

The step count lives in the leaf's state (:class:`ScheduledState`, a host
``int``; under ``jax.jit`` a traced one, see below), so it travels with the
state and checkpoints with it. Each value is a
Python float computed on the host, handed to the inner rule as if by
``adjust``, and rounded to the parameter dtype at use like every
hyperparameter, so a scheduled run gives the bits of a hand-written loop that
calls ``adjust_`` before every step, on every backend.

Under ``jax.jit`` the count is traced (one compilation for every step) and the
schedules of this module are evaluated on the device by the JAX adapter
(``schedule_value``: float64 in JAX's 64-bit mode), their 0-d values rounded to
the parameter dtype by the adapter's ``astype`` (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from agnosticopt._global import has_stages, register_staged, staged
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import (
    Rule,
    refuse_unknown_hyperparameters,
    traced_hyperparameters,
)

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Join",
    "Linear",
    "OneCycle",
    "Polynomial",
    "Schedule",
    "Scheduled",
    "ScheduledState",
    "Step",
    "warmup_cosine",
    "warmup_linear",
]


def _real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{owner}.{name} must be a real number, got {value!r}"
        raise TypeError(msg)
    out = float(value)
    if not math.isfinite(out):
        msg = f"{owner}.{name} must be finite, got {value!r}"
        raise ValueError(msg)
    return out


def _count(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{owner}.{name} must be an integer, got {value!r}"
        raise TypeError(msg)
    if value < minimum:
        msg = f"{owner}.{name} must be >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _step(owner: str, t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        msg = (
            f"{owner} is called on the step count, a host integer, got {t!r}; "
            "a schedule is evaluated on the host (see agnosticopt.Scheduled)"
        )
        raise TypeError(msg)
    if t < 0:
        msg = f"{owner}: the step count must be >= 0, got {t}"
        raise ValueError(msg)
    return int(t)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class: ``schedule(t) -> float`` for the step count ``t >= 0``.

    Any callable ``f(t) -> float`` works where a schedule is expected; the
    classes here are frozen dataclasses, so they compare by value, print their
    parameters and carry no state.
    """

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            if kind == "float":
                object.__setattr__(self, field.name, _real(owner, field.name, value))
            elif kind == "int":
                object.__setattr__(
                    self, field.name, _count(owner, field.name, value, 1)
                )

    def __call__(self, t: int) -> float:
        """The value at step ``t``."""
        return self._value(_step(type(self).__name__, t))

    def _value(self, t: int) -> float:
        """The value at step ``t >= 0`` (checked); subclasses implement this."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """The same ``value`` at every step."""

    value: float

    def _value(self, t: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
    """From ``start`` at ``t = 0`` to ``end`` at ``t = steps`` linearly, then ``end``.

    .. math:: s(t) = s_0 + (s_1 - s_0)\\,\\min(t, n)/n

    A warmup when ``start < end``, a decay otherwise (optax's ``linear_schedule``).
    """

    start: float
    end: float
    steps: int

    def _value(self, t: int) -> float:
        if t >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * (t / self.steps)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from ``start`` (``t = 0``) to ``end`` (``t = steps``), then ``end``.

    .. math:: s(t) = s_1 + (s_0 - s_1)\\,\\frac{1 + \\cos(\\pi \\min(t, n)/n)}{2}

    ``start > end`` is a decay (optax's ``cosine_decay_schedule``), ``start < end``
    a cosine warmup.
    """

    start: float
    end: float
    steps: int

    def _value(self, t: int) -> float:
        if t >= self.steps:
            return self.end
        return (
            self.end
            + (self.start - self.end) * (1 + math.cos(math.pi * t / self.steps)) / 2
        )


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """``start * rate ** (t / steps)``: multiplied by ``rate`` every ``steps`` steps, smoothly.

    For a staircase (whole multiples only) use :class:`Step`.
    """

    start: float
    rate: float
    steps: int = 1

    def _value(self, t: int) -> float:
        return self.start * self.rate ** (t / self.steps)


@dataclasses.dataclass(frozen=True)
class Step(Schedule):
    """``start * rate ** (t // every)``: multiplied by ``rate`` every ``every`` steps.

    ParameterSchedulers.jl's ``Step``, torch's ``StepLR``.
    """

    start: float
    rate: float
    every: int

    def _value(self, t: int) -> float:
        return self.start * self.rate ** (t // self.every)


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """From ``start`` to ``end`` in ``steps`` steps along a power, then ``end``.

    .. math:: s(t) = s_1 + (s_0 - s_1)\\,(1 - \\min(t, n)/n)^p

    ``power = 1`` is :class:`Linear` (optax's ``polynomial_schedule``).
    """

    start: float
    end: float
    power: float
    steps: int

    def _value(self, t: int) -> float:
        if t >= self.steps:
            return self.end
        return self.end + (self.start - self.end) * (1 - t / self.steps) ** self.power


@dataclasses.dataclass(frozen=True)
class OneCycle(Schedule):
    """The one-cycle policy: a cosine up to ``peak``, then a cosine down (optax's).

    Rises from ``peak / div`` to ``peak`` in the first ``round(pct_start * steps)``
    steps, then falls to ``peak / (div * final_div)`` at ``t = steps``, and stays.
    """

    peak: float
    steps: int
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.pct_start <= 1:
            msg = f"OneCycle.pct_start must be in [0, 1], got {self.pct_start!r}"
            raise ValueError(msg)
        if self.div <= 0 or self.final_div <= 0:
            msg = f"OneCycle.div and final_div must be > 0, got {self.div!r}, {self.final_div!r}"
            raise ValueError(msg)

    def _value(self, t: int) -> float:
        up = round(self.pct_start * self.steps)
        low = self.peak / self.div
        if t < up:
            return Cosine(low, self.peak, up)._value(t)
        if up == self.steps:
            return self.peak
        return Cosine(self.peak, low / self.final_div, self.steps - up)._value(t - up)


@dataclasses.dataclass(frozen=True)
class Join(Schedule):
    """Schedules one after another: ``schedules[i]`` from ``boundaries[i - 1]`` on.

    ``Join((a, b, c), (100, 1000))`` is ``a(t)`` for ``t < 100``, ``b(t - 100)``
    for ``100 <= t < 1000`` and ``c(t - 1000)`` after: each schedule sees its own
    step count from 0 (optax's ``join_schedules``, ParameterSchedulers.jl's
    ``Sequence``).
    """

    schedules: tuple[Callable[[int], float], ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if not self.schedules or not all(callable(s) for s in self.schedules):
            msg = f"Join.schedules must be a non-empty tuple of schedules, got {self.schedules!r}"
            raise TypeError(msg)
        if len(self.boundaries) != len(self.schedules) - 1:
            msg = (
                f"Join needs one boundary fewer than schedules: {len(self.schedules)} "
                f"schedules, {len(self.boundaries)} boundaries"
            )
            raise ValueError(msg)
        previous = 0
        for b in self.boundaries:
            _count("Join", "boundaries", b, previous + 1 if previous else 1)
            previous = b

    def _value(self, t: int) -> float:
        begin = 0
        for schedule, boundary in zip(self.schedules, self.boundaries, strict=False):
            if t < boundary:
                return float(schedule(t - begin))
            begin = boundary
        return float(self.schedules[-1](t - begin))


def warmup_cosine(
    peak: float, warmup: int, steps: int, start: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warmup from ``start`` to ``peak`` in ``warmup`` steps, then a cosine
    decay to ``end`` at ``t = steps`` (``steps`` counts the warmup, as optax's
    ``warmup_cosine_decay_schedule``).
    """
    return _warmup(Cosine, peak, warmup, steps, start, end, "warmup_cosine")


def warmup_linear(
    peak: float, warmup: int, steps: int, start: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warmup from ``start`` to ``peak`` in ``warmup`` steps, then a linear
    decay to ``end`` at ``t = steps`` (``steps`` counts the warmup).
    """
    return _warmup(Linear, peak, warmup, steps, start, end, "warmup_linear")


def _warmup(
    decay: Callable[[float, float, int], Schedule],
    peak: float,
    warmup: int,
    steps: int,
    start: float,
    end: float,
    owner: str,
) -> Schedule:
    warmup = _count(owner, "warmup", warmup, 0)
    steps = _count(owner, "steps", steps, warmup + 1)
    if warmup == 0:
        return decay(peak, end, steps)
    return Join(
        (Linear(start, peak, warmup), decay(peak, end, steps - warmup)), (warmup,)
    )


# -- the rule ------------------------------------------------------------------------


class ScheduledState(NamedTuple):
    """The step count ``t`` (updates so far: a host int; a 0-d JAX integer array after
    a jitted step) and the inner ``state``."""

    t: int
    state: Any


ScheduleValue = Callable[[int], Any] | tuple[Any, ...]


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Scheduled(Rule):
    """Set hyperparameters of ``rule`` from schedules of the step count.

    ``Scheduled(rule, eta=s1, lambda_=s2, beta=(s3, 0.999))``: before its
    ``t``-th update (``t = 0, 1, ...``), each leaf uses
    ``rule.adjust(eta=s1(t), lambda_=s2(t), beta=(s3(t), 0.999))``. A
    tuple hyperparameter takes a tuple of schedules and numbers, or one schedule
    returning a tuple. ``rule`` may be a chain: every rule of the chain that has
    the hyperparameter follows the schedule, as with ``adjust``. A Scheduled may
    also sit inside a chain, e.g. to schedule one rule's ``eta`` only.

    Parameters
    ----------
    rule
        The rule whose hyperparameters are scheduled.
    **schedules
        Hyperparameter name -> schedule (any callable of the step count giving a
        Python number; see :mod:`agnosticopt.schedules`).

    Notes
    -----
    The state is ``ScheduledState(t, inner_state)``; ``t`` counts
    the calls (an :class:`AccumGrad` inside counts its accumulating calls too).
    The inner state is made with the values at ``t = 0``, so Adam's bias
    correction powers start at β(0) and then multiply in β(t) at each step, as
    ``adjust`` between steps does in Optimisers.jl.

    ``adjust``/``adjust_`` change unscheduled hyperparameters as usual; a
    scheduled one takes a new schedule (a number there raises, because the
    schedule would override it at the next step).

    References
    ----------
    - ParameterSchedulers.jl (Optimisers.jl has no schedules) and optax's
      ``inject_hyperparams``.
    """

    rule: Rule
    schedules: tuple[tuple[str, ScheduleValue], ...]

    def __init__(self, rule: Rule, **schedules: ScheduleValue) -> None:
        if not isinstance(rule, Rule):
            msg = f"Scheduled expects a rule first, got {type(rule).__name__}: {rule!r}"
            raise TypeError(msg)
        if not schedules:
            msg = "Scheduled needs at least one hyperparameter schedule, e.g. eta=..."
            raise TypeError(msg)
        names = rule.hyperparameter_names()
        refuse_unknown_hyperparameters(
            f"Scheduled: {type(rule).__name__} has no adjustable hyperparameter",
            schedules,
            names,
        )
        for name, value in schedules.items():
            _check_schedule(name, value)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "schedules", tuple(sorted(schedules.items())))
        self.at(0)  # the values at t = 0 must be valid hyperparameters: fail now

    def __repr__(self) -> str:
        parts = [repr(self.rule), *(f"{k}={v!r}" for k, v in self.schedules)]
        return f"Scheduled({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_scheduled, (self.rule, dict(self.schedules)))

    def values(self, t: int) -> dict[str, Any]:
        """The hyperparameter values at step ``t``: name -> number (or tuple)."""
        out = {}
        for name, schedule in self.schedules:
            if isinstance(schedule, tuple):
                out[name] = tuple(
                    _number(name, s(t) if callable(s) else s) for s in schedule
                )
            else:
                value = schedule(t)
                if isinstance(value, tuple):
                    out[name] = tuple(_number(name, v) for v in value)
                else:
                    out[name] = _number(name, value)
        return out

    def at(self, t: int) -> Rule:
        """The inner rule with its hyperparameters at step ``t``."""
        cache = self.__dict__.get("_cached")
        if cache is not None and cache[0] == t:
            return cache[1]
        rule = self.rule._adjust(self.values(t))
        object.__setattr__(self, "_cached", (t, rule))
        return rule

    def init(self, x: Any, xp: RuleNamespace) -> ScheduledState:
        return ScheduledState(0, self.at(0).init(x, xp))

    def apply(
        self, state: ScheduledState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[Any, Any]:
        count = _count_of(state)
        if (
            count is None
        ):  # a traced count (jax.jit): the values are computed on the device
            with traced_hyperparameters():
                inner, step = self.rule._adjust(self._traced_values(state.t, xp)).apply(
                    state.state, x, dx, xp
                )
            return ScheduledState(state.t + 1, inner), step
        inner, step = self.at(count).apply(state.state, x, dx, xp)
        return ScheduledState(count + 1, inner), step

    def _traced_values(self, t: Any, xp: RuleNamespace) -> dict[str, Any]:
        """The values at a traced step count ``t``: 0-d device arrays (numbers stay)."""
        module = sys.modules.get(type(xp).__module__)
        on_device = getattr(module, "schedule_value", None)
        if on_device is None:
            msg = (
                f"Scheduled: the step count is a traced {type(t).__name__}, which "
                f"{getattr(xp, 'name', xp)!r} cannot evaluate schedules on"
            )
            raise TypeError(msg)
        out: dict[str, Any] = {}
        for name, schedule in self.schedules:
            if isinstance(schedule, tuple):
                out[name] = tuple(
                    on_device(s, t) if callable(s) else s for s in schedule
                )
            else:
                out[name] = on_device(schedule, t)
        return out

    def hyperparameter_names(self) -> frozenset[str]:
        return self.rule.hyperparameter_names()

    def _adjust(self, changes: Mapping[str, Any]) -> Rule:
        scheduled = dict(self.schedules)
        plain = {}
        for name, value in changes.items():
            if name in scheduled:
                if not (callable(value) or isinstance(value, tuple)):
                    msg = (
                        f"Scheduled: {name} follows a schedule, so a number would be "
                        f"overridden at the next step; pass a new schedule for {name}"
                    )
                    raise ValueError(msg)
                scheduled[name] = value
            else:
                plain[name] = value
        rule = self.rule._adjust(plain) if plain else self.rule
        return Scheduled(rule, **scheduled)


def _count_of(state: ScheduledState) -> int | None:
    """The step count as a host int, or ``None`` when it is traced (``jax.jit``).

    After a jitted step the count is a 0-d JAX integer array: eagerly it is
    concrete and read back (``operator.index``), as a traced one cannot be.
    """
    count = state.t
    if isinstance(count, numbers.Integral) and not isinstance(count, bool):
        return int(count)
    if getattr(count, "ndim", None) == 0 and "int" in str(getattr(count, "dtype", "")):
        try:
            return operator.index(count)
        except TypeError:  # jax's ConcretizationTypeError: a tracer
            return None
    return _host_count(state)


def _host_count(state: ScheduledState) -> int:
    count = state.t
    if getattr(count, "ndim", None) == 0 and "int" in str(getattr(count, "dtype", "")):
        try:
            return operator.index(count)
        except TypeError:
            pass
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        msg = (
            f"Scheduled: the step count in the state must be a host int, got "
            f"{type(count).__name__}; schedules are evaluated on the host "
            "(a cross-leaf rule inside, such as ClipGlobalNorm, needs it on the host: "
            "run such a Scheduled eagerly, see docs/training.md)"
        )
        raise TypeError(msg)
    return int(count)


def _make_scheduled(rule: Rule, schedules: dict[str, ScheduleValue]) -> Scheduled:
    return Scheduled(rule, **schedules)


def _check_schedule(name: str, value: Any) -> None:
    if callable(value):
        return
    if isinstance(value, tuple) and all(
        callable(v) or (isinstance(v, numbers.Real) and not isinstance(v, bool))
        for v in value
    ):
        return
    msg = (
        f"Scheduled: {name} must be a schedule (a callable of the step count) or a "
        f"tuple of schedules and numbers, got {value!r}"
    )
    raise TypeError(msg)


def _number(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"Scheduled: the schedule of {name} returned {value!r}, not a real number"
        raise TypeError(msg)
    return value


# -- cross-leaf rules (ClipGlobalNorm, SkipNonFinite) inside a Scheduled -------------------


def _scheduled_in_stages(
    rule: Scheduled, state: ScheduledState, x: Any, dx: Any, xp: RuleNamespace
) -> Any:
    """:meth:`Scheduled.apply` in stages, for a Scheduled holding a cross-leaf rule."""
    count = _host_count(state)
    inner, step = yield from staged(rule.at(count), state.state, x, dx, xp)
    return ScheduledState(count + 1, inner), step


register_staged(Scheduled, _scheduled_in_stages, lambda r: has_stages(r.rule))
