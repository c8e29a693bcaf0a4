"""The one table of rule cases, each with a short name, and the lists taken from it.

:data:`TABLE` holds every rule case that the conformance suite, the tests and the
benchmarks run; each row names the lists (:data:`LISTS`) that take it, and
:func:`cases_in` gives a list. :data:`CASES`, the conformance list, has every rule
of agnosticopt at least once (with the hyperparameters that switch on each code
path: centred RMSProp, decoupled AdamW, ClipNorm with p = 2, 1 and inf), and a set
of chains combining them as users do.
"""

from __future__ import annotations

import dataclasses
import math

import agnosticopt as opt

__all__ = [
    "BENCHMARK",
    "CASES",
    "CONFORMANCE",
    "LISTS",
    "MODIFIERS",
    "OPTIMISERS_JL",
    "TABLE",
    "Case",
    "Row",
    "case_named",
    "cases_in",
    "complex_ok",
]


@dataclasses.dataclass(frozen=True)
class Case:
    """A rule (or chain) under test and the short name reports use for it.

    Parameters
    ----------
    name
        A short, unique, file-name-safe label (``"WeightDecay+ClipGrad+Adam"``).
    rule
        The rule.
    """

    name: str
    rule: opt.Rule

    def __str__(self) -> str:
        return self.name


def _chain(*rules: opt.Rule) -> opt.Rule:
    return opt.OptimiserChain(*rules)


#: The lists a row of :data:`TABLE` can belong to.
#:
#: ``conformance``: the conformance suite (:data:`CASES`; golden files, the identity
#: and fast-path tests): every rule, with the hyperparameters that switch on each
#: code path, then chains combining them as users do.
CONFORMANCE = "conformance"
#: ``optimisers.jl``: Optimisers.jl's ``test/rules.jl`` RULES table, with its
#: hyperparameters (tests/test_rules.py: convergence, dtypes, pickling).
OPTIMISERS_JL = "optimisers.jl"
#: ``modifiers``: modifiers and wrappers at their defaults, which are not
#: optimisers on their own, so not in that table (tests/test_rules.py: dtypes, pickling).
MODIFIERS = "modifiers"
#: ``benchmark``: rules torch.optim also has (with a clip, torch's ``clip_grad_*_``),
#: so that benchmarks/ can time each against torch's implementations.
BENCHMARK = "benchmark"
#: Every list name.
LISTS = (CONFORMANCE, OPTIMISERS_JL, MODIFIERS, BENCHMARK)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of :data:`TABLE`: a case and the lists that take it.

    Parameters
    ----------
    case
        The rule and its name.
    lists
        Names from :data:`LISTS`.
    """

    case: Case
    lists: frozenset[str]


def _row(name: str, rule: opt.Rule, *lists: str) -> Row:
    unknown = set(lists) - set(LISTS)
    if unknown or not lists:
        msg = f"case {name!r}: lists must be some of {LISTS}, got {lists}"
        raise ValueError(msg)
    return Row(Case(name, rule), frozenset(lists))


_C, _JL, _MOD, _BENCH = CONFORMANCE, OPTIMISERS_JL, MODIFIERS, BENCHMARK

#: The one table of rule cases: tests, conformance and benchmarks take their lists
#: from it (:func:`cases_in`), so a new rule is one new row. A rule appears once,
#: in one row naming every list that takes it.
TABLE: tuple[Row, ...] = (
    # -- every rule (conformance first, in the golden files' order)
    _row("Descent", opt.Descent(), _C, _JL),
    _row("Momentum", opt.Momentum(), _C, _JL, _BENCH),
    _row("Nesterov", opt.Nesterov(), _C, _JL),
    _row("Rprop", opt.Rprop(), _C, _JL),
    _row("RMSProp", opt.RMSProp(), _C, _JL, _BENCH),
    _row("RMSProp(centred)", opt.RMSProp(centred=True), _C, _JL),
    _row("Adam", opt.Adam(), _C, _JL, _BENCH),
    _row("RAdam", opt.RAdam(), _C, _JL),
    _row("AdaMax", opt.AdaMax(), _C, _JL),
    _row("OAdam", opt.OAdam(), _C, _JL),
    _row("AdaGrad", opt.AdaGrad(), _C, _JL),
    _row("AdaDelta", opt.AdaDelta(), _C, _JL),
    _row("AMSGrad", opt.AMSGrad(), _C, _JL),
    _row("NAdam", opt.NAdam(), _C, _JL),
    _row("AdamW", opt.AdamW(lambda_=0.01), _C, _BENCH),
    _row("AdamW(decoupled)", opt.AdamW(lambda_=0.01, couple=False), _C),
    _row("AdaBelief", opt.AdaBelief(), _C, _JL),
    _row("Lion", opt.Lion(), _C, _JL),
    _row("WeightDecay", opt.WeightDecay(), _C, _MOD),
    _row("SignDecay", opt.SignDecay(), _C, _MOD),
    _row("ClipGrad", opt.ClipGrad(0.5), _C),
    _row("ClipNorm", opt.ClipNorm(100.0, throw=False), _C),
    _row("AccumGrad", opt.AccumGrad(2), _C),
    _row("MixedPrecision(Adam)", opt.MixedPrecision("float64", opt.Adam()), _C, _JL),
    # -- conformance chains
    _row(
        "WeightDecay+ClipGrad+Adam",
        _chain(opt.WeightDecay(1e-4), opt.ClipGrad(1e-3), opt.Adam(1e-3)),
        _C,
    ),
    _row("ClipNorm+Adam", _chain(opt.ClipNorm(10.0, throw=False), opt.Adam(0.001)), _C),
    _row(
        "ClipNorm(inf)+Momentum",
        _chain(opt.ClipNorm(1.0, math.inf, throw=False), opt.Momentum()),
        _C,
    ),
    _row(
        "ClipNorm(1)+RMSProp(centred)",
        _chain(opt.ClipNorm(5.0, 1, throw=False), opt.RMSProp(centred=True)),
        _C,
    ),
    _row("AccumGrad+Adam", _chain(opt.AccumGrad(3), opt.Adam()), _C),
    _row(
        "WeightDecay+ClipGlobalNorm+Adam",
        _chain(opt.WeightDecay(1e-4), opt.ClipGlobalNorm(10.0), opt.Adam(1e-3)),
        _C,
    ),
    _row(
        "SkipNonFinite(ClipGlobalNorm(1)+AdamW)",
        opt.SkipNonFinite(_chain(opt.ClipGlobalNorm(5.0, 1), opt.AdamW(lambda_=0.01))),
        _C,
    ),
    _row(
        "WeightDecay+OAdam+ClipGrad",
        _chain(opt.WeightDecay(), opt.OAdam(), opt.ClipGrad(1)),
        _C,
        _JL,
    ),
    _row("SignDecay+Lion", _chain(opt.SignDecay(0.001), opt.Lion()), _C),
    _row(
        "MixedPrecision(ClipGrad+AdamW)",
        opt.MixedPrecision(
            "float64", _chain(opt.ClipGrad(0.5), opt.AdamW(lambda_=0.01))
        ),
        _C,
    ),
    # -- the rest of Optimisers.jl's table (its hyperparameters)
    _row("AdamW()", opt.AdamW(), _JL),
    _row("AdamW(couple=False)", opt.AdamW(couple=False), _JL),
    _row("SignDecay(0.001)+Adam", _chain(opt.SignDecay(0.001), opt.Adam(0.001)), _JL),
    _row("ClipNorm()+Adam", _chain(opt.ClipNorm(), opt.Adam(0.001)), _JL),
    _row("ClipGrad(0.5)+Momentum", _chain(opt.ClipGrad(0.5), opt.Momentum()), _JL),
    # -- modifiers and wrappers at their defaults
    _row("ClipGrad()", opt.ClipGrad(), _MOD),
    _row("ClipNorm()", opt.ClipNorm(), _MOD),
    _row("OptimiserChain()", opt.OptimiserChain(), _MOD),
    _row("AccumGrad(3)", opt.AccumGrad(3), _MOD),
    _row("MixedPrecision(Momentum)", opt.MixedPrecision(opt.Momentum()), _MOD),
    # -- the benchmark's chains (torch: clip_grad_value_ / clip_grad_norm_, then the rule)
    _row("ClipGrad+Adam", _chain(opt.ClipGrad(1.0), opt.Adam(1e-3)), _BENCH),
    _row(
        "ClipGlobalNorm+AdamW",
        _chain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-3, lambda_=0.01)),
        _BENCH,
    ),
    _row(
        "ClipNorm+AdamW",
        _chain(opt.ClipNorm(1.0, throw=False), opt.AdamW(1e-3, lambda_=0.01)),
        _BENCH,
    ),
)


def cases_in(name: str) -> tuple[Case, ...]:
    """The cases of list ``name`` (one of :data:`LISTS`), in :data:`TABLE`'s order.

    Raises
    ------
    KeyError
        If ``name`` is not a list; the message lists them.
    """
    if name not in LISTS:
        msg = f"no case list is called {name!r}; the lists are: {', '.join(LISTS)}"
        raise KeyError(msg)
    return tuple(row.case for row in TABLE if name in row.lists)


#: The conformance cases: every rule, then the chains.
CASES: tuple[Case, ...] = cases_in(CONFORMANCE)

#: Rules defined for complex parameters (no sign, max, clamp or comparisons).
_COMPLEX_OK = (
    opt.Descent,
    opt.Momentum,
    opt.Nesterov,
    opt.RMSProp,
    opt.Adam,
    opt.RAdam,
    opt.OAdam,
    opt.AdaGrad,
    opt.AdaDelta,
    opt.NAdam,
    opt.AdamW,
    opt.AdaBelief,
    opt.WeightDecay,
    opt.AccumGrad,
    opt.ClipNorm,
    opt.ClipGlobalNorm,
)


def complex_ok(rule: opt.Rule) -> bool:
    """Whether ``rule`` is defined for complex parameters."""
    if isinstance(rule, opt.OptimiserChain):
        return all(complex_ok(r) for r in rule.opts)
    if isinstance(rule, opt.MixedPrecision):
        return False
    return isinstance(rule, _COMPLEX_OK)


def case_named(name: str) -> Case:
    """The case called ``name`` (case-insensitive).

    Raises
    ------
    KeyError
        If no case has that name; the message lists the names.
    """
    for case in CASES:
        if case.name.lower() == name.lower():
            return case
    names = ", ".join(c.name for c in CASES)
    msg = f"no conformance case is called {name!r}; the cases are: {names}"
    raise KeyError(msg)
