"""Gradient descent with and without momentum: Descent, Momentum, Nesterov."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import DECAY, NONNEGATIVE, Rule, hyper, hyperparameter

__all__ = ["Descent", "Momentum", "Nesterov"]


@dataclass(frozen=True)
class Descent(Rule):
    """Classic gradient descent.

    .. math:: x \\leftarrow x - \\eta\\, g

    Parameters
    ----------
    eta
        Learning rate (η).

    Notes
    -----
    Optimisers.jl's default is the Float32 ``0.1f0``; here it is the Python
    float ``0.1``, so on float64 parameters the step uses ``0.1`` exactly rather
    than ``0.10000000149011612``. Unlike Optimisers.jl, a negative ``eta``
    raises ``ValueError`` as for every other rule.

    References
    ----------
    - Optimisers.jl, ``src/rules.jl`` (``Descent``).
    """

    eta: float = hyperparameter(0.1, NONNEGATIVE, precision="nonzero")

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(
        self, state: None, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[None, Any]:
        (eta,) = hyper(xp, x, self.eta)
        return None, xp.multiply(dx, eta)


@dataclass(frozen=True)
class Momentum(Rule):
    """Gradient descent with momentum; η sits inside the velocity.

    .. math::

        v \\leftarrow \\rho\\, v + \\eta\\, g, \\qquad x \\leftarrow x - v

    Parameters
    ----------
    eta
        Learning rate (η).
    rho
        Momentum (ρ).

    Notes
    -----
    The state is the velocity ``v``. Since η multiplies each new gradient,
    adjusting η affects only later contributions (torch.optim.SGD multiplies
    the whole buffer by the learning rate instead).

    References
    ----------
    - Polyak, *Some methods of speeding up the convergence of iteration methods*
      (1964).
    - Optimisers.jl, ``src/rules.jl`` (``Momentum``).
    """

    eta: float = hyperparameter(0.01, NONNEGATIVE, precision="nonzero")
    rho: float = hyperparameter(0.9, DECAY, precision="below_one")

    def init(self, x: Any, xp: RuleNamespace) -> Any:
        return xp.zeros_like(x)

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        eta, rho = hyper(xp, x, self.eta, self.rho)
        v = xp.add(xp.multiply(rho, state), xp.multiply(eta, dx))
        return v, v


@dataclass(frozen=True)
class Nesterov(Rule):
    """Gradient descent with Nesterov momentum.

    .. math::

        u = -\\rho^2\\, v + (1 + \\rho)\\,\\eta\\, g, \\qquad
        v \\leftarrow \\rho\\, v - \\eta\\, g, \\qquad x \\leftarrow x - u

    Parameters
    ----------
    eta
        Learning rate (η); the default is 10× smaller than Momentum's.
    rho
        Momentum (ρ).

    Notes
    -----
    As in Optimisers.jl the state stores a *negative* velocity: after a first
    gradient ``[16, 88]`` with the defaults it is ``[-0.016, -0.088]``.

    References
    ----------
    - Nesterov (1983); in the deep-learning form of Sutskever et al., *On the
      importance of initialization and momentum in deep learning* (ICML 2013).
    - Optimisers.jl, ``src/rules.jl`` (``Nesterov``).
    """

    eta: float = hyperparameter(0.001, NONNEGATIVE, precision="nonzero")
    rho: float = hyperparameter(0.9, DECAY, precision="below_one")

    def init(self, x: Any, xp: RuleNamespace) -> Any:
        return xp.zeros_like(x)

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        eta, rho = hyper(xp, x, self.eta, self.rho)
        step = xp.add(
            xp.multiply(-(rho * rho), state), xp.multiply((1 + rho) * eta, dx)
        )
        v = xp.subtract(xp.multiply(rho, state), xp.multiply(eta, dx))
        return v, step
