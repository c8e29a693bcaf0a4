"""``agnosticopt demo``: train one small model on every backend, get the same bits.

A two-layer perceptron (8 inputs, 32 ReLU units, 1 output) fits a synthetic
regression set of 256 samples with one rule chain, on each installed backend.
The forward and backward passes are written with the adapter's elementwise
operations (the array API, made exact), so every backend computes the same
gradients, and the optimiser then takes the same steps.

Matrix products are *not* used: ``matmul`` and ``sum`` are not bit-identical
across backends (each BLAS and each reduction kernel adds in its own order and
may use FMAs). Every product here is a broadcast elementwise multiply, and
every sum (over samples, over inputs, over hidden units) is a fixed pairwise
tree of elementwise adds, halving the summed axis until one slice is left.
That is slower than ``matmul`` and gives the same bits everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend
from agnosticopt.conformance._compare import hexfloat
from agnosticopt.conformance._data import bit_values
from agnosticopt.conformance._progress import Progress
from agnosticopt.conformance._table import format_table

import agnosticopt as opt

__all__ = ["DEFAULT_RULE", "DemoResult", "make_problem", "train"]

SAMPLES, INPUTS, HIDDEN = 256, 8, 32  # powers of two: the pairwise sums need no padding

#: The demo's default rule chain.
DEFAULT_RULE = opt.OptimiserChain(
    opt.WeightDecay(1e-4), opt.ClipNorm(1.0), opt.Adam(0.01)
)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """One backend's run: first and final loss, and the parameters' digest."""

    backend: str
    first_loss: float
    final_loss: float
    digest: str


def make_problem(dtype: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``(parameters, inputs, targets)`` as numpy arrays, built from bits.

    The targets are ``x0*x1 - x2 + |x3| * x4``, computed in ``dtype`` with
    single correctly rounded numpy operations.
    """
    x = bit_values(dtype, SAMPLES * INPUTS, "demo-x", (-2, 0)).reshape(SAMPLES, INPUTS)
    y = x[:, 0] * x[:, 1] - x[:, 2] + np.abs(x[:, 3]) * x[:, 4]
    params = {
        "w1": bit_values(dtype, INPUTS * HIDDEN, "demo-w1", (-4, -2)).reshape(
            INPUTS, HIDDEN
        ),
        "b1": np.zeros(HIDDEN, dtype=dtype),
        "w2": bit_values(dtype, HIDDEN, "demo-w2", (-5, -3)).reshape(HIDDEN, 1),
        "b2": np.zeros(1, dtype=dtype),
    }
    return params, x, y.reshape(SAMPLES, 1).astype(dtype)


def tree_sum(xp: Any, a: Any, axis: int) -> Any:
    """Sum over ``axis`` (a power-of-two length) by halving; the axis is dropped."""
    length = a.shape[axis]
    lead = (slice(None),) * axis
    while length > 1:
        length //= 2
        first, second = slice(0, length), slice(length, 2 * length)
        a = xp.add(a[(*lead, first, ...)], a[(*lead, second, ...)])
    return a[(*lead, 0, ...)]


def loss_and_grads(
    params: dict[str, Any], x: Any, y: Any
) -> tuple[Any, dict[str, Any]]:
    """Mean squared error of the perceptron and its gradient, exactly.

    Returns the loss as a one-element array and the gradients by name.
    """
    xp = opt.adapter_for(params["w1"])
    ns = xp.xp  # the array-API namespace: reshapes only
    n, d = x.shape
    h = params["w1"].shape[1]
    # z1[n, j] = sum_i x[n, i] w1[i, j] + b1[j]
    products = xp.multiply(
        ns.reshape(x, (n, d, 1)), ns.reshape(params["w1"], (1, d, h))
    )
    z1 = xp.add(tree_sum(xp, products, 1), ns.reshape(params["b1"], (1, h)))
    active = xp.greater(z1, 0)
    a1 = xp.where(active, z1, xp.zeros_like(z1))
    # yhat[n] = sum_j a1[n, j] w2[j] + b2
    yhat = xp.add(
        tree_sum(xp, xp.multiply(a1, ns.reshape(params["w2"], (1, h))), 1), params["b2"]
    )
    r = xp.subtract(ns.reshape(yhat, (n, 1)), y)
    t = xp.scalar_type(r)
    loss = xp.divide(tree_sum(xp, xp.multiply(r, r), 0), t(n))
    scale = t(2.0 / n)  # exact: n is a power of two
    dy = xp.multiply(r, scale)  # d loss / d yhat, shape (n, 1)
    da1 = xp.multiply(dy, ns.reshape(params["w2"], (1, h)))
    dz1 = xp.where(active, da1, xp.zeros_like(da1))
    grads = {
        "w1": tree_sum(
            xp, xp.multiply(ns.reshape(x, (n, d, 1)), ns.reshape(dz1, (n, 1, h))), 0
        ),
        "b1": tree_sum(xp, dz1, 0),
        "w2": ns.reshape(tree_sum(xp, xp.multiply(a1, dy), 0), (h, 1)),
        "b2": tree_sum(xp, dy, 0),
    }
    return loss, grads


def digest(backend: Backend, params: dict[str, Any]) -> str:
    """sha256 of the parameters' names, dtypes, shapes and bytes (16 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(backend.to_numpy(params[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def train(
    backend: Backend,
    rule: opt.Rule,
    *,
    steps: int,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> DemoResult:
    """Train the perceptron on ``backend`` for ``steps`` updates of ``rule``."""
    start, xs, ys = make_problem(dtype)
    params = {k: backend.asarray(v) for k, v in start.items()}
    x, y = backend.asarray(xs), backend.asarray(ys)
    tree = opt.setup(rule, params)
    first = float("nan")
    for step in range(steps):
        loss, grads = loss_and_grads(params, x, y)
        if step == 0:  # the loss is copied to the host only here and at the end
            first = float(backend.to_numpy(loss).reshape(-1)[0])
        tree, params = opt.update_(tree, params, grads)
        if progress is not None:
            progress.advance()
    loss, _ = loss_and_grads(params, x, y)
    final = float(backend.to_numpy(loss).reshape(-1)[0])
    return DemoResult(backend.name, first, final, digest(backend, params))


def render_demo(
    results: Sequence[DemoResult],
    *,
    rule: opt.Rule,
    steps: int,
    dtype: str,
    unavailable: dict[str, str],
) -> str:
    """The per-backend table and the verdict."""
    t = np.dtype(dtype).type
    rows = [
        [
            r.backend,
            f"{r.first_loss:.6g}",
            f"{t(r.final_loss)!s} ({hexfloat(t(r.final_loss))})",
            r.digest,
        ]
        for r in results
    ]
    out = [
        (
            f"2-layer perceptron ({INPUTS} -> {HIDDEN} ReLU -> 1), {SAMPLES} samples, {dtype}, "
            f"{steps} steps of"
        ),
        f"  {rule!r}",
        "",
        format_table(
            ["backend", "first loss", "final loss", "parameters sha256"], rows
        ),
        "",
    ]
    if unavailable:
        out.append(
            "not available: " + "; ".join(f"{n} ({w})" for n, w in unavailable.items())
        )
    digests = {r.digest for r in results}
    if len(digests) == 1:
        out.append(f"same bits on all {len(results)} backends.")
    else:
        out.append(
            f"DIFFERENT bits: {len(digests)} distinct digests on {len(results)} backends."
        )
    return "\n".join(out)
