"""The compiled fast path of ``update_`` gives the plain path's bits.

For every rule and chain of the conformance suite, float32 and float64
parameters of more than 100k elements (with zeros, negative zeros, subnormals,
huge values, infinities and NaNs in the gradients) take several ``update_``
steps on numpy and on CPU torch, once with the fast path and once without:
parameters, every state array and every host scalar must be identical (NaNs
compare equal whatever their payload). The counters of ``adapters/_fast.py``
check that the fast path really ran (or really did not, for the cases that must
fall back: ClipNorm, float16, complex, non-contiguous or read-only arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from _backends import fast_path, host_copy, state_leaves
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip(
    "numba", reason="the fast path needs numba (pip install agnosticopt[fast])"
)

from agnosticopt.adapters import _fast, _numba
from agnosticopt.adapters.numpy import numpy_arrays
from agnosticopt.conformance._cases import CASES
from agnosticopt.conformance._data import gradient_pool, initial_parameter

import agnosticopt as opt
from agnosticopt._rule import hyper

N = 131_072 + 17  # > 100k elements, and several chunks of the kernels
STEPS = 7  # RAdam switches branch at step 5; AccumGrad(2) and (3) complete periods

NO_TORCH = importlib.util.find_spec("torch") is None
needs_torch = pytest.mark.skipif(NO_TORCH, reason="torch is not installed")
BACKENDS = ["numpy", pytest.param("torch", marks=needs_torch)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread: on a busy machine its thread pool is much slower."""
    if NO_TORCH:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- data and comparison ---------------------------------------------------------------------------


@functools.cache
def _pool(dtype: str, size: int = N) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """A parameter and gradients with every special value, NaN and inf included."""
    x = initial_parameter(dtype, size)
    grads = []
    for k, g in enumerate(gradient_pool(dtype, "special", size)):
        g = g.copy()
        g[k * 101 % size] = np.nan
        g[(k * 211 + 7) % size] = np.inf if k % 2 else -np.inf
        grads.append(g)
    return x, tuple(grads)


def _convert(kind: str) -> Callable[[np.ndarray], Any]:
    if kind == "torch":
        import torch

        return lambda a: torch.from_numpy(a.copy())
    return np.copy


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    if a.dtype.kind == "c":
        a = a.view(a.real.dtype)
    a[np.isnan(a)] = np.nan
    return a.view(f"u{a.dtype.itemsize}")


def assert_identical(got: list[Any], want: list[Any], what: str) -> None:
    """Same bits in every array (NaNs alike) and the same host scalars."""
    assert len(got) == len(want), f"{what}: state structure differs"
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if not isinstance(w, np.ndarray):
            same = type(g) is type(w) and (g == w or (np.isnan(g) and np.isnan(w)))
            assert same, f"{what}: host value {k}: {g!r} != {w!r}"
            continue
        assert g.dtype == w.dtype, (
            f"{what}: array {k} has dtype {g.dtype}, not {w.dtype}"
        )
        assert g.shape == w.shape, (
            f"{what}: array {k} has shape {g.shape}, not {w.shape}"
        )
        diff = np.flatnonzero(_bits(g) != _bits(w))
        if diff.size:
            i = diff[0]
            msg = (
                f"{what}: array {k}: {diff.size} of {w.size} elements differ; first at "
                f"[{i}]: {g.reshape(-1)[i]!r} != {w.reshape(-1)[i]!r}"
            )
            raise AssertionError(msg)


def _snapshot(tree: Any, model: Any) -> list[Any]:
    leaves = (
        [model] if not isinstance(model, dict) else [model[k] for k in sorted(model)]
    )
    trees = [tree] if not isinstance(tree, dict) else [tree[k] for k in sorted(tree)]
    out: list[Any] = [host_copy(x) for x in leaves]
    for leaf in trees:
        out.extend(state_leaves(leaf.state))
    return out


@dataclasses.dataclass
class Run:
    """The end of a run and how many leaves each path took."""

    result: list[Any]
    fast: int
    plain: int


def _run(
    rule: opt.Rule,
    dtype: str,
    kind: str,
    *,
    fast: bool,
    steps: int = STEPS,
    size: int = N,
) -> Run:
    x0, grads = _pool(dtype, size)
    convert = _convert(kind)
    x = convert(x0)
    gs = [convert(g) for g in grads]
    tree = opt.setup(rule, x)
    before = dict(_fast.counters)
    with fast_path(fast):
        for step in range(steps):
            tree, x = opt.update_(tree, x, gs[step % len(gs)])
    return Run(
        _snapshot(tree, x),
        _fast.counters["fast"] - before["fast"],
        _fast.counters["plain"] - before["plain"],
    )


@functools.cache
def _plain(rule: opt.Rule, dtype: str, kind: str) -> list[Any]:
    return _run(rule, dtype, kind, fast=False).result


# -- every rule and chain ----------------------------------------------------------------------------


def _every_rule_params() -> list[Any]:
    """Every case in each (dtype, backend) in the slow tier; by default each case in
    one (dtype, backend), rotating with the case, so every pair still runs."""
    kinds = [("numpy", []), ("torch", [needs_torch])]
    combos = [
        (dtype, kind, marks)
        for dtype in ("float32", "float64")
        for kind, marks in kinds
    ]
    return [
        pytest.param(
            case.rule,
            dtype,
            kind,
            id=f"{case.name}-{dtype}-{kind}",
            marks=marks if j == i % len(combos) else [*marks, pytest.mark.slow],
        )
        for i, case in enumerate(CASES)
        for j, (dtype, kind, marks) in enumerate(combos)
    ]


@pytest.mark.parametrize(("rule", "dtype", "kind"), _every_rule_params())
def test_fast_path_gives_plain_bits(rule: opt.Rule, dtype: str, kind: str) -> None:
    got = _run(rule, dtype, kind, fast=True)
    assert_identical(got.result, _plain(rule, dtype, kind), f"{rule!r} {dtype} {kind}")
    if _reduces_after_the_start(rule):  # a reduction the fast path does not compile
        assert (got.fast, got.plain) == (0, STEPS)
    else:
        assert (got.fast, got.plain) == (STEPS, 0)


def _reduces_after_the_start(rule: opt.Rule) -> bool:
    """Norm clips are compiled alone or first in a chain; SkipNonFinite never."""
    if isinstance(rule, opt.SkipNonFinite):
        return True
    opts = rule.opts if isinstance(rule, opt.OptimiserChain) else ()
    return any(
        isinstance(r, (opt.ClipNorm, opt.ClipGlobalNorm, opt.SkipNonFinite))
        for r in opts[1:]
    )


# -- falling back ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "complex64"])
def test_float16_and_complex_take_the_plain_path(dtype: str) -> None:
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=1000).astype(dtype)
    grads = [rng.normal(size=1000).astype(dtype) for _ in range(3)]
    results = []
    for fast in (True, False):
        x = x0.copy()
        tree = opt.setup(opt.Adam(), x)
        before = _fast.counters["fast"]
        with fast_path(fast):
            for g in grads:
                tree, x = opt.update_(tree, x, g)
        assert _fast.counters["fast"] == before
        results.append(_snapshot(tree, x))
    assert_identical(results[0], results[1], dtype)


def _strided(kind: str, a: np.ndarray) -> Any:
    """A non-contiguous view holding ``a``'s values."""
    wide = np.zeros((a.size, 2), dtype=a.dtype)
    wide[:, 0] = a
    if kind == "torch":
        import torch

        return torch.from_numpy(wide)[:, 0]
    return wide[:, 0]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("which", ["parameter", "gradient"])
def test_non_contiguous_arrays_take_the_plain_path(kind: str, which: str) -> None:
    x0, grads = _pool("float32", 5000)
    convert = _convert(kind)
    results = []
    for fast in (True, False):
        x = _strided(kind, x0) if which == "parameter" else convert(x0)
        tree = opt.setup(opt.Adam(), x)
        before = _fast.counters["fast"]
        with fast_path(fast):
            for g in grads[:3]:
                g = _strided(kind, g) if which == "gradient" else convert(g)
                tree, x = opt.update_(tree, x, g)
        assert _fast.counters["fast"] == before
        results.append(_snapshot(tree, x))
    assert_identical(results[0], results[1], f"non-contiguous {which}")


def test_read_only_arrays_take_the_plain_path() -> None:
    x0, grads = _pool("float32", 5000)
    results = []
    for fast in (True, False):
        x = x0.copy()
        x.flags.writeable = False
        tree = opt.setup(opt.Momentum(), x)
        tree.state.flags.writeable = False
        before = _fast.counters["fast"]
        with fast_path(fast):
            for g in grads[:3]:
                tree, x = opt.update_(tree, x, g)
        results.append(_snapshot(tree, x))
        # The first step takes the plain path, which returns a new (writeable)
        # parameter and state: the next two steps can take the fast path.
        assert _fast.counters["fast"] == before + (2 if fast else 0)
    assert_identical(results[0], results[1], "read-only")


def test_a_gradient_that_is_the_parameter_takes_the_plain_path() -> None:
    x0, _ = _pool("float64", 5000)
    results = []
    for fast in (True, False):
        x = x0.copy()
        tree = opt.setup(opt.Adam(), x)
        before = _fast.counters["fast"]
        with fast_path(fast):
            tree, x = opt.update_(tree, x, x)  # the kernel would read what it writes
        assert _fast.counters["fast"] == before
        results.append(_snapshot(tree, x))
    assert_identical(results[0], results[1], "gradient is parameter")


def test_a_gradient_that_is_another_parameter_takes_the_plain_path() -> None:
    rng = np.random.default_rng(4)
    model0 = {f"w{k}": rng.normal(size=300) for k in range(5)}
    grads0 = {k: rng.normal(size=300) for k in model0}
    results = []
    for fast in (True, False):
        model = {k: v.copy() for k, v in model0.items()}
        tree = opt.setup(opt.Adam(), model)
        grads = {**grads0, "w4": model["w0"]}  # w0 is written while w4's step reads it
        before = _fast.counters["fast"]
        with fast_path(fast):
            tree, model = opt.update_(tree, model, grads)
        assert _fast.counters["fast"] == before
        results.append(_snapshot(tree, model))
    assert_identical(results[0], results[1], "gradient is another parameter")


# -- trees: many leaves, groups, ties, mixtures -------------------------------------------------------


def _tree_run(kind: str, fast: bool) -> tuple[list[Any], int]:
    """A model of many shapes, dtypes and rules; one leaf skips a step (its
    beta powers then differ from the others'), one array is tied."""
    convert = _convert(kind)
    rng = np.random.default_rng(3)
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (10,), (0,), (513,)]
    model: dict[str, Any] = {
        f"w{k}": convert(rng.normal(size=s).astype(np.float32))
        for k, s in enumerate(shapes)
    }
    model["d"] = convert(rng.normal(size=777))  # float64
    model["h"] = convert(rng.normal(size=99).astype(np.float16))  # plain path
    model["tied"] = model["w1"]
    tree = opt.setup(opt.OptimiserChain(opt.ClipGrad(1.0), opt.Adam()), model)
    tree["w2"] = opt.setup(
        opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam()), model["w2"]
    )
    before = _fast.counters["fast"]
    with fast_path(fast):
        for step in range(4):
            grads = {
                k: convert(rng.normal(size=tuple(v.shape)).astype(host_copy(v).dtype))
                for k, v in model.items()
            }
            if step == 0:
                grads["w3"] = None
            tree, model = opt.update_(tree, model, grads)
    assert model["tied"] is model["w1"]
    keys = [k for k in sorted(model) if k != "tied"]
    return (
        _snapshot({k: tree[k] for k in keys}, {k: model[k] for k in keys}),
        _fast.counters["fast"] - before,
    )


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_mixed_tree_gives_plain_bits(kind: str) -> None:
    fast, count = _tree_run(kind, True)
    plain, none = _tree_run(kind, False)
    assert_identical(fast, plain, f"mixed tree on {kind}")
    assert none == 0
    # 7 float32/64 leaves take the fast path (w2's ClipNorm first in its chain
    # included), w3 misses a step; the float16 leaf takes the plain path
    assert count == 4 * 7 - 1


def test_the_state_arrays_are_written_in_place() -> None:
    x = np.ones(1000, dtype=np.float32)
    tree = opt.setup(opt.Adam(), x)
    m, v = tree.state.m, tree.state.v
    state = tree.state
    tree, x2 = opt.update_(tree, x, np.full(1000, 0.5, dtype=np.float32))
    assert x2 is x
    assert tree.state is not state  # a new state tuple with new beta powers ...
    assert tree.state.m is m
    assert tree.state.v is v
    b1, b2 = np.float32(0.9), np.float32(0.999)
    assert tree.state.beta_t == (b1 * b1, b2 * b2)


@needs_torch
def test_torch_parameters_keep_no_history_and_get_a_new_version() -> None:
    import torch

    p = torch.nn.Parameter(torch.ones(1000))
    tree = opt.setup(opt.Adam(), p)
    version = p._version
    before = _fast.counters["fast"]
    tree, q = opt.update_(tree, p, torch.full((1000,), 0.5))
    assert _fast.counters["fast"] == before + 1
    assert q is p
    assert p.requires_grad
    assert p.grad_fn is None
    assert p._version > version
    assert tree.state.m._version > 0
    assert float(p.detach()[0]) < 1.0


# -- errors change nothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_update_that_raises_changes_nothing(kind: str) -> None:
    convert = _convert(kind)
    x0, grads = _pool("float32", 5000)
    small = np.linspace(-1, 1, 100, dtype=np.float32)
    model = {"a": convert(x0), "b": convert(small)}
    tree = {
        "a": opt.setup(opt.Adam(), model["a"]),
        "b": opt.setup(opt.ClipNorm(1.0), model["b"]),
    }
    tree, model = opt.update_(
        tree, model, {"a": convert(grads[0]), "b": convert(small)}
    )
    before = _snapshot(tree, model)
    state = tree["a"].state
    bad = convert(small)
    bad[3] = np.inf
    with pytest.raises(FloatingPointError):
        opt.update_(tree, model, {"a": convert(grads[1]), "b": bad})
    assert tree["a"].state is state
    assert_identical(_snapshot(tree, model), before, "after a raising update_")


# -- the recorder: every operation, custom rules --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EveryOp(opt.Rule):
    """Uses every operation the recorder knows, on special values."""

    eta: float = 0.5

    def init(self, x: Any, xp: Any) -> Any:
        return (xp.zeros_like(x), xp.full_like(x, -0.0))

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        a, b = state
        (eta,) = hyper(xp, x, self.eta)
        hi = xp.maximum(dx, a)  # array ties: max(+0, -0) = +0
        lo = xp.minimum(dx, b)
        s = xp.add(xp.sign(dx), xp.sign(xp.negative(x)))
        c = xp.clip(dx, -eta, eta)
        w = xp.where(xp.greater(dx, 0), hi, xp.where(xp.less(dx, 0), lo, xp.abs(dx)))
        f = xp.where(xp.isfinite(dx), xp.maximum(c, 0.0), xp.minimum(0, c))
        n = xp.where(xp.not_equal(dx, dx), xp.zeros_like(dx), xp.sqrt(xp.abs2(w)))
        wide = xp.astype(xp.astype(n, "float64"), xp.dtype_name(x))
        q = xp.divide(xp.subtract(xp.multiply(eta, wide), s), xp.add(f, 2))
        return (xp.minimum(lo, 0.0), xp.maximum(hi, -0.0)), xp.add(q, xp.divide(2, x))


@dataclasses.dataclass(frozen=True)
class BySize(opt.Rule):
    """Scales the gradient by 1/size: the recording depends on the shape."""

    def init(self, x: Any, xp: Any) -> None:
        return None

    def apply(self, state: None, x: Any, dx: Any, xp: Any) -> tuple[None, Any]:
        (scale,) = hyper(xp, x, 1 / xp.size(x))
        return None, xp.multiply(dx, scale)


@dataclasses.dataclass(frozen=True)
class PythonOperators(opt.Rule):
    """Uses ``*`` on arrays: works on numpy, cannot be recorded."""

    def init(self, x: Any, xp: Any) -> None:
        return None

    def apply(self, state: None, x: Any, dx: Any, xp: Any) -> tuple[None, Any]:
        return None, dx * 0.5


def _special(dtype: str, size: int) -> np.ndarray:
    info = np.finfo(dtype)
    values = np.array(
        [
            0.0,
            -0.0,
            np.nan,
            np.inf,
            -np.inf,
            info.smallest_subnormal,
            -info.smallest_subnormal,
            info.max,
            -info.max,
            1.0,
            -1.0,
            0.25,
        ],
        dtype=dtype,
    )
    rng = np.random.default_rng(5)
    out = rng.normal(size=size).astype(dtype)
    out[: size // 2] = rng.choice(values, size=size // 2)
    return out


def _model_run(
    rule: opt.Rule,
    model: dict[str, Any],
    grads: dict[str, Any],
    fast: bool,
    steps: int = 2,
) -> tuple[list[Any], int]:
    model = {k: v.copy() for k, v in model.items()}
    tree = opt.setup(rule, model)
    before = _fast.counters["fast"]
    with fast_path(fast):
        for _ in range(steps):
            tree, model = opt.update_(tree, model, grads)
    return _snapshot(tree, model), _fast.counters["fast"] - before


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_recorded_operation_gives_plain_bits(dtype: str) -> None:
    model = {"x": _special(dtype, 4000)}
    grads = {"x": np.roll(_special(dtype, 4000), 7)}
    fast, count = _model_run(EveryOp(), model, grads, True)
    plain, _ = _model_run(EveryOp(), model, grads, False)
    assert count == 2
    assert_identical(fast, plain, f"every operation, {dtype}")


def test_a_rule_that_reads_the_shape_is_recorded_per_shape() -> None:
    rng = np.random.default_rng(6)
    model = {
        "a": rng.normal(size=10),
        "b": rng.normal(size=1000),
        "c": rng.normal(size=10),
    }
    grads = {k: rng.normal(size=v.shape) for k, v in model.items()}
    fast, count = _model_run(BySize(), model, grads, True)
    plain, _ = _model_run(BySize(), model, grads, False)
    assert count == 6
    assert_identical(fast, plain, "by size")


def test_a_rule_using_python_operators_takes_the_plain_path() -> None:
    model = {"x": np.linspace(-1, 1, 100)}
    grads = {"x": np.linspace(2, 3, 100)}
    with pytest.warns(opt.OperatorWarning, match="rule PythonOperators"):
        fast, count = _model_run(PythonOperators(), model, grads, True)
    plain, _ = _model_run(PythonOperators(), model, grads, False)
    assert count == 0
    assert_identical(fast, plain, "python operators")


# -- the switch, the compiler settings, the cache ------------------------------------------------------------


def test_the_switch_turns_the_fast_path_off() -> None:
    assert opt.set_fast_path(False) is True
    try:
        assert _fast.plan(numpy_arrays(), [(opt.Adam(), None, None, None)]) is None
        run = _run(opt.Adam(), "float32", "numpy", fast=False, steps=2, size=100)
        assert (run.fast, run.plain) == (0, 0)
    finally:
        assert opt.set_fast_path(True) is False
    with pytest.raises(TypeError):
        opt.set_fast_path(0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"), [("0", False), ("off", False), ("1", True)]
)
def test_the_environment_variable_sets_the_default(value: str, expected: bool) -> None:
    code = "import agnosticopt._speed as s; print(s.fast_path_enabled())"
    env = {**os.environ, "AGNOSTICOPT_FAST": value}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(expected)


def test_kernels_are_compiled_without_fast_math() -> None:
    from agnosticopt._trace import trace

    state = opt.Adam().init(np.zeros(3, dtype=np.float32), opt.adapter_for(np.zeros(1)))
    recorded = trace(
        opt.Adam(),
        state,
        [state.m, state.v],
        (3,),
        "float32",
        ("float32", "float32"),
        "numpy",
    )
    text = _numba.source(recorded.program, cache=True)
    assert "fastmath=False" in text
    assert "error_model='numpy'" in text
    assert "np.sqrt(" in text
    assert " / " in text


def test_an_unwritable_cache_compiles_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AGNOSTICOPT_CACHE_DIR", str(blocker / "cache"))
    # Eleven Descents in a chain: a structure no other test compiles.
    rule = opt.OptimiserChain(*[opt.Descent(0.01 * k) for k in range(1, 12)])
    model = {"x": np.linspace(-1, 1, 300)}
    grads = {"x": np.linspace(2, 3, 300)}
    fast, count = _model_run(rule, model, grads, True)
    plain, _ = _model_run(rule, model, grads, False)
    assert count == 2
    assert_identical(fast, plain, "in-memory kernel")


@pytest.mark.parametrize("kind", BACKENDS)
def test_large_updates_shared_between_threads_give_plain_bits(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _numba, "THREADS", 3
    )  # more threads than pieces of work is fine too
    rule = opt.OptimiserChain(opt.ClipGrad(0.5), opt.AdamW(lambda_=0.01))
    size = 5 * _numba.PER_THREAD + 123
    fast = _run(rule, "float32", kind, fast=True, steps=3, size=size)
    plain = _run(rule, "float32", kind, fast=False, steps=3, size=size)
    assert fast.fast == 3
    assert_identical(fast.result, plain.result, f"threads, {kind}")


# -- ClipNorm leaves: a scaled gradient (small leaves) or λ in the state (large) ------------------


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("route", ["scaled gradient", "factor in state"])
def test_clip_norm_chains_give_plain_bits_both_ways(
    kind: str, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fast, "SCALE_AT_MOST", 0 if route == "factor in state" else N)
    for rule in (
        opt.OptimiserChain(opt.ClipNorm(100.0, throw=False), opt.AdamW(1e-3)),
        opt.ClipNorm(10.0, 1.0, throw=False),
    ):
        for dtype in ("float32", "float64"):
            got = _run(rule, dtype, kind, fast=True)
            assert (got.fast, got.plain) == (STEPS, 0), (rule, dtype, route)
            assert_identical(got.result, _plain(rule, dtype, kind), f"{rule!r} {route}")


def _small_clip_norm_leaves(kind: str, seed: int) -> tuple[Any, Any, Any, Any, Any]:
    """20 float64 leaves of 32×32 under ``ClipNorm(1), AdamW``: (convert, rng,
    model, rule, tree)."""
    convert = _convert(kind)
    rng = np.random.default_rng(seed)
    model = {f"w{k}": convert(rng.normal(size=(32, 32))) for k in range(20)}
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.AdamW(1e-3))
    return convert, rng, model, rule, opt.setup(rule, model)


@pytest.mark.parametrize("kind", BACKENDS)
def test_small_clip_norm_leaves_share_one_kernel_call(kind: str) -> None:
    convert, rng, model, _, tree = _small_clip_norm_leaves(kind, 5)
    grads = {k: convert(rng.normal(size=(32, 32))) for k in model}
    items = [(leaf.rule, leaf.state, model[k], grads[k]) for k, leaf in tree.items()]
    if kind == "torch":
        from agnosticopt.adapters.torch import torch_arrays

        arrays: Any = torch_arrays(opt.adapter_for(model["w0"]))
    else:
        arrays = numpy_arrays()
    plan = _fast.plan(arrays, items)
    assert plan is not None
    assert all(plan.handled)
    assert len(plan.launches) == 1  # every leaf, each with its own λ: one program
    assert len(plan.made) == len(model)  # the scaled gradients, kept for the run
    assert all(g is not made for g, made in zip(grads.values(), plan.made, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tree_roots_are_each_arrays_own_tree_root(dtype: str) -> None:
    rng = np.random.default_rng(11)
    arrays = [
        rng.normal(size=n).astype(dtype) for n in (1, 3, 255, 256, 257, 70_001, 5)
    ]
    arrays[3][7] = np.inf
    arrays[4][0] = np.nan
    addresses = np.array([numpy_arrays().address(a) for a in arrays], dtype=np.int64)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    for p in (2.0, 1.0, np.inf):
        got = _numba.tree_roots(dtype, p, addresses, sizes)
        for k in range(len(arrays)):
            one = _numba.tree_root(dtype, p, addresses[k : k + 1], sizes[k : k + 1])
            assert got[k].tobytes() == one.tobytes(), (p, k)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_kept_plan_scales_small_clip_norm_leaves_into_one_scratch(kind: str) -> None:
    convert, rng, model, rule, tree = _small_clip_norm_leaves(kind, 6)
    want = {k: host_copy(x) for k, x in model.items()}
    plain = opt.setup(rule, {k: convert(x) for k, x in want.items()})
    plain_model = {k: convert(x) for k, x in want.items()}
    tables = []
    with fast_path(True):
        for _ in range(4):
            grads = {k: convert(rng.normal(size=(32, 32))) for k in model}
            tree, model = opt.update_(tree, model, grads)
            with fast_path(False):
                plain, plain_model = opt.update_(plain, plain_model, grads)
            (kept,) = [p for p in _fast._kept.values() if p.xs[0] is model["w0"]]
            tables.append([launch.table for launch in kept.launches])
    assert kept.cross is not None
    assert kept.cross.scaled is not None
    (group,) = kept.cross.scaled  # one scratch for the 20 leaves
    assert len(group.positions) == len(model)
    # the same views again: the tables as they were (no gradient column refreshed)
    assert len(tables[2]) == len(tables[3])
    assert all(a is b for a, b in zip(tables[2], tables[3], strict=True))
    for k in model:
        assert host_copy(model[k]).tobytes() == host_copy(plain_model[k]).tobytes(), k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_factors_at_once_are_clip_norm_factor(dtype: str) -> None:
    t = np.dtype(dtype).type
    info = np.finfo(dtype)
    norms = np.array(
        [0.0, info.smallest_subnormal, info.tiny, 1e-30, 0.5, 1.0, 3.0, info.max],
        dtype=dtype,
    )
    norms = np.concatenate(
        [norms, [np.inf, np.nan], np.nextafter(norms[4:7], np.inf).astype(dtype)]
    )
    x = np.zeros(3, dtype)
    for omega in (1e-40, 0.5, 1.0, 3.0, 1e30):
        clip = opt.ClipNorm(omega, throw=False)
        got = _fast._factors(np.full(len(norms), omega), norms, dtype)
        want = [clip.factor(t(n), x, _fast._HostDtype(dtype)) for n in norms]
        assert got.dtype == np.dtype(dtype)
        assert [v.tobytes() for v in got] == [v.tobytes() for v in want], omega


def test_the_numpy_address_reader_gives_numpys_address() -> None:
    from agnosticopt.adapters import numpy as numpy_adapter

    base = np.arange(4096, dtype=np.float64).reshape(64, 64)
    arrays = [
        base,
        base[3:],
        base[:, 5:].T,
        base[::2],
        base.astype(np.float32),
        np.empty(0, np.float32),
        np.float16([1, 2]),
        np.ma.masked_array([1.0, 2.0]),  # a subclass: the same struct
    ]
    read = numpy_arrays().address
    for a in arrays:
        assert read(a) == a.__array_interface__["data"][0]
    # this CPython's object header: the ctypes reader, not __array_interface__
    assert numpy_adapter._address is not numpy_adapter._interface_address


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize(
    ("omega", "dtype"), [(np.float32(0.3), "float64"), (np.float16(0.3), "float32")]
)
def test_a_numpy_scalar_omega_gives_clip_norm_factor_bits(
    kind: str, omega: Any, dtype: str
) -> None:
    """ClipNorm with a numpy ω divides in ω's dtype (numpy 2's rules): the kept
    plan's small leaves must take ClipNorm.factor's λ, not the float64 one."""
    rule = opt.OptimiserChain(opt.ClipNorm(omega), opt.Descent(1.0))
    convert = _convert(kind)
    results = []
    for fast in (True, False):
        rng = np.random.default_rng(0)
        model = {"w": convert(rng.standard_normal(1000).astype(dtype))}
        tree = opt.setup(rule, model)
        with fast_path(fast):
            for _ in range(4):
                grads = {"w": convert(rng.standard_normal(1000).astype(dtype))}
                tree, model = opt.update_(tree, model, grads)
        results.append(host_copy(model["w"]).tobytes())
    assert results[0] == results[1]


@needs_torch
@pytest.mark.parametrize("when", ["before the first step", "after it"])
def test_a_default_device_off_the_cpu_keeps_the_fast_paths_scratch_on_it(
    when: str,
) -> None:
    """``torch.set_default_device`` (here ``meta``) must not move the fast path's
    own arrays (scaled gradients, the scratch) off the CPU."""
    import torch

    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam(1e-3))
    results = []
    for fast in (True, False):
        gen = torch.Generator().manual_seed(0)
        model = {
            "w": torch.randn(1000, generator=gen),
            "b": torch.randn(10, generator=gen),
        }
        grads = {
            "w": torch.randn(1000, generator=gen),
            "b": torch.randn(10, generator=gen),
        }
        tree = opt.setup(rule, model)
        try:
            with fast_path(fast):
                if when == "before the first step":
                    torch.set_default_device("meta")
                for step in range(4):
                    tree, model = opt.update_(tree, model, grads)
                    if step == 0:
                        torch.set_default_device("meta")
        finally:
            torch.set_default_device(None)
        results.append([host_copy(x).tobytes() for x in model.values()])
    assert results[0] == results[1]


def _random_launches(draw: Any) -> list[Any]:
    """One or two launches of rows (x, gradient, state) whose written columns (x and
    the state) overlap nothing else, and gradients anywhere: the layout a kept plan
    has when new gradients come."""
    launches = []
    cursor = 0
    for _ in range(draw(st.integers(1, 2))):
        rows = draw(st.integers(1, 5))
        itemsize = draw(st.sampled_from([4, 8]))
        sizes = [draw(st.integers(0, 6)) for _ in range(rows)]
        table = []
        for size in sizes:
            x = cursor + draw(st.integers(0, 3)) * itemsize
            state = x + size * itemsize + draw(st.integers(0, 3)) * itemsize
            cursor = state + size * itemsize
            table.append([x, 0, state])
        launches.append([table, sizes, itemsize])
    top = cursor + 64
    for table, _, itemsize in launches:
        for row in table:  # anywhere: inside, across or beside the written arrays
            row[1] = draw(st.integers(0, top // itemsize)) * itemsize
    return [
        _fast._Launch(
            None,
            np.array(table, dtype=np.int64),
            np.array(sizes, dtype=np.int64),
            (),
            (itemsize, itemsize, itemsize),
            frozenset({0, 2}),
            [],
            np.zeros((0, 3), dtype=np.int64),
        )
        for table, sizes, itemsize in launches
    ]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_new_gradients_overlap_a_written_array_as_overlapping_finds(data: Any) -> None:
    """A kept plan checks only its new gradients against the written arrays
    (``_reads_overlap``); the answer is that of the whole check of the plan."""
    launches = _random_launches(data.draw)
    want = _fast._overlapping(launches)
    assert _fast._reads_overlap(_fast._written_spans(launches), launches, 1) is want


@needs_torch
def test_torch_bulk_checks_answer_as_one_by_one() -> None:
    """``TorchArrays.readable`` and ``TorchAdapter.adapts_all`` (one pass per test,
    for new gradients at every step) give what asking each tensor gives."""
    import torch
    from agnosticopt.adapters.torch import torch_arrays
    from torch._subclasses.fake_tensor import FakeTensorMode

    from agnosticopt._xp import adapter_for

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    good = [base.clone(), torch.nn.Parameter(base.clone()), torch.zeros(0)]
    odd = {
        "float64": base.double(),
        "transposed": base.T,
        "negative view": torch._neg_view(base),
        "sparse": base.to_sparse(),
        "meta": torch.empty(3, device="meta"),
        "complex": torch.zeros(3, dtype=torch.complex64),
        "a numpy array": np.zeros(3, np.float32),
        "a subclass": base.clone().as_subclass(type("Sub", (torch.Tensor,), {})),
        "fake": FakeTensorMode().from_tensor(base),  # data_ptr() 0 out of its mode
    }
    xp = adapter_for(base)
    arrays = torch_arrays(xp)
    assert arrays.dtype(odd["fake"]) is None  # a kernel would read address 0
    _bulk_checks_answer_as_one_by_one(arrays, xp, good, odd, torch.Tensor)


def test_numpy_bulk_checks_answer_as_one_by_one(tmp_path: Any) -> None:
    """``NumpyArrays.readable`` and ``NumpyAdapter.adapts_all`` give what asking
    each array gives."""
    from agnosticopt._xp import adapter_for

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    frozen = base.copy()
    frozen.flags.writeable = False  # read-only: still readable
    unpickled = pickle.loads(pickle.dumps(base))
    tagged = np.zeros(3, np.dtype(np.float32, metadata={"unit": "m"}))
    assert unpickled.dtype is not base.dtype
    good = [base.copy(), frozen, np.zeros(0, np.float32), unpickled, tagged]
    unaligned = np.zeros(13, np.uint8)[1:].view(np.float32)
    mapped = np.memmap(tmp_path / "m", dtype=np.float32, mode="w+", shape=(3,))
    odd = {
        "float64": base.astype(np.float64),
        "transposed": base.T,
        "big-endian": base.astype(">f4"),
        "unaligned": unaligned,
        "masked": np.ma.masked_array(base),
        "memmap": mapped,
        "a scalar": np.float32(1),
        "a list": [1.0],
    }
    xp = adapter_for(base)
    arrays = numpy_arrays()
    assert unaligned.dtype == np.float32
    assert not unaligned.flags.aligned
    _bulk_checks_answer_as_one_by_one(arrays, xp, good, odd, np.ndarray)


def _bulk_checks_answer_as_one_by_one(
    arrays: Any, xp: Any, good: list[Any], odd: dict[str, Any], array_type: type
) -> None:
    """``readable`` and ``adapted_by`` of ``good`` and of ``good`` with each odd one
    (arrays of ``array_type``, or anything) are those of each array asked alone."""
    from agnosticopt._xp import adapted_by, adapter_for

    assert arrays.readable(good, "float32")
    assert adapted_by(good, xp)
    for name, odd_one in odd.items():
        group = [*good, odd_one]
        if isinstance(odd_one, array_type):
            one_by_one = all(arrays.dtype(a) == "float32" for a in group)
            assert arrays.readable(group, "float32") is one_by_one, name
        alone = all(adapter_for(a) is xp for a in group)
        assert adapted_by(group, xp) is alone, name
