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
    model = {"h": backend.asarray(np.array([1.5, 2.5], np.float32)),
             "d": backend.asarray(np.array([3.25], np.float64))}
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
    model = Point(backend.asarray(np.array(2.0)), Dense(backend.asarray([[1.0, 2.0, 3.0]]), None))
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
    with pytest.raises(TypeError, match=r"\('b',\) is a \S*test_flat array.*\('a',\) is a numpy"):
        opt.destructure({"a": np.ones(2), "b": Foreign(2)})


def test_destructure_then_update_round_trip() -> None:
    model = {"w": np.array([1.0, 2.0]), "b": np.array([3.0], dtype=np.float32)}
    flat, re_ = opt.destructure(model)
    tree = opt.setup(opt.Descent(0.5), flat)
    _, flat2 = opt.update(tree, flat, np.array([2.0, 2.0, 2.0]))
    new = re_(flat2)
    np.testing.assert_array_equal(new["w"], [0.0, 1.0])
    np.testing.assert_array_equal(new["b"], np.float32([2.0]))
