"""Regularisers that add to the gradient: WeightDecay (L2) and SignDecay (L1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import NONNEGATIVE, Rule, hyper, hyperparameter

__all__ = ["SignDecay", "WeightDecay"]


@dataclass(frozen=True)
class WeightDecay(Rule):
    """L2 regularisation: adds ``λ x`` to the gradient.

    .. math:: u = g + \\lambda x

    Equivalent to adding :math:`\\tfrac{\\lambda}{2}\\lVert x\\rVert^2` to the
    loss. Put it *before* the main rule in an :class:`OptimiserChain`.

    Parameters
    ----------
    lambda_
        Penalty (λ; Julia's ``lambda``).

    References
    ----------
    - Krogh and Hertz, *A simple weight decay can improve generalization* (NIPS
      1991).
    - Optimisers.jl, ``src/rules.jl`` (``WeightDecay``).
    """

    lambda_: float = hyperparameter(5e-4, NONNEGATIVE, precision="nonzero")

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(
        self, state: None, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[None, Any]:
        (lam,) = hyper(xp, x, self.lambda_)
        return None, xp.add(dx, xp.multiply(lam, x))


@dataclass(frozen=True)
class SignDecay(Rule):
    """L1 regularisation: adds ``λ sign(x)`` to the gradient (real parameters).

    .. math:: u = g + \\lambda \\operatorname{sign}(x)

    Equivalent to adding :math:`\\lambda\\lVert x\\rVert_1` to the loss; with
    :class:`WeightDecay`, ``OptimiserChain(SignDecay(0.012), WeightDecay(0.034),
    Adam())`` adds ``0.012‖x‖₁ + 0.017‖x‖²``.

    Parameters
    ----------
    lambda_
        Penalty (λ; Julia's ``lambda``).

    References
    ----------
    - Optimisers.jl, ``src/rules.jl`` (``SignDecay``).
    """

    lambda_: float = hyperparameter(1e-3, NONNEGATIVE, precision="nonzero")

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(
        self, state: None, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[None, Any]:
        (lam,) = hyper(xp, x, self.lambda_)
        return None, xp.add(dx, xp.multiply(lam, xp.sign(x)))
