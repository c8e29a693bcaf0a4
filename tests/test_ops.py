"""The operation table (``agnosticopt/_ops.py``) and what is derived from it.

The base adapter, the fast path's recorder and the numba lowering must speak
exactly the table's vocabulary; a rule may also call any other function of its
backend's array-API namespace (identical only if the backends agree), and a
Python operator on an array is reported at recording time.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import warnings
from typing import Any

import numpy as np
import pytest
from _backends import fast_path
from agnosticopt.adapters._base import Adapter

import agnosticopt as opt
from agnosticopt._ops import EXACT, OPS, RECORDED, SERVICES, table_markdown
from agnosticopt._rule import Rule
from agnosticopt._trace import Recorder, Sym, Untraceable, flatten_state, trace

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@dataclasses.dataclass(frozen=True)
class RMSNormalised(Rule):
    """``eta * dx / (rms(dx) + |dx|_2 / n)``: a reduction-based, Adafactor-like step."""

    eta: float = 0.01

    def init(self, x: Any, xp: Any) -> Any:
        return xp.zeros_like(x)

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        rms = xp.sqrt(xp.mean(xp.multiply(dx, dx)))
        scale = xp.divide(xp.linalg.vector_norm(dx), float(dx.shape[0]))
        step = xp.divide(xp.multiply(dx, self.eta), xp.add(rms, scale))
        return xp.add(state, step), step


@dataclasses.dataclass(frozen=True)
class WithOperators(Rule):
    """``eta / (dx*dx + 1)`` written with Python operators."""

    eta: float = 0.1

    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        return state, self.eta / (dx * dx + 1)


def _public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_")
    }


def test_the_adapter_defines_every_operation_of_the_table_and_nothing_undeclared() -> (
    None
):
    methods = {name for klass in Adapter.__mro__ for name in _public_methods(klass)}
    assert set(OPS) <= methods
    assert methods - SERVICES == set(OPS)  # a new adapter method is declared in _ops.py


def test_the_table_arity_is_the_adapter_signature() -> None:
    for op in OPS.values():
        params = list(inspect.signature(getattr(Adapter, op.name)).parameters.values())[
            1:
        ]
        positional = [
            p
            for p in params
            if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert len(positional) == op.arity, op.name


def test_the_recorder_records_exactly_the_recorded_operations() -> None:
    methods = _public_methods(Recorder) - SERVICES - {"input"}
    assert methods == RECORDED
    assert RECORDED <= EXACT  # the fast path compiles only exact operations


def _record_every_operation() -> Recorder:
    rec = Recorder("numpy")
    a, b = rec.input("float32", (5,)), rec.input("float32", (5,))
    for name in sorted(RECORDED):
        op = OPS[name]
        if name == "where":
            rec.where(rec.greater(a, b), a, 2.0)
        elif name == "astype":
            rec.astype(a, "float64")
        elif name == "full_like":
            rec.full_like(a, 3.0)
        elif name == "clip":
            rec.clip(a, -1.0, 1.0)
        else:
            getattr(rec, name)(*[a, b][: op.arity])
    return rec


def test_recorded_programs_use_the_table_names_and_every_one_lowers() -> None:
    pytest.importorskip("numba", reason="numba not installed: no lowering to check")
    from agnosticopt.adapters import _numba

    rec = _record_every_operation()
    opcodes = {op[0] for op in rec.ops}
    assert opcodes <= RECORDED
    for name in opcodes:
        operands = len(next(op for op in rec.ops if op[0] == name)) - 2
        assert isinstance(
            _numba._lower(name, "float32", ["v0", "v1", "v2"][:operands]), str
        )
    assert _numba._INFIX <= RECORDED
    assert all(OPS[name].operator for name in _numba._INFIX)
    with pytest.raises(ValueError, match="no lowering for mean"):
        _numba._lower("mean", "float32", ["v0"])


def test_the_contract_page_shows_the_table() -> None:
    assert table_markdown() in (DOCS / "contract.md").read_text()


def test_a_rule_sees_the_whole_namespace_on_every_backend(any_backend: Any) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(1000).astype(np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    tree = opt.setup(RMSNormalised(), any_backend.asarray(x))
    tree, new = opt.update(tree, any_backend.asarray(x), any_backend.asarray(g))
    g64 = g.astype(np.float64)
    scale = np.sqrt(np.mean(g64 * g64)) + np.linalg.norm(g64) / 1000
    step = 0.01 * g64 / scale
    # Reductions are not exact: the backends' summation orders differ in the last bits.
    np.testing.assert_allclose(
        any_backend.to_numpy(new), x - step, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        any_backend.to_numpy(tree.state), step, rtol=1e-5, atol=1e-9
    )


def test_an_unknown_name_names_the_backend_namespace() -> None:
    xp = opt.adapter_for(np.zeros(1))
    with pytest.raises(
        AttributeError, match=r"numpy: neither the adapter nor .* has 'nonesuch'"
    ):
        xp.nonesuch  # noqa: B018


def test_a_python_operator_warns_at_recording_naming_the_rule_and_the_operation() -> (
    None
):
    pytest.importorskip("numba", reason="numba not installed: nothing is recorded")
    n = 5000
    g = np.linspace(-2, 2, n, dtype=np.float32)
    with fast_path(False):
        expected = opt.update(
            opt.setup(WithOperators(), np.ones(n, np.float32)),
            np.ones(n, np.float32),
            g,
        )[1]
    model = {"w": np.ones(n, np.float32)}
    tree = opt.setup(WithOperators(), model)
    with fast_path(True), pytest.warns(opt.OperatorWarning) as caught:
        opt.update_(tree, model, {"w": g})
    (warning,) = caught
    message = str(warning.message)
    assert message.startswith("rule WithOperators: WithOperators.apply (")
    assert (
        "applies the Python operator `a * b` to an array; write xp.multiply(a, b)"
        in message
    )
    assert warning.filename == __file__  # points at the rule's line
    assert np.array_equal(model["w"].view(np.uint32), expected.view(np.uint32))


def test_the_operator_warning_made_an_error_raises_and_changes_nothing() -> None:
    pytest.importorskip("numba", reason="numba not installed: nothing is recorded")
    model = {"w": np.ones(5000, np.float32)}
    tree = opt.setup(WithOperators(), model)
    with fast_path(True), warnings.catch_warnings():
        warnings.simplefilter("error", opt.OperatorWarning)
        with pytest.raises(opt.OperatorWarning, match="rule WithOperators"):
            opt.update_(tree, model, {"w": np.full(5000, 3.0, np.float32)})
    assert np.array_equal(model["w"], np.ones(5000, np.float32))


def test_a_symbol_never_gives_a_silent_answer_to_an_operator() -> None:
    rec = Recorder("numpy", WithOperators())
    a, b = rec.input("float32", (3,)), rec.input("float32", (3,))
    for apply in (
        lambda: a == 0,
        lambda: 1.0 - a,
        lambda: -a,
        lambda: a**2,
        lambda: a < b,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", opt.OperatorWarning)
            with pytest.raises(Untraceable, match="the Python operator"):
                apply()
    assert isinstance(a, Sym)
    assert len({a, a}) == 1


def test_ops_used_names_what_is_not_guaranteed_identical() -> None:
    survey = opt.ops_used(RMSNormalised())
    assert survey.inexact == ("linalg.vector_norm", "mean")
    assert survey.exact == (
        "add",
        "divide",
        "multiply",
        "sqrt",
    )  # of the step, not init
    assert not survey.identical
    assert survey.stopped is None
    assert str(survey) == (
        "RMSNormalised: uses xp.linalg.vector_norm, xp.mean "
        "(identical only if the backends agree)"
    )
    ops = opt.ops_used(WithOperators(), "float64")
    assert ops.operators == ("*", "+", "/")
    assert not ops.identical
    assert "applies the Python operators `*`, `+`, `/` to arrays" in str(ops)


@pytest.mark.parametrize(
    "rule",
    [
        opt.Adam(),
        opt.Rprop(),
        opt.Lion(),
        opt.AccumGrad(2),
        opt.MixedPrecision("float64", opt.Nesterov()),
        opt.OptimiserChain(opt.WeightDecay(), opt.RAdam()),
    ],
    ids=lambda rule: type(rule).__name__,
)
def test_library_rules_use_only_exact_operations(rule: Any) -> None:
    survey = opt.ops_used(rule)
    assert survey.identical, survey
    assert survey.stopped is None, survey
    assert survey.exact, survey


def test_a_fast_path_recording_uses_only_recorded_operations() -> None:
    state = opt.Rprop().init(np.zeros(4, np.float32), opt.adapter_for(np.zeros(1)))
    arrays: list[Any] = []
    flatten_state(state, np.ndarray, arrays)
    recorded = trace(
        opt.Rprop(),
        state,
        arrays,
        (4,),
        "float32",
        tuple(a.dtype.name for a in arrays),
        "numpy",
    )
    assert {op[0] for op in recorded.program.ops} <= RECORDED
