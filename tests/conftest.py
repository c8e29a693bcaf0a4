"""Backends as a pytest fixture (array-api-extra's pattern).

``backend`` runs a test once per core backend (numpy, read-only numpy, torch CPU,
array-api-strict); ``any_backend`` adds torch CUDA, JAX and CuPy, each skipped
with a reason when absent. The backends themselves live in ``_backends.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

# JAX has float64 arrays only in its 64-bit mode, which must be on before JAX
# creates arrays; the JAX backend is tested in float64 too.
os.environ.setdefault("JAX_ENABLE_X64", "1")
if "jax" in sys.modules:  # imported before this file (a plugin): switch it on now
    sys.modules["jax"].config.update("jax_enable_x64", True)
from _backends import ALL_BACKENDS, CORE_BACKENDS, BackendHelper, backend_params


@pytest.fixture(params=backend_params(CORE_BACKENDS))
def backend(request: pytest.FixtureRequest) -> BackendHelper:
    """One of the core backends."""
    return BackendHelper(request.param)


@pytest.fixture(params=backend_params(ALL_BACKENDS))
def any_backend(request: pytest.FixtureRequest) -> BackendHelper:
    """Any backend, GPU ones included (skipped with a reason when absent)."""
    return BackendHelper(request.param)
