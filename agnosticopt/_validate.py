"""Checks that ``update``/``update_`` make before they write anything.

* :func:`check_state`: a leaf's state must look like the state ``rule.init``
  makes for its parameter (the same containers, and arrays of the same backend,
  device, shape and dtype), so that a tree made for another model, dtype or
  backend raises here, naming the key path, instead of broadcasting, promoting
  or failing half-way through the writes.
* :func:`check_step`: a step must be an array of the parameter's backend and
  device, of its shape, and of a dtype that can be written into it.
* :func:`overlapping_parameters` and :class:`Written`: parameters written in
  place must not share memory with another parameter, and a step that shares
  memory with a parameter written in the same call is copied before the writes.

What ``rule.init`` makes is described once per rule object, backend, shape and
dtype (a *spec*: the state's containers and array descriptions, no arrays), and
cached; a state is then checked against its spec by a short walk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agnosticopt._containers import KeyPath, format_path
from agnosticopt._leaf import _describe
from agnosticopt._protocols import ArrayAdapter
from agnosticopt._xp import adapter_for

__all__ = ["Written", "check_state", "check_step", "overlapping_parameters"]

#: (id(rule), array type, shape, id(dtype)) -> (rule and dtype kept alive, spec).
_SPECS: dict[tuple[int, type, tuple[int, ...], int], tuple[Any, Any, Any]] = {}
_MAX_SPECS = 4096

_CONVERT_HINT = (
    "was the tree made by setup for this model? A tree of another backend, "
    "device or dtype must be converted first: opt.convert(tree, like=model), "
    "or opt.load(path, like=model) for a saved one"
)


class _Array:
    """The spec of one state array: its type, shape, dtype, and device (if x's)."""

    __slots__ = ("adapter", "dtype", "kind", "name", "on_x_device", "shape")

    def __init__(self, a: Any, axp: ArrayAdapter, x: Any, xp: ArrayAdapter) -> None:
        self.kind, self.name, self.adapter = type(a), axp.name, axp
        self.shape, self.dtype = axp.shape(a), a.dtype
        self.on_x_device = (
            axp.name == xp.name and not xp.one_device and axp.device(a) == xp.device(x)
        )

    def describe(self) -> str:
        dtype = str(self.dtype).rpartition(".")[2]
        return f"a {self.name} {dtype} array of shape {self.shape}"


def _spec(state: Any, x: Any, xp: ArrayAdapter) -> Any:
    """The spec of ``state``: containers mirrored, arrays described, others ``None``.

    A container holding nothing to check (host scalars only) is ``None`` too.
    """
    if isinstance(state, (tuple, list)):
        inner = tuple(_spec(s, x, xp) for s in state)
        if all(s is None for s in inner) and type(state) in (tuple, list):
            return None
        return (type(state), inner)
    if isinstance(state, Mapping):
        return (dict, {k: _spec(v, x, xp) for k, v in state.items()})
    axp = adapter_for(state)
    if axp is None:
        return None  # host scalars, None, anything else: not checked
    return _Array(state, axp, x, xp)


def _spec_for(leaf: Any, x: Any, xp: ArrayAdapter) -> Any:
    key = (
        id(leaf.rule),
        type(x),
        tuple(x.shape),
        id(x.dtype),
    )  # a dtype's hash is slow
    hit = _SPECS.get(key)
    if hit is not None:
        return hit[2]
    with xp.computing():
        spec = _spec(leaf.rule.init(x, xp), x, xp)
    if len(_SPECS) >= _MAX_SPECS:
        _SPECS.clear()
    _SPECS[key] = (leaf.rule, x.dtype, spec)
    return spec


def check_state(leaf: Any, x: Any, xp: ArrayAdapter, path: KeyPath) -> None:
    """Raise if ``leaf.state`` is not what ``leaf.rule.init`` makes for ``x``.

    Raises
    ------
    TypeError
        A state array of another backend or device, or another container.
    ValueError
        A state array of another shape or dtype.
    """
    spec = _spec_for(leaf, x, xp)
    if spec is not None:
        _check(spec, leaf.state, x, xp, path, ())


def _check(
    spec: Any,
    state: Any,
    x: Any,
    xp: ArrayAdapter,
    path: KeyPath,
    where: tuple[Any, ...],
) -> None:
    if spec is None:
        return
    if type(spec) is _Array:
        if (
            type(state) is not spec.kind
            or (state.dtype is not spec.dtype and state.dtype != spec.dtype)
            or state.shape != spec.shape
            or (spec.on_x_device and state.device != x.device)
        ):
            _check_array(spec, state, x, xp, path, where)
        return
    kind, inner = spec
    if kind is dict:
        if not isinstance(state, Mapping) or set(state) != set(inner):
            _fail(
                TypeError,
                path,
                where,
                state,
                f"a dict with keys {sorted(inner, key=repr)}",
            )
        for k, s in inner.items():
            _check(s, state[k], x, xp, path, (*where, k))
        return
    if type(state) is not kind or len(state) != len(inner):
        _fail(
            TypeError, path, where, state, f"a {kind.__name__} of {len(inner)} entries"
        )
    fields = getattr(kind, "_fields", None)
    for i, s in enumerate(inner):
        if s is not None:
            _check(s, state[i], x, xp, path, (*where, fields[i] if fields else i))


def _check_array(
    spec: _Array,
    a: Any,
    x: Any,
    xp: ArrayAdapter,
    path: KeyPath,
    where: tuple[Any, ...],
) -> None:
    """The slow check of a state array that differs from the spec in type or more."""
    axp = adapter_for(a)
    if axp is None or not _related(axp, spec.adapter):
        _fail(TypeError, path, where, a, spec.describe())
    if spec.on_x_device and axp.device(a) != xp.device(x):
        msg = (
            f"at {format_path(path)} the state{_where(where)} is on device "
            f"{axp.device(a)}, but the parameter is on {xp.device(x)}; {_CONVERT_HINT}"
        )
        raise TypeError(msg)
    if axp.shape(a) != spec.shape or a.dtype != spec.dtype:
        _fail(ValueError, path, where, a, spec.describe())


def _related(a: Any, b: Any) -> bool:
    """Whether adapters ``a`` and ``b`` are of one backend.

    The same adapter, or one a subclass of the other's class (a registered numpy
    adapter for an ndarray subclass takes numpy results; torch's CUDA adapter is
    torch's, and the device is checked apart). The generic array-API adapter is
    related to nothing but an adapter of its own name.
    """
    if a is b or a.name == b.name:
        return True
    generic = len(type(a).__mro__) <= 2 or len(type(b).__mro__) <= 2
    return not generic and (isinstance(a, type(b)) or isinstance(b, type(a)))


def _fail(
    kind: type[Exception],
    path: KeyPath,
    where: tuple[Any, ...],
    found: Any,
    wanted: str,
) -> None:

    msg = (
        f"at {format_path(path)} the state{_where(where)} is {_describe(found)}, but "
        f"setup makes {wanted} for this parameter; {_CONVERT_HINT}"
    )
    raise kind(msg)


def _where(where: tuple[Any, ...]) -> str:
    return "".join(f"[{k!r}]" for k in where)


def check_step(step: Any, x: Any, xp: ArrayAdapter, path: KeyPath, rule: Any) -> None:
    """Raise if ``step`` cannot be written into (or subtracted from) parameter ``x``."""
    if (
        type(step) is type(x)
        and (step.dtype is x.dtype or step.dtype == x.dtype)
        and step.shape == x.shape
        and (xp.one_device or step.device == x.device)
    ):
        return  # the usual step: an array like the parameter

    sxp = adapter_for(step)
    problem = None
    if sxp is None or not _related(sxp, xp) or sxp.device(step) != xp.device(x):
        problem = "an array of the parameter's backend and device"
    elif sxp.shape(step) != xp.shape(x):
        problem = f"of the parameter's shape {xp.shape(x)}"
    elif not sxp.is_trainable(step) or (sxp.is_complex(step) and not xp.is_complex(x)):
        problem = f"of a dtype that can be written into a {xp.dtype_name(x)} parameter"
    if problem is not None:
        msg = (
            f"at {format_path(path)} the rule {type(rule).__name__} returned a step that "
            f"is {_describe(step)}; a step must be {problem} ({_describe(x)})"
        )
        raise (
            TypeError(msg)
            if "backend" in problem or "dtype" in problem
            else ValueError(msg)
        )


# -- memory overlap ---------------------------------------------------------------------------


def overlapping_parameters(items: list[tuple[Any, Any, KeyPath, bool]]) -> None:
    """Raise if two parameters share memory and one of them is written in place.

    ``items`` are ``(x, xp, path, written)``, one per distinct parameter.
    Parameters are grouped by the adapter's ``memory_key`` (the buffer they view,
    one dict lookup each); only groups of several are compared element-exactly.
    """
    groups: dict[Any, list[tuple[Any, Any, KeyPath, bool]]] = {}
    for item in items:
        key = item[1].memory_key(item[0])
        if key is not None:
            groups.setdefault(key, []).append(item)
    for group in groups.values():
        if len(group) > 1:
            _check_group(group)


def _check_group(group: list[tuple[Any, Any, KeyPath, bool]]) -> None:
    """Compare the parameters of one buffer whose byte ranges meet (a sweep by start)."""
    spans = [item[1].memory_span(item[0]) for item in group]
    if any(span is None for span in spans):  # no ranges: every pair
        pairs = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
    else:
        order = sorted(range(len(group)), key=lambda i: spans[i])
        open_: list[int] = []
        pairs = []
        for i in order:
            start = spans[i][0]
            open_ = [j for j in open_ if spans[j][1] > start]
            pairs.extend((group[j], group[i]) for j in open_)
            open_.append(i)
    for (a, axp, apath, aw), (b, _, bpath, bw) in pairs:
        if (aw or bw) and axp.overlaps(a, b):
            msg = (
                f"the parameters at {format_path(apath)} and {format_path(bpath)} "
                "share memory (views of one buffer) but are different arrays: "
                "an in-place update would step the shared elements twice. Tie "
                "them (the same array object at both places) or make copies"
            )
            raise ValueError(msg)


class Written:
    """The parameters an ``update_`` writes in place, to test steps against."""

    def __init__(self) -> None:
        self.by_key: dict[Any, list[tuple[Any, Any]]] = {}

    def add(self, x: Any, xp: ArrayAdapter) -> None:
        key = xp.memory_key(x)
        if key is not None:
            self.by_key.setdefault(key, []).append((x, xp))

    def overlaps(self, a: Any, xp: ArrayAdapter) -> bool:
        """Whether array ``a`` shares memory with a parameter written in place."""
        if not self.by_key:
            return False
        key = xp.memory_key(a)
        found = self.by_key.get(key) if key is not None else None
        return found is not None and any(wxp.overlaps(a, w) for w, wxp in found)
