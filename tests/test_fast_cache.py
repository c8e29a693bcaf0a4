"""The fast path's kept plans and tables follow every change of the leaves.

``adapters/_fast.py`` records each rule's step once (its host values as
symbols, replayed at every step), keeps the table of data addresses of a group
of leaves while their arrays are the same objects (and, on torch, at the same
addresses), and keeps the whole plan of an update for the next one while the
rules, the states it produced and the parameters are the same. Each test runs
one sequence of steps and changes (a torch ``p.data`` reassigned, an array of
the model, of the gradients or of a state replaced, new gradient arrays at
every place, a gradient that is its parameter, a read-only parameter,
gradients written in place, a dtype changed, ``adjust_``,
``freeze_``/``thaw_``) with the fast path and with the plain path, and compares
the bits of every parameter, state array and host value after every step. A
kept plan or table used after its leaves changed would write into the old
memory, read stale gradients or replay stale host values: the bits would differ.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
from _backends import fast_path, host_copy, state_leaves

pytest.importorskip(
    "numba", reason="the fast path needs numba (pip install agnosticopt[fast])"
)

from agnosticopt.adapters import _fast

import agnosticopt as opt
from agnosticopt import _trace

N = 100_003  # > 100k elements, over one chunk of the kernels
SIZES = {"a": N, "b": 1000, "c": 3001}

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)
BACKENDS = ["numpy", pytest.param("torch", marks=needs_torch)]
RULES = {
    "adamw": opt.AdamW(1e-2, lambda_=0.01),
    "clipnorm_adamw": opt.OptimiserChain(
        opt.ClipNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)
    ),
    "global_adamw": opt.OptimiserChain(
        opt.ClipGlobalNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)
    ),
    # λ in the state (``SCALE_AT_MOST`` 0 below): λ = 1 for every leaf, one
    # kernel call, until ``_larger_gradients`` gives each its own λ
    "clipnorm_in_state": opt.OptimiserChain(
        opt.ClipNorm(1000.0), opt.AdamW(1e-2, lambda_=0.01)
    ),
    "skip_adam": opt.SkipNonFinite(opt.Adam(1e-2)),
    "radam": opt.RAdam(1e-2),  # a guard on the host value rho: two recordings
    "accum_adam": opt.OptimiserChain(opt.AccumGrad(3), opt.Adam(1e-2)),
    "scheduled_adam": opt.Scheduled(opt.Adam(1e-2), epsilon=lambda t: 1e-3 / (1 + t)),
}


def _array(kind: str, a: np.ndarray) -> Any:
    if kind == "torch":
        import torch

        return torch.nn.Parameter(torch.from_numpy(a.copy()))
    return a.copy()


def _copy(kind: str, a: Any) -> Any:
    """A new array object (new memory) with the same values."""
    if kind == "torch":
        return a.detach().clone()
    return a.copy()


def _copied_state(kind: str, state: Any) -> Any:
    if isinstance(state, tuple):
        parts = [_copied_state(kind, s) for s in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    if isinstance(state, np.ndarray) or type(state).__module__.startswith("torch"):
        return _copy(kind, state)
    return state


def _snapshot(tree: Any, model: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for name in sorted(model):
        out.append(host_copy(model[name]))
        out.extend(state_leaves(tree[name].state))
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a[np.isnan(a)] = np.nan
    return a.view(f"u{a.dtype.itemsize}")


def _same(got: list[Any], want: list[Any], what: str) -> None:
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype, (what, k)
            assert g.shape == w.shape, (what, k)
            assert np.array_equal(_bits(g), _bits(w)), f"{what}: array {k} differs"
        else:
            assert type(g) is type(w), (what, k, g, w)
            assert g == w or (np.isnan(g) and np.isnan(w)), (what, k, g, w)


Change = Callable[[str, Any, dict[str, Any], dict[str, Any]], None]


def _reassign_data(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    if kind == "torch":  # the same Parameter object, new memory
        model["a"].data = model["a"].data.clone()
    else:
        model["a"] = model["a"].copy()


def _replace_parameter(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    model["b"] = _array(kind, host_copy(model["b"]))


def _replace_gradient(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    grads["a"] = _copy(kind, grads["a"]) * 3


def _new_gradients(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    """New gradient objects at every place (torch's ``zero_grad(set_to_none=True)``)."""
    for name, grad in list(grads.items()):
        grads[name] = _copy(kind, grad)


def _gradient_is_parameter(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    """The parameter as its own gradient: no kernel may run (it writes what it reads)."""
    grads["b"] = model["b"].detach() if kind == "torch" else model["b"]


def _read_only(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    """numpy: a parameter made read-only in place (the plain path makes a new array)."""
    if kind == "numpy":
        model["c"].flags.writeable = False


def _write_gradient(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    with _no_grad(kind):
        grads["c"][...] = grads["c"] * -2  # the same array, new values


def _replace_state(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    tree["a"].state = _copied_state(kind, tree["a"].state)


def _adjust(kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]) -> None:
    opt.adjust_(tree, eta=3e-3, beta=(0.8, 0.99))


def _freeze(kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]) -> None:
    opt.freeze_(tree["b"])


def _thaw(kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]) -> None:
    opt.thaw_(tree["b"])


def _change_dtype(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    if kind == "torch":
        import torch

        model["c"] = torch.nn.Parameter(model["c"].detach().to(torch.float64))
        grads["c"] = grads["c"].to(torch.float64)
    else:
        model["c"] = model["c"].astype(np.float64)
        grads["c"] = grads["c"].astype(np.float64)
    tree["c"] = opt.setup(tree["c"].rule, model["c"])


def _nothing(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    pass


def _larger_gradients(
    kind: str, tree: Any, model: dict[str, Any], grads: dict[str, Any]
) -> None:
    for k, g in list(grads.items()):
        grads[k] = g * 100  # new arrays, norms past ClipNorm(1000)


CHANGES: list[Change] = [
    _nothing,
    _nothing,
    _reassign_data,
    _nothing,
    _larger_gradients,
    _nothing,
    _nothing,  # (three steps: AccumGrad(3) keeps its phase)
    _replace_parameter,
    _replace_gradient,
    _new_gradients,
    _nothing,
    _gradient_is_parameter,
    _new_gradients,
    _read_only,
    _nothing,
    _write_gradient,
    _replace_state,
    _nothing,
    _adjust,
    _nothing,
    _freeze,
    _nothing,
    _thaw,
    _change_dtype,
    _nothing,
]


class _no_grad:  # noqa: N801  (a context manager used like torch.no_grad)
    def __init__(self, kind: str) -> None:
        self.inner: Any = None
        if kind == "torch":
            import torch

            self.inner = torch.no_grad()

    def __enter__(self) -> None:
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


def _model_and_grads(kind: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random float32 parameters of ``SIZES`` on ``kind``, and gradients (copies)."""
    rng = np.random.default_rng(seed)
    model = {
        k: _array(kind, rng.standard_normal(n).astype(np.float32))
        for k, n in SIZES.items()
    }
    grads = {
        k: _copy(kind, _array(kind, rng.standard_normal(n).astype(np.float32)))
        for k, n in SIZES.items()
    }
    return model, grads


def _steps(kind: str, rule: opt.Rule, *, fast: bool) -> tuple[list[list[Any]], int]:
    model, grads = _model_and_grads(kind, seed=5)
    tree = opt.setup(rule, model)
    snapshots = []
    before = _fast.counters["fast"]
    with fast_path(fast):
        for change in CHANGES:
            change(kind, tree, model, grads)
            tree, model = opt.update_(tree, model, grads)
            snapshots.append(_snapshot(tree, model))
    return snapshots, _fast.counters["fast"] - before


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("kind", BACKENDS)
def test_kept_tables_follow_every_change_of_the_arrays(
    kind: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "clipnorm_in_state":
        monkeypatch.setattr(_fast, "SCALE_AT_MOST", 0)
    want, _ = _steps(kind, RULES[name], fast=False)
    got, fast = _steps(kind, RULES[name], fast=True)
    # every leaf at every step, b frozen for two; no kernel while b's gradient is b
    # (but ClipNorm's kernels read each gradient scaled into a new array first)
    expected = len(SIZES) * len(CHANGES) - 2
    if name != "clipnorm_adamw":
        expected -= len(SIZES)
    if kind == "numpy":  # c read-only: the plain path (then a new array)
        expected -= 1
    if name == "global_adamw":  # a clip over float32 and float64 leaves: plain path
        expected -= len(SIZES) * (len(CHANGES) - CHANGES.index(_change_dtype))
    if kind == "numpy" and name in ("global_adamw", "skip_adam"):
        expected -= len(SIZES) - 1  # a read-only leaf sends the others back too
    assert fast == expected
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        _same(g, w, f"{kind} {name}: after step {k} ({CHANGES[k].__name__})")


def test_a_table_is_kept_while_the_arrays_are_the_same() -> None:
    rng = np.random.default_rng(0)
    model = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
    grads = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
    tree = opt.setup(opt.Adam(), model)
    with fast_path(True):
        tree, model = opt.update_(tree, model, grads)
        kept = dict(_fast._tables)
        tree, model = opt.update_(tree, model, grads)
        assert _fast._tables == kept  # no new table: the kept one was used
        model["b"] = model["b"].copy()
        tree, model = opt.update_(tree, model, grads)
        assert len(_fast._tables) == len(kept) + 1 or len(_fast._tables) == 1


def test_an_id_reused_by_a_new_array_is_not_taken_for_the_old_one() -> None:
    """Views of one buffer at new offsets, made after the last one died: CPython
    often gives the new view the dead one's ``id``; the table must follow the
    memory."""
    from agnosticopt.adapters.numpy import numpy_arrays

    arrays = numpy_arrays()
    buffer = np.zeros(1000, np.float32)
    grad = np.zeros(10, np.float32)
    for k in range(0, 400, 20):
        x = buffer[k : k + 10]
        leaf = _fast._Leaf(0, None, None, x, grad, [], 10)
        found = _fast._table(arrays, [leaf], 2)
        assert found.table[0, 0] == x.ctypes.data, k
        del x, leaf


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_tiny_update_takes_the_fast_path_with_the_same_bits(kind: str) -> None:
    """One 10x10 array: replaying the recorded step costs less than the plain
    step (``benchmarks/record_once.py``), so no update is too small for the
    fast path; from the second step on its plan is reused."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((10, 10)).astype(np.float32)
    g = _array(kind, rng.standard_normal((10, 10)).astype(np.float32))
    results = []
    for fast in (True, False):
        x = _array(kind, x0)
        tree = opt.setup(opt.Adam(), x)
        before = dict(_fast.counters)
        with fast_path(fast):
            for _ in range(3):
                tree, x = opt.update_(tree, x, g)
        if fast:
            assert _fast.counters["fast"] - before["fast"] == 3
            assert _fast.counters["reused"] - before["reused"] == 2
        else:
            assert _fast.counters["fast"] == before["fast"]
        results.append([host_copy(x), *state_leaves(tree.state)])
    _same(results[0], results[1], kind)


@pytest.mark.parametrize("kind", BACKENDS)
def test_skip_non_finite_takes_the_fast_path_when_every_gradient_is_finite(
    kind: str,
) -> None:
    """Finite steps run the inner rule's kernels; a step with a NaN or an infinity
    anywhere takes the plain path, which skips it: the bits and skip counts of the
    plain path after every step."""
    rule = opt.SkipNonFinite(opt.AdamW(1e-2, lambda_=0.01))
    bad = {1: ("b", np.nan), 3: ("a", -np.inf)}  # step -> (leaf, value)
    runs = []
    for fast in (True, False):
        rng = np.random.default_rng(2)
        model = {
            k: _array(kind, rng.standard_normal(n).astype(np.float32))
            for k, n in SIZES.items()
        }
        tree = opt.setup(rule, model)
        snapshots, taken = [], []
        with fast_path(fast):
            for step in range(5):
                grads = {
                    k: rng.standard_normal(n).astype(np.float32)
                    for k, n in SIZES.items()
                }
                if step in bad:
                    name, value = bad[step]
                    grads[name][77] = value
                before = _fast.counters["fast"]
                tree, model = opt.update_(
                    tree,
                    model,
                    {
                        k: _array(kind, g).detach() if kind == "torch" else g
                        for k, g in grads.items()
                    },
                )
                taken.append(_fast.counters["fast"] - before)
                snapshots.append(_snapshot(tree, model))
        runs.append((snapshots, taken))
    (got, fast_taken), (want, _) = runs
    assert fast_taken == [len(SIZES), 0, len(SIZES), 0, len(SIZES)]
    assert tree["a"].state.skips == 2
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        _same(g, w, f"{kind}: after step {k}")


def test_a_global_clip_sent_back_to_the_plain_path_keeps_the_clip_norm_leaves_right() -> (
    None
):
    """A read-only parameter in a global-clip group sends that group to the plain
    path; a ClipNorm leaf of the same update still takes its step (kernels and
    state together): the plain path's bits."""
    rules = opt.by_path(
        {
            "c": opt.OptimiserChain(opt.ClipNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)),
            "d": opt.Adam(),
            "*": opt.OptimiserChain(
                opt.ClipGlobalNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)
            ),
        }
    )
    sizes = {**SIZES, "d": 5000}
    runs = []
    for fast in (True, False):
        rng = np.random.default_rng(4)
        model = {k: rng.standard_normal(n).astype(np.float32) for k, n in sizes.items()}
        model["b"].flags.writeable = False
        tree = opt.setup(rules, model)
        before = _fast.counters["fast"]
        with fast_path(fast):
            for _ in range(3):
                grads = {
                    k: rng.standard_normal(n).astype(np.float32)
                    for k, n in sizes.items()
                }
                tree, model = opt.update_(tree, model, grads)
        if fast:  # step 1: c and d; then every leaf (the plain path gave b a new array)
            assert _fast.counters["fast"] - before == 2 + 4 + 4
        runs.append(_snapshot(tree, model))
    _same(runs[0], runs[1], "by_path")


def _recorded_steps(kind: str, rule: opt.Rule, steps: int) -> tuple[int, int, int]:
    """``(recorded, traced, reused)`` counts of ``steps`` updates of three leaves."""
    model, grads = _model_and_grads(kind, seed=7)
    tree = opt.setup(rule, model)
    _fast._recordings.clear()
    before = dict(_fast.counters)
    with fast_path(True):
        for _ in range(steps):
            tree, model = opt.update_(tree, model, grads)
    return tuple(  # type: ignore[return-value]
        _fast.counters[k] - before[k] for k in ("recorded", "traced", "reused")
    )


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_step_is_recorded_once_and_the_plan_kept(kind: str) -> None:
    """Adam's βᵗ change at every step; the recording takes them as symbols: one
    recording for 12 steps, and from the second step on the plan is reused."""
    recorded, traced, reused = _recorded_steps(kind, opt.Adam(1e-2), 12)
    assert (recorded, traced) == (1, 0)
    assert reused == len(SIZES) * 11


def test_a_guard_records_each_branch_once() -> None:
    """RAdam branches on the host value rho (rho > 5 from step 6): two recordings."""
    recorded, traced, _ = _recorded_steps("numpy", opt.RAdam(1e-2), 10)
    assert (recorded, traced) == (2, 0)


def test_a_schedule_is_recorded_at_every_step() -> None:
    """Scheduled reads its step count as a number (a schedule is Python code):
    its step is recorded with the host values at every step, with plain bits
    (``test_kept_tables_follow_every_change_of_the_arrays``)."""
    recorded, traced, reused = _recorded_steps(
        "numpy", opt.Scheduled(opt.Adam(), eta=lambda t: 1e-2 / (1 + t)), 4
    )
    assert (recorded, traced, reused) == (0, 4, 0)


def test_adjust_records_the_new_rule_once() -> None:
    rng = np.random.default_rng(8)
    model = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
    grads = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
    tree = opt.setup(opt.Adam(1e-2), model)
    twin = opt.setup(opt.Adam(1e-2), {k: v.copy() for k, v in model.items()})
    twin_model = {k: v.copy() for k, v in model.items()}
    _fast._recordings.clear()
    before = _fast.counters["recorded"]
    for step in range(6):
        if step == 3:
            opt.adjust_(tree, eta=3e-3, beta=(0.8, 0.99))
            opt.adjust_(twin, eta=3e-3, beta=(0.8, 0.99))
        with fast_path(True):
            tree, model = opt.update_(tree, model, grads)
        with fast_path(False):
            twin, twin_model = opt.update_(twin, twin_model, grads)
    assert _fast.counters["recorded"] - before == 2
    for name in SIZES:
        _same(
            _snapshot(tree, {name: model[name]}),
            _snapshot(twin, {name: twin_model[name]}),
            name,
        )


def test_a_rule_testing_a_host_value_type_is_recorded_at_every_step() -> None:
    """A rule whose host code branches on the type of a state value: the
    recording with symbols differs from the concrete one, so its step is
    recorded with the host values at every step (plain bits)."""

    @dataclasses.dataclass(frozen=True)
    class Typed(opt.Rule):
        eta: float = 0.1

        def init(self, x: Any, xp: Any) -> Any:
            return (xp.zeros_like(x), xp.scalar_type(x)(1))

        def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> Any:
            m, c = state
            scale = c * 2 if isinstance(c, np.floating) else c * 3
            m = xp.add(m, xp.multiply(dx, scale))
            return (m, c + 1), xp.multiply(m, xp.scalar_type(x)(self.eta))

    runs = []
    for fast in (True, False):
        rng = np.random.default_rng(9)
        model = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
        grads = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
        tree = opt.setup(Typed(), model)
        before = dict(_fast.counters)
        with fast_path(fast):
            for _ in range(3):
                tree, model = opt.update_(tree, model, grads)
        if fast:
            assert _fast.counters["recorded"] == before["recorded"]
            assert _fast.counters["traced"] - before["traced"] == 3
            assert _fast.counters["fast"] - before["fast"] == 3 * len(SIZES)
        runs.append(_snapshot(tree, model))
    _same(runs[0], runs[1], "typed")


class _Plain(NamedTuple):
    m: Any
    count: Any


class _Checked(_Plain):
    """A namedtuple state whose own ``__new__`` counts the states made."""

    made: ClassVar[list[int]] = [0]

    def __new__(cls, m: Any, count: Any) -> Any:
        cls.made[0] += 1
        return super().__new__(cls, m, count)


class _Initialised(_Plain):
    """A namedtuple state with an ``__init__`` (run by ``cls(...)`` only)."""

    inits: ClassVar[list[int]] = [0]

    def __init__(self, m: Any, count: Any) -> None:
        type(self).inits[0] += 1


class _Counting(type):
    """A metaclass that counts the instances its classes make."""

    made: ClassVar[list[int]] = [0]

    def __call__(cls, *args: Any) -> Any:
        _Counting.made[0] += 1
        return super().__call__(*args)


class _Metaclassed(_Plain, metaclass=_Counting):
    """A namedtuple state whose metaclass's ``__call__`` counts the states made."""


@pytest.mark.parametrize("kind", [_Plain, _Checked, _Initialised, _Metaclassed])
def test_a_kept_plan_makes_each_state_with_its_class_constructor(kind: type) -> None:
    """The new states of a kept plan are made in one call per launch, by
    ``tuple.__new__`` for a plain namedtuple only: a state class with its own
    ``__new__`` or ``__init__``, or a metaclass with its own ``__call__``, still
    has it run for every new state."""

    @dataclasses.dataclass(frozen=True)
    class Counting(opt.Rule):
        eta: float = 0.1

        def init(self, x: Any, xp: Any) -> Any:
            return kind(xp.zeros_like(x), 0)

        def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> Any:
            m = xp.add(state.m, dx)
            return kind(m, state.count + 1), xp.multiply(m, xp.scalar_type(x)(self.eta))

    assert _trace._plain_namedtuple(_Plain)
    assert not _trace._plain_namedtuple(kind) or kind is _Plain
    runs = []
    for fast in (True, False):
        model, grads = _model_and_grads("numpy", seed=4)
        tree = opt.setup(Counting(), model)
        before = dict(_fast.counters)
        made = (_Checked.made[0], _Initialised.inits[0], _Counting.made[0])
        with fast_path(fast):
            for _ in range(4):
                tree, model = opt.update_(tree, model, grads)
        if fast:
            assert _fast.counters["reused"] - before["reused"] >= 2 * len(SIZES)
        if kind is _Checked:
            assert _Checked.made[0] - made[0] >= 4 * len(SIZES)
        if kind is _Initialised:
            assert _Initialised.inits[0] - made[1] >= 4 * len(SIZES)
        if kind is _Metaclassed:
            assert _Counting.made[0] - made[2] >= 4 * len(SIZES)
        assert all(type(leaf.state) is kind for leaf in tree.values())
        assert all(leaf.state.count == 4 for leaf in tree.values())
        runs.append(_snapshot(tree, model))
    _same(runs[0], runs[1], kind.__name__)


def _forget() -> None:
    """Drop every kept plan, table and recording: the next update starts fresh."""
    _fast._kept.clear()
    _fast._tables.clear()
    _fast._recordings.clear()


def _moved(kind: str, model: dict[str, Any]) -> Any:
    """``a`` at new memory: torch ``p.data = ...`` (the same Parameter), numpy a new
    array in the model. Returns the old memory's array."""
    if kind == "torch":
        old = model["a"].data
        model["a"].data = old.clone()
        return old
    old = model["a"]
    model["a"] = old.copy()
    return old


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_kept_plan_is_dropped_when_a_parameter_moves(kind: str) -> None:
    """The plan is reused while the leaves are the same; ``a`` moved to new memory
    gives a new plan (the old memory is not written), the same recording, and
    the bits of updates that kept nothing from one step to the next."""
    runs, reused, olds = [], [], []
    for fresh in (False, True):
        rng = np.random.default_rng(11)
        model = {
            k: _array(kind, rng.standard_normal(n).astype(np.float32))
            for k, n in SIZES.items()
        }
        grads = {
            k: _copy(kind, _array(kind, rng.standard_normal(n).astype(np.float32)))
            for k, n in SIZES.items()
        }
        tree = opt.setup(opt.Adam(1e-2), model)
        _forget()
        recorded = _fast.counters["recorded"]
        snapshots = []
        with fast_path(True):
            for step in range(6):
                if step == 3:
                    old = _moved(kind, model)
                    kept = host_copy(old)
                if fresh:
                    _forget()
                before = _fast.counters["reused"]
                tree, model = opt.update_(tree, model, grads)
                if not fresh:
                    reused.append(_fast.counters["reused"] - before)
                snapshots.append(_snapshot(tree, model))
        if not fresh:
            assert _fast.counters["recorded"] - recorded == 1
            olds.append((old, kept))
        runs.append(snapshots)
    n = len(SIZES)
    assert reused == [0, n, n, 0, n, n]
    old, kept = olds[0]
    _same([host_copy(old)], [kept], f"{kind}: the old memory of a")
    for k, (got, want) in enumerate(zip(*runs, strict=True)):
        _same(got, want, f"{kind}: after step {k}")


def test_a_new_dtype_or_rule_is_recorded_anew() -> None:
    """A recording serves every tree of the same rule and dtype; another dtype,
    or the rule inside a chain (another state structure), is recorded anew."""
    rng = np.random.default_rng(12)
    adam = opt.Adam(1e-2)

    def recordings(rule: opt.Rule, dtype: str) -> int:
        model = {k: rng.standard_normal(n).astype(dtype) for k, n in SIZES.items()}
        grads = {k: rng.standard_normal(n).astype(dtype) for k, n in SIZES.items()}
        tree = opt.setup(rule, model)
        before = _fast.counters["recorded"]
        with fast_path(True):
            for _ in range(3):
                tree, model = opt.update_(tree, model, grads)
        return _fast.counters["recorded"] - before

    _forget()
    assert recordings(adam, "float32") == 1
    assert recordings(adam, "float32") == 0  # a new tree, the same recording
    assert recordings(adam, "float64") == 1
    assert recordings(opt.OptimiserChain(opt.WeightDecay(1e-3), adam), "float32") == 1
    assert recordings(adam, "float64") == 0


def _torch_steps(
    change: str, *, fast: bool
) -> tuple[list[list[Any]], list[Any], list[int]]:
    """Five Adam steps on torch, ``change`` made before the fourth: (snapshots,
    errors, leaves the kernels updated at each step)."""
    import torch

    rng = np.random.default_rng(13)
    values = {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}
    grads = {
        k: torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        for k, n in SIZES.items()
    }
    inference = change == "inference mode left"
    with torch.inference_mode(inference):
        model = {k: torch.from_numpy(v.copy()) for k, v in values.items()}
        tree = opt.setup(opt.Adam(1e-2), model)
    snapshots, errors, kernels = [], [], []
    with fast_path(fast):
        for step in range(5):
            before = _fast.counters["fast"]
            if step == 3 and change == "state given a grad_fn":
                m = tree["b"].state.m
                with torch.enable_grad():
                    m.add_(torch.zeros_like(m, requires_grad=True))  # not a leaf now
                assert m.grad_fn is not None
            in_mode = inference and step < 3
            try:
                with torch.inference_mode(in_mode):
                    tree, model = opt.update_(tree, model, grads)
                errors.append(None)
            except RuntimeError as exc:
                errors.append(type(exc))
            kernels.append(_fast.counters["fast"] - before)
            with torch.inference_mode(inference):
                snapshots.append(_snapshot(tree, model))
    return snapshots, errors, kernels


@needs_torch
@pytest.mark.parametrize("change", ["inference mode left", "state given a grad_fn"])
def test_a_kept_plan_asks_whether_torch_tensors_are_still_writeable(
    change: str,
) -> None:
    """Inference tensors stepped in inference mode, then outside it; a state tensor
    that an in-place operation made a non-leaf that requires grad: the kept plan
    must not write into them (the plain path's bits)."""
    want, want_errors, _ = _torch_steps(change, fast=False)
    got, got_errors, kernels = _torch_steps(change, fast=True)
    assert got_errors == want_errors
    n = len(SIZES)
    # step 4: no leaf outside inference mode, every leaf but b (its m has a
    # grad_fn); the plain path gives new arrays there, and step 5 is fast again
    expected = [n, n, n, 0 if change == "inference mode left" else n - 1, n]
    assert kernels == expected
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        _same(g, w, f"{change}: after step {k}")


def _moved_storage(how: str, tree: Any, grads: dict[str, Any]) -> None:
    """Move a state tensor's or a kept gradient's memory under the same object."""
    import torch

    m = tree["a"].state.m
    g = grads["a"]
    if how == "state .data =":
        m.data = m.data.clone()
    elif how == "state set_":
        with torch.no_grad():
            m.set_(m.clone())
    elif how == "gradient .data =":
        g.data = g.data * 0.5
    else:  # "gradient set_"
        g.set_(g * 0.5)


@needs_torch
@pytest.mark.parametrize(
    "how",
    [
        "state .data =",
        "state set_",
        "gradient .data =",
        "gradient set_",
    ],
)
def test_a_torch_tensor_moved_to_other_memory_gets_a_new_plan(how: str) -> None:
    """A state tensor or a gradient kept from the last step whose memory moved
    (the old memory freed): the kept plan must not write or read there; the
    bits of the plain path. (``torch.utils.swap_tensors`` refuses tensors that
    have weak references, which the fast path's tables hold.)"""
    runs = []
    for fast in (True, False):
        model, grads = _model_and_grads("torch", seed=17)
        tree = opt.setup(opt.Adam(1e-2), model)
        with fast_path(fast):
            for step in range(5):
                if step == 3:
                    _moved_storage(how, tree, grads)
                tree, model = opt.update_(tree, model, grads)
        runs.append(_snapshot(tree, model))
    _same(runs[0], runs[1], how)


def _relaid(how: str, model: dict[str, Any], grads: dict[str, Any]) -> None:
    """Give a parameter or a kept gradient another dtype or layout in place: the
    same object, the same memory, the same shape."""
    p, g = model["w"], grads["w"]
    if how == "numpy parameter .dtype =":
        p.dtype = np.int32
    elif how == "numpy gradient .dtype =":
        g.dtype = np.int32
    elif how == "torch gradient viewed as int32":
        g.data = g.data.view(torch_int32())
    elif how == "torch parameter transposed":
        p.data = p.data.T
    else:  # "torch gradient transposed"
        g.data = g.data.T


def torch_int32() -> Any:
    import torch

    return torch.int32


RELAID = [
    "numpy parameter .dtype =",
    "numpy gradient .dtype =",
    pytest.param("torch gradient viewed as int32", marks=needs_torch),
    pytest.param("torch parameter transposed", marks=needs_torch),
    pytest.param("torch gradient transposed", marks=needs_torch),
]


@pytest.mark.parametrize("how", RELAID)
def test_an_array_given_another_dtype_or_layout_in_place_gets_a_new_plan(
    how: str,
) -> None:
    """A parameter or gradient kept from the last step, viewed in place as
    another dtype or transposed (a square one: the same object, memory and
    shape): the kept plan must not read or write it as it was; the bits (or the
    error) of the plain path. (A torch Parameter cannot be given an integer
    dtype: ``.data =`` refuses.)"""
    kind = how.split()[0]
    runs = []
    for fast in (True, False):
        rng = np.random.default_rng(21)
        model = {"w": _array(kind, rng.standard_normal((320, 320)).astype(np.float32))}
        grads = {
            "w": _copy(
                kind, _array(kind, rng.standard_normal((320, 320)).astype(np.float32))
            )
        }
        tree = opt.setup(opt.Adam(1e-2), model)
        errors = []
        with fast_path(fast):
            for step in range(5):
                if step == 3:
                    _relaid(how, model, grads)
                try:
                    tree, model = opt.update_(tree, model, grads)
                    errors.append(None)
                except (TypeError, ValueError, RuntimeError) as exc:
                    errors.append((type(exc), str(exc)))
        snapshot = [np.asarray(a) for a in _snapshot(tree, model)]
        runs.append(([(a.dtype, a.shape, a.tobytes()) for a in snapshot], errors))
    assert runs[0][1] == runs[1][1]
    assert runs[0][0] == runs[1][0], how
