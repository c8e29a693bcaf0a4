"""Backend factories that check nothing, for ``test_cli.py`` (``--backend _cli_backends:...``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from agnosticopt.conformance import Backend


def exiting_backend() -> Any:
    """A factory that exits (status 0) instead of returning a backend."""
    raise SystemExit(0)


def none_backend() -> Any:
    """A factory that returns nothing."""
    return None


class _Unavailable(Backend):
    def unavailable(self) -> str | None:
        return "this test backend is never available"

    def asarray(self, a: np.ndarray) -> Any:
        return np.array(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a)


def unavailable_backend() -> Backend:
    """A backend that is never available: every check on it is skipped."""
    return _Unavailable("never-there")
