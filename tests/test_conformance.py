"""The conformance suite passes on every backend and fails on every planted fault.

* Each known fault (``_faults.py``) is caught by the identity check and by the
  golden check, and the report names rule, dtype and the first differing
  element, which is checked against an independent comparison.
* Every property check passes for every case on the core backends.
* The golden files are what numpy computes now, and every backend matches them.
* ``pytest --pyargs agnosticopt.conformance`` runs against a named backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _backends import ALL_BACKENDS, BackendHelper, BackendKind, backend_params
from _faults import (
    FAULTS,
    declared_ftz_backend,
    declared_ftz_sqrt_backend,
    fma_backend,
    ftz_backend,
    sqrt_backend,
)
from agnosticopt.conformance import _golden

import agnosticopt as opt
from agnosticopt import conformance as c

SIZE, STEPS = 5003, 30  # the faults show within a few steps


def _first_difference(got: dict[str, Any], want: dict[str, Any]) -> tuple[str, int]:
    """The first differing entry and element, found without the suite's code."""
    for path, w in want.items():
        g = got[path]
        if not isinstance(w, np.ndarray):
            if g != w:
                return path, -1
            continue
        gw = np.asarray(g).reshape(-1)
        ww = w.reshape(-1)
        same = (gw.view(f"u{gw.itemsize}") == ww.view(f"u{ww.itemsize}")) | (
            np.isnan(gw) & np.isnan(ww)
        )
        if not same.all():
            return path, int(np.flatnonzero(~same)[0])
    msg = "no difference"
    raise AssertionError(msg)


# (fault, case, dtype, data set): each fault with a rule whose arithmetic meets it
PLANTED = [
    ("sqrt off by one ulp", "Adam", "float32", "normal"),
    ("sqrt off by one ulp", "RMSProp(centred)", "float64", "normal"),
    ("fused multiply-add", "Momentum", "float32", "normal"),
    ("fused multiply-add", "WeightDecay+ClipGrad+Adam", "float64", "normal"),
    ("reciprocal division", "Adam", "float32", "normal"),
    ("reciprocal division", "AccumGrad+Adam", "float64", "normal"),  # n = 3
    ("float32 subnormals flushed", "Adam", "float32", "special"),
    ("float32 subnormals flushed", "Momentum", "float32", "special"),
]


@pytest.mark.parametrize(("fault", "name", "dtype", "dataset"), PLANTED)
def test_trajectory_check_reports_each_planted_fault(
    fault: str, name: str, dtype: str, dataset: str
) -> None:
    backend, case = FAULTS[fault](), c.case_named(name)
    with pytest.raises(c.ConformanceError) as info:
        c.check_trajectory(
            backend, case, dtype, dataset=dataset, steps=STEPS, size=SIZE
        )
    err = info.value
    assert not isinstance(err, c.KnownDeviation)
    assert (err.case, err.dtype, err.dataset, err.backend) == (
        name,
        dtype,
        dataset,
        backend.name,
    )
    got = c.run_trajectory(backend, case.rule, dtype, dataset, steps=STEPS, size=SIZE)
    want = c.reference_trajectory(case.rule, dtype, dataset, STEPS, SIZE)
    path, index = _first_difference(got, want)
    assert err.comparison is not None
    assert err.comparison.first is not None
    first = err.comparison.first
    assert (first.path, first.index) == (path, index)
    message = str(err)
    assert f"{name} in {dtype}, {dataset} data on {backend.name}" in message
    assert f"{path}: " in message
    assert f"first at [{index}]: got " in message
    assert re.search(r"max \d+ ulp", message)


@pytest.mark.parametrize("fault", [f for f in FAULTS if "subnormal" not in f])
def test_golden_check_reports_the_fault(fault: str) -> None:
    backend = FAULTS[fault]()
    failed = []
    for case in (c.case_named("Adam"), c.case_named("WeightDecay+ClipGrad+Adam")):
        with pytest.raises(c.ConformanceError, match="golden file") as info:
            c.check_golden(backend, case, "float32")
        failed.append(info.value.case)
    assert failed == ["Adam", "WeightDecay+ClipGrad+Adam"]


def test_a_fault_in_a_rule_that_does_not_meet_it_passes() -> None:
    # Descent has no sqrt: the check is precise, not merely suspicious
    c.check_trajectory(
        sqrt_backend(), c.case_named("Descent"), "float32", steps=STEPS, size=SIZE
    )


def test_flushing_subnormals_passes_on_normal_data() -> None:
    c.check_trajectory(
        ftz_backend(), c.case_named("Adam"), "float32", steps=STEPS, size=SIZE
    )


def test_a_declared_deviation_is_reported_as_known() -> None:
    with pytest.raises(c.KnownDeviation, match="flushes float32 subnormals") as info:
        c.check_trajectory(
            declared_ftz_backend(),
            c.case_named("Adam"),
            "float32",
            dataset="special",
            steps=STEPS,
            size=SIZE,
        )
    assert "first at [" in str(info.value)
    assert "identical to numpy run with subnormals flushed to zero" in str(info.value)
    # only the declared dtype: float64 has no such excuse
    c.check_trajectory(
        declared_ftz_backend(),
        c.case_named("Adam"),
        "float64",
        dataset="special",
        steps=STEPS,
        size=SIZE,
    )


@pytest.mark.parametrize("case", ["Adam", "RMSProp", "AdaGrad"])
@pytest.mark.parametrize("dataset", ["special", "normal"])
def test_a_declared_deviation_does_not_excuse_another_fault(
    case: str, dataset: str
) -> None:
    # flushing is declared, but the sqrt fault is not what flushing does
    with pytest.raises(c.ConformanceError, match="does not explain it") as info:
        c.check_trajectory(
            declared_ftz_sqrt_backend(),
            c.case_named(case),
            "float32",
            dataset=dataset,
            steps=STEPS,
            size=SIZE,
        )
    assert not isinstance(info.value, c.KnownDeviation)
    assert "differs from numpy run with subnormals flushed" in str(info.value)
    assert "first at [" in str(info.value)


def test_a_declared_deviation_does_not_excuse_another_fault_in_the_golden_check() -> (
    None
):
    with pytest.raises(c.ConformanceError, match="does not explain it") as info:
        c.check_golden(declared_ftz_sqrt_backend(), c.case_named("Adam"), "float32")
    assert not isinstance(info.value, c.KnownDeviation)


def test_property_checks_excuse_nothing() -> None:
    # the deviation is about numpy's bits; a backend must still agree with itself
    from agnosticopt.conformance._checks import _Failure
    from agnosticopt.conformance._compare import compare

    fail = _Failure(
        "update vs update_", declared_ftz_backend(), c.as_case(opt.Adam()), "float32"
    )
    with pytest.raises(c.ConformanceError) as info:
        fail.differs("differs", compare({"x": np.float32([1])}, {"x": np.float32([2])}))
    assert not isinstance(info.value, c.KnownDeviation)


def _jax_cpu() -> Any:
    jax = pytest.importorskip("jax", reason="jax is not installed")
    if jax.devices()[0].platform != "cpu":
        pytest.skip("XLA flushes subnormals on CPU only")
    return jax


def _subnormal_mix(dtype: str, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Operands with subnormals, zeros of both signs, normals and their products' edges."""
    rng = np.random.default_rng(7)
    t = np.dtype(dtype)
    tiny = np.finfo(t).tiny
    pool = np.concatenate(
        [
            rng.uniform(-4, 4, n) * tiny,  # subnormal and just normal
            rng.standard_normal(n) * np.sqrt(tiny),  # products are subnormal
            rng.standard_normal(n),
            [0.0, -0.0, tiny, -tiny, tiny / 2, -tiny / 2],
        ]
    ).astype(t)
    return rng.permutation(pool), rng.permutation(pool)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flushing_reference_has_xla_cpu_semantics_op_by_op(dtype: str) -> None:
    _jax_cpu()
    import jax.numpy as jnp
    from agnosticopt.conformance._flush import flushed_backend

    fb = flushed_backend()
    fx = fb.flushing
    jx = opt.adapter_for(jnp.zeros(2, dtype=dtype))
    a, b = _subnormal_mix(dtype)
    fa, fb_ = fb.asarray(a), fb.asarray(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    tiny = float(np.finfo(dtype).tiny) / 4  # a subnormal host scalar
    ops = {
        "add": lambda xp, p, q: xp.add(p, q),
        "subtract": lambda xp, p, q: xp.subtract(p, q),
        "multiply": lambda xp, p, q: xp.multiply(p, q),
        "divide": lambda xp, p, q: xp.divide(p, q),
        "scalar multiply": lambda xp, p, q: xp.multiply(p, tiny),
        "scalar add": lambda xp, p, q: xp.add(p, tiny),
        "sqrt": lambda xp, p, q: xp.sqrt(xp.abs(p)),
        "abs2": lambda xp, p, q: xp.abs2(p),
        "sign": lambda xp, p, q: xp.sign(p),
        "maximum": lambda xp, p, q: xp.maximum(p, q),
        "minimum": lambda xp, p, q: xp.minimum(p, q),
        "clip": lambda xp, p, q: xp.clip(p, -1, 1),
        "greater": lambda xp, p, q: xp.greater(p, 0),
        "less": lambda xp, p, q: xp.less(p, 0),
        "where": lambda xp, p, q: xp.where(xp.greater(p, q), p, q),
        "abs": lambda xp, p, q: xp.abs(p),
        "negative": lambda xp, p, q: xp.negative(p),
        "astype": lambda xp, p, q: xp.astype(
            p, "float64" if dtype == "float32" else "float32"
        ),
    }
    with np.errstate(all="ignore"):
        for name, op in ops.items():
            got, want = np.asarray(op(jx, ja, jb)), np.asarray(op(fx, fa, fb_))
            assert got.dtype == want.dtype, name
            same = (got.view(f"u{got.itemsize}") == want.view(f"u{want.itemsize}")) | (
                np.isnan(got) & np.isnan(want) if got.dtype.kind == "f" else False
            )
            assert same.all(), (name, np.flatnonzero(~same)[:5])
    assert jx.count_nonzero(ja) == fx.count_nonzero(fa) < np.count_nonzero(a)


def test_flushing_reference_explains_jax_on_normal_range_parameters() -> None:
    # AdaGrad(epsilon=0) with g = 1e-20: g*g is subnormal, flushed to 0, so JAX steps by
    # g*eta/0 = inf; numpy (no flushing) steps by eta. The flushed reference agrees with JAX.
    _jax_cpu()
    import jax.numpy as jnp
    from agnosticopt.conformance._flush import flushed_backend

    rule = opt.AdaGrad(0.1, 0.0)
    x, g = np.float32([1.0, 2.0]), np.float32([1e-20, 1.0])
    results = {}
    for name, make in (
        ("numpy", np.array),
        ("jax", jnp.asarray),
        ("flushed", flushed_backend().asarray),
    ):
        _, new = opt.update(opt.setup(rule, make(x)), make(x), make(g))
        results[name] = np.asarray(new)
    assert (
        0.89 < results["numpy"][0] < 0.91
    )  # a step of about eta (g*g kept as a subnormal)
    assert results["jax"][0] == -np.inf
    assert results["flushed"].tobytes() == results["jax"].tobytes()


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_jax_differences_are_exactly_the_flushed_ones(dtype: str) -> None:
    jax_backend = c.get_backend("jax")
    if jax_backend.unavailable():
        pytest.skip(jax_backend.unavailable() or "")
    _jax_cpu()
    with pytest.raises(
        c.KnownDeviation, match="identical to numpy run with subnormals"
    ):
        c.check_trajectory(
            jax_backend,
            c.case_named("Adam"),
            dtype,
            dataset="special",
            steps=STEPS,
            size=SIZE,
        )


def test_fma_fault_is_really_fused() -> None:
    # the planted FMA changes a*b + c by itself: a*a - round(a*a) keeps the error
    backend = fma_backend()
    xp = backend.faulty
    a = backend.asarray(np.array([1 + 2**-12, 0.5], np.float32))
    rounded = np.asarray(a) * np.asarray(a)
    fused = xp.add(xp.multiply(a, a), backend.asarray(-rounded))
    assert np.asarray(fused)[0] == np.float32(2**-24)
    assert (
        np.asarray(xp.add(backend.asarray(rounded), backend.asarray(-rounded)))[0] == 0
    )


# -- property checks, every case, on the core backends ---------------------------------
@pytest.mark.parametrize("kind", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize("check", c.PROPERTY_CHECKS, ids=lambda f: f.__name__)
def test_property_checks_pass(
    kind: BackendKind, dtype: str, check: Callable[..., Any]
) -> None:
    helper = BackendHelper(kind)
    helper.require(dtype)
    skipped = []
    for case in c.CASES:
        try:
            check(helper.conformance, case, dtype)
        except unittest.SkipTest as exc:
            skipped.append(str(exc))
    assert len(skipped) < len(c.CASES)


@pytest.mark.parametrize("kind", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("dtype", c.GOLDEN_DTYPES)
def test_every_backend_matches_the_golden_files(kind: BackendKind, dtype: str) -> None:
    helper = BackendHelper(kind)
    helper.require(dtype)
    for case in c.CASES:
        c.check_golden(helper.conformance, case, dtype)


def test_golden_files_are_numpy_now_and_small() -> None:
    for dtype in c.GOLDEN_DTYPES:
        meta, snaps = c.load_golden(dtype)
        assert set(snaps) == {case.name for case in c.CASES}
        assert meta["size"] >= 4096
        assert meta["dataset"] == "normal"
        for case in c.CASES:
            assert snaps[case.name]["x"].size == meta["size"]
    total = sum(_golden.golden_path(d).stat().st_size for d in c.GOLDEN_DTYPES)
    assert total < 3_000_000
    from agnosticopt.conformance import generate

    assert generate.main(["--check"]) == 0


def test_golden_files_hold_no_pickle() -> None:
    for dtype in c.GOLDEN_DTYPES:
        with np.load(_golden.golden_path(dtype), allow_pickle=False) as data:
            assert all(data[k].dtype != object for k in data.files)


def test_stale_golden_entry_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = c.Case("Adam", opt.Adam(0.002))
    with pytest.raises(LookupError, match="regenerate"):
        c.check_golden(c.get_backend("numpy"), renamed, "float32")
    with pytest.raises(unittest.SkipTest, match="no golden file for float16"):
        c.check_golden(c.get_backend("numpy"), c.case_named("Adam"), "float16")
    monkeypatch.setattr(
        _golden, "golden_path", lambda d, directory=None: Path("/nonexistent.npz")
    )
    _golden.load_golden.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="generate"):
            c.load_golden("float32")
    finally:
        _golden.load_golden.cache_clear()


def test_generate_writes_loadable_files(tmp_path: Path) -> None:
    from agnosticopt.conformance import generate

    assert generate.main(["--out", str(tmp_path)]) == 0
    for dtype in c.GOLDEN_DTYPES:
        written = (tmp_path / f"golden_{dtype}.npz").read_bytes()
        with (
            np.load(_golden.golden_path(dtype), allow_pickle=False) as committed,
            np.load(tmp_path / f"golden_{dtype}.npz", allow_pickle=False) as new,
        ):
            assert committed.files == new.files
            for key in committed.files:
                if key != "__meta__":
                    np.testing.assert_array_equal(committed[key], new[key], strict=True)
        assert written


# -- the public surface ----------------------------------------------------------------
def test_backends_report_why_they_are_unavailable() -> None:
    reasons = {name: c.get_backend(name).unavailable() for name in c.BUILTIN_BACKENDS}
    assert reasons["numpy"] is None
    assert reasons["numpy_readonly"] is None
    for name, reason in reasons.items():
        assert reason is None or isinstance(reason, str), name
    assert c.get_backend("array_api_strict").unsupported("float16")
    with pytest.raises(ValueError, match="unknown backend"):
        c.get_backend("no-such-backend")


def test_duck_typed_backend_is_accepted() -> None:
    class Mine:
        name = "mine"

        def asarray(self, a: np.ndarray) -> Any:
            return np.array(a)

        def to_numpy(self, a: Any) -> np.ndarray:
            return np.asarray(a)

    backend = c.as_backend(Mine())
    assert backend.name == "mine"
    assert backend.unavailable() is None
    c.check_trajectory(Mine(), opt.Adam(), "float32", steps=3, size=SIZE)
    with pytest.raises(TypeError, match="asarray"):
        c.as_backend(object())


def test_get_backend_imports_a_third_party_factory() -> None:
    backend = c.get_backend("_faults:sqrt_backend")
    assert backend is sqrt_backend()
    numpy_class = c.get_backend("agnosticopt.conformance:NumpyBackend")
    assert numpy_class.name == "numpy"


def test_unavailable_backend_skips() -> None:
    class Absent(c.Backend):
        def unavailable(self) -> str | None:
            return "not here"

    with pytest.raises(unittest.SkipTest, match="absent: not here"):
        c.check_trajectory(Absent("absent"), opt.Adam())


def test_comparison_reports_ulps_signed_zero_and_nan() -> None:
    want = {"x": np.array([1.0, 0.0, np.nan, 2.0], np.float32), "t": np.float32(1)}
    got = {
        "x": np.array(
            [1.0, -0.0, np.nan, np.nextafter(np.float32(2), np.float32(9))], np.float32
        ),
        "t": np.float32(1),
    }
    result = c.compare(got, want)
    (diff,) = result.differences
    assert (diff.path, diff.count, diff.index, diff.max_ulp) == ("x", 2, 1, 1.0)
    assert "0x80000000" in diff.describe()
    nan_vs_number = c.compare({"x": np.array([np.nan])}, {"x": np.array([1.0])})
    assert nan_vs_number.max_ulp == np.inf
    one = np.array([0.1, -0.1, 0.0, 1e300])
    up = np.nextafter(one, np.inf)
    assert c.ulp_distance(up, one).tolist() == [1.0, 1.0, 1.0, 1.0]  # exact in float64
    assert c.ulp_distance(np.array([-np.inf]), np.array([np.inf]))[0] > 2.0**63
    missing = c.compare({}, {"x": np.zeros(1)})
    assert "structure" in missing.describe()


# -- the pytest entry point --------------------------------------------------------------
def _pytest(args: list[str], cwd: Path, **env: str) -> tuple[int, str]:
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **env}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "agnosticopt.conformance",
        "-p",
        "no:cacheprovider",
        "-q",
        *args,
    ]
    run = subprocess.run(
        cmd,
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return run.returncode, run.stdout + run.stderr


def test_pytest_entry_point_fails_on_a_broken_backend(tmp_path: Path) -> None:
    code, out = _pytest(
        [
            "-p",
            "agnosticopt.conformance.pytest_plugin",
            "--backend",
            "_faults:sqrt_backend",
            "--steps",
            "3",
            "--size",
            "4099",
            "--case",
            "Adam",
            "--case",
            "Descent",
            "--dtype",
            "float32",
        ],
        tmp_path,
    )
    assert code == 1, out
    assert (
        "FAILED test_suite.py::test_trajectory[Adam-float32-normal-numpy-sqrt-ulp]"
        in out
    )
    assert "Adam in float32, normal data on numpy-sqrt-ulp" in out
    assert "first at [" in out
    assert "Descent" not in "".join(
        line for line in out.splitlines() if "FAILED" in line
    )
    assert re.search(r"4 failed, 16 passed", out), out


def test_pytest_entry_point_reads_the_environment(tmp_path: Path) -> None:
    code, out = _pytest(
        [],
        tmp_path,
        AGNOSTICOPT_BACKEND="numpy_readonly,torch",
        AGNOSTICOPT_CASE="ClipNorm+Adam",
        AGNOSTICOPT_DTYPE="float64",
        AGNOSTICOPT_STEPS="3",
        AGNOSTICOPT_SIZE="4099",
    )
    assert code == 0, out
    assert re.search(r"^20 passed", out, re.MULTILINE), out
