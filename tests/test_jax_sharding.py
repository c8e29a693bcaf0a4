"""JAX sharding on 2 forced host devices, in a subprocess (XLA_FLAGS must precede JAX)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="JAX is not installed (extra 'jax')")

CASE = Path(__file__).with_name("_jax_sharded_case.py")


@pytest.mark.slow  # about 90 s on a loaded 2-core machine
def test_jax_sharded_setup_update_eager_jit_and_explicit_mesh() -> None:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_ENABLE_X64": "1",
    }
    done = subprocess.run(
        [sys.executable, str(CASE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok ")


def test_clipnorm_under_jit_is_traced_and_numpy_identical() -> None:
    import jax
    import numpy as np

    import agnosticopt as opt

    rng = np.random.default_rng(5)
    g = (3 * rng.standard_normal(120_001)).astype(np.float32)
    zeros = np.zeros_like(g)
    for rule in (
        opt.ClipNorm(10.0, throw=False),
        opt.ClipNorm(40.0, np.inf, throw=False),
    ):
        _, want = opt.update(opt.setup(rule, [zeros]), [zeros], [g])
        tree = opt.setup(rule, [jax.numpy.asarray(zeros)])
        _, got = jax.jit(opt.update)(
            tree, [jax.numpy.asarray(zeros)], [jax.numpy.asarray(g)]
        )
        assert np.array_equal(
            np.asarray(got[0]).view(np.uint32), want[0].view(np.uint32)
        )


def test_clipnorm_throw_under_jit_says_what_to_do() -> None:
    import jax
    import jax.numpy as jnp

    import agnosticopt as opt

    x = jnp.ones(3)
    tree = opt.setup(opt.ClipNorm(1.0), [x])
    with pytest.raises(TypeError, match=r"throw=False"):
        jax.jit(opt.update)(tree, [x], [x])
