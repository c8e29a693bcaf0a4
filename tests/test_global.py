"""The aligned-block reduction, global-norm clipping and the non-finite skip.

Identity tests compare bits (``view``) on arrays of more than 100k elements,
against numpy's plain path.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from _backends import BackendHelper, fast_path

import agnosticopt as opt
from agnosticopt._norm import (
    NUMERICS_VERSION,
    combine_nodes,
    norm_nodes,
    reduce_piece,
    tree_reduce,
)

N = 131_101  # > 100k, odd, not near a power of two
PIECES = (2, 3, 4, 7, 8, 16, 64)
BITS = {"float32": np.uint32, "float64": np.uint64}


def _bits(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.view(BITS[a.dtype.name])


def _data(n: int = N, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 3)).astype(dtype)


def _cuts(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """``k`` pieces at random cut points, some of them empty (repeated cuts)."""
    inner = rng.integers(0, n + 1, k - 1)
    if k > 2:
        inner[: k // 3] = inner[k // 3]  # a run of empty pieces
    return [0, *sorted(inner.tolist()), n]


def _reference(values: np.ndarray, op: Any) -> Any:
    """The tree by its definition: node (L, j) = op(left, right), or left alone."""
    n = len(values)

    def node(level: int, j: int) -> Any:
        if level == 0:
            return values[j]
        left, right = (level - 1, 2 * j), (level - 1, 2 * j + 1)
        if right[1] << right[0] >= n:
            return node(*left)
        return op(node(*left), node(*right))

    return node((n - 1).bit_length(), 0)


# -- the reduction -------------------------------------------------------------------


def test_numerics_version_is_two() -> None:
    assert opt.NUMERICS_VERSION == NUMERICS_VERSION == 2


@pytest.mark.parametrize("n", [*range(1, 70), 255, 256, 257, 1000])
def test_tree_matches_its_definition(n: int) -> None:
    values = _data(n)
    xp = opt.adapter_for(values)
    got = tree_reduce(xp, values, xp.add)[0]
    want = _reference(values, lambda a, b: np.float32(a + b))
    assert _bits(got) == _bits(want)


def test_tree_is_not_the_version_one_order() -> None:
    """Adjacent pairs first: the first level adds 0+1, not 0 + n/2 (version 1)."""
    values = np.array([1.0, 1e8, -1e8, 1.0], dtype=np.float32)  # (1+1e8)+(-1e8+1) = 0
    xp = opt.adapter_for(values)
    assert float(tree_reduce(xp, values, xp.add)[0]) == 0.0  # version 1 gave 2.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [2, 1, math.inf, -math.inf])
def test_pieces_give_the_bits_of_one_process(
    any_backend: BackendHelper, dtype: str, p: float
) -> None:
    any_backend.require(dtype)
    if any_backend.name == "jax":
        pytest.skip(
            "JAX compiles every new shape (minutes for 64 random pieces): "
            "test_pieces_every_p_on_every_backend (slow) runs it"
        )
    if any_backend.name != "numpy" and (dtype, p) != ("float32", 2):
        pytest.skip(
            "the full p x dtype matrix runs on numpy; other backends: p=2 float32 "
            "here, every p in test_pieces_every_p_on_every_backend (slow)"
        )
    _check_pieces(any_backend, dtype, p)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [2, 1, math.inf, -math.inf])
def test_pieces_every_p_on_every_backend(
    any_backend: BackendHelper, dtype: str, p: float
) -> None:
    any_backend.require(dtype)
    # JAX compiles every new slice shape (seconds each): it takes 2 and 3 pieces (its
    # code is the same for every piece), the other backends every count of PIECES.
    _check_pieces(
        any_backend, dtype, p, (2, 3) if any_backend.name == "jax" else PIECES
    )


def _check_pieces(
    any_backend: BackendHelper, dtype: str, p: float, pieces: tuple[int, ...] = PIECES
) -> None:
    whole = _data(dtype=dtype)
    np_xp = opt.adapter_for(whole)
    want_nodes, combine = norm_nodes(np_xp, whole, p, 0)
    want = combine_nodes(want_nodes, N, combine)
    arr = any_backend.asarray(whole)
    xp = opt.adapter_for(arr)
    rng = np.random.default_rng(int(p) if math.isfinite(p) else 99)
    for k in pieces:
        cuts = _cuts(rng, N, k)
        nodes: list[Any] = []
        for lo, hi in itertools.pairwise(cuts):
            found, comb = norm_nodes(xp, arr[lo:hi], p, lo)
            nodes += found
        got = combine_nodes(reversed(nodes), N, comb)  # in any order
        assert _bits(any_backend.to_numpy(got)) == _bits(want), (k, cuts)


@pytest.mark.parametrize("op", ["add", "maximum", "minimum"])
def test_reduce_piece_any_combine(op: str) -> None:
    values = _data()
    xp = opt.adapter_for(values)
    combine = getattr(xp, op)
    want = tree_reduce(xp, values, combine)
    rng = np.random.default_rng(5)
    for k in PIECES:
        cuts = _cuts(rng, N, k)
        nodes = [
            node
            for lo, hi in itertools.pairwise(cuts)
            for node in reduce_piece(xp, values[lo:hi], lo, combine, N)
        ]
        assert len(nodes) <= 2 * k * N.bit_length()
        assert _bits(combine_nodes(nodes, N, combine)) == _bits(want)


def test_a_piece_reduces_at_most_two_log_n_nodes() -> None:
    values = _data(1 << 17)
    xp = opt.adapter_for(values)
    nodes = reduce_piece(xp, values[1:-1], 1, xp.add)
    assert len(nodes) == 2 * (17 - 1)


def test_combine_nodes_refuses_gaps_and_overlaps() -> None:
    values = _data(1000)
    xp = opt.adapter_for(values)
    first = reduce_piece(xp, values[:400], 0, xp.add)
    last = reduce_piece(xp, values[500:], 500, xp.add)
    with pytest.raises(ValueError, match="exactly once"):
        combine_nodes(first + last, 1000, xp.add)
    again = reduce_piece(xp, values[300:], 300, xp.add)
    with pytest.raises(ValueError, match="exactly once"):
        combine_nodes(first + again, 1000, xp.add)
    with pytest.raises(ValueError, match="not inside"):
        reduce_piece(xp, values, 10, xp.add, total=1000)
    with pytest.raises(ValueError, match="at least one"):
        combine_nodes([], 0, xp.add)


@pytest.mark.parametrize("p", [2, 1, math.inf, -math.inf])
def test_norm_is_the_same_on_every_backend(
    any_backend: BackendHelper, p: float
) -> None:
    if any_backend.name == "jax" and p != 2:
        pytest.skip(
            "JAX compiles every level's shape (~10 s): p = 2 here, every p in "
            "test_pieces_every_p_on_every_backend (slow)"
        )
    values = _data(dtype="float32")
    want = opt.norm(values, p)
    got = opt.norm(any_backend.asarray(values), p)
    assert _bits(got) == _bits(want)


# -- ClipGlobalNorm ------------------------------------------------------------------------


def _model(dtype: str = "float32") -> dict[str, Any]:
    rng = np.random.default_rng(3)
    shapes = {"emb": (300, 257), "w": [(129, 65), (1,), (3, 1, 2)], "b": (1000,)}

    def make(shape: Any) -> Any:
        if isinstance(shape, list):
            return [make(s) for s in shape]
        return np.asarray(rng.standard_normal(shape)).astype(dtype)

    return {key: make(shape) for key, shape in shapes.items()}


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [a for k in tree for a in _leaves(tree[k])]
    if isinstance(tree, list):
        return [a for t in tree for a in _leaves(t)]
    return [tree]


def _convert(backend: BackendHelper, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _convert(backend, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_convert(backend, v) for v in tree]
    return None if tree is None else backend.asarray(tree)


def _run(
    backend: BackendHelper,
    rule: opt.Rule,
    model: Any,
    grads: list[Any],
    *,
    in_place: bool,
) -> tuple[Any, list[np.ndarray]]:
    m = _convert(backend, model)
    tree = opt.setup(rule, m)
    step = opt.update_ if in_place else opt.update
    for g in grads:
        tree, m = step(tree, m, _convert(backend, g))
    return tree, [backend.to_numpy(a) for a in _leaves(m)]


CHAINS = {
    "first": opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-2)),
    "middle": opt.OptimiserChain(
        opt.WeightDecay(0.1), opt.ClipGlobalNorm(5.0), opt.Adam()
    ),
    "p1_last": opt.OptimiserChain(opt.Momentum(), opt.ClipGlobalNorm(30.0, 1)),
    "inf_twice": opt.OptimiserChain(
        opt.ClipGlobalNorm(0.5, math.inf), opt.Descent(0.1), opt.ClipGlobalNorm(0.01)
    ),
    "alone": opt.ClipGlobalNorm(2.0),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_global_clip_is_identical_on_every_backend(
    any_backend: BackendHelper, name: str
) -> None:
    if any_backend.name == "jax":
        pytest.skip(
            "JAX compiles every new slice shape (~40 s a chain): "
            "test_global_clip_is_identical_on_jax (slow) runs it"
        )
    _check_chain(any_backend, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_global_clip_is_identical_on_jax(name: str) -> None:
    from _backends import BackendKind, backend_params

    (param,) = backend_params((BackendKind.JAX,))
    if param.marks:
        pytest.skip(param.marks[0].kwargs["reason"])
    _check_chain(BackendHelper(BackendKind.JAX), name)


def _check_chain(any_backend: BackendHelper, name: str) -> None:
    model = _model()
    grads = [_model(), {**_model(), "b": None}, _model()]
    grads[1]["w"][0] = grads[1]["w"][0] * 100
    _, want = _run(BackendHelper(_numpy()), CHAINS[name], model, grads, in_place=False)
    for in_place in (False, True):
        _, got = _run(any_backend, CHAINS[name], model, grads, in_place=in_place)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(_bits(a), _bits(b)), (name, in_place)


@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_global_clip_scales_by_the_norm_of_the_concatenation(p: float) -> None:
    model, grads = _model(), _model()
    flat = np.concatenate([g.ravel() for g in _leaves(grads)])
    total = opt.norm(flat, p)  # one array: the global norm by definition
    omega = float(total) / 3
    lam = np.minimum(np.float32(omega) / total, np.float32(1))
    _, got = _run(
        BackendHelper(_numpy()),
        opt.ClipGlobalNorm(omega, p),
        model,
        [grads],
        in_place=False,
    )
    for x, g, new in zip(_leaves(model), _leaves(grads), got, strict=True):
        assert np.array_equal(_bits(new), _bits(x - g * lam))


def test_global_clip_does_not_depend_on_the_layout() -> None:
    """One leaf holding everything, or many leaves: the same factor."""
    model, grads = _model(), _model()
    rule = opt.ClipGlobalNorm(1.0)
    flat_x = np.concatenate([a.ravel() for a in _leaves(model)])
    flat_g = np.concatenate([a.ravel() for a in _leaves(grads)])
    _, (one,) = _run(BackendHelper(_numpy()), rule, flat_x, [flat_g], in_place=False)
    _, many = _run(BackendHelper(_numpy()), rule, model, [grads], in_place=False)
    assert np.array_equal(_bits(one), _bits(np.concatenate([a.ravel() for a in many])))


def test_global_clip_small_gradients_are_unchanged() -> None:
    model = _model()
    grads = dict(_model().items())
    _, got = _run(
        BackendHelper(_numpy()), opt.ClipGlobalNorm(1e9), model, [grads], in_place=False
    )
    for x, g, new in zip(_leaves(model), _leaves(grads), got, strict=True):
        assert np.array_equal(_bits(new), _bits(x - g))


def test_global_clip_mixed_dtypes_reduce_in_the_widest() -> None:
    model = {"a": _data(5000, "float32", 1), "b": _data(7000, "float64", 2)}
    grads = {"a": _data(5000, "float32", 3), "b": _data(7000, "float64", 4)}
    flat = np.concatenate([(grads["a"] ** 2).astype(np.float64), grads["b"] ** 2])
    xp = opt.adapter_for(flat)
    total = np.sqrt(tree_reduce(xp, flat, xp.add)[0])
    lam = min(np.float64(1.0) / total, np.float64(1))
    tree = opt.setup(opt.ClipGlobalNorm(1.0), model)
    _, new = opt.update(tree, model, grads)
    assert np.array_equal(new["b"], model["b"] - grads["b"] * lam)
    assert np.array_equal(new["a"], model["a"] - grads["a"] * np.float32(lam))


def test_global_clip_throw_changes_nothing(backend: BackendHelper) -> None:
    model, grads = _model(), _model()
    grads["w"][0][3, 4] = np.inf
    m = _convert(backend, model)
    rule = opt.OptimiserChain(opt.ClipGlobalNorm(1.0, throw=True), opt.Adam())
    tree = opt.setup(rule, m)
    before = [backend.to_numpy(a).copy() for a in _leaves(m)]
    with pytest.raises(FloatingPointError, match=r"global 2\.0-norm of inf"):
        opt.update_(tree, m, _convert(backend, grads))
    assert all(
        np.array_equal(a, backend.to_numpy(b))
        for a, b in zip(before, _leaves(m), strict=True)
    )
    assert _summary_of(tree) == _summary_of(opt.setup(rule, _convert(backend, model)))


def _summary_of(tree: Any) -> list[str]:
    return [
        repr(np.asarray(s))
        for leaf in _tree_leaves(tree)
        for s in _host_values(leaf.state)
    ]


def _tree_leaves(tree: Any) -> list[opt.Leaf]:
    if isinstance(tree, opt.Leaf):
        return [tree]
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _tree_leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _tree_leaves(v)]
    return []


def _host_values(state: Any) -> list[Any]:
    if isinstance(state, tuple):
        return [v for s in state for v in _host_values(s)]
    return [state] if isinstance(state, (np.generic, int)) else []


def test_global_clip_without_throw_gives_nan_steps() -> None:
    model, grads = {"a": _data(1000)}, {"a": _data(1000, seed=1)}
    grads["a"][10] = np.inf
    tree = opt.setup(opt.ClipGlobalNorm(1.0), model)
    _, new = opt.update(tree, model, grads)
    assert np.isnan(new["a"][10])
    assert np.array_equal(new["a"][:10], model["a"][:10])


def test_global_clip_apply_alone_refuses() -> None:
    x = np.ones(3)
    with pytest.raises(TypeError, match="every leaf"):
        opt.ClipGlobalNorm().apply(None, x, x, opt.adapter_for(x))
    with pytest.raises(ValueError, match="p must be 2, 1 or inf"):
        opt.ClipGlobalNorm(1.0, 3)
    with pytest.raises(ValueError, match="omega"):
        opt.ClipGlobalNorm(-1.0)


def test_global_clip_mixed_backends_name_the_paths() -> None:
    torch = pytest.importorskip("torch")
    model = {"a": np.ones(3, np.float32), "b": torch.ones(3)}
    tree = opt.setup(opt.ClipGlobalNorm(), model)
    with pytest.raises(TypeError, match=r"\('a',\).*numpy.*\('b',\).*torch"):
        opt.update(tree, model, {"a": np.ones(3, np.float32), "b": torch.ones(3)})


def test_global_clip_frozen_and_missing_gradients_take_no_part() -> None:
    model = {"a": _data(3000), "b": _data(2000, seed=1), "c": _data(100, seed=2)}
    grads = {"a": _data(3000, seed=3), "b": _data(2000, seed=4), "c": None}
    tree = opt.setup(opt.ClipGlobalNorm(1.0), model)
    opt.freeze_(tree["b"])
    _, new = opt.update(tree, model, grads)
    lam = np.minimum(np.float32(1.0) / opt.norm(grads["a"]), np.float32(1))
    assert np.array_equal(new["a"], model["a"] - grads["a"] * lam)
    assert new["b"] is model["b"]
    assert new["c"] is model["c"]


def test_global_clip_ties_count_once() -> None:
    w = _data(4000)
    model = {"x": w, "y": w}
    g = _data(4000, seed=1)
    tree = opt.setup(opt.ClipGlobalNorm(1.0), model)
    _, new = opt.update(tree, model, {"x": g, "y": g})
    total = g + g
    lam = np.minimum(np.float32(1.0) / opt.norm(total), np.float32(1))
    assert new["x"] is new["y"]
    assert np.array_equal(new["x"], w - total * lam)


def test_global_clip_inside_mixed_precision() -> None:
    model = {
        "a": _data(3000).astype(np.float16),
        "b": _data(500, seed=1).astype(np.float16),
    }
    grads = {
        "a": _data(3000, seed=2).astype(np.float16),
        "b": _data(500, seed=3).astype(np.float16),
    }
    rule = opt.MixedPrecision(
        opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Descent(0.1))
    )
    tree = opt.setup(rule, model)
    _, new = opt.update(tree, model, grads)
    g32 = {k: v.astype(np.float32) for k, v in grads.items()}
    lam = np.minimum(
        np.float32(1.0) / opt.norm(np.concatenate(list(g32.values()))), np.float32(1)
    )
    for k, x in model.items():
        want = (x.astype(np.float32) - g32[k] * lam * np.float32(0.1)).astype(
            np.float16
        )
        assert np.array_equal(new[k], want)


def test_adjust_reaches_the_global_rules() -> None:
    rule = opt.SkipNonFinite(opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam()))
    tree = opt.setup(rule, {"a": np.ones(3)})
    opt.adjust_(tree, 0.5, omega=2.0)
    inner = tree["a"].rule.rule
    assert inner.opts[0].omega == 2.0
    assert inner.opts[1].eta == 0.5


# -- SkipNonFinite ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_non_finite_skips_every_leaf(
    any_backend: BackendHelper, bad: float
) -> None:
    model = _model()
    inner = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-2))
    rule = opt.SkipNonFinite(inner)
    good1, good2 = _model(), {**_model(), "emb": _model()["emb"] * 3}
    broken = _model()
    broken["w"][1][0] = bad  # one element of one small leaf
    tree, got = _run(any_backend, rule, model, [good1, broken, good2], in_place=True)
    _, want = _run(
        BackendHelper(_numpy()), inner, model, [good1, good2], in_place=False
    )
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(_bits(a), _bits(b))
    assert {leaf.state.skips for leaf in _tree_leaves(tree)} == {1}


def test_skip_non_finite_functional_keeps_the_old_state() -> None:
    model = {"a": _data(3000)}
    tree = opt.setup(opt.SkipNonFinite(opt.Adam()), model)
    tree, model = opt.update(tree, model, {"a": _data(3000, seed=1)})
    bad = _data(3000, seed=2)
    bad[0] = np.nan
    new_tree, new_model = opt.update(tree, model, {"a": bad})
    assert new_model["a"] is model["a"]
    assert new_tree["a"].state.state is tree["a"].state.state
    assert new_tree["a"].state.skips == 1
    assert tree["a"].state.skips == 0


def test_skip_non_finite_complex(backend: BackendHelper) -> None:
    x = (_data(2000) + 1j * _data(2000, seed=1)).astype(np.complex64)
    g = (_data(2000, seed=2) + 1j * _data(2000, seed=3)).astype(np.complex64)
    g[7] = complex(1.0, np.inf)
    try:
        m = backend.asarray(x)
    except (TypeError, ValueError) as exc:  # pragma: no cover - no complex here
        pytest.skip(f"{backend} has no complex arrays: {exc}")
    tree = opt.setup(opt.SkipNonFinite(opt.Descent()), {"z": m})
    tree, new = opt.update(tree, {"z": m}, {"z": backend.asarray(g)})
    assert tree["z"].state.skips == 1
    assert np.array_equal(backend.to_numpy(new["z"]), x)


def _numpy() -> Any:
    from _backends import BackendKind

    return BackendKind.NUMPY


def test_fast_path_setting_does_not_change_global_clip() -> None:
    torch = pytest.importorskip("torch")
    model = _model()
    grads = [_model(), _model()]
    rule = CHAINS["middle"]
    results = []
    for enabled in (False, True):
        with fast_path(enabled):
            m = {
                k: (
                    torch.tensor(v)
                    if not isinstance(v, list)
                    else [torch.tensor(w) for w in v]
                )
                for k, v in model.items()
            }
            tree = opt.setup(rule, m)
            for g in grads:
                tg = {
                    k: (
                        torch.tensor(v)
                        if not isinstance(v, list)
                        else [torch.tensor(w) for w in v]
                    )
                    for k, v in g.items()
                }
                tree, m = opt.update_(tree, m, tg)
            results.append([a.numpy() for a in _leaves_t(m)])
    for a, b in zip(*results, strict=True):
        assert np.array_equal(_bits(a), _bits(b))


def _leaves_t(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [a for k in tree for a in _leaves_t(tree[k])]
    if isinstance(tree, list):
        return [a for t in tree for a in _leaves_t(t)]
    return [tree]


# -- the compiled fast path ---------------------------------------------------------------


def _fast_available() -> bool:
    from agnosticopt.adapters import _fast

    with fast_path(True):
        return _fast.available()


FAST_CHAINS = {
    "adamw": opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)),
    "alone_inf": opt.ClipGlobalNorm(0.5, math.inf),
    "p1_momentum": opt.OptimiserChain(opt.ClipGlobalNorm(300.0, 1), opt.Momentum()),
    "clipnorm_adamw": opt.OptimiserChain(
        opt.ClipNorm(1.0), opt.AdamW(1e-2, lambda_=0.01)
    ),
    "clipnorm_inf": opt.ClipNorm(0.5, math.inf),
    "clipnorm_p1_big": opt.OptimiserChain(opt.ClipNorm(1e6, 1), opt.Adam()),
}


@pytest.mark.skipif(
    not _fast_available(), reason="numba is not installed: no fast path"
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(FAST_CHAINS))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_global_clip_fast_path_gives_the_plain_bits(
    kind: str, name: str, dtype: str
) -> None:
    from _backends import BackendKind
    from agnosticopt.adapters import _fast

    if kind == "torch":
        pytest.importorskip("torch")
    backend = BackendHelper(BackendKind(kind))
    model = _model(dtype)
    grads = [_model(dtype), {**_model(dtype), "b": None}, _model(dtype)]
    grads[1]["emb"] = grads[1]["emb"] * 1000
    with fast_path(False):
        _, want = _run(backend, FAST_CHAINS[name], model, grads, in_place=True)
    before = _fast.counters["fast"]
    with fast_path(True):
        _, got = _run(backend, FAST_CHAINS[name], model, grads, in_place=True)
    assert _fast.counters["fast"] - before == 5 + 4 + 5  # every leaf, every step
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.skipif(
    not _fast_available(), reason="numba is not installed: no fast path"
)
def test_fast_tree_root_is_the_reduction_of_the_concatenation() -> None:
    from agnosticopt.adapters._numba import tree_root

    rng = np.random.default_rng(8)
    sizes = [1, 3000, 300_001, 7, 1 << 18, 5, 0, 123_457]
    arrays = [_data(n, seed=int(rng.integers(1000))) for n in sizes]
    xp = opt.adapter_for(arrays[0])
    for p in (2, 1, math.inf):
        nodes: list[Any] = []
        offset = 0
        for a in arrays:
            found, combine = norm_nodes(xp, a, p, offset)
            nodes += found
            offset += a.size
        want = combine_nodes(nodes, offset, combine)[0]
        got = tree_root(
            "float32",
            p,
            np.array([a.ctypes.data for a in arrays], np.int64),
            np.array(sizes, np.int64),
        )
        assert _bits(got) == _bits(want), p


@pytest.mark.skipif(
    not _fast_available(), reason="numba is not installed: no fast path"
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fast_tree_root_batches_of_blocks_keep_the_tree(dtype: str) -> None:
    """Runs of whole 256-blocks (reduced in batches, level by level) at every alignment,
    with NaN, infinities and signed zeros in them: the bits of the plain tree."""
    from agnosticopt.adapters._numba import BATCH, tree_root

    rng = np.random.default_rng(9)
    sizes = [
        255,
        256 * BATCH + 1,
        256 * (BATCH - 1) + 129,
        256 * BATCH * 3,
        513,
        150_000,
    ]
    arrays = [_data(n, dtype, seed=int(rng.integers(1000))) for n in sizes]
    arrays[1][[5, 700]] = [np.inf, -0.0]
    arrays[3][[3000, 9000]] = [np.nan, -np.inf]
    xp = opt.adapter_for(arrays[0])
    for chosen in (arrays[:3], arrays):  # an infinity and -0.0, then NaN too
        for p in (2, 1, math.inf):
            nodes: list[Any] = []
            offset = 0
            for a in chosen:
                found, combine = norm_nodes(xp, a, p, offset)
                nodes += found
                offset += a.size
            want = combine_nodes(nodes, offset, combine)[0]
            got = tree_root(
                dtype,
                p,
                np.array([a.ctypes.data for a in chosen], np.int64),
                np.array([a.size for a in chosen], np.int64),
            )
            assert _bits(got) == _bits(want), (p, len(chosen))


@pytest.mark.skipif(
    not _fast_available(), reason="numba is not installed: no fast path"
)
def test_global_clip_fast_path_all_or_nothing() -> None:
    """A leaf the fast path cannot take sends the whole clip group to the plain path."""
    from agnosticopt.adapters import _fast

    model = {"a": _data(150_000), "b": _data(1000, seed=1)[::2]}  # b: not contiguous
    grads = {"a": _data(150_000, seed=2), "b": _data(500, seed=3)}
    rule = FAST_CHAINS["adamw"]
    results = []
    for enabled in (False, True):
        with fast_path(enabled):
            m = {k: v.copy() for k, v in model.items()}
            m["b"] = _data(1000, seed=1)[::2]
            tree = opt.setup(rule, m)
            before = _fast.counters["fast"]
            tree, m = opt.update_(tree, m, grads)
            assert _fast.counters["fast"] == before
            results.append(m)
    for k in model:
        assert np.array_equal(_bits(results[0][k]), _bits(results[1][k]))


@pytest.mark.skipif(
    not _fast_available(), reason="numba is not installed: no fast path"
)
def test_clip_norm_fast_path_still_raises_and_changes_nothing() -> None:
    model = {"a": _data(150_000), "b": _data(3000, seed=1)}
    grads = {"a": _data(150_000, seed=2), "b": _data(3000, seed=3)}
    grads["b"][5] = np.inf
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam())
    with fast_path(True):
        tree = opt.setup(rule, model)
        before = {k: v.copy() for k, v in model.items()}
        with pytest.raises(FloatingPointError, match="inf") as info:
            opt.update_(tree, model, grads)
    assert "('b',)" in " ".join(info.value.__notes__)
    for k, v in before.items():
        assert np.array_equal(v, model[k])
