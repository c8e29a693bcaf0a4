"""trainables, destructure and Restructure (Optimisers.jl's destructure.jl and
trainables.jl cases: order, ties once, dtype promotion, complex, empty models).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import numpy as np
import pytest

import agnosticopt as opt


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Dense:
    w: Any
    b: Any
    act: str = "relu"


class Foreign:
    """An array of an unknown array-API library (gets the generic adapter)."""

    dtype = "float64"

    def __init__(self, *shape: int) -> None:
        self.shape = shape

    def __array_namespace__(self) -> Any:
        return np


def as_np(backend: Any, a: Any) -> np.ndarray:
    return backend.to_numpy(a)  # type: ignore[no-any-return]


# -- trainables -------------------------------------------------------------------------


def test_trainables_order_ties_and_non_trainables(backend: Any) -> None:
    w = backend.asarray([1.0, 2.0])
    x2 = backend.asarray(np.ones((2, 2), dtype=np.float32))
    x3 = backend.asarray(np.array([1j]))
    ints = backend.asarray(np.arange(3))
    model = {"a": w, "b": [w, ints, x2, "s"], "c": (x3, 1.0, w)}
    found = opt.trainables(model)
    assert len(found) == 3
    assert found[0] is w
    assert found[1] is x2
    assert found[2] is x3
    with_paths = opt.trainables(model, path=True)
    assert [p for p, _ in with_paths] == [("a",), ("b", 2), ("c", 0)]
    assert all(a is b for (_, a), b in zip(with_paths, found, strict=True))


def test_trainables_paths_through_containers() -> None:
    model = [Point(np.ones(1), Dense(np.ones(2), np.zeros(2))), {"k": np.ones(3)}]
    paths = [p for p, _ in opt.trainables(model, path=True)]
    assert paths == [(0, "x"), (0, "y", "w"), (0, "y", "b"), (1, "k")]


def test_trainables_of_nothing() -> None:
    assert opt.trainables({"n": 3, "i": np.arange(2), "f": print}) == []
    assert opt.trainables(np.ones(2), path=True)[0][0] == ()


def test_model_containing_itself() -> None:
    loop: list[Any] = [np.ones(2)]
    loop.append(loop)
    with pytest.raises(ValueError, match=re.escape("contains itself at (1,)")):
        opt.trainables(loop)
    with pytest.raises(ValueError, match=re.escape("contains itself at (1,)")):
        opt.setup(opt.Descent(), loop)


# -- destructure ----------------------------------------------------------------------------


def _model(backend: Any) -> tuple[Any, Any]:
    tied = backend.asarray([7.0, 8.0])
    model = {
        "a": backend.asarray([[1.0, 2.0], [3.0, 4.0]]),
        "b": [backend.asarray([5.0, 6.0]), backend.asarray(np.array([9, 9]))],
        "t": (tied, "name", tied),
    }
    return model, tied


def test_destructure_and_rebuild(backend: Any) -> None:
    model, tied = _model(backend)
    flat, re_ = opt.destructure(model)
    np.testing.assert_array_equal(as_np(backend, flat), [1, 2, 3, 4, 5, 6, 7, 8])
    assert len(re_) == 8
    assert repr(re_) == "Restructure(dict, arrays=3, length=8)"

    new = re_(backend.asarray(np.arange(10.0, 18.0)))
    np.testing.assert_array_equal(as_np(backend, new["a"]), [[10, 11], [12, 13]])
    np.testing.assert_array_equal(as_np(backend, new["b"][0]), [14, 15])
    np.testing.assert_array_equal(as_np(backend, new["t"][0]), [16, 17])
    assert new["t"][0] is new["t"][2]
    assert new["t"][1] == "name"
    assert new["b"][1] is model["b"][1]
    assert as_np(backend, new["a"]).shape == (2, 2)
    # the original model is untouched
    np.testing.assert_array_equal(as_np(backend, model["a"]), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(as_np(backend, tied), [7, 8])


def test_restructure_checks_its_input(backend: Any) -> None:
    model, _ = _model(backend)
    _, re_ = opt.destructure(model)
    with pytest.raises(ValueError, match=r"length 8, got one of shape \(7,\)"):
        re_(backend.asarray(np.zeros(7)))
    with pytest.raises(ValueError, match=r"length 8, got one of shape \(2, 4\)"):
        re_(backend.asarray(np.zeros((2, 4))))
    with pytest.raises(TypeError, match="got a list"):
        re_([0.0] * 8)


def test_destructure_promotes_and_restores_dtypes(backend: Any) -> None:
    model = {
        "h": backend.asarray(np.array([1.5, 2.5], np.float32)),
        "d": backend.asarray(np.array([3.25], np.float64)),
    }
    flat, re_ = opt.destructure(model)
    assert as_np(backend, flat).dtype == np.float64
    np.testing.assert_array_equal(as_np(backend, flat), [1.5, 2.5, 3.25])
    new = re_(backend.asarray(np.array([0.1, 0.2, 0.3])))
    assert as_np(backend, new["h"]).dtype == np.float32
    assert as_np(backend, new["d"]).dtype == np.float64
    np.testing.assert_array_equal(as_np(backend, new["h"]), np.float32([0.1, 0.2]))


def test_restructure_overflow_to_float32_is_not_a_warning(backend: Any) -> None:
    _, re_ = opt.destructure([backend.asarray(np.float32([1.0, 2.0]))])
    new = re_(backend.asarray(np.array([1e300, -0.5])))
    np.testing.assert_array_equal(as_np(backend, new[0]), np.float32([np.inf, -0.5]))


def test_destructure_complex(backend: Any) -> None:
    model = [backend.asarray(np.array([1.0, 2.0])), backend.asarray(np.array([3 + 4j]))]
    flat, re_ = opt.destructure(model)
    assert as_np(backend, flat).dtype == np.complex128
    np.testing.assert_array_equal(as_np(backend, flat), [1, 2, 3 + 4j])
    new = re_(backend.asarray(np.array([5 + 1j, 6 - 1j, 7j])))
    assert as_np(backend, new[0]).dtype == np.float64
    np.testing.assert_array_equal(as_np(backend, new[0]), [5.0, 6.0])
    np.testing.assert_array_equal(as_np(backend, new[1]), [7j])


def test_destructure_zero_dim_and_containers(backend: Any) -> None:
    model = Point(
        backend.asarray(np.array(2.0)), Dense(backend.asarray([[1.0, 2.0, 3.0]]), None)
    )
    flat, re_ = opt.destructure(model)
    np.testing.assert_array_equal(as_np(backend, flat), [2, 1, 2, 3])
    new = re_(backend.asarray(np.array([-1.0, -2.0, -3.0, -4.0])))
    assert type(new) is Point
    assert type(new.y) is Dense
    assert new.y.act == "relu"
    assert as_np(backend, new.x).shape == ()
    np.testing.assert_array_equal(as_np(backend, new.y.w), [[-2, -3, -4]])


def test_empty_model_gives_empty_float64() -> None:
    flat, re_ = opt.destructure({"n": 3, "l": ["text"]})
    assert isinstance(flat, np.ndarray)
    assert flat.dtype == np.float64
    assert flat.shape == (0,)
    assert len(re_) == 0
    assert re_(flat) == {"n": 3, "l": ["text"]}


def test_empty_model_keeps_the_backend(backend: Any) -> None:
    ints = backend.asarray(np.arange(3))
    flat, re_ = opt.destructure({"i": ints})
    assert type(flat) is type(ints)
    assert as_np(backend, flat).dtype == np.float64
    assert as_np(backend, flat).shape == (0,)
    assert re_(flat)["i"] is ints


def test_flat_is_a_copy_and_restructure_gives_views() -> None:
    model = {"a": np.ones(3), "b": np.ones((2, 2))}
    flat, re_ = opt.destructure(model)
    flat[0] = 99.0
    np.testing.assert_array_equal(model["a"], [1.0, 1.0, 1.0])
    new = re_(flat)
    assert np.shares_memory(new["b"], flat)
    assert new["a"][0] == 99.0


def test_destructure_refuses_mixed_backends() -> None:
    with pytest.raises(
        TypeError, match=r"\('b',\) is a \S*test_flat array.*\('a',\) is a numpy"
    ):
        opt.destructure({"a": np.ones(2), "b": Foreign(2)})


def test_destructure_then_update_round_trip() -> None:
    model = {"w": np.array([1.0, 2.0]), "b": np.array([3.0], dtype=np.float32)}
    flat, re_ = opt.destructure(model)
    tree = opt.setup(opt.Descent(0.5), flat)
    _, flat2 = opt.update(tree, flat, np.array([2.0, 2.0, 2.0]))
    new = re_(flat2)
    np.testing.assert_array_equal(new["w"], [0.0, 1.0])
    np.testing.assert_array_equal(new["b"], np.float32([2.0]))


# -- Optimisers.jl parity: differentiable destructure, trainable fields, norm of integers --


def test_destructure_is_differentiable_under_torch_autograd() -> None:
    torch = pytest.importorskip("torch", reason="torch autograd")
    tied = torch.ones(2, 2, requires_grad=True)
    model = {
        "a": tied,
        "b": torch.zeros(3, dtype=torch.float64, requires_grad=True),
        "c": [tied],
        "n": torch.arange(3),
    }
    flat, re_ = opt.destructure(model)
    assert flat.grad_fn is not None
    weights = torch.arange(7, dtype=torch.float64)
    (flat * weights).sum().backward()
    assert torch.equal(tied.grad, weights[:4].reshape(2, 2).float())
    assert torch.equal(model["b"].grad, weights[4:])
    w = (flat.detach() + 0.5).requires_grad_()
    rebuilt = re_(w)
    assert rebuilt["a"] is rebuilt["c"][0]  # the tie: one piece
    assert rebuilt["a"].dtype == torch.float32
    loss = (rebuilt["a"] * 3).sum() + (rebuilt["b"] ** 2).sum()
    loss.backward()
    want = torch.cat([torch.full((4,), 3.0, dtype=torch.float64), 2 * w.detach()[4:]])
    assert torch.equal(w.grad, want)


def test_restructure_casts_exactly_and_differentiably_on_torch() -> None:
    torch = pytest.importorskip("torch", reason="torch autograd")
    rng = np.random.default_rng(0)
    values = rng.standard_normal(200_000) * 10
    model = {
        "h": torch.zeros(200_000, dtype=torch.float16, requires_grad=True),
        "d": torch.zeros(1, dtype=torch.float64),
    }
    _, re_ = opt.destructure(model)
    w = torch.tensor(np.concatenate([values, [0.0]]), requires_grad=True)
    piece = re_(w)["h"]
    assert np.array_equal(
        piece.detach().numpy().view(np.uint16),
        values.astype(np.float16).view(np.uint16),
    )  # numpy: one rounding
    piece.sum().backward()
    assert torch.equal(w.grad[:-1], torch.ones(200_000, dtype=torch.float64))


def test_destructure_and_restructure_under_jax_grad() -> None:
    jax = pytest.importorskip("jax", reason="jax.grad")
    jnp = jax.numpy
    model = {"a": jnp.ones((2, 2)), "b": [jnp.arange(3.0)]}
    flat, re_ = opt.destructure(model)

    def loss(w: Any) -> Any:
        m = re_(w)
        return (m["a"] ** 2).sum() + 3 * m["b"][0].sum()

    grad = jax.grad(loss)(flat + 1)
    assert np.array_equal(np.asarray(grad), np.array([4.0, 4, 4, 4, 3, 3, 3]))
    grads = jax.grad(lambda m: (opt.destructure(m)[0] * jnp.arange(7.0)).sum())(model)
    assert np.array_equal(np.asarray(grads["b"][0]), np.array([4.0, 5, 6]))


class Affine:
    """A registered container whose ``scale`` is data, not a parameter."""

    def __init__(self, w: Any, scale: Any) -> None:
        self.w, self.scale = w, scale


opt.register_container(
    Affine,
    lambda a: (("w", "scale"), (a.w, a.scale)),
    lambda a, c: Affine(*c),
    trainable=("w",),
)


def test_registered_trainable_fields() -> None:
    layer = {"layer": Affine(np.ones(3), np.full(3, 2.0))}
    tree = opt.setup(opt.Descent(0.5), layer)
    assert tree["layer"]["scale"] is None
    assert [p for p, _ in opt.trainables(layer, path=True)] == [("layer", "w")]
    flat, re_ = opt.destructure(layer)
    assert np.array_equal(flat, np.ones(3))
    assert np.array_equal(re_(flat * 4)["layer"].scale, np.full(3, 2.0))
    grads = {
        "layer": Affine(np.full(3, 2.0), np.full(4, 9.0))
    }  # scale: ignored, any shape
    tree, new = opt.update(tree, layer, grads)
    assert np.array_equal(new["layer"].w, np.zeros(3))
    assert new["layer"].scale is layer["layer"].scale
    tree, new = opt.update_(tree, new, {"layer": {"w": np.ones(3), "scale": "ignored"}})
    assert np.array_equal(new["layer"].w, np.full(3, -0.5))


def test_registered_trainable_fields_as_a_function_and_errors() -> None:
    class Pair:
        def __init__(self, a: Any, b: Any) -> None:
            self.a, self.b = a, b

    opt.register_container(
        Pair,
        lambda p: (("a", "b"), (p.a, p.b)),
        lambda p, c: Pair(*c),
        trainable=lambda p: ("b",) if p.a.ndim == 0 else ("a", "b"),
    )
    assert len(opt.trainables(Pair(np.ones(()), np.ones(2)))) == 1
    assert len(opt.trainables(Pair(np.ones(1), np.ones(2)))) == 2
    opt.register_container(
        Pair,
        lambda p: (("a", "b"), (p.a, p.b)),
        lambda p, c: Pair(*c),
        trainable=("c",),
    )
    with pytest.raises(ValueError, match=r"trainable keys of Pair include \[\"'c'\"\]"):
        opt.setup(opt.Descent(), Pair(np.ones(1), np.ones(2)))


@pytest.mark.parametrize("p", [2.0, 1.0, 0.5, 1.5, np.inf, -np.inf, 0.0])
@pytest.mark.parametrize("dtype", ["int8", "int64", "uint16", "bool"])
def test_norm_of_integers_is_the_float64_norm(
    backend: Any, dtype: str, p: float
) -> None:
    values = np.array([3, 0, 1, 7, 120, 5, 2], dtype=dtype)
    got = opt.norm(backend.asarray(values), p)
    assert type(got) is np.float64
    # the norm of the same values as float64, on the same backend (p = 0.5, 1.5 use
    # pow, whose rounding varies by backend: same bits are promised for the exact p only)
    assert got == opt.norm(backend.asarray(values.astype(np.float64)), p)
    if p == 2 and dtype != "bool":
        assert got == np.sqrt(np.sum(values.astype(np.float64) ** 2))  # no int overflow


def test_norm_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="norm expects an array"):
        opt.norm([1.0, 2.0])
