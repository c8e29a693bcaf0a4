"""The rules and chains that the conformance suite runs, each with a short name.

Every rule of agnosticopt appears at least once (with the hyperparameters that
switch on each code path: centred RMSProp, decoupled AdamW, ClipNorm with
p = 2, 1 and inf), and a set of chains combines them as users do.
"""

from __future__ import annotations

import dataclasses
import math

import agnosticopt as opt

__all__ = ["CASES", "Case", "case_named", "complex_ok"]


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


#: Every rule, then the chains.
CASES: tuple[Case, ...] = (
    Case("Descent", opt.Descent()),
    Case("Momentum", opt.Momentum()),
    Case("Nesterov", opt.Nesterov()),
    Case("Rprop", opt.Rprop()),
    Case("RMSProp", opt.RMSProp()),
    Case("RMSProp(centred)", opt.RMSProp(centred=True)),
    Case("Adam", opt.Adam()),
    Case("RAdam", opt.RAdam()),
    Case("AdaMax", opt.AdaMax()),
    Case("OAdam", opt.OAdam()),
    Case("AdaGrad", opt.AdaGrad()),
    Case("AdaDelta", opt.AdaDelta()),
    Case("AMSGrad", opt.AMSGrad()),
    Case("NAdam", opt.NAdam()),
    Case("AdamW", opt.AdamW(lambda_=0.01)),
    Case("AdamW(decoupled)", opt.AdamW(lambda_=0.01, couple=False)),
    Case("AdaBelief", opt.AdaBelief()),
    Case("Lion", opt.Lion()),
    Case("WeightDecay", opt.WeightDecay()),
    Case("SignDecay", opt.SignDecay()),
    Case("ClipGrad", opt.ClipGrad(0.5)),
    Case("ClipNorm", opt.ClipNorm(100.0, throw=False)),
    Case("AccumGrad", opt.AccumGrad(2)),
    Case("MixedPrecision(Adam)", opt.MixedPrecision("float64", opt.Adam())),
    Case(
        "WeightDecay+ClipGrad+Adam",
        _chain(opt.WeightDecay(1e-4), opt.ClipGrad(1e-3), opt.Adam(1e-3)),
    ),
    Case("ClipNorm+Adam", _chain(opt.ClipNorm(10.0, throw=False), opt.Adam(0.001))),
    Case(
        "ClipNorm(inf)+Momentum",
        _chain(opt.ClipNorm(1.0, math.inf, throw=False), opt.Momentum()),
    ),
    Case(
        "ClipNorm(1)+RMSProp(centred)",
        _chain(opt.ClipNorm(5.0, 1, throw=False), opt.RMSProp(centred=True)),
    ),
    Case("AccumGrad+Adam", _chain(opt.AccumGrad(3), opt.Adam())),
    Case(
        "WeightDecay+ClipGlobalNorm+Adam",
        _chain(opt.WeightDecay(1e-4), opt.ClipGlobalNorm(10.0), opt.Adam(1e-3)),
    ),
    Case(
        "SkipNonFinite(ClipGlobalNorm(1)+AdamW)",
        opt.SkipNonFinite(_chain(opt.ClipGlobalNorm(5.0, 1), opt.AdamW(lambda_=0.01))),
    ),
    Case(
        "WeightDecay+OAdam+ClipGrad",
        _chain(opt.WeightDecay(), opt.OAdam(), opt.ClipGrad(1)),
    ),
    Case("SignDecay+Lion", _chain(opt.SignDecay(0.001), opt.Lion())),
    Case(
        "MixedPrecision(ClipGrad+AdamW)",
        opt.MixedPrecision(
            "float64", _chain(opt.ClipGrad(0.5), opt.AdamW(lambda_=0.01))
        ),
    ),
)

#: Rules defined for complex parameters (no sign, max, clamp or comparisons).
_COMPLEX_OK = (
    opt.Descent, opt.Momentum, opt.Nesterov, opt.RMSProp, opt.Adam, opt.RAdam,
    opt.OAdam, opt.AdaGrad, opt.AdaDelta, opt.NAdam, opt.AdamW, opt.AdaBelief,
    opt.WeightDecay, opt.AccumGrad, opt.ClipNorm, opt.ClipGlobalNorm,
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
