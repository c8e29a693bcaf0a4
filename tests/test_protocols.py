"""The adapters and the fast plan have what ``agnosticopt/_protocols.py`` says they have.

mypy checks the core against the Protocols; this checks the other side: every
installed backend's adapter has each Protocol member, and each method takes the
Protocol's parameters (same names, same kinds), so a rule typed against
:class:`RuleNamespace` runs on every backend.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt
from agnosticopt._protocols import (
    ArrayAdapter,
    CompiledPlan,
    FastPlanner,
    RuleNamespace,
)


def _numpy() -> Any:
    return np.zeros(3, dtype=np.float32)


def _torch() -> Any:
    import torch

    return torch.zeros(3, dtype=torch.float32)


def _jax() -> Any:
    import jax.numpy as jnp

    return jnp.zeros(3, dtype=jnp.float32)


def _strict() -> Any:
    import array_api_strict as xp

    return xp.zeros(3, dtype=xp.float32)


ARRAYS: dict[str, tuple[str, Callable[[], Any]]] = {
    "numpy": ("numpy", _numpy),
    "torch": ("torch", _torch),
    "jax": ("jax", _jax),
    "array-api-strict": ("array_api_strict", _strict),
}


def _adapter(backend: str) -> Any:
    module, make = ARRAYS[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    xp = opt.adapter_for(make())
    assert xp is not None
    return xp


def _members(protocol: type) -> list[str]:
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object,) or not getattr(cls, "_is_protocol", False):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_") or n == "__getattr__"}
        names |= set(getattr(cls, "__annotations__", {}))
    return sorted(names)


def _parameters(fn: Any) -> list[tuple[str, Any]]:
    return [
        (p.name, p.kind)
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


def _check_members(obj: Any, protocol: type) -> None:
    assert isinstance(obj, protocol), f"{obj!r} is not a {protocol.__name__}"
    for name in _members(protocol):
        assert hasattr(obj, name), f"{obj!r} has no {name} ({protocol.__name__})"
        declared = getattr(protocol, name, None)
        if inspect.isfunction(declared):
            have = _parameters(getattr(obj, name))
            want = _parameters(declared)
            assert have == want, (
                f"{type(obj).__name__}.{name}{have} != {protocol.__name__}{want}"
            )


@pytest.mark.parametrize("backend", list(ARRAYS))
def test_every_adapter_is_an_array_adapter(backend: str) -> None:
    xp = _adapter(backend)
    _check_members(xp, RuleNamespace)
    _check_members(xp, ArrayAdapter)


def test_the_protocols_hold_what_the_base_adapter_documents() -> None:
    from agnosticopt.adapters._base import Adapter

    members = set(_members(ArrayAdapter))
    public = {n for n in dir(Adapter) if not n.startswith("_")} | {
        "name",
        "xp",
        "__getattr__",
    }
    assert members == public, sorted(members ^ public)


def test_every_operation_of_the_table_is_in_the_rule_namespace() -> None:
    from agnosticopt._ops import OPS

    for name, op in OPS.items():
        declared = getattr(RuleNamespace, name, None)
        assert inspect.isfunction(declared), f"{name} is not a RuleNamespace method"
        arguments = op.signature.partition("(")[2].rstrip(")").split(", ")
        assert [p for p, _ in _parameters(declared)][: len(arguments)] == arguments, (
            name
        )


def test_a_class_without_an_operation_is_not_a_rule_namespace() -> None:
    xp = _adapter("numpy")
    members = {n: getattr(xp, n) for n in _members(RuleNamespace)}
    assert isinstance(type("Whole", (), members)(), RuleNamespace)
    del members["sqrt"]

    def no_namespace(self: Any, name: str) -> Any:
        raise AttributeError(name)

    members["__getattr__"] = no_namespace
    assert not isinstance(type("Partial", (), members)(), RuleNamespace)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_fast_plan_is_a_compiled_plan(backend: str) -> None:
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed: no fast path")
    xp = _adapter(backend)
    _check_members(xp, FastPlanner)
    host = np.ones(5000, dtype=np.float32)  # above the plain path's small-update limit
    if backend == "torch":
        import torch

        arrays = [torch.from_numpy(host.copy()) for _ in range(4)]
    else:
        arrays = [host.copy() for _ in range(4)]
    rule = opt.Adam()
    plan = xp.fast_plan(
        [(rule, rule.init(x, xp), x, xp.full_like(x, 0.5)) for x in arrays]
    )
    assert plan is not None
    assert isinstance(plan, CompiledPlan)
    assert list(plan.handled) == [True] * 4
    assert len(plan.states) == 4
