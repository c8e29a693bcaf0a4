"""Backends as a pytest fixture (array-api-extra's pattern).

``backend`` runs a test once per core backend (numpy, read-only numpy, torch CPU,
array-api-strict); ``any_backend`` adds torch CUDA, JAX and CuPy, each skipped
with a reason when absent. The backends themselves live in ``_backends.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# JAX has float64 arrays only in its 64-bit mode, which must be on before JAX
# creates arrays; the JAX backend is tested in float64 too.
os.environ.setdefault("JAX_ENABLE_X64", "1")
# One intra-op thread for torch (and OpenMP numpy/BLAS) unless the caller sets one:
# on a busy machine torch's thread pool makes a 1000-step identity run ~9x slower
# (144 s vs 16 s). Elementwise bits do not depend on it; OMP_NUM_THREADS=2 pytest
# runs the threaded pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "jax" in sys.modules:  # imported before this file (a plugin): switch it on now
    sys.modules["jax"].config.update("jax_enable_x64", True)
from _backends import (
    ALL_BACKENDS,
    CORE_BACKENDS,
    BackendHelper,
    BackendKind,
    backend_params,
)


def _jax_beyond_float32(params: dict[str, Any]) -> bool:
    return params.get("kind") == BackendKind.JAX and params.get("dtype") != "float32"


#: Parametrised tests whose matrix is split between the tiers: the cases for which
#: the predicate holds run in the slow tier (``pytest -m slow``), the rest in the
#: default one, so that the two runs of ``.ci/run`` together cover each case once.
#: JAX's eager ops are the slowest per call, so its dtypes beyond float32 go slow.
SLOW_CASES = {
    "test_every_backend_matches_the_golden_files": _jax_beyond_float32,
    "test_property_checks_pass": _jax_beyond_float32,
    "test_jax_is_bitwise_numpy_on_normal_range_data": (
        lambda params: params["dtype"] not in ("float32", "complex64")
    ),
    "test_jax_subnormals_follow_the_named_deviation": (
        lambda params: params["dtype"] not in ("float32", "complex128")
    ),
    # JAX compiles each array op of the step anew (~10 s a case): NaN quick, ±inf slow
    "test_skip_non_finite_skips_every_leaf": (
        lambda params: (
            getattr(params["any_backend"], "value", None) == "jax"
            and params["bad"] == params["bad"]
        )  # not NaN
    ),
}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the cases of ``SLOW_CASES`` slow."""
    for item in items:
        slow = SLOW_CASES.get(getattr(item, "originalname", ""))
        callspec = getattr(item, "callspec", None)
        if slow is not None and callspec is not None and slow(callspec.params):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=backend_params(CORE_BACKENDS))
def backend(request: pytest.FixtureRequest) -> BackendHelper:
    """One of the core backends."""
    return BackendHelper(request.param)


@pytest.fixture(params=backend_params(ALL_BACKENDS))
def any_backend(request: pytest.FixtureRequest) -> BackendHelper:
    """Any backend, GPU ones included (skipped with a reason when absent)."""
    return BackendHelper(request.param)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """A LocalCluster of 2 worker processes on 127.0.0.1, shared by the dask tests and
    closed after the session."""
    pytest.importorskip("dask.array", reason="dask is not installed (extra 'test')")
    distributed = pytest.importorskip(
        "distributed", reason="distributed is not installed"
    )
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        # no dashboard; its HTTP server (health routes) on a free loopback port,
        # not 8787, which another cluster on this machine may hold
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        worker_dashboard_address=None,
    )
    client = distributed.Client(cluster, timeout=60)
    try:
        yield client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)
