"""Adam and its relatives: Adam, AdamW, RAdam, NAdam, OAdam, AdaMax, AMSGrad, AdaBelief.

Shared conventions (Optimisers.jl's): the bias-correction powers ``beta_t``
start at ``beta`` (that is, β¹) and are a running product in the parameter dtype,
``beta_t <- beta_t * beta`` after every step, using the rule's β at that step.

Low precision: the β's are rounded to the parameter dtype, like every
hyperparameter. In bfloat16 (8 significant bits) the default β2 = 0.999 is 1, so
``1 - β2`` is 0 and the bias correction would divide 0 by 0; in float16 the same
happens from β = 0.9998 up. Rather than return NaN, ``setup`` (and, after an
``adjust``, the next update, before anything is written) raises ``ValueError``
naming the rule, the field and the dtype. The remedy is
``MixedPrecision('float32', rule)``, which steps a float32 master copy (as
torch.optim computes in float32 for 16-bit parameters), or a β that the dtype
keeps below 1 (bfloat16's largest is 0.99609375).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import DECAY, NONNEGATIVE, Rule, eps, hyper, hyperparameter

__all__ = ["AMSGrad", "AdaBelief", "AdaMax", "Adam", "AdamW", "NAdam", "OAdam", "RAdam"]


class AdamState(NamedTuple):
    """First moment ``m``, second moment ``v`` (real) and powers ``beta_t``."""

    m: Any
    v: Any
    beta_t: tuple[Any, Any]


def ema(xp: RuleNamespace, beta: Any, old: Any, new: Any) -> Any:
    """``beta * old + (1 - beta) * new``, operation by operation."""
    return xp.add(xp.multiply(beta, old), xp.multiply(1 - beta, new))


def _moments(
    xp: RuleNamespace, x: Any, rule: Any, state: Any, dx: Any
) -> tuple[Any, Any, Any, Any]:
    """Adam's two moment updates; returns ``(b1, b2, m, v)``."""
    b1, b2 = hyper(xp, x, *rule.beta)
    m = ema(xp, b1, state.m, dx)
    v = ema(xp, b2, state.v, xp.abs2(dx))
    return b1, b2, m, v


def _init_adam(rule: Any, x: Any, xp: RuleNamespace) -> AdamState:
    return AdamState(xp.zeros_like(x), xp.real_zeros_like(x), hyper(xp, x, *rule.beta))


def _adam_direction(
    xp: RuleNamespace, m: Any, v: Any, beta_t: Any, epsilon: Any
) -> Any:
    """``(m / (1 - bt1)) / (sqrt(v / (1 - bt2)) + epsilon)``."""
    bt1, bt2 = beta_t
    den = xp.add(xp.sqrt(xp.divide(v, 1 - bt2)), epsilon)
    return xp.divide(xp.divide(m, 1 - bt1), den)


@dataclass(frozen=True)
class Adam(Rule):
    """Adam, with Optimisers.jl's placement of ε and η.

    .. math::

        m &\\leftarrow \\beta_1 m + (1-\\beta_1)\\, g \\\\
        v &\\leftarrow \\beta_2 v + (1-\\beta_2)\\, |g|^2 \\\\
        u &= \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t)} + \\epsilon}\\,\\eta

    Parameters
    ----------
    eta
        Learning rate (η).
    beta
        Decay of the first and second moments (β1, β2).
    epsilon
        Added outside the square root (ε; floored at 1e-7 in float16).

    Notes
    -----
    Unlike torch.optim.Adam, ε is added after bias-correcting ``v`` and η
    multiplies last, so results differ in the last bits from torch's three paths.

    References
    ----------
    - Kingma and Ba, *Adam: a method for stochastic optimization*,
      [arXiv:1412.6980](https://arxiv.org/abs/1412.6980).
    - Optimisers.jl, ``src/rules.jl`` (``Adam``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AdamState:
        return _init_adam(self, x, xp)

    def apply(
        self, state: AdamState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdamState, Any]:
        (eta,) = hyper(xp, x, self.eta)
        b1, b2, m, v = _moments(xp, x, self, state, dx)
        step = xp.multiply(
            _adam_direction(xp, m, v, state.beta_t, eps(xp, x, self.epsilon)), eta
        )
        bt1, bt2 = state.beta_t
        return AdamState(m, v, (bt1 * b1, bt2 * b2)), step


@dataclass(frozen=True)
class AdamW(Rule):
    """Adam with weight decay, coupled to η by default as in torch.optim.AdamW.

    With ``d`` the Adam direction for η = 1 (see :class:`Adam`) and ``x`` the
    parameter before the step:

    .. math::

        u = \\eta\\,(d + \\lambda x) \\quad (\\text{couple}), \\qquad
        u = \\eta\\, d + \\lambda x \\quad (\\text{not couple})

    Parameters
    ----------
    eta, beta, epsilon
        As :class:`Adam`, but ε has no float16 floor (as in Optimisers.jl).
    lambda_
        Weight decay (λ; Julia's ``lambda``). The default 0 makes AdamW equal Adam.
    couple
        Keyword only. ``True`` (default, torch's form) multiplies the decay by η.

    References
    ----------
    - Loshchilov and Hutter, *Decoupled weight decay regularization*,
      [arXiv:1711.05101](https://arxiv.org/abs/1711.05101).
    - Optimisers.jl, ``src/rules.jl`` (``AdamW``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    lambda_: float = hyperparameter(0.0, NONNEGATIVE, precision="nonzero")
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)
    couple: bool = field(default=True, kw_only=True)

    def init(self, x: Any, xp: RuleNamespace) -> AdamState:
        return _init_adam(self, x, xp)

    def apply(
        self, state: AdamState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdamState, Any]:
        eta, epsilon, lam = hyper(xp, x, self.eta, self.epsilon, self.lambda_)
        b1, b2, m, v = _moments(xp, x, self, state, dx)
        d = _adam_direction(xp, m, v, state.beta_t, epsilon)
        if self.couple:
            step = xp.multiply(eta, xp.add(d, xp.multiply(lam, x)))
        else:
            step = xp.add(xp.multiply(eta, d), xp.multiply(lam, x))
        bt1, bt2 = state.beta_t
        return AdamState(m, v, (bt1 * b1, bt2 * b2)), step


class RAdamState(NamedTuple):
    """Adam's state plus the step counter ``t`` (a host int, starting at 1)."""

    m: Any
    v: Any
    beta_t: tuple[Any, Any]
    t: int


@dataclass(frozen=True)
class RAdam(Rule):
    """Rectified Adam: plain momentum SGD until the variance is tractable.

    With :math:`\\rho_\\infty = 2/(1-\\beta_2) - 1` and
    :math:`\\rho = \\rho_\\infty - 2t\\beta_2^t/(1-\\beta_2^t)`, all host
    scalars in the parameter dtype:

    .. math::

        u = \\begin{cases}
        \\text{Adam's } u \\cdot r, \\;
        r = \\sqrt{\\frac{(\\rho-4)(\\rho-2)\\rho_\\infty}
                        {(\\rho_\\infty-4)(\\rho_\\infty-2)\\rho}} & \\rho > 4 \\\\
        \\eta\\, m / (1-\\beta_1^t) & \\text{otherwise (no ε)}
        \\end{cases}

    Parameters
    ----------
    eta, beta, epsilon
        As :class:`Adam`. With β2 = 0.999 the first four steps take the
        momentum branch.

    References
    ----------
    - Liu et al., *On the variance of the adaptive learning rate and beyond*,
      [arXiv:1908.03265](https://arxiv.org/abs/1908.03265).
    - Optimisers.jl, ``src/rules.jl`` (``RAdam``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> RAdamState:
        return RAdamState(*_init_adam(self, x, xp), 1)

    def apply(
        self, state: RAdamState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[RAdamState, Any]:
        (eta,) = hyper(xp, x, self.eta)
        b1, b2, m, v = _moments(xp, x, self, state, dx)
        bt1, bt2 = state.beta_t
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - ((2 * state.t) * bt2) / (1 - bt2)
        if rho > 4:
            num = ((rho - 4) * (rho - 2)) * rho_inf
            r = _host_sqrt(num / (((rho_inf - 4) * (rho_inf - 2)) * rho))
            d = _adam_direction(xp, m, v, state.beta_t, eps(xp, x, self.epsilon))
            step = xp.multiply(xp.multiply(d, eta), r)
        else:
            step = xp.multiply(xp.divide(m, 1 - bt1), eta)
        return RAdamState(m, v, (bt1 * b1, bt2 * b2), state.t + 1), step


def _host_sqrt(value: Any) -> Any:
    """Correctly rounded square root of a host numpy scalar, in its dtype."""
    import numpy as np

    return np.sqrt(value)


@dataclass(frozen=True)
class NAdam(Rule):
    """Nesterov-accelerated Adam, in Dozat's form as written by Optimisers.jl.

    .. math::

        u = \\frac{\\beta_1 m/(1-\\beta_1\\beta_1^t) + (1-\\beta_1) g/(1-\\beta_1^t)}
                 {\\sqrt{v\\,\\beta_2/(1-\\beta_2^t)} + \\epsilon}\\,\\eta

    with ``m`` and ``v`` updated as in :class:`Adam`.

    Notes
    -----
    Optimisers.jl's quirk, kept on purpose: ``v`` is multiplied by an extra
    β2 inside the square root.

    References
    ----------
    - Dozat, *Incorporating Nesterov momentum into Adam* (ICLR workshop 2016).
    - Optimisers.jl, ``src/rules.jl`` (``NAdam``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AdamState:
        return _init_adam(self, x, xp)

    def apply(
        self, state: AdamState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdamState, Any]:
        (eta,) = hyper(xp, x, self.eta)
        b1, b2, m, v = _moments(xp, x, self, state, dx)
        bt1, bt2 = state.beta_t
        a = xp.divide(xp.multiply(b1, m), 1 - b1 * bt1)
        b = xp.divide(xp.multiply(1 - b1, dx), 1 - bt1)
        d = xp.add(
            xp.sqrt(xp.divide(xp.multiply(v, b2), 1 - bt2)), eps(xp, x, self.epsilon)
        )
        step = xp.multiply(xp.divide(xp.add(a, b), d), eta)
        return AdamState(m, v, (bt1 * b1, bt2 * b2)), step


class OAdamState(NamedTuple):
    """Adam's state plus the previous optimistic ``term``."""

    m: Any
    v: Any
    beta_t: tuple[Any, Any]
    term: Any


@dataclass(frozen=True)
class OAdam(Rule):
    """Optimistic Adam, for adversarial training.

    .. math::

        \\tau \\leftarrow \\frac{\\eta\\, m / (1-\\beta_1^t)}
                               {\\sqrt{v/(1-\\beta_2^t)} + \\epsilon}, \\qquad
        u = 2\\tau - \\tau_\\text{prev}

    Notes
    -----
    Default β is (0.5, 0.9). Unlike :class:`Adam`, η multiplies *first*
    (Optimisers.jl's placement, kept on purpose).

    References
    ----------
    - Daskalakis et al., *Training GANs with optimism*,
      [arXiv:1711.00141](https://arxiv.org/abs/1711.00141).
    - Optimisers.jl, ``src/rules.jl`` (``OAdam``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter((0.5, 0.9), DECAY, precision="below_one")
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> OAdamState:
        return OAdamState(*_init_adam(self, x, xp), xp.zeros_like(x))

    def apply(
        self, state: OAdamState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[OAdamState, Any]:
        (eta,) = hyper(xp, x, self.eta)
        b1, b2, m, v = _moments(xp, x, self, state, dx)
        bt1, bt2 = state.beta_t
        den = xp.add(xp.sqrt(xp.divide(v, 1 - bt2)), eps(xp, x, self.epsilon))
        term = xp.divide(xp.divide(xp.multiply(eta, m), 1 - bt1), den)
        step = xp.subtract(xp.multiply(2, term), state.term)
        return OAdamState(m, v, (bt1 * b1, bt2 * b2), term), step


class AdaMaxState(NamedTuple):
    """First moment ``m``, infinity-norm ``u`` and powers ``beta_t``."""

    m: Any
    u: Any
    beta_t: tuple[Any, Any]


@dataclass(frozen=True)
class AdaMax(Rule):
    """AdaMax, the infinity-norm variant of Adam (real parameters only).

    .. math::

        u_\\infty \\leftarrow \\max(\\beta_2 u_\\infty, |g|), \\qquad
        u = \\frac{(\\eta/(1-\\beta_1^t))\\, m}{u_\\infty + \\epsilon}

    with ``m`` as in :class:`Adam`; β2's power is tracked but unused.

    References
    ----------
    - Kingma and Ba, *Adam: a method for stochastic optimization*,
      [arXiv:1412.6980](https://arxiv.org/abs/1412.6980).
    - Optimisers.jl, ``src/rules.jl`` (``AdaMax``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AdaMaxState:
        return AdaMaxState(*_init_adam(self, x, xp))

    def apply(
        self, state: AdaMaxState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdaMaxState, Any]:
        eta, b1, b2 = hyper(xp, x, self.eta, *self.beta)
        m = ema(xp, b1, state.m, dx)
        u = xp.maximum(xp.multiply(b2, state.u), xp.abs(dx))
        bt1, bt2 = state.beta_t
        num = xp.multiply(eta / (1 - bt1), m)
        step = xp.divide(num, xp.add(u, eps(xp, x, self.epsilon)))
        return AdaMaxState(m, u, (bt1 * b1, bt2 * b2)), step


class AMSGradState(NamedTuple):
    """Moments ``m``, ``v`` and the running maximum ``v_hat``."""

    m: Any
    v: Any
    v_hat: Any


@dataclass(frozen=True)
class AMSGrad(Rule):
    """AMSGrad: Adam with a non-decreasing second moment (real parameters only).

    .. math::

        \\hat v \\leftarrow \\max(\\hat v, v), \\qquad
        u = \\frac{\\eta\\, m}{\\sqrt{\\hat v} + \\epsilon}

    with ``m``, ``v`` as in :class:`Adam`.

    Notes
    -----
    Optimisers.jl's quirks, kept on purpose: there is no bias correction, and
    all three states start filled with the raw ``epsilon`` rounded to the
    parameter dtype (no float16 floor, so 1e-8 becomes 0 in float16).

    References
    ----------
    - Reddi, Kale and Kumar, *On the convergence of Adam and beyond*,
      [arXiv:1904.09237](https://arxiv.org/abs/1904.09237).
    - Optimisers.jl, ``src/rules.jl`` (``AMSGrad``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-8, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AMSGradState:
        (e,) = hyper(xp, x, self.epsilon)
        return AMSGradState(
            xp.full_like(x, e),
            xp.full_like(x, e, real=True),
            xp.full_like(x, e, real=True),
        )

    def apply(
        self, state: AMSGradState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AMSGradState, Any]:
        (eta,) = hyper(xp, x, self.eta)
        _, _, m, v = _moments(xp, x, self, state, dx)
        v_hat = xp.maximum(state.v_hat, v)
        den = xp.add(xp.sqrt(v_hat), eps(xp, x, self.epsilon))
        return AMSGradState(m, v, v_hat), xp.divide(xp.multiply(eta, m), den)


class AdaBeliefState(NamedTuple):
    """First moment ``m``, belief ``s`` and powers ``beta_t``."""

    m: Any
    s: Any
    beta_t: tuple[Any, Any]


@dataclass(frozen=True)
class AdaBelief(Rule):
    """AdaBelief: Adam whose second moment tracks the gradient's surprise.

    .. math::

        s &\\leftarrow (\\beta_2 s + (1-\\beta_2)\\,|g - m|^2) + \\epsilon \\\\
        u &= \\frac{\\eta\\, m/(1-\\beta_1^t)}{\\sqrt{s/(1-\\beta_2^t)} + \\epsilon}

    with ``m`` updated first, as in :class:`Adam`, and used new in ``s``.
    The default ε is 1e-16 (1.19e-7 in float16).

    References
    ----------
    - Zhuang et al., *AdaBelief optimizer*,
      [arXiv:2010.07468](https://arxiv.org/abs/2010.07468).
    - Optimisers.jl, ``src/rules.jl`` (``AdaBelief``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    beta: tuple[float, float] = hyperparameter(
        (0.9, 0.999), DECAY, precision="below_one"
    )
    epsilon: float = hyperparameter(1e-16, NONNEGATIVE)

    def init(self, x: Any, xp: RuleNamespace) -> AdaBeliefState:
        return AdaBeliefState(*_init_adam(self, x, xp))

    def apply(
        self, state: AdaBeliefState, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[AdaBeliefState, Any]:
        eta, b1, b2 = hyper(xp, x, self.eta, *self.beta)
        e = eps(xp, x, self.epsilon)
        m = ema(xp, b1, state.m, dx)
        s = xp.add(ema(xp, b2, state.s, xp.abs2(xp.subtract(dx, m))), e)
        bt1, bt2 = state.beta_t
        den = xp.add(xp.sqrt(xp.divide(s, 1 - bt2)), e)
        step = xp.divide(xp.divide(xp.multiply(eta, m), 1 - bt1), den)
        return AdaBeliefState(m, s, (bt1 * b1, bt2 * b2)), step
