"""The conformance suite on sharded backends: dask on a LocalCluster, JAX on 2 devices.

dask: :class:`~agnosticopt.conformance._dask.DaskBackend` (uneven chunks, an
empty one) on a LocalCluster of 2 worker processes on 127.0.0.1. JAX: the
cases run in a subprocess with 2 forced host devices
(``tests/_jax_sharded_conformance.py``), which saves its snapshots; this
process compares them with numpy's bits. (DTensor on 2 gloo ranks:
``test_dtensor.py``.)
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import unittest
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt
from agnosticopt import conformance as c

#: The default tier: elementwise rules and every kind of reduction.
REPRESENTATIVE = ["Adam", "ClipNorm", "WeightDecay+ClipGlobalNorm+Adam"]
DTYPES = ("float32", "float64")


def _dask_backend() -> Any:
    from agnosticopt.conformance._dask import DaskBackend

    return DaskBackend()


def test_dask_backend_chunks_unevenly_with_an_empty_chunk() -> None:
    pytest.importorskip("dask.array", reason="dask is not installed (extra 'test')")
    from agnosticopt.conformance._dask import uneven_chunks

    a = _dask_backend().asarray(np.arange(c.DEFAULT_SIZE, dtype=np.float32))
    assert a.chunks == (uneven_chunks(c.DEFAULT_SIZE),)
    assert 0 in a.chunks[0]  # an empty chunk
    assert len(set(a.chunks[0]) - {0}) == 3  # and three unequal ones
    for rows in range(9):
        assert sum(uneven_chunks(rows)) == rows
        assert 0 in uneven_chunks(rows)
    assert _dask_backend().asarray(np.float64(2.5)).chunks == ()


#: The suite's arrays are numpy data embedded in the graph: dask warns that the graph
#: sent to the scheduler is large (a speed note, not a difference in values).
LARGE_GRAPH = pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")


def _dask_trajectories(
    names: list[str], steps: int, dtypes: tuple[str, ...] = DTYPES
) -> None:
    backend = _dask_backend()
    for name in names:
        for dtype in dtypes:
            c.check_trajectory(backend, c.case_named(name), dtype, steps=steps)


@pytest.mark.slow
@LARGE_GRAPH
def test_dask_conformance_every_case(dask_client: Any) -> None:
    _dask_trajectories([case.name for case in c.CASES], steps=3)


def test_dask_backend_refuses_update_and_skips_its_checks(dask_client: Any) -> None:
    backend = _dask_backend()
    x = backend.asarray(c.initial_parameter("float32", 4099))
    tree = opt.setup(opt.Adam(), {"w": x})
    before = tree["w"].state
    with pytest.raises(TypeError, match=r"'w'.*immutable"):
        opt.update_(tree, {"w": x}, {"w": x})
    assert tree["w"].state is before  # the refused update_ changed nothing
    for check in c.PROPERTY_CHECKS:  # every one calls update_
        with pytest.raises(
            unittest.SkipTest,
            match="dask arrays are immutable: update_ is refused by design",
        ):
            check(backend, c.case_named("Adam"), "float32")


JAX_WORKER = Path(__file__).with_name("_jax_sharded_conformance.py")
#: Even: the parameter splits over the 2 devices; odd (the suite's): replicated.
JAX_SIZES = (c.DEFAULT_SIZE - 1, c.DEFAULT_SIZE)


def _jax_sharded(tmp_path: Path, names: list[str], steps: int) -> dict[str, Any]:
    """The worker's snapshots: 2 forced host devices, in a subprocess killed at timeout."""
    out = tmp_path / "jax_sharded.pkl"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_ENABLE_X64": "1",
        "OMP_NUM_THREADS": "1",
    }
    sizes = ",".join(map(str, JAX_SIZES))
    done = subprocess.run(
        [sys.executable, str(JAX_WORKER), str(out), str(steps), sizes, *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # run() kills the worker when the timeout passes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with out.open("rb") as f:
        found: dict[str, Any] = pickle.load(f)  # our own worker's file
    return found


def _jax_compare(found: dict[str, Any], names: list[str], steps: int) -> None:
    """Each snapshot is numpy's bits, or explained by JAX's declared FTZ deviation."""
    from agnosticopt.conformance._checks import _flushed_trajectory
    from agnosticopt.conformance._compare import compare

    assert found["devices"] == 2
    assert len(found["snapshots"]) == len(names) * len(DTYPES) * len(JAX_SIZES)
    declared = c.get_backend("jax")
    failures, known = [], []
    for name in names:
        case = c.case_named(name)
        for dtype, size in ((d, n) for d in DTYPES for n in JAX_SIZES):
            got = found["snapshots"][name, dtype, size]
            result = compare(
                got, c.reference_trajectory(case.rule, dtype, "normal", steps, size)
            )
            if result.identical:
                continue
            deviation = declared.deviation(dtype, "normal")
            flushed = _flushed_trajectory(case.rule, dtype, "normal", steps, size)
            if deviation and compare(got, flushed).identical:
                known.append(f"{name} {dtype} {size}: {deviation}")
            else:
                failures.append(f"{name} {dtype} {size}: {result.describe()}")
    assert failures == []
    if known:
        pytest.xfail("; ".join(known))


@pytest.mark.slow  # a JAX process with 2 forced devices (~30 s)
def test_jax_two_devices_conformance_representative_cases(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="JAX is not installed (extra 'jax')")
    found = _jax_sharded(tmp_path, REPRESENTATIVE, 5)
    assert found["specs"] == [
        "P('d',)",
        "P()",
    ]  # split (even size) and replicated (odd)
    _jax_compare(found, REPRESENTATIVE, 5)


@pytest.mark.slow
def test_jax_two_devices_conformance_every_case(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="JAX is not installed (extra 'jax')")
    names = [case.name for case in c.CASES]
    found = _jax_sharded(tmp_path, names, 20)
    _jax_compare(found, names, 20)
