"""The operations a rule calls on ``xp``, declared once.

A rule's ``xp`` is an adapter (``agnosticopt.adapters``): the full array-API
namespace of the backend (``xp.mean``, ``xp.linalg.vector_norm``, ``xp.zeros``,
...), with the operations of :data:`OPS` overriding the namespace's functions of
the same name. The library guarantees the bits of the operations marked
``exact`` on every backend (each adapter fixes what its backend gets wrong); any
other function of the namespace may be called too, and is *identical only if
the backends agree* (reductions, for one, sum in backend-specific orders).

The table is the vocabulary of the whole library: :class:`agnosticopt.adapters.Adapter`
implements every operation in it, the fast path's recorder
(:mod:`agnosticopt._trace`) records exactly the ``recorded`` ones under their
names, and a backend's lowering of recorded programs (``adapters/_numba.py``)
compiles them; ``tests/test_ops.py`` fails if one of them drifts from the table.
Adding an exact operation means a row here, its method in the base adapter, and
a fix in the backends that get it wrong.

>>> from agnosticopt._ops import OPS
>>> OPS["divide"].meaning
'a / b, one correctly rounded IEEE division (never a * (1/b))'
>>> sorted(op.name for op in OPS.values() if not op.exact)
['pow']
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BY_OPERATOR",
    "EXACT",
    "OPS",
    "RECORDED",
    "SERVICES",
    "Op",
    "OperatorWarning",
    "table_markdown",
]


class OperatorWarning(UserWarning):
    """A rule applied a Python operator (``a * b``) to an array.

    Python operators are not in the library's exact vocabulary: ``eta / (dx*dx + 1)``
    can round differently on torch than on numpy. Write ``xp.divide(eta, ...)``
    and friends (see ``agnosticopt._ops.OPS``). The step is still computed (on
    the plain path), with the backend's operator.
    """


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of the vocabulary.

    Attributes
    ----------
    name
        The method of ``xp`` (and the name in recorded programs).
    signature
        Its arguments, as a rule writes them.
    meaning
        The reference meaning, the one every backend must give.
    exact
        Whether the library guarantees the same bits on every backend.
    recorded
        Whether the fast path records it (a rule using only recorded operations
        is compiled into a numba kernel on numpy and CPU torch arrays).
    operator
        The Python operator with the same arithmetic (``"*"`` for ``multiply``),
        named in :class:`OperatorWarning`; ``None`` if there is none.
    """

    name: str
    signature: str
    meaning: str
    exact: bool = True
    recorded: bool = True
    operator: str | None = None

    @property
    def arity(self) -> int:
        """The number of array-or-scalar arguments."""
        inside = self.signature.partition("(")[2].rstrip(")")
        return len([a for a in inside.split(",") if a.strip() and "=" not in a])


_ROWS = (
    # -- creation
    Op("zeros_like", "zeros_like(x)", "+0 of the shape, dtype and device of x"),
    Op(
        "real_zeros_like",
        "real_zeros_like(x)",
        "+0 of the shape and device of x, in its real dtype",
    ),
    Op(
        "full_like",
        "full_like(x, value)",
        "value rounded to the dtype of x, of the shape and device of x",
    ),
    Op("copy", "copy(x)", "a new array equal to x"),
    Op("astype", "astype(x, name)", "x rounded once to the dtype called name"),
    # -- arithmetic
    Op("add", "add(a, b)", "a + b, one correctly rounded IEEE addition", operator="+"),
    Op(
        "subtract",
        "subtract(a, b)",
        "a - b, one correctly rounded IEEE subtraction",
        operator="-",
    ),
    Op(
        "multiply",
        "multiply(a, b)",
        "a * b, one correctly rounded IEEE multiplication",
        operator="*",
    ),
    Op(
        "divide",
        "divide(a, b)",
        "a / b, one correctly rounded IEEE division (never a * (1/b))",
        operator="/",
    ),
    Op("negative", "negative(a)", "-a (the sign bit flipped)", operator="-x"),
    Op("sqrt", "sqrt(a)", "the correctly rounded square root of a real a"),
    Op("abs", "abs(a)", "the absolute value of a real a", operator="abs"),
    Op(
        "abs2",
        "abs2(a)",
        "a * a for real a; re*re + im*im (a real array) for complex a",
    ),
    Op("sign", "sign(a)", "-1, +0 or 1; sign(-0.0) is +0.0; NaN stays NaN"),
    Op("maximum", "maximum(a, b)", "IEEE 754-2019 maximum: NaN wins, +0 > -0"),
    Op("minimum", "minimum(a, b)", "IEEE 754-2019 minimum: NaN wins, -0 < +0"),
    Op("clip", "clip(a, lo, hi)", "minimum(maximum(a, lo), hi), NaN passed through"),
    # -- comparisons and selection
    Op("where", "where(cond, a, b)", "a where cond is true, else b"),
    Op("greater", "greater(a, b)", "a > b (a boolean array)", operator=">"),
    Op("less", "less(a, b)", "a < b (a boolean array)", operator="<"),
    Op("not_equal", "not_equal(a, b)", "a != b (a boolean array)", operator="!="),
    Op("isfinite", "isfinite(a)", "whether a is neither infinite nor NaN"),
    # -- outside the fast path
    Op(
        "pow",
        "pow(a, q)",
        "a ** q; not correctly rounded on every backend (norms only)",
        exact=False,
        recorded=False,
        operator="**",
    ),
    Op(
        "count_nonzero",
        "count_nonzero(a)",
        "the number of non-zero elements of a (NaN counts), as an int",
        recorded=False,
    ),
    Op(
        "flatten",
        "flatten(a)",
        "a as a one-dimensional array (C order)",
        recorded=False,
    ),
    Op(
        "concat",
        "concat(arrays)",
        "one-dimensional arrays joined end to end",
        recorded=False,
    ),
)

#: Every operation of the vocabulary, by name.
OPS: dict[str, Op] = {op.name: op for op in _ROWS}
#: The names of the operations guaranteed bit-identical on every backend.
EXACT = frozenset(op.name for op in _ROWS if op.exact)
#: The names of the operations the fast path records.
RECORDED = frozenset(op.name for op in _ROWS if op.recorded)
#: The adapter's methods that are not array operations: dtypes and shapes, host
#: copies, memory and in-place writes (the tree and the checkpoints use them).
SERVICES = frozenset(
    {
        "dtype_name",
        "dtype",
        "is_trainable",
        "is_complex",
        "scalar_type",
        "astype_tracked",
        "shape",
        "size",
        "to_host",
        "to_numpy",
        "device",
        "rewrap",
        "memory_key",
        "memory_span",
        "overlaps",
        "writeable",
        "subtract_",
        "assign_",
        "computing",
        "make_complex",
    }
)
#: The operation with each Python operator's arithmetic, e.g. ``"*"`` -> ``multiply``.
BY_OPERATOR = {op.operator: op for op in _ROWS if op.operator is not None}


def table_markdown() -> str:
    """The table as the Markdown table of ``docs/contract.md``."""
    lines = ["| operation | meaning | bit-identical | fast path |", "|---|---|---|---|"]
    for op in _ROWS:
        exact = "yes" if op.exact else "identical only if the backends agree"
        fast = "yes" if op.recorded else "no"
        lines.append(f"| `xp.{op.signature}` | {op.meaning} | {exact} | {fast} |")
    return "\n".join(lines) + "\n"
