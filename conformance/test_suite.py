"""The conformance suite as pytest tests: ``pytest --pyargs agnosticopt.conformance``.

See ``conftest.py`` in this package for the options (``--backend``,
``--case``, ``--dtype``, ``--steps``, ``--size``). A difference that the
adapter declares (``flushes_subnormals``) is an expected failure naming the
deviation; every other difference fails, naming rule, dtype and the first
differing element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from agnosticopt.conformance._backends import Backend
from agnosticopt.conformance._cases import Case
from agnosticopt.conformance._checks import (
    PROPERTY_CHECKS,
    KnownDeviation,
    check_golden,
    check_trajectory,
)


def test_trajectory(
    conformance_backend: Backend,
    case: Case,
    dtype: str,
    dataset: str,
    steps: int | None,
    size: int,
) -> None:
    try:
        check_trajectory(
            conformance_backend, case, dtype, dataset=dataset, steps=steps, size=size
        )
    except KnownDeviation as exc:
        pytest.xfail(str(exc))


def test_golden(conformance_backend: Backend, case: Case, dtype: str) -> None:
    check_golden(conformance_backend, case, dtype)


@pytest.mark.parametrize("check", PROPERTY_CHECKS, ids=lambda f: f.__name__)
def test_property(
    check: Callable[..., Any], conformance_backend: Backend, case: Case, dtype: str
) -> None:
    check(conformance_backend, case, dtype)
