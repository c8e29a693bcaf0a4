"""JAX sharding on 2 forced host devices, in a subprocess (XLA_FLAGS must precede JAX)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax", reason="JAX is not installed (extra 'jax')")

CASE = Path(__file__).with_name("_jax_sharded_case.py")


def _run_case(case: Path) -> str:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_ENABLE_X64": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # one process: about 45 s of CPU, 80 s on a loaded 2-core machine
def test_jax_sharded_steps_keep_shardings_norms_shard_local_numpy_bits() -> None:
    """Explicit and automatic meshes, in and out of set_mesh, eager and jit.

    What each of its checks is: the docstring of ``_jax_sharded_case.py``.
    """
    assert _run_case(CASE).startswith("ok ")


def test_clips_under_jit_are_traced_numpy_identical_and_keep_shardings() -> None:
    """Jitted ``ClipNorm`` and ``ClipGlobalNorm``: traced, numpy's bits, sharding kept.

    Plain arrays, and arrays of a 1-device explicit-sharding mesh (outside
    ``jax.set_mesh``: the flattened gradient is resharded in the trace), with
    thresholds that bind. On 2 devices (shard-local norms, eager and jit
    compared): ``_jax_sharded_case.py``.
    """
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import agnosticopt as opt

    rng = np.random.default_rng(5)
    g = (3 * rng.standard_normal(120_001)).astype(np.float32)
    zeros = np.zeros_like(g)
    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    rows = NamedSharding(mesh, P("d"))
    cases: list[tuple[object, Callable[[np.ndarray], Any]]] = [
        (opt.ClipNorm(10.0, throw=False), jax.numpy.asarray),
        (
            opt.OptimiserChain(
                opt.ClipNorm(5.0, np.inf, throw=False), opt.ClipGlobalNorm(100.0)
            ),
            lambda a: jax.device_put(a, rows),
        ),
    ]
    for rule, put in cases:
        _, want = opt.update(opt.setup(rule, [zeros]), [zeros], [g])
        assert not np.array_equal(want[0], -g)  # it clips
        tree = opt.setup(rule, [put(zeros)])
        _, got = jax.jit(opt.update)(tree, [put(zeros)], [put(g)])
        assert np.array_equal(
            np.asarray(got[0]).view(np.uint32), want[0].view(np.uint32)
        ), rule
        assert got[0].sharding.is_equivalent_to(put(zeros).sharding, 1), rule


def test_clipnorm_throw_under_jit_says_what_to_do() -> None:
    import jax
    import jax.numpy as jnp

    import agnosticopt as opt

    x = jnp.ones(3)
    tree = opt.setup(opt.ClipNorm(1.0), [x])
    with pytest.raises(TypeError, match=r"throw=False"):
        jax.jit(opt.update)(tree, [x], [x])


def test_rules_are_static_pytrees_eval_shape_of_setup() -> None:
    import jax
    import jax.numpy as jnp

    import agnosticopt as opt

    rule = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-3))
    params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros(4, jnp.float64)}
    assert jax.tree_util.tree_leaves(rule) == []
    shapes = jax.eval_shape(opt.setup, rule, params)
    real = opt.setup(rule, params)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)
    got = [(s.shape, s.dtype) for s in jax.tree_util.tree_leaves(shapes)]
    assert got == [(jnp.shape(r), r.dtype) for r in jax.tree_util.tree_leaves(real)]
    tree = jax.jit(opt.setup)(rule, params)  # the rule an argument of jit
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(real)
    _, stepped = jax.jit(opt.update)(tree, params, params)
    assert stepped["w"].shape == (3, 4)


def test_rules_are_pytrees_when_jax_is_imported_after_agnosticopt(
    tmp_path: Path,
) -> None:
    code = (
        "import agnosticopt as opt\n"
        "import jax, jax.numpy as jnp\n"
        "rule = opt.Adam(1e-3)\n"
        "s = jax.eval_shape(opt.setup, rule, [jnp.ones(3)])\n"
        "print(s[0].state.m.shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,  # the installed package, not the source tree
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "(3,)"


def test_jitted_norm_terms_are_not_contracted_into_fmas() -> None:
    """XLA drops optimization barriers on CPU; x*x + y*y must not become an FMA.

    Every node of the tree (what shards exchange) has numpy's bits, and the norm.
    One size, so each function compiles once; 6 data sets. Without the guard
    in ``JaxAdapter.abs2``, 5 of the 6 differ from numpy in 1 or 2 of their 10
    nodes (measured).
    """
    import jax
    from agnosticopt.adapters.numpy import NumpyAdapter

    import agnosticopt as opt
    from agnosticopt._norm import norm_nodes

    def nodes(d: object) -> object:
        found, _ = norm_nodes(opt.adapter_for(d), d, 2, 0)
        return jax.numpy.concatenate([n.value for n in found])

    rule = opt.ClipNorm(1.0, throw=False)
    jitted_nodes = jax.jit(nodes)
    jitted_norm = jax.jit(lambda d: rule.device_norm(d, opt.adapter_for(d)))
    for seed in range(6):
        g = np.random.default_rng(seed).standard_normal(138_015).astype(np.float32)
        want, _ = norm_nodes(NumpyAdapter(), g, 2, 0)
        got = np.asarray(jitted_nodes(jax.numpy.asarray(g)))
        assert np.array_equal(
            got.view(np.uint32), np.concatenate([n.value for n in want]).view(np.uint32)
        ), seed
        norm = jitted_norm(jax.numpy.asarray(g))
        assert np.asarray(norm).reshape(-1).view(np.uint32)[0] == np.asarray(
            opt.norm(g)
        ).view(np.uint32), seed
