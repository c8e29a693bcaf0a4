"""JAX sharding on 2 forced host devices, all checks in one process (``test_jax_sharding.py``).

Run in a fresh process (``XLA_FLAGS`` must precede JAX). Four configurations:
explicit mesh axes outside ``jax.set_mesh`` (float32, ``ClipNorm`` p=2,
``ClipGlobalNorm`` p=1), explicit inside (float32, inf, 2), automatic outside
(float64, 1, inf), automatic inside (float32, 2, 2), so every norm kind runs
sharded, eager and jitted. The model: ``a``, 138,014 values split on dim 0
(every bit comparison is on it, with the others), ``b`` (64x33, split on dim
0; outside ``set_mesh`` only), ``c`` (7 values, replicated), ``e`` (empty,
split on dim 0; explicit meshes only: on an automatic mesh JAX's own
elementwise ops change its sharding). In every configuration:

* a row-split array is reduced shard by shard (``norm_nodes`` takes it);
* the two clips chained (thresholds that bind) on zero parameters, so
  ``x - step`` is exact whether XLA fuses it or not: eagerly (not on the
  automatic mesh inside ``set_mesh``) and under ``jax.jit``, numpy's bits, so
  the jitted step has the eager step's bits; parameters keep their sharding;
  the compiled step has no collective of more than ``SMALL`` values (no
  gather of the gradient), and on explicit meshes one all-gather of nodes per
  clip and row-split leaf; the eager reducer's program is one all-gather of
  its nodes; on explicit meshes the jitted shard-local nodes of ``|a|²`` (what
  the shards exchange) are numpy's (no XLA FMA changed one);
* ``jax.eval_shape(opt.setup, rule, params)``: the real state's structure,
  shapes, dtypes and (explicit meshes; automatic ones give none) shardings.

Explicit mesh outside ``set_mesh`` also: a chain of both clips and ``AdamW``,
2 eager steps, numpy's bits, parameters and states keep their shardings
(every rule eager on an automatic mesh: the conformance suite's 2-device JAX
backend); ``ClipNorm(throw=True)`` eager; a 137,712-value split on dim 1 (not
contiguous: one piece), numpy's bits, sharding kept. Both meshes outside
``set_mesh``: a jitted ``Adam`` traced once for its 3 steps after the first,
its states keep their sharding. Prints ``ok <checks>``; the first failed check
exits with its message.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_ENABLE_X64"] = "1"

import jax
import numpy as np
from agnosticopt.adapters import jax as jax_adapter
from agnosticopt.adapters.numpy import NumpyAdapter
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import agnosticopt as opt
from agnosticopt._norm import norm_nodes

#: The most elements one collective of a shard-local step may carry (the
#: gradient has 138,014; the nodes are about 2·log2(n) per shard and leaf).
SMALL = 256
COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|collective-permute|"
    r"all-to-all|reduce-scatter)(?:-start)?\("
)
CHECKS = 0
Tree = dict[str, object]


def check(ok: bool, what: str) -> None:
    global CHECKS
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    CHECKS += 1


def bits(a: object) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"uint{a.dtype.itemsize * 8}")


def collectives(text: str) -> list[tuple[str, int]]:
    """``(kind, elements)`` of every collective of a compiled HLO module."""
    found = []
    for _, dims, kind in COLLECTIVE.findall(text):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        found.append((kind, size))
    return found


def same_layout(a: object, b: object, ndim: int) -> bool:
    """The same partition of an ``ndim``-dimensional array over the same mesh axes.

    ``eval_shape`` gives shardings on the abstract mesh (no devices).
    """

    def key(s: object) -> tuple[object, tuple[object, ...]]:
        mesh = s.mesh  # type: ignore[attr-defined]
        spec = tuple(s.spec)  # type: ignore[attr-defined]
        return getattr(mesh, "abstract_mesh", mesh), spec + (None,) * (ndim - len(spec))

    return key(a) == key(b)


def nodes_of(d: object) -> object:
    """The tree nodes of ``|d|²`` that JAX's adapter reduces, in one array."""
    found, _ = norm_nodes(opt.adapter_for(d), d, 2, 0)
    return jax.numpy.concatenate([n.value for n in found])


def model(dtype: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters and gradients; normal values: no subnormals (XLA flushes them)."""
    rng = np.random.default_rng(13)
    shapes = {"a": (302, 457), "b": (64, 33), "c": (7,), "e": (0, 5)}
    w = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    g = {k: (3 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    return w, g


def keeps(
    tree: object, params: Tree, where: dict[str, NamedSharding], what: str
) -> None:
    """Every array of ``params`` and of its state tree ``tree`` sharded as its parameter."""
    for k, x in params.items():
        ndim = len(x.shape)  # type: ignore[attr-defined]
        state = jax.tree_util.tree_leaves(tree[k]) if tree is not None else []  # type: ignore[index]
        for a in [x, *state]:
            if getattr(a, "ndim", 0) == ndim:
                check(
                    a.sharding.is_equivalent_to(where[k], ndim),  # type: ignore[attr-defined]
                    f"{what}: {k} sharded {a.sharding}",  # type: ignore[attr-defined]
                )


def same(got: Tree, want: dict[str, np.ndarray], what: str) -> None:
    for k, value in want.items():
        check(np.array_equal(bits(got[k]), bits(value)), f"{what}: {k} bits")


def run(kind: AxisType, inside: bool, dtype: str, p: float, q: float) -> None:
    mesh = jax.make_mesh((2,), ("d",), axis_types=(kind,))
    explicit = kind == AxisType.Explicit
    rows, whole = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    where = {"a": rows, "b": rows, "c": whole, "e": rows}
    w, g = model(dtype)
    if inside:  # fewer leaves: each shape costs its own compilations
        del w["b"], g["b"]
    if not explicit:
        # JAX's own elementwise ops give an empty array of an automatic mesh
        # another sharding (P("d") becomes P()): a step of it fails the device check.
        del w["e"], g["e"]
    zeros = {k: np.zeros_like(v) for k, v in g.items()}

    def put(tree: dict[str, np.ndarray]) -> Tree:
        return {k: jax.device_put(v, where[k]) for k, v in tree.items()}

    # thresholds that clip: ClipNorm halves "a"'s norm, the global clip then binds too
    omega = float(np.linalg.norm(g["a"].astype(np.float64).ravel(), p)) / 2
    clip = opt.ClipNorm(omega, p, throw=False)
    _, after = opt.update(opt.setup(clip, zeros), zeros, g)
    flat = np.concatenate([v.astype(np.float64).ravel() for v in after.values()])
    gamma = float(np.linalg.norm(flat, q)) / 2
    clips = opt.OptimiserChain(clip, opt.ClipGlobalNorm(gamma, q))
    label = f"{kind} {'inside' if inside else 'outside'} set_mesh {dtype} p={p} q={q}"

    with jax.set_mesh(mesh) if inside else contextlib.nullcontext():
        check(
            opt.adapter_for(put(g)["a"]).norm_nodes(put(g)["a"], p, 0, None)
            is not None,
            f"{label}: a row-split array is reduced shard by shard",
        )
        if explicit and not inside:  # a whole rule, eager, 2 steps (automatic
            # meshes: the conformance suite's 2-device JAX backend runs every rule)
            rule = opt.OptimiserChain(clips, opt.AdamW(1e-3, lambda_=1e-2))
            tree, params = opt.setup(rule, w), w
            jt, jp = opt.setup(rule, put(w)), put(w)
            for _ in range(2):
                tree, params = opt.update(tree, params, g)
                jt, jp = opt.update(jt, jp, put(g))
            same(jp, params, f"eager clips + AdamW {label}")
            keeps(jt, jp, where, f"eager clips + AdamW {label}")

        # the two clips on zero parameters: eager and jitted, numpy's bits
        _, want = opt.update(opt.setup(clips, zeros), zeros, g)
        norm = np.linalg.norm(
            np.concatenate([v.astype(np.float64).ravel() for v in want.values()]), q
        )
        check(abs(norm / gamma - 1) < 1e-3, f"{label}: the global clip binds ({norm})")
        tree = opt.setup(clips, put(zeros))
        if explicit or not inside:
            _, eager = opt.update(tree, put(zeros), put(g))
            same(eager, want, f"eager clips {label}")
            keeps(None, eager, where, f"eager clips {label}")
        compiled = jax.jit(opt.update).lower(tree, put(zeros), put(g)).compile()
        new_tree, jitted = compiled(tree, put(zeros), put(g))
        same(jitted, want, f"jit clips {label}")
        keeps(new_tree, jitted, where, f"jit clips {label}")
        sizes = collectives(compiled.as_text())
        big = [s for s in sizes if s[1] > SMALL]
        check(not big, f"jit clips {label}: gradient-sized collectives {big}")
        if explicit:  # each clip reduces each row-split leaf shard by shard
            gathers = [s for s in sizes if s[0] == "all-gather"]
            split = 1 if inside else 2  # "a" (and "b"); "e" is empty
            check(len(gathers) == 2 * split, f"jit clips {label}: all-gathers {sizes}")

        if explicit:  # under jit, what the shards exchange: numpy's nodes of |a|²
            # (the clipped bits alone can hide a node changed by an XLA FMA)
            local = g["a"].size // 2
            flat = g["a"].reshape(-1)
            want_nodes = np.concatenate(
                [
                    n.value
                    for k in range(2)
                    for n in norm_nodes(
                        NumpyAdapter(), flat[k * local : (k + 1) * local], 2, k * local
                    )[0]
                ]
            )
            got_nodes = jax.jit(nodes_of)(put(g)["a"])
            check(
                np.array_equal(bits(got_nodes), bits(want_nodes)),
                f"jit shard nodes {label}",
            )
        # eager: the cached shard_map of "a" exchanges only its nodes
        local = g["a"].size // 2
        width = max(len(opt._norm.piece_layout(k * local, local)) for k in range(2))
        reducer = jax_adapter._shard_reducer(
            mesh, ("d",), 2, float(p), 0, local, dtype, None, width
        )
        sizes = collectives(reducer.lower(put(g)["a"]).compile().as_text())
        check(sizes == [("all-gather", 2 * width)], f"eager reducer {label}: {sizes}")

        # eval_shape of setup, the rule an argument
        adam = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-3))
        params = put({k: v for k, v in w.items() if k != "e"})
        shapes = jax.eval_shape(opt.setup, adam, params)
        real = opt.setup(adam, params)
        check(
            jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real),
            f"eval_shape structure {label}",
        )
        for s, r in zip(
            jax.tree_util.tree_leaves(shapes),
            jax.tree_util.tree_leaves(real),
            strict=True,
        ):
            check(
                s.shape == r.shape and s.dtype == r.dtype,
                f"eval_shape {s} vs {r.shape} {r.dtype}",
            )
            if r.ndim and (s.sharding is not None or explicit):
                # an automatic mesh's shardings are XLA's to choose: eval_shape
                # gives none; an explicit mesh's are part of the types
                check(
                    same_layout(s.sharding, r.sharding, r.ndim),
                    f"eval_shape sharding {s.sharding} vs {r.sharding} {label}",
                )
        if not inside:
            outside(mesh, w["a"], g["a"], label, explicit)


def outside(
    mesh: jax.sharding.Mesh, w: np.ndarray, g: np.ndarray, label: str, explicit: bool
) -> None:
    """Checks run once per mesh kind, outside ``set_mesh``."""
    rows = NamedSharding(mesh, P("d"))
    if explicit:  # ClipNorm(throw=True) reads its norm on the host: eager only
        rule = opt.ClipNorm(5.0)
        _, want = opt.update(opt.setup(rule, [0 * g]), [0 * g], [g])
        z = jax.device_put(0 * g, rows)
        _, got = opt.update(opt.setup(rule, [z]), [z], [jax.device_put(g, rows)])
        check(np.array_equal(bits(got[0]), bits(want[0])), f"ClipNorm throw {label}")
        # a split on dim 1 is not contiguous: one piece, the same bits
        cols = NamedSharding(mesh, P(None, "d"))
        c = g[:, :456]  # 137,712 elements, 456 columns split over 2 devices
        put_c = jax.device_put(c, cols)
        check(
            opt.adapter_for(put_c).norm_nodes(put_c, 2, 0, None) is None,
            f"dim 1 {label}: not reduced shard by shard",
        )
        rule = opt.ClipNorm(5.0)
        _, want_c = opt.update(opt.setup(rule, [c * 0]), [c * 0], [c])
        _, got_c = opt.update(opt.setup(rule, [put_c * 0]), [put_c * 0], [put_c])
        check(np.array_equal(bits(got_c[0]), bits(want_c[0])), f"dim 1 {label}")
        check(got_c[0].sharding.is_equivalent_to(cols, 2), f"dim 1 sharding {label}")
    # a jitted Adam: one trace serves every step after the first, states stay sharded
    traces: list[int] = []

    def step(tree: object, params: Tree, grads: Tree) -> tuple[object, Tree]:
        traces.append(1)
        return opt.update(tree, params, grads)

    jitted: Callable[..., tuple[object, Tree]] = jax.jit(step)

    def put(a: np.ndarray) -> object:
        return jax.device_put(a, rows)

    jt, jp = opt.setup(opt.Adam(1e-3), {"a": put(w)}), {"a": put(w)}
    jt, jp = jitted(jt, jp, {"a": put(g)})  # setup's beta_t are host scalars: one trace
    first = len(traces)
    for _ in range(3):  # then 0-d device arrays: one more trace serves every step
        jt, jp = jitted(jt, jp, {"a": put(g)})
    check(len(traces) - first == 1, f"jitted Adam traced {len(traces) - first} times")
    keeps(jt, jp, {"a": rows}, f"jit Adam {label}")


def main() -> None:
    check(len(jax.devices()) == 2, f"2 devices, got {jax.devices()}")
    run(AxisType.Explicit, False, "float32", 2, 1)
    run(AxisType.Explicit, True, "float32", np.inf, 2)
    run(AxisType.Auto, False, "float64", 1, np.inf)
    run(AxisType.Auto, True, "float32", 2, 2)
    print(f"ok {CHECKS}")


if __name__ == "__main__":
    main()
