"""``update_``'s short way (``agnosticopt/_replay.py``) changes nothing but the time.

The next ``update_`` of the tree updated last, on the same leaves and arrays, runs
the adapter's kept fast plan without walking the checks again. Each test runs
the same steps twice, once as it comes and once with the short way forgotten
before every update (the full way), and compares the bits, or the error and
the untouched tree. The changes of ``tests/test_fast_cache.py`` (a ``p.data``
reassigned, arrays replaced, ``adjust_``, ``freeze_``...) are compared there
with the plain path and take this short way too; here are the inputs that
must raise, and the counts of updates taken the short way.
"""

from __future__ import annotations

import collections
import gc
import importlib.util
import pickle
import weakref
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
from agnosticopt import _replay

N = 100_003  # > 100k elements
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)
BACKENDS = ["numpy", pytest.param("torch", marks=needs_torch)]


def _array(kind: str, a: np.ndarray, *, parameter: bool = True) -> Any:
    if kind == "torch":
        import torch

        t = torch.from_numpy(a.copy())
        return torch.nn.Parameter(t) if parameter else t
    return a.copy()


def _model(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A nested model (dict, list, tuple, a non-trainable entry) and its gradients."""
    rng = np.random.default_rng(3)

    def a(*shape: int, parameter: bool = True) -> Any:
        return _array(
            kind, rng.standard_normal(shape).astype(np.float32), parameter=parameter
        )

    model = {
        "w": a(N),
        "layers": [{"b": a(17), "k": a(3, 5)}, (a(40), 7)],
        "name": "m",
        "count": np.arange(4, dtype=np.int32),  # not trainable: None in the tree
    }
    grads = {
        "w": a(N, parameter=False),
        "layers": [
            {"b": a(17, parameter=False), "k": a(3, 5, parameter=False)},
            (a(40, parameter=False), None),
        ],
    }
    return model, grads


def _snapshot(tree: Any, model: Any) -> list[Any]:
    out: list[Any] = []
    for x in (
        model["w"],
        model["layers"][0]["b"],
        model["layers"][0]["k"],
        model["layers"][1][0],
    ):
        out.append(host_copy(x))
    for leaf in (
        tree["w"],
        tree["layers"][0]["b"],
        tree["layers"][0]["k"],
        tree["layers"][1][0],
    ):
        out.extend(state_leaves(leaf.state))
    return out


def _bits(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return (a.dtype.str, a.shape, a.tobytes())
    return repr(a)


Change = Callable[[str, Any, Any, Any], None]


def _new_gradients(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["w"] = grads["w"] * 1.5  # a new array: the short way still


def _shape(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["layers"][0]["k"] = grads["layers"][0]["k"].reshape(5, 3)


def _backend(kind: str, tree: Any, model: Any, grads: Any) -> None:
    g = grads["layers"][0]["b"]
    grads["layers"][0]["b"] = (
        g.numpy().copy() if kind == "torch" else g.astype(np.int64)
    )


def _dtype(kind: str, tree: Any, model: Any, grads: Any) -> None:
    g = grads["w"]
    grads["w"] = (
        g.double() if kind == "torch" else g.astype(np.float64)
    )  # cast, as full


def _extra_key(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["layers"][0]["bias"] = grads["layers"][0]["b"]


def _other_key(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["layers"][0]["bias"] = grads["layers"][0].pop("b")  # one missing, one extra


def _extra_key_beside_an_untracked_entry(
    kind: str, tree: Any, model: Any, grads: Any
) -> None:
    grads["bogus"] = grads["w"]  # as many keys as the model, one of them not its
    grads["name"] = None


def _untracked_array_made_trainable(
    kind: str, tree: Any, model: Any, grads: Any
) -> None:
    model["count"].dtype = np.float32  # in place: the same object, now trainable


def _non_finite_gradient(kind: str, tree: Any, model: Any, grads: Any) -> None:
    g = grads["layers"][0]["b"] * 1  # ClipNorm (throw) raises, naming the path
    g[3] = float("inf")
    grads["layers"][0]["b"] = g


def _strided_gradient(kind: str, tree: Any, model: Any, grads: Any) -> None:
    g = grads["w"]
    both = (
        g.repeat_interleave(2) if kind == "torch" else np.repeat(g, 2)
    )  # every other element: the same values, not contiguous
    grads["w"] = both[::2]


def _larger_gradients(kind: str, tree: Any, model: Any, grads: Any) -> None:
    for d in (grads, grads["layers"][0]):  # new arrays, norms past the clips
        for key in [k for k in d if k != "layers"]:
            d[key] = d[key] * 1000
    grads["layers"][1] = (grads["layers"][1][0] * 1000, None)


def _parameter_reshaped_in_place(kind: str, tree: Any, model: Any, grads: Any) -> None:
    k = model["layers"][0]["k"]  # (3, 5): the same object, now (5, 3)
    if kind == "torch":
        k.data = k.data.reshape(5, 3)  # the same memory
    else:
        k.shape = (5, 3)
    g = grads["layers"][0]["k"]
    grads["layers"][0]["k"] = g.reshape(5, 3)  # a gradient that fits it


def _gradient_reshaped_in_place(kind: str, tree: Any, model: Any, grads: Any) -> None:
    g = grads["layers"][0]["k"]  # the same gradient object, now (5, 3)
    if kind == "torch":
        g.resize_(5, 3)
    else:
        g.shape = (5, 3)


def _missing_gradient(kind: str, tree: Any, model: Any, grads: Any) -> None:
    del grads["layers"][0]["k"]  # no step for k


def _array_at_a_none_place(kind: str, tree: Any, model: Any, grads: Any) -> None:
    rng = np.random.default_rng(0)
    model["layers"][1] = (
        model["layers"][1][0],
        _array(kind, rng.standard_normal(4).astype(np.float32)),
    )


def _wrong_state(kind: str, tree: Any, model: Any, grads: Any) -> None:
    leaf = tree["layers"][0]["b"]
    leaf.state = opt.setup(leaf.rule, model["layers"][0]["k"]).state  # k's shape


def _another_tree_shape(kind: str, tree: Any, model: Any, grads: Any) -> None:
    model["layers"].append(model["w"])  # the model has an entry the tree has not


def _gradient_list_for_a_dict(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["layers"][0] = list(grads["layers"][0].values())


def _tuple_for_a_list(kind: str, tree: Any, model: Any, grads: Any) -> None:
    grads["layers"] = tuple(grads["layers"])  # a tuple of gradients for a list: fine


def _frozen_with_a_gradient(kind: str, tree: Any, model: Any, grads: Any) -> None:
    opt.freeze_(tree["w"])


def _tie(kind: str, tree: Any, model: Any, grads: Any) -> None:
    model["layers"][1] = (model["w"], 7)  # tied to w, but the tree has two Leaf objects


#: Each change, made after three steps, then two more steps.
CHANGES: dict[str, Change] = {
    f.__name__.lstrip("_"): f
    for f in (
        _new_gradients,
        _larger_gradients,
        _shape,
        _parameter_reshaped_in_place,
        _gradient_reshaped_in_place,
        _backend,
        _dtype,
        _extra_key,
        _other_key,
        _extra_key_beside_an_untracked_entry,
        _untracked_array_made_trainable,
        _missing_gradient,
        _non_finite_gradient,
        _strided_gradient,
        _array_at_a_none_place,
        _wrong_state,
        _another_tree_shape,
        _gradient_list_for_a_dict,
        _tuple_for_a_list,
        _frozen_with_a_gradient,
        _tie,
    )
}


#: An elementwise chain, and chains whose kept plans compute a reduction at every
#: step: a ClipNorm chain (the gradients scaled by λ into new arrays), the same
#: with λ in the state instead (:data:`SCALED_AT_MOST` 0; ClipNorm(1000) gives
#: every leaf λ = 1 until ``larger_gradients``, so the leaves of one kernel call
#: then have other λ), a global clip (λ in the state) and a non-finite skip.
RULES = {
    "decay_adam": opt.OptimiserChain(opt.WeightDecay(0.01), opt.Adam(1e-2)),
    "clipnorm_adamw": opt.OptimiserChain(opt.ClipNorm(1.0), opt.AdamW(1e-2)),
    "clipnorm_in_state": opt.OptimiserChain(opt.ClipNorm(1000.0), opt.AdamW(1e-2)),
    "globalclip_adamw": opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-2)),
    "skip_adam": opt.SkipNonFinite(opt.Adam(1e-2)),
}
#: ``_fast.SCALE_AT_MOST`` for a rule (else the default).
SCALED_AT_MOST = {"clipnorm_in_state": 0}


@pytest.fixture
def rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a rule of :data:`RULES`, with its ``SCALE_AT_MOST``."""
    name: str = request.param
    if name in SCALED_AT_MOST:
        monkeypatch.setattr(_fast, "SCALE_AT_MOST", SCALED_AT_MOST[name])
    return name


def _run(
    kind: str, rule: opt.Rule, change: Change, *, short: bool
) -> tuple[list[Any], list[Any], int]:
    """Three steps, the change, two steps: (snapshots, errors, updates taken short)."""
    model, grads = _model(kind)
    tree = opt.setup(rule, model)
    snapshots: list[Any] = []
    errors: list[Any] = []
    before = _replay.counters["replayed"]
    with fast_path(True):
        for k in range(5):
            if k == 3:
                change(kind, tree, model, grads)
            if not short:
                _replay.forget()
            try:
                tree, model = opt.update_(tree, model, grads)
                errors.append(None)
            except (TypeError, ValueError, FloatingPointError) as exc:
                errors.append((type(exc), str(exc)))
            snapshots.append([_bits(a) for a in _snapshot(tree, model)])
    return snapshots, errors, _replay.counters["replayed"] - before


@pytest.mark.parametrize("rule", list(RULES), indirect=True)
@pytest.mark.parametrize("name", list(CHANGES))
@pytest.mark.parametrize("kind", BACKENDS)
def test_the_short_way_gives_the_full_ways_bits_and_errors(
    kind: str, name: str, rule: str
) -> None:
    got, got_errors, short = _run(kind, RULES[rule], CHANGES[name], short=True)
    want, want_errors, none = _run(kind, RULES[rule], CHANGES[name], short=False)
    assert none == 0
    assert got_errors == want_errors
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"{kind} {name}: step {k} differs"
    assert short >= 2  # steps 2 and 3 at least (step 1 remembers)


@pytest.mark.parametrize("rule", list(RULES), indirect=True)
@pytest.mark.parametrize("kind", BACKENDS)
def test_an_unchanged_loop_takes_the_short_way_after_its_first_step(
    kind: str, rule: str
) -> None:
    model, grads = _model(kind)
    tree = opt.setup(RULES[rule], model)
    before = _replay.counters["replayed"]
    recorded = _fast.counters["recorded"]
    with fast_path(True):
        for _ in range(6):
            if kind == "torch":  # new gradient tensors at every step (set_to_none)
                grads = {
                    "w": grads["w"].clone(),
                    "layers": [
                        {k: g.clone() for k, g in grads["layers"][0].items()},
                        (grads["layers"][1][0].clone(), None),
                    ],
                }
            tree, model = opt.update_(tree, model, grads)
    assert _replay.counters["replayed"] - before == 5
    # each rule's step recorded at most once per (dtype, state structure, shape)
    assert _fast.counters["recorded"] - recorded <= 4


def test_an_error_raised_the_short_way_changes_nothing() -> None:
    model, grads = _model("numpy")
    tree = opt.setup(opt.Adam(), model)
    with fast_path(True):
        for _ in range(3):
            tree, model = opt.update_(tree, model, grads)
        before = [_bits(a) for a in _snapshot(tree, model)]
        grads["layers"][0]["k"] = np.zeros((5, 3), np.float32)
        with pytest.raises(ValueError, match=r"\('layers', 0, 'k'\)"):
            opt.update_(tree, model, grads)
    assert [_bits(a) for a in _snapshot(tree, model)] == before


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a, b: Point(a, b), id="namedtuple"),
        pytest.param(lambda a, b: collections.OrderedDict(x=a, y=b), id="OrderedDict"),
    ],
)
def test_other_containers_take_the_full_way(make: Callable[[Any, Any], Any]) -> None:
    rng = np.random.default_rng(1)
    model = make(*(rng.standard_normal(N).astype(np.float32) for _ in range(2)))
    grads = make(*(rng.standard_normal(N).astype(np.float32) for _ in range(2)))
    tree = opt.setup(opt.Adam(), model)
    before = _replay.counters["replayed"]
    with fast_path(True):
        for _ in range(3):
            tree, model = opt.update_(tree, model, grads)
    assert _replay.counters["replayed"] == before


def test_a_container_registered_later_sends_lists_the_full_way() -> None:
    """A registration for ``list`` itself (its own keys) is honoured at once."""
    rng = np.random.default_rng(2)
    model = [rng.standard_normal(N).astype(np.float32)]
    grads = [rng.standard_normal(N).astype(np.float32)]
    tree = opt.setup(opt.Adam(), model)
    with fast_path(True):
        tree, model = opt.update_(tree, model, grads)
        assert id(tree) in _replay._SEEN  # remembered
        assert _replay.replay(tree, model, grads)
        from agnosticopt import _containers

        opt.register_container(
            list, lambda c: (range(len(c)), c), lambda c, ch: list(ch)
        )
        try:
            assert not _replay.replay(tree, model, grads)
        finally:
            del _containers._REGISTRY[list]  # no public way back


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("trees", [2, 4])
def test_trees_stepped_in_turn_all_take_the_short_way(kind: str, trees: int) -> None:
    """A GAN's generator and discriminator (and up to four trees): each tree keeps
    its plan and its memo, with the bits of updates that keep nothing (the full
    way every step)."""
    runs = []
    for short in (True, False):
        pairs = []
        for seed in range(trees):
            rng = np.random.default_rng(seed)
            model = [_array(kind, rng.standard_normal(N).astype(np.float32))]
            grads = [
                _array(kind, rng.standard_normal(N).astype(np.float32), parameter=False)
            ]
            pairs.append((opt.setup(opt.Adam(1e-2), model), model, grads))
        before = _replay.counters["replayed"]
        with fast_path(True):
            for _ in range(4):
                for k, (tree, model, grads) in enumerate(pairs):
                    if not short:
                        _replay.forget()
                    pairs[k] = (*opt.update_(tree, model, grads), grads)
        taken = _replay.counters["replayed"] - before
        assert taken == (3 * trees if short else 0)
        runs.append([_bits(host_copy(m[0])) for _, m, _ in pairs])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_parameter_reshaped_in_place_raises_naming_its_path(kind: str) -> None:
    """After updates the short way took, a parameter reshaped in place (the same
    object, the same memory) is refused as the full way refuses it, naming the
    key path, and nothing changes."""
    model, grads = _model(kind)
    tree = opt.setup(RULES["clipnorm_adamw"], model)
    with fast_path(True):
        for _ in range(3):
            tree, model = opt.update_(tree, model, grads)
        _parameter_reshaped_in_place(kind, tree, model, grads)
        before = [_bits(a) for a in _snapshot(tree, model)]
        with pytest.raises(ValueError, match=r"at \('layers', 0, 'k'\).*shape"):
            opt.update_(tree, model, grads)
    assert [_bits(a) for a in _snapshot(tree, model)] == before


def test_a_dropped_tree_is_not_kept_alive_by_the_short_way() -> None:
    """Trees made anew for the same model (an optimiser per stage) and dropped: the
    short way remembers their last updates but holds no Leaf, so no state of a
    dropped tree stays alive (the newest is held by the adapter's kept plan)."""
    model, grads = _model("numpy")
    states = []
    for _ in range(4):
        tree = opt.setup(opt.Adam(1e-2), model)
        with fast_path(True):
            for _ in range(3):
                tree, model = opt.update_(tree, model, grads)
        states.append(weakref.ref(tree["w"].state.m))
        del tree
        gc.collect()
    assert [s() is None for s in states] == [True, True, True, False]


def test_unpickled_gradients_take_the_short_way() -> None:
    """Gradients that come pickled at every step (from worker processes) have a
    dtype equal to the parameter's but not the same object: the short way, with
    the full way's bits."""
    runs = []
    for short in (True, False):
        model, grads = _model("numpy")
        tree = opt.setup(opt.Adam(1e-2), model)
        before = _replay.counters["replayed"]
        with fast_path(True):
            for _ in range(4):
                if not short:
                    _replay.forget()
                unpickled = pickle.loads(pickle.dumps(grads))
                tree, model = opt.update_(tree, model, unpickled)
        runs.append([_bits(a) for a in _snapshot(tree, model)])
        if short:
            assert _replay.counters["replayed"] - before == 3
    assert runs[0] == runs[1]
