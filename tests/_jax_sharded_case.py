"""Run in a fresh process with 2 forced host devices (``test_jax_sharding.py``).

Checks, on a mesh of 2 CPU devices: sharded (dim 0) and replicated parameters
keep their sharding through ``setup``/``update``, eager and under
``jax.jit``; eager steps and the jitted clips give numpy's bits; a jitted
Adam compiles once for 5 steps; ``jax.eval_shape`` of ``setup`` works; an
explicit-sharding mesh works too. Prints ``ok <checks>`` at the end.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_ENABLE_X64"] = "1"

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import agnosticopt as opt

SHAPE = (302, 457)  # 138,014 elements; 302 rows split evenly over 2 devices
CHECKS = 0


def check(ok: bool, what: str) -> None:
    global CHECKS
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    CHECKS += 1


def bits(a: object) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"uint{a.dtype.itemsize * 8}")


def data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(
        13
    )  # normal values: no subnormals (JAX on CPU flushes them)
    return (
        rng.standard_normal(SHAPE).astype(dtype),
        (3 * rng.standard_normal(SHAPE)).astype(dtype),
    )


def leaves_sharding(
    tree: object, model: dict, sharding: NamedSharding, what: str
) -> None:
    for a in jax.tree_util.tree_leaves((tree, model)):
        if getattr(a, "ndim", 0) == len(SHAPE):
            check(
                a.sharding.is_equivalent_to(sharding, a.ndim), f"{what}: {a.sharding}"
            )


EAGER = {
    "adamw": lambda: opt.AdamW(1e-3, lambda_=1e-2),
    "clipnorm_adam": lambda: opt.OptimiserChain(opt.ClipNorm(5.0), opt.Adam(1e-3)),
    "global_clip_adamw": lambda: opt.OptimiserChain(
        opt.ClipGlobalNorm(10.0), opt.AdamW(1e-3)
    ),
}
#: Clips alone, jitted on zero parameters: x - step is exact whether XLA fuses it or not.
JITTED = {
    "clipnorm": lambda: opt.ClipNorm(50.0, throw=False),
    "clipnorm_l1": lambda: opt.ClipNorm(5e3, 1, throw=False),
    "global_clip": lambda: opt.ClipGlobalNorm(50.0),
    "global_clip_inf": lambda: opt.ClipGlobalNorm(2.0, np.inf),
}


def run(mesh: jax.sharding.Mesh, spec: P, dtype: str) -> None:
    sharding = NamedSharding(mesh, spec)
    w, g = data(dtype)
    put = functools.partial(jax.device_put, device=sharding)
    rep = functools.partial(
        jax.device_put, device=NamedSharding(mesh, P())
    )  # replicated
    for name, make in EAGER.items():
        tree, model = opt.setup(make(), {"w": w, "b": w[0]}), {"w": w, "b": w[0]}
        jt = opt.setup(make(), {"w": put(w), "b": rep(w[0])})
        jm = {"w": put(w), "b": rep(w[0])}
        for _ in range(2):
            tree, model = opt.update(tree, model, {"w": g, "b": g[1]})
            jt, jm = opt.update(jt, jm, {"w": put(g), "b": rep(g[1])})
        leaves_sharding(jt, jm, sharding, f"eager {name} {spec}")
        for key in model:
            check(
                np.array_equal(bits(model[key]), bits(jm[key])),
                f"eager {name} {key} {spec}",
            )
    zeros = np.zeros_like(w)
    for name, make in JITTED.items():
        _, model = opt.update(opt.setup(make(), {"w": zeros}), {"w": zeros}, {"w": g})
        jt = opt.setup(make(), {"w": put(zeros)})
        jt2, jm = jax.jit(opt.update)(jt, {"w": put(zeros)}, {"w": put(g)})
        leaves_sharding(jt2, jm, sharding, f"jit {name} {spec}")
        check(
            np.array_equal(bits(model["w"]), bits(jm["w"])),
            f"jit {name} {spec} {dtype}",
        )
    traces = []

    def step(tree: object, model: dict, grads: dict) -> tuple[object, dict]:
        traces.append(1)
        return opt.update(tree, model, grads)

    jitted = jax.jit(step)
    jt, jm = opt.setup(opt.Adam(1e-3), {"w": put(w)}), {"w": put(w)}
    jt, jm = jitted(jt, jm, {"w": put(g)})  # setup's beta_t are host scalars: one trace
    first = len(traces)
    for _ in range(5):  # then 0-d device arrays: one more trace serves every step
        jt, jm = jitted(jt, jm, {"w": put(g)})
    check(
        len(traces) - first == 1,
        f"jitted Adam traced {len(traces) - first} times in 5 steps",
    )
    leaves_sharding(jt, jm, sharding, f"jit adam {spec}")
    shapes = jax.eval_shape(functools.partial(opt.setup, opt.Adam()), {"w": put(w)})
    check(shapes["w"].state.m.shape == SHAPE, "eval_shape of setup")


def main() -> None:
    check(len(jax.devices()) == 2, f"2 devices, got {jax.devices()}")
    auto = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,))
    for dtype in ("float32", "float64"):
        run(auto, P("d"), dtype)
    run(auto, P(), "float32")  # replicated
    explicit = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):
        run(explicit, P("d"), "float32")
    print(f"ok {CHECKS}")


if __name__ == "__main__":
    main()
