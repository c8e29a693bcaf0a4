"""Running a rule for many steps on one backend, and snapshotting the result.

A trajectory starts from :func:`~agnosticopt.conformance._data.initial_parameter`
and applies the gradients of one data set, cycled, with chained
:func:`agnosticopt.update_` (or :func:`agnosticopt.update`) calls. Its result is
a snapshot: the parameter and every piece of state, as numpy arrays and host
scalars, keyed by path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend, NumpyBackend
from agnosticopt.conformance._data import gradient_pool, initial_parameter

import agnosticopt as opt

__all__ = [
    "DEFAULT_SIZE",
    "DEFAULT_STEPS",
    "reference_trajectory",
    "run_trajectory",
    "snapshot",
]

#: Elements of the parameter: > 100k (torch splits work across threads from 32k
#: elements) and not a power of two (the norm pads).
DEFAULT_SIZE = 131_072 + 17

#: Steps per dtype: long chains where they are cheap enough.
DEFAULT_STEPS = {
    "float32": 1000,
    "float64": 300,
    "float16": 100,
    "complex64": 300,
    "complex128": 100,
}

_HOST = (bool, int, float, complex, np.generic)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def snapshot_state(
    state: Any, to_numpy: Callable[[Any], np.ndarray], path: str = "state"
) -> dict[str, Any]:
    """Every array (as numpy) and host scalar in ``state``, keyed by path.

    NamedTuple fields are named (``state.m``), tuple items numbered
    (``state[1]``), mapping entries keyed (``state['a']``). ``None`` entries are
    kept, so the structure itself is compared.
    """
    out: dict[str, Any] = {}
    if _is_namedtuple(state):
        for name, item in zip(state._fields, state, strict=True):
            out.update(snapshot_state(item, to_numpy, f"{path}.{name}"))
    elif isinstance(state, (tuple, list)):
        for k, item in enumerate(state):
            out.update(snapshot_state(item, to_numpy, f"{path}[{k}]"))
    elif isinstance(state, Mapping):
        for key, item in state.items():
            out.update(snapshot_state(item, to_numpy, f"{path}[{key!r}]"))
    elif state is None or isinstance(state, _HOST):
        out[path] = state
    elif opt.adapter_for(state) is not None:
        out[path] = to_numpy(state)
    else:
        msg = f"{path}: the state holds {type(state).__name__}, not arrays and host scalars"
        raise TypeError(msg)
    return out


def snapshot(backend: Backend, x: Any, tree: Any) -> dict[str, Any]:
    """The parameter ``x`` and the state of leaf ``tree`` as a snapshot."""
    return {"x": backend.to_numpy(x), **snapshot_state(tree.state, backend.to_numpy)}


def run_trajectory(
    backend: Backend,
    rule: opt.Rule,
    dtype: str,
    dataset: str = "normal",
    *,
    steps: int | None = None,
    size: int = DEFAULT_SIZE,
    period: int | None = None,
    in_place: bool | None = None,
) -> dict[str, Any]:
    """The snapshot after ``steps`` chained updates of one parameter.

    Parameters
    ----------
    backend
        Where to run.
    rule
        The rule (or chain).
    dtype
        The parameter dtype: ``"float16"``, ``"float32"``, ``"float64"``,
        ``"complex64"`` or ``"complex128"``.
    dataset
        ``"normal"`` or ``"special"`` (see :mod:`agnosticopt.conformance`).
    steps
        Number of updates; default :data:`DEFAULT_STEPS` for the dtype.
    size
        Elements of the parameter.
    period
        Repeat the inputs' first ``period`` values (see ``initial_parameter``).
    in_place
        Use :func:`agnosticopt.update_` or :func:`agnosticopt.update`; default:
        ``update_`` unless the backend is functional-only (``in_place`` false).
    """
    if in_place is None:
        in_place = bool(getattr(backend, "in_place", True))
    steps = DEFAULT_STEPS[dtype] if steps is None else steps
    x = backend.asarray(initial_parameter(dtype, size, period))
    grads = [backend.asarray(g) for g in gradient_pool(dtype, dataset, size, period)]
    tree = opt.setup(rule, x)
    step = opt.update_ if in_place else opt.update
    for k in range(steps):
        tree, x = step(tree, x, grads[k % len(grads)])
    return snapshot(backend, x, tree)


@functools.lru_cache(maxsize=8)
def reference_trajectory(
    rule: opt.Rule, dtype: str, dataset: str, steps: int | None, size: int
) -> dict[str, Any]:
    """:func:`run_trajectory` on numpy, the reference (the last few are cached).

    The reference takes :func:`agnosticopt.update`, which never takes the
    compiled fast path of ``update_``: it is the rules' array-API code run one
    numpy operation at a time, so a backend's fast path is checked against it.
    """
    return run_trajectory(
        NumpyBackend(), rule, dtype, dataset, steps=steps, size=size, in_place=False
    )
