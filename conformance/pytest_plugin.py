"""Command-line options of the conformance suite, as a pytest plugin.

pytest reads options only from plugins loaded before it parses the command
line, which a package's ``conftest.py`` is not under ``--pyargs``. Load this
module with ``-p`` to get them::

    pytest -p agnosticopt.conformance.pytest_plugin --pyargs agnosticopt.conformance \\
        --backend mypkg.arrays:conformance_backend --steps 100

Without it, the same settings come from environment variables
(``AGNOSTICOPT_BACKEND``, ``AGNOSTICOPT_CASE``, ``AGNOSTICOPT_DTYPE``: comma-
separated; ``AGNOSTICOPT_STEPS``, ``AGNOSTICOPT_SIZE``); see ``conftest.py``.
"""

from __future__ import annotations

import pytest

__all__ = ["pytest_addoption"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--backend``, ``--case``, ``--dtype`` (repeatable), ``--steps``, ``--size``."""
    group = parser.getgroup("agnosticopt", "agnosticopt conformance suite")
    group.addoption(
        "--backend",
        action="append",
        default=None,
        dest="agnosticopt_backend",
        help="backend name or module:attribute (repeatable)",
    )
    group.addoption(
        "--case",
        action="append",
        default=None,
        dest="agnosticopt_case",
        help="case name, e.g. Adam (repeatable)",
    )
    group.addoption(
        "--dtype",
        action="append",
        default=None,
        dest="agnosticopt_dtype",
        help="parameter dtype (repeatable; default float32 and float64)",
    )
    group.addoption(
        "--steps",
        type=int,
        default=None,
        dest="agnosticopt_steps",
        help="trajectory length (default: per dtype, 1000 in float32)",
    )
    group.addoption(
        "--size",
        type=int,
        default=None,
        dest="agnosticopt_size",
        help="parameter size (default 131089)",
    )
