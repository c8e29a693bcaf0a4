"""Schedules and the Scheduled rule: values, bits against a hand-written loop, errors."""

from __future__ import annotations

import itertools
import math
import pickle
from typing import Any

import numpy as np
import pytest
from _backends import BackendHelper, BackendKind, fast_path

import agnosticopt as opt
from agnosticopt import schedules as sch

N = 120_001  # > 100k elements, odd


# -- values -----------------------------------------------------------------------------


def test_linear_and_cosine_follow_their_formulas() -> None:
    lin, cos = sch.Linear(2.0, 0.5, 8), sch.Cosine(2.0, 0.5, 8)
    for t in range(12):
        u = min(t, 8) / 8
        assert lin(t) == (2.0 + (0.5 - 2.0) * u if t < 8 else 0.5)
        want = 0.5 + (2.0 - 0.5) * (1 + math.cos(math.pi * u)) / 2 if t < 8 else 0.5
        assert cos(t) == want
    assert lin(0) == 2.0
    assert cos(0) == 2.0
    assert lin(8) == cos(8) == 0.5


def test_exponential_step_polynomial() -> None:
    assert [sch.Step(1.0, 0.5, 3)(t) for t in range(7)] == [
        1,
        1,
        1,
        0.5,
        0.5,
        0.5,
        0.25,
    ]
    e = sch.Exponential(2.0, 0.1, 10)
    assert e(0) == 2.0
    assert e(10) == pytest.approx(0.2)
    assert e(5) == 2.0 * 0.1**0.5
    p = sch.Polynomial(1.0, 0.0, 2.0, 10)
    assert [p(t) for t in (0, 5, 10, 11)] == [1.0, 0.25, 0.0, 0.0]
    assert sch.Constant(3)(0) == sch.Constant(3)(10**9) == 3.0


def test_one_cycle_rises_to_peak_then_falls() -> None:
    s = sch.OneCycle(1.0, 100, pct_start=0.3, div=25.0, final_div=1e4)
    values = [s(t) for t in range(101)]
    assert values[0] == pytest.approx(1 / 25)
    assert values[30] == 1.0
    assert values[100] == pytest.approx(1 / 25 / 1e4)
    assert all(a < b for a, b in itertools.pairwise(values[:31]))
    assert all(a > b for a, b in itertools.pairwise(values[30:]))


def test_join_restarts_the_count_at_each_boundary() -> None:
    a, b = sch.Linear(0.0, 1.0, 4), sch.Cosine(1.0, 0.0, 6)
    j = sch.Join((a, b, sch.Constant(7.0)), (4, 10))
    assert [j(t) for t in range(12)] == [
        *(a(t) for t in range(4)),
        *(b(t) for t in range(6)),
        7.0,
        7.0,
    ]
    w = sch.warmup_cosine(1e-3, 10, 100, start=1e-5, end=1e-6)
    assert w(0) == 1e-5
    assert w(10) == 1e-3
    assert w(100) == 1e-6
    assert w(55) == sch.Cosine(1e-3, 1e-6, 90)(45)
    assert sch.warmup_linear(1.0, 0, 10) == sch.Linear(1.0, 0.0, 10)


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: sch.Linear(1.0, 0.0, 0), ValueError, "Linear.steps must be >= 1"),
        (
            lambda: sch.Cosine(1.0, "0", 5),
            TypeError,
            "Cosine.end must be a real number",
        ),
        (lambda: sch.Step(1.0, 0.5, 2.5), TypeError, "Step.every must be an integer"),
        (lambda: sch.Exponential(math.nan, 0.5), ValueError, "must be finite"),
        (lambda: sch.Join((sch.Constant(1),), (3,)), ValueError, "one boundary fewer"),
        (
            lambda: sch.Join(
                (sch.Constant(1), sch.Constant(2), sch.Constant(3)), (5, 5)
            ),
            ValueError,
            "boundaries must be >= 6",
        ),
        (lambda: sch.OneCycle(1.0, 10, pct_start=2.0), ValueError, "pct_start"),
        (lambda: sch.warmup_cosine(1.0, 10, 10), ValueError, "steps must be >= 11"),
        (lambda: sch.Linear(1.0, 0.0, 5)(-1), ValueError, "must be >= 0"),
        (lambda: sch.Linear(1.0, 0.0, 5)(1.5), TypeError, "host integer"),
    ],
)
def test_bad_schedules_raise_clearly(make: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        make()


# -- the rule: bits -----------------------------------------------------------------------

ETA = sch.warmup_cosine(3e-3, warmup=4, steps=20, start=1e-4)
LAMBDA = sch.Linear(1e-1, 0.0, 15)
BETA1 = sch.Cosine(0.85, 0.95, 12)


def _chain(eta: float = 3e-3, lambda_: float = 1e-1, beta1: float = 0.85) -> opt.Rule:
    return opt.OptimiserChain(
        opt.ClipGrad(0.5), opt.AdamW(eta, (beta1, 0.999), lambda_)
    )


def _data(steps: int, dtype: str) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(12)
    x = rng.standard_normal(N).astype(dtype)
    grads = [rng.standard_normal(N).astype(dtype) for _ in range(steps)]
    return x, grads


def _scheduled_run(b: BackendHelper, x: np.ndarray, grads: list[np.ndarray]) -> Any:
    rule = opt.Scheduled(_chain(), eta=ETA, lambda_=LAMBDA, beta=(BETA1, 0.999))
    model = {"w": b.asarray(x)}
    tree = opt.setup(rule, model)
    for g in grads:
        tree, model = opt.update_(tree, model, {"w": b.asarray(g)})
    return tree, model


def _hand_run(b: BackendHelper, x: np.ndarray, grads: list[np.ndarray]) -> Any:
    model = {"w": b.asarray(x)}
    tree = opt.setup(_chain(ETA(0), LAMBDA(0), BETA1(0)), model)
    for t, g in enumerate(grads):
        opt.adjust_(tree, eta=ETA(t), lambda_=LAMBDA(t), beta=(BETA1(t), 0.999))
        tree, model = opt.update_(tree, model, {"w": b.asarray(g)})
    return tree, model


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scheduled_gives_the_bits_of_adjust_every_step(
    any_backend: BackendHelper, dtype: str
) -> None:
    any_backend.require(dtype)
    x, grads = _data(12, dtype)
    tree, model = _scheduled_run(any_backend, x, grads)
    ref_tree, ref_model = _hand_run(any_backend, x, grads)
    got, want = any_backend.to_numpy(model["w"]), any_backend.to_numpy(ref_model["w"])
    assert np.array_equal(_bits(got), _bits(want))
    state, ref_state = tree["w"].state, ref_tree["w"].state
    assert state.t == 12
    adam, ref_adam = state.state[1], ref_state[1]
    assert adam.beta_t == ref_adam.beta_t  # beta_t multiplied by β(t) at each step
    assert type(adam.beta_t[0]) is np.dtype(dtype).type
    for a, r in ((adam.m, ref_adam.m), (adam.v, ref_adam.v)):
        assert np.array_equal(
            _bits(any_backend.to_numpy(a)), _bits(any_backend.to_numpy(r))
        )
    # and the numpy reference: every backend gives numpy's bits
    _, np_model = _hand_run(BackendHelper(BackendKind.NUMPY), x, grads)
    assert np.array_equal(_bits(got), _bits(np_model["w"]))


def test_scheduled_beta_t_is_the_product_of_the_scheduled_betas() -> None:
    x, grads = _data(6, "float32")
    tree, _ = _scheduled_run(
        BackendHelper(BackendKind.NUMPY), x[:5], [g[:5] for g in grads]
    )
    product = np.float32(BETA1(0))
    for t in range(6):
        product = product * np.float32(BETA1(t))
    assert tree["w"].state.state[1].beta_t[0] == product


@pytest.mark.parametrize("fast", [True, False])
def test_scheduled_takes_the_fast_path_with_the_same_bits(fast: bool) -> None:
    pytest.importorskip("numba", reason="the fast path needs numba")
    from agnosticopt.adapters import _fast

    x, grads = _data(8, "float32")
    numpy = BackendHelper(BackendKind.NUMPY)
    _, ref = _hand_run(
        numpy, x, grads
    )  # whichever path: fast == plain is tested elsewhere
    before = _fast.counters["fast"]
    with fast_path(fast):
        _, model = _scheduled_run(numpy, x, grads)
    assert (_fast.counters["fast"] > before) == fast
    assert np.array_equal(_bits(model["w"]), _bits(ref["w"]))


def test_scheduled_inside_a_chain_and_around_mixed_precision() -> None:
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    g = np.linspace(2, -3, 7, dtype=np.float32)
    inner = opt.Scheduled(opt.Descent(0.1), eta=sch.Step(0.1, 0.5, 1))
    tree = opt.setup(opt.OptimiserChain(opt.ClipGrad(1.0), inner), {"w": x.copy()})
    model = {"w": x.copy()}
    for _ in range(3):
        tree, model = opt.update(tree, model, {"w": g})
    want = x.copy()
    for t in range(3):
        want = want - np.clip(g, -1, 1) * np.float32(0.1 * 0.5**t)
    assert np.array_equal(model["w"], want)
    mixed = opt.MixedPrecision(
        "float64", opt.Scheduled(opt.Descent(), eta=sch.Constant(0.5))
    )
    tree = opt.setup(mixed, {"w": x.astype(np.float16)})
    _, model = opt.update(
        tree, {"w": x.astype(np.float16)}, {"w": g.astype(np.float16)}
    )
    assert model["w"].dtype == np.float16


# -- adjust, errors, checkpoints ---------------------------------------------------------


def test_adjust_changes_unscheduled_fields_and_takes_new_schedules() -> None:
    rule = opt.Scheduled(opt.AdamW(1e-3, lambda_=0.1), eta=sch.Constant(1e-3))
    tree = opt.setup(rule, {"w": np.ones(3)})
    opt.adjust_(tree, lambda_=0.5)
    assert tree["w"].rule.rule.lambda_ == 0.5
    opt.adjust_(tree, eta=sch.Constant(2e-3))
    assert tree["w"].rule.at(7).eta == 2e-3
    with pytest.raises(ValueError, match="eta follows a schedule"):
        opt.adjust_(tree, eta=1e-2)
    assert tree["w"].rule.at(0).eta == 2e-3  # unchanged by the refused adjust


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (
            lambda: opt.Scheduled(opt.Adam(), rho=sch.Constant(1)),
            ValueError,
            "Adam has no adjustable hyperparameter 'rho'",
        ),
        (
            lambda: opt.Scheduled(opt.RMSProp(), centred=lambda t: True),
            ValueError,
            "no adjustable hyperparameter 'centred'",
        ),
        (lambda: opt.Scheduled(opt.Adam(), eta=0.1), TypeError, "must be a schedule"),
        (lambda: opt.Scheduled(opt.Adam()), TypeError, "at least one"),
        (
            lambda: opt.Scheduled("Adam", eta=sch.Constant(1)),
            TypeError,
            "expects a rule",
        ),
        (
            lambda: opt.Scheduled(opt.Adam(), eta=lambda t: "x"),
            TypeError,
            "not a real number",
        ),
        (
            lambda: opt.Scheduled(opt.Adam(), eta=sch.Constant(-1.0)),
            ValueError,
            r"eta must be in \[0, inf\)",
        ),
    ],
)
def test_bad_scheduled_rules_raise_at_construction(
    make: Any, error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        make()


def test_a_schedule_failing_mid_run_changes_nothing() -> None:
    rule = opt.Scheduled(
        opt.Descent(), eta=sch.Join((sch.Constant(0.1), lambda t: -1.0), (2,))
    )
    model = {"w": np.ones(4)}
    tree = opt.setup(rule, model)
    for _ in range(2):
        tree, model = opt.update_(tree, model, {"w": np.ones(4)})
    before = model["w"].copy()
    with pytest.raises(ValueError, match=r"eta must be in \[0, inf\)"):
        opt.update_(tree, model, {"w": np.ones(4)})
    assert tree["w"].state.t == 2
    assert np.array_equal(model["w"], before)


def test_the_count_is_a_host_int_and_the_rule_pickles() -> None:
    rule = opt.Scheduled(
        opt.Adam(), eta=sch.warmup_cosine(1e-3, 2, 10), beta=(BETA1, 0.999)
    )
    tree = opt.setup(rule, {"w": np.ones(3, np.float32)})
    tree, _ = opt.update(
        tree, {"w": np.ones(3, np.float32)}, {"w": np.ones(3, np.float32)}
    )
    assert type(tree["w"].state.t) is int
    assert tree["w"].state.t == 1
    assert pickle.loads(pickle.dumps(rule)) == rule
    with pytest.raises(TypeError, match="must be a host int"):
        rule.apply(
            opt.ScheduledState(np.float32(1.0), tree["w"].state.state),
            np.ones(3, np.float32),
            np.ones(3, np.float32),
            opt.adapter_for(np.ones(1)),
        )


def test_scheduled_holding_a_global_clip_is_the_adjust_loop() -> None:
    """ClipGlobalNorm reduces over every leaf, inside a Scheduled too (cross-leaf stages)."""
    rng = np.random.default_rng(4)
    xs = {
        "a": rng.standard_normal(70_000).astype(np.float32),
        "b": rng.standard_normal(50_000).astype(np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) * 3 for k, v in xs.items()}
        for _ in range(6)
    ]

    def chain(eta: float) -> opt.Rule:
        return opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(eta, lambda_=1e-2))

    model = {k: v.copy() for k, v in xs.items()}
    tree = opt.setup(opt.Scheduled(chain(1e-3), eta=ETA), model)
    for g in grads:
        tree, model = opt.update_(tree, model, g)
    hand = {k: v.copy() for k, v in xs.items()}
    ref = opt.setup(chain(ETA(0)), hand)
    for t, g in enumerate(grads):
        opt.adjust_(ref, eta=ETA(t))
        ref, hand = opt.update_(ref, hand, g)
    for k in xs:
        assert np.array_equal(_bits(model[k]), _bits(hand[k]))
    whole = np.concatenate([grads[0]["a"], grads[0]["b"]])
    assert np.sqrt(np.sum(whole.astype(np.float64) ** 2)) > 1  # the clip was active


def test_a_scheduled_state_checkpoints_and_resumes_bitwise() -> None:
    """state_dict carries the count and describes the schedules; a resumed run is exact."""
    import json

    from agnosticopt._checkpoint import describe_rule, rule_from_description

    x, grads = _data(8, "float32")
    rule = opt.Scheduled(_chain(), eta=ETA, lambda_=LAMBDA, beta=(BETA1, 0.999))
    model = {"w": x.copy()}
    tree = opt.setup(rule, model)
    for g in grads[:4]:
        tree, model = opt.update_(tree, model, {"w": g})
    sd = opt.state_dict(tree)
    assert sd["w/state.t"] == 4
    again = rule_from_description(json.loads(json.dumps(describe_rule(rule))))
    assert again == rule
    resumed_model = {"w": model["w"].copy()}
    resumed = opt.load_state_dict((again, resumed_model), sd)
    for g in grads[4:]:
        tree, model = opt.update_(tree, model, {"w": g})
        resumed, resumed_model = opt.update_(resumed, resumed_model, {"w": g})
    assert np.array_equal(_bits(model["w"]), _bits(resumed_model["w"]))
    assert resumed["w"].state.t == 8


# -- under jax.jit: the count is traced, one compilation serves every step --------------------

JIT_SCHEDULES = [
    sch.Constant(0.5),
    sch.Linear(1.0, 0.1, 7),
    sch.Cosine(1e-3, 1e-5, 9),
    sch.Exponential(0.3, 0.5, 3),
    sch.Step(0.3, 0.5, 4),
    sch.Polynomial(1.0, 0.01, 2.5, 8),
    sch.OneCycle(1e-2, 20),
    sch.OneCycle(1e-2, 10, pct_start=0.0),
    sch.OneCycle(1e-2, 10, pct_start=1.0),
    sch.warmup_cosine(1e-2, 3, 12),
    sch.warmup_linear(1e-2, 0, 5),
    sch.Join((sch.Constant(1.0), sch.warmup_cosine(0.1, 2, 6)), (4,)),
]


@pytest.mark.parametrize("schedule", JIT_SCHEDULES, ids=repr)
def test_schedules_on_the_device_round_to_the_host_values(schedule: Any) -> None:
    jax = pytest.importorskip("jax", reason="schedules of a traced count")
    from agnosticopt.adapters.jax import schedule_value

    assert jax.config.read("jax_enable_x64")  # tests/conftest.py: float64 on the device
    t = np.arange(40)
    device = np.asarray(jax.jit(lambda t: schedule_value(schedule, t))(t))
    host = np.array([schedule(int(k)) for k in t])
    assert device.dtype == np.float64
    for dtype, uint in ((np.float32, np.uint32), (np.float16, np.uint16)):
        assert np.array_equal(
            host.astype(dtype).view(uint), device.astype(dtype).view(uint)
        )
    # XLA's cos and pow are not libm's: float64 values within a few dozen ulp
    assert np.max(np.abs(device - host) / np.maximum(np.abs(host), 1e-300)) <= 1e-14


def test_scheduled_under_jit_compiles_once_with_the_bits_of_adjust() -> None:
    jax = pytest.importorskip("jax", reason="jax.jit")
    jnp = jax.numpy
    rng = np.random.default_rng(11)
    w = rng.standard_normal(120_000).astype(
        np.float32
    )  # no subnormals: XLA flushes them
    grads = [rng.standard_normal(w.size).astype(np.float32) for _ in range(6)]
    schedule = sch.warmup_cosine(1e-2, 2, 6)

    def run(rule: opt.Rule, adjust: bool) -> tuple[Any, Any, int]:
        traces = [0]

        def step(tree: Any, params: Any, g: Any) -> Any:
            traces[0] += 1
            return opt.update(tree, params, g)

        jitted = jax.jit(step)
        params = {"w": jnp.asarray(w)}
        tree = opt.setup(rule, params)
        for t, g in enumerate(grads):
            if (
                adjust
            ):  # the hand-written loop: a static eta, so a compilation per value
                tree = opt.adjust(tree, eta=schedule(t))
            tree, params = jitted(tree, params, {"w": jnp.asarray(g)})
        return tree, params, traces[0]

    inner = opt.AdamW(1e-2, lambda_=1e-2)
    tree, params, traces = run(opt.Scheduled(inner, eta=schedule), adjust=False)
    _, hand, hand_traces = run(inner, adjust=True)
    assert traces == 1
    assert hand_traces >= 5  # a static eta: compiled again for (almost) every value
    assert np.array_equal(
        np.asarray(params["w"]).view(np.uint32), np.asarray(hand["w"]).view(np.uint32)
    )
    assert int(tree["w"].state.t) == len(grads)
    # a checkpoint after jit: the count (a 0-d JAX integer array) loads as a host int
    fresh = opt.setup(opt.Scheduled(inner, eta=schedule), {"w": jnp.asarray(w)})
    loaded = opt.load_state_dict(fresh, opt.state_dict(tree))
    assert loaded["w"].state.t == len(grads)
    assert type(loaded["w"].state.t) is int
    # eagerly afterwards: the count (a 0-d JAX array now) is read back to the host
    tree, _ = opt.update(tree, params, {"w": jnp.asarray(grads[0])})
    assert tree["w"].state.t == len(grads) + 1
