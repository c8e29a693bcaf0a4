"""The dask adapter: lazy updates with numpy's bits, on a two-process LocalCluster."""

from __future__ import annotations

import contextlib
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
