"""The fast path's kept tables follow every change of the leaves' arrays.

``adapters/_fast.py`` keeps the table of data addresses of a group of leaves
while their arrays are the same objects (and, on torch, at the same addresses).
Each test runs one sequence of steps and changes (a torch ``p.data``
reassigned, an array of the model, of the gradients or of a state replaced,
gradients written in place, a dtype changed, ``adjust_``, ``freeze_``/``thaw_``)
with the fast path and with the plain path, and compares the bits of every
parameter, state array and host value after every step. A kept table used
after its arrays changed would write into the old memory or read stale
gradients: the bits would differ.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _backends import fast_path, host_copy, state_leaves

pytest.importorskip(
    "numba", reason="the fast path needs numba (pip install agnosticopt[fast])"
)

from agnosticopt.adapters import _fast

import agnosticopt as opt

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


CHANGES: list[Change] = [
    _nothing,
    _nothing,
    _reassign_data,
    _nothing,
    _replace_parameter,
    _replace_gradient,
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


def _steps(kind: str, rule: opt.Rule, *, fast: bool) -> tuple[list[list[Any]], int]:
    rng = np.random.default_rng(5)
    model = {
        k: _array(kind, rng.standard_normal(n).astype(np.float32))
        for k, n in SIZES.items()
    }
    grads = {
        k: _copy(kind, _array(kind, rng.standard_normal(n).astype(np.float32)))
        for k, n in SIZES.items()
    }
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
def test_kept_tables_follow_every_change_of_the_arrays(kind: str, name: str) -> None:
    want, _ = _steps(kind, RULES[name], fast=False)
    got, fast = _steps(kind, RULES[name], fast=True)
    expected = (
        len(SIZES) * len(CHANGES) - 2
    )  # every leaf at every step, b frozen for two
    if (
        name == "global_adamw"
    ):  # a global clip over float32 and float64 leaves: plain path
        expected -= len(SIZES) * (len(CHANGES) - CHANGES.index(_change_dtype))
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
def test_a_tiny_update_takes_the_plain_path_with_the_same_bits(kind: str) -> None:
    """One 10x10 array: recording would cost more than the plain step."""
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
        assert _fast.counters["fast"] == before["fast"]
        results.append([host_copy(x), *state_leaves(tree.state)])
    _same(results[0], results[1], kind)
    leaves, elements = _fast.PLAIN_BELOW[kind]
    assert leaves > 1
    assert elements >= 100


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
