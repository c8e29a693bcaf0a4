"""Portable checkpoints: a state tree as a flat mapping, and safetensors files.

A state tree becomes a flat mapping from key-path strings to arrays and plain
numbers. The key of one entry is ``"<parameter>/<entry>"``:

* ``<parameter>`` is the parameter's key path, its keys (strings or integers)
  joined by ``"."``: ``('layers', 1, 'w')`` is ``"layers.1.w"``; a bare Leaf (a
  model that is one array) has the empty path ``""``. Two paths that give the
  same string are refused.
* ``<entry>`` names one part of the Leaf, as attributes of the Leaf object:
  ``state`` (a state that is one array, e.g. Momentum's velocity),
  ``state.m``, ``state.beta_t.0`` (named tuple fields by name, tuple and list
  items by position, dict items by key), ``frozen`` (a bool) and ``rule`` (the
  rule's description, below). ``None`` parts of a state have no entry.

Values are the state's arrays themselves (not copies), host scalars as Python
numbers (``beta_t`` products as ``float``: every float16, bfloat16, float32 and
float64 value is a float exactly; counters as ``int``), the frozen flag as a
``bool`` and the rule as its description: a JSON-able dict
``{"class": "Adam", "fields": {"eta": 0.001, "beta": [0.9, 0.999], ...}}``,
rules inside rules described the same way (``OptimiserChain``'s ``opts``, the
``rule`` of ``MixedPrecision``), non-finite floats as ``{"float": "inf"}``.
Descriptions are parsed back only into agnosticopt's public rule classes (no
``eval``, no pickle); another class matches only a target rule with the same
description.

Loading is strict and all or nothing: every missing, extra, mis-shaped or
mis-typed entry is named in one :class:`CheckpointError`, and the target is
left untouched. A host scalar is restored in the dtype the target's rule gives
it (refused when its value does not fit that dtype exactly).

Files (:func:`~agnosticopt.save`, :func:`~agnosticopt.load`, in
:mod:`agnosticopt._checkpoint_file`) are safetensors: arrays and host scalars
as tensors in their own dtype (bfloat16 as ``BF16``, complex as real tensors
with a last axis of 2), everything else as JSON in the header's metadata.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agnosticopt._containers import KeyPath, flatten, format_path
from agnosticopt._leaf import Leaf, trainable_adapter
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import Rule
from agnosticopt._setup import setup
from agnosticopt._xp import adapter_for

__all__ = [
    "CheckpointError",
    "convert",
    "describe_rule",
    "leaf_entries",
    "leaf_from_entries",
    "load_state_dict",
    "path_key",
    "rule_from_description",
    "state_dict",
]

#: Separates the parameter's key-path string from the entry name.
SEP = "/"


class CheckpointError(ValueError):
    """A state dict or checkpoint file that does not fit its target.

    Attributes
    ----------
    problems
        One line per missing, extra, mis-shaped or mis-typed entry.
    """

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = problems[:25]
        more = len(problems) - len(shown)
        lines = "\n  ".join(shown)
        tail = f"\n  ... and {more} more" if more else ""
        super().__init__(f"{what}:\n  {lines}{tail}")


# -- key paths -----------------------------------------------------------------


def path_key(path: KeyPath) -> str:
    """The key-path string of a parameter: its keys joined by ``"."``.

    Raises
    ------
    TypeError
        If a key is neither a string nor an integer, or a string contains
        ``"/"`` (the separator of the entry name).
    """
    parts = []
    for key in path:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            msg = (
                f"state_dict: the key {key!r} at {format_path(path)} is a "
                f"{type(key).__name__}; checkpoints need string or integer keys"
            )
            raise TypeError(msg)
        text = str(key)
        if SEP in text:
            msg = f"state_dict: the key {key!r} at {format_path(path)} contains {SEP!r}"
            raise TypeError(msg)
        parts.append(text)
    return ".".join(parts)


def _tree_leaves(tree: Any) -> list[tuple[KeyPath, Leaf]]:
    """Each distinct Leaf of a state tree with its first key path, depth first."""
    found: list[tuple[KeyPath, Leaf]] = []
    seen: set[int] = set()

    def walk(t: Any, path: KeyPath) -> None:
        if id(t) in seen:
            return
        if isinstance(t, Leaf):
            seen.add(id(t))
            found.append((path, t))
            return
        node = flatten(t)
        if node is None:
            return
        seen.add(id(t))
        for key, child in zip(node.keys, node.children, strict=True):
            walk(child, (*path, key))

    walk(tree, ())
    return found


def _keyed_leaves(tree: Any) -> dict[str, tuple[KeyPath, Leaf]]:
    out: dict[str, tuple[KeyPath, Leaf]] = {}
    for path, leaf in _tree_leaves(tree):
        key = path_key(path)
        if key in out:
            msg = (
                f"state_dict: the parameters at {format_path(out[key][0])} and "
                f"{format_path(path)} have the same key-path string {key!r}"
            )
            raise ValueError(msg)
        out[key] = (path, leaf)
    return out


# -- rule descriptions -------------------------------------------------------------


def _public_rules() -> dict[str, type]:
    import agnosticopt

    out = {}
    for name in agnosticopt.__all__:
        obj = getattr(agnosticopt, name)
        if isinstance(obj, type) and issubclass(obj, Rule) and obj is not Rule:
            out[name] = obj
    return out


def _class_name(rule: Any) -> str:
    cls = type(rule)
    if _public_rules().get(cls.__name__) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def describe_rule(rule: Any) -> dict[str, Any]:
    """A JSON-able description of a rule: its class name and fields.

    Rules inside rules are described the same way. A rule that is not a
    dataclass has ``"fields": None`` (it can only be matched, not rebuilt).

    Raises
    ------
    TypeError
        If a field holds something that has no JSON form.
    """
    name = _class_name(rule)
    if not dataclasses.is_dataclass(rule) or isinstance(rule, type):
        return {"class": name, "fields": None}
    fields = {}
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        fields[field.name] = _encode(value, f"{name}.{field.name}")
    return {"class": name, "fields": fields}


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Rule):
        return describe_rule(value)
    from agnosticopt._schedules import Schedule

    if isinstance(value, Schedule):  # a schedule of Scheduled: its class and fields
        cls = type(value).__name__
        fields = {
            f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
        return {"schedule": cls, "fields": fields}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number):
            return number
        return {
            "float": "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
        }
    if isinstance(value, (tuple, list)):
        return [_encode(v, where) for v in value]
    msg = f"describe_rule: {where} is a {type(value).__name__}, which has no JSON form"
    raise TypeError(msg)


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict) and set(value) == {"schedule", "fields"}:
        return _build_schedule(value, where)
    if isinstance(value, dict):
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        return rule_from_description(value, where=where)
    if isinstance(value, list):
        return tuple(_decode(v, where) for v in value)
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    msg = f"{where}: {value!r} is not a value of a rule description"
    raise ValueError(msg)


def rule_from_description(desc: Any, *, like: Any = None, where: str = "rule") -> Any:
    """The rule that :func:`describe_rule` described.

    Parameters
    ----------
    desc
        A description: ``{"class": ..., "fields": {...}}``.
    like
        A rule to return when ``desc`` describes it exactly: the way rules of
        other classes than agnosticopt's are restored.
    where
        Named in error messages.

    Raises
    ------
    ValueError
        If the class is not one of agnosticopt's public rules (and ``like`` is
        not described by ``desc``), or the fields do not make a valid rule.
    """
    if like is not None and _same_description(like, desc):
        return like
    try:
        return _build_rule(desc, where)
    except RecursionError as exc:
        msg = f"{where}: the rule description is nested too deeply"
        raise ValueError(msg) from exc


def _build_rule(desc: Any, where: str) -> Any:
    if not isinstance(desc, dict) or set(desc) != {"class", "fields"}:
        msg = f"{where}: a rule description is a dict with 'class' and 'fields', got {desc!r}"
        raise ValueError(msg)
    name, fields = desc["class"], desc["fields"]
    cls = _public_rules().get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(fields, dict):
        msg = (
            f"{where}: {name!r} is not one of agnosticopt's rule classes; a rule of "
            "another class is only restored into a target that has the same rule"
        )
        raise ValueError(msg)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    missing = [n for n in names if n not in fields]
    if unknown or missing:
        msg = (
            f"{where}: {name} has fields {names}; the description has {sorted(fields)}"
        )
        raise ValueError(msg)
    values = {k: _decode(fields[k], f"{where}.{k}") for k in names}
    try:
        if name == "OptimiserChain":
            return cls(*values["opts"])
        if name == "MixedPrecision":
            return cls(values["dtype"], values["rule"])
        if name == "Scheduled":
            return cls(values["rule"], **dict(values["schedules"]))
        return cls(**values)
    except (TypeError, ValueError) as exc:
        msg = f"{where}: the description does not make a valid {name}: {exc}"
        raise ValueError(msg) from exc


def _build_schedule(desc: dict[str, Any], where: str) -> Any:
    from agnosticopt import schedules

    name, fields = desc["schedule"], desc["fields"]
    cls = getattr(schedules, name, None) if isinstance(name, str) else None
    if (
        name not in schedules.__all__
        or not isinstance(cls, type)
        or not isinstance(fields, dict)
    ):
        msg = f"{where}: {name!r} is not one of agnosticopt's schedules"
        raise ValueError(msg)
    values = {k: _decode(v, f"{where}.{k}") for k, v in fields.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        msg = f"{where}: the description does not make a valid {name}: {exc}"
        raise ValueError(msg) from exc


def _same_description(rule: Any, desc: Any) -> bool:
    try:
        return bool(describe_rule(rule) == desc)
    except TypeError:
        return False


def _skeleton(desc: Any) -> Any:
    """The classes of a description, nested; hyperparameter values left out."""
    if isinstance(desc, dict) and "class" in desc:
        fields = desc.get("fields") or {}
        inner = tuple(
            (k, _skeleton(v)) for k, v in sorted(fields.items()) if _has_rule(v)
        )
        return (desc["class"], inner)
    if isinstance(desc, list):
        return tuple(_skeleton(v) for v in desc)
    return None


def _has_rule(value: Any) -> bool:
    if isinstance(value, dict):
        return "class" in value
    if isinstance(value, list):
        return any(_has_rule(v) for v in value)
    return False


# -- one Leaf ---------------------------------------------------------------------


def _state_parts(state: Any, name: str) -> Iterator[tuple[str, Any]]:
    """``(entry name, value)`` for every non-None part of a state, depth first."""
    if state is None:
        return
    fields = getattr(type(state), "_fields", None)
    if isinstance(state, tuple) and fields is not None:
        for field, part in zip(fields, state, strict=True):
            yield from _state_parts(part, f"{name}.{field}")
    elif isinstance(state, (tuple, list)):
        for i, part in enumerate(state):
            yield from _state_parts(part, f"{name}.{i}")
    elif isinstance(state, dict):
        for key, part in state.items():
            yield from _state_parts(part, f"{name}.{key}")
    else:
        yield name, state


def _is_numpy_generic(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.generic)


def _is_float_scalar(value: Any) -> bool:
    """A host numpy scalar of a floating-point dtype (ml_dtypes' bfloat16 included)."""
    return _is_numpy_generic(value) and (
        value.dtype.kind in "fc" or "float" in value.dtype.name
    )


def _plain(value: Any) -> Any:
    """A host numpy scalar as the Python number of the same value."""
    if _is_numpy_generic(value):
        if value.dtype.kind == "b":
            return bool(value)
        if value.dtype.kind in "iu":
            return int(value)
        return float(value)
    return value


def leaf_entries(leaf: Leaf, *, raw: bool = False) -> dict[str, Any]:
    """The entries of one Leaf: ``state...``, ``frozen`` and ``rule``.

    Parameters
    ----------
    leaf
        A Leaf of a state tree.
    raw
        Keep host scalars as numpy scalars of their dtype (what :func:`save`
        writes) instead of Python numbers.

    Returns
    -------
    dict
        Entry name -> value: the state's arrays themselves, host scalars,
        ``frozen`` (bool) and ``rule`` (:func:`describe_rule`).
    """
    out: dict[str, Any] = {}
    for name, value in _state_parts(leaf.state, "state"):
        out[name] = value if raw else _plain(value)
    out["frozen"] = bool(leaf.frozen)
    out["rule"] = describe_rule(leaf.rule)
    return out


def _describe_value(value: Any) -> str:
    if _is_numpy_generic(value):
        return f"a numpy {value.dtype.name} scalar"
    xp = adapter_for(value)
    if xp is not None:
        return f"a {xp.name} {xp.dtype_name(value)} array of shape {xp.shape(value)}"
    return f"a {type(value).__name__}"


def _slot_kind(template: Any) -> str:
    if _is_numpy_generic(
        template
    ):  # before adapter_for: numpy scalars have a namespace
        return "scalar" if _is_float_scalar(template) else "int"
    if adapter_for(template) is not None:
        return "array"
    if isinstance(template, bool):
        return "bool"
    if isinstance(template, int):
        return "int"
    return "other"


def _zero_d_integer(value: Any) -> Any:
    """A 0-d integer array (``Scheduled``'s count after a jitted step) as a host int."""
    if getattr(value, "ndim", None) == 0 and "int" in str(getattr(value, "dtype", "")):
        try:
            return operator.index(value)
        except TypeError:
            return value
    return value


def _restore_part(template: Any, value: Any, where: str, problems: list[str]) -> Any:
    """``value`` checked against the template part and made like it (a copy)."""
    kind = _slot_kind(template)
    if kind == "array":
        return _restore_array(template, value, where, problems)
    if kind == "scalar":
        return _restore_scalar(type(template), value, where, problems)
    if kind == "int":
        value = _zero_d_integer(value)
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not ok:
            problems.append(
                f"{where}: mis-typed, expected an integer, got {_describe_value(value)}"
            )
            return template
        return type(template)(value)
    if kind == "bool":
        if not isinstance(value, bool):
            problems.append(
                f"{where}: mis-typed, expected a bool, got {_describe_value(value)}"
            )
        return value
    if type(value) is not type(template):
        problems.append(
            f"{where}: mis-typed, expected {_describe_value(template)}, got {_describe_value(value)}"
        )
    return value


def _restore_scalar(kind: type, value: Any, where: str, problems: list[str]) -> Any:
    """A host scalar of numpy type ``kind`` with exactly the value of ``value``."""
    import numpy as np

    expected = np.dtype(kind).name
    xp = None if _is_numpy_generic(value) else adapter_for(value)
    if xp is not None:  # a 0-d array (a file's tensor, a state from jax.jit)
        if xp.shape(value) != () or xp.dtype_name(value) != expected:
            problems.append(
                f"{where}: mis-typed, expected a {expected} scalar, got {_describe_value(value)}"
            )
            return kind(0)
        return kind(xp.to_numpy(value)[()])
    if _is_numpy_generic(value):
        if value.dtype != np.dtype(kind):
            problems.append(
                f"{where}: mis-typed, expected a {expected} scalar, got {_describe_value(value)}"
            )
            return kind(0)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(
            f"{where}: mis-typed, expected a {expected} number, got {_describe_value(value)}"
        )
        return kind(0)
    with np.errstate(all="ignore"):
        out = kind(value)
    if not (
        float(out) == float(value) or (math.isnan(float(out)) and math.isnan(value))
    ):
        problems.append(f"{where}: mis-typed, {value!r} is not a {expected} value")
    return out


def _restore_array(template: Any, value: Any, where: str, problems: list[str]) -> Any:
    txp = adapter_for(template)
    if txp.shape(template) == () and (
        _is_numpy_generic(value)
        or (isinstance(value, numbers.Real) and not isinstance(value, bool))
    ):
        # a host scalar that jax.jit made a 0-d array: a number fits it
        kind = txp.scalar_type(template)
        scalar = (
            _restore_scalar(kind, value, where, problems)
            if not txp.is_complex(template)
            else None
        )
        if scalar is None:
            problems.append(f"{where}: mis-typed, expected {_describe_value(template)}")
            return template
        import numpy as np

        return _from_numpy(np.asarray(scalar), template)
    vxp = None if _is_numpy_generic(value) else adapter_for(value)
    if vxp is None:
        problems.append(
            f"{where}: mis-typed, expected {_describe_value(template)}, got {_describe_value(value)}"
        )
        return template
    problem = None
    if vxp.shape(value) != txp.shape(template):
        problem = (
            f"{where}: mis-shaped, expected shape {txp.shape(template)}, "
            f"got {vxp.shape(value)}"
        )
    elif vxp.dtype_name(value) != txp.dtype_name(template):
        problem = (
            f"{where}: mis-typed, expected {txp.dtype_name(template)}, "
            f"got {vxp.dtype_name(value)}"
        )
    if problem:
        problems.append(problem)
        return template
    return _array_like(value, template)


def _array_like(value: Any, template: Any) -> Any:
    """A copy of array ``value`` on the backend and device of ``template``."""
    txp = adapter_for(template)
    vxp = adapter_for(value)
    if vxp is txp and _device(value) == _device(template):
        return txp.copy(value)
    return _from_numpy(vxp.to_numpy(value), template)


def _device(a: Any) -> Any:
    import array_api_compat

    try:
        return array_api_compat.device(a)
    except Exception:  # noqa: BLE001 - a backend array-api-compat does not know
        return None


def _from_numpy(host: Any, template: Any) -> Any:
    """A numpy array as an array of the backend, device and dtype of ``template``."""
    import array_api_compat
    import numpy as np

    txp = adapter_for(template)
    name = txp.dtype_name(template)
    if txp.name == "numpy":
        return np.array(host, dtype=template.dtype, copy=True)
    space = array_api_compat.array_namespace(template)
    device = _device(template)
    if name == "bfloat16":
        try:  # JAX takes ml_dtypes' bfloat16 as it is
            out = space.asarray(host, device=device, copy=True)
            if txp.dtype_name(out) == "bfloat16":
                return out
        except (TypeError, ValueError):
            pass
        # torch does not: through float32, which holds every bfloat16 exactly
        wide = space.asarray(
            np.asarray(host).astype(np.float32), device=device, copy=True
        )
        return txp.astype(wide, "bfloat16")
    return space.asarray(np.asarray(host), device=device, copy=True)


def leaf_from_entries(
    template: Leaf,
    entries: Mapping[str, Any],
    where: str = "",
    *,
    problems: list[str] | None = None,
    rule: Any = None,
) -> Leaf:
    """A new Leaf from the entries of :func:`leaf_entries`, made like ``template``.

    Parameters
    ----------
    template
        A Leaf on the target backend and device (e.g. ``setup`` on the target
        model): its state's structure, shapes, dtypes and host-scalar types are
        what the entries must have. It is not modified.
    entries
        Entry name -> value (arrays of any backend, numbers). ``rule`` and
        ``frozen`` may be absent: the template's are kept.
    where
        The parameter's key-path string, for messages.
    problems
        If given, problems are appended to it instead of raised (so that a
        caller can report all leaves at once); the returned Leaf is then
        meaningless when any was added.
    rule
        The rule to use instead of parsing ``entries["rule"]``.

    Returns
    -------
    Leaf
        New state arrays (copies, on the template's backend and device), host
        scalars in the template's dtype, the entries' rule and frozen flag.

    Raises
    ------
    CheckpointError
        Naming every missing, extra, mis-shaped or mis-typed entry.
    """
    own = problems is None
    found: list[str] = [] if problems is None else problems
    start = len(found)
    label = f"{where}{SEP}"
    new_rule = template.rule if rule is None else rule
    if rule is None and "rule" in entries:
        new_rule = _entry_rule(template.rule, entries["rule"], f"{label}rule", found)
    frozen = template.frozen
    if "frozen" in entries:
        frozen = entries["frozen"]
        if not isinstance(frozen, bool):
            found.append(
                f"{label}frozen: mis-typed, expected a bool, got {_describe_value(frozen)}"
            )
    parts = dict(_state_parts(template.state, "state"))
    extra = [n for n in entries if n not in parts and n not in ("rule", "frozen")]
    found.extend(f"{label}{n}: extra entry, the target has none" for n in extra)
    missing = [n for n in parts if n not in entries]
    found.extend(f"{label}{n}: missing" for n in missing)
    values = {
        n: _restore_part(parts[n], entries[n], f"{label}{n}", found)
        for n in parts
        if n in entries
    }
    if own and len(found) > start:
        raise CheckpointError(f"the entries for {where!r} do not fit the target", found)
    state = _rebuild_state(template.state, "state", values)
    return Leaf(new_rule, state, frozen)


def _entry_rule(target: Any, desc: Any, where: str, problems: list[str]) -> Any:
    try:
        rule = rule_from_description(desc, like=target, where=where)
    except ValueError as exc:
        problems.append(str(exc))
        return target
    if _skeleton(describe_rule(rule)) != _skeleton(describe_rule(target)):
        problems.append(
            f"{where}: the entries are for {rule!r}, the target's rule is {target!r}"
        )
        return target
    return rule


def _rebuild_state(template: Any, name: str, values: Mapping[str, Any]) -> Any:
    if template is None:
        return None
    fields = getattr(type(template), "_fields", None)
    if isinstance(template, tuple) and fields is not None:
        parts = [
            _rebuild_state(p, f"{name}.{f}", values)
            for f, p in zip(fields, template, strict=True)
        ]
        return type(template)._make(parts)  # type: ignore[attr-defined]
    if isinstance(template, (tuple, list)):
        items = [
            _rebuild_state(p, f"{name}.{i}", values) for i, p in enumerate(template)
        ]
        return type(template)(items) if type(template) in (tuple, list) else items
    if isinstance(template, dict):
        return {
            k: _rebuild_state(p, f"{name}.{k}", values) for k, p in template.items()
        }
    return values.get(name, template)


# -- a whole tree -------------------------------------------------------------------


def state_dict(tree: Any) -> dict[str, Any]:
    """A state tree as a flat mapping from key-path strings to values.

    Parameters
    ----------
    tree
        A state tree made by :func:`setup` (or a part of one).

    Returns
    -------
    dict
        ``"<parameter>/<entry>"`` -> value, for every Leaf (a tied Leaf once,
        under its first key path): see :mod:`agnosticopt._checkpoint`.
        Arrays are the state's own (no copy): :func:`update_` writes into them.

    Raises
    ------
    TypeError, ValueError
        If a key is neither a string nor an integer, or two key paths give
        the same string.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> tree = opt.setup(opt.Adam(), {"w": np.zeros(2, np.float32)})
    >>> sorted(opt.state_dict(tree))
    ['w/frozen', 'w/rule', 'w/state.beta_t.0', 'w/state.beta_t.1', 'w/state.m', 'w/state.v']
    >>> opt.state_dict(tree)["w/state.beta_t.0"]
    0.8999999761581421
    """
    out: dict[str, Any] = {}
    for key, (_, leaf) in _keyed_leaves(tree).items():
        for name, value in leaf_entries(leaf).items():
            out[f"{key}{SEP}{name}"] = value
    return out


def _group(
    sd: Mapping[str, Any], known: set[str], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """The entries of ``sd`` by parameter key; unknown keys become problems."""
    grouped: dict[str, dict[str, Any]] = {k: {} for k in known}
    for full, value in sd.items():
        if not isinstance(full, str) or SEP not in full:
            problems.append(
                f"{full!r}: extra entry, not a key '<parameter>{SEP}<entry>'"
            )
            continue
        key, _, name = full.rpartition(SEP)
        if key not in grouped:
            problems.append(f"{full}: extra entry, the target has no parameter {key!r}")
            continue
        grouped[key][name] = value
    for key, entries in grouped.items():
        if not entries:
            problems.append(
                f"{key}{SEP}*: missing, the state dict has no entry for this parameter"
            )
    return grouped


@dataclasses.dataclass(frozen=True)
class _NoInit:
    """A stand-in rule for ``setup``: builds the tree's shape, no state yet."""

    rule: Any

    def init(self, x: Any, xp: RuleNamespace) -> None:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        raise NotImplementedError


def _model_arrays(model: Any) -> dict[KeyPath, Any]:
    """Every trainable array of ``model`` by key path."""
    out: dict[KeyPath, Any] = {}

    def walk(x: Any, path: KeyPath) -> None:
        node = flatten(x)
        if node is None:
            if trainable_adapter(x) is not None:
                out[path] = x
            return
        for key, child in zip(node.keys, node.children, strict=True):
            walk(child, (*path, key))

    walk(model, ())
    return out


def _restore(
    tree: Any,
    grouped_of: Callable[[set[str], list[str]], dict[str, dict[str, Any]]],
    what: str,
    *,
    model: Any = None,
    rules: Mapping[str, Any] | None = None,
) -> Any:
    """Load entries into the Leaves of ``tree``, all or nothing.

    ``grouped_of(known_keys, problems)`` gives the entries per parameter key.
    With ``model``, ``tree`` is fresh from ``setup(_NoInit(rule), model)`` and
    each Leaf's template state is made by ``rule.init`` on its array, the rule
    being the entries' (it must have the classes of ``rule``, unless that is
    None) or ``rules[key]``. Without, the tree's own Leaves are the templates.
    """
    leaves = _keyed_leaves(tree)
    if not leaves:
        msg = f"{what.split(':')[0]}: the target holds no Leaf (no trainable array)"
        raise TypeError(msg)
    problems: list[str] = []
    grouped = grouped_of(set(leaves), problems)
    arrays = _model_arrays(model) if model is not None else {}
    new: dict[str, Leaf] = {}
    for key, (path, leaf) in leaves.items():
        entries = grouped.get(key)
        if not entries:
            continue
        where = f"{key}{SEP}rule"
        if model is None:
            new[key] = leaf_from_entries(leaf, entries, key, problems=problems)
            continue
        given = leaf.rule.rule if isinstance(leaf.rule, _NoInit) else leaf.rule
        rule = rules.get(key) if rules is not None else None
        if rule is None and "rule" in entries:
            if given is None:
                try:
                    rule = rule_from_description(entries["rule"], where=where)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
            else:
                rule = _entry_rule(given, entries["rule"], where, problems)
        rule = given if rule is None else rule
        if rule is None:
            problems.append(f"{where}: missing, and no rule was given")
            continue
        x = arrays[path]
        xp = trainable_adapter(x)
        assert xp is not None, f"{where}: setup put a Leaf on an untrainable array"
        template = Leaf(rule, rule.init(x, xp))
        new[key] = leaf_from_entries(
            template, entries, key, problems=problems, rule=rule
        )
    if problems:
        raise CheckpointError(what, problems)
    for key, (_, leaf) in leaves.items():
        restored = new[key]
        leaf.rule, leaf.state, leaf.frozen = (
            restored.rule,
            restored.state,
            restored.frozen,
        )
    return tree


def _fresh_tree(rule: Any, model: Any) -> Any:
    """``setup``'s tree for ``model`` with stand-in leaves (no state made)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no trainable array: _restore says so
        return setup(_NoInit(rule), model)  # type: ignore[arg-type]


def _is_rule_and_model(target: Any) -> bool:
    return (
        isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], Rule)
    )


def load_state_dict(target: Any, sd: Mapping[str, Any]) -> Any:
    """Load a state dict into a state tree, or make a tree from one.

    Parameters
    ----------
    target
        A state tree (loaded in place), or ``(rule, model)``: a new tree for
        ``model``, like ``setup(rule, model)``, on the model's backend and device.
    sd
        What :func:`state_dict` returned (possibly on another backend).

    Returns
    -------
    tree
        The target tree (the same object), or the new tree. Rules and frozen
        flags are the state dict's, so a hyperparameter changed by
        :func:`adjust` is restored; their classes must be the target's.

    Raises
    ------
    CheckpointError
        Naming each missing, extra, mis-shaped or mis-typed entry and each rule
        of other classes. Nothing has changed then.
    TypeError
        If ``sd`` is not a mapping or the target holds no Leaf.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> model = {"w": np.ones(3, np.float32)}
    >>> tree = opt.setup(opt.Adam(), model)
    >>> tree, model = opt.update(tree, model, {"w": np.ones(3, np.float32)})
    >>> again = opt.load_state_dict((opt.Adam(), model), opt.state_dict(tree))
    >>> again["w"].state.beta_t == tree["w"].state.beta_t
    True
    """
    if not isinstance(sd, Mapping):
        msg = f"load_state_dict expects the mapping state_dict returns, got {type(sd).__name__}"
        raise TypeError(msg)

    def grouped_of(known: set[str], problems: list[str]) -> dict[str, dict[str, Any]]:
        return _group(sd, known, problems)

    if _is_rule_and_model(target):
        rule, model = target
        return _restore(
            _fresh_tree(rule, model),
            grouped_of,
            "load_state_dict: the state dict does not fit the model",
            model=model,
        )
    return _restore(
        target, grouped_of, "load_state_dict: the state dict does not fit the tree"
    )


# -- across backends in memory ------------------------------------------------------------


def _is_state_tree(obj: Any) -> bool:
    return bool(_tree_leaves(obj))


def _renew(
    like: Any,
    grouped_of: Callable[[set[str], list[str]], dict[str, dict[str, Any]]],
    what: str,
    rules: Mapping[str, Any] | None = None,
) -> Any:
    """A new tree shaped like the state tree ``like``, its Leaves the templates."""
    from agnosticopt._leaf import _map_leaves

    leaves = _keyed_leaves(like)
    problems: list[str] = []
    grouped = grouped_of(set(leaves), problems)
    new: dict[int, Leaf] = {}
    for key, (_, leaf) in leaves.items():
        entries = grouped.get(key)
        if entries:
            rule = rules.get(key) if rules is not None else None
            new[id(leaf)] = leaf_from_entries(
                leaf, entries, key, problems=problems, rule=rule
            )
    if problems:
        raise CheckpointError(what, problems)
    return _map_leaves(like, lambda leaf: new[id(leaf)])


def _into(
    like: Any,
    grouped_of: Callable[[set[str], list[str]], dict[str, dict[str, Any]]],
    what: str,
    rules: Mapping[str, Any] | None = None,
) -> Any:
    """A new tree on the backend of ``like`` (a model, or a state tree)."""
    if _is_state_tree(like):
        return _renew(like, grouped_of, f"{what} the tree", rules)
    tree = _fresh_tree(None, like)
    return _restore(tree, grouped_of, f"{what} the model", model=like, rules=rules)


def convert(tree: Any, *, like: Any) -> Any:
    """The state tree ``tree`` moved to the backend and device of ``like``.

    Parameters
    ----------
    tree
        A state tree, on any backend.
    like
        The model whose parameters the new tree is for (arrays of the target
        backend and device), or a state tree there (e.g. ``setup`` on it).

    Returns
    -------
    tree
        A new state tree: the same rules and frozen flags, the state arrays
        copied bit for bit onto the target, host scalars in the dtype the
        target's parameters give them. ``tree`` is not modified.

    Raises
    ------
    CheckpointError
        If ``tree`` does not fit ``like`` (naming each missing, extra,
        mis-shaped or mis-typed entry), e.g. a float32 state for float64
        parameters.

    Examples
    --------
    >>> import numpy as np, torch, agnosticopt as opt
    >>> tree = opt.setup(opt.Adam(), {"w": np.zeros(3, np.float32)})
    >>> moved = opt.convert(tree, like={"w": torch.zeros(3)})
    >>> type(moved["w"].state.m).__name__
    'Tensor'
    """
    source = _keyed_leaves(tree)
    if not source:
        msg = (
            "convert: the first argument holds no Leaf; pass a state tree made by setup"
        )
        raise TypeError(msg)
    raw = {key: leaf_entries(leaf, raw=True) for key, (_, leaf) in source.items()}
    rules = {key: leaf.rule for key, (_, leaf) in source.items()}

    def grouped_of(known: set[str], problems: list[str]) -> dict[str, dict[str, Any]]:
        flat = {
            f"{k}{SEP}{n}": v for k, entries in raw.items() for n, v in entries.items()
        }
        return _group(flat, known, problems)

    return _into(like, grouped_of, "convert: the state tree does not fit", rules)
