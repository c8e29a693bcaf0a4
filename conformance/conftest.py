"""Settings of the conformance suite (``pytest --pyargs agnosticopt.conformance``).

Each setting comes from the command line when the options plugin is loaded
(``-p agnosticopt.conformance.pytest_plugin``), else from the environment:

``--backend NAME`` / ``AGNOSTICOPT_BACKEND=NAME,...``
    A built-in backend (``numpy``, ``torch``, ``array_api_strict``, ``jax``,
    ``cupy``, ...) or ``package.module:attribute`` naming a
    :class:`~agnosticopt.conformance.Backend` or a factory returning one.
    Default: every built-in backend (absent ones skip); the reference is numpy's plain path.
``--case NAME`` / ``AGNOSTICOPT_CASE``
    Only these cases (default: all of ``CASES``).
``--dtype NAME`` / ``AGNOSTICOPT_DTYPE``
    Only these dtypes (default: float32 and float64).
``--steps N`` / ``AGNOSTICOPT_STEPS``, ``--size N`` / ``AGNOSTICOPT_SIZE``
    Length and width of the identity trajectories (default: 1000 steps in
    float32, 300 in float64; 131089 elements).
"""

from __future__ import annotations

import os

import pytest

# JAX has float64 only in its 64-bit mode, which must be on before JAX starts.
os.environ.setdefault("JAX_ENABLE_X64", "1")

from agnosticopt.conformance._backends import BUILTIN_BACKENDS, get_backend
from agnosticopt.conformance._cases import CASES, case_named
from agnosticopt.conformance._data import DATASETS
from agnosticopt.conformance._trajectory import DEFAULT_SIZE

_DEFAULT_DTYPES = ["float32", "float64"]


def _setting(config: pytest.Config, name: str) -> list[str]:
    """A list setting: the repeated option, else the comma-separated variable."""
    given: list[str] | None = config.getoption(f"agnosticopt_{name}", default=None)
    if given:
        return given
    env = os.environ.get(f"AGNOSTICOPT_{name.upper()}", "")
    return [item.strip() for item in env.split(",") if item.strip()]


def _number(config: pytest.Config, name: str) -> int | None:
    given: int | None = config.getoption(f"agnosticopt_{name}", default=None)
    if given is not None:
        return given
    env = os.environ.get(f"AGNOSTICOPT_{name.upper()}", "").strip()
    return int(env) if env else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if "case" in metafunc.fixturenames:
        names = _setting(config, "case")
        cases = [case_named(n) for n in names] if names else list(CASES)
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", _setting(config, "dtype") or _DEFAULT_DTYPES)
    if "dataset" in metafunc.fixturenames:
        metafunc.parametrize("dataset", DATASETS)
    # The backend last: the innermost loop, so that one (case, dtype, dataset) runs on
    # every backend in turn and the cached numpy reference is computed once for all.
    if "conformance_backend" in metafunc.fixturenames:
        names = _setting(config, "backend") or list(BUILTIN_BACKENDS)
        params = []
        for name in names:
            backend = get_backend(name)
            why = backend.unavailable()
            marks = [pytest.mark.skip(reason=f"{backend.name}: {why}")] if why else []
            params.append(pytest.param(backend, id=backend.name, marks=marks))
        metafunc.parametrize("conformance_backend", params)


@pytest.fixture
def steps(request: pytest.FixtureRequest) -> int | None:
    """Trajectory length (``None``: the per-dtype default)."""
    return _number(request.config, "steps")


@pytest.fixture
def size(request: pytest.FixtureRequest) -> int:
    """Parameter size of the identity trajectories."""
    return _number(request.config, "size") or DEFAULT_SIZE
