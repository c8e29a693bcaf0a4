"""The tree interface: setup, update, update_, adjust, freeze_/thaw_, containers.

Expected values are Optimisers.jl's feature tests (test/runtests.jl, see
shared/reference/optimisers-jl.md §4.2) and its documented ``nothing`` example
(§3), written as the arithmetic they came from.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import operator
import re
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest
from _backends import fast_path

import agnosticopt as opt

# -- helpers ----------------------------------------------------------------------


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, np.generic)


def snapshot(backend: Any, obj: Any) -> Any:
    """Everything in ``obj`` as plain values: arrays become (dtype, shape, bytes)."""
    if isinstance(obj, opt.Leaf):
        return ("Leaf", repr(obj.rule), snapshot(backend, obj.state), obj.frozen)
    if _is_array(obj):
        a = backend.to_numpy(obj)
        return (str(a.dtype), a.shape, a.tobytes())
    if isinstance(obj, dict):
        return {k: snapshot(backend, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, *(snapshot(backend, v) for v in obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        return [
            type(obj).__name__,
            *(snapshot(backend, getattr(obj, f.name)) for f in fields),
        ]
    return repr(obj)


def arrays_in(obj: Any) -> list[Any]:
    """Every array object in ``obj`` (Leaf states included), depth first."""
    if isinstance(obj, opt.Leaf):
        return arrays_in(obj.state)
    if _is_array(obj):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in arrays_in(v)]
    if isinstance(obj, (list, tuple)):
        return [a for v in obj for a in arrays_in(v)]
    return []


def same(a: list[Any], b: list[Any]) -> bool:
    """Whether two lists hold the same objects (``is``), in order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def as_np(backend: Any, a: Any) -> np.ndarray:
    return backend.to_numpy(a)  # type: ignore[no-any-return]


def close(backend: Any, a: Any, expected: Any, rtol: float = 1e-6) -> None:
    np.testing.assert_allclose(backend.to_numpy(a), expected, rtol=rtol, atol=1e-12)


def some_function(x: float) -> float:
    return x


class Foreign:
    """An array of an unknown array-API library (gets the generic adapter)."""

    dtype = "float64"

    def __init__(self, *shape: int) -> None:
        self.shape = shape

    def __array_namespace__(self) -> Any:
        return np


# -- very basics ---------------------------------------------------------------------


def test_descent_very_basics(backend: Any) -> None:
    m = (backend.asarray([1.0, 2.0]),)
    g = (backend.asarray([25, 33]),)
    tree = opt.setup(opt.Descent(0.1), m)
    before = snapshot(backend, (tree, m))

    _, m2 = opt.update(tree, m, g)
    close(backend, m2[0], [1.0 - 0.1 * 25, 2.0 - 0.1 * 33])
    assert snapshot(backend, (tree, m)) == before
    assert m2[0] is not m[0]
    assert type(m2) is tuple

    tree3, m3 = opt.update_(tree, m, g)
    assert tree3 is tree
    close(backend, m3[0], [1.0 - 0.1 * 25, 2.0 - 0.1 * 33])
    assert backend.to_numpy(m3[0]).dtype == np.float64
    if backend.writeable:
        assert m3[0] is m[0]
    else:
        assert m3[0] is not m[0]
        close(backend, m[0], [1.0, 2.0])


def test_momentum_state(backend: Any) -> None:
    m = (backend.asarray([1.0, 2.0]),)
    g = (backend.asarray([25.0, 33.0]),)
    tree = opt.setup(opt.Momentum(0.1), m)
    leaf = tree[0]
    old_state = leaf.state

    tree2, _ = opt.update(tree, m, g)
    close(backend, tree2[0].state, [2.5, 3.3])
    assert tree2[0] is not leaf
    assert leaf.state is old_state
    close(backend, leaf.state, [0.0, 0.0])

    tree3, _ = opt.update_(tree, m, g)
    assert tree3[0] is leaf
    close(backend, leaf.state, [2.5, 3.3])


def test_update_needs_gradients() -> None:
    m = {"w": np.ones(2)}
    tree = opt.setup(opt.Descent(), m)
    with pytest.raises(TypeError, match="grads"):
        opt.update(tree, m)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="grads"):
        opt.update_(tree, m)  # type: ignore[call-arg]


def test_bare_array_gives_bare_leaf(backend: Any) -> None:
    x = backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    tree = opt.setup(opt.Descent(0.5), x)
    assert isinstance(tree, opt.Leaf)
    _, new = opt.update(tree, x, backend.asarray(np.ones((2, 2), dtype=np.float32)))
    close(backend, new, [[0.5, 1.5], [2.5, 3.5]])


# -- dicts and the nothing gradient -------------------------------------------------------


def test_dict_support_adamw(backend: Any) -> None:
    m = {"a": backend.asarray([1.0, 2.0]), "b": backend.asarray([3.0, 4.0]), "c": 1}
    s = opt.setup(opt.AdamW(0.1), m)
    assert s["c"] is None
    assert list(s) == ["a", "b", "c"]
    g = {"a": backend.asarray([2.0, 4.0])}  # gradient of sum(abs2, a); no "b", no "c"
    s2, m2 = opt.update(s, m, g)
    close(backend, m2["a"], [0.9, 1.9], rtol=1e-6)
    assert m2["b"] is m["b"]
    assert m2["c"] == 1
    assert s2["b"].state is s["b"].state


def test_nested_dict_namedtuple_adamw(backend: Any) -> None:
    class Inner(NamedTuple):
        b: Any
        n: int

    m = {
        "a": backend.asarray([1.0, 2.0]),
        "z": {"y": Inner(backend.asarray([3.0, 4.0]), 7)},
    }
    s = opt.setup(opt.AdamW(0.1), m)
    g = {"z": {"y": {"b": backend.asarray([6.0, 8.0])}}}  # a mapping for a namedtuple
    _, m2 = opt.update(s, m, g)
    assert type(m2["z"]["y"]) is Inner
    close(backend, m2["z"]["y"].b, [2.9, 3.9])
    assert m2["z"]["y"].n == 7
    assert m2["a"] is m["a"]


def test_nothing_gradient_keeps_adam_state(backend: Any) -> None:
    x = {"a": backend.asarray(np.ones(2)), "b": backend.asarray(np.ones(2))}
    tree = opt.setup(opt.Adam(0.1), x)
    tree, x = opt.update_(
        tree, x, {"a": backend.asarray(np.ones(2)), "b": backend.asarray(np.ones(2))}
    )
    for key in "ab":
        m, v, beta_t = tree[key].state
        close(backend, m, [0.1, 0.1])
        close(backend, v, [0.001, 0.001])
        np.testing.assert_allclose([float(b) for b in beta_t], [0.81, 0.998001])
    b_state = tree["b"].state
    b_before = snapshot(backend, b_state)

    tree, x = opt.update_(tree, x, {"a": backend.asarray(np.zeros(2)), "b": None})
    m, v, beta_t = tree["a"].state
    close(backend, m, [0.09, 0.09])
    close(backend, v, [0.000999, 0.000999])
    np.testing.assert_allclose([float(b) for b in beta_t], [0.729, 0.997003])
    assert tree["b"].state is b_state
    assert snapshot(backend, tree["b"].state) == b_before


def test_none_gradient_for_a_whole_subtree(backend: Any) -> None:
    m = {
        "enc": [backend.asarray([1.0]), backend.asarray([2.0])],
        "dec": backend.asarray([3.0]),
    }
    tree = opt.setup(opt.Momentum(0.5), m)
    enc_states = [leaf.state for leaf in tree["enc"]]
    _, m2 = opt.update_(tree, m, {"enc": None, "dec": backend.asarray([1.0])})
    close(backend, m2["enc"][0], [1.0])
    close(backend, m2["enc"][1], [2.0])
    close(backend, m2["dec"], [2.5])
    assert same([leaf.state for leaf in tree["enc"]], enc_states)


def test_a_key_left_out_of_a_dict_gradient_is_none(backend: Any) -> None:
    m = {"w": backend.asarray([1.0, 2.0]), "b": backend.asarray([3.0])}
    tree = opt.setup(opt.Momentum(0.5), m)
    b_state = tree["b"].state
    b_before = snapshot(backend, b_state)
    tree, m2 = opt.update_(tree, m, {"w": backend.asarray([1.0, 1.0])})
    close(backend, m2["w"], [0.5, 1.5])
    close(backend, m2["b"], [3.0])
    assert tree["b"].state is b_state
    assert snapshot(backend, tree["b"].state) == b_before
    with pytest.raises(ValueError, match=r"keys \['c'\] that the model does not have"):
        opt.update_(tree, m, {"w": backend.asarray([1.0, 1.0]), "c": None})


# -- adjust ----------------------------------------------------------------------------


def _momentum_tree(backend: Any) -> tuple[Any, Any]:
    m = backend.asarray(np.array([4.0, 3.0, 2.0], dtype=np.float32))
    tree = opt.setup(opt.Momentum(0.1, 0.9), m)
    tree, m = opt.update(
        tree, m, backend.asarray(np.array([1.0, 10.0, 100.0], np.float32))
    )
    return tree, m


def test_adjust_momentum(backend: Any) -> None:
    tree, m = _momentum_tree(backend)
    close(backend, m, np.float32([4, 3, 2]) - np.float32([0.1, 1, 10]))
    close(backend, tree.state, [0.1, 1.0, 10.0])

    t2 = opt.adjust(tree, 0.2)
    assert t2.rule == opt.Momentum(0.2, 0.9)
    assert t2.state is tree.state
    assert t2 is not tree
    assert tree.rule == opt.Momentum(0.1, 0.9)

    t3 = opt.adjust(tree, eta=0.3, rho=0.7)
    assert t3.rule == opt.Momentum(0.3, 0.7)
    assert tree.rule == opt.Momentum(0.1, 0.9)

    with pytest.raises(ValueError, match="zeta"):
        opt.adjust(tree, zeta="this is not a hyperparameter")
    with pytest.raises(ValueError, match="zeta"):
        opt.adjust_(tree, zeta=0.1)
    assert tree.rule == opt.Momentum(0.1, 0.9)

    state = tree.state
    assert opt.adjust_(tree, 0.2) is None
    assert tree.rule == opt.Momentum(0.2, 0.9)
    assert tree.state is state
    opt.adjust_(tree, rho=0.5)
    assert tree.rule == opt.Momentum(0.2, 0.5)


def test_adjust_chain() -> None:
    m = np.array([1.0, 2.0, 3.0])
    rule = opt.OptimiserChain(opt.ClipGrad(2), opt.Adam())
    tree = opt.setup(rule, m)
    tree, m = opt.update(tree, m, np.array([1.0, 10.0, 100.0]))
    np.testing.assert_allclose(tree.state[1].m, [0.1, 0.2, 0.2])

    t2 = opt.adjust(tree, 0.2)
    assert t2.rule.opts[0].delta == 2
    assert t2.rule.opts[1].eta == 0.2
    assert t2.state is tree.state

    t3 = opt.adjust(tree, delta=2.5)
    assert t3.rule.opts[0].delta == 2.5
    assert t3.rule.opts[1].eta == 0.001
    assert t3.rule.opts[1] == opt.Adam()

    opt.adjust_(tree, delta=2.5)
    assert tree.rule == t3.rule


def test_adjust_mixed_precision() -> None:
    m = np.array([4.0, 3.0, 2.0], dtype=np.float16)
    tree = opt.setup(opt.MixedPrecision(opt.Momentum(0.1, 0.9)), m)
    t2 = opt.adjust(tree, 0.2, rho=0.7)
    assert t2.rule == opt.MixedPrecision("float32", opt.Momentum(0.2, 0.7))


def test_adjust_eta_where_no_rule_has_eta() -> None:
    tree = opt.setup(opt.ClipGrad(3.0), {"w": np.ones(2)})
    assert opt.adjust(tree, 0.5)["w"].rule == opt.ClipGrad(3.0)
    with pytest.raises(ValueError, match="'rho'"):
        opt.adjust(tree, rho=0.5)


def test_adjust_bare_rule_and_bad_calls() -> None:
    assert opt.adjust(opt.Adam(), 0.5) == opt.Adam(0.5)
    assert opt.adjust_(opt.Momentum(), rho=0.5) == opt.Momentum(rho=0.5)
    tree = opt.setup(opt.Momentum(), {"w": np.ones(2)})
    with pytest.raises(TypeError, match="learning rate or at least one keyword"):
        opt.adjust(tree)
    with pytest.raises(TypeError, match="no Leaf"):
        opt.adjust({"w": np.ones(2)}, 0.1)


def test_adjust_keeps_ties_and_is_all_or_nothing() -> None:
    w = np.ones(2)
    tree = opt.setup(opt.Momentum(0.1), {"a": w, "b": [w, np.zeros(3)]})
    t2 = opt.adjust(tree, 0.3)
    assert t2["a"] is t2["b"][0]
    assert t2["b"][1].rule == opt.Momentum(0.3)
    assert t2["b"][1].rule is t2["a"].rule  # one shared rule, as after setup
    with pytest.raises(ValueError, match="eta"):
        opt.adjust_(tree, -1.0)
    assert tree["a"].rule == opt.Momentum(0.1)
    assert tree["b"][1].rule == opt.Momentum(0.1)


# -- freeze and thaw ---------------------------------------------------------------------


def test_freeze_thaw(backend: Any) -> None:
    m = {
        "x": backend.asarray([1.0, 2.0]),
        "y": (backend.asarray([3.0, 4.0]), some_function),
    }
    tree = opt.setup(opt.Descent(0.1), m)
    opt.freeze_(tree["y"])
    assert tree["y"][0].frozen
    assert not tree["x"].frozen
    g = {
        "x": backend.asarray([1.0, 10.0]),
        "y": (backend.asarray([100.0, 1000.0]), None),
    }

    tree, m = opt.update_(tree, m, g)
    close(backend, m["x"], [0.9, 1.0])
    close(backend, m["y"][0], [3.0, 4.0])
    assert m["y"][1] is some_function

    opt.adjust_(tree, 0.2)
    opt.thaw_(tree)
    tree, m = opt.update(tree, m, g)
    close(backend, m["y"][0], [-17.0, -196.0])
    close(backend, m["x"], [0.7, -1.0])


def test_frozen_leaf_keeps_state(backend: Any) -> None:
    m = [backend.asarray([1.0, 2.0])]
    tree = opt.setup(opt.Momentum(0.1), m)
    opt.freeze_(tree)
    state = tree[0].state
    tree2, m2 = opt.update(tree, m, [backend.asarray([5.0, 5.0])])
    assert tree2[0].frozen
    assert tree2[0].state is state
    assert m2[0] is m[0]


@pytest.mark.parametrize("fn", [opt.freeze_, opt.thaw_])
def test_freeze_a_model_raises(fn: Any) -> None:
    with pytest.raises(TypeError, match="no Leaf"):
        fn(np.ones(3))
    with pytest.raises(TypeError, match="no Leaf"):
        fn({"w": np.ones(3), "b": [np.zeros(2)]})


def test_leaf_repr() -> None:
    tree = opt.setup(opt.Momentum(0.1), {"w": np.zeros(3, dtype=np.float32)})
    leaf = tree["w"]
    assert repr(leaf) == "Leaf(Momentum(eta=0.1, rho=0.9), <numpy float32[3]>)"
    opt.freeze_(leaf)
    assert repr(leaf).endswith(", frozen=True)")
    adam = repr(opt.setup(opt.Adam(), np.zeros((2, 3))))
    assert adam.startswith("Leaf(Adam(eta=0.001, ")
    assert "<numpy float64[2, 3]>" in adam


def test_leaf_identity_equality() -> None:
    a = opt.Leaf(opt.Descent(), None)
    b = opt.Leaf(opt.Descent(), None)
    assert a != b
    assert operator.eq(a, a)
    assert len({a, b}) == 2


# -- ties ------------------------------------------------------------------------------


def test_tied_weights(backend: Any) -> None:
    tw = backend.asarray([1.0, 2.0])
    m = (tw, (backend.asarray([1.0, 2.0]), tw))
    tree = opt.setup(opt.Momentum(0.1), m)
    assert tree[0] is tree[1][1]
    assert tree[0] is not tree[1][0]
    g = (
        backend.asarray([3.0, 3.0]),
        (backend.asarray([10.0, 10.0]), backend.asarray([7.0, 7.0])),
    )

    tree2, m2 = opt.update(tree, m, g)
    assert m2[0] is m2[1][1]
    assert tree2[0] is tree2[1][1]
    close(backend, m2[0], [0.0, 1.0])
    np.testing.assert_array_equal(backend.to_numpy(m2[0]), backend.to_numpy(m2[1][0]))

    tree3, m3 = opt.update_(tree, m, g)
    assert m3[0] is m3[1][1]
    np.testing.assert_array_equal(backend.to_numpy(m3[0]), backend.to_numpy(m2[0]))

    partial = (None, (backend.asarray([10.0, 10.0]), backend.asarray([7.0, 7.0])))
    _, m4 = opt.update(tree3, m3, partial)
    assert m4[0] is m4[1][1]
    close(backend, m4[0], [0.0 - (0.9 * 1.0 + 0.7), 1.0 - (0.9 * 1.0 + 0.7)])


def test_tied_container_stays_tied(backend: Any) -> None:
    inner = [backend.asarray([1.0, 2.0]), 5]
    m = {"a": inner, "b": inner}
    tree = opt.setup(opt.Descent(0.5), m)
    assert tree["a"] is tree["b"]
    g = {
        "a": [backend.asarray([1.0, 1.0]), None],
        "b": [backend.asarray([1.0, 1.0]), None],
    }
    _, m2 = opt.update(tree, m, g)
    assert m2["a"] is m2["b"]
    assert m2["a"] is not inner
    close(backend, m2["a"][0], [0.0, 1.0])


def test_hand_built_tree_with_broken_ties() -> None:
    w = np.ones(2)
    two_leaves = {
        "a": opt.Leaf(opt.Descent(), None),
        "b": opt.Leaf(opt.Descent(), None),
    }
    with pytest.raises(ValueError, match=re.escape("('b',)")):
        opt.update_(two_leaves, {"a": w, "b": w}, {"a": np.ones(2), "b": np.ones(2)})
    np.testing.assert_array_equal(w, [1.0, 1.0])

    leaf = opt.Leaf(opt.Descent(), None)
    with pytest.raises(ValueError, match="shared"):
        opt.update({"a": leaf, "b": leaf}, {"a": w, "b": np.ones(2)}, {"a": w, "b": w})


# -- what is trainable ---------------------------------------------------------------------


def test_non_trainable_leaves(backend: Any) -> None:
    ints = backend.asarray(np.array([1, 2], dtype=np.int64))
    bools = backend.asarray(np.array([True, False]))
    m = {
        "w": backend.asarray([1.0]),
        "i": ints,
        "b": bools,
        "s": 3.0,
        "n": np.float32(2.0),
        "f": some_function,
        "t": "text",
    }
    tree = opt.setup(opt.Descent(0.5), m)
    assert {k for k, v in tree.items() if v is not None} == {"w"}
    g = {"w": backend.asarray([1.0]), "i": ints, "b": bools}
    _, m2 = opt.update_(tree, m, g)
    for key in "ibsnft":
        assert m2[key] is m[key]
    close(backend, m2["w"], [0.5])


def test_setup_warns_when_nothing_trainable(backend: Any) -> None:
    model = {"i": backend.asarray(np.array([1, 2])), "s": 1.5, "l": [some_function]}
    with pytest.warns(UserWarning, match="no trainable parameters"):
        tree = opt.setup(opt.Adam(), model)
    assert tree == {"i": None, "s": None, "l": [None]}


def test_setup_rejects_a_non_rule() -> None:
    with pytest.raises(TypeError, match="must be a rule"):
        opt.setup({"w": np.ones(2)}, opt.Adam())  # type: ignore[arg-type]


def test_complex_parameters(backend: Any) -> None:
    x = backend.asarray(np.array([1 + 2j, 3 - 1j]))
    g = backend.asarray(np.array([1 + 1j, 2j]))
    tree = opt.setup(opt.Descent(0.1), {"z": x})
    assert isinstance(tree["z"], opt.Leaf)
    _, m = opt.update(tree, {"z": x}, {"z": g})
    expected = np.array([1 + 2j, 3 - 1j]) - 0.1 * np.array([1 + 1j, 2j])
    close(backend, m["z"], expected)
    assert backend.to_numpy(m["z"]).dtype == np.complex128


def test_gradient_cast_to_parameter_dtype(backend: Any) -> None:
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(1000).astype(np.float32)
    g = rng.standard_normal(1000)  # float64, cast to float32 before the rule runs
    x = backend.asarray(x0)
    tree = opt.setup(opt.Momentum(0.1, 0.9), x)
    new_tree, new = opt.update(tree, x, backend.asarray(g))
    v = np.float32(0.9) * np.zeros(1000, np.float32) + np.float32(0.1) * g.astype(
        np.float32
    )
    assert as_np(backend, new_tree.state).dtype == np.float32
    assert as_np(backend, new_tree.state).tobytes() == v.tobytes()
    assert as_np(backend, new).tobytes() == (x0 - v).tobytes()


def test_gradient_cast_overflow_is_not_a_warning(backend: Any) -> None:
    x = backend.asarray(np.array([1.0, 2.0], dtype=np.float32))
    tree = opt.setup(opt.Descent(1.0), x)
    _, new = opt.update(tree, x, backend.asarray(np.array([1e300, 0.5])))
    np.testing.assert_array_equal(as_np(backend, new), np.float32([-np.inf, 1.5]))


# -- containers ------------------------------------------------------------------------------


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Layer:
    w: Any
    b: Any = None
    act: str = "relu"


@dataclasses.dataclass(frozen=True)
class FrozenLayer:
    w: Any
    scale: float = 2.0
    calls: int = dataclasses.field(default=0, init=False)


class Pair:
    """A user container, registered below."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second


opt.register_container(
    Pair,
    lambda p: (("first", "second"), (p.first, p.second)),
    lambda p, children: Pair(*children),
)


def test_namedtuple_container(backend: Any) -> None:
    m = Point(backend.asarray([1.0]), backend.asarray([2.0]))
    tree = opt.setup(opt.Descent(0.5), m)
    assert type(tree) is Point
    for g in (
        Point(backend.asarray([1.0]), None),
        {"x": backend.asarray([1.0])},
        (backend.asarray([1.0]), None),
    ):
        _, m2 = opt.update(tree, m, g)
        assert type(m2) is Point
        close(backend, m2.x, [0.5])
        assert m2.y is m.y


@pytest.mark.parametrize("cls", [Layer, FrozenLayer])
def test_dataclass_container(backend: Any, cls: Any) -> None:
    m = cls(backend.asarray([1.0, 2.0]))
    tree = opt.setup(opt.Descent(0.5), m)
    assert isinstance(tree, dict)
    assert isinstance(tree["w"], opt.Leaf)
    assert "calls" not in tree
    as_type = cls(backend.asarray([2.0, 2.0]))
    as_dict = {"w": backend.asarray([2.0, 2.0])}
    for g in (as_type, as_dict):
        _, m2 = opt.update(tree, m, g)
        assert type(m2) is cls
        close(backend, m2.w, [0.0, 1.0])
        assert snapshot(backend, m2)[2:] == snapshot(backend, m)[2:]


def test_dataclass_with_field_b(backend: Any) -> None:
    m = {"layer": Layer(backend.asarray([1.0]), backend.asarray([3.0]), "tanh")}
    tree = opt.setup(opt.Descent(1.0), m)
    assert tree == {
        "layer": {"w": tree["layer"]["w"], "b": tree["layer"]["b"], "act": None}
    }
    _, m2 = opt.update_(
        tree, m, {"layer": Layer(None, backend.asarray([1.0]), "ignored")}
    )
    assert m2["layer"].act == "tanh"
    close(backend, m2["layer"].w, [1.0])
    close(backend, m2["layer"].b, [2.0])


def test_registered_container(backend: Any) -> None:
    m = [Pair(backend.asarray([1.0]), Pair(backend.asarray([2.0]), "label"))]
    tree = opt.setup(opt.Descent(0.5), m)
    assert isinstance(tree[0], dict)
    assert tree[0]["second"]["second"] is None
    g = [{"second": Pair(backend.asarray([4.0]), None)}]
    _, m2 = opt.update(tree, m, g)
    assert isinstance(m2[0], Pair)
    assert m2[0].first is m[0].first
    close(backend, m2[0].second.first, [0.0])
    assert m2[0].second.second == "label"
    assert opt.trainables(m, path=True)[1][0] == (0, "second", "first")


def test_register_container_checks() -> None:
    with pytest.raises(TypeError, match="must be a class"):
        opt.register_container("Pair", lambda p: ((), ()), lambda p, c: p)  # type: ignore[arg-type]

    class Bad:
        pass

    opt.register_container(Bad, lambda b: (("a", "b"), (1,)), lambda b, c: b)
    with pytest.raises(ValueError, match="2 keys but 1 children"):
        opt.setup(opt.Descent(), Bad())


def test_mapping_subclasses_keep_their_type() -> None:
    od = collections.OrderedDict([("z", np.ones(1)), ("a", np.ones(1))])
    dd: collections.defaultdict[str, Any] = collections.defaultdict(list, w=np.ones(1))
    m = {"od": od, "dd": dd}
    tree = opt.setup(opt.Descent(0.5), m)
    assert list(tree["od"]) == ["z", "a"]
    _, m2 = opt.update(tree, m, {"od": {"a": np.ones(1)}, "dd": {"w": np.ones(1)}})
    assert type(m2["od"]) is collections.OrderedDict
    assert list(m2["od"]) == ["z", "a"]
    assert type(m2["dd"]) is collections.defaultdict
    assert m2["dd"].default_factory is list
    np.testing.assert_array_equal(m2["dd"]["w"], [0.5])
    np.testing.assert_array_equal(dd["w"], [1.0])


def test_update_in_place_keeps_unchanged_containers() -> None:
    m = {"a": [np.ones(2)], "b": {"c": np.ones(2)}}
    tree = opt.setup(opt.Descent(0.5), m)
    _, m2 = opt.update_(tree, m, {"a": [np.ones(2)], "b": None})
    assert m2 is m
    assert m2["a"] is m["a"]
    _, m3 = opt.update(tree, m, {"a": [np.ones(2)], "b": None})
    assert m3 is not m
    assert m3["b"] is not m["b"]


# -- update and update_ agree, and update changes nothing ----------------------------------


RULES_FOR_IDENTITY = [
    opt.OptimiserChain(opt.ClipGrad(1.0), opt.Momentum(0.01, 0.9), opt.Descent(0.5)),
    opt.Adam(0.01),
    opt.MixedPrecision("float64", opt.Momentum(0.01)),
    opt.OptimiserChain(opt.AccumGrad(2), opt.Descent(0.1)),
]


@pytest.mark.parametrize("rule", RULES_FOR_IDENTITY, ids=lambda r: type(r).__name__)
def test_update_and_update_in_place_bit_identical(backend: Any, rule: opt.Rule) -> None:
    rng = np.random.default_rng(7)
    shapes = {"w": (320, 320), "b": (320,), "layers": [(17, 3), (5,)]}

    def make(f: Any) -> Any:
        return {
            "w": f(shapes["w"]),
            "b": f(shapes["b"]),
            "layers": [f(s) for s in shapes["layers"]],
            "n": 4,
        }

    def normal(shape: tuple[int, ...]) -> Any:
        return backend.asarray(rng.standard_normal(shape).astype(np.float32))

    start = make(lambda shape: rng.standard_normal(shape).astype(np.float32))
    pure_m = make(lambda shape: None)
    mut_m = make(lambda shape: None)
    for m in (pure_m, mut_m):
        m["w"], m["b"] = backend.asarray(start["w"]), backend.asarray(start["b"])
        m["layers"] = [backend.asarray(a) for a in start["layers"]]
    pure_t, mut_t = opt.setup(rule, pure_m), opt.setup(rule, mut_m)
    first = snapshot(backend, pure_m)

    for _ in range(3):
        grads = make(normal)
        grads["n"] = None
        pure_t, pure_m = opt.update(pure_t, pure_m, grads)
        mut_t, mut_m = opt.update_(mut_t, mut_m, grads)
        assert snapshot(backend, (pure_t, pure_m)) == snapshot(backend, (mut_t, mut_m))
        assert backend.to_numpy(pure_m["w"]).dtype == np.float32
    assert snapshot(backend, pure_m) != first


@pytest.mark.parametrize("rule", RULES_FOR_IDENTITY, ids=lambda r: type(r).__name__)
def test_update_does_not_modify_its_inputs(backend: Any, rule: opt.Rule) -> None:
    rng = np.random.default_rng(3)

    def normal(*shape: int) -> Any:
        return backend.asarray(rng.standard_normal(shape).astype(np.float32))

    tw = normal(4)
    m = {"w": normal(3, 4), "tied": [tw, tw], "i": backend.asarray(np.arange(3))}
    tree = opt.setup(rule, m)
    for _ in range(2):  # the second round starts from non-zero states
        g = {"w": normal(3, 4), "tied": [normal(4), normal(4)]}
        before = snapshot(backend, (tree, m, g))
        ids = [id(a) for a in arrays_in((tree, m, g))]
        leaves = [tree["w"], tree["tied"][0]]
        new_tree, new_m = opt.update(tree, m, g)
        assert snapshot(backend, (tree, m, g)) == before
        assert [id(a) for a in arrays_in((tree, m, g))] == ids
        assert new_tree["w"] is not leaves[0]
        assert new_tree["tied"][0] is new_tree["tied"][1]
        assert new_m["tied"][0] is new_m["tied"][1]
        assert new_m["i"] is m["i"]
        tree, m = new_tree, new_m


def test_accumgrad_no_step_updates_state_only(backend: Any) -> None:
    x = backend.asarray([1.0, 2.0])
    tree = opt.setup(opt.OptimiserChain(opt.AccumGrad(2), opt.Descent(1.0)), [x])
    tree, m = opt.update_(tree, [x], [backend.asarray([2.0, 2.0])])
    assert m[0] is x
    close(backend, x, [1.0, 2.0])
    close(backend, tree[0].state[0].acc, [1.0, 1.0])
    tree, m = opt.update_(tree, m, [backend.asarray([4.0, 4.0])])
    close(backend, m[0], [-2.0, -1.0])


# -- bad input: a clear error, naming the place, and nothing changed --------------------------


def _bad_setup(backend: Any) -> tuple[Any, Any, Any]:
    m = {
        "a": backend.asarray([1.0, 2.0]),
        "b": [backend.asarray([3.0]), backend.asarray([4.0])],
    }
    tree = opt.setup(opt.Momentum(0.1), m)
    g = {
        "a": backend.asarray([1.0, 1.0]),
        "b": [backend.asarray([1.0]), backend.asarray([1.0])],
    }
    return tree, m, g


def _set(g: dict[str, Any], value: Any) -> dict[str, Any]:
    g["b"][1] = value
    return g


BAD_INPUTS = {
    "shape": (
        lambda t, g, b: (t, _set(g, b.asarray([1.0, 2.0]))),
        ValueError,
        r"\('b', 1\).*shape \(2,\).*shape \(1,\)",
    ),
    "not an array": (
        lambda t, g, b: (t, _set(g, [1.0])),
        TypeError,
        r"\('b', 1\) must be an array.*list",
    ),
    "other backend": (
        lambda t, g, b: (t, _set(g, Foreign(1))),
        TypeError,
        r"\('b', 1\) is a \S*test_tree array.*parameter is a",
    ),
    "complex for real": (
        lambda t, g, b: (t, _set(g, b.asarray(np.array([1j])))),
        TypeError,
        r"\('b', 1\) is complex",
    ),
    "dict for list": (
        lambda t, g, b: (t, {**g, "b": {"0": g["b"][0]}}),
        TypeError,
        r"\('b',\).*model has a list.*gradient is a dict",
    ),
    "short list": (
        lambda t, g, b: (t, {**g, "b": g["b"][:1]}),
        ValueError,
        r"\('b',\).*2 entries.*gradient has 1",
    ),
    "extra gradient key": (
        lambda t, g, b: (t, {**g, "typo": g["a"]}),
        ValueError,
        r"\(\).*gradient has keys \['typo'\]",
    ),
    "tree lacks a key": (
        lambda t, g, b: ({"a": t["a"]}, g),
        ValueError,
        r"\(\).*state tree has no entry.*\['b'\]",
    ),
    "tree list for dict": (
        lambda t, g, b: ([t["a"], t["b"]], g),
        TypeError,
        r"\(\).*model has a dict.*state tree.*list",
    ),
    "tree None for array": (
        lambda t, g, b: ({**t, "b": [t["b"][0], None]}, g),
        ValueError,
        r"\('b', 1\).*state tree has None",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [opt.update, opt.update_])
def test_bad_input_names_the_path_and_changes_nothing(
    backend: Any, case: str, fn: Any
) -> None:
    tree, m, g = _bad_setup(backend)
    make, error, pattern = BAD_INPUTS[case]
    bad_tree, bad_g = make(tree, g, backend)
    before = snapshot(backend, (tree, m))
    states = [tree["a"].state, tree["b"][0].state, tree["b"][1].state]
    with pytest.raises(error, match=pattern):
        fn(bad_tree, m, bad_g)
    assert snapshot(backend, (tree, m)) == before
    assert same([tree["a"].state, tree["b"][0].state, tree["b"][1].state], states)


def test_none_in_tree_for_a_container_without_parameters(backend: Any) -> None:
    m = {
        "w": backend.asarray([1.0]),
        "cfg": {"n": 3, "i": backend.asarray(np.arange(2))},
    }
    tree = {"w": opt.setup(opt.Descent(0.5), m["w"]), "cfg": None}
    _, m2 = opt.update(tree, m, {"w": backend.asarray([1.0]), "cfg": {"n": None}})
    close(backend, m2["w"], [0.5])
    assert m2["cfg"] is m["cfg"]
    m["cfg"]["deep"] = [backend.asarray([2.0])]
    with pytest.raises(ValueError, match=r"\('cfg',\).*None.*at \('cfg', 'deep', 0\)"):
        opt.update(tree, m, {"w": None})


def test_leaf_where_model_has_no_array(backend: Any) -> None:
    tree, m, g = _bad_setup(backend)
    with pytest.raises(TypeError, match=r"\('b', 1\).*Leaf.*int"):
        opt.update_(tree, {**m, "b": [m["b"][0], 3]}, g)


def test_rule_error_in_a_later_leaf_changes_nothing(backend: Any) -> None:
    rule = opt.OptimiserChain(opt.ClipNorm(10.0), opt.Momentum(0.1))
    m = {"a": backend.asarray([1.0, 2.0]), "z": backend.asarray([3.0, 4.0])}
    tree = opt.setup(rule, m)
    before = snapshot(backend, (tree, m))
    states = [tree["a"].state, tree["z"].state]
    g = {"a": backend.asarray([1.0, 1.0]), "z": backend.asarray([np.inf, 1.0])}
    with pytest.raises(FloatingPointError, match="norm inf") as info:
        opt.update_(tree, m, g)
    assert snapshot(backend, (tree, m)) == before
    assert same([tree["a"].state, tree["z"].state], states)
    if sys.version_info >= (3, 11):
        assert "('z',)" in info.value.__notes__[-1]


# -- torch parameters ---------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or importlib.util.find_spec("agnosticopt.adapters.torch") is None,
    reason="needs torch and agnosticopt's torch adapter",
)
def test_torch_parameter_updated_in_place() -> None:
    import torch

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert w.requires_grad
    model = {"w": w}
    tree = opt.setup(opt.Momentum(0.5, 0.9), model)
    (w * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum().backward()
    assert w.grad is not None
    tree, model2 = opt.update_(tree, model, {"w": w.grad})
    assert model2["w"] is w
    assert isinstance(model2["w"], torch.nn.Parameter)
    assert w.requires_grad
    np.testing.assert_allclose(w.detach().numpy(), [0.5, 0.5])
    np.testing.assert_allclose(tree["w"].state.detach().numpy(), [0.5, 1.5])


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("order", ["pq", "qp"])
def test_update__reads_a_parameter_step_before_writing_it(
    fast: bool, order: str
) -> None:
    # An empty chain's step is its gradient; here that gradient is parameter q,
    # which the same update_ also writes (on the fast path: from a kernel).
    def make() -> tuple[dict[str, Any], dict[str, Any]]:
        model = {k: np.ones(200_000, dtype=np.float32) for k in order}
        rules = {"p": opt.OptimiserChain(), "q": opt.Descent(0.5)}
        return model, {k: opt.setup(rules[k], model[k]) for k in order}

    ref_model, ref_tree = make()
    _, want = opt.update(
        ref_tree, ref_model, {"p": ref_model["q"], "q": np.ones_like(ref_model["q"])}
    )
    model, tree = make()
    with fast_path(fast):
        opt.update_(tree, model, {"p": model["q"], "q": np.ones_like(model["q"])})
    for k in "pq":
        assert model[k].tobytes() == want[k].tobytes(), k


# -- issue 9: no silent wrong result, no half-written update, clear errors ------------------


def _bits(backend: Any, a: Any) -> bytes:
    return backend.to_numpy(a).tobytes()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_zero_d_parameter_same_bits_as_one_element(backend: Any, fast: bool) -> None:
    # numpy ufuncs give 0-d arrays back as numpy scalars; the adapter used to hand
    # those on as Python floats, so numpy's plain path went float64 (issue 9.1).
    rule = opt.Nesterov(0.1, 0.9)
    x0, g = np.float32(0.7), np.float32(-0.3)
    ref = np.array([x0])
    ref_tree = opt.setup(rule, ref)
    for _ in range(20):
        ref_tree, ref = opt.update(ref_tree, ref, np.array([g]))
    for fn in (opt.update, opt.update_):
        x = backend.asarray(np.array(x0))
        tree = opt.setup(rule, x)
        with fast_path(fast):
            for _ in range(20):
                tree, x = fn(tree, x, backend.asarray(np.array(g)))
        assert type(x) is type(backend.asarray(np.array(x0)))
        assert backend.to_numpy(x).shape == ()
        assert backend.to_numpy(x).dtype == np.float32
        assert _bits(backend, x) == ref.tobytes(), fn.__name__
        assert backend.to_numpy(tree.state).shape == ()


@pytest.mark.parametrize(
    "rule",
    [
        opt.AdaDelta(),
        opt.AccumGrad(2),
        opt.MixedPrecision("float64", opt.Adam(0.1)),
        opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam(0.1)),
        opt.Rprop(),
        opt.Lion(),
    ],
    ids=repr,
)
def test_zero_d_parameter_every_rule(backend: Any, rule: Any) -> None:
    ref = np.array([0.7], dtype=np.float32)
    ref_tree = opt.setup(rule, ref)
    x = backend.asarray(np.array(0.7, dtype=np.float32))
    tree = opt.setup(rule, x)
    for k in range(4):
        g = np.float32(0.3 - 0.2 * k)
        ref_tree, ref = opt.update(ref_tree, ref, np.array([g]))
        tree, x = opt.update(tree, x, backend.asarray(np.array(g)))
        assert backend.to_numpy(x).shape == ()
        assert _bits(backend, x) == ref.tobytes()


def test_numpy_subclasses_and_scalars() -> None:
    with pytest.raises(TypeError, match=r"MaskedArray at \('a', 0\).*np.asarray"):
        opt.setup(opt.Adam(), {"a": [np.ma.array(np.ones(2, np.float32))]})
    with pytest.warns(PendingDeprecationWarning):  # numpy warns on making a matrix
        matrix = np.asmatrix(np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"matrix at \('m',\)"):
        opt.setup(opt.Adam(), {"m": matrix, "w": np.ones(1)})
    # numpy scalars are numbers (not trainable), as Python floats are; memmaps are arrays
    tree = opt.setup(opt.Adam(), {"s": np.float32(1.5), "w": np.ones(1)})
    assert tree["s"] is None
    assert isinstance(tree["w"], opt.Leaf)


def test_memmap_parameter(tmp_path: Any) -> None:
    w = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="w+", shape=(3,))
    w[:] = 1.0
    tree = opt.setup(opt.Descent(0.5), w)
    opt.update_(tree, w, np.ones(3, np.float32))
    assert w.tolist() == [0.5, 0.5, 0.5]


class _ForeignArray:
    """An array-like (``shape``, ``dtype``, ``__array__``) of a library without adapter."""

    def __init__(self, dtype: str) -> None:
        self.shape, self.dtype = (2,), np.dtype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.ones(self.shape, self.dtype)


def test_setup_refuses_an_array_it_cannot_train() -> None:
    # it used to warn "no trainable parameters" and then train nothing (issue 13.4)
    with pytest.raises(
        TypeError, match=r"_ForeignArray at \('layer', 'w'\).*register_adapter"
    ):
        opt.setup(
            opt.Adam(), {"layer": {"w": _ForeignArray("float32")}, "b": np.ones(1)}
        )
    tree = opt.setup(opt.Adam(), {"i": _ForeignArray("int64"), "b": np.ones(1)})
    assert tree["i"] is None  # an integer array-like is not trainable anyway


def test_setup_does_not_take_a_torch_module_for_a_foreign_array() -> None:
    torch = pytest.importorskip("torch")
    from agnosticopt._setup import _foreign_array

    assert not _foreign_array(torch.nn.Linear(2, 2))


def test_setup_with_a_rule_class() -> None:
    with pytest.raises(TypeError, match=r"did you mean Adam\(\)\?"):
        opt.setup(opt.Adam, {"w": np.ones(2)})  # type: ignore[arg-type]


def test_deep_nest_gives_a_clear_error() -> None:
    def nest(depth: int) -> Any:
        model: Any = {"w": np.ones(2)}
        for _ in range(depth):
            model = {"a": model}
        return model

    with pytest.raises(ValueError, match="nested more than 200 containers deep"):
        opt.setup(opt.Descent(0.5), nest(2000))
    model = nest(150)  # deep, but within the limit
    tree = opt.setup(opt.Descent(0.5), model)
    grads = opt.update(tree, model, model)[1]  # a gradient tree of the same shape
    assert opt.trainables(grads)[0].tolist() == [0.5, 0.5]


def test_functional_update_keeps_the_parameter_class() -> None:
    torch = pytest.importorskip("torch")

    class Tagged(torch.Tensor):
        pass

    model = {
        "p": torch.nn.Parameter(torch.ones(2)),
        "f": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "t": torch.ones(2, requires_grad=True),
        "s": torch.ones(2).as_subclass(Tagged),
        "m": torch.nn.Parameter(torch.ones(2, dtype=torch.float16)),
    }
    rules = {k: opt.Adam(0.1) for k in model}
    rules["m"] = opt.MixedPrecision("float32", opt.Adam(0.1))
    tree = {k: opt.setup(rules[k], v) for k, v in model.items()}
    _, new = opt.update(tree, model, {k: torch.ones_like(v) for k, v in model.items()})
    for k, v in model.items():
        assert type(new[k]) is type(v), k
        assert new[k].requires_grad == v.requires_grad, k
        assert new[k] is not v, k
        assert new[k].is_leaf, k
    assert new["p"].detach().tolist() == pytest.approx([0.9, 0.9])


def test_adjust_bare_rule_refuses_an_unknown_keyword() -> None:
    with pytest.raises(ValueError, match="'rho'"):
        opt.adjust(opt.Adam(), rho=0.5)
    with pytest.raises(ValueError, match="'rho'"):
        opt.adjust_(opt.Adam(), rho=0.5)
    assert opt.adjust(opt.Momentum(), rho=0.5) == opt.Momentum(rho=0.5)


def _state_cases() -> dict[str, Any]:
    def other_shape(m: Any) -> Any:
        return opt.setup(opt.Adam(), {"a": m["a"], "b": np.ones(1, np.float32)})

    def float64(m: Any) -> Any:
        return opt.setup(opt.Adam(), {k: v.astype(np.float64) for k, v in m.items()})

    def broadcastable(m: Any) -> Any:  # Adam's m of shape (1,) would broadcast
        return opt.setup(opt.Adam(), {"a": m["a"], "b": np.ones(1, np.float32)})

    def other_rule(m: Any) -> Any:
        tree = opt.setup(opt.Adam(), m)
        tree["b"].state = opt.setup(opt.Momentum(), m["b"]).state
        return tree

    return {
        "other_shape": other_shape,
        "float64": float64,
        "broadcastable": broadcastable,
        "other_rule_state": other_rule,
    }


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("case", sorted(_state_cases()))
def test_state_that_does_not_fit_raises_and_writes_nothing(
    case: str, fast: bool
) -> None:
    model = {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}
    tree = _state_cases()[case](model)
    grads = {k: np.full_like(v, 0.5) for k, v in model.items()}
    before = snapshot(_NP, (tree, model))
    for fn in (opt.update, opt.update_):
        with (
            fast_path(fast),
            pytest.raises((TypeError, ValueError), match=r"at \('[ab]',\) the state"),
        ):
            fn(tree, model, grads)
        assert snapshot(_NP, (tree, model)) == before


def test_state_of_another_backend_names_the_path_and_convert() -> None:
    torch = pytest.importorskip("torch")
    tree = opt.setup(opt.Adam(), {"w": np.ones(3)})  # numpy state ...
    model = {"w": torch.ones(3, dtype=torch.float64)}  # ... for torch parameters
    with pytest.raises(
        TypeError, match=r"at \('w',\) the state\['m'\] is a numpy.*opt.convert"
    ):
        opt.update_(tree, model, {"w": torch.ones(3, dtype=torch.float64)})
    assert isinstance(tree["w"].state.m, np.ndarray)
    converted = opt.convert(tree, like=model)  # what the message points to
    opt.update_(converted, model, {"w": torch.ones(3, dtype=torch.float64)})
    assert float(model["w"][0]) < 1.0


class _NumpyHelper:
    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)


_NP = _NumpyHelper()


@dataclasses.dataclass(frozen=True)
class _StepRule(opt.Rule):
    """A custom rule whose step is ``make(dx, xp)``; its state counts the calls."""

    make: Any = None

    def init(self, x: Any, xp: Any) -> Any:
        return xp.zeros_like(x)

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        return xp.add(state, 1.0), self.make(dx, xp)


def _bad_steps() -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    return {
        "wrong_shape": lambda dx, xp: xp.flatten(dx)[:1],
        "broadcast": lambda dx, xp: np.ones((2, 3), np.float32),
        "other_backend": lambda dx, xp: torch.ones(3),
        "complex_for_real": lambda dx, xp: dx.astype(np.complex64),
        "python_float": lambda dx, xp: 0.5,
        "integer": lambda dx, xp: np.ones(3, np.int64),
    }


@pytest.mark.parametrize("case", sorted(_bad_steps()))
def test_bad_step_raises_before_anything_is_written(case: str) -> None:
    model = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    tree = {
        "a": opt.setup(opt.Descent(0.5), model["a"]),
        "b": opt.setup(_StepRule(_bad_steps()[case]), model["b"]),
    }
    grads = {k: np.full_like(v, 0.5) for k, v in model.items()}
    before = snapshot(_NP, (tree, model))
    for fn in (opt.update, opt.update_):
        with pytest.raises(
            (TypeError, ValueError), match=r"at \('b',\) the rule _StepRule"
        ):
            fn(tree, model, grads)
        assert snapshot(_NP, (tree, model)) == before


def test_torch_conjugate_view_updated_in_place_like_numpy() -> None:
    torch = pytest.importorskip("torch")
    values = np.array([1 + 2j, 3 - 1j, -0.0 + 0.0j], dtype=np.complex64)
    grad = np.array([0.5 + 0.25j, -1j, 0.0 - 0.0j], dtype=np.complex64)
    ref = values.conj()
    ref_tree = opt.setup(opt.Momentum(0.1), ref)
    z = torch.from_numpy(values.copy()).conj()
    tree = opt.setup(opt.Momentum(0.1), z)
    for _ in range(3):
        ref_tree, ref = opt.update(ref_tree, ref, grad)
        tree, z2 = opt.update_(tree, z, torch.from_numpy(grad))
        assert z2 is z
        assert z.is_conj()
    assert z.resolve_conj().numpy().tobytes() == ref.tobytes()


class _InterruptArray(np.ndarray):
    pass


class _InterruptingAdapter(type(opt.adapter_for(np.ones(1)))):  # type: ignore[misc]
    """The numpy adapter for ``_InterruptArray``; its first write sends a SIGINT."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.armed = "numpy-interrupting", False

    def subtract_(self, x: Any, step: Any) -> None:
        if self.armed:
            self.armed = False
            import signal

            signal.raise_signal(signal.SIGINT)
        super().subtract_(x, step)


_INTERRUPTING = _InterruptingAdapter()
opt.register_adapter(lambda x: _INTERRUPTING if type(x) is _InterruptArray else None)


@pytest.mark.skipif(
    sys.platform == "win32", reason="raise_signal(SIGINT) is POSIX here"
)
def test_interrupt_during_the_commit_leaves_every_leaf_consistent() -> None:
    def make() -> tuple[Any, Any]:
        model = {k: np.arange(3.0).view(_InterruptArray) for k in "abc"}
        return opt.setup(opt.Momentum(0.1, 0.9), model), model

    grads = {k: np.full(3, 0.5).view(_InterruptArray) for k in "abc"}
    ref_tree, ref_model = make()
    ref_tree, ref_model = opt.update(ref_tree, ref_model, grads)
    tree, model = make()
    _INTERRUPTING.armed = True
    with pytest.raises(KeyboardInterrupt):  # held back until the commit is done
        opt.update_(tree, model, grads)
    for k in "abc":  # every leaf: new state and new parameter
        assert np.asarray(model[k]).tobytes() == np.asarray(ref_model[k]).tobytes(), k
        assert (
            np.asarray(tree[k].state).tobytes()
            == np.asarray(ref_tree[k].state).tobytes()
        ), k


def _views(kind: str) -> tuple[Any, Any, Any]:
    """Two parameters overlapping in memory, and one buffer of disjoint interleaved views."""
    if kind == "torch":
        torch = pytest.importorskip("torch")
        base = torch.ones(6)
        return base[:4], base[2:], torch.ones(8)
    base = np.ones(6)
    return base[:4], base[2:], np.ones(8)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_overlapping_parameters_raise_naming_both(kind: str) -> None:
    p, q, buffer = _views(kind)
    model = {"p": p, "q": q}
    tree = opt.setup(opt.Descent(0.5), model)
    grads = {"p": p * 0 + 1, "q": q * 0 + 1}
    with pytest.raises(ValueError, match=r"\('p',\) and \('q',\) share memory"):
        opt.update_(tree, model, grads)
    assert float(p.sum()) == 4.0
    # disjoint views of one buffer are fine: each element stepped once
    model = {"even": buffer[::2], "odd": buffer[1::2]}
    tree = opt.setup(opt.Descent(0.5), model)
    opt.update_(tree, model, {k: v * 0 + 1 for k, v in model.items()})
    assert [float(v) for v in buffer] == [0.5] * 8


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("order", ["pq", "qp"])
def test_gradient_that_views_a_parameter_reads_its_old_values(
    kind: str, fast: bool, order: str
) -> None:
    # p's step is its gradient (an empty chain), a view of parameter q, which the
    # same update_ writes: p must see q's values from before the call.
    def make() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kind == "torch":
            torch = pytest.importorskip("torch")
            q = torch.arange(8.0)
        else:
            q = np.arange(8.0)
        model = {k: q if k == "q" else q[4:] * 0 + 10 for k in order}
        rules = {"p": opt.OptimiserChain(), "q": opt.Descent(0.5)}
        grads = {k: model["q"][4:] if k == "p" else model["q"] * 0 + 1 for k in order}
        return model, {k: opt.setup(rules[k], model[k]) for k in order}, grads

    ref_model, ref_tree, ref_grads = make()
    _, want = opt.update(ref_tree, ref_model, ref_grads)
    model, tree, grads = make()
    with fast_path(fast):
        opt.update_(tree, model, grads)
    for k in "pq":
        assert [float(v) for v in model[k]] == [float(v) for v in want[k]], k


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_many_views_of_one_buffer_are_swept_not_compared_pairwise(kind: str) -> None:
    # slices of one buffer: the overlap test sorts them by address (no n^2 pairs)
    # and finds the one slice that meets two others
    buf = (
        np.zeros(64 * 8)
        if kind == "numpy"
        else pytest.importorskip("torch").zeros(64 * 8)
    )
    model = {f"w{i}": buf[8 * i : 8 * (i + 1)] for i in range(64)}
    tree = opt.setup(opt.Descent(0.5), model)
    opt.update_(tree, model, {k: v * 0 + 1 for k, v in model.items()})
    assert float(buf.sum()) == -0.5 * 64 * 8
    model["late"] = buf[100:110]
    tree = opt.setup(opt.Descent(0.5), model)
    with pytest.raises(ValueError, match=r"\('w12',\) and \('late',\) share memory"):
        opt.update_(tree, model, {k: v * 0 + 1 for k, v in model.items()})
