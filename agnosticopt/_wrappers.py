"""Rules made of rules: OptimiserChain, AccumGrad, MixedPrecision."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import Range, Replace, Rule, hyper, hyperparameter

__all__ = ["AccumGrad", "MixedPrecision", "OptimiserChain"]


def _check_rule(owner: str, rule: object) -> None:
    if not isinstance(rule, Rule):
        msg = f"{owner} expects rules, got {type(rule).__name__}: {rule!r}"
        raise TypeError(msg)


@dataclass(frozen=True, init=False, repr=False)
class OptimiserChain(Rule):
    """Apply rules one after another, each transforming the previous one's step.

    ``OptimiserChain(a, b)`` passes the gradient through ``a``, then ``a``'s
    step through ``b``; every rule sees the same, not yet updated, parameter.
    ``OptimiserChain()`` is the identity (``x <- x - g``). When a rule returns
    no step (:class:`AccumGrad` before its n-th call), the rules after it are
    skipped and keep their state.

    Parameters
    ----------
    *opts
        The rules, in order. A :class:`MixedPrecision` cannot be one of them:
        wrap the whole chain in it instead.

    References
    ----------
    - Optimisers.jl, ``src/rules.jl`` (``OptimiserChain``).
    """

    opts: tuple[Rule, ...]

    def __init__(self, *opts: Rule) -> None:
        for rule in opts:
            _check_rule("OptimiserChain", rule)
            if isinstance(rule, MixedPrecision):
                msg = (
                    "MixedPrecision cannot be inside an OptimiserChain: wrap the whole "
                    "chain instead, MixedPrecision(OptimiserChain(...))"
                )
                raise ValueError(msg)  # noqa: TRY004  (Optimisers.jl: ArgumentError)
        object.__setattr__(self, "opts", tuple(opts))

    def __repr__(self) -> str:
        return f"OptimiserChain({', '.join(map(repr, self.opts))})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (OptimiserChain, self.opts)

    def init(self, x: Any, xp: RuleNamespace) -> tuple[Any, ...]:
        return tuple(rule.init(x, xp) for rule in self.opts)

    def apply(
        self, state: tuple[Any, ...], x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[Any, Any]:
        states = []
        step = dx
        for rule, sub in zip(self.opts, state, strict=True):
            if step is None:
                states.append(sub)
            else:
                sub, step = rule.apply(sub, x, step, xp)
                states.append(sub)
        return tuple(states), step

    def hyperparameter_names(self) -> frozenset[str]:
        return frozenset().union(*(rule.hyperparameter_names() for rule in self.opts))

    def _adjust(self, changes: Mapping[str, Any]) -> Rule:
        return OptimiserChain(*(rule._adjust(changes) for rule in self.opts))


class AccumGradState(NamedTuple):
    """Running mean ``acc`` of the gradients so far and the call ``counter`` (1..n)."""

    acc: Any
    counter: int


@dataclass(frozen=True)
class AccumGrad(Rule):
    """Accumulate ``n`` gradients, then pass their mean on.

    .. math::

        a \\leftarrow g/n \\;(\\text{first call}),\\quad a \\leftarrow a + g/n
        \\;(\\text{later calls}), \\qquad u = a \\text{ on the n-th call, else none}

    Use it first in a chain, ``OptimiserChain(AccumGrad(n), Adam())``: the
    rules after it run once every ``n`` calls, on the mean of those gradients,
    which is the gradient of an ``n`` times larger batch.

    Parameters
    ----------
    n
        Number of gradients to accumulate (≥ 1).

    References
    ----------
    - Optimisers.jl, ``src/rules.jl`` (``AccumGrad``).
    """

    n: int = hyperparameter(dataclasses.MISSING, Range(1, math.inf), precision="exact")

    def init(self, x: Any, xp: RuleNamespace) -> AccumGradState:
        return AccumGradState(xp.zeros_like(x), 1)

    def apply(
        self, state: AccumGradState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[Any, Any]:
        (n,) = hyper(xp, x, self.n)
        part = xp.divide(dx, n)
        acc = part if state.counter == 1 else xp.add(state.acc, part)
        if state.counter == self.n:
            return AccumGradState(acc, 1), acc
        return AccumGradState(acc, state.counter + 1), None


_PRECISIONS = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")


def _dtype_name(dtype: Any) -> str:
    """A dtype given as a name, numpy type or backend dtype, as its name."""
    if isinstance(dtype, str):
        name = dtype
    else:
        name = getattr(dtype, "__name__", None) or str(getattr(dtype, "name", dtype))
        name = name.rsplit(".", 1)[-1]
    if name not in _PRECISIONS:
        msg = f"MixedPrecision needs a floating-point dtype, one of {_PRECISIONS}, got {dtype!r}"
        raise TypeError(msg)
    return name


class MixedPrecisionState(NamedTuple):
    """The high-precision master copy ``master`` and the inner rule's ``state``."""

    master: Any
    state: Any


@dataclass(frozen=True, init=False)
class MixedPrecision(Rule):
    """Keep a high-precision master copy of each parameter and step that.

    ``MixedPrecision(rule)`` or ``MixedPrecision(dtype, rule)`` (default
    ``"float32"``). The inner rule runs on the master copy ``x_T`` (so its
    hyperparameters are rounded to ``dtype``), then:

    .. math:: x_T \\leftarrow x_T - u, \\qquad x \\leftarrow \\operatorname{round}(x_T)

    Meant for float16 or bfloat16 parameters. It must be the outermost rule:
    wrap a chain in it, never the reverse. It is the remedy the rules name
    when a hyperparameter degenerates in the parameter dtype (for example
    Adam's β2 = 0.999, which is 1 in bfloat16): the inner rule's
    hyperparameters are then rounded to ``dtype`` instead.

    Notes
    -----
    Optimisers.jl rounds the master copy into ``x`` on its in-place path but
    returns ``x - (x - x_T)`` on its out-of-place one; here both
    :func:`update` and :func:`update_` give the rounded master copy, so the two
    stay bit-identical. There is no loss scaling.

    References
    ----------
    - Micikevicius et al., *Mixed precision training*,
      [arXiv:1710.03740](https://arxiv.org/abs/1710.03740).
    - Optimisers.jl, ``src/rules.jl`` (``MixedPrecision``).
    """

    dtype: str
    rule: Rule

    def __init__(self, *args: Any) -> None:
        if len(args) == 1:
            dtype, rule = "float32", args[0]
        elif len(args) == 2:
            dtype, rule = args
        else:
            msg = "MixedPrecision takes (rule) or (dtype, rule)"
            raise TypeError(msg)
        _check_rule("MixedPrecision", rule)
        object.__setattr__(self, "dtype", _dtype_name(dtype))
        object.__setattr__(self, "rule", rule)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MixedPrecision, (self.dtype, self.rule))

    def init(self, x: Any, xp: RuleNamespace) -> MixedPrecisionState:
        master = xp.astype(x, self.dtype)
        return MixedPrecisionState(master, self.rule.init(master, xp))

    def apply(
        self, state: MixedPrecisionState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[Any, Any]:
        master = state.master
        inner, step = self.rule.apply(
            state.state, master, xp.astype(dx, self.dtype), xp
        )
        if step is None:
            return MixedPrecisionState(master, inner), None
        master = xp.subtract(master, step)
        new_x = xp.astype(master, xp.dtype_name(x))
        return MixedPrecisionState(master, inner), Replace(new_x)

    def hyperparameter_names(self) -> frozenset[str]:
        return self.rule.hyperparameter_names()

    def _adjust(self, changes: Mapping[str, Any]) -> Rule:
        return MixedPrecision(self.dtype, self.rule._adjust(changes))
