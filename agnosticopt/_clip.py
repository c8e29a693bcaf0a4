"""Gradient clipping: ClipGrad (per element) and ClipNorm (per array)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from agnosticopt._norm import combine_nodes, finish_norm, norm_at, norm_nodes
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import NONNEGATIVE_OR_INF, Range, Rule, hyper, hyperparameter

__all__ = ["ClipGrad", "ClipNorm"]

_TREE_NORMS = (2, 1, math.inf, -math.inf)


@dataclass(frozen=True)
class ClipGrad(Rule):
    """Clamp every gradient element to ``[-δ, δ]`` (real parameters only).

    .. math:: u = \\operatorname{clamp}(g, -\\delta, \\delta)

    NaN passes through, as Julia's ``clamp`` does.

    Parameters
    ----------
    delta
        Bound (δ).

    References
    ----------
    - Optimisers.jl, ``src/rules.jl`` (``ClipGrad``).
    """

    delta: float = hyperparameter(10.0, NONNEGATIVE_OR_INF)

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(
        self, state: None, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[None, Any]:
        (delta,) = hyper(xp, x, self.delta)
        return None, xp.clip(dx, -delta, delta)


@dataclass(frozen=True)
class ClipNorm(Rule):
    """Rescale each gradient array whose p-norm exceeds ω down to ω.

    .. math::

        u = g \\cdot \\lambda, \\qquad
        \\lambda = T\\!\\left(\\min\\!\\left(\\omega / \\lVert g\\rVert_p,\\, 1\\right)\\right)

    where ω/‖g‖ is evaluated in float64 and only λ is rounded to the
    parameter dtype ``T``, as in Optimisers.jl.

    Parameters
    ----------
    omega
        Largest allowed norm (ω).
    p
        Which norm; see :func:`agnosticopt.norm` (2, 1, ±inf and 0 are exact and
        identical on every backend; ``p = 0`` counts non-zeros, so it only
        rescales when more than ω elements are non-zero).
    throw
        Keyword only. Raise ``FloatingPointError`` when the norm is NaN or
        infinite; with ``throw=False`` an infinite norm gives λ = 0 and its
        infinite entries become NaN.

    Notes
    -----
    The norm is **per array**, not global over the model (torch's
    ``clip_grad_norm_`` and optax's ``clip_by_global_norm`` are global). The
    norm is read back to the host, one synchronisation per array.
    On DTensor local shards the tree nodes of every ClipNorm leaf of an update
    are exchanged in one all-gather (``agnosticopt._global.ShardNorms``).

    References
    ----------
    - Pascanu, Mikolov and Bengio, *On the difficulty of training recurrent neural
      networks*, [arXiv:1211.5063](https://arxiv.org/abs/1211.5063).
    - Optimisers.jl, ``src/rules.jl`` (``ClipNorm``).
    """

    omega: float = hyperparameter(10.0, NONNEGATIVE_OR_INF)
    p: float = hyperparameter(2.0, Range(0, math.inf, also=(-math.inf,)))
    throw: bool = field(default=True, kw_only=True)

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(
        self, state: None, x: Any, dx: Any, xp: RuleNamespace
    ) -> tuple[None, Any]:
        if (
            getattr(xp, "lazy_clip", False)
            and self.p in _TREE_NORMS
            and xp.size(dx) > 0
        ):
            return None, xp.multiply(
                dx, xp.clip_factor(self, self.device_norm(dx, xp), x)
            )
        return None, xp.multiply(dx, self.factor(norm_at(x, dx, self.p), x, xp))

    def device_norm(self, dx: Any, xp: RuleNamespace) -> Any:
        """The norm of ``dx`` as a one-element array of its backend (no host sync).

        The bits of :func:`agnosticopt.norm`; used by adapters that keep λ on
        the device (``lazy_clip``: JAX under ``jit``, dask), whose
        ``clip_factor(rule, norm, x)`` then computes λ as :meth:`factor` does.
        """
        nodes, combine = norm_nodes(xp, dx, self.p, 0)
        return finish_norm(xp, combine_nodes(nodes, xp.size(dx), combine), self.p)

    def factor(self, n: Any, x: Any, xp: Any) -> Any:
        """λ from the norm ``n`` (a host scalar), as a host scalar of ``x``'s real dtype.

        Raises ``FloatingPointError`` for a non-finite ``n`` when ``throw``.
        ``xp`` is a :class:`~agnosticopt._protocols.RuleNamespace`, or the fast
        path's stand-in that has only ``scalar_type`` (it never passes a
        non-finite ``n``).
        """
        if self.throw and not math.isfinite(n):
            msg = (
                f"gradient has {self.p}-norm {n}, for an array of shape "
                f"{xp.shape(x)} and dtype {xp.dtype_name(x)}"
            )
            raise FloatingPointError(msg)
        ratio = self.omega / float(n) if n != 0 else math.inf
        (lam,) = hyper(xp, x, min(ratio, 1.0))
        return lam
