"""The conformance checks: plain functions, scikit-learn's ``check_*`` pattern.

Every check has the signature ``check(backend, case, dtype, **options)``:

* ``backend`` is a :class:`~agnosticopt.conformance.Backend` (or any object
  with ``asarray`` and ``to_numpy``);
* ``case`` is a :class:`~agnosticopt.conformance.Case` or a bare rule;
* ``dtype`` is the parameter dtype name.

A check returns quietly when the backend conforms, raises
:class:`ConformanceError` (an ``AssertionError``) naming the check, rule,
dtype and first differing element when it does not, raises
:class:`KnownDeviation` when the difference is one the adapter declares, and
raises :class:`unittest.SkipTest` (which pytest reports as a skip) when the
backend is unavailable or lacks the dtype.
"""

from __future__ import annotations

import functools
import unittest
from collections.abc import Callable
from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend, NumpyBackend, as_backend
from agnosticopt.conformance._cases import Case, complex_ok
from agnosticopt.conformance._compare import Comparison, compare
from agnosticopt.conformance._data import gradient_pool, initial_parameter
from agnosticopt.conformance._golden import (
    GOLDEN_DTYPES,
    golden_snapshot,
    golden_trajectory,
)
from agnosticopt.conformance._trajectory import (
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    reference_trajectory,
    run_trajectory,
    snapshot,
    snapshot_state,
)

import agnosticopt as opt
from agnosticopt._global import has_stages

__all__ = [
    "ALL_CHECKS",
    "PROPERTY_CHECKS",
    "ConformanceError",
    "KnownDeviation",
    "check_device_preserved",
    "check_dtype_preserved",
    "check_golden",
    "check_inputs_untouched",
    "check_none_gradient",
    "check_state_structure_stable",
    "check_tied_weights",
    "check_trajectory",
    "check_update_matches_update_",
]

#: Elements and steps of the quick property checks (> 4096: vector paths).
SMALL_SIZE = 4099
SMALL_STEPS = 3


class ConformanceError(AssertionError):
    """A backend does not reproduce the reference.

    Attributes
    ----------
    check, backend, case, dtype, dataset
        What was checked where (``dataset`` is ``None`` for property checks).
    comparison
        The bitwise comparison, when the failure is a difference in values.
    """

    def __init__(
        self,
        message: str,
        *,
        check: str,
        backend: str,
        case: str,
        dtype: str,
        dataset: str | None = None,
        comparison: Comparison | None = None,
    ) -> None:
        super().__init__(message)
        self.check, self.backend, self.case = check, backend, case
        self.dtype, self.dataset, self.comparison = dtype, dataset, comparison


class KnownDeviation(ConformanceError):  # noqa: N818  (an expected failure)
    """A difference that the adapter declares (``deviation`` names it)."""

    deviation: str = ""


def as_case(case: Case | opt.Rule) -> Case:
    """``case`` as a :class:`Case` (a bare rule is named by its class)."""
    return case if isinstance(case, Case) else Case(type(case).__name__, case)


def _prepare(
    backend: Any, case: Case | opt.Rule, dtype: str, *, needs_update_: bool = False
) -> tuple[Backend, Case]:
    b, c = as_backend(backend), as_case(case)
    reason = b.unavailable() or b.unsupported(dtype)
    if not reason and needs_update_ and not b.in_place:
        reason = b.in_place_refused
    if reason:
        raise unittest.SkipTest(f"{b.name}: {reason}")
    if dtype.startswith("complex") and not complex_ok(c.rule):
        raise unittest.SkipTest(f"{c.name} is not defined for complex parameters")
    return b, c


class _Failure:
    """Builds the ConformanceError of one check run."""

    def __init__(
        self,
        check: str,
        backend: Backend,
        case: Case,
        dtype: str,
        dataset: str | None = None,
    ) -> None:
        self.check, self.backend, self.case = check, backend, case
        self.dtype, self.dataset = dtype, dataset

    def header(self) -> str:
        data = f", {self.dataset} data" if self.dataset else ""
        return f"{self.check}: {self.case.name} in {self.dtype}{data} on {self.backend.name}"

    def error(
        self, what: str, comparison: Comparison | None = None
    ) -> ConformanceError:
        message = f"{self.header()}: {what}"
        if comparison is not None:
            message += "\n  " + comparison.describe().replace("\n", "\n  ")
            message += f"\n  rule: {self.case.rule!r}"
        return ConformanceError(
            message,
            check=self.check,
            backend=self.backend.name,
            case=self.case.name,
            dtype=self.dtype,
            dataset=self.dataset,
            comparison=comparison,
        )

    def differs(
        self,
        what: str,
        comparison: Comparison,
        flushed: Callable[[], Comparison] | None = None,
    ) -> None:
        """Raise if ``comparison`` found differences.

        ``flushed`` compares the backend's result with the same run on numpy
        with subnormals flushed (:mod:`~agnosticopt.conformance._flush`). A
        backend that declares ``flushes_subnormals`` for this dtype gets a
        :class:`KnownDeviation` only when that comparison is identical: any
        other difference is a :class:`ConformanceError`. Without ``flushed``
        (the property checks compare a backend with itself) nothing is excused.
        """
        if comparison.identical:
            return
        err = self.error(what, comparison)
        deviation = self.backend.deviation(self.dtype, self.dataset or "")
        if not deviation or flushed is None:
            raise err
        explained = flushed()
        if not explained.identical:
            raise self.error(
                f"{what}, and the declared deviation does not explain it ({deviation}): "
                "it also differs from numpy run with subnormals flushed to zero "
                "(FTZ and DAZ)",
                explained,
            )
        known = KnownDeviation(
            f"{deviation}; identical to numpy run with subnormals flushed to zero "
            f"(FTZ and DAZ)\n{err}",
            check=err.check,
            backend=err.backend,
            case=err.case,
            dtype=err.dtype,
            dataset=err.dataset,
            comparison=comparison,
        )
        known.deviation = deviation
        raise known


@functools.lru_cache(maxsize=8)
def _flushed_trajectory(
    rule: opt.Rule, dtype: str, dataset: str, steps: int | None, size: int
) -> dict[str, Any]:
    """:func:`run_trajectory` on numpy with subnormals flushed (the last few cached)."""
    from agnosticopt.conformance._flush import flushed_backend

    return run_trajectory(
        flushed_backend(), rule, dtype, dataset, steps=steps, size=size
    )


def check_trajectory(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    dataset: str = "normal",
    steps: int | None = None,
    size: int = DEFAULT_SIZE,
) -> Comparison:
    """The parameter and state after many chained ``update_`` are numpy's bits.

    Parameters
    ----------
    backend, case, dtype
        See the module docstring.
    dataset
        ``"normal"`` or ``"special"`` gradients.
    steps
        Number of updates (default: per dtype, 1000 for float32).
    size
        Elements of the parameter (default > 100k).

    Returns
    -------
    Comparison
        The (empty) comparison, when identical.
    """
    if (steps is not None and steps < 1) or size < 1:
        msg = f"check_trajectory needs steps >= 1 and size >= 1, got {steps} and {size}"
        raise ValueError(msg)
    b, c = _prepare(backend, case, dtype)
    fail = _Failure("trajectory", b, c, dtype, dataset)
    got = run_trajectory(b, c.rule, dtype, dataset, steps=steps, size=size)
    want = reference_trajectory(c.rule, dtype, dataset, steps, size)
    result = compare(got, want)
    length = DEFAULT_STEPS[dtype] if steps is None else steps
    fail.differs(
        f"differs from numpy after {length} steps of {size} elements",
        result,
        lambda: compare(got, _flushed_trajectory(c.rule, dtype, dataset, steps, size)),
    )
    return result


def check_golden(
    backend: Any, case: Case | opt.Rule, dtype: str = "float32"
) -> Comparison:
    """The trajectory matches the committed golden file bit for bit."""
    b, c = _prepare(backend, case, dtype)
    if dtype not in GOLDEN_DTYPES:
        raise unittest.SkipTest(
            f"no golden file for {dtype} (only {', '.join(GOLDEN_DTYPES)})"
        )
    meta, want = golden_snapshot(c, dtype)
    fail = _Failure("golden", b, c, dtype, meta["dataset"])
    got = golden_trajectory(b, c, dtype)
    result = compare(got, want)

    def flushed() -> Comparison:
        from agnosticopt.conformance._flush import flushed_backend

        return compare(got, golden_trajectory(flushed_backend(), c, dtype))

    fail.differs(
        f"differs from the golden file after {meta['steps']} steps of {meta['size']} elements",
        result,
        flushed,
    )
    return result


def _inputs(b: Backend, dtype: str, size: int = SMALL_SIZE) -> tuple[Any, list[Any]]:
    x = b.asarray(initial_parameter(dtype, size))
    return x, [b.asarray(g) for g in gradient_pool(dtype, "normal", size)]


def check_update_matches_update_(
    backend: Any, case: Case | opt.Rule, dtype: str = "float32", *, steps: int = 5
) -> None:
    """``update`` and ``update_`` give the same bits; ``update_`` keeps the tree.

    On a backend whose arrays are ``writeable``, ``update_`` must also write
    into the parameter (return the same array object).
    """
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("update vs update_", b, c, dtype)
    xf, grads = _inputs(b, dtype)
    xi, _ = _inputs(b, dtype)
    tf, ti = opt.setup(c.rule, xf), opt.setup(c.rule, xi)
    for k in range(steps):
        g = grads[k % len(grads)]
        tf, xf = opt.update(tf, xf, g)
        new_tree, new_x = opt.update_(ti, xi, g)
        if new_tree is not ti:
            raise fail.error("update_ returned a new tree instead of updating it")
        if b.writeable and new_x is not xi:
            raise fail.error("update_ did not write into a writeable parameter")
        xi = new_x
    result = compare(snapshot(b, xi, ti), snapshot(b, xf, tf))
    fail.differs(f"update_ differs from update after {steps} steps", result)


def _signature(snap: dict[str, Any]) -> dict[str, str]:
    """Path -> ``"float32(4099,)"`` for arrays, the type name for host scalars."""
    return {
        p: f"{v.dtype}{v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
        for p, v in snap.items()
    }


def _diff_signatures(got: dict[str, str], want: dict[str, str]) -> str:
    lines = [
        f"{p}: got {got.get(p, 'nothing')}, want {w}"
        for p, w in want.items()
        if got.get(p) != w
    ]
    lines += [f"{p}: got {g}, want nothing" for p, g in got.items() if p not in want]
    return "; ".join(lines)


def check_dtype_preserved(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    steps: int = SMALL_STEPS,
) -> None:
    """The parameter keeps its dtype; every state array has numpy's dtype."""
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("dtype preserved", b, c, dtype)
    ref = NumpyBackend()
    x, grads = _inputs(b, dtype)
    rx, rgrads = _inputs(ref, dtype)
    tree, rtree = opt.setup(c.rule, x), opt.setup(c.rule, rx)
    for k in range(steps + 1):
        name = opt.adapter_for(x).dtype_name(x)
        if name != dtype:
            raise fail.error(f"after {k} steps the parameter is {name}, not {dtype}")
        got, want = (
            _signature(snapshot(b, x, tree)),
            _signature(snapshot(ref, rx, rtree)),
        )
        if got != want:
            raise fail.error(f"after {k} steps: {_diff_signatures(got, want)}")
        tree, x = opt.update_(tree, x, grads[k % len(grads)])
        rtree, rx = opt.update(
            rtree, rx, rgrads[k % len(rgrads)]
        )  # reference: plain path


def check_state_structure_stable(
    backend: Any, case: Case | opt.Rule, dtype: str = "float32", *, steps: int = 7
) -> None:
    """The state keeps its structure, dtypes, shapes and host scalar types."""
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("state structure stable", b, c, dtype)
    x, grads = _inputs(b, dtype)
    tree = opt.setup(c.rule, x)
    first = _signature(snapshot(b, x, tree))
    for k in range(steps):
        tree, x = opt.update_(tree, x, grads[k % len(grads)])
        now = _signature(snapshot(b, x, tree))
        if now != first:
            raise fail.error(f"after {k + 1} steps: {_diff_signatures(now, first)}")


def _state_arrays(state: Any) -> list[Any]:
    """Every backend array in a (nested) state, found as the snapshot finds them."""
    found: list[Any] = []

    def collect(a: Any) -> Any:
        found.append(a)
        return a

    snapshot_state(state, collect)
    return found


def check_device_preserved(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    steps: int = SMALL_STEPS,
) -> None:
    """State and updated parameters live on the parameter's device.

    The built-in array-api-strict backend puts arrays on its non-default
    device, so state created on the default device is caught there.
    """
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("device preserved", b, c, dtype)
    x, grads = _inputs(b, dtype)
    device = b.device(x)

    def where(tree: Any, x: Any, when: str) -> None:
        if b.device(x) != device:
            raise fail.error(
                f"{when}: the parameter moved from {device} to {b.device(x)}"
            )
        for k, a in enumerate(_state_arrays(tree.state)):
            if b.device(a) != device:
                raise fail.error(
                    f"{when}: state array {k} is on {b.device(a)}, not {device}"
                )

    tree = opt.setup(c.rule, x)
    where(tree, x, "after setup")
    tf, xf = tree, x
    for k in range(steps):
        tf, xf = opt.update(tf, xf, grads[k % len(grads)])
        where(tf, xf, f"after {k + 1} update")
        tree, x = opt.update_(tree, x, grads[k % len(grads)])
        where(tree, x, f"after {k + 1} update_")


def _array_snapshot(b: Backend, value: Any) -> dict[str, Any]:
    return {"gradient": b.to_numpy(value)}


def check_inputs_untouched(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    steps: int = SMALL_STEPS,
) -> None:
    """``update`` modifies neither model, gradients nor tree; ``update_`` not the gradients.

    On the read-only numpy backend any write into an input raises, so this
    check also catches writes that would leave the values unchanged.
    """
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("inputs untouched", b, c, dtype)
    x, grads = _inputs(b, dtype)
    model = {"w": x, "n": 3, "name": "layer"}
    tree = opt.setup(c.rule, model)
    for k in range(steps):
        g = {"w": grads[k % len(grads)], "n": None, "name": None}
        before = snapshot(b, x, tree["w"]), _array_snapshot(b, g["w"])
        leaf, state = tree["w"], tree["w"].state
        new_tree, new_model = opt.update(tree, model, g)
        if model["w"] is not x or set(model) != {"w", "n", "name"}:
            raise fail.error("update replaced an entry of the model it was given")
        if tree["w"] is not leaf or leaf.state is not state:
            raise fail.error("update changed the tree it was given")
        after = snapshot(b, x, tree["w"]), _array_snapshot(b, g["w"])
        fail.differs(
            f"update (step {k + 1}) wrote into the parameter or state",
            compare(after[0], before[0]),
        )
        fail.differs(
            f"update (step {k + 1}) wrote into the gradient",
            compare(after[1], before[1]),
        )
        del new_tree, new_model
        tree, model = opt.update_(tree, model, g)
        fail.differs(
            f"update_ (step {k + 1}) wrote into the gradient",
            compare(_array_snapshot(b, g["w"]), before[1]),
        )
        x = model["w"]


def check_none_gradient(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    steps: int = SMALL_STEPS,
) -> None:
    """A ``None`` gradient means no step and no state change; leaves are independent."""
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("None gradient", b, c, dtype)
    xa, grads = _inputs(b, dtype)
    xb = b.asarray(-initial_parameter(dtype, SMALL_SIZE))
    alone_x, _ = _inputs(b, dtype)
    model = {"a": xa, "b": xb}
    tree, alone = opt.setup(c.rule, model), opt.setup(c.rule, alone_x)
    tree, model = opt.update_(tree, model, {"a": grads[0], "b": grads[1]})
    alone, alone_x = opt.update_(alone, alone_x, grads[0])
    frozen = snapshot(b, model["b"], tree["b"])
    for k in range(1, steps + 1):
        g = grads[(k + 1) % len(grads)]
        new_tree, new_model = opt.update(tree, model, {"a": g, "b": None})
        fail.differs(
            f"update with a None gradient (step {k}) changed the parameter or state",
            compare(snapshot(b, new_model["b"], new_tree["b"]), frozen),
        )
        tree, model = opt.update_(tree, model, {"a": g, "b": None})
        fail.differs(
            f"update_ with a None gradient (step {k}) changed the parameter or state",
            compare(snapshot(b, model["b"], tree["b"]), frozen),
        )
        alone, alone_x = opt.update_(alone, alone_x, g)
    whole = snapshot(b, model["a"], tree["a"])
    _, untouched = opt.update(tree, model, None)
    fail.differs(
        "update(tree, model, None) changed a parameter",
        compare(snapshot(b, untouched["a"], tree["a"]), whole),
    )
    if not has_stages(c.rule):  # a global norm depends on every leaf, by design
        fail.differs(
            "a parameter's result depends on another parameter of the model",
            compare(whole, snapshot(b, alone_x, alone)),
        )


def check_tied_weights(
    backend: Any,
    case: Case | opt.Rule,
    dtype: str = "float32",
    *,
    steps: int = SMALL_STEPS,
) -> None:
    """An array at two places has one Leaf, gets the sum of its gradients, stays tied.

    The result must be numpy's bits for one array whose gradient is the sum.
    """
    b, c = _prepare(backend, case, dtype, needs_update_=True)
    fail = _Failure("tied weights", b, c, dtype)
    w, grads = _inputs(b, dtype)
    model = {"p": w, "q": w}
    tree = opt.setup(c.rule, model)
    if tree["p"] is not tree["q"]:
        raise fail.error("setup gave a tied array two Leaf objects")
    ref = NumpyBackend()
    rx, rgrads = _inputs(ref, dtype)
    rtree = opt.setup(c.rule, rx)
    with np.errstate(all="ignore"):
        summed = [
            np.add(g, rgrads[(k + 1) % len(rgrads)]) for k, g in enumerate(rgrads)
        ]
    for k in range(steps):
        i, j = k % len(grads), (k + 1) % len(grads)
        g = {"p": grads[i], "q": grads[j]}
        new_tree, new_model = opt.update(tree, model, g)  # functional: tree unchanged
        if new_model["p"] is not new_model["q"] or new_tree["p"] is not new_tree["q"]:
            raise fail.error("update untied the array")
        tree, model = opt.update_(tree, model, g)  # the step that counts
        if model["p"] is not model["q"]:
            raise fail.error("update_ untied the array")
        rtree, rx = opt.update(rtree, rx, summed[i])  # reference: plain path
    fail.differs(
        "differs from one array updated with the summed gradient",
        compare(snapshot(b, model["p"], tree["p"]), snapshot(ref, rx, rtree)),
    )


#: Every check, in the order reports list them.
ALL_CHECKS: tuple[Callable[..., Any], ...] = (
    check_trajectory,
    check_golden,
    check_update_matches_update_,
    check_dtype_preserved,
    check_device_preserved,
    check_inputs_untouched,
    check_state_structure_stable,
    check_none_gradient,
    check_tied_weights,
)
#: The checks of one property each (all but the two trajectory comparisons).
PROPERTY_CHECKS: tuple[Callable[..., Any], ...] = ALL_CHECKS[2:]
