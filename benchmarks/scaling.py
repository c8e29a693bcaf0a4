"""Sharded step times: dask (LocalCluster, 2 processes) vs numpy; JAX on a 2-device mesh.

Run: ``python benchmarks/scaling.py`` (sets 2 forced JAX host devices itself).
Prints one line per measurement, ratios taken side by side in one run.
The JAX comparison is optax on the same mesh when optax is installed, else a
jitted plain ``jnp`` Adam.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import numpy as np

import agnosticopt as opt

SHAPE = (1024, 1024)


def best(fn: Callable[[], Any], repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def dask_rows() -> None:
    import dask.array as da
    import distributed

    rng = np.random.default_rng(0)
    w = rng.standard_normal(SHAPE).astype(np.float32)
    g = rng.standard_normal(SHAPE).astype(np.float32)
    rule = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-3))
    tree = opt.setup(rule, {"w": w})
    numpy_ms = best(lambda: opt.update(tree, {"w": w}, {"w": g}))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # no dashboard; its HTTP server (health routes) on a free loopback port,
            # not 8787, which another cluster on this machine may hold
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": False},
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        wd, gd = client.persist(
            [da.from_array(w, chunks=(512, 1024)), da.from_array(g, chunks=(512, 1024))]
        )
        lazy = opt.setup(rule, {"w": wd})

        def step() -> None:
            _, model = opt.update(lazy, {"w": wd}, {"w": gd})
            client.compute(model["w"]).result(timeout=120)

        dask_ms = best(step)
    print(
        f"dask ClipGlobalNorm+AdamW {SHAPE}, 2 chunks on 2 workers: {dask_ms:.1f} ms/step; "
        f"numpy: {numpy_ms:.1f} ms/step; ratio {dask_ms / numpy_ms:.1f}x"
    )


def jax_rows() -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    put = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    w = jax.device_put(rng.standard_normal(SHAPE).astype(np.float32), put)
    g = jax.device_put(rng.standard_normal(SHAPE).astype(np.float32), put)
    tree = opt.setup(opt.Adam(1e-3), {"w": w})
    ours = jax.jit(opt.update)
    tree, model = ours(tree, {"w": w}, {"w": g})
    jax.block_until_ready(ours(tree, model, {"w": g}))
    ours_ms = best(lambda: jax.block_until_ready(ours(tree, model, {"w": g})))
    try:
        import optax

        tx = optax.adam(1e-3)
        state = tx.init({"w": w})

        @jax.jit
        def peer(state: Any, params: Any, grads: Any) -> Any:
            updates, state = tx.update(grads, state)
            return state, optax.apply_updates(params, updates)

        name = "optax.adam"
        jax.block_until_ready(peer(state, {"w": w}, {"w": g}))
        peer_ms = best(lambda: jax.block_until_ready(peer(state, {"w": w}, {"w": g})))
    except ImportError:
        name = "jitted jnp Adam"

        @jax.jit
        def plain(m: Any, v: Any, t: Any, x: Any, dx: Any) -> Any:
            m = 0.9 * m + 0.1 * dx
            v = 0.999 * v + 0.001 * dx * dx
            mh, vh = m / (1 - 0.9**t), v / (1 - 0.999**t)
            return m, v, x - 1e-3 * mh / (jnp.sqrt(vh) + 1e-8)

        zeros = jnp.zeros_like(w)
        jax.block_until_ready(plain(zeros, zeros, 1.0, w, g))
        peer_ms = best(lambda: jax.block_until_ready(plain(zeros, zeros, 1.0, w, g)))
    print(
        f"jax jit Adam {SHAPE} sharded on 2 host devices: {ours_ms:.2f} ms/step; "
        f"{name}: {peer_ms:.2f} ms/step; ratio {ours_ms / peer_ms:.2f}x"
    )


if __name__ == "__main__":
    jax_rows()
    dask_rows()
