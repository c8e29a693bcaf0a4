"""The dask adapter: lazy updates with numpy's bits, on a two-process LocalCluster."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt

da = pytest.importorskip("dask.array", reason="dask is not installed (extra 'dask')")
distributed = pytest.importorskip("distributed", reason="distributed is not installed")
dask = pytest.importorskip("dask")

SHAPE = (301, 457)  # 137,557 elements
#: Uneven chunks of the parameter (an empty one included) and other chunks of the gradient.
W_CHUNKS = ((100, 150, 0, 51), (200, 257))
G_CHUNKS = (77, 457)


def _data(dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(13)
    w = rng.standard_normal(SHAPE).astype(dtype)
    g = (3 * rng.standard_normal(SHAPE)).astype(dtype)
    return w, g


def _model(w: np.ndarray, wrap: Any) -> dict[str, Any]:
    return {
        "w": wrap(w, W_CHUNKS),
        "b": wrap(w[0].copy(), ((200, 0, 257),)),
        "s": wrap(w[0, :1].reshape(()), ()),
    }


def _grads(g: np.ndarray, wrap: Any) -> dict[str, Any]:
    return {
        "w": wrap(g, G_CHUNKS),
        "b": wrap(g[1].copy(), ((457,),)),
        "s": wrap(g[0, :1].reshape(()), ()),
    }


def _plain(a: np.ndarray, chunks: Any) -> np.ndarray:
    return a


def _lazy(a: np.ndarray, chunks: Any) -> Any:
    return da.from_array(a, chunks=chunks)


@contextlib.contextmanager
def _no_compute() -> Iterator[None]:
    """Any computation inside raises: the update must only build a graph."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        msg = "the update computed something"
        raise AssertionError(msg)

    with dask.config.set(scheduler=refuse):
        yield


def _bits(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"uint{a.dtype.itemsize * 8}")


RULES = {
    "adamw": lambda: opt.AdamW(1e-3, lambda_=1e-2),
    "clipnorm_adam": lambda: opt.OptimiserChain(opt.ClipNorm(5.0), opt.Adam(1e-3)),
    "clipnorm_inf": lambda: opt.OptimiserChain(
        opt.ClipNorm(2.0, np.inf), opt.Descent(0.1)
    ),
    "global_clip_adamw": lambda: opt.OptimiserChain(
        opt.ClipGlobalNorm(10.0), opt.AdamW(1e-3)
    ),
    "global_clip_l1": lambda: opt.OptimiserChain(
        opt.ClipGlobalNorm(7.0, 1), opt.Momentum(0.01)
    ),
}


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("adamw", "float64"),
        ("clipnorm_adam", "float32"),
        ("clipnorm_inf", "float64"),
        ("global_clip_adamw", "float32"),
        ("global_clip_l1", "float64"),
    ],
)
def test_dask_update_is_lazy_and_numpy_identical(
    dask_client: Any, name: str, dtype: str
) -> None:
    w, g = _data(dtype)
    tree, model = opt.setup(RULES[name](), _model(w, _plain)), _model(w, _plain)
    lazy_tree = opt.setup(RULES[name](), _model(w, _lazy))
    lazy_model = _model(w, _lazy)
    for step in range(2):
        grad = (g * (step + 1)).astype(dtype)
        tree, model = opt.update(tree, model, _grads(grad, _plain))
        with _no_compute():
            lazy_tree, lazy_model = opt.update(
                lazy_tree, lazy_model, _grads(grad, _lazy)
            )
        assert all(isinstance(v, da.Array) for v in lazy_model.values())
        lazy_model = dict(
            zip(lazy_model, dask_client.persist(list(lazy_model.values())), strict=True)
        )
        got = dask_client.compute(lazy_model).result(timeout=120)
        for key in model:
            assert np.array_equal(_bits(model[key]), _bits(got[key])), key


@pytest.mark.parametrize("p", [2.0, 1.0, np.inf, -np.inf])
def test_dask_norm_any_chunks(dask_client: Any, p: float) -> None:
    w, _ = _data("float32")
    for chunks in [W_CHUNKS, ((300, 1), (1, 456)), ((0, 301), (457,))]:
        assert _bits(opt.norm(da.from_array(w, chunks=chunks), p)) == _bits(
            opt.norm(w, p)
        )


def test_dask_empty_gradient(dask_client: Any) -> None:
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.ClipGlobalNorm(1.0), opt.Adam())
    x = da.zeros((0, 3), chunks=(1, 3), dtype=np.float32)
    tree = opt.setup(rule, {"x": x})
    tree, model = opt.update(tree, {"x": x}, {"x": x})
    assert model["x"].compute().shape == (0, 3)


def test_dask_clipnorm_throw_raises_when_computed(dask_client: Any) -> None:
    w, g = _data("float32")
    g = g.copy()
    g[0, 0] = np.inf
    tree = opt.setup(opt.ClipNorm(1.0), {"w": _lazy(w, W_CHUNKS)})
    with _no_compute():
        _, model = opt.update(
            tree, {"w": _lazy(w, W_CHUNKS)}, {"w": _lazy(g, G_CHUNKS)}
        )
    with pytest.raises(FloatingPointError, match=r"inf.*shape \(301, 457\)"):
        dask_client.compute(model["w"]).result(timeout=60)


def test_dask_update_in_place_refused_naming_the_path() -> None:
    w, g = _data("float32")
    model = {"layer": {"w": _lazy(w, W_CHUNKS)}}
    tree = opt.setup(opt.Adam(), model)
    before = tree["layer"]["w"].state
    with pytest.raises(
        TypeError, match=r"layer.*w.*opt\.update|agnosticopt\.update\(tree"
    ):
        opt.update_(tree, model, {"layer": {"w": _lazy(g, G_CHUNKS)}})
    assert tree["layer"]["w"].state is before


def test_setup_raises_for_dask_blocks_without_adapter() -> None:
    masked = da.from_array(np.ma.masked_array(np.zeros(4, np.float32)), asarray=False)
    with pytest.raises(TypeError, match=r"'m'"):
        opt.setup(opt.Adam(), {"m": masked})


def test_piece_layout_matches_reduce_piece() -> None:
    from agnosticopt.adapters.dask import piece_layout
    from agnosticopt.adapters.numpy import NumpyAdapter

    from agnosticopt._norm import reduce_piece

    xp = NumpyAdapter()
    rng = np.random.default_rng(0)
    for _ in range(300):
        offset, size = int(rng.integers(0, 5000)), int(rng.integers(0, 3000))
        nodes = reduce_piece(xp, np.ones(size), offset, xp.add)
        assert [(n.level, n.block) for n in nodes] == piece_layout(offset, size)


class _RunSpecWarnings(logging.Handler):
    """Collects distributed's "Detected different `run_spec`" records (the scheduler
    runs in this process: LocalCluster)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "different `run_spec`" in message:
            self.keys.append(message.split(" between ")[0].removeprefix("Detected "))


@contextlib.contextmanager
def _run_spec_warnings() -> Iterator[_RunSpecWarnings]:
    handler = _RunSpecWarnings()
    logger = logging.getLogger("distributed.scheduler")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _arrays(state: Any) -> list[Any]:
    if isinstance(state, da.Array):
        return [state]
    if isinstance(state, (tuple, list)):
        return [a for item in state for a in _arrays(item)]
    return []


def _persisted(client: Any, tree: Any, model: dict[str, Any]) -> tuple[Any, Any]:
    """The tree and model with every lazy array persisted, in one call."""
    keys = list(model)
    lazy = [model[k] for k in keys] + [a for k in keys for a in _arrays(tree[k].state)]
    done = iter(client.persist(lazy))
    model = {k: next(done) for k in keys}

    def rebuild(state: Any) -> Any:
        if isinstance(state, da.Array):
            return next(done)
        if hasattr(state, "_fields"):
            return type(state)(*map(rebuild, state))
        if isinstance(state, (tuple, list)):
            return type(state)(map(rebuild, state))
        return state

    tree = {k: dataclasses.replace(tree[k], state=rebuild(tree[k].state)) for k in keys}
    return tree, model


@pytest.mark.slow  # ~2 s on the LocalCluster
def test_dask_global_clip_steps_on_a_cluster_warn_of_no_run_spec(
    dask_client: Any,
) -> None:
    """WeightDecay+ClipGlobalNorm+Adam, 2 steps on the LocalCluster: no run_spec warning.

    Each step's new parameters and state are persisted in one call (a training
    loop's pattern), so the next step's graph starts from them; the bits are
    numpy's. (Computing a parameter and its state in separate optimised
    computations, back to back, can make dask fuse a key the two graphs share
    differently in each, its warning included: dask/dask#9888.)
    """
    rule = opt.OptimiserChain(
        opt.WeightDecay(1e-4), opt.ClipGlobalNorm(10.0), opt.Adam(1e-3)
    )
    w, g = _data("float32")
    w, g = w * np.float32(1.5), g * np.float32(1.5)  # no key shared with other tests
    tree, model = opt.setup(rule, _model(w, _plain)), _model(w, _plain)
    lazy_tree, lazy_model = opt.setup(rule, _model(w, _lazy)), _model(w, _lazy)
    with _run_spec_warnings() as seen:
        for step in range(2):
            grad = (g * (step + 1)).astype("float32")
            tree, model = opt.update(tree, model, _grads(grad, _plain))
            with _no_compute():
                lazy_tree, lazy_model = opt.update(
                    lazy_tree, lazy_model, _grads(grad, _lazy)
                )
            lazy_tree, lazy_model = _persisted(dask_client, lazy_tree, lazy_model)
            got = dask_client.compute(lazy_model).result(timeout=120)
            for key in model:
                assert np.array_equal(_bits(model[key]), _bits(got[key])), key
    assert seen.keys == []


def test_dask_norm_graph_has_explicit_deterministic_keys() -> None:
    """The norm's tasks are named by a token of all their inputs, without delayed."""
    from agnosticopt.adapters.dask import DaskAdapter

    w, _ = _data("float32")
    a = DaskAdapter()
    x = da.from_array(w, chunks=W_CHUNKS)

    def keys(x: Any, p: float, offset: int, dtype: Any) -> list[Any]:
        return [n.value.name for n in a.norm_nodes(x, p, offset, dtype)]

    first = keys(x, 2.0, 0, None)
    assert first == keys(da.from_array(w, chunks=W_CHUNKS), 2.0, 0, None)
    assert len(set(first)) == len(first)
    assert all(k.startswith("norm-node-") for k in first)
    for other in [keys(x, 2.0, 5, None), keys(x, 1.0, 0, None)]:
        assert set(other).isdisjoint(first)
    assert set(keys(x, 2.0, 0, "float64")).isdisjoint(first)
    assert set(keys(x + 1, 2.0, 0, None)).isdisjoint(first)
    graph = a.norm_nodes(x, 2.0, 0, None)[0].value.dask
    assert not any(
        name.startswith(("finalize", "_block_nodes")) for name in graph.layers
    )
