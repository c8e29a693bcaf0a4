"""Every rule: Optimisers.jl's hard-coded cases, convergence, dtypes, construction.

Expected values are Optimisers.jl's own test and docstring numbers (see
shared/reference/optimisers-jl.md §4), written as the arithmetic they came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
from typing import TYPE_CHECKING, Any, Optional, Tuple  # noqa: UP035  (typing spellings tested)

import numpy as np
import pytest
from _backends import fast_path
from agnosticopt.conformance._cases import (
    MODIFIERS,
    OPTIMISERS_JL,
    cases_in,
    complex_ok,
)

import agnosticopt as opt

#: Optimisers.jl's test/rules.jl RULES table (the shared table's ``optimisers.jl`` list).
RULES: list[opt.Rule] = [case.rule for case in cases_in(OPTIMISERS_JL)]

#: Modifiers, not optimisers on their own, and the remaining wrappers (``modifiers``).
OTHER_RULES: list[opt.Rule] = [case.rule for case in cases_in(MODIFIERS)]


def _step(
    backend: Any, rule: opt.Rule, x: Any, dx: Any, dtype: str = "float64"
) -> np.ndarray:
    """One ``update`` of a bare array; returns the new parameter as numpy."""
    backend.require(dtype)
    xb = backend.asarray(np.asarray(x, dtype=dtype))
    tree = opt.setup(rule, xb)
    _, new = opt.update(tree, xb, backend.asarray(np.asarray(dx, dtype=dtype)))
    return backend.to_numpy(new)


# -- OptimiserChain table (runtests.jl) ----------------------------------------
X3, DX3 = [1.0, 10.0, 100.0], [1.0, 2.0, 3.0]
CHAIN_CASES = [
    (opt.WeightDecay(0.1), [1 - 0.1 - 1, 10 - 1 - 2, 100 - 10 - 3]),
    (opt.SignDecay(0.1), [1 - 0.1 - 1, 10 - 0.1 - 2, 100 - 0.1 - 3]),
    (opt.ClipGrad(2), [0.0, 8.0, 98.0]),
    (
        opt.OptimiserChain(opt.ClipGrad(2), opt.WeightDecay(0.1)),
        [1 - 0.1 - 1, 10 - 1 - 2, 100 - 10 - 2],
    ),
    (
        opt.OptimiserChain(opt.OptimiserChain(opt.ClipGrad(2)), opt.WeightDecay(0.1)),
        [1 - 0.1 - 1, 10 - 1 - 2, 100 - 10 - 2],
    ),
    (opt.OptimiserChain(opt.Descent(0.1)), [0.9, 9.8, 99.7]),
    (opt.OptimiserChain(), [1 - 1, 10 - 2, 100 - 3]),
]


@pytest.mark.parametrize(("rule", "expected"), CHAIN_CASES, ids=repr)
def test_chain_table(backend: Any, rule: opt.Rule, expected: list[float]) -> None:
    np.testing.assert_allclose(_step(backend, rule, X3, DX3), expected, rtol=1e-12)


def test_chain_order_matters(backend: Any) -> None:
    forward = opt.OptimiserChain(opt.ClipGrad(2), opt.WeightDecay(0.1))
    reverse = opt.OptimiserChain(opt.WeightDecay(0.1), opt.ClipGrad(2))
    assert not np.array_equal(
        _step(backend, forward, X3, DX3), _step(backend, reverse, X3, DX3)
    )


def test_sign_decay_signs(backend: Any) -> None:
    got = _step(backend, opt.SignDecay(0.1), [1.0, -10.0, 100.0], [3.0, 2.0, -1.0])
    np.testing.assert_allclose(
        got, [1 - 0.1 - 3, -10 + 0.1 - 2, 100 - 0.1 + 1], rtol=1e-12
    )


def test_chain_docstring_example(backend: Any) -> None:
    rule = opt.OptimiserChain(opt.ClipGrad(1.0), opt.Descent(0.1))
    got = _step(backend, rule, [0.0, 0.0, 0.0], [0.3, 1.0, 7.0])
    np.testing.assert_allclose(got, [-0.03, -0.1, -0.1], rtol=1e-12)


# -- clipping ------------------------------------------------------------------
def test_clip_grad(backend: Any) -> None:
    got = _step(backend, opt.ClipGrad(13), [0.0, 0.0, 0.0], [1.0, 10.0, 100.0])
    np.testing.assert_array_equal(-got, [1.0, 10.0, 13.0])


def test_clip_norm_small_gradient_unchanged(backend: Any) -> None:
    np.testing.assert_array_equal(
        -_step(backend, opt.ClipNorm(10), [0.0], [0.1]), [0.1]
    )


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_clip_norm_scales_to_omega(backend: Any, p: float) -> None:
    g = np.random.default_rng(0).normal(size=100) * 100
    delta = -_step(backend, opt.ClipNorm(10, p), np.zeros(100), g)
    np.testing.assert_allclose(np.linalg.norm(delta, p), 10, rtol=1e-12)


def test_clip_norm_nan_raises(backend: Any) -> None:
    with pytest.raises(FloatingPointError, match="norm nan"):
        _step(backend, opt.ClipNorm(10), [0.0, 0.0], [1.0, math.nan])


def test_clip_norm_no_throw(backend: Any) -> None:
    delta = -_step(
        backend, opt.ClipNorm(5, 1, throw=False), np.zeros(20), np.arange(20.0)
    )
    np.testing.assert_allclose(np.abs(delta).sum(), 5, rtol=1e-12)
    inf = -_step(backend, opt.ClipNorm(5, 1, throw=False), [0.0, 0.0], [1.0, math.inf])
    assert np.isnan(inf[1])


# -- Float16 epsilon (#167) -------------------------------------------------------
def test_float16_epsilon_keeps_adam_finite(backend: Any) -> None:
    x = [0.579, -0.729, 0.5493]
    g = [-0.001497, 0.0001875, -0.013176]
    got = _step(backend, opt.Adam(1e-4), x, g, dtype="float16")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, np.float16([1.835, -0.886, 0.5493]), rtol=1e-3)


# -- AccumGrad -------------------------------------------------------------------
def test_accum_grad_mean_of_n(backend: Any) -> None:
    rule = opt.OptimiserChain(opt.AccumGrad(3), opt.Descent(0.01))
    x0 = np.array([1.0, 2.0])
    grads = [
        np.array([1.0, 4.0]),
        np.array([2.0, -8.0]),
        np.array([6.0, 1.0]),
        np.array([5.0, 5.0]),
    ]
    model = backend.asarray(x0)
    tree = opt.setup(rule, model)
    seen = []
    for g in grads:
        tree, model = opt.update(tree, model, backend.asarray(g))
        seen.append(backend.to_numpy(model))
    np.testing.assert_array_equal(seen[0], x0)
    np.testing.assert_array_equal(seen[1], x0)
    np.testing.assert_allclose(
        seen[2], x0 - 0.01 * (grads[0] + grads[1] + grads[2]) / 3, rtol=1e-12
    )
    np.testing.assert_array_equal(seen[3], seen[2])


def test_accum_grad_docstring_example(backend: Any) -> None:
    rule = opt.OptimiserChain(opt.AccumGrad(2), opt.WeightDecay(0.01), opt.Descent(0.1))
    model = {
        "x": backend.asarray(np.float32([1])),
        "y": backend.asarray(np.float32([2])),
    }
    tree = opt.setup(rule, model)
    f32 = np.float32
    tree, model = opt.update(
        tree, model, {"x": backend.asarray(f32([33])), "y": backend.asarray(f32([0]))}
    )
    assert backend.to_numpy(model["x"])[0] == 1
    assert backend.to_numpy(model["y"])[0] == 2
    tree, model = opt.update(
        tree, model, {"x": backend.asarray(f32([0])), "y": backend.asarray(f32([444]))}
    )
    np.testing.assert_allclose(backend.to_numpy(model["x"]), f32([-0.651]), rtol=1e-6)
    np.testing.assert_allclose(
        backend.to_numpy(model["y"]), f32([-20.202002]), rtol=1e-6
    )


# -- MixedPrecision ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mixed_precision_master_copy(backend: Any, dtype: str) -> None:
    backend.require("float16")
    rule = opt.MixedPrecision(dtype, opt.Adam(1e-3))
    rng = np.random.default_rng(1)
    model = backend.asarray(rng.normal(size=50).astype(np.float16))
    tree = opt.setup(rule, model)
    for _ in range(3):
        g = backend.asarray(rng.normal(size=50).astype(np.float16))
        tree, model = opt.update(tree, model, g)
    master = backend.to_numpy(tree.state.master)
    assert master.dtype == np.dtype(dtype)
    assert backend.to_numpy(tree.state.state.m).dtype == np.dtype(dtype)
    new = backend.to_numpy(model)
    assert new.dtype == np.float16
    np.testing.assert_array_equal(new, master.astype(np.float16))


def test_mixed_precision_adjust_and_chain() -> None:
    rule = opt.MixedPrecision("float64", opt.Adam(1e-3))
    adjusted = rule.adjust(2e-3)
    assert isinstance(adjusted, opt.MixedPrecision)
    assert adjusted.dtype == "float64"
    assert adjusted.rule == opt.Adam(2e-3)
    with pytest.raises(ValueError, match="wrap the whole chain"):
        opt.OptimiserChain(opt.MixedPrecision(opt.Adam()))


# -- documentation values ----------------------------------------------------------
def test_momentum_update_doc_example(backend: Any) -> None:
    got = _step(
        backend, opt.Momentum(1 / 30), [1.0, 2.0], [10.0, 14.0], dtype="float32"
    )
    np.testing.assert_array_equal(got, np.float32([0.6666666, 1.5333333]))


def test_momentum_float16_enzyme_example(backend: Any) -> None:
    got = _step(
        backend, opt.Momentum(1 / 9), [1.0, 2.0, 3.0], [1.0, 0.0, -4.0], dtype="float16"
    )
    np.testing.assert_allclose(got, np.float16([0.8887, 2.0, 3.445]), rtol=1e-3)


def test_nesterov_state_is_negative_velocity(backend: Any) -> None:
    x = backend.asarray(np.array([1.0, 2.0]))
    tree = opt.setup(opt.Nesterov(), x)
    tree, _ = opt.update(tree, x, backend.asarray(np.array([16.0, 88.0])))
    np.testing.assert_allclose(
        backend.to_numpy(tree.state), [-0.016, -0.088], rtol=1e-12
    )


def test_momentum_state_after_one_step(backend: Any) -> None:
    x = backend.asarray(np.float32([4, 3, 2]))
    tree = opt.setup(opt.Momentum(0.1, 0.9), x)
    tree, new = opt.update(tree, x, backend.asarray(np.float32([1, 10, 100])))
    np.testing.assert_allclose(backend.to_numpy(tree.state), [0.1, 1, 10], rtol=1e-6)
    np.testing.assert_allclose(
        backend.to_numpy(new),
        np.float32([4, 3, 2]) - np.float32([0.1, 1, 10]),
        rtol=1e-6,
    )


# -- complex numbers (Flux#1776) ----------------------------------------------------
COMPLEX_RULES = [
    opt.Adam(1e-2),
    opt.RMSProp(1e-2),
    opt.RAdam(1e-2),
    opt.OAdam(1e-2),
    opt.AdaGrad(1e-2),
    opt.AdaDelta(0.9, 1e-5),
    opt.NAdam(1e-2),
    opt.AdaBelief(1e-2),
    opt.Descent(1e-2),
    opt.Momentum(1e-2),
    opt.Nesterov(1e-2),
    opt.AdamW(1e-2),
]


def test_complex_rules_are_the_complex_optimisers_of_optimisers_jl() -> None:
    """COMPLEX_RULES (learning rates for 10 steps) has every optimiser of the
    ``optimisers.jl`` list that is defined for complex parameters, once."""
    single = [
        case.rule
        for case in cases_in(OPTIMISERS_JL)
        if not isinstance(case.rule, (opt.OptimiserChain, opt.MixedPrecision))
    ]
    want = {type(rule) for rule in single if complex_ok(rule)}
    assert sorted(type(r).__name__ for r in COMPLEX_RULES) == sorted(
        c.__name__ for c in want
    )


@pytest.mark.parametrize("rule", COMPLEX_RULES, ids=repr)
def test_complex_loss_decreases(backend: Any, rule: opt.Rule) -> None:
    c = 1 + 1j
    w = backend.asarray(np.zeros(1, dtype=np.complex128))
    tree = opt.setup(rule, w)

    def loss(w_np: np.ndarray) -> float:
        r = w_np * c - np.conj(c)
        return float(np.sum(r.real**2 + r.imag**2))

    losses = [loss(backend.to_numpy(w))]
    assert losses[0] == 2.0
    for _ in range(10):
        w_np = backend.to_numpy(w)
        grad = 2 * (w_np * c - np.conj(c)) * np.conj(c)
        tree, w = opt.update(tree, w, backend.asarray(grad))
        losses.append(loss(backend.to_numpy(w)))
    checked = losses[:9] if isinstance(rule, (opt.Momentum, opt.Nesterov)) else losses
    assert all(b < a for a, b in itertools.pairwise(checked)), losses
    assert losses[-1] < 1.9


# -- convergence: test/rules.jl's "independence" problem ----------------------------
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_independence_converges(rule: opt.Rule) -> None:
    rng = np.random.default_rng(1)
    w, w_target = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    tree = opt.setup(rule, w)

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        x = rng.random((10, 20))
        r = w @ x - w_target @ x
        return float(np.mean(r**2)), 2 * r @ x.T / r.size

    assert loss_and_grad(w)[0] > 1
    loss = math.inf
    # Thousands of steps of a 10x10 array: the plain path, quicker on tiny arrays
    # (the fast path's bits are the plain path's: test_fast.py).
    with fast_path(False):
        for _ in range(10**5):
            loss, g = loss_and_grad(w)
            if loss < 0.01:
                break
            tree, w = opt.update_(tree, w, g)
    assert loss < 0.01


# -- dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES + OTHER_RULES, ids=repr)
def test_element_types_preserved(backend: Any, rule: opt.Rule) -> None:
    backend.require("float16")
    model = (
        backend.asarray(np.float32([1, 2])),
        backend.asarray(np.float64([3, 4])),
        backend.asarray(np.float16([5, 6])),
    )
    tree = opt.setup(rule, model)
    for _ in range(3):
        grads = tuple(
            backend.asarray(np.asarray([0.5, -0.25], dtype=backend.to_numpy(m).dtype))
            for m in model
        )
        tree, model = opt.update(tree, model, grads)
    assert [backend.to_numpy(m).dtype for m in model] == [
        np.float32,
        np.float64,
        np.float16,
    ]


def test_rprop_state_keeps_parameter_dtype(backend: Any) -> None:
    backend.require("float16")
    for dtype in ("float16", "float32"):
        x = backend.asarray(np.asarray([1.0, 2.0], dtype=dtype))
        tree = opt.setup(opt.Rprop(), x)
        tree, _ = opt.update(
            tree, x, backend.asarray(np.asarray([1.0, -1.0], dtype=dtype))
        )
        assert backend.to_numpy(tree.state.g_prev).dtype == np.dtype(dtype)
        assert backend.to_numpy(tree.state.steps).dtype == np.dtype(dtype)


def test_descent_default_is_python_float() -> None:
    assert opt.Descent().eta == 0.1
    assert type(opt.Descent().eta) is float


# -- construction, printing, equality, pickling ---------------------------------------
def test_repr() -> None:
    assert repr(opt.Adam(0.001)) == "Adam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-08)"
    assert repr(opt.OptimiserChain(opt.ClipGrad(2), opt.Descent())) == (
        "OptimiserChain(ClipGrad(delta=2.0), Descent(eta=0.1))"
    )
    assert repr(opt.ClipNorm()) == "ClipNorm(omega=10.0, p=2.0, throw=True)"


def test_keyword_constructors_equal_positional() -> None:
    assert opt.Nesterov(rho=0.8, eta=0.1) == opt.Nesterov(0.1, 0.8)
    assert opt.AdamW(lambda_=0.3, eta=0.1) == opt.AdamW(0.1, (0.9, 0.999), 0.3, 1e-8)
    assert opt.RMSProp(centered=True) == opt.RMSProp(centred=True)
    assert opt.Adam() != opt.Adam(0.01)


def test_integers_become_floats() -> None:
    rule = opt.ClipGrad(2)
    assert rule.delta == 2.0
    assert isinstance(rule.delta, float)
    assert opt.Adam(1, (0, 0)).beta == (0.0, 0.0)
    assert opt.Lion(1, (1, 0)).beta == (1.0, 0.0)


@pytest.mark.parametrize("rule", RULES + OTHER_RULES, ids=repr)
def test_pickle_round_trip(rule: opt.Rule) -> None:
    again = pickle.loads(pickle.dumps(rule))
    assert again == rule
    assert repr(again) == repr(rule)


@pytest.mark.parametrize(
    "make",
    [
        lambda: opt.Adam(-1e-3),
        lambda: opt.Descent(-0.1),
        lambda: opt.Momentum(eta=-1.0),
        lambda: opt.RMSProp(-1.0),
        lambda: opt.AdamW(-1.0),
        lambda: opt.AccumGrad(0),
        lambda: opt.AccumGrad(-2),
    ],
)
def test_bad_values_raise_value_error(make: Any) -> None:
    with pytest.raises(ValueError, match=r"\.(eta|n) must be in \[(0|1), inf"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: opt.Adam(1e-3 + 1j),
        lambda: opt.Adam("0.1"),
        lambda: opt.Adam(beta=0.9),
        lambda: opt.Adam(beta=(0.9, 1j)),
        lambda: opt.Momentum(None),
        lambda: opt.ClipNorm(throw="yes"),
        lambda: opt.AccumGrad(2.5),
        lambda: opt.OptimiserChain(opt.Adam(), "Descent"),
        lambda: opt.MixedPrecision("int32", opt.Adam()),
        lambda: opt.Adam().adjust(eta=1j),
    ],
)
def test_bad_types_raise_type_error(make: Any) -> None:
    with pytest.raises(TypeError):
        make()


def test_rmsprop_centred_cannot_be_adjusted() -> None:
    with pytest.raises(ValueError, match="centred"):
        opt.RMSProp().adjust(centred=True)


def test_rule_adjust_ignores_unknown_names() -> None:
    assert opt.ClipGrad(2).adjust(0.5) == opt.ClipGrad(2)
    assert opt.AdaDelta().adjust(0.5) == opt.AdaDelta()
    chain = opt.OptimiserChain(opt.ClipGrad(2), opt.Adam())
    assert chain.adjust(0.2) == opt.OptimiserChain(opt.ClipGrad(2), opt.Adam(0.2))
    assert chain.adjust(delta=2.5) == opt.OptimiserChain(opt.ClipGrad(2.5), opt.Adam())


# -- hyperparameter ranges (issue 9, item 4) -------------------------------------------
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: opt.Adam(NAN), r"Adam\.eta must be in \[0, inf\), got nan"),
        (lambda: opt.Adam(INF), r"Adam\.eta must be in \[0, inf\), got inf"),
        (lambda: opt.Descent(-0.1), r"Descent\.eta must be in \[0, inf\)"),
        (lambda: opt.Adam(epsilon=-1), r"Adam\.epsilon must be in \[0, inf\), got -1"),
        (
            lambda: opt.Adam(beta=(0.9, 1.5)),
            r"Adam\.beta\[1\] must be in \[0, 1\), got 1\.5",
        ),
        (
            lambda: opt.Adam(beta=(NAN, 0.9)),
            r"Adam\.beta\[0\] must be in \[0, 1\), got nan",
        ),
        (lambda: opt.NAdam(beta=(0.9, 1)), r"NAdam\.beta\[1\] must be in \[0, 1\)"),
        (lambda: opt.AdaBelief(beta=(-0.1, 0.9)), r"AdaBelief\.beta\[0\]"),
        (lambda: opt.Lion(beta=(0.9, 1.01)), r"Lion\.beta\[1\] must be in \[0, 1\]"),
        (lambda: opt.Momentum(rho=1.0), r"Momentum\.rho must be in \[0, 1\)"),
        (lambda: opt.Nesterov(rho=-0.5), r"Nesterov\.rho must be in \[0, 1\)"),
        (lambda: opt.RMSProp(rho=NAN), r"RMSProp\.rho must be in \[0, 1\), got nan"),
        (lambda: opt.AdaDelta(rho=1.5), r"AdaDelta\.rho must be in \[0, 1\]"),
        (lambda: opt.AdamW(lambda_=-0.1), r"AdamW\.lambda_ must be in \[0, inf\)"),
        (lambda: opt.WeightDecay(NAN), r"WeightDecay\.lambda_ must be in \[0, inf\)"),
        (lambda: opt.SignDecay(-1), r"SignDecay\.lambda_ must be in \[0, inf\)"),
        (
            lambda: opt.Rprop(ell=(1.2, 0.5)),
            r"Rprop\.ell\[0\] must be in \(0, 1\), got 1\.2",
        ),
        (lambda: opt.Rprop(ell=(0.5, 1.0)), r"Rprop\.ell\[1\] must be in \(1, inf\)"),
        (lambda: opt.Rprop(gamma=(2, 1)), r"Rprop\.gamma must be in increasing order"),
        (lambda: opt.Rprop(gamma=(-1, 1)), r"Rprop\.gamma\[0\] must be in \[0, inf\)"),
        (lambda: opt.ClipGrad(-1), r"ClipGrad\.delta must be in \[0, inf\], got -1"),
        (lambda: opt.ClipGrad(NAN), r"ClipGrad\.delta must be in \[0, inf\], got nan"),
        (lambda: opt.ClipNorm(omega=-1), r"ClipNorm\.omega must be in \[0, inf\]"),
        (lambda: opt.ClipNorm(p=NAN), r"ClipNorm\.p must be in \[0, inf\] or -inf"),
        (lambda: opt.ClipNorm(p=-2), r"ClipNorm\.p must be in \[0, inf\] or -inf"),
        (lambda: opt.AccumGrad(0), r"AccumGrad\.n must be in \[1, inf\]"),
        (
            lambda: opt.Adam().adjust(eta=NAN),
            r"Adam\.eta must be in \[0, inf\), got nan",
        ),
        (lambda: opt.RMSProp(centred=True).adjust(rho=2), r"RMSProp\.rho"),
        (
            lambda: opt.OptimiserChain(opt.ClipGrad(1), opt.Adam()).adjust(delta=-1),
            r"ClipGrad\.delta must be in \[0, inf\]",
        ),
        (
            lambda: opt.MixedPrecision(opt.Adam()).adjust(beta=(0.9, 1.0)),
            r"Adam\.beta\[1\] must be in \[0, 1\)",
        ),
    ],
)
def test_hyperparameter_out_of_range_is_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_one_element_beta_is_refused_at_construction() -> None:
    with pytest.raises(
        TypeError, match=r"Adam\.beta must be a tuple of 2 real numbers"
    ):
        opt.Adam(beta=(0.9,))
    with pytest.raises(TypeError, match=r"Lion\.beta must be a tuple of 2"):
        opt.Lion(beta=(0.9, 0.99, 0.999))
    with pytest.raises(TypeError, match=r"Adam\.beta must be a tuple"):
        opt.Adam().adjust(beta=[0.9, 0.999])


def test_range_edges_and_infinities_are_accepted() -> None:
    assert opt.ClipNorm(math.inf).omega == math.inf
    assert opt.ClipNorm(1.0, -math.inf).p == -math.inf
    assert opt.ClipNorm(1.0, 0).p == 0.0
    assert opt.ClipGrad(math.inf).delta == math.inf
    assert opt.Rprop(0.0, gamma=(0.0, math.inf)).gamma == (0.0, math.inf)
    assert opt.Lion(beta=(1, 1)).beta == (1.0, 1.0)  # Signum without momentum
    assert opt.AdaDelta(rho=1).rho == 1.0  # torch.optim.Adadelta's [0, 1]
    assert opt.Adam(0, (0, 0), 0).eta == 0.0
    assert opt.AccumGrad(1).n == 1


def test_adjust_in_place_with_nan_raises_and_changes_nothing() -> None:
    model = {"a": np.float32([1, 2]), "b": np.float32([3, 4])}
    rule_a, rule_b = opt.Adam(), opt.OptimiserChain(opt.ClipGrad(1), opt.Momentum())
    tree = {"a": opt.setup(rule_a, model["a"]), "b": opt.setup(rule_b, model["b"])}
    states = {k: tree[k].state for k in tree}
    for bad in ({"eta": math.nan}, {"eta": 0.1, "delta": math.nan}, {"rho": 1.0}):
        with pytest.raises(ValueError, match=r"must be in"):
            opt.adjust_(tree, **bad)
        assert tree["a"].rule is rule_a
        assert tree["b"].rule is rule_b
        assert all(tree[k].state is states[k] for k in tree)
    with pytest.raises(ValueError, match=r"Adam\.eta"):
        opt.adjust(tree, math.nan)


@dataclasses.dataclass(frozen=True)
class _Annotated(opt.Rule):
    """A user rule whose annotations use typing's spellings (strings under PEP 563)."""

    scale: Optional[float] = None  # noqa: UP045  (typing's spelling on purpose)
    pair: Tuple[float, float] = (1.0, 2.0)  # noqa: UP006
    many: tuple[float, ...] = ()
    either: float | None = 0.5
    count: int = 1

    def init(self, x: Any, xp: Any) -> None:
        return None

    def apply(self, state: None, x: Any, dx: Any, xp: Any) -> tuple[None, Any]:
        return None, dx


def test_validation_follows_typing_annotations() -> None:
    rule = _Annotated(scale=2, pair=(3, 4), many=(1, 2, 3), either=None)
    assert rule.scale == 2.0
    assert isinstance(rule.scale, float)
    assert rule.pair == (3.0, 4.0)
    assert isinstance(rule.pair[0], float)
    assert _Annotated().scale is None
    with pytest.raises(TypeError, match=r"_Annotated\.scale must be a real number"):
        _Annotated(scale="1")
    with pytest.raises(TypeError, match=r"_Annotated\.pair must be a tuple of 2 real"):
        _Annotated(pair=(1.0,))
    with pytest.raises(TypeError, match=r"_Annotated\.many\[1\] must be a real number"):
        _Annotated(many=(1.0, "x"))
    with pytest.raises(TypeError, match=r"_Annotated\.either must be a real number"):
        _Annotated(either="no")
    with pytest.raises(TypeError, match=r"_Annotated\.count must be an integer"):
        _Annotated(count=1.5)


if TYPE_CHECKING:  # a name only the type checker sees
    from collections.abc import Sequence as OnlyForTypes


@dataclasses.dataclass(frozen=True)
class _HalfResolvable(opt.Rule):
    """A user rule with one annotation that cannot be resolved at run time."""

    eta: float = 0.1
    extra: OnlyForTypes[float] | None = None

    def init(self, x: Any, xp: Any) -> None:
        return None

    def apply(self, state: None, x: Any, dx: Any, xp: Any) -> tuple[None, Any]:
        return None, dx


def test_an_unresolvable_annotation_leaves_the_other_fields_checked() -> None:
    assert _HalfResolvable(1).eta == 1.0
    assert _HalfResolvable(extra=[1.0]).extra == [1.0]
    with pytest.raises(TypeError, match=r"_HalfResolvable\.eta must be a real number"):
        _HalfResolvable("fast")


# -- hyperparameters that degenerate in the parameter dtype (issue 9, item 5) ----------
def _torch() -> Any:
    return pytest.importorskip("torch", reason="torch is not installed")


def test_bfloat16_adam_family_refused_at_setup_with_the_remedy() -> None:
    torch = _torch()
    x = torch.ones(8, dtype=torch.bfloat16)
    for rule in (
        opt.Adam(),
        opt.AdamW(),
        opt.RAdam(),
        opt.NAdam(),
        opt.AdaMax(),
        opt.AMSGrad(),
        opt.AdaBelief(),
        opt.Lion(),
    ):
        name = type(rule).__name__
        with pytest.raises(
            ValueError,
            match=(
                rf"{name}\.beta\[1\] = 0\.999 rounds to 1, so 1 - beta\[1\] is 0 in bfloat16"
                r".*MixedPrecision\('float32', rule\)"
            ),
        ):
            opt.setup(rule, x)
        with pytest.raises(
            ValueError, match=rf"{name}\.beta\[1\]"
        ):  # inside a chain too
            opt.setup(opt.OptimiserChain(opt.ClipGrad(1), rule), x)
    # the remedy: a float32 master copy steps without NaN, as torch.optim does
    tree = opt.setup(opt.MixedPrecision("float32", opt.Adam(0.1)), x)
    for _ in range(3):
        tree, x = opt.update(tree, x, torch.full((8,), 0.5, dtype=torch.bfloat16))
    assert bool(torch.isfinite(x).all())
    assert bool((x < 1).all())
    # a β that bfloat16 keeps below 1 runs in bfloat16
    tree = opt.setup(opt.Adam(0.1, (0.9, 0.99)), x)
    _, y = opt.update(tree, x, torch.full((8,), 0.5, dtype=torch.bfloat16))
    assert bool(torch.isfinite(y).all())


def test_float16_degenerate_hyperparameters_refused_at_setup() -> None:
    x = np.ones(4, np.float16)
    with pytest.raises(
        ValueError, match=r"Adam\.beta\[1\] = 0\.9999 rounds to 1.*float16"
    ):
        opt.setup(opt.Adam(beta=(0.9, 0.9999)), x)
    with pytest.raises(
        ValueError, match=r"RMSProp\.rho = 0\.9999 rounds to 1.*float16"
    ):
        opt.setup(opt.RMSProp(rho=0.9999), x)
    with pytest.raises(
        ValueError, match=r"Descent\.eta = 1e-09 rounds to 0 in float16"
    ):
        opt.setup(opt.Descent(1e-9), x)
    with pytest.raises(ValueError, match=r"AccumGrad\.n = 4097 rounds to 4096"):
        opt.setup(opt.AccumGrad(4097), x)
    opt.setup(opt.MixedPrecision("float32", opt.Adam(beta=(0.9, 0.9999))), x)
    opt.setup(opt.Adam(beta=(0.9, 0.9999)), x.astype(np.float32))
    opt.setup(opt.Descent(0.0), x)  # zero stays zero: no degeneration


def _degenerate_after_adjust(
    backend_model: Any, grads: Any, to_numpy: Any, fast: bool
) -> None:
    """adjust_ to a β that rounds to 1: the next update_ raises and writes nothing."""
    from _backends import fast_path

    tree = opt.setup(opt.Adam(0.1, (0.9, 0.99)), backend_model)
    tree, backend_model = opt.update_(tree, backend_model, grads)
    before = [to_numpy(a) for a in (backend_model, tree.state.m, tree.state.v)]
    state = tree.state
    opt.adjust_(tree, beta=(0.9, 0.99999999))  # in range; 1 in float32 and narrower
    with (
        fast_path(fast),
        pytest.raises(ValueError, match=r"Adam\.beta\[1\].*rounds to 1"),
    ):
        opt.update_(tree, backend_model, grads)
    assert tree.state is state
    after = [to_numpy(a) for a in (backend_model, state.m, state.v)]
    for old, new in zip(before, after, strict=True):
        assert old.tobytes() == new.tobytes()


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_degenerate_after_adjust_raises_before_writing_numpy(
    dtype: str, fast: bool
) -> None:
    x = np.linspace(-1, 1, 64).astype(dtype)
    _degenerate_after_adjust(x, np.full(64, 0.25, dtype), np.array, fast)


def test_degenerate_after_adjust_raises_before_writing_torch_bfloat16() -> None:
    torch = _torch()
    x = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
    _degenerate_after_adjust(
        x,
        torch.full((64,), 0.25, dtype=torch.bfloat16),
        lambda t: t.float().numpy().copy(),
        False,
    )


def test_bfloat16_host_scalars_do_not_depend_on_installed_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = _torch()
    from agnosticopt.adapters import torch as torch_adapter

    x = torch.ones(2, dtype=torch.bfloat16)
    xp = opt.adapter_for(x)
    assert xp.scalar_type(x).__name__ == "bfloat16"
    monkeypatch.setattr(torch_adapter, "_BFLOAT16", None)  # as without ml_dtypes
    with pytest.raises(ImportError, match="ml_dtypes"):
        xp.scalar_type(x)
    with pytest.raises(ImportError, match="ml_dtypes"):
        opt.setup(opt.Descent(), x)
