"""A user's rule on every installed backend: ``check_rule`` and ``conformance --rule``.

:func:`check_rule` runs one rule (a :class:`~agnosticopt.Rule`, a Rule class
taking its defaults, or a zero-argument factory) through the suite's trajectory
check on each backend, in each dtype and data set, against numpy's plain path
(:func:`agnosticopt.update`), and the property checks (``update`` against
``update_``, dtypes and devices kept, inputs untouched, ...). The
:class:`RuleReport` says per backend whether the bits are identical, how many
elements differ and by how many ulps, or which error was raised, and which
operations the rule uses outside the exact set (:func:`agnosticopt.ops_used`).
:func:`load_rule` reads ``"module:attribute"`` or ``"path/to/file.py:attribute"``.

>>> import agnosticopt as opt
>>> from agnosticopt.conformance import check_rule
>>> report = check_rule(opt.Descent, backends=["numpy"], dtypes=["float32"],
...                     steps=2, size=4099, properties=False)
>>> report.identical, report.status("numpy")
(True, 'identical')
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import pathlib
import sys
import types
import unittest
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from agnosticopt.conformance._backends import BUILTIN_BACKENDS, Backend, get_backend
from agnosticopt.conformance._cases import Case
from agnosticopt.conformance._checks import (
    PROPERTY_CHECKS,
    ConformanceError,
    KnownDeviation,
    check_trajectory,
)
from agnosticopt.conformance._compare import format_ulp
from agnosticopt.conformance._progress import Progress
from agnosticopt.conformance._table import format_table
from agnosticopt.conformance._trajectory import DEFAULT_SIZE, DEFAULT_STEPS

import agnosticopt as opt
from agnosticopt._trace import RuleOps

__all__ = [
    "RuleReport",
    "RuleResult",
    "as_rule",
    "check_rule",
    "load_rule",
    "survey_ops",
]

#: Worst first: the status a table cell shows when its results disagree.
_SEVERITY = ("error", "differs", "deviation", "identical", "passed", "skipped")


def as_rule(obj: Any, *, where: str = "rule") -> opt.Rule:
    """``obj`` as a rule: a Rule, a Rule class (its defaults) or a zero-argument factory.

    Raises
    ------
    TypeError
        Naming ``where`` and what was found, when ``obj`` gives no Rule.
    """
    if isinstance(obj, opt.Rule):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as exc:
            msg = f"{where}: {obj!r} cannot be called without arguments ({exc})"
            raise TypeError(msg) from exc
        if isinstance(made, opt.Rule):
            return made
        msg = f"{where}: calling {obj!r} returned {made!r}, not an agnosticopt.Rule"
        raise TypeError(msg)
    msg = (
        f"{where} is {obj!r}: expected an agnosticopt.Rule, a Rule class whose fields "
        "all have defaults, or a zero-argument factory returning a Rule"
    )
    raise TypeError(msg)


def _module_from_file(path: pathlib.Path) -> types.ModuleType:
    """Import the file at ``path`` as a module named after it (kept in ``sys.modules``)."""
    if not path.is_file():
        msg = f"no such file: {str(path)!r}"
        raise FileNotFoundError(msg)
    name = path.stem
    known = sys.modules.get(name)
    if known is not None and pathlib.Path(getattr(known, "__file__", "") or "") == path:
        return known
    if known is not None:
        name = f"agnosticopt_rule_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"{str(path)!r} cannot be imported as a Python module"
        raise ImportError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and get_type_hints look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_rule(spec: str) -> opt.Rule:
    """The rule named by ``"module:attribute"`` or ``"path/to/file.py:attribute"``.

    The attribute may be a Rule, a Rule class (instantiated with its defaults) or a
    zero-argument factory; a dotted attribute (``"mod:Holder.rule"``) is followed.

    Raises
    ------
    ValueError
        If ``spec`` has no ``:`` or no attribute after it.
    ImportError, FileNotFoundError, AttributeError, TypeError
        If the module, file or attribute is missing or gives no Rule.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        msg = (
            f"--rule {spec!r}: expected 'module:attribute' or 'path/to/file.py:attribute' "
            "(e.g. 'mypkg.rules:DecayDescent')"
        )
        raise ValueError(msg)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(pathlib.Path(target).resolve())
    else:
        module = importlib.import_module(target)
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            owner = getattr(found, "__name__", type(found).__name__)
            msg = f"--rule {spec!r}: {owner!r} has no attribute {part!r}"
            raise AttributeError(msg)
        found = getattr(found, part)
    return as_rule(found, where=f"--rule {spec!r}")


def survey_ops(rule: opt.Rule, dtypes: Sequence[str]) -> RuleOps | None:
    """The operations one step of ``rule`` uses (:func:`agnosticopt.ops_used`).

    Surveyed in the first real floating dtype of ``dtypes`` (float32 if none);
    None when the rule's ``init`` itself fails there (the checks report that).
    """
    dtype = next(
        (d for d in dtypes if d in ("float16", "float32", "float64")), "float32"
    )
    try:
        return opt.ops_used(rule, dtype)
    except Exception:  # noqa: BLE001  (init failed: the trajectory checks say how)
        return None


@dataclasses.dataclass(frozen=True)
class RuleResult:
    """One check of the rule on one backend, in one dtype (and data set).

    ``status`` is ``identical`` (``passed`` for a property check), ``differs``,
    ``deviation`` (a difference the adapter declares, e.g. JAX's flushed
    subnormals), ``skipped`` or ``error``. For a difference, ``path`` is the first
    differing entry (``x`` is the parameter, ``state...`` the state), ``count`` of
    its ``elements`` differ, and ``max_ulp`` is the largest distance over every
    entry. ``detail`` is the check's message, ``warnings`` the warnings it gave.
    """

    check: str
    backend: str
    dtype: str
    dataset: str | None
    status: str
    path: str = ""
    count: int = 0
    elements: int = 0
    max_ulp: float | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """Whether this result makes the rule fail the check."""
        return self.status in ("differs", "error")

    def describe(self) -> str:
        """A short cell: ``identical``, ``differs: 47 of 131089 elements of x, max 2 ulp``."""
        if self.status == "differs" and self.path:
            ulp = format_ulp(self.max_ulp if self.max_ulp is not None else float("inf"))
            data = f", {self.dataset} data" if self.dataset else ""
            return f"differs: {self.count} of {self.elements} elements of {self.path}, max {ulp}{data}"
        return self.status


def _run(check: Callable[[], Any], ok: str) -> dict[str, Any]:
    """The fields of a RuleResult from running ``check``, and the warnings it gave.

    Never raises for a failure; warnings (an operator warning from the fast
    path's recorder, say) are recorded, whatever the warning filters say.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fields = _outcome(check, ok)
    found = (f"{w.category.__name__}: {w.message}" for w in caught)
    return {**fields, "warnings": tuple(dict.fromkeys(found))}


def _outcome(check: Callable[[], Any], ok: str) -> dict[str, Any]:
    try:
        check()
    except unittest.SkipTest as exc:
        return {"status": "skipped", "detail": str(exc)}
    except ConformanceError as exc:
        status = "deviation" if isinstance(exc, KnownDeviation) else "differs"
        first = exc.comparison.first if exc.comparison else None
        if first is None:
            return {"status": status, "detail": str(exc)}
        return {
            "status": status,
            "path": first.path,
            "count": first.count,
            "elements": first.size,
            "max_ulp": exc.comparison.max_ulp if exc.comparison else None,
            "detail": str(exc),
        }
    except Exception as exc:  # noqa: BLE001  (a crash is a result: report it, go on)
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    except (
        SystemExit
    ) as exc:  # a backend or rule that exits mid-check has failed that check
        return {
            "status": "error",
            "detail": f"SystemExit({exc.code!r}) raised during the check",
        }
    return {"status": ok, "max_ulp": 0.0 if ok == "identical" else None}


@dataclasses.dataclass(frozen=True)
class RuleReport:
    """Every result of :func:`check_rule`, and its rendering."""

    rule: opt.Rule
    name: str
    results: tuple[RuleResult, ...]
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    steps: int | None
    size: int
    unavailable: dict[str, str]
    #: The operations the rule's step uses (:func:`survey_ops`); None: not surveyed.
    ops: RuleOps | None = None

    @property
    def non_exact_ops(self) -> tuple[str, ...]:
        """The functions and Python operators used outside the exact set."""
        if self.ops is None:
            return ()
        return (
            *(f"xp.{n}" for n in self.ops.inexact),
            *(f"`{o}`" for o in self.ops.operators),
        )

    @property
    def ran(self) -> list[RuleResult]:
        """The results of checks that ran (not skipped)."""
        return [r for r in self.results if r.status != "skipped"]

    @property
    def identical(self) -> bool:
        """Whether at least one check ran and none differs or fails."""
        return bool(self.ran) and not any(r.failed for r in self.results)

    def to_json(self) -> str:
        """The report as one JSON document (an infinite ulp distance is ``null``)."""
        results = []
        for r in self.results:
            out = dataclasses.asdict(r)
            if r.max_ulp is not None and math.isinf(r.max_ulp):
                out["max_ulp"] = None
            results.append(out)
        doc = {
            "rule": repr(self.rule),
            "identical": self.identical,
            "backends": list(self.backends),
            "dtypes": list(self.dtypes),
            "steps": self.steps,
            "size": self.size,
            "unavailable": self.unavailable,
            "non_exact_ops": None if self.ops is None else list(self.non_exact_ops),
            "results": results,
        }
        return json.dumps(doc, indent=1)

    def _cell(self, found: Sequence[RuleResult], notes: list[str]) -> str:
        if not found:
            return ""
        worst = min(
            found, key=lambda r: (_SEVERITY.index(r.status), -(r.max_ulp or 0.0))
        )
        if worst.status == "passed" or worst.status == "identical":
            return worst.status
        failed = sum(r.status == worst.status for r in found)
        text = (
            worst.describe()
            if worst.check == "trajectory"
            else (
                f"{failed} {worst.status}" if worst.status != "skipped" else "skipped"
            )
        )
        if worst.detail not in notes:
            notes.append(worst.detail)
        return f"{text} [{notes.index(worst.detail) + 1}]"

    def warned(self) -> dict[str, list[str]]:
        """Each warning the checks gave, and the backends it came from."""
        found: dict[str, list[str]] = {}
        for r in self.results:
            for text in r.warnings:
                where = found.setdefault(text, [])
                if r.backend not in where:
                    where.append(r.backend)
        return found

    def status(self, backend: str, dtype: str | None = None) -> str:
        """The worst status of the trajectory checks on ``backend`` (in ``dtype``)."""
        found = [
            r
            for r in self.results
            if r.backend == backend
            and r.check == "trajectory"
            and (dtype is None or r.dtype == dtype)
        ]
        if not found:
            return "not checked"
        return min(found, key=lambda r: _SEVERITY.index(r.status)).status

    def render(self) -> str:
        """The report as text: a table of backend x dtype, the notes, the verdict."""
        notes: list[str] = []
        names = [b for b in self.backends if b not in self.unavailable]
        datasets = sorted({r.dataset for r in self.results if r.dataset})
        lengths = ", ".join(
            f"{self.steps if self.steps is not None else DEFAULT_STEPS.get(d, 0)} in {d}"
            for d in self.dtypes
        )
        head = f"{self.name}: {self.size} elements, steps {lengths}"
        data = " and ".join(datasets)
        out = [f"{head} ({data} data), against numpy's plain path (agnosticopt.update)"]
        columns = list(self.dtypes)
        checks = list(
            dict.fromkeys(r.check for r in self.results if r.check != "trajectory")
        )
        if checks:
            columns.append("property checks")
        rows = []
        for name in names:
            row = [name]
            for dtype in self.dtypes:
                row.append(
                    self._cell(
                        [
                            r
                            for r in self.results
                            if r.backend == name
                            and r.dtype == dtype
                            and r.check == "trajectory"
                        ],
                        notes,
                    )
                )
            if checks:
                row.append(
                    self._cell(
                        [
                            r
                            for r in self.results
                            if r.backend == name and r.check != "trajectory"
                        ],
                        notes,
                    )
                )
            rows.append(row)
        out += [format_table(["backend", *columns], rows), ""]
        if self.unavailable:
            out.append(
                "not available: "
                + "; ".join(f"{n} ({why})" for n, why in self.unavailable.items())
            )
        for text, where in self.warned().items():
            out.append(f"warning on {', '.join(where)}: {_first_lines(text)}")
        if self.non_exact_ops:
            out.append(
                f"uses non-exact ops: {', '.join(self.non_exact_ops)} (identical only "
                "if the backends agree)"
            )
        elif self.ops is not None:
            out.append("uses only bit-identical operations")
        if self.ops is not None and self.ops.stopped is not None:
            out.append(f"op survey stopped early: {_first_lines(self.ops.stopped)}")
        out += [f"[{k}] {_first_lines(text)}" for k, text in enumerate(notes, 1)]
        out.append(self._verdict(names))
        return "\n".join(out)

    def _verdict(self, names: Sequence[str]) -> str:
        if not self.ran:
            return f"FAILED: no check of {self.name} ran (every one was skipped)"
        bad = [
            n for n in names if any(r.failed for r in self.results if r.backend == n)
        ]
        if bad:
            return f"FAILED: {self.name} is not identical to numpy on {', '.join(bad)}"
        deviations = any(r.status == "deviation" for r in self.results)
        return f"OK: {self.name} gives numpy's bits on every available backend" + (
            " (apart from the declared deviations)" if deviations else ""
        )


def _first_lines(text: str, limit: int = 600) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    short = " / ".join(lines[:2])
    return short if len(short) <= limit else short[: limit - 3] + "..."


def check_rule(
    rule: Any,
    *,
    backends: Sequence[str | Backend] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    datasets: Sequence[str] = ("normal", "special"),
    steps: int | None = None,
    size: int = DEFAULT_SIZE,
    properties: bool = True,
    progress: Progress | None = None,
) -> RuleReport:
    """Check a user's rule on every installed backend; never raises for a failing one.

    Parameters
    ----------
    rule
        A Rule, a Rule class (instantiated with its defaults) or a zero-argument
        factory returning a Rule.
    backends
        Built-in names, ``"module:attribute"`` specs or Backends (default: every
        built-in one; those not installed are listed as unavailable).
    dtypes, datasets
        Parameter dtypes and gradient data sets of the trajectory checks.
    steps, size
        Trajectory length (default per dtype) and parameter elements (> 100k).
    properties
        Also run the property checks (:data:`PROPERTY_CHECKS`) per backend and dtype.
    progress
        A progress bar to advance (default none).

    Returns
    -------
    RuleReport
        ``report.identical``, ``report.status(backend)``, ``report.render()``.
    """
    made = as_rule(rule)
    name = type(made).__name__
    case = Case(name, made)
    found = [get_backend(b) for b in (backends or list(BUILTIN_BACKENDS))]
    unavailable = {b.name: why for b in found if (why := b.unavailable())}
    bar = progress or Progress(1, enabled=False)
    results: list[RuleResult] = []
    for dtype in dtypes:
        for b in found:
            for dataset in datasets:
                bar.show(f"trajectory: {name} {dtype} {dataset} on {b.name}")
                fields = _run(
                    functools.partial(
                        check_trajectory,
                        b,
                        case,
                        dtype,
                        dataset=dataset,
                        steps=steps,
                        size=size,
                    ),
                    "identical",
                )
                results.append(
                    RuleResult("trajectory", b.name, dtype, dataset, **fields)
                )
                bar.advance()
            for check in PROPERTY_CHECKS if properties else ():
                bar.show(f"{check.__name__}: {name} {dtype} on {b.name}")
                fields = _run(functools.partial(check, b, case, dtype), "passed")
                label = check.__name__.removeprefix("check_")
                results.append(RuleResult(label, b.name, dtype, None, **fields))
                bar.advance()
    return RuleReport(
        made,
        name,
        tuple(results),
        tuple(b.name for b in found),
        tuple(dtypes),
        steps,
        size,
        unavailable,
        survey_ops(made, dtypes),
    )


def rule_check_size(
    n_backends: int, n_dtypes: int, n_datasets: int, *, properties: bool
) -> int:
    """The number of checks :func:`check_rule` runs (for the progress bar)."""
    return (
        n_backends
        * n_dtypes
        * (n_datasets + (len(PROPERTY_CHECKS) if properties else 0))
    )
