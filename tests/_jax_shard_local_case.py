"""Shard-local norms of JAX arrays on 2 forced host devices (``test_jax_sharding.py``).

Run in a fresh process (``XLA_FLAGS`` must precede JAX). Checks, for meshes of
explicit and automatic axes, used inside and outside ``jax.set_mesh``, eager
and under ``jax.jit``: ``ClipNorm`` and ``ClipGlobalNorm`` of gradients split
on dim 0 give numpy's bits (138,014 elements); the compiled steps exchange
only the tree's nodes (no collective of more than ``SMALL`` elements: no
gather of the gradient); a split on dim 1 (not contiguous) takes the one-piece
path, same bits; ``jax.eval_shape(opt.setup, rule, params)`` gives the real
state's shapes, dtypes and shardings. Prints ``ok <checks>`` at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_ENABLE_X64"] = "1"

import jax
import numpy as np
from agnosticopt.adapters import jax as jax_adapter
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import agnosticopt as opt

#: The most elements one collective of a shard-local step may carry (the
#: gradient has 138,014; the nodes are about 2·log2(n) per shard and leaf).
SMALL = 256
COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|collective-permute|"
    r"all-to-all|reduce-scatter)(?:-start)?\("
)
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


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(13)  # normal values: no subnormals (XLA flushes them)
    return {
        "a": (3 * rng.standard_normal((302, 457))).astype(np.float32),
        "b": rng.standard_normal((64, 33)).astype(np.float32),
        "c": rng.standard_normal(7).astype(np.float32),
        "e": np.zeros((0, 5), np.float32),
    }


RULES = {
    "clipnorm": lambda: opt.ClipNorm(50.0, throw=False),
    "clipnorm_inf": lambda: opt.ClipNorm(4.0, np.inf, throw=False),
    "global_clip": lambda: opt.ClipGlobalNorm(50.0),
    "global_clip_l1": lambda: opt.ClipGlobalNorm(1e4, 1),
}


def run(mesh: jax.sharding.Mesh, inside: bool) -> None:
    rows, whole = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    where = {"a": rows, "b": rows, "c": whole, "e": rows}
    g = model()
    if mesh.axis_types[0] == AxisType.Auto:
        # JAX's own elementwise ops give an empty array of an automatic mesh
        # another sharding (P("d") becomes P()): a step of it fails the device check.
        del g["e"]
    zeros = {k: np.zeros_like(v) for k, v in g.items()}

    def put(tree: dict[str, np.ndarray]) -> dict[str, object]:
        return {k: jax.device_put(v, where[k]) for k, v in tree.items()}

    explicit = mesh.axis_types[0] == AxisType.Explicit
    label = f"{mesh.axis_types[0]} {'inside' if inside else 'outside'} set_mesh"
    scope = jax.set_mesh(mesh) if inside else contextlib.nullcontext()
    with scope:
        xp = opt.adapter_for(put(g)["a"])
        check(
            xp.norm_nodes(put(g)["a"], 2, 0, None) is not None,
            f"{label}: a row-split array is reduced shard by shard",
        )
        cases = {**RULES, "clipnorm_throw": lambda: opt.ClipNorm(50.0)}
        for name, make in cases.items():
            _, want = opt.update(opt.setup(make(), zeros), zeros, g)
            tree = opt.setup(make(), put(zeros))
            _, eager = opt.update(tree, put(zeros), put(g))
            for k in g:
                check(
                    np.array_equal(bits(eager[k]), bits(want[k])),
                    f"eager {name} {k} {label}",
                )
                check(
                    eager[k].sharding.is_equivalent_to(where[k], g[k].ndim),
                    f"eager {name} {k} keeps its sharding, {label}",
                )
            if name == "clipnorm_throw":
                continue  # raises under jit by design
            step = jax.jit(opt.update)
            _, got = step(tree, put(zeros), put(g))
            for k in g:
                check(
                    np.array_equal(bits(got[k]), bits(want[k])),
                    f"jit {name} {k} {label}",
                )
            sizes = collectives(
                step.lower(tree, put(zeros), put(g)).compile().as_text()
            )
            big = [s for s in sizes if s[1] > SMALL]
            check(not big, f"jit {name} {label}: gradient-sized collectives {big}")
            if mesh.axis_types[0] == AxisType.Explicit:
                gathers = [s for s in sizes if s[0] == "all-gather"]
                check(
                    len(gathers) == 2,  # one per row-split leaf of nodes ("a", "b")
                    f"jit {name} {label}: all-gathers {sizes}",
                )
        # eager: the cached shard_map of "a" exchanges only its nodes
        local = g["a"].size // 2
        width = max(len(opt._norm.piece_layout(k * local, local)) for k in range(2))
        reducer = jax_adapter._shard_reducer(
            mesh, ("d",), 2, 2.0, 0, local, "float32", None, width
        )
        sizes = collectives(reducer.lower(put(g)["a"]).compile().as_text())
        check(
            sizes == [("all-gather", 2 * width)],
            f"eager reducer {label}: {sizes}",
        )
        # a split on dim 1 is not contiguous: one piece, the same bits
        cols = NamedSharding(mesh, P(None, "d"))
        w = g["b"][:, :32]
        check(xp.norm_nodes(jax.device_put(w, cols), 2, 0, None) is None, "dim 1")
        rule = opt.ClipNorm(5.0)
        _, want_w = opt.update(opt.setup(rule, [w * 0]), [w * 0], [w])
        put_w = jax.device_put(w, cols)
        _, got_w = opt.update(opt.setup(rule, [put_w * 0]), [put_w * 0], [put_w])
        check(np.array_equal(bits(got_w[0]), bits(want_w[0])), f"dim 1 {label}")
        # eval_shape of setup, the rule an argument
        adam = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-3))
        params = put({k: v for k, v in g.items() if k != "e"})
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


def main() -> None:
    check(len(jax.devices()) == 2, f"2 devices, got {jax.devices()}")
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2,), ("d",), axis_types=(kind,))
        for inside in (False, True):
            run(mesh, inside)
    print(f"ok {CHECKS}")


if __name__ == "__main__":
    main()
