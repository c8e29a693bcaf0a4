"""Bit-identity of chained updates across backends (the promise of agnosticopt).

For every rule and a set of chains (``agnosticopt.conformance.CASES``), a
parameter of more than 100k elements takes many chained ``update_`` steps on
each backend; parameters and every piece of state must have the same bits as on
numpy, the reference (``check_trajectory``; NaNs compare equal whatever their
payload, every other bit pattern, the sign of zero included, must match).

Gradient data sets (``agnosticopt.conformance._data``): ``normal`` (mixed
magnitudes) and ``special`` (also zeros, negative zeros, values whose squares
are subnormal or zero, subnormals, and values whose squares overflow).

JAX on CPU flushes subnormals to zero (XLA has no switch); its adapter declares
it in ``flushes_subnormals``. A difference on ``special`` data in those dtypes
is an expected failure whose reason names the deviation and the first
differing element; where the data meets no subnormal the bits must still match.

Lengths: the ``full`` tier (``pytest -m slow``, which ``.ci/run`` also runs)
takes 1000 steps in float32 on normal data and shorter elsewhere (numpy's
float16 arithmetic is ten times slower than float32's); the ``quick`` tier of
the default run takes the same matrix at a fiftieth of those lengths (at least 5
steps). ``agnosticopt conformance --dtype float16 --dtype float32 ...`` runs the
whole matrix at the CLI's default lengths.

Backends: every one but numpy (the reference) and read-only numpy, whose
arithmetic *is* numpy's; what read-only arrays test (no write into an input,
``update_`` falling back to new arrays) the property checks of
``test_conformance.py`` test on it for every rule.

Paths: the reference is numpy's plain path (:func:`agnosticopt.update`, one
array-API operation at a time). Every backend runs ``update_`` with the compiled
fast path switched off (``plain``: the adapter's own operations); numpy and CPU
torch also run it with the fast path on (``fast``, float32 and float64: numba's
kernels), and the test checks that the kernels really ran. Chains with a
``ClipNorm`` have no ``fast`` run: its norm is a reduction, which the kernels
leave to the plain path (``test_fast.py`` checks that fallback).
"""

from __future__ import annotations

from typing import Any

import pytest
from _backends import ALL_BACKENDS, Backend, BackendHelper, backend_params, fast_path

import agnosticopt as opt
from agnosticopt import conformance as c

#: Steps per (dtype, data set) of the full tier; every run has c.DEFAULT_SIZE
#: (> 100k) elements.
STEPS = {
    ("float32", "normal"): 1000,
    ("float32", "special"): 100,
    ("float64", "normal"): 100,
    ("float64", "special"): 100,
    ("float16", "normal"): 10,
    ("float16", "special"): 10,
    ("complex64", "normal"): 50,
    ("complex128", "normal"): 50,
}

#: Steps of the quick tier (the default run): a fiftieth, at least 5.
QUICK_STEPS = {key: max(5, n // 50) for key, n in STEPS.items()}
TIERS = (
    pytest.param("quick", id="quick"),
    pytest.param("full", id="full", marks=pytest.mark.slow),
)

PLAIN_BACKENDS = [
    p for p in backend_params(ALL_BACKENDS)
    if p.values[0] not in (Backend.NUMPY, Backend.NUMPY_READONLY)
]
#: The backends with a compiled fast path, in the dtypes it covers.
FAST_BACKENDS = backend_params((Backend.NUMPY, Backend.TORCH))
FAST_DTYPES = ("float32", "float64")


def _params() -> list[Any]:
    params = []
    for case in c.CASES:  # case outermost: the cached numpy reference is reused
        for dtype, dataset in STEPS:
            if dtype.startswith("complex") and not c.complex_ok(case.rule):
                continue
            runs = [(kind, "plain") for kind in PLAIN_BACKENDS]
            if dtype in FAST_DTYPES and _kernels_take(case.rule):
                runs += [(kind, "fast") for kind in FAST_BACKENDS]
            for kind, path in runs:
                params.append(pytest.param(
                    case, dtype, dataset, kind.values[0], path,
                    id=f"{case.name}-{dtype}-{dataset}-{kind.id}-{path}", marks=kind.marks,
                ))
    return params


def _kernels_take(rule: opt.Rule) -> bool:
    """Whether the fast path compiles ``rule``: norm clips only alone or first in a
    chain, ``SkipNonFinite`` never."""
    if isinstance(rule, opt.SkipNonFinite):
        return False
    opts = rule.opts if isinstance(rule, opt.OptimiserChain) else ()
    reductions = (opt.ClipNorm, opt.ClipGlobalNorm, opt.SkipNonFinite)
    return not any(isinstance(r, reductions) for r in opts[1:])


def test_the_trajectories_are_long_and_wide() -> None:
    assert c.DEFAULT_SIZE > 100_000
    assert STEPS["float32", "normal"] == 1000
    assert {dtype for dtype, _ in STEPS} == {
        "float16", "float32", "float64", "complex64", "complex128"
    }


@pytest.mark.parametrize(("case", "dtype", "dataset", "kind", "path"), _params())
@pytest.mark.parametrize("tier", TIERS)
def test_identical_to_numpy(
    kind: Backend, case: c.Case, dtype: str, dataset: str, path: str, tier: str
) -> None:
    helper = BackendHelper(kind)
    helper.require(dtype)
    if path == "fast":
        fast = pytest.importorskip("agnosticopt.adapters._fast")
        if not fast.available():
            pytest.skip("the fast path needs numba (pip install agnosticopt[fast])")
    before = _fast_counters()
    with fast_path(path == "fast"):
        try:
            c.check_trajectory(helper.conformance, case, dtype, dataset=dataset,
                               steps=(STEPS if tier == "full" else QUICK_STEPS)[dtype, dataset])
        except c.KnownDeviation as exc:
            pytest.xfail(str(exc))
    ran = _fast_counters() - before
    assert (ran > 0) == (path == "fast"), f"the fast path ran for {ran} leaves"


def _fast_counters() -> int:
    """Leaves updated by the compiled kernels so far (0 without numba)."""
    try:
        from agnosticopt.adapters import _fast
    except ImportError:
        return 0
    return _fast.counters["fast"]
