"""Recording a rule's step as a program of elementwise operations.

:class:`Recorder` has the methods of an adapter (``adapters/_base.py``), but its
"arrays" are :class:`Sym` symbols that carry only a dtype and a shape. Running
``rule.apply(state, x, dx, recorder)`` on symbols records the operations the
rule makes, in its order; host scalars handed to those operations become the
program's *parameters*. Rules branch only on host values (RAdam's ρ, AccumGrad's
counter, a ``None`` step), so the recorded structure depends only on the rule,
the dtypes and the host values of the state, and can be compiled once and run
with new parameter values at every step.

Every operation keeps the meaning it has in the numpy adapter, the reference:
``+ - * /`` and ``sqrt`` are single IEEE operations in the dtype of the array
operand (a host scalar is first rounded to that dtype, as numpy's weak scalar
promotion does); ``maximum``/``minimum`` are IEEE 754-2019 (NaN wins, ``+0 > -0``);
``sign`` gives ``+0`` for ``±0`` and keeps NaN; ``clip`` is ``maximum`` then
``minimum``. A lowering (``adapters/_numba.py``) must give each the same bits.

The recorder's operations are the ``recorded`` rows of the operation table
(:mod:`agnosticopt._ops`), under the same names. Whatever cannot be recorded
raises :class:`Untraceable`: reductions (ClipNorm's norm, ``xp.mean``), reading
an array value on the host, complex or unsupported dtypes, any other function of
the namespace. The caller then takes the plain path. A Python operator applied to
a symbol (``a * b``) also issues an :class:`~agnosticopt._ops.OperatorWarning`
naming the rule and the operator: it is not part of the exact vocabulary.

:func:`ops_used` records a rule in a lenient mode that goes on past whatever the
fast path cannot record, and reports every operation the rule uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from agnosticopt._ops import BY_OPERATOR, OPS, OperatorWarning
from agnosticopt._rule import Replace

__all__ = [
    "DTYPES",
    "Program",
    "Recorder",
    "RuleOps",
    "Sym",
    "Trace",
    "Untraceable",
    "ops_used",
    "trace",
]

#: Dtypes a program computes in (``bool`` only for comparison results).
DTYPES = frozenset({"float32", "float64"})


class Untraceable(Exception):  # noqa: N818  (a signal, not an error)
    """The step cannot be recorded; the caller takes the plain path."""


class OperatorUsed(Untraceable):
    """A Python operator met an array symbol (its warning already issued): any
    other recording of this step meets it too."""


class Sym:
    """A symbolic array: the result (or an input) of a recorded program.

    Converting a symbol to a host value (``bool``, ``float``, ``numpy.asarray``)
    raises :class:`Untraceable`: its value is not known while recording.
    """

    __slots__ = ("_recorder", "_shape", "dtype", "id")

    def __init__(
        self, recorder: Recorder, ident: int, dtype: str, shape: tuple[int, ...]
    ) -> None:
        self._recorder = recorder
        self.id = ident
        self.dtype = dtype
        self._shape = shape

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape; reading it makes the recording specific to this shape."""
        self._recorder.shape_used = True
        return self._shape

    @property
    def ndim(self) -> int:
        """The number of dimensions (see :attr:`shape`)."""
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Sym({self.id}, {self.dtype})"

    def _host(self, *args: Any) -> Any:
        msg = "a recorded array has no value on the host"
        raise Untraceable(msg)

    __array__ = __bool__ = __float__ = __int__ = __index__ = __len__ = __iter__ = _host
    __complex__ = __array_namespace__ = __dlpack__ = _host
    __hash__ = object.__hash__  # symbols are told apart by identity


def _python_operator(symbol: str) -> Callable[..., Any]:
    def method(self: Sym, *other: Any) -> Any:
        return self._recorder._operator(symbol, self, *other)

    method.__doc__ = f"The Python operator ``{symbol}``: recorded as a warning."
    return method


#: Python operators on arrays, by special method: not in the exact vocabulary.
_OPERATORS = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "floordiv": "//",
    "mod": "%",
    "pow": "**",
    "matmul": "@",
    "and": "&",
    "or": "|",
    "xor": "^",
    "lshift": "<<",
    "rshift": ">>",
}
for _name, _symbol in _OPERATORS.items():
    setattr(Sym, f"__{_name}__", _python_operator(_symbol))
    setattr(Sym, f"__r{_name}__", _python_operator(_symbol))
for _name, _symbol in {
    "neg": "-x",
    "pos": "+x",
    "abs": "abs",
    "invert": "~",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
}.items():
    setattr(Sym, f"__{_name}__", _python_operator(_symbol))


Operand = int  # >= 0: a symbol's id; < 0: parameter number -1 - operand


@dataclasses.dataclass(frozen=True)
class Program:
    """A recorded step, reduced to what its stores need, numbered canonically.

    Attributes
    ----------
    inputs
        Dtypes of the input arrays: the parameter ``x``, the gradient, then the
        state arrays in the order of :func:`flatten_state`. Input ``k`` is
        symbol ``k``.
    ops
        ``(name, dtype, *operands)``; op ``j`` defines symbol ``len(inputs) + j``.
        An operand ``>= 0`` is a symbol, ``< 0`` is parameter ``-1 - operand``.
    params
        The dtype of each parameter (the dtype of the operation using it).
    stores
        ``(input, symbol)``: after the step, input array ``input`` holds the
        value of ``symbol``; input 0 (the parameter) is stored last.
    """

    inputs: tuple[str, ...]
    ops: tuple[tuple[Any, ...], ...]
    params: tuple[str, ...]
    stores: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Trace:
    """One recording: the program, its parameter values and the new state.

    Attributes
    ----------
    program
        The structure (the key of a compiled kernel).
    values
        The parameter values, as numpy scalars of their dtypes.
    rebuild
        ``rebuild(arrays)`` makes the new state of a leaf whose state arrays
        (in :func:`flatten_state` order) are ``arrays``: the same arrays, holding
        the new values once the kernel has run, and the new host values.
    shape_used
        Whether the rule read a shape (then the recording holds for that shape).
    """

    program: Program
    values: tuple[Any, ...]
    rebuild: Callable[[list[Any]], Any]
    shape_used: bool


class Recorder:
    """An adapter whose arrays are :class:`Sym` symbols; it records every operation.

    Parameters
    ----------
    name
        The name of the adapter being stood in for (rules may print it).
    """

    fixes: tuple[str, ...] = ()

    #: The dtypes it records operations in.
    dtypes: frozenset[str] = DTYPES

    def __init__(self, name: str, rule: Any = None) -> None:
        self.name = name
        self.rule = rule
        self.ops: list[tuple[Any, ...]] = []
        self.values: list[Any] = []
        self.syms: list[Sym] = []
        self.shape_used = False
        #: The host program of :func:`record` (``None``: host values are concrete).
        self.host: HostProgram | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined here: an operation not recorded.
        if name.startswith("__"):
            raise AttributeError(name)
        msg = f"the recorder has no operation {name!r}"
        raise Untraceable(msg)

    def _operator(self, symbol: str, a: Sym, *other: Any) -> Any:
        """A Python operator applied to a symbol: warn, naming the rule; stop recording."""
        warnings.warn(
            OperatorWarning(_operator_message(self.rule, symbol, sys._getframe(2))),
            stacklevel=3,
        )
        msg = f"the Python operator {symbol} on an array"
        raise OperatorUsed(msg)

    def input(self, dtype: str, shape: tuple[int, ...]) -> Sym:
        """A new input symbol (call before recording any operation)."""
        if dtype not in self.dtypes:
            msg = f"dtype {dtype} is not compiled"
            raise Untraceable(msg)
        return self._sym(dtype, shape)

    # -- dtypes and shapes --------------------------------------------------------------
    def dtype_name(self, x: Any) -> str:
        """The dtype of symbol ``x``."""
        return self._check(x).dtype

    def dtype(self, name: str) -> Any:
        """The dtype called ``name`` (numpy's)."""
        return np.dtype(name)

    def is_trainable(self, x: Any) -> bool:
        """Recorded arrays are all floating point."""
        return self._check(x).dtype in self.dtypes

    def is_complex(self, x: Any) -> bool:
        """Recorded arrays are never complex."""
        self._check(x)
        return False

    def scalar_type(self, x: Any) -> type:
        """The numpy scalar type of the dtype of ``x``."""
        return np.dtype(self._check(x).dtype).type

    def shape(self, x: Any) -> tuple[int, ...]:
        """The shape of ``x``; the recording then holds for this shape only."""
        return self._check(x).shape

    def size(self, x: Any) -> int:
        """The number of elements of ``x`` (see :meth:`shape`)."""
        return int(np.prod(self.shape(x)))

    def astype(self, x: Any, name: str) -> Sym:
        """``x`` converted to dtype ``name`` (float32/float64), rounded once."""
        x = self._check(x)
        if name not in self.dtypes:
            msg = f"conversion to {name} is not compiled"
            raise Untraceable(msg)
        return self._op("astype", name, x.id, shape=x._shape)

    # -- creation -------------------------------------------------------------------------
    def zeros_like(self, x: Any) -> Sym:
        """``+0`` of the dtype of ``x``."""
        x = self._check(x)
        return self._op("zeros_like", x.dtype, shape=x._shape)

    def real_zeros_like(self, x: Any) -> Sym:
        """``+0`` of the (real) dtype of ``x``."""
        return self.zeros_like(x)

    def full_like(self, x: Any, value: Any, *, real: bool = False) -> Sym:
        """``value`` rounded to the dtype of ``x``, everywhere."""
        x = self._check(x)
        return self._op(
            "full_like", x.dtype, self._param(value, x.dtype), shape=x._shape
        )

    def copy(self, x: Any) -> Sym:
        """The same values (a symbol is never written, so no copy is needed)."""
        return self._check(x)

    # -- elementwise operations ------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Sym:
        """``a + b``."""
        return self._binary("add", a, b)

    def subtract(self, a: Any, b: Any) -> Sym:
        """``a - b``."""
        return self._binary("subtract", a, b)

    def multiply(self, a: Any, b: Any) -> Sym:
        """``a * b``."""
        return self._binary("multiply", a, b)

    def divide(self, a: Any, b: Any) -> Sym:
        """``a / b`` (a true division)."""
        return self._binary("divide", a, b)

    def negative(self, a: Any) -> Sym:
        """``-a``."""
        return self._unary("negative", a)

    def sqrt(self, a: Any) -> Sym:
        """Correctly rounded square root."""
        return self._unary("sqrt", a)

    def abs(self, a: Any) -> Sym:
        """``|a|``."""
        return self._unary("abs", a)

    def abs2(self, a: Any) -> Sym:
        """``a * a`` (recorded arrays are real)."""
        return self._binary("multiply", a, a)

    def sign(self, a: Any) -> Sym:
        """-1, +0 or 1; NaN stays NaN (numpy's ``sign``)."""
        return self._unary("sign", a)

    def maximum(self, a: Any, b: Any) -> Sym:
        """IEEE 754-2019 maximum: NaN wins, ``+0 > -0``."""
        return self._binary("maximum", a, b)

    def minimum(self, a: Any, b: Any) -> Sym:
        """IEEE 754-2019 minimum: NaN wins, ``-0 < +0``."""
        return self._binary("minimum", a, b)

    def clip(self, a: Any, lo: Any, hi: Any) -> Sym:
        """``minimum(maximum(a, lo), hi)``, as the base adapter."""
        return self.minimum(self.maximum(a, lo), hi)

    def where(self, cond: Any, a: Any, b: Any) -> Sym:
        """``a`` where ``cond`` else ``b``."""
        cond = self._check(cond)
        if cond.dtype != "bool":
            msg = "where needs a boolean condition"
            raise Untraceable(msg)
        dtype = _common_dtype(a, b, self.dtypes)
        return self._op(
            "where",
            dtype,
            cond.id,
            self._operand(a, dtype),
            self._operand(b, dtype),
            shape=cond._shape,
        )

    def greater(self, a: Any, b: Any) -> Sym:
        """``a > b``."""
        return self._binary("greater", a, b, result="bool")

    def less(self, a: Any, b: Any) -> Sym:
        """``a < b``."""
        return self._binary("less", a, b, result="bool")

    def not_equal(self, a: Any, b: Any) -> Sym:
        """``a != b``."""
        return self._binary("not_equal", a, b, result="bool")

    def isfinite(self, a: Any) -> Sym:
        """Elementwise finiteness."""
        a = self._check(a)
        return self._op("isfinite", "bool", a.id, shape=a._shape)

    def writeable(self, x: Any) -> bool:
        """Symbols are never written by the rules."""
        return False

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Host scalar warnings are silenced by the caller."""
        yield

    # -- recording ----------------------------------------------------------------------------
    def _sym(self, dtype: str, shape: tuple[int, ...]) -> Sym:
        sym = Sym(self, len(self.syms), dtype, shape)
        self.syms.append(sym)
        return sym

    def _check(self, x: Any) -> Sym:
        if not isinstance(x, Sym) or x._recorder is not self:
            msg = f"not a recorded array: {type(x).__name__}"
            raise Untraceable(msg)
        return x

    def _op(
        self, name: str, dtype: str, *operands: Operand, shape: tuple[int, ...]
    ) -> Sym:
        self.ops.append((name, dtype, *operands))
        return self._sym(dtype, shape)

    def _param(self, value: Any, dtype: str) -> Operand:
        """A host scalar used in ``dtype``: rounded to it, as weak promotion does."""
        if isinstance(value, HostSym) and self.host is not None:
            if isinstance(value.value, (bool, np.bool_)) or not isinstance(
                value.value, (int, float, np.integer, np.floating)
            ):
                msg = f"host value of type {type(value.value).__name__} in an array operation"
                raise Untraceable(msg)
            rounded = self.host.cast(value, dtype)
            self.values.append(rounded)
            return -len(self.values)
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            msg = f"host value of type {type(value).__name__} in an array operation"
            raise Untraceable(msg)
        self.values.append(_SCALAR_TYPES[dtype](value))
        return -len(self.values)

    def _operand(self, value: Any, dtype: str) -> Operand:
        if isinstance(value, Sym):
            if self._check(value).dtype != dtype:
                msg = "operands of different dtypes"
                raise Untraceable(msg)
            return value.id
        return self._param(value, dtype)

    def _unary(self, name: str, a: Any) -> Sym:
        a = self._check(a)
        if a.dtype not in self.dtypes:
            msg = f"{name} of a {a.dtype} array"
            raise Untraceable(msg)
        return self._op(name, a.dtype, a.id, shape=a._shape)

    def _binary(self, name: str, a: Any, b: Any, result: str | None = None) -> Sym:
        if type(a) is Sym and type(b) is Sym and a.dtype == b.dtype in self.dtypes:
            if a._recorder is not self or b._recorder is not self:
                msg = "not a recorded array"
                raise Untraceable(msg)
            return self._op(name, result or a.dtype, a.id, b.id, shape=a._shape)
        dtype = _common_dtype(a, b, self.dtypes)
        shape = (a if isinstance(a, Sym) else b)._shape
        return self._op(
            name,
            result or dtype,
            self._operand(a, dtype),
            self._operand(b, dtype),
            shape=shape,
        )


def _common_dtype(a: Any, b: Any, compiled: frozenset[str]) -> str:
    """The dtype of an operation on ``a`` and ``b``: that of its symbol(s)."""
    dtypes = {s.dtype for s in (a, b) if isinstance(s, Sym)}
    if len(dtypes) != 1:
        msg = (
            "an operation needs one array dtype"
            if dtypes
            else "an operation on host values"
        )
        raise Untraceable(msg)
    (dtype,) = dtypes
    if dtype not in compiled:
        msg = f"arithmetic on a {dtype} array"
        raise Untraceable(msg)
    return dtype


# -- state trees --------------------------------------------------------------------------------


def flatten_state(
    state: Any,
    array_type: type | tuple[type, ...],
    arrays: list[Any],
    memo: dict[int, Any] | None = None,
) -> Any:
    """Append the arrays of ``state`` to ``arrays``; return a hashable signature.

    The signature describes the containers (tuples, namedtuples, lists), where
    the arrays (instances of ``array_type``) are, and every host value exactly
    (``-0.0`` differs from ``0.0``, NaNs from numbers), so that two states with
    equal signatures give the same recording. Raises :class:`Untraceable` for a
    state it cannot describe.

    ``memo`` (``id`` -> signature) remembers tuples without arrays, such as the
    beta powers that the leaves of one group share, while they are all alive.
    """
    kind = type(state)
    if kind is tuple or (isinstance(state, tuple) and hasattr(kind, "_fields")):
        if memo is not None:
            found = memo.get(id(state))
            if found is not None:
                return found
        count = len(arrays)
        signature = (kind, *[flatten_state(s, array_type, arrays, memo) for s in state])
        if memo is not None and len(arrays) == count:
            memo[id(state)] = signature
        return signature
    if kind is list:
        return (kind, *[flatten_state(s, array_type, arrays, memo) for s in state])
    if isinstance(state, array_type):
        arrays.append(state)
        return _ARRAY
    if kind in _HOST_SCALARS:
        return (kind, state.tobytes())
    if state is None or kind is int or kind is str:
        return state
    if kind is bool:
        return (bool, state)
    if kind is float:
        return (float, state.hex())
    if isinstance(state, (np.floating, np.integer)):
        return (kind, state.tobytes())
    msg = f"a state holding a {kind.__name__}"
    raise Untraceable(msg)


_SCALAR_TYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}

_HOST_SCALARS = frozenset({np.float32, np.float64, np.float16, np.int64, np.int32})
_ARRAY = ("<array>",)


def _builder(state: Any, counter: list[int]) -> tuple[bool, Callable[[list[Any]], Any]]:
    """``(has_arrays, fn)``: ``fn(arrays)`` rebuilds ``state`` with its ``k``-th
    symbol (depth first) replaced by ``arrays[k]``; subtrees without symbols are
    shared as they are (lists are copied)."""
    if isinstance(state, Sym):
        k = counter[0]
        counter[0] += 1
        return True, lambda arrays: arrays[k]
    kind = type(state)
    if isinstance(state, (tuple, list)):
        parts = [_builder(s, counter) for s in state]
        if not any(has for has, _ in parts):
            if kind is list:
                return False, lambda arrays: list(state)
            return False, lambda arrays: state
        fns = [fn for _, fn in parts]
        if hasattr(kind, "_fields"):
            return True, lambda arrays: kind(*[fn(arrays) for fn in fns])
        return True, lambda arrays: kind([fn(arrays) for fn in fns])
    return False, lambda arrays: state


def _output_syms(state: Any, found: list[Sym]) -> None:
    if isinstance(state, Sym):
        found.append(state)
    elif isinstance(state, (tuple, list)):
        for s in state:
            _output_syms(s, found)
    elif isinstance(state, Replace):  # pragma: no cover - never a state
        msg = "a state holding a Replace"
        raise Untraceable(msg)


def trace(
    rule: Any,
    state: Any,
    arrays: list[Any],
    shape: tuple[int, ...],
    dtype: str,
    dtypes: tuple[str, ...],
    name: str,
) -> Trace:
    """Record ``rule.apply`` for a leaf; raise :class:`Untraceable` if it cannot be.

    Parameters
    ----------
    rule, state
        The leaf's rule and state.
    arrays
        The state arrays of ``state`` in :func:`flatten_state` order.
    shape, dtype
        The parameter's shape and dtype (the gradient's too).
    dtypes
        The dtypes of ``arrays``.
    name
        The adapter's name.
    """
    rec = Recorder(name, rule)
    sx = rec.input(dtype, shape)
    sg = rec.input(dtype, shape)
    inputs = [rec.input(d, shape) for d in dtypes]
    by_array = {id(a): s for a, s in zip(arrays, inputs, strict=True)}
    sym_state = _substitute(state, by_array)
    new_state, step = rule.apply(sym_state, sx, sg, rec)
    stores = _stores(rec, new_state, step, sx, inputs)
    _, rebuild = _builder(new_state, [0])
    program, values = _reduce(rec, len(inputs) + 2, stores)
    return Trace(program, values, rebuild, rec.shape_used)


def _stores(
    rec: Recorder, new_state: Any, step: Any, sx: Sym, inputs: list[Sym]
) -> list[tuple[int, int]]:
    """The stores of a recorded step: ``(input, symbol)``, the parameter's last."""
    outs: list[Sym] = []
    _output_syms(new_state, outs)
    if len(outs) != len(inputs):
        msg = "the new state has other arrays than the old one"
        raise Untraceable(msg)
    stores: list[tuple[int, int]] = []
    for k, (new, old) in enumerate(zip(outs, inputs, strict=True)):
        rec._check(new)
        if new.dtype != old.dtype:
            msg = "a state array changes dtype"
            raise Untraceable(msg)
        if new.id != old.id:
            stores.append((2 + k, new.id))
    if step is not None:
        replace = isinstance(step, Replace)
        value = rec._check(step.value if replace else step)
        if value.dtype != sx.dtype:
            msg = "a step of another dtype than the parameter"
            raise Untraceable(msg)
        stores.append((0, value.id if replace else rec.subtract(sx, value).id))
    return stores


def _substitute(state: Any, by_array: dict[int, Sym]) -> Any:
    sym = by_array.get(id(state))
    if sym is not None:
        return sym
    if isinstance(state, (tuple, list)):
        parts = [_substitute(s, by_array) for s in state]
        kind = type(state)
        return kind(*parts) if hasattr(kind, "_fields") else kind(parts)
    return state


#: Raw recordings (operations, input dtypes, stores) -> (program, parameters kept).
_reduced: dict[Any, tuple[Program, tuple[int, ...]]] = {}


def _reduce(
    rec: Recorder, n_inputs: int, stores: list[tuple[int, int]]
) -> tuple[Program, tuple[Any, ...]]:
    """Keep the operations the stores need; renumber symbols and parameters.

    The result depends only on the recording's structure, which is the same at
    every step of a rule: it is cached, and only the parameter values are new.
    """
    inputs = tuple(s.dtype for s in rec.syms[:n_inputs])
    key = (inputs, tuple(rec.ops), tuple(stores))
    found = _reduced.get(key)
    if found is None:
        found = _reduced[key] = _reduce_structure(rec, n_inputs, inputs, stores)
        if len(_reduced) > 4096:  # rules that record a new structure at every step
            _reduced.clear()
    program, kept = found
    return program, tuple(rec.values[k] for k in kept)


def _reduce_structure(
    rec: Recorder, n_inputs: int, inputs: tuple[str, ...], stores: list[tuple[int, int]]
) -> tuple[Program, tuple[int, ...]]:
    needed = [False] * len(rec.syms)
    for _, s in stores:
        needed[s] = True
    for j in range(len(rec.ops) - 1, -1, -1):
        if needed[n_inputs + j]:
            for operand in rec.ops[j][2:]:
                if operand >= 0:
                    needed[operand] = True
    renum = {k: k for k in range(n_inputs)}
    ops: list[tuple[Any, ...]] = []
    params: list[str] = []
    kept: list[int] = []
    for j, (name, dtype, *operands) in enumerate(rec.ops):
        if not needed[n_inputs + j]:
            continue
        new_operands: list[int] = []
        for operand in operands:
            if operand >= 0:
                new_operands.append(renum[operand])
            else:
                params.append(_value_of(rec.values[-1 - operand]).dtype.name)
                kept.append(-1 - operand)
                new_operands.append(-len(kept))
        renum[n_inputs + j] = n_inputs + len(ops)
        ops.append((name, dtype, *new_operands))
    program = Program(
        inputs, tuple(ops), tuple(params), tuple((a, renum[s]) for a, s in stores)
    )
    return program, tuple(kept)


def _value_of(value: Any) -> Any:
    """The value now of a parameter (a :class:`HostSym` holds its value)."""
    return value.value if isinstance(value, HostSym) else value


# -- Python operators ---------------------------------------------------------------------------


def _operator_message(rule: Any, symbol: str, frame: Any) -> str:
    """The warning for ``symbol`` applied to an array in ``frame`` (the rule's code)."""
    code = frame.f_code
    where = f"{getattr(code, 'co_qualname', code.co_name)} ({code.co_filename}:{frame.f_lineno})"
    op = BY_OPERATOR.get(symbol)
    if symbol.endswith("x"):
        written = f"{symbol[:-1]}a"
    elif symbol == "abs":
        written = "abs(a)"
    else:
        written = f"a {symbol} b"
    instead = (
        f"write xp.{op.name}({', '.join('ab'[: op.arity])}) instead"
        if op is not None and op.exact
        else "it has no exact counterpart in agnosticopt._ops.OPS"
    )
    who = "a rule" if rule is None else f"rule {type(rule).__name__}"
    return (
        f"{who}: {where} applies the Python operator `{written}` to an array; {instead}. "
        "Python operators on arrays are not guaranteed bit-identical across backends, "
        "and the step leaves the compiled fast path."
    )


# -- surveying the operations of a rule -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RuleOps:
    """The operations a rule's step uses (see :func:`ops_used`).

    Attributes
    ----------
    rule
        The type name of the rule.
    exact
        The operations of the table used that are bit-identical on every backend.
    inexact
        The other functions used (``"pow"``, ``"mean"``, ``"linalg.vector_norm"``):
        identical only if the backends agree.
    operators
        The Python operators applied to arrays (``"*"``, ``"/"``), not in the
        exact vocabulary either.
    stopped
        Why the survey stopped before the end of the step (a value read on the
        host, an exception), or ``None``: then the lists are complete.
    """

    rule: str
    exact: tuple[str, ...]
    inexact: tuple[str, ...]
    operators: tuple[str, ...]
    stopped: str | None

    @property
    def identical(self) -> bool:
        """Whether every operation seen is guaranteed bit-identical on every backend."""
        return not self.inexact and not self.operators

    def __str__(self) -> str:
        parts = []
        if self.inexact:
            names = ", ".join(f"xp.{n}" for n in self.inexact)
            parts.append(f"uses {names} (identical only if the backends agree)")
        if self.operators:
            names = ", ".join(f"`{o}`" for o in self.operators)
            parts.append(
                f"applies the Python operators {names} to arrays "
                "(not guaranteed bit-identical)"
            )
        if not parts:
            parts.append("uses only bit-identical operations")
        if self.stopped is not None:
            parts.append(f"survey stopped early: {self.stopped}")
        return f"{self.rule}: " + "; ".join(parts)


class _Foreign:
    """A function (or submodule) of the namespace that the recorder does not know."""

    def __init__(self, recorder: _Surveyor, path: str) -> None:
        self._recorder = recorder
        self._path = path

    def __getattr__(self, name: str) -> _Foreign:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Foreign(self._recorder, f"{self._path}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Sym:
        return self._recorder._foreign(self._path, args, kwargs)


class _Surveyor(Recorder):
    """A recorder that goes on past what the fast path cannot record, noting it."""

    dtypes = frozenset({"float16", "float32", "float64"})

    def __init__(self, name: str, rule: Any) -> None:
        super().__init__(name, rule)
        self.foreign: list[str] = []
        self.operators: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        from agnosticopt.adapters._base import Adapter  # no backend library

        if name not in OPS and hasattr(Adapter, name):
            msg = (
                f"the rule calls xp.{name}, a service of the adapter, not an operation"
            )
            raise Untraceable(msg)
        return _Foreign(self, "xp" if name == "xp" else name)

    def _operator(self, symbol: str, a: Sym, *other: Any) -> Any:
        self.operators.append(symbol)
        result = "bool" if symbol in ("<", "<=", ">", ">=", "==", "!=") else a.dtype
        return self._sym(result, a._shape)

    def _foreign(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sym:
        self.foreign.append(path.removeprefix("xp."))
        operands = [*args, *kwargs.values()]
        syms = [a for a in operands if isinstance(a, Sym)]
        syms += [
            a
            for seq in operands
            if isinstance(seq, (list, tuple))
            for a in seq
            if isinstance(a, Sym)
        ]
        first = syms[0] if syms else self.syms[0]
        return self._sym(first.dtype, first._shape)


def ops_used(
    rule: Any, dtype: str = "float32", shape: tuple[int, ...] = (3, 4)
) -> RuleOps:
    """The operations one step of ``rule`` uses, for a parameter of ``dtype``, ``shape``.

    The state comes from ``rule.init`` on a numpy array; the step is then
    recorded on symbols in a lenient mode that notes, and goes on past, every
    function outside the recorded table (``xp.mean``...) and every Python
    operator applied to an array. It tells a rule author which operations the
    library cannot guarantee bit-identical on every backend.

    Parameters
    ----------
    rule
        A rule (an object with ``init`` and ``apply``).
    dtype
        The parameter dtype: ``"float16"``, ``"float32"`` or ``"float64"``.
    shape
        The parameter shape.

    Examples
    --------
    >>> import agnosticopt as opt
    >>> print(opt.ops_used(opt.Adam()))
    Adam: uses only bit-identical operations
    """
    from agnosticopt._xp import adapter_for

    x = np.zeros(shape, dtype=dtype)
    state = rule.init(x, adapter_for(x))
    arrays: list[Any] = []
    rec = _Surveyor("numpy", rule)
    stopped: str | None = None
    try:
        flatten_state(state, np.ndarray, arrays)
        sx, sg = rec.input(dtype, shape), rec.input(dtype, shape)
        by_array = {id(a): rec.input(a.dtype.name, a.shape) for a in arrays}
        rule.apply(_substitute(state, by_array), sx, sg, rec)
    except Exception as exc:  # noqa: BLE001  (reported: the survey is partial)
        stopped = str(exc) or type(exc).__name__
    used = {op[0] for op in rec.ops} | set(rec.foreign)
    exact = {n for n in used if n in OPS and OPS[n].exact}
    return RuleOps(
        type(rule).__name__,
        tuple(sorted(exact)),
        tuple(sorted(used - exact)),
        tuple(sorted(set(rec.operators))),
        stopped,
    )


# -- recording once: host values as symbols --------------------------------------------------------


class HostSym:
    """A host scalar of the state (Adam's ``beta_t``, a step counter) while recording.

    It carries its value at the recording and its register in the host program:
    every Python operator applied to it (``1 - bt``, ``bt * b``, ``t + 1``,
    ``rho > 5``) is computed on the value and written into the program, which a
    later step replays on new values with the same operators (so the same bits
    as the plain path's host arithmetic). Truth tests (``if rho > 5``) become
    guards: the replay gives up where one differs. numpy functions of host
    values (``np.sqrt(h)``; numpy scalars' operators go through them too) are
    recorded as calls. Anything else (``float(h)``, ``math.sqrt(h)``, an
    attribute) raises, and the step is recorded with concrete values instead.
    """

    __slots__ = ("_recorder", "ref", "value")
    __hash__ = object.__hash__

    def __array_ufunc__(
        self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any
    ) -> Any:
        """A numpy function of host values (``np.sqrt(h)``, ``np.float32(1) - h``)."""
        if method != "__call__" or kwargs or any(isinstance(a, Sym) for a in inputs):
            msg = f"numpy's {ufunc.__name__}.{method} on a host value (not recorded)"
            raise Untraceable(msg)
        return self._recorder.ufunc(ufunc, inputs)

    def __init__(self, recorder: HostProgram, ref: int, value: Any) -> None:
        self._recorder = recorder
        self.ref = ref
        self.value = value

    def __repr__(self) -> str:
        return f"HostSym(r{self.ref}={self.value!r})"

    def __bool__(self) -> bool:
        return self._recorder.guard(self)

    def _concrete(self, *args: Any) -> Any:
        msg = "a host value of the state read as a number (not recorded)"
        raise Untraceable(msg)

    __float__ = __int__ = __index__ = __complex__ = __round__ = _concrete
    __trunc__ = __floor__ = __ceil__ = __array__ = __len__ = __iter__ = _concrete


def _host_binary(symbol: str, *, reflected: bool) -> Callable[..., Any]:
    def method(self: HostSym, other: Any) -> Any:
        if isinstance(other, Sym):  # an array: the array's (warning) operator
            return NotImplemented
        rec = self._recorder
        return (
            rec.binary(symbol, other, self)
            if reflected
            else rec.binary(symbol, self, other)
        )

    return method


def _host_unary(symbol: str) -> Callable[..., Any]:
    def method(self: HostSym) -> Any:
        return self._recorder.unary(symbol, self)

    return method


_HOST_BINARY = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "floordiv": "//",
    "mod": "%",
    "pow": "**",
}
for _name, _symbol in _HOST_BINARY.items():
    setattr(HostSym, f"__{_name}__", _host_binary(_symbol, reflected=False))
    setattr(HostSym, f"__r{_name}__", _host_binary(_symbol, reflected=True))
for _name, _symbol in {
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
}.items():
    setattr(HostSym, f"__{_name}__", _host_binary(_symbol, reflected=False))
for _name, _symbol in {"neg": "-", "pos": "+", "abs": "abs"}.items():
    setattr(HostSym, f"__{_name}__", _host_unary(_symbol))

_HOST_EVAL: dict[str, Callable[..., Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "**": lambda a, b: a**b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


class HostProgram:
    """The host arithmetic of one recorded step, as lines of Python over registers.

    Register ``r{k}`` is input ``k`` (a host value of the state) or the result of
    an operation; constants (hyperparameters, Python numbers) are named ``c{k}``.
    """

    def __init__(self) -> None:
        self.n_inputs = 0
        self.registers = 0
        self.lines: list[str] = []
        self.constants: list[Any] = []

    def input(self, value: Any) -> HostSym:
        """A new input register holding ``value`` (before any operation)."""
        self.n_inputs += 1
        return self._new(value)

    def _new(self, value: Any) -> HostSym:
        sym = HostSym(self, self.registers, value)
        self.registers += 1
        return sym

    def operand(self, value: Any) -> tuple[str, Any]:
        """The name of ``value`` in the program, and its value now."""
        if isinstance(value, HostSym):
            if value._recorder is not self:
                msg = "a host value of another recording"
                raise Untraceable(msg)
            return f"r{value.ref}", value.value
        self.constants.append(value)
        return f"c{len(self.constants) - 1}", value

    def binary(self, symbol: str, a: Any, b: Any) -> HostSym:
        """``a symbol b``, computed now and recorded."""
        (na, va), (nb, vb) = self.operand(a), self.operand(b)
        result = _HOST_EVAL[symbol](va, vb)
        if result is NotImplemented:  # pragma: no cover - never from a lambda
            raise Untraceable(symbol)
        out = self._new(result)
        self.lines.append(f"r{out.ref} = {na} {symbol} {nb}")
        return out

    def ufunc(self, ufunc: Any, inputs: tuple[Any, ...]) -> HostSym:
        """``ufunc(*inputs)``, computed now and recorded."""
        named = [self.operand(a) for a in inputs]
        result = ufunc(*[v for _, v in named])
        if not isinstance(result, (np.generic, int, float)):
            msg = f"numpy's {ufunc.__name__} of host values gives a {type(result).__name__}"
            raise Untraceable(msg)
        name, _ = self.operand(ufunc)
        out = self._new(result)
        self.lines.append(f"r{out.ref} = {name}({', '.join(n for n, _ in named)})")
        return out

    def unary(self, symbol: str, a: HostSym) -> HostSym:
        """``-a``, ``+a`` or ``abs(a)``, computed now and recorded."""
        na, va = self.operand(a)
        result = abs(va) if symbol == "abs" else (-va if symbol == "-" else +va)
        out = self._new(result)
        expr = f"abs({na})" if symbol == "abs" else f"{symbol}{na}"
        self.lines.append(f"r{out.ref} = {expr}")
        return out

    def cast(self, a: HostSym, dtype: str) -> HostSym:
        """``a`` rounded to ``dtype`` (a parameter of an array operation)."""
        na, va = self.operand(a)
        out = self._new(_SCALAR_TYPES[dtype](va))
        self.lines.append(f"r{out.ref} = {dtype}({na})")
        return out

    def guard(self, a: HostSym) -> bool:
        """``bool(a)`` now; the replay gives up where it differs."""
        value = bool(a.value)
        test = f"not r{a.ref}" if value else f"r{a.ref}"
        self.lines.append(f"if {test}:\n        return None")
        return value

    def compile(self, results: list[str]) -> Callable[..., Any]:
        """``f(*inputs)``: ``None`` where a guard differs, else the tuple ``results``."""
        args = ", ".join(f"r{k}" for k in range(self.n_inputs))
        body = [f"    {line}" for line in self.lines]
        body.append(f"    return ({''.join(r + ', ' for r in results)})")
        text = f"def host({args}):\n" + "\n".join(body) + "\n"
        namespace: dict[str, Any] = {f"c{k}": c for k, c in enumerate(self.constants)}
        namespace.update(_SCALAR_TYPES)
        exec(compile(text, "<agnosticopt host program>", "exec"), namespace)  # noqa: S102
        host: Callable[..., Any] = namespace["host"]
        return host


def split_state(
    state: Any, array_type: type | tuple[type, ...], arrays: list[Any], hosts: list[Any]
) -> Any:
    """Append the arrays and the host values of ``state``; return its structure.

    The structure (a hashable signature) describes the containers, where the
    arrays are and the type of every host value, but not the values: the host
    values (numpy scalars, Python ints and floats) are appended to ``hosts``, in
    the order of :func:`record`'s inputs. ``None``, strings and bools are part of
    the structure. Raises :class:`Untraceable` for anything else (lists too: a
    list can change in place between steps).
    """
    kind = type(state)
    if kind is tuple or (isinstance(state, tuple) and hasattr(kind, "_fields")):
        return (kind, *[split_state(s, array_type, arrays, hosts) for s in state])
    if isinstance(state, array_type):
        arrays.append(state)
        return _ARRAY
    if kind in _HOST_SCALARS or kind is int or kind is float:
        hosts.append(state)
        return kind
    if state is None or kind is str:
        return state
    if kind is bool:
        return (bool, state)
    msg = f"a state holding a {kind.__name__}"
    raise Untraceable(msg)


@dataclasses.dataclass(frozen=True, eq=False)
class Recording:
    """A step recorded once, for every value of the state's host scalars.

    Attributes
    ----------
    program
        The array program (the key of a compiled kernel).
    host
        ``host(*hosts)`` with the state's host values (:func:`split_state`
        order): ``None`` when a guard of the recording differs, else
        ``(values, shared)``: the program's parameter values and the parts of
        the new state that hold no array, which every leaf of a group shares.
    rebuild
        ``rebuild(arrays, shared)``: the new state of a leaf whose state arrays
        are ``arrays``.
    shape_used
        Whether the rule read a shape (then the recording holds for that shape).
    rebuild_all
        ``rebuild_all(arrays_of_each, shared)``: the list of ``rebuild`` of each
        leaf's arrays, in one call (a kept plan's new states).
    """

    program: Program
    host: Callable[..., Any]
    rebuild: Callable[[list[Any], Any], Any]
    shape_used: bool
    rebuild_all: Callable[[list[list[Any]], Any], list[Any]]


def _host_sub(state: Any, by_array: dict[int, Sym], host: HostProgram) -> Any:
    sym = by_array.get(id(state))
    if sym is not None:
        return sym
    kind = type(state)
    if isinstance(state, tuple):
        parts = [_host_sub(s, by_array, host) for s in state]
        return kind(*parts) if hasattr(kind, "_fields") else kind(parts)
    if kind in _HOST_SCALARS or kind is int or kind is float:
        return host.input(state)
    if isinstance(state, list):
        msg = "a state holding a list"
        raise Untraceable(msg)
    return state


class _Rebuild:
    """Writes the source of a new state's rebuilding function."""

    def __init__(self, host: HostProgram) -> None:
        self.host = host
        self.arrays = 0
        self.shared: list[str] = []  # host expressions of the array-free subtrees
        self.kinds: list[Any] = []

    def expr(self, state: Any) -> tuple[bool, str]:
        """``(has_arrays, expression)``: ``state`` over ``a`` (its arrays) and ``s``
        (its array-free parts, host expressions computed once per group)."""
        if isinstance(state, Sym):
            self.arrays += 1
            return True, f"a[{self.arrays - 1}]"
        if isinstance(state, HostSym):
            return False, self.host.operand(state)[0]
        kind = type(state)
        if isinstance(state, tuple):
            parts = [self.expr(s) for s in state]
            if not any(has for has, _ in parts):
                return False, self._tuple(kind, [e for _, e in parts])
            exprs = [e if has else self._share(e) for has, e in parts]
            return True, self._tuple(kind, exprs)
        if isinstance(state, list):
            msg = "a new state holding a list"
            raise Untraceable(msg)
        return False, self.host.operand(state)[0]  # a constant, shared as it is

    def _share(self, expr: str) -> str:
        self.shared.append(expr)
        return f"s[{len(self.shared) - 1}]"

    def _tuple(self, kind: Any, exprs: list[str]) -> str:
        inner = "".join(e + ", " for e in exprs)
        if kind is tuple:
            return f"({inner})"
        self.kinds.append(kind)
        if _plain_namedtuple(kind):  # its __new__ without its Python frame
            return f"_new(K{len(self.kinds) - 1}, ({inner}))"
        return f"K{len(self.kinds) - 1}({inner})"


def _plain_namedtuple(kind: Any) -> bool:
    """Whether ``kind(*fields)`` is ``tuple.__new__(kind, fields)``: a namedtuple
    class with the ``__new__`` that :func:`collections.namedtuple` wrote, no
    ``__init__``, and a metaclass that calls them as ``type`` does."""
    new = getattr(kind, "__new__", None)
    return (
        hasattr(kind, "_fields")
        and getattr(new, "__globals__", {}).get("_tuple_new") is tuple.__new__
        and kind.__init__ is tuple.__init__
        and type(kind).__call__ is type.__call__
    )


def record(
    rule: Any,
    state: Any,
    arrays: list[Any],
    shape: tuple[int, ...],
    dtype: str,
    dtypes: tuple[str, ...],
    name: str,
) -> Recording:
    """Record ``rule.apply`` once for every value of the state's host scalars.

    As :func:`trace`, but the state's host values are :class:`HostSym` inputs:
    the result holds for every state of the same structure (:func:`split_state`)
    while the recorded guards hold. The recording is checked against
    :func:`trace` at this state (the same program, parameter values and new
    host values, bit for bit); a rule whose host code the symbols cannot follow
    (one that tests a host value's type, say) raises :class:`Untraceable`.
    """
    host = HostProgram()
    rec = Recorder(name, rule)
    sx = rec.input(dtype, shape)
    sg = rec.input(dtype, shape)
    inputs = [rec.input(d, shape) for d in dtypes]
    by_array = {id(a): s for a, s in zip(arrays, inputs, strict=True)}
    rec.host = host
    new_state, step = rule.apply(_host_sub(state, by_array, host), sx, sg, rec)
    stores = _stores(rec, new_state, step, sx, inputs)
    program, kept = _reduce_structure(
        rec,
        len(inputs) + 2,
        tuple(s.dtype for s in rec.syms[: len(inputs) + 2]),
        stores,
    )
    params = [host.operand(rec.values[k])[0] for k in kept]
    build = _Rebuild(host)
    has_arrays, expr = build.expr(new_state)
    if not has_arrays:
        expr = build._share(expr)
    fn = host.compile(
        [
            f"({''.join(p + ', ' for p in params)})",
            f"({''.join(s + ', ' for s in build.shared)})",
        ]
    )
    namespace: dict[str, Any] = {f"K{k}": kind for k, kind in enumerate(build.kinds)}
    namespace["_new"] = tuple.__new__
    rebuild = eval(f"lambda a, s: {expr}", namespace)
    rebuild_all = eval(f"lambda arrays, s: [{expr} for a in arrays]", namespace)
    recording = Recording(program, fn, rebuild, rec.shape_used, rebuild_all)
    _check_recording(recording, rule, state, arrays, shape, dtype, dtypes, name)
    return recording


def _check_recording(
    recording: Recording,
    rule: Any,
    state: Any,
    arrays: list[Any],
    shape: tuple[int, ...],
    dtype: str,
    dtypes: tuple[str, ...],
    name: str,
) -> None:
    """Raise :class:`Untraceable` unless ``recording`` replays :func:`trace` at ``state``."""
    concrete = trace(rule, state, arrays, shape, dtype, dtypes, name)
    hosts: list[Any] = []
    _hosts_of(state, hosts)
    out = recording.host(*hosts)
    if out is None or concrete.program != recording.program:
        msg = "the recording with host symbols differs from the concrete one"
        raise Untraceable(msg)
    values, shared = out
    want = _host_leaves(concrete.rebuild(arrays))
    got = _host_leaves(recording.rebuild(arrays, shared))
    if not (_same_values(values, concrete.values) and _same_values(got, want)):
        msg = "the recording with host symbols computes other host values"
        raise Untraceable(msg)


def _hosts_of(state: Any, hosts: list[Any]) -> None:
    kind = type(state)
    if isinstance(state, tuple):
        for s in state:
            _hosts_of(s, hosts)
    elif kind in _HOST_SCALARS or kind is int or kind is float:
        hosts.append(state)


def _host_leaves(state: Any) -> list[Any]:
    """Every non-tuple leaf of ``state`` that is not an array, with its identity of kind."""
    out: list[Any] = []

    def walk(s: Any) -> None:
        if isinstance(s, tuple):
            out.append(type(s))
            for part in s:
                walk(part)
        elif isinstance(s, list):
            out.append(list)
            for part in s:
                walk(part)
        elif hasattr(s, "shape") and hasattr(s, "dtype") and not np.isscalar(s):
            out.append(_ARRAY)
        else:
            out.append(s)

    walk(state)
    return out


def _same_values(a: Any, b: Any) -> bool:
    """Whether two sequences of host values are equal in type and bits."""
    if len(a) != len(b):
        return False
    for u, v in zip(a, b, strict=True):
        if type(u) is not type(v):
            return False
        if isinstance(u, (np.generic, float)):
            if np.asarray(u).tobytes() != np.asarray(v).tobytes():
                return False
        elif u is not v and u != v:
            return False
    return True
