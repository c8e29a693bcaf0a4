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
takes 200 steps in float32 on normal data and shorter elsewhere (numpy's
float16 arithmetic is ten times slower than float32's); the ``quick`` tier of
the default run takes a tenth of those lengths (at least 5 steps) and each
(rule, backend, path) in one (dtype, data set), rotating with the rule, so that
every (dtype, data set, backend, path) runs in it for several rules. ``agnosticopt conformance --dtype float16 --dtype float32 ...`` runs the
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
from _backends import (
    ALL_BACKENDS,
    BackendHelper,
    BackendKind,
    backend_params,
    fast_path,
)

import agnosticopt as opt
from agnosticopt import conformance as c

#: Steps per (dtype, data set) of the full tier; every run has c.DEFAULT_SIZE
#: (> 100k) elements. (The conformance command's own default is longer: 1000.)
STEPS = {
    ("float32", "normal"): 200,
    ("float32", "special"): 20,
    ("float64", "normal"): 20,
    ("float64", "special"): 20,
    ("float16", "normal"): 10,
    ("float16", "special"): 10,
    ("complex64", "normal"): 20,
    ("complex128", "normal"): 20,
}

#: Steps of the quick tier (the default run): a tenth, at least 5.
QUICK_STEPS = {key: max(5, n // 10) for key, n in STEPS.items()}

PLAIN_BACKENDS = [
    p
    for p in backend_params(ALL_BACKENDS)
    if p.values[0] not in (BackendKind.NUMPY, BackendKind.NUMPY_READONLY)
]
#: The backends with a compiled fast path, in the dtypes it covers.
FAST_BACKENDS = backend_params((BackendKind.NUMPY, BackendKind.TORCH))
FAST_DTYPES = ("float32", "float64")


def _params() -> list[Any]:
    """The full tier: every (case, dtype, data set, backend, path); the quick tier:
    each (case, backend, path) in one (dtype, data set), rotating with the case, so
    that every (dtype, data set, backend, path) still runs in the default run."""
    params = []
    for i, case in enumerate(
        c.CASES
    ):  # case outermost: the cached numpy reference is reused
        keys = [
            (dtype, dataset)
            for dtype, dataset in STEPS
            if c.complex_ok(case.rule) or not dtype.startswith("complex")
        ]
        runs = [(kind, "plain") for kind in PLAIN_BACKENDS]
        if _kernels_take(case.rule):
            runs += [(kind, "fast") for kind in FAST_BACKENDS]
        quick = {}
        for j, (kind, path) in enumerate(runs):
            taken = [k for k in keys if path == "plain" or k[0] in FAST_DTYPES]
            quick[kind.id, path] = taken[(i + j) % len(taken)]
        for dtype, dataset in keys:
            for kind, path in runs:
                if path == "fast" and dtype not in FAST_DTYPES:
                    continue
                # one xdist worker per case, which computes its numpy reference once
                group = pytest.mark.xdist_group(case.name)
                tiers = [("full", [*kind.marks, group, pytest.mark.slow])]
                if quick[kind.id, path] == (dtype, dataset):
                    tiers.insert(0, ("quick", [*kind.marks, group]))
                params += [
                    pytest.param(
                        case,
                        dtype,
                        dataset,
                        kind.values[0],
                        path,
                        tier,
                        id=f"{tier}-{case.name}-{dtype}-{dataset}-{kind.id}-{path}",
                        marks=marks,
                    )
                    for tier, marks in tiers
                ]
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
    assert STEPS["float32", "normal"] >= 200
    assert {dtype for dtype, _ in STEPS} == {
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }


@pytest.mark.parametrize(
    ("case", "dtype", "dataset", "kind", "path", "tier"), _params()
)
def test_identical_to_numpy(
    kind: BackendKind, case: c.Case, dtype: str, dataset: str, path: str, tier: str
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
            c.check_trajectory(
                helper.conformance,
                case,
                dtype,
                dataset=dataset,
                steps=(STEPS if tier == "full" else QUICK_STEPS)[dtype, dataset],
            )
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
