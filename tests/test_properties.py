"""Property tests (hypothesis): random models, gradients and rules.

Models are random nests of dicts, lists, tuples and namedtuples holding float16
to float64 and complex arrays of random shapes (0-d and empty included), tied
arrays (one object at several places), strided views (two parameters can be
disjoint views of one buffer), and things that are not parameters. Gradients
are arrays, ``None``, or views of other parameters (which ``update_`` writes in
the same call). Checked:

* ``update`` and ``update_`` give the same bits (fast path on and off);
* ``update`` modifies nothing it is given;
* the new model keeps every container type, array type, dtype and shape;
* torch, array-api-strict and JAX give numpy's bits (JAX where no subnormal
  number occurs: it flushes them to zero, a declared deviation).

The default run is small and reproducible (``derandomize``: the same examples
every run); the 10^5-step soak is ``slow``.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import numpy as np
import pytest
from _backends import BackendHelper, BackendKind, fast_path
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import agnosticopt as opt

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

REAL = ["float16", "float32", "float64"]
COMPLEX = ["complex64", "complex128"]
#: The dtype sets a model draws its arrays from (some without float16, which
#: array-api-strict lacks).
DTYPE_SETS = (REAL, REAL + COMPLEX, REAL[1:], REAL[1:] + COMPLEX)

#: Rules for models with complex arrays (second moments are real), and more for real ones.
COMPLEX_RULES = [
    opt.Descent(0.1),
    opt.Momentum(0.1),
    opt.Nesterov(0.1),
    opt.Adam(0.01),
    opt.AdamW(0.01),
    opt.RMSProp(0.01),
    opt.AdaGrad(0.01),
    opt.NAdam(0.01),
    opt.RAdam(0.01),
    opt.OptimiserChain(opt.ClipNorm(1.0, throw=False), opt.Adam(0.01)),
    opt.OptimiserChain(opt.WeightDecay(0.1), opt.Momentum(0.1)),
    opt.OptimiserChain(),
]
REAL_RULES = [
    *COMPLEX_RULES,
    opt.Lion(0.01),
    opt.Rprop(0.01),
    opt.AdaMax(0.01),
    opt.AMSGrad(0.01),
    opt.OptimiserChain(opt.ClipGrad(0.5), opt.SignDecay(0.01), opt.Descent(0.1)),
    opt.AccumGrad(2),
]


class Pair(NamedTuple):
    left: Any
    right: Any


# -- random models ------------------------------------------------------------------------


class _Maker:
    """Builds one random model (numpy) from hypothesis draws."""

    def __init__(self, data: Any, dtypes: list[str], views: bool) -> None:
        self.data, self.dtypes, self.views = data, dtypes, views
        self.rng = np.random.default_rng(
            data.draw(st.integers(0, 2**32 - 1), label="seed")
        )
        self.params: list[np.ndarray] = []
        self.buffers: list[
            tuple[np.ndarray, int]
        ] = []  # a buffer and its next free column

    def array(self) -> np.ndarray:
        shape = tuple(
            self.data.draw(st.lists(st.integers(0, 3), max_size=3), label="shape")
        )
        dtype = np.dtype(self.data.draw(st.sampled_from(self.dtypes), label="dtype"))
        values = self.rng.standard_normal((*shape, 2))
        if dtype.kind == "c":
            values = values[..., 0] + 1j * values[..., 1]
        else:
            values = values[..., 0]
        return np.asarray(values.astype(dtype))

    def leaf(self) -> Any:
        kind = self.data.draw(
            st.sampled_from(["array", "array", "array", "tie", "view", "other"]),
            label="leaf",
        )
        if kind == "tie" and self.params:
            return self.data.draw(st.sampled_from(self.params), label="tied")
        if kind == "other":
            return self.data.draw(
                st.sampled_from([None, 3, "name", np.arange(3), np.float32(1.5)]),
                label="other",
            )
        a = self.array()
        if kind == "view" and self.views:
            a = self.view_of_buffer(a)
        self.params.append(a)
        return a

    def view_of_buffer(self, a: np.ndarray) -> np.ndarray:
        """``a``'s values in a strided view of a shared buffer (disjoint from the others)."""
        for k, (buf, free) in enumerate(self.buffers):
            if (
                buf.shape[:-1] == a.shape
                and buf.dtype == a.dtype
                and free < buf.shape[-1]
            ):
                self.buffers[k] = (buf, free + 1)
                buf[..., free] = a
                return buf[..., free]
        buf = np.zeros((*a.shape, 3), dtype=a.dtype)
        buf[..., 0] = a
        self.buffers.append((buf, 1))
        return buf[..., 0]

    def node(self, depth: int) -> Any:
        if depth >= 3 or self.data.draw(st.booleans(), label="stop"):
            return self.leaf()
        kind = self.data.draw(
            st.sampled_from(["dict", "list", "tuple", "pair"]), label="node"
        )
        if kind == "pair":
            return Pair(self.node(depth + 1), self.node(depth + 1))
        n = self.data.draw(st.integers(0, 3), label="n")
        children = [self.node(depth + 1) for _ in range(n)]
        if kind == "dict":
            return {f"k{i}": c for i, c in enumerate(children)}
        return children if kind == "list" else tuple(children)

    def grads(self, model: Any) -> Any:
        """A gradient per place: ``None``, a fresh array, or a view of a parameter."""
        if isinstance(model, dict):
            return {k: self.grads(v) for k, v in model.items()}
        if isinstance(model, Pair):
            return Pair(self.grads(model.left), self.grads(model.right))
        if isinstance(model, (list, tuple)):
            return type(model)(self.grads(v) for v in model)
        if not (isinstance(model, np.ndarray) and model.dtype.kind in "fc"):
            return None
        kind = self.data.draw(
            st.sampled_from(["none", "fresh", "fresh", "param"]), label="g"
        )
        if kind == "none":
            return None
        if kind == "param":
            same = [
                p
                for p in self.params
                if p.shape == model.shape and p.dtype == model.dtype and p is not model
            ]
            if same:
                return self.data.draw(st.sampled_from(same), label="g-param")[
                    ...
                ]  # a view
        return self.array_like(model)

    def array_like(self, x: np.ndarray) -> np.ndarray:
        values = self.rng.standard_normal(x.shape) * 0.5
        if x.dtype.kind == "c":
            values = values + 1j * self.rng.standard_normal(x.shape) * 0.5
        return np.asarray(values.astype(x.dtype))


class _Draw:
    """Lets ``_Maker`` call ``.draw`` on a composite's ``draw`` function."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw


def _problems(views: bool, dtypes: tuple[list[str], ...] = DTYPE_SETS) -> Any:
    @st.composite
    def make(draw: Any) -> Any:
        chosen = draw(st.sampled_from(dtypes), label="dtypes")
        maker = _Maker(_Draw(draw), chosen, views)
        model = maker.node(0)
        if not maker.params:
            w = maker.array()
            maker.params.append(w)
            model = {"extra": model, "w": w}
        has_complex = any(p.dtype.kind == "c" for p in maker.params)
        rules = COMPLEX_RULES if has_complex else REAL_RULES
        rule = draw(st.sampled_from(rules), label="rule")
        steps = draw(st.integers(1, 3), label="steps")
        return rule, model, [maker.grads(model) for _ in range(steps)]

    return make()


# -- comparing ------------------------------------------------------------------------------


def _bits(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and bytes, every NaN made one NaN (backends differ in NaN payloads)."""
    a = np.array(a, copy=True)
    flat = a.reshape(-1)
    parts = flat.view(flat.real.dtype) if a.dtype.kind == "c" else flat
    if a.dtype.kind in "fc":
        parts[np.isnan(parts)] = np.nan
    return str(a.dtype), a.shape, flat.tobytes()


def snapshot(obj: Any, to_numpy: Any = np.asarray, *, types: bool = True) -> Any:
    """``obj`` as plain values: Leaves, containers (with their types), array bits.

    With ``types=False`` an array is its bits only (to compare backends).
    """
    if isinstance(obj, opt.Leaf):
        return (
            "Leaf",
            repr(obj.rule),
            snapshot(obj.state, to_numpy, types=types),
            obj.frozen,
        )
    if isinstance(obj, dict):
        return {k: snapshot(v, to_numpy, types=types) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *[snapshot(v, to_numpy, types=types) for v in obj])
    if (
        hasattr(obj, "shape")
        and hasattr(obj, "dtype")
        and not isinstance(obj, np.generic)
    ):
        bits = _bits(to_numpy(obj))
        return (type(obj).__name__, bits) if types else bits
    return repr(obj)


def _structure(obj: Any) -> Any:
    """Containers with their types; arrays as (type, dtype, shape); other leaves as repr."""
    if isinstance(obj, dict):
        return {k: _structure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (type(obj), *[_structure(v) for v in obj])
    if isinstance(obj, np.ndarray):
        return (type(obj), obj.dtype, obj.shape)
    return repr(obj)


def _run(rule: Any, model: Any, steps: list[Any], fn: Any) -> tuple[Any, Any]:
    tree = opt.setup(rule, model)
    for grads in steps:
        tree, model = fn(tree, model, grads)
    return tree, model


# -- properties ------------------------------------------------------------------------------


@SETTINGS
@given(problem=_problems(views=True), fast=st.booleans())
def test_update_in_place_equals_update_and_update_mutates_nothing(
    problem: Any, fast: bool
) -> None:
    rule, model, steps = problem
    functional_model, functional_steps = copy.deepcopy(
        (model, steps)
    )  # keeps ties, views
    before = snapshot((functional_model, functional_steps))
    tree, m = _run(rule, functional_model, functional_steps, opt.update)
    assert (
        snapshot((functional_model, functional_steps)) == before
    )  # nothing was modified
    assert _structure(m) == _structure(
        functional_model
    )  # types, dtypes and shapes kept
    with fast_path(fast):
        tree_, m_ = _run(rule, model, steps, opt.update_)
    assert snapshot(m_) == snapshot(m)
    assert snapshot(tree_) == snapshot(tree)


@SETTINGS
@given(problem=_problems(views=True))
def test_update_leaves_the_old_tree_as_it_was(problem: Any) -> None:
    rule, model, steps = problem
    tree = opt.setup(rule, model)
    for grads in steps:
        old = snapshot(tree)
        new_tree, model = opt.update(tree, model, grads)
        assert snapshot(tree) == old
        tree = new_tree


def _convert(obj: Any, helper: BackendHelper, memo: dict[int, Any]) -> Any:
    """``obj`` with every numpy float/complex array converted (ties kept, views not)."""
    if isinstance(obj, dict):
        return {k: _convert(v, helper, memo) for k, v in obj.items()}
    if isinstance(obj, Pair):
        return Pair(_convert(obj.left, helper, memo), _convert(obj.right, helper, memo))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, helper, memo) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "fc":
        if id(obj) not in memo:
            memo[id(obj)] = helper.asarray(np.array(obj, order="C"))
        return memo[id(obj)]
    return obj


def _dtypes(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(_dtypes(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(_dtypes(v) for v in obj))
    return (
        {str(obj.dtype)}
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "fc"
        else set()
    )


def _has_subnormal(obj: Any) -> bool:
    if isinstance(obj, opt.Leaf):
        return _has_subnormal(obj.state)
    if isinstance(obj, dict):
        return any(_has_subnormal(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_subnormal(v) for v in obj)
    if isinstance(obj, (np.ndarray, np.floating, np.complexfloating)):
        a = np.asarray(obj)
        if a.dtype.kind not in "fc":
            return False
        flat = a.reshape(-1)
        parts = flat.view(flat.real.dtype) if a.dtype.kind == "c" else flat
        tiny = np.finfo(parts.dtype).smallest_normal
        return bool(np.any((parts != 0) & (np.abs(parts) < tiny)))
    return False


def _backend_params(*kinds: BackendKind) -> list[Any]:
    from _backends import backend_params

    return backend_params(kinds)


def _same_bits_as_numpy(kind: BackendKind, problem: Any) -> None:
    helper = BackendHelper(kind)
    rule, model, steps = problem
    assume(
        not any(helper.conformance.unsupported(d) for d in _dtypes(model))
    )  # float16
    with fast_path(False):
        ref_tree, ref_model = _run(rule, model, steps, opt.update)
    # JAX flushes subnormals to zero (a declared deviation): compare where none occurs
    assume(
        kind is not BackendKind.JAX
        or not _has_subnormal((model, steps, ref_tree, ref_model))
    )
    memo: dict[int, Any] = {}
    converted = _convert(model, helper, memo)
    grads = [_convert(g, helper, {**memo}) for g in steps]
    tree, new_model = _run(rule, converted, grads, opt.update_)
    assert snapshot(new_model, helper.to_numpy, types=False) == snapshot(
        ref_model, types=False
    )
    assert snapshot(tree, helper.to_numpy, types=False) == snapshot(
        ref_tree, types=False
    )


@pytest.mark.parametrize(
    "kind", _backend_params(BackendKind.TORCH, BackendKind.ARRAY_API_STRICT)
)
@settings(SETTINGS, max_examples=25)
@given(problem=_problems(views=False))
def test_every_backend_gives_numpy_bits(kind: BackendKind, problem: Any) -> None:
    _same_bits_as_numpy(kind, problem)


@pytest.mark.parametrize("kind", _backend_params(BackendKind.JAX))
@settings(SETTINGS, max_examples=8)  # JAX compiles each new shape and dtype: slow
@given(problem=_problems(views=False))
def test_jax_gives_numpy_bits_where_no_subnormal_occurs(
    kind: BackendKind, problem: Any
) -> None:
    _same_bits_as_numpy(kind, problem)


# -- a long run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_hundred_thousand_steps_numpy_and_torch_agree() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    shapes = [(), (3,), (2, 2), (0,)]
    model = {
        f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
    }
    model = {k: np.asarray(v) for k, v in model.items()}
    tmodel = {k: torch.from_numpy(v.copy()) for k, v in model.items()}
    rule = opt.OptimiserChain(opt.ClipNorm(10.0, throw=False), opt.Adam(1e-3))
    tree, ttree = opt.setup(rule, model), opt.setup(rule, tmodel)
    grads = [
        {
            k: np.asarray(rng.standard_normal(v.shape).astype(np.float32))
            for k, v in model.items()
        }
        for _ in range(16)
    ]
    tgrads = [{k: torch.from_numpy(v) for k, v in g.items()} for g in grads]
    for step in range(100_000):
        tree, model = opt.update_(tree, model, grads[step % 16])
        ttree, tmodel = opt.update_(ttree, tmodel, tgrads[step % 16])
    for k in model:
        assert model[k].tobytes() == tmodel[k].numpy().tobytes(), k
