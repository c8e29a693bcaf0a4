"""Per-element adaptive step sizes: RMSProp, AdaGrad, AdaDelta, Rprop, and Lion."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from agnosticopt._adam import ema
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import (
    DECAY,
    NONNEGATIVE,
    NONNEGATIVE_OR_INF,
    Range,
    Rule,
    eps,
    hyper,
    hyperparameter,
)

__all__ = ["AdaDelta", "AdaGrad", "Lion", "RMSProp", "Rprop"]


class RMSPropState(NamedTuple):
    """Mean square ``quad`` (real) and, when centred, mean ``lin`` (else None)."""

    quad: Any
    lin: Any


@dataclass(frozen=True, init=False)
class RMSProp(Rule):
    """RMSProp, optionally centred (normalised by a variance estimate).

    .. math::

        q &\\leftarrow \\rho\\, q + (1-\\rho)\\,|g|^2, \\qquad
        \\ell \\leftarrow \\rho\\, \\ell + (1-\\rho)\\, g \\;\\text{(centred)} \\\\
        u &= \\frac{g\\,\\eta}{\\sqrt{q - |\\ell|^2} + \\epsilon}

    Parameters
    ----------
    eta
        Learning rate (η).
    rho
        Decay of the averages (ρ).
    epsilon
        Added outside the square root (ε).
    centred
        Keyword only (also spelled ``centered``). Cannot be adjusted, since the
        two variants keep different states.

    Notes
    -----
    No bias correction and no momentum term, unlike torch.optim.RMSprop's
    ``momentum`` option.

    References
    ----------
    - Hinton, Srivastava and Swersky, *Neural Networks for Machine Learning*,
      lecture 6e (2012); centred: Graves,
      [arXiv:1308.0850](https://arxiv.org/abs/1308.0850).
    - Optimisers.jl, ``src/rules.jl`` (``RMSProp``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    rho: float = hyperparameter(0.9, DECAY, precision="below_one")
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)
    centred: bool = False

    fixed_fields: ClassVar[frozenset[str]] = frozenset({"centred", "centered"})

    def __init__(
        self,
        eta: float = 0.001,
        rho: float = 0.9,
        epsilon: float = 1e-8,
        *,
        centred: bool = False,
        centered: bool = False,
    ) -> None:
        for name, value in (("eta", eta), ("rho", rho), ("epsilon", epsilon)):
            object.__setattr__(self, name, value)
        object.__setattr__(
            self, "centred", centered if centered is not False else centred
        )
        self.__post_init__()

    def init(self, x: Any, xp: RuleNamespace) -> RMSPropState:
        lin = xp.zeros_like(x) if self.centred else None
        return RMSPropState(xp.real_zeros_like(x), lin)

    def apply(
        self, state: RMSPropState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[RMSPropState, Any]:
        eta, rho = hyper(xp, x, self.eta, self.rho)
        quad = ema(xp, rho, state.quad, xp.abs2(dx))
        lin, spread = None, quad
        if self.centred:
            lin = ema(xp, rho, state.lin, dx)
            spread = xp.subtract(quad, xp.abs2(lin))
        den = xp.add(xp.sqrt(spread), eps(xp, x, self.epsilon))
        return RMSPropState(quad, lin), xp.divide(xp.multiply(dx, eta), den)


@dataclass(frozen=True)
class AdaGrad(Rule):
    """AdaGrad: steps shrink with the sum of squared gradients.

    .. math::

        a \\leftarrow a + |g|^2, \\qquad u = \\frac{g\\,\\eta}{\\sqrt{a} + \\epsilon}

    Notes
    -----
    The accumulator starts at the raw ``epsilon`` rounded to the parameter
    dtype (no float16 floor there, as in Optimisers.jl).

    References
    ----------
    - Duchi, Hazan and Singer, *Adaptive subgradient methods for online learning and
      stochastic optimization*, JMLR 12 (2011).
    - Optimisers.jl, ``src/rules.jl`` (``AdaGrad``).
    """

    eta: float = hyperparameter(0.1, NONNEGATIVE, precision="nonzero")
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> Any:
        (e,) = hyper(xp, x, self.epsilon)
        return xp.full_like(x, e, real=True)

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        (eta,) = hyper(xp, x, self.eta)
        acc = xp.add(state, xp.abs2(dx))
        den = xp.add(xp.sqrt(acc), eps(xp, x, self.epsilon))
        return acc, xp.divide(xp.multiply(dx, eta), den)


class AdaDeltaState(NamedTuple):
    """Mean square gradient ``acc`` and mean square step ``delta_acc`` (real)."""

    acc: Any
    delta_acc: Any


@dataclass(frozen=True)
class AdaDelta(Rule):
    """AdaDelta: AdaGrad's step scaled by the recent size of the steps themselves.

    .. math::

        a &\\leftarrow \\rho\\, a + (1-\\rho)\\,|g|^2, \\qquad
        u = \\frac{g\\,\\sqrt{\\Delta + \\epsilon}}{\\sqrt{a + \\epsilon}}, \\qquad
        \\Delta \\leftarrow \\rho\\,\\Delta + (1-\\rho)\\,|u|^2

    Notes
    -----
    There is no learning rate: ``adjust(tree, eta)`` leaves AdaDelta unchanged,
    as in Optimisers.jl. ε sits inside both square roots on purpose.

    References
    ----------
    - Zeiler, *ADADELTA: an adaptive learning rate method*,
      [arXiv:1212.5701](https://arxiv.org/abs/1212.5701).
    - Optimisers.jl, ``src/rules.jl`` (``AdaDelta``).
    """

    rho: float = hyperparameter(0.9, Range(0, 1), precision="below_one")
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AdaDeltaState:
        return AdaDeltaState(xp.real_zeros_like(x), xp.real_zeros_like(x))

    def apply(
        self, state: AdaDeltaState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdaDeltaState, Any]:
        (rho,) = hyper(xp, x, self.rho)
        e = eps(xp, x, self.epsilon)
        acc = ema(xp, rho, state.acc, xp.abs2(dx))
        num = xp.multiply(dx, xp.sqrt(xp.add(state.delta_acc, e)))
        step = xp.divide(num, xp.sqrt(xp.add(acc, e)))
        delta_acc = ema(xp, rho, state.delta_acc, xp.abs2(step))
        return AdaDeltaState(acc, delta_acc), step


class RpropState(NamedTuple):
    """Previous gradient ``g_prev`` and per-element step sizes ``steps``."""

    g_prev: Any
    steps: Any


@dataclass(frozen=True)
class Rprop(Rule):
    """Resilient backpropagation (iRprop⁻), for full-batch training, real only.

    Per element, with the *previous* gradient :math:`g'` (products, not signs,
    are compared, so an underflowing product counts as zero):

    .. math::

        s \\leftarrow \\begin{cases}
            \\min(s\\,\\ell_2, \\Gamma_2) & g' g > 0 \\\\
            \\max(s\\,\\ell_1, \\Gamma_1) & g' g < 0 \\\\
            s & \\text{otherwise}\\end{cases}, \\quad
        g' \\leftarrow \\begin{cases} 0 & g' g < 0 \\\\ g \\end{cases}, \\quad
        u = s\\,\\operatorname{sign}(g')

    Parameters
    ----------
    eta
        Initial step size (η). Read only by ``init``: adjusting it later does
        not change existing state (Optimisers.jl's behaviour).
    ell
        Decrease and increase factors (ℓ1, ℓ2).
    gamma
        Minimal and maximal step sizes (Γ1, Γ2).

    Notes
    -----
    Optimisers.jl writes the defaults as Float32 literals (``1f-3``,
    ``1.2f0``, ...); here they are the Python floats of the same decimals.

    References
    ----------
    - Riedmiller and Braun, *A direct adaptive method for faster backpropagation
      learning: the RPROP algorithm* (1993).
    - Optimisers.jl, ``src/rules.jl`` (``Rprop``).
    """

    eta: float = hyperparameter(1e-3, NONNEGATIVE, precision="nonzero")
    ell: tuple[float, float] = hyperparameter(
        (0.5, 1.2),
        (
            Range(0, 1, lo_open=True, hi_open=True),
            Range(1, math.inf, lo_open=True, hi_open=True),
        ),
        precision=("below_one", None),
    )
    gamma: tuple[float, float] = hyperparameter(
        (1e-6, 50.0), (NONNEGATIVE, NONNEGATIVE_OR_INF), ordered=True
    )

    def init(self, x: Any, xp: RuleNamespace) -> RpropState:
        (eta,) = hyper(xp, x, self.eta)
        return RpropState(xp.zeros_like(x), xp.full_like(x, eta))

    def apply(
        self, state: RpropState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[RpropState, Any]:
        l1, l2, g1, g2 = hyper(xp, x, *self.ell, *self.gamma)
        prod = xp.multiply(state.g_prev, dx)
        grow = xp.minimum(xp.multiply(state.steps, l2), g2)
        shrink = xp.maximum(xp.multiply(state.steps, l1), g1)
        flipped = xp.less(prod, 0)
        steps = xp.where(
            xp.greater(prod, 0), grow, xp.where(flipped, shrink, state.steps)
        )
        g_prev = xp.where(flipped, xp.zeros_like(dx), dx)
        return RpropState(g_prev, steps), xp.multiply(steps, xp.sign(g_prev))


@dataclass(frozen=True)
class Lion(Rule):
    """Lion (evolved sign momentum), with Optimisers.jl's EMA weights.

    .. math::

        m \\leftarrow \\beta_2\\, g + (1-\\beta_2)\\, m, \\qquad
        u = \\eta\\,\\operatorname{sign}((\\beta_2-\\beta_1)\\, g + \\beta_1 m)

    Notes
    -----
    Optimisers.jl's deviation from the paper, kept on purpose: the paper's
    EMA is ``m <- β2 m + (1-β2) g``; here the weights are swapped, so with the
    defaults the step is close to ``η sign(0.998 g + 0.0009 m_old)``, i.e.
    nearly signSGD. ``Lion(eta, (1 - b, 1 - b))`` is Signum with momentum ``b``.
    Real parameters only (``sign`` of a complex number is not exact).

    References
    ----------
    - Chen et al., *Symbolic discovery of optimization algorithms*,
      [arXiv:2302.06675](https://arxiv.org/abs/2302.06675).
    - Optimisers.jl, ``src/rules.jl`` (``Lion``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), Range(0, 1), precision="below_one"
    )

    def init(self, x: Any, xp: RuleNamespace) -> Any:
        return xp.zeros_like(x)

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        eta, b1, b2 = hyper(xp, x, self.eta, *self.beta)
        m = xp.add(xp.multiply(b2, dx), xp.multiply(1 - b2, state))
        mix = xp.add(xp.multiply(b2 - b1, dx), xp.multiply(b1, m))
        return m, xp.multiply(eta, xp.sign(mix))
