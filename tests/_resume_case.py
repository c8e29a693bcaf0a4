"""The cross-backend resume case of ``test_checkpoint.py``, shared with its subprocesses.

Several rules over more than 100k values: Adam, a chain with ClipNorm, AccumGrad
(saved mid-cycle), RAdam (a host step counter) and MixedPrecision on float16
parameters. The data keeps away from subnormals, so that JAX (which flushes
them on CPU, a named deviation of its adapter) must give the same bits too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import agnosticopt as opt

#: Steps before the save, and in all.
K, N = 5, 9

SHAPES = {
    "adam": ((300, 400), "float32"),
    "chain": ((200, 300), "float32"),
    "acc": ((50_000,), "float64"),
    "radam": ((2_000,), "float32"),
    "mixed": ((300, 400), "float16"),
}


def case() -> tuple[dict[str, Any], dict[str, Any]]:
    """The rules and the initial (numpy) model, by parameter name."""
    rules = {
        "adam": opt.Adam(1e-3),
        "chain": opt.OptimiserChain(
            opt.WeightDecay(1e-2), opt.ClipNorm(50.0), opt.Adam(1e-2)
        ),
        "acc": opt.OptimiserChain(opt.AccumGrad(3), opt.Momentum(1e-2, 0.9)),
        "radam": opt.RAdam(1e-3),
        "mixed": opt.MixedPrecision(
            opt.OptimiserChain(opt.ClipNorm(100.0), opt.AdamW(1e-3))
        ),
    }
    rng = np.random.default_rng(7)
    model = {
        k: _away_from_zero(rng, shape, dtype) for k, (shape, dtype) in SHAPES.items()
    }
    return rules, model


def _away_from_zero(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: str
) -> Any:
    magnitude = 0.5 + np.abs(rng.standard_normal(shape))
    return (np.sign(rng.standard_normal(shape)) * magnitude).astype(dtype)


def grads_at(step: int) -> dict[str, Any]:
    """The gradients of step ``step`` (numpy)."""
    rng = np.random.default_rng(100 + step)
    return {
        k: _away_from_zero(rng, shape, dtype) for k, (shape, dtype) in SHAPES.items()
    }


def bits(tree: Any, model: Any) -> dict[str, np.ndarray]:
    """Parameters and every state entry (host scalars as 0-d arrays), as numpy."""
    from agnosticopt._checkpoint import leaf_entries

    out = {}
    for name, x in model.items():
        out[f"param.{name}"] = opt.adapter_for(x).to_numpy(x)
        for entry, value in leaf_entries(tree[name], raw=True).items():
            if entry in ("rule", "frozen"):
                continue
            xp = opt.adapter_for(value)
            out[f"{name}/{entry}"] = (
                xp.to_numpy(value) if xp is not None else np.asarray(value)
            )
    return out


def has_subnormals(a: np.ndarray) -> bool:
    """Whether a floating-point array holds a subnormal value."""
    if a.dtype.kind not in "fc":
        return False
    real = a.real if a.dtype.kind == "c" else a
    tiny = np.finfo(real.dtype).tiny
    return bool(np.any((real != 0) & (np.abs(real) < tiny)))


def resume(backend: str, path: str) -> dict[str, np.ndarray]:
    """Load the step-K files onto ``backend``, take the remaining steps, return the bits."""
    from safetensors.numpy import load_file

    model: dict[str, Any] = load_file(path + ".params")  # the parameters at step K
    convert: Any = np.asarray
    if backend == "torch":
        import torch

        convert = torch.tensor
    elif backend == "jax":
        import jax.numpy as jnp

        convert = jnp.asarray
    model = {k: convert(v) for k, v in model.items()}
    tree = opt.load(path, like=model)
    for i in range(K, N):
        grads = {k: convert(v) for k, v in grads_at(i).items()}
        tree, model = opt.update_(tree, model, grads)
    return bits(tree, model)
