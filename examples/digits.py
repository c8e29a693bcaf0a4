"""Train one MLP on scikit-learn's digits with the same rule on numpy, torch and JAX.

    python examples/digits.py [--out digits_loss.png] [--epochs 3]

The rule: a warmup + cosine schedule of η over AdamW, global-norm gradient
clipping in front, no weight decay on biases (a per-path rule), trained with
``opt.train_``.

* numpy takes hand-written gradients (numpy has no autodiff);
* torch takes autograd's gradients, JAX ``jax.grad``'s;
* torch and JAX once more, fed the numpy gradients.

Autograd's and ``jax.grad``'s gradients differ from the hand-written ones in the
last bits (other operation orders), so those runs are close, not identical. Fed
the same gradients, every backend gives bit-identical parameters: that is what
agnosticopt promises, and what this script checks and prints.

Needs scikit-learn; torch, JAX and matplotlib (the PNG plot) when installed.
Everything is float64 (JAX's 64-bit mode is switched on below).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

import agnosticopt as opt

HIDDEN = 32
BATCH = 128


def make_rule(steps: int) -> Any:
    """The same rule for every backend: one per path (biases: no weight decay)."""
    eta = opt.schedules.warmup_cosine(
        peak=1e-2, warmup=steps // 10, steps=steps, end=1e-4
    )

    def rule(lambda_: float) -> opt.Rule:
        # ClipGlobalNorm: the norm of all gradients together (torch's clip_grad_norm_);
        # the two rules below hold the same clip, so it reduces over the whole model;
        # 0.5: the first steps' norms are about 0.6, so it clips them
        return opt.Scheduled(
            opt.OptimiserChain(
                opt.ClipGlobalNorm(0.5), opt.AdamW(1e-2, lambda_=lambda_)
            ),
            eta=eta,
        )

    return opt.by_path({"*.b": rule(0.0), "*": rule(1e-3)})


def numpy_model(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "hidden": {"w": rng.standard_normal((64, HIDDEN)) / 8, "b": np.zeros(HIDDEN)},
        "out": {
            "w": rng.standard_normal((HIDDEN, 10)) / np.sqrt(HIDDEN),
            "b": np.zeros(10),
        },
    }


def batches(
    epochs: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    digits = load_digits()
    x = digits.data / 16.0
    y = np.eye(10)[digits.target]
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    data = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    return data * epochs, x, y


# -- numpy: the loss and its hand-written gradient ---------------------------------------


def numpy_value_and_grad(m: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, Any]:
    h = np.tanh(x @ m["hidden"]["w"] + m["hidden"]["b"])
    z = h @ m["out"]["w"] + m["out"]["b"]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.mean(np.sum(y * np.log(p), axis=1))
    dz = (p - y) / len(x)
    dh = (dz @ m["out"]["w"].T) * (1 - h * h)
    grads = {
        "hidden": {"w": x.T @ dh, "b": dh.sum(0)},
        "out": {"w": h.T @ dz, "b": dz.sum(0)},
    }
    return float(loss), grads


def run_numpy(data: list[Any], steps: int) -> tuple[Any, list[float]]:
    model = numpy_model()
    history = opt.train_(
        None,
        model,
        data,
        opt.setup(make_rule(steps), model),
        value_and_grad=numpy_value_and_grad,
    )
    return model, history.loss


def fed_numpy_gradients(
    to_numpy: Callable[[Any], np.ndarray], convert: Callable[[np.ndarray], Any]
) -> Callable[..., Any]:
    """A ``value_and_grad`` giving the numpy gradients of a model of another backend."""

    def value_and_grad(m: Any, x: Any, y: Any) -> tuple[float, Any]:
        host = {k: {n: to_numpy(a) for n, a in layer.items()} for k, layer in m.items()}
        loss, grads = numpy_value_and_grad(host, to_numpy(x), to_numpy(y))
        return loss, {
            k: {n: convert(g) for n, g in layer.items()} for k, layer in grads.items()
        }

    return value_and_grad


# -- torch and JAX: autodiff ------------------------------------------------------------------


def run_torch(data: list[Any], steps: int, *, fed: bool) -> tuple[Any, list[float]]:
    import torch

    def loss(m: Any, x: Any, y: Any) -> Any:
        h = torch.tanh(x @ m["hidden"]["w"] + m["hidden"]["b"])
        return torch.nn.functional.cross_entropy(h @ m["out"]["w"] + m["out"]["b"], y)

    model = {
        k: {n: torch.from_numpy(a.copy()) for n, a in layer.items()}
        for k, layer in numpy_model().items()
    }
    tdata = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    vg = fed_numpy_gradients(lambda t: t.numpy(), torch.from_numpy) if fed else None
    history = opt.train_(
        loss, model, tdata, opt.setup(make_rule(steps), model), value_and_grad=vg
    )
    return {
        k: {n: t.numpy() for n, t in layer.items()} for k, layer in model.items()
    }, history.loss


def run_jax(data: list[Any], steps: int, *, fed: bool) -> tuple[Any, list[float]]:
    import jax
    import jax.numpy as jnp

    def loss(m: Any, x: Any, y: Any) -> Any:
        h = jnp.tanh(x @ m["hidden"]["w"] + m["hidden"]["b"])
        z = h @ m["out"]["w"] + m["out"]["b"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), axis=1))

    # not jax.tree_util.tree_map: it sorts dict keys, so the leaves would come in
    # another order, and the global norm (a sum in tree order) would round differently
    model = {
        k: {n: jnp.asarray(a) for n, a in layer.items()}
        for k, layer in numpy_model().items()
    }
    jdata = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data]
    vg = fed_numpy_gradients(np.asarray, jnp.asarray) if fed else None
    history = opt.train_(
        loss, model, jdata, opt.setup(make_rule(steps), model), value_and_grad=vg
    )
    return (
        {
            k: {n: np.asarray(a) for n, a in layer.items()}
            for k, layer in history.model.items()
        },
        history.loss,
    )


# -- comparing and plotting ------------------------------------------------------------------


def leaves(m: Any) -> list[np.ndarray]:
    return [np.asarray(m[k][n]) for k in ("hidden", "out") for n in ("w", "b")]


def identical(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(x.view(np.uint64), y.view(np.uint64))
        for x, y in zip(leaves(a), leaves(b), strict=True)
    )


def largest_difference(a: Any, b: Any) -> float:
    return max(
        float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b), strict=True)
    )


def accuracy(m: Any, x: np.ndarray, y: np.ndarray) -> float:
    h = np.tanh(x @ m["hidden"]["w"] + m["hidden"]["b"])
    return float(
        np.mean(np.argmax(h @ m["out"]["w"] + m["out"]["b"], 1) == np.argmax(y, 1))
    )


def plot(curves: dict[str, list[float]], path: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (pip install 'agnosticopt[plot]')")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (name, loss), style in zip(curves.items(), ("-", "--", ":"), strict=False):
        ax.plot(range(1, len(loss) + 1), loss, style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title("digits: one rule on three backends (agnosticopt.train_)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curves: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_loss.png", help="the PNG plot")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_ENABLE_X64", "1")  # before JAX is imported: float64
    data, x, y = batches(args.epochs)
    steps = len(data)
    ref, ref_loss = run_numpy(data, steps)
    print(
        f"numpy (hand-written gradients): {steps} steps, loss {ref_loss[0]:.4f} -> "
        f"{ref_loss[-1]:.4f}, accuracy {accuracy(ref, x, y):.3f}"
    )
    curves = {"numpy (hand-written)": ref_loss}
    failed = False
    for name, run, spec in (("torch", run_torch, "torch"), ("JAX", run_jax, "jax")):
        if importlib.util.find_spec(spec) is None:
            print(f"{name} is not installed: skipped")
            continue
        fed, _ = run(data, steps, fed=True)
        same = identical(fed, ref)
        failed |= not same
        print(
            f"{name}, fed the numpy gradients: parameters "
            f"{'bit-identical to numpy' if same else 'DIFFER from numpy'}"
        )
        auto, loss = run(data, steps, fed=False)
        curves[f"{name} ({'autograd' if spec == 'torch' else 'jax.grad'})"] = loss
        print(
            f"{name}, its own gradients: close to numpy, largest difference "
            f"{largest_difference(auto, ref):.2e} (autodiff rounds differently), "
            f"bit-identical: {identical(auto, ref)}"
        )
    plot(curves, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
